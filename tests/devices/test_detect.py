from __future__ import annotations

from pathlib import Path

import pytest

import devices
from devices.detect import decode_pi_revision, detect_system

MiB, GiB = 1024**2, 1024**3

PI4_CPUINFO = (
    "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\n" for i in range(4))
    + "Revision\t: c03114\nSerial\t\t: 10000000abcdef01\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
)
PI5_CPUINFO = (
    "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nCPU part\t: 0xd0b\n\n" for i in range(4))
    + "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
)


def make_root(
    tmp_path: Path, cpuinfo: str, mem_kb: int, *, cgroup: dict[str, str] | None = None, v1: bool = False
) -> Path:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo)
    (tmp_path / "proc" / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:        1000 kB\n")
    if cgroup is not None:
        if v1:
            (tmp_path / "proc" / "self" / "cgroup").write_text(
                "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n"
            )
            mem = tmp_path / "sys" / "fs" / "cgroup" / "memory" / "docker" / "abc"
            mem.mkdir(parents=True)
            cpu = tmp_path / "sys" / "fs" / "cgroup" / "cpu,cpuacct" / "docker" / "abc"
            cpu.mkdir(parents=True)
            for name, text in cgroup.items():
                (mem if name.startswith("memory") else cpu).joinpath(name).write_text(text)
        else:
            (tmp_path / "proc" / "self" / "cgroup").write_text("0::/system.slice/learner.service\n")
            leaf = tmp_path / "sys" / "fs" / "cgroup" / "system.slice" / "learner.service"
            leaf.mkdir(parents=True)
            for name, text in cgroup.items():
                (leaf / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("code", "board", "memory_bytes", "profile"),
    [
        ("c03114", "4B", 4 * GiB, "rpi-4b-4gb"),
        ("a03111", "4B", 1 * GiB, "rpi-4b-1gb"),
        ("d03115", "4B", 8 * GiB, "rpi-4b-8gb"),
        ("c04170", "5", 4 * GiB, "rpi-5-4gb"),
        ("e04171", "5", 16 * GiB, "rpi-5-16gb"),
        ("a020d3", "3B+", 1 * GiB, "rpi-3b-plus"),
        ("902120", "Zero 2 W", 512 * MiB, "rpi-zero-2w"),
    ],
)
def test_decode_new_style_revision(code, board, memory_bytes, profile) -> None:
    revision = decode_pi_revision(code)
    assert revision is not None
    assert (revision.board, revision.memory_bytes, revision.profile_name) == (board, memory_bytes, profile)


@pytest.mark.parametrize("code", ["0010", "000e", "zz"])
def test_old_style_or_bad_revision_is_none(code) -> None:
    assert decode_pi_revision(code) is None


def test_detect_pi4_4gb(tmp_path: Path) -> None:
    root = make_root(tmp_path, PI4_CPUINFO, 3_884_000)
    assert devices.detect(root) == devices.get_profile("rpi-4b-4gb")


def test_detect_pi5(tmp_path: Path) -> None:
    root = make_root(tmp_path, PI5_CPUINFO, 8_000_000)
    profile = devices.detect(root)
    assert profile is devices.get_profile("rpi-5-8gb")


def test_detect_cgroup_v2_memory_and_cpu_limit(tmp_path: Path) -> None:
    root = make_root(
        tmp_path, PI4_CPUINFO, 3_884_000, cgroup={"memory.max": str(1 * GiB), "cpu.max": "150000 100000"}
    )
    info = detect_system(root)
    assert info.cgroup_memory_limit_bytes == GiB and info.memory_bytes == GiB
    assert info.usable_cpus == 2
    profile = devices.detect(root)
    assert profile.name == "rpi-4b-4gb@cgroup"
    assert profile.memory_bytes == GiB and profile.cores == 2
    assert 0 < profile.training_budget_bytes < GiB
    assert profile.to_budget().total_bytes == profile.training_budget_bytes


def test_detect_cgroup_v1_limit(tmp_path: Path) -> None:
    root = make_root(
        tmp_path,
        PI5_CPUINFO,
        8_000_000,
        v1=True,
        cgroup={
            "memory.limit_in_bytes": str(2 * GiB),
            "cpu.cfs_quota_us": "-1",
            "cpu.cfs_period_us": "100000",
        },
    )
    profile = devices.detect(root)
    assert profile.name == "rpi-5-8gb@cgroup" and profile.memory_bytes == 2 * GiB and profile.cores == 4


def test_unlimited_cgroup_is_ignored(tmp_path: Path) -> None:
    root = make_root(tmp_path, PI4_CPUINFO, 3_884_000, cgroup={"memory.max": "max", "cpu.max": "max 100000"})
    assert devices.detect(root).name == "rpi-4b-4gb"


def test_generic_machine(tmp_path: Path) -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: 2999.9\n\nprocessor\t: 1\n"
    root = make_root(tmp_path, cpuinfo, 2_000_000, cgroup={"memory.max": str(512 * MiB)})
    profile = devices.detect(root)
    assert profile.name == "generic-linux" and profile.memory_bytes == 512 * MiB
    assert profile.cores == 2 and profile.clock_mhz == 2999
    assert "Some CPU" in profile.description


def test_detect_this_machine() -> None:
    profile = devices.detect()
    assert profile.memory_bytes > 0 and profile.cores >= 1 and profile.training_budget_bytes > 0


def test_detected_profiles_budget_the_process(tmp_path: Path) -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: 2999.9\n\n"
    generic = devices.detect(make_root(tmp_path, cpuinfo, 2_000_000))
    budget = generic.to_budget()
    assert generic.runtime_bytes is not None and generic.process_overhead_bytes is not None
    assert budget.counts_process and budget.process_overhead_bytes == generic.process_overhead_bytes
    # A fake root is not this machine: the runtime is not measured there.
    assert devices.detect(make_root(tmp_path / "b", cpuinfo, 2_000_000), measure_runtime=True) == generic


@pytest.mark.slow
@pytest.mark.integration
def test_detect_measures_the_runtime_here() -> None:
    from devices.detect import measure_runtime_bytes

    runtime = measure_runtime_bytes()
    assert runtime is not None and 20 * MiB < runtime < 4 * GiB  # a fresh `import torch, ondevice, memory`
    default = devices.detect()
    measured = devices.detect(measure_runtime=True)
    assert measured.runtime_bytes == runtime
    if measured.reserved_bytes != default.reserved_bytes:  # it fits beside the rest of the reserve
        assert measured.reserved_bytes - default.reserved_bytes == runtime - (default.runtime_bytes or 0)
        assert "runtime measured" in measured.description
