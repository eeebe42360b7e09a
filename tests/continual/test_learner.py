"""The learner: observe/predict, head growth, regularisers, drift hooks, save and restore."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ondevice
from ondevice.continual import (
    ADWIN,
    BoostLR,
    Learner,
    LearnerConfig,
    LwF,
    OnlineEWC,
    PageHinkley,
    ReservoirBuffer,
    SnapshotOnDrift,
    create_learner,
)
from ondevice.continual.state import read_learner_state, tensor_digest
from ondevice.data import Stream, TensorData
from ondevice.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    InputShapeError,
    NonFiniteBatchError,
    UnknownNameError,
)


def _two_class(digits: TensorData, a: int, b: int, n: int = 40) -> TensorData:
    part = digits.subset((digits.y == a) | (digits.y == b))
    return part.subset(slice(0, n))


def test_observe_single_samples_and_batches_and_predict_any_time(prepared_last_layer, digits) -> None:
    learner = create_learner(prepared_last_layer, "replay", buffer_size=20, optimizer="adam", lr=0.01)
    x, y = digits.x[:3], digits.y[:3]
    assert learner.predict(x[0]).shape == (1,)
    result = learner.observe(x[0], int(y[0]))  # one sample, no batch dim, a python int label
    assert result.samples == 1 and result.loss is not None
    result = learner.observe(x[1:], y[1:])
    assert result.samples == 2 and learner.samples_seen == 3
    assert y.tolist() == [0, 1, 2] and result.grown_to == 3 and learner.num_classes == 3
    assert learner.predict(x).shape == (3,)
    assert len(learner.buffer) == 3  # type: ignore[arg-type]


def test_growing_the_head_keeps_old_outputs_and_optimizer_state(prepared_last_layer, digits) -> None:
    learner = create_learner(prepared_last_layer, "naive", optimizer="adam", lr=0.01)
    data = _two_class(digits, 0, 1)
    for x, y in Stream(data, batch_size=8):
        learner.observe(x, y)
    before = learner.logits(digits.x[:16])
    old_state = {
        k: v.clone() for k, v in learner.optimizer.state[learner._params["classifier.weight"]].items()
    }
    assert learner.grow_head(5)
    assert learner.model.head == "classifier" and learner.num_classes == 5
    after = learner.logits(digits.x[:16])
    torch.testing.assert_close(after[:, :2], before, rtol=1e-5, atol=1e-6)  # same rows, wider matmul
    weight = learner._params["classifier.weight"]
    assert weight.requires_grad and weight.shape == (5, 32)
    new_state = learner.optimizer.state[weight]
    torch.testing.assert_close(new_state["exp_avg"][:2], old_state["exp_avg"])
    assert torch.count_nonzero(new_state["exp_avg"][2:]) == 0
    assert torch.equal(new_state["step"], old_state["step"])
    assert set(learner.optimizer.param_groups[0]["params"]) == set(learner._params.values())
    learner.observe(digits.x[:4], torch.tensor([4, 4, 3, 2]))  # trains the grown head
    assert not learner.grow_head(3)


def test_head_growth_is_refused_when_disabled_or_beyond_max(prepared_last_layer, digits) -> None:
    learner = Learner(prepared_last_layer, config=LearnerConfig(grow_head=False))
    with pytest.raises(InputShapeError, match="grow_head"):
        learner.observe(digits.x[:2], torch.tensor([0, 5]))
    capped = Learner(
        ondevice.prepare(prepared_last_layer.model, "last_layer"), config=LearnerConfig(max_classes=4)
    )
    with pytest.raises(InputShapeError, match="max_classes"):
        capped.observe(digits.x[:2], torch.tensor([0, 5]))


def test_nonfinite_batches_are_skipped_or_raise(prepared_last_layer, digits) -> None:
    learner = create_learner(prepared_last_layer, "naive")
    x = digits.x[:4].clone()
    x[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in prepared_last_layer.trainable_tensors().items()}
    result = learner.observe(x, digits.y[:4])
    assert result.skipped and result.reason == "nonfinite_input"
    assert learner.state.skipped_batches == 1 and learner.samples_seen == 4
    for name, value in prepared_last_layer.trainable_tensors().items():
        assert torch.equal(value, before[name])
    strict = Learner(prepared_last_layer, config=LearnerConfig(on_nonfinite="raise"))
    with pytest.raises(NonFiniteBatchError, match="nonfinite input"):
        strict.observe(x, digits.y[:4])
    with pytest.raises(InputShapeError, match=">= 0"):
        learner.observe(digits.x[:2], torch.tensor([0, -1]))
    with pytest.raises(ondevice.InputDtypeError, match="integers"):
        learner.observe(digits.x[:2], torch.tensor([0.0, 1.0]))


def test_latent_replay_stores_8_bit_latents_and_trains_only_the_tail(prepared_last_layer, digits) -> None:
    learner = create_learner(prepared_last_layer, "latent-replay", buffer_size=50, optimizer="adam", lr=0.01)
    assert learner.split is not None and learner.split.boundary == 5
    for x, y in Stream(_two_class(digits, 0, 1), batch_size=8):
        learner.observe(x, y)
    buffer = learner.buffer
    assert buffer is not None and buffer.sample_shape == (32,)
    assert buffer.bytes_per_sample() == 32 + 8 + 2
    raw = create_learner(ondevice.prepare(prepared_last_layer.model, "last_layer"), "replay", buffer_size=50)
    raw.observe(digits.x[:2], digits.y[:2])
    assert raw.buffer.bytes_per_sample() == 64 * 4 + 2  # type: ignore[union-attr]


def test_lwf_distils_only_after_a_boundary(prepared_last_layer, digits) -> None:
    reg = LwF(temperature=2.0)
    learner = Learner(prepared_last_layer, regularizer=reg, optimizer="adam", lr=0.05)
    model = prepared_last_layer.model
    x = digits.x[:8]
    assert reg.loss(model, x, model(x)) is None
    for xb, yb in Stream(_two_class(digits, 0, 1), batch_size=8):
        learner.observe(xb, yb)
    learner.end_experience()
    assert float(reg.loss(model, x, model(x)).detach()) == pytest.approx(0.0, abs=1e-6)
    learner.grow_head(4)
    for xb, yb in Stream(_two_class(digits, 2, 3), batch_size=8):
        learner.observe(xb, yb)
    assert float(reg.loss(model, x, model(x)).detach()) > 0
    assert reg.teacher["classifier.weight"].shape == (2, 32)


def test_online_ewc_penalty_and_fisher(prepared_last_layer, digits) -> None:
    reg = OnlineEWC(lambda_=10.0, gamma=0.5)
    learner = Learner(prepared_last_layer, regularizer=reg, optimizer="sgd", lr=0.1)
    for xb, yb in Stream(_two_class(digits, 0, 1), batch_size=8):
        learner.observe(xb, yb)
    learner.end_experience()
    assert set(reg.fisher) == set(prepared_last_layer.trainable_parameters())
    assert all(bool((f >= 0).all()) for f in reg.fisher.values())
    first = {k: v.clone() for k, v in reg.fisher.items()}
    model = prepared_last_layer.model
    x = digits.x[:4]
    assert float(reg.loss(model, x, model(x)).detach()) == 0.0
    with torch.no_grad():
        model.classifier.bias.add_(0.5)
    penalty = reg.loss(model, x, model(x))
    expected = 0.5 * 10.0 * float((reg.fisher["classifier.bias"] * 0.25).sum())
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    # The penalty's gradient is lambda * F * (theta - theta*), which after_backward subtracts.
    penalty.backward()
    torch.testing.assert_close(model.classifier.bias.grad, 10.0 * reg.fisher["classifier.bias"] * 0.5)
    model.classifier.bias.grad = None
    learner.grow_head(3)
    assert reg.fisher["classifier.weight"].shape == (3, 32)
    learner.end_experience()
    # online: F <- gamma * F + F_current (no step since the last boundary: F_current = 0)
    torch.testing.assert_close(reg.fisher["classifier.bias"][:2], 0.5 * first["classifier.bias"])


def test_drift_hooks_boost_the_learning_rate_and_snapshot(
    prepared_last_layer, digits, tmp_path: Path
) -> None:
    learner = create_learner(
        prepared_last_layer,
        "naive",
        optimizer="sgd",
        lr=0.01,
        drift=PageHinkley(delta=0.0, threshold=0.5, min_instances=3),
        on_drift=(BoostLR(factor=4.0, batches=2), SnapshotOnDrift(str(tmp_path))),
    )
    for x, y in Stream(_two_class(digits, 0, 1, 80), batch_size=4):
        learner.observe(x, y)
    drifted = False
    for x, y in Stream(_two_class(digits, 2, 3, 24), batch_size=4):  # new classes: the loss jumps
        result = learner.observe(x, y)
        if result.drift:
            drifted = True
            assert learner.lr == pytest.approx(0.04)
            break
    assert drifted and learner.state.drifts >= 1
    snapshots = list(tmp_path.glob("drift-*.safetensors"))
    assert len(snapshots) == 1
    assert read_learner_state(snapshots[0])[1]["extra"]["drift"]["detector"] == "page_hinkley"
    learner.drift = None
    for x, y in Stream(_two_class(digits, 2, 3, 8), batch_size=4):
        learner.observe(x, y)
    assert learner.lr == pytest.approx(0.01)


STRATEGY_CASES = [
    ("replay", {"optimizer": "adam", "lr": 0.01}),
    ("latent-replay", {"optimizer": "adam", "lr": 0.01}),
    ("der", {"optimizer": "adam", "lr": 0.01}),
    ("latent-der", {"optimizer": "adam", "lr": 0.01}),
    ("lwf", {"optimizer": "sgd", "lr": 0.05}),
    ("ewc", {"optimizer": "sgd", "lr": 0.05, "drift": ADWIN(clock=4)}),
]


@pytest.mark.parametrize(("strategy", "kwargs"), STRATEGY_CASES)
def test_save_restore_continues_exactly(
    strategy: str, kwargs: dict, tiny_cnn: Callable, digits, tmp_path: Path
) -> None:
    config = LearnerConfig(replay_steps=2, replay_batch_size=8)

    def fresh() -> Learner:
        return create_learner(
            ondevice.prepare(tiny_cnn(), "last_layer"), strategy, buffer_size=30, config=config, **kwargs
        )

    first, second = _two_class(digits, 0, 1, 32), _two_class(digits, 2, 3, 24)
    learner = fresh()
    for x, y in Stream(first, batch_size=8):
        learner.observe(x, y)
    learner.end_experience()
    learner.observe(second.x[:8], second.y[:8])  # grows the head to 4 rows
    learner.record_accuracies([0.5, 0.25])
    path = learner.save(tmp_path / "state.safetensors", extra={"note": "here"})

    restored = Learner.restore(path, ondevice.prepare(tiny_cnn(), "last_layer"))
    assert restored.num_classes == 4 and restored.samples_seen == 40
    assert restored.state.accuracy_matrix == [[0.5, 0.25]]
    assert restored.load(path) == {"note": "here"}
    for a in (learner, restored):
        a.learn(Stream(second, batch_size=8), skip=8)
    assert restored.samples_seen == learner.samples_seen == 56
    for name, value in learner.model.trainable_tensors().items():
        torch.testing.assert_close(restored.model.trainable_tensors()[name], value, rtol=0, atol=0)
    assert tensor_digest(restored.buffer.state_tensors() if restored.buffer else {}) == tensor_digest(
        learner.buffer.state_tensors() if learner.buffer else {}
    )


def test_restore_validates_model_scheme_setup_and_integrity(
    tiny_cnn: Callable, digits, tmp_path: Path
) -> None:
    learner = create_learner(ondevice.prepare(tiny_cnn(), "last_layer"), "replay", buffer_size=10)
    learner.observe(digits.x[:8], digits.y[:8] % 2)
    path = learner.save(tmp_path / "state.safetensors")
    with pytest.raises(CheckpointMismatchError, match="scheme"):
        Learner.restore(path, ondevice.prepare(tiny_cnn(), "bias"))
    other = ondevice.create_model("cnn", num_classes=2, channels=(8, 16, 64))
    with pytest.raises(CheckpointMismatchError, match="another model"):
        Learner.restore(path, ondevice.prepare(other, "last_layer"))
    naive = create_learner(ondevice.prepare(tiny_cnn(), "last_layer"), "naive")
    with pytest.raises(CheckpointMismatchError, match="buffer"):
        naive.load(path)
    with pytest.raises(CheckpointMismatchError, match="settings"):
        Learner(ondevice.prepare(tiny_cnn(), "last_layer"), config=LearnerConfig(replay_steps=3)).load(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a bit inside a tensor
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        Learner.restore(corrupt, ondevice.prepare(tiny_cnn(), "last_layer"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        Learner.restore(truncated, ondevice.prepare(tiny_cnn(), "last_layer"))
    delta = tmp_path / "delta.safetensors"
    learner.model.save_delta(delta)
    with pytest.raises(CheckpointError, match="is a delta checkpoint, expected learner"):
        Learner.restore(delta, ondevice.prepare(tiny_cnn(), "last_layer"))


def test_learn_consumes_any_iterable_and_skips(prepared_last_layer, digits) -> None:
    learner = create_learner(prepared_last_layer, "naive")

    def sensor():  # a generator of single samples, like a serial line
        for i in range(10):
            yield digits.x[i], int(digits.y[i])

    assert learner.learn(sensor(), skip=3) == 7
    assert learner.samples_seen == 7
    with pytest.raises(ConfigError, match="pair"):
        learner.learn([digits.x[0]])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: create_learner(p, "gdumb"), UnknownNameError, "strategy"),
        (lambda p: Learner(p, config=LearnerConfig(replay="latent")), ConfigError, "buffer"),
        (lambda p: LearnerConfig(replay_steps=0), ConfigError, "replay_steps"),
        (lambda p: Learner(torch.nn.Linear(2, 2)), ConfigError, "prepare"),
        (lambda p: BoostLR(factor=0), ConfigError, "factor"),
        (lambda p: LearnerConfig(recipe="twice"), UnknownNameError, "recipe"),
        (lambda p: LearnerConfig(der_alpha=-1.0), ConfigError, "der_alpha"),
        (lambda p: create_learner(p, "naive", num_classes=1), ConfigError, "num_classes"),
    ],
)
def test_bad_settings(prepared_last_layer, call: Callable, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(prepared_last_layer)


def test_buffer_bytes_are_reported(prepared_last_layer, digits) -> None:
    learner = Learner(prepared_last_layer, buffer=ReservoirBuffer(capacity_bytes=5_000))
    assert learner.buffer_bytes == 0
    learner.observe(digits.x[:4], digits.y[:4] % 2)
    assert 0 < learner.buffer_bytes <= 5_000


def _train_twice(tiny_cnn: Callable, digits, strategy: str, **config) -> tuple[Learner, list]:
    learner = create_learner(
        ondevice.prepare(tiny_cnn(), "full"),
        strategy,
        buffer_size=16,
        optimizer="adam",
        lr=0.01,
        config=LearnerConfig(replay_batch_size=8, **config),
    )
    steps = []
    for x, y in Stream(_two_class(digits, 0, 1, 32), batch_size=8):
        before = learner.state.optimizer_steps
        learner.observe(x, y)
        steps.append(learner.state.optimizer_steps - before)
    return learner, steps


def test_recipes_agree_at_one_step_and_differ_beyond(tiny_cnn: Callable, digits) -> None:
    er, er_steps = _train_twice(tiny_cnn, digits, "replay", replay_steps=1, recipe="er")
    once, _ = _train_twice(tiny_cnn, digits, "replay", replay_steps=1, recipe="once")
    for name, value in er.model.trainable_tensors().items():
        torch.testing.assert_close(once.model.trainable_tensors()[name], value, rtol=0, atol=0)
    assert er_steps == [1, 1, 1, 1]
    er3, er3_steps = _train_twice(tiny_cnn, digits, "replay", replay_steps=3, recipe="er")
    once3, once3_steps = _train_twice(tiny_cnn, digits, "replay", replay_steps=3, recipe="once")
    # both take every step ("once" replays the batch it just stored), but train on different samples
    assert er3_steps == once3_steps == [3, 3, 3, 3]
    weight = "classifier.weight"
    assert not torch.equal(er3.model.trainable_tensors()[weight], once3.model.trainable_tensors()[weight])
    assert len(er3.buffer) == len(once3.buffer) == 16  # type: ignore[arg-type]


def test_der_keeps_logits_and_matches_them(tiny_cnn: Callable, digits) -> None:
    learner, _ = _train_twice(tiny_cnn, digits, "der", replay_steps=2)
    buffer = learner.buffer
    assert buffer is not None and buffer.config.logits
    draw = buffer.draw(8)
    assert draw.logits is not None and draw.logit_mask is not None
    assert draw.logits.shape == (8, 2) and bool(draw.logit_mask.all())
    # grow the head: old samples keep 2 real columns, new ones carry 4
    learner.observe(_two_class(digits, 2, 3, 8).x, _two_class(digits, 2, 3, 8).y)
    assert buffer.logit_width == 4
    widths = {int(row.sum()) for row in buffer.draw(16).logit_mask}  # type: ignore[union-attr]
    assert widths <= {2, 4} and 4 in widths
    per_sample = 64 * 4 + 2 + 4 * 4 + 2  # float32 digit, label, 4 logits, their width
    assert buffer.bytes_per_sample() == per_sample and buffer.buffer_bytes == 16 * per_sample


def test_a_known_number_of_classes_fixes_the_head(prepared_last_layer, digits) -> None:
    learner = create_learner(prepared_last_layer, "replay", num_classes=10, buffer_size=20)
    assert learner.num_classes == 10
    learner.observe(digits.x[:10], digits.y[:10])
    assert learner.num_classes == 10


def test_a_version_1_checkpoint_still_loads(tiny_cnn: Callable, digits, tmp_path: Path) -> None:
    from ondevice.checkpoint import KIND_LEARNER, write_tensors

    for steps, recipe in ((1, "er"), (3, "once")):
        learner = create_learner(
            ondevice.prepare(tiny_cnn(), "last_layer"),
            "replay",
            buffer_size=10,
            config=LearnerConfig(replay_steps=steps, recipe=recipe),  # type: ignore[arg-type]
        )
        learner.observe(digits.x[:8], digits.y[:8] % 2)
        tensors, metadata = read_learner_state(learner.save(tmp_path / "v2.safetensors"))
        metadata["format"] = "ondevice.learner/1"
        for key in ("recipe", "der_alpha", "der_beta"):
            del metadata["config"][key]
        del metadata["buffer"]["config"]["logits"]
        del metadata["buffer"]["logit_width"]
        old = write_tensors(tmp_path / "v1.safetensors", tensors, metadata, kind=KIND_LEARNER)
        restored = Learner.restore(old, ondevice.prepare(tiny_cnn(), "last_layer"))
        assert restored.config == learner.config and restored.samples_seen == 8
        if steps == 1:  # the recipes agree at one step, so default learners load v1 files
            fresh = create_learner(
                ondevice.prepare(tiny_cnn(), "last_layer"), "replay", buffer_size=10, config=LearnerConfig()
            )
            fresh.load(old)
            assert fresh.samples_seen == 8
