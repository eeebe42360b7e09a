"""Transfer learning on the shipped digits: pretrain on source classes, adapt to target classes per scheme.

This is the experiment behind ``ondevice transfer`` and the README's transfer table: a backbone pretrained on
digits 0-4 is adapted to digits 5-9 under each update scheme, with the same data, optimizer and epochs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from memory.measure import measure
from ondevice.data import load_digits, transfer_split
from ondevice.errors import ConfigError
from ondevice.optim import OptimizerConfig, resolve_optimizer
from ondevice.prepared import prepare
from ondevice.pretrain import pretrain_with_report
from ondevice.schemes import Scheme, resolve_scheme
from ondevice.trainer import Trainer, evaluate

__all__ = ["DEFAULT_TRANSFER_SCHEMES", "SchemeOutcome", "TransferResult", "run_transfer"]

logger = logging.getLogger(__name__)

DEFAULT_TRANSFER_SCHEMES: tuple[str, ...] = ("full", "last_layer", "bias", "lite_residual", "sparse", "lora")


@dataclass(frozen=True)
class SchemeOutcome:
    """The result of adapting the backbone under one scheme."""

    scheme: str
    accuracy: float
    trainable_params: int
    total_params: int
    train_seconds: float
    skipped: str | None = None
    #: What one training step on a batch of ``batch_size`` keeps for backward (``memory.measure``).
    activation_bytes: int | None = None
    #: Bytes of the frozen parameters as the step holds them (int8 ones at 1 byte, ``memory.measure``).
    frozen_bytes: int | None = None


@dataclass(frozen=True)
class TransferResult:
    """All outcomes of one transfer experiment, plus the setting that produced them."""

    model: str
    model_kwargs: dict[str, Any]
    source_classes: tuple[int, ...]
    target_classes: tuple[int, ...]
    source_accuracy: float
    epochs: int
    optimizer: dict[str, Any]
    outcomes: tuple[SchemeOutcome, ...] = field(default_factory=tuple)
    #: ``"int8"`` when what smooth activations keep was compressed (``prepare(compress=...)``).
    compress: str | None = None
    #: ``"int8"`` when frozen Conv/Linear weights were held in int8 (``prepare(frozen_weights=...)``).
    frozen_weights: str = "float"

    def outcome(self, scheme: str) -> SchemeOutcome:
        for item in self.outcomes:
            if item.scheme == scheme:
                return item
        raise ConfigError(f"no outcome for scheme {scheme!r}; ran {[o.scheme for o in self.outcomes]}")

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["source_classes"] = list(self.source_classes)
        payload["target_classes"] = list(self.target_classes)
        payload["outcomes"] = [asdict(o) for o in self.outcomes]
        return payload

    def to_markdown(self) -> str:
        lines = [
            "| scheme | target accuracy | trainable params | share of model | train time (s) |",
            "|---|---|---|---|---|",
        ]
        for o in self.outcomes:
            if o.skipped:
                lines.append(f"| {o.scheme} | n/a ({o.skipped}) | | | |")
                continue
            share = o.trainable_params / max(1, o.total_params)
            lines.append(
                f"| {o.scheme} | {o.accuracy:.4f} | {o.trainable_params:,} | {share:.2%} "
                f"| {o.train_seconds:.1f} |"
            )
        return "\n".join(lines)


def _resolve_schemes(schemes: Sequence[Scheme | str]) -> list[Scheme]:
    """Every scheme resolved, or a :class:`ConfigError` / ``UnknownSchemeError`` before any training."""
    if isinstance(schemes, str | Scheme):
        schemes = [schemes]
    resolved = [resolve_scheme(spec) for spec in schemes]
    if not resolved:
        raise ConfigError(
            "run_transfer needs at least one scheme, got none; pass e.g. schemes=('full', 'lite_residual')"
        )
    return resolved


def run_transfer(
    model: str = "cnn",
    *,
    schemes: Sequence[Scheme | str] = DEFAULT_TRANSFER_SCHEMES,
    source_classes: Sequence[int] = (0, 1, 2, 3, 4),
    target_classes: Sequence[int] = (5, 6, 7, 8, 9),
    epochs: int = 15,
    batch_size: int = 16,
    optimizer: OptimizerConfig | str | Mapping[str, Any] = "adam",
    lr: float | None = None,
    seed: int = 0,
    progress: bool = False,
    on_outcome: Callable[[SchemeOutcome], None] | None = None,
    compress: str | None = None,
    frozen_weights: str = "float",
    **model_kwargs: Any,
) -> TransferResult:
    """Pretrain ``model`` on ``source_classes`` (cached), then adapt it to ``target_classes`` per scheme.

    Every scheme gets a fresh copy of the pretrained backbone with a new head for the target classes,
    the same training data, optimizer, epochs and seed. Schemes that do not apply to the model (LoRA on
    a network without Linear layers but the head) are reported as skipped. ``compress="int8"`` keeps what
    smooth activations save for backward in 8 bits (lossy; see ``prepare``), so that its
    accuracy cost can be measured against the same run without it; ``frozen_weights="int8"`` holds the
    frozen weights in int8 (see ``prepare``) for the same comparison. Every outcome reports the bytes one
    training step keeps for backward and the bytes of its frozen parameters.
    """
    config = resolve_optimizer(optimizer, lr=lr)
    resolved = _resolve_schemes(schemes)  # before any work: a typo must not cost a pretraining run
    pre = pretrain_with_report(
        model, classes=tuple(source_classes), seed=seed, progress=progress, **model_kwargs
    )
    backbone = pre.model
    shape = backbone.input_shape
    if len(shape) == 3:
        data = load_digits(image_size=(shape[1], shape[2]), channels=shape[0])
    else:
        data = load_digits(layout="sequence", length=shape[-1])
    split = transfer_split(
        data, source_classes=tuple(source_classes), target_classes=tuple(target_classes), seed=seed
    )
    outcomes: list[SchemeOutcome] = []
    for scheme in resolved:
        net = copy.deepcopy(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net.replace_head(len(target_classes))
            try:
                prepared = prepare(net, scheme, copy_model=False, compress=compress,  # type: ignore[arg-type]
                                   frozen_weights=frozen_weights)  # type: ignore[arg-type]  # fmt: skip
            except ConfigError as exc:
                outcome = SchemeOutcome(scheme.name, float("nan"), 0, 0, 0.0, skipped=str(exc).split(";")[0])
                outcomes.append(outcome)
                if on_outcome:
                    on_outcome(outcome)
                continue
            trainer = Trainer(prepared, optimizer=config, batch_size=batch_size, progress=progress)
            fit = trainer.fit(split.target_train, epochs=epochs, seed=seed)
        accuracy = evaluate(prepared, split.target_test).accuracy
        # Memory of one training step, measured after the accuracy (the step moves the weights).
        batch = split.target_train.x[:batch_size].to(prepared.dtype)
        prepared.train()
        step = measure(prepared, batch, target=split.target_train.y[:batch_size])
        prepared.eval()
        report = prepared.report
        outcome = SchemeOutcome(
            scheme=scheme.name,
            accuracy=accuracy,
            trainable_params=report.trainable_params,
            total_params=report.total_params,
            train_seconds=fit.seconds,
            activation_bytes=step.activation_bytes,
            frozen_bytes=step.frozen_param_bytes,
        )
        logger.info("transfer %s/%s: accuracy %.4f in %.1f s", model, scheme.name, accuracy, fit.seconds)
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    return TransferResult(
        model=model,
        model_kwargs=dict(model_kwargs),
        source_classes=tuple(source_classes),
        target_classes=tuple(target_classes),
        source_accuracy=pre.source_accuracy,
        epochs=epochs,
        optimizer=config.to_dict(),
        outcomes=tuple(outcomes),
        compress=compress,
        frozen_weights=frozen_weights,
    )
