"""The frozen backbone shipped once, in int8 (``FederatedConfig(frozen_weights="int8", ship_backbone=True)``).

Devices that get the server's int8 backbone (and never pretrain) must train exactly as devices that
pretrain locally with int8: same digest, so the same numbers, round after round. The backbone goes to each
device once; a tampered one is refused with a clear error, nothing of it is kept, and it is sent again.
The in-process tests run the real ClientApp and the real strategy (``run_server``) on a loopback grid; the
last one runs the Simulation Engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message

import federated.client
from federated.apps import make_client_app, run_server
from federated.backbone import BACKBONE_FILE, BACKBONE_RECORD, backbone_record
from federated.client import DeviceLearner, build_model
from federated.config import FederatedConfig
from federated.errors import FederatedError, PayloadError
from federated.records import from_record, record_bytes, to_record
from federated.strategy import make_strategy
from ondevice.backbone import backbone_digest
from ondevice.errors import ConfigError

SMALL_LR = {"name": "lite_residual", "expand": 0.125, "kernel_size": 3, "groups": 4}


def _config(**kwargs: object) -> FederatedConfig:
    base = {"scheme": SMALL_LR, "rounds": 2, "num_clients": 3, "partition": "iid", "lr": 3e-3}
    base.update({"frozen_weights": "int8", "ship_backbone": True, **kwargs})
    return FederatedConfig(**base)  # type: ignore[arg-type]


def _tamper_backbone(message: Message, how: str) -> None:
    arrays = from_record(message.content[BACKBONE_RECORD])
    name = next(k for k in arrays if k.endswith("weight_int8"))
    if how == "flip":
        arrays[name] = arrays[name].copy()
        arrays[name].flat[0] ^= 1
    elif how == "float":
        arrays[name] = arrays[name].astype(np.float32)
    message.content[BACKBONE_RECORD] = to_record(arrays)


def _counting_pretrain(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = federated.client.pretrain

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(str(args[0]))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(federated.client, "pretrain", counted)
    return calls


def test_a_shipped_int8_backbone_trains_exactly_as_a_locally_pretrained_one(
    loopback_grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = _config(ship_backbone=False)
    calls = _counting_pretrain(monkeypatch)
    pretrained = run_server(loopback_grid(make_client_app(local, state_root=str(tmp_path / "a")), 3), local)
    assert len(calls) == 1 + 3 * 2  # the server once, each device each round (from its cache)

    calls.clear()
    shipped_config = _config()
    shipped = run_server(
        loopback_grid(make_client_app(shipped_config, state_root=str(tmp_path / "b")), 3), shipped_config
    )
    assert len(calls) == 1  # only the server: the devices never pretrain
    for a, b in zip(pretrained.rounds, shipped.rounds, strict=True):
        assert a.accuracy == b.accuracy and a.client_accuracy == b.client_accuracy
        assert b.accepted == 3 and not b.rejected
    assert sorted(pretrained.arrays) == sorted(shipped.arrays)
    for key, value in pretrained.arrays.items():
        np.testing.assert_array_equal(value, shipped.arrays[key])

    # Exactly once per device, in int8 + scales, counted in the round's bytes down.
    per_device = record_bytes(backbone_record(build_model(shipped_config)))
    first, second = shipped.rounds
    assert first.backbone_sent == (101, 102, 103) and first.backbone_bytes == 3 * per_device
    assert first.bytes_down == pretrained.rounds[0].bytes_down + 3 * per_device
    assert second.backbone_sent == () and second.backbone_bytes == 0
    assert second.bytes_down == pretrained.rounds[1].bytes_down
    assert "of them the backbone, to [101, 102, 103]" in first.summary(2)
    kept = sorted((tmp_path / "b").glob(f"partition-*/{BACKBONE_FILE}"))
    assert len(kept) == 3 and not list((tmp_path / "a").glob(f"partition-*/{BACKBONE_FILE}"))


def test_the_int8_backbone_ships_in_about_a_third_of_the_float_bytes() -> None:
    """The small CNN: int8 weights + a float32 scale per output channel + the float norms, as serialised."""
    int8 = record_bytes(backbone_record(build_model(_config())))
    floats = record_bytes(backbone_record(build_model(_config(frozen_weights="float"))))
    assert int8 < 0.35 * floats, (int8, floats)


def _flower_like(grid_class: type, client_app: object, tamper: Callable[[int, Message], None]) -> object:
    """A loopback grid that may tamper with messages before delivery and turns a ClientApp's exception
    into an error reply, as Flower's runtime does."""

    class FlowerLikeGrid(grid_class):  # type: ignore[misc, valid-type]
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            replies = []
            for message in messages:
                node = message.metadata.dst_node_id
                tamper(node, message)
                try:
                    replies.append(self.client_app(message, self.contexts[node]))
                except Exception as exc:  # what Flower's runtime does with it
                    reason = f"{type(exc).__name__}: {exc}"
                    replies.append(Message(Error(code=2, reason=reason), reply_to=message))
            return replies

    return FlowerLikeGrid(client_app, 3)


def test_a_tampered_backbone_is_refused_not_kept_and_sent_again(loopback_grid, tmp_path: Path) -> None:
    config = _config()
    done: list[int] = []

    def tamper(node: int, message: Message) -> None:
        if node == 101 and BACKBONE_RECORD in message.content and not done:
            done.append(node)
            _tamper_backbone(message, "flip")

    grid = _flower_like(loopback_grid, make_client_app(config, state_root=str(tmp_path)), tamper)
    outcome = run_server(grid, config)  # type: ignore[arg-type]
    first, second = outcome.rounds
    assert first.accepted == 2 and [node for node, _ in first.rejected] == [101]
    reason = dict(first.rejected)[101]
    assert "PayloadError" in reason and "digest" in reason and "damaged or altered" in reason
    assert second.backbone_sent == (101,) and second.accepted == 3  # sent again, to that device only


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("flip", r"digest .* differs from the one the server announced"),
        ("float", r"dtype float32, expected int8"),
    ],
)
def test_the_device_checks_the_backbone_before_loading_or_keeping_it(
    loopback_grid, tmp_path: Path, how: str, match: str
) -> None:
    config = _config()
    grid = loopback_grid(make_client_app(config, state_root=str(tmp_path)), 1)
    strategy = make_strategy(config)
    (message,) = strategy.configure_train(1, to_record(strategy.initial_arrays), ConfigRecord(), grid)
    _tamper_backbone(message, how)
    with pytest.raises(PayloadError, match=match):
        grid.client_app(message, grid.contexts[101])
    assert not list(tmp_path.rglob(BACKBONE_FILE))


def test_a_device_without_a_backbone_or_with_a_damaged_one_says_so(tmp_path: Path) -> None:
    config = _config()
    with pytest.raises(FederatedError, match=r"ships the backbone .* carries none and the device keeps none"):
        DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path)
    server = build_model(config)
    digest = backbone_digest(server)
    learner = DeviceLearner(
        config,
        partition_id=0,
        num_partitions=2,
        state_dir=tmp_path,
        backbone=backbone_record(server),
        announced_digest=digest,
    )
    assert learner.backbone_shipped and learner.digest == digest
    restarted = DeviceLearner(
        config, partition_id=0, num_partitions=2, state_dir=tmp_path, announced_digest=digest
    )
    assert not restarted.backbone_shipped and restarted.digest == digest  # loaded from its state directory
    kept = tmp_path / BACKBONE_FILE
    data = bytearray(kept.read_bytes())
    data[-3] ^= 0x10
    kept.write_bytes(bytes(data))
    with pytest.raises(FederatedError, match=r"unusable .*damaged.*sends the backbone again"):
        DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path, announced_digest=digest)
    assert not kept.exists() and (tmp_path / f"{BACKBONE_FILE}.unusable").exists()


def test_frozen_weights_and_ship_backbone_are_validated() -> None:
    with pytest.raises(ConfigError, match="frozen_weights must be one of 'float', 'int8', got 'int4'"):
        FederatedConfig(frozen_weights="int4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="scheme 'full' trains every weight"):
        FederatedConfig(scheme="full", frozen_weights="int8")
    with pytest.raises(ConfigError, match="ship_backbone must be a bool"):
        FederatedConfig(ship_backbone="yes")  # type: ignore[arg-type]
    run_config = _config().to_run_config()
    assert run_config["frozen-weights"] == "int8" and run_config["ship-backbone"] is True
    assert FederatedConfig.from_run_config(run_config) == _config()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_the_simulation_engine_ships_the_int8_backbone_once(tmp_path: Path) -> None:
    from federated.simulation import simulate

    config = _config(local_epochs=1)
    result = simulate(config, state_dir=tmp_path)
    per_device = record_bytes(backbone_record(build_model(config)))
    first, second = result.rounds
    assert sorted(first.backbone_sent) == sorted(first.asked) and len(first.asked) == 3
    assert first.backbone_bytes == 3 * per_device and second.backbone_sent == ()
    assert first.accepted == second.accepted == 3
    assert result.to_dict()["backbone_bytes_total"] == 3 * per_device
    assert len(list(tmp_path.glob(f"partition-*/{BACKBONE_FILE}"))) == 3
    assert result.final_accuracy is not None and result.final_accuracy > 0.3
