from __future__ import annotations

import pytest

import devices
from devices.profiles import FLOWER_IDLE_BYTES, DeviceKind, DeviceProfile, mcu_reserved_bytes
from memory import Budget
from ondevice.errors import ConfigError, UnknownNameError

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    ("name", "kind", "memory_bytes", "flash_bytes", "cores", "clock_mhz"),
    [
        ("rpi-zero-2w", "linux-board", 512 * MiB, None, 4, 1000),
        ("rpi-3b-plus", "linux-board", 1 * GiB, None, 4, 1400),
        ("rpi-4b-1gb", "linux-board", 1 * GiB, None, 4, 1800),
        ("rpi-4b-8gb", "linux-board", 8 * GiB, None, 4, 1800),
        ("rpi-5-16gb", "linux-board", 16 * GiB, None, 4, 2400),
        ("jetson-nano-2gb", "linux-board", 2 * GiB, None, 4, 1430),
        ("jetson-orin-nano-8gb", "linux-board", 8 * GiB, None, 6, 1510),
        ("stm32f746", "mcu", 320 * KiB, 1 * MiB, 1, 216),
        ("stm32h743", "mcu", 1 * MiB, 2 * MiB, 1, 480),
        ("nrf52840", "mcu", 256 * KiB, 1 * MiB, 1, 64),
        ("esp32", "mcu", 520 * KiB, None, 2, 240),
        ("esp32-s3", "mcu", 512 * KiB, None, 2, 240),
        ("rp2040", "mcu", 264 * KiB, 2 * MiB, 2, 133),
    ],
)
def test_builtin_profiles_match_references(name, kind, memory_bytes, flash_bytes, cores, clock_mhz) -> None:
    profile = devices.get_profile(name)
    assert (profile.kind, profile.memory_bytes, profile.flash_bytes, profile.cores, profile.clock_mhz) == (
        DeviceKind(kind),
        memory_bytes,
        flash_bytes,
        cores,
        clock_mhz,
    )
    assert 0 < profile.training_budget_bytes < profile.memory_bytes


def test_all_pi_sizes_registered() -> None:
    names = {p.name for p in devices.list_profiles("linux-board")}
    assert {f"rpi-4b-{g}gb" for g in (1, 2, 4, 8)} | {f"rpi-5-{g}gb" for g in (1, 2, 4, 8, 16)} <= names
    assert all(p.kind is DeviceKind.MCU for p in devices.list_profiles(DeviceKind.MCU))


def test_linux_budget_leaves_room_for_flower_and_os() -> None:
    pi = devices.get_profile("rpi-4b-4gb")
    assert pi.reserved_bytes > FLOWER_IDLE_BYTES
    budget = pi.to_budget()
    assert isinstance(budget, Budget)
    assert budget.total_bytes == pi.training_budget_bytes and budget.name == "rpi-4b-4gb"
    assert budget.count_frozen_params and budget.frozen_param_bits == 32
    assert Budget.parse(pi).total_bytes == pi.training_budget_bytes


def test_mcu_budget_keeps_weights_in_flash() -> None:
    mcu = devices.get_profile("stm32f746")
    assert mcu.reserved_bytes == mcu_reserved_bytes(320 * KiB) == 40 * KiB
    budget = mcu.to_budget()
    assert (
        budget.total_bytes == 280 * KiB and not budget.count_frozen_params and budget.frozen_param_bits == 8
    )


def test_register_duplicate_and_unknown() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        devices.register_profile(devices.get_profile("esp32"))
    with pytest.raises(UnknownNameError, match=r"unknown device profile 'rpi-6'.*'rpi-5-8gb'"):
        devices.get_profile("rpi-6")


def test_register_custom_profile() -> None:
    profile = DeviceProfile("test-board-x", "linux-board", 2 * GiB, None, 2, 1000, 512 * MiB)
    try:
        assert devices.register_profile(profile) is devices.get_profile("test-board-x")
        assert profile.to_dict()["training_budget_bytes"] == 1536 * MiB
    finally:
        from devices import profiles

        profiles._REGISTRY.pop("test-board-x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "fpga"}, "kind must be one of"),
        ({"memory_bytes": 0}, "memory_bytes must be a positive int"),
        ({"reserved_bytes": 4 * GiB}, "reserved_bytes must be"),
        ({"flash_bytes": -1}, "flash_bytes"),
        ({"name": ""}, "name must be"),
    ],
)
def test_profile_validation(kwargs, match) -> None:
    fields = {
        "name": "x",
        "kind": "linux-board",
        "memory_bytes": GiB,
        "flash_bytes": None,
        "cores": 1,
        "clock_mhz": 1,
        "reserved_bytes": 0,
    } | kwargs
    with pytest.raises(ConfigError, match=match):
        DeviceProfile(**fields)


def test_linux_boards_budget_the_process_and_mcus_the_tensors() -> None:
    pi = devices.get_profile("rpi-zero-2w")
    assert pi.runtime_bytes is not None and pi.process_overhead_bytes is not None
    budget = pi.to_budget()
    assert budget.counts_process and budget.rss_per_tensor_byte == pi.rss_per_tensor_byte >= 1
    mcu = devices.get_profile("stm32f746")
    assert mcu.runtime_bytes is None and not mcu.to_budget().counts_process
    assert pi.to_dict()["process_overhead_bytes"] == pi.process_overhead_bytes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"runtime_bytes": -1}, "runtime_bytes must be an int >= 0 or None"),
        ({"process_overhead_bytes": 1.5}, "process_overhead_bytes must be an int >= 0 or None"),
        ({"rss_per_tensor_byte": 0.5}, "rss_per_tensor_byte must be a number in"),
    ],
)
def test_process_fields_are_validated(kwargs, match) -> None:
    fields = {"name": "x", "kind": "linux-board", "memory_bytes": GiB, "flash_bytes": None, "cores": 1,
              "clock_mhz": 1, "reserved_bytes": 0} | kwargs  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        DeviceProfile(**fields)
    with pytest.raises(ConfigError, match="rss_per_tensor_byte"):
        Budget(1, rss_per_tensor_byte=0.9)
    with pytest.raises(ConfigError, match="process_overhead_bytes"):
        Budget(1, process_overhead_bytes=-1)
