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
from ondevice.ops.registry import COMPRESS_MODES, CompressMode
from ondevice.optim import OptimizerConfig, resolve_optimizer
from ondevice.prepared import find_head, prepare
from ondevice.pretrain import pretrain_with_report
from ondevice.recompute import RecomputeChoice, check_recompute_choice, resolve_recompute
from ondevice.schemes import Scheme, resolve_scheme
from ondevice.trainer import Trainer, evaluate

__all__ = ["COMPRESS_MODES", "DEFAULT_TRANSFER_SCHEMES", "CompressMode", "SchemeOutcome", "TransferResult",
           "run_transfer"]  # fmt: skip

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
    #: The compression that applied (``None`` where the model has no smooth activation to compress).
    compress: str | None = None
    #: The blocks that were recomputed in backward (empty where none were asked for or found).
    recomputed_blocks: tuple[str, ...] = ()


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
    #: ``"int8"`` or ``"2bit"``: the asked-for compression of what smooth activations keep (``prepare``).
    compress: str | None = None
    #: ``"int8"`` when frozen Conv/Linear weights were held in int8 (``prepare(frozen_weights=...)``).
    frozen_weights: str = "float"
    #: What ``recompute=`` asked for: ``True``/``False`` or block names (``prepare(recompute=...)``).
    recompute: bool | tuple[str, ...] = False

    def outcome(self, scheme: str) -> SchemeOutcome:
        for item in self.outcomes:
            if item.scheme == scheme:
                return item
        raise ConfigError(f"no outcome for scheme {scheme!r}; ran {[o.scheme for o in self.outcomes]}")

    def mode_notes(self) -> tuple[str, ...]:
        """A line for each asked-for mode that changed nothing for a scheme that ran (prepare warned so)."""
        notes = []
        ran = [o for o in self.outcomes if not o.skipped]
        uncompressed = [o.scheme for o in ran if o.compress is None]
        if self.compress and uncompressed:
            notes.append(
                f"compress={self.compress!r} changed nothing in {self.model} under "
                f"{', '.join(uncompressed)}: it has no GELU/SiLU/Hardswish/Sigmoid/Tanh activations "
                f"to compress (ReLU-family masks are exact already), so these figures are exact training's"
            )
        plain = [o.scheme for o in ran if not o.recomputed_blocks]
        if self.recompute and plain:
            notes.append(
                f"recompute={self.recompute!r} changed nothing in {self.model} under {', '.join(plain)}: no "
                f"blocks to recompute were found, so these figures are those of training without it"
            )
        return tuple(notes)

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["source_classes"] = list(self.source_classes)
        payload["target_classes"] = list(self.target_classes)
        payload["outcomes"] = [
            asdict(o) | {"recomputed_blocks": list(o.recomputed_blocks)} for o in self.outcomes
        ]
        if isinstance(self.recompute, tuple):
            payload["recompute"] = list(self.recompute)
        payload["mode_notes"] = list(self.mode_notes())
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


def _check_modes(compress: object, recompute: object) -> bool | tuple[str, ...]:
    """``compress`` and the type of ``recompute`` checked before any work; ``recompute`` as stored."""
    if compress is not None and compress not in COMPRESS_MODES:
        raise ConfigError(
            f"compress must be None, {' or '.join(map(repr, COMPRESS_MODES))}, got {compress!r}; e.g. "
            f"compress='2bit' for GELU/SiLU networks"
        )
    return check_recompute_choice(recompute)


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
    compress: CompressMode | None = None,
    frozen_weights: str = "float",
    recompute: RecomputeChoice = False,
    **model_kwargs: Any,
) -> TransferResult:
    """Pretrain ``model`` on ``source_classes`` (cached), then adapt it to ``target_classes`` per scheme.

    Every scheme gets a fresh copy of the pretrained backbone with a new head for the target classes,
    the same training data, optimizer, epochs and seed. Schemes that do not apply to the model (LoRA on
    a network without Linear layers but the head) are reported as skipped. ``compress="int8"`` keeps what
    smooth activations save for backward in 8 bits, ``compress="2bit"`` keeps 2 bits per element that pick
    one of four derivative levels (both lossy; see ``prepare``), so that their accuracy cost can be measured
    against the same run without them; ``recompute=True`` (or block names) keeps only each block's inputs
    and recomputes the block in backward (exact); ``frozen_weights="int8"`` holds the frozen weights in
    int8 (see ``prepare``) for the same comparison. A mode that cannot apply to the model changes nothing,
    as in ``prepare`` (which warns): each outcome says what applied (``compress``, ``recomputed_blocks``)
    and :meth:`TransferResult.mode_notes` lists what did not; a combination ``prepare`` refuses for a
    scheme (a block that cannot be recomputed) makes that scheme's outcome skipped, with the reason. Every
    outcome reports the bytes one training step keeps for backward and the bytes of its frozen parameters.

    Raises:
        ConfigError: a bad scheme, optimizer, ``compress`` or ``recompute`` (unknown block names are found
            after pretraining, before any adaptation).
    """
    config = resolve_optimizer(optimizer, lr=lr)
    resolved = _resolve_schemes(schemes)  # before any work: a typo must not cost a pretraining run
    recompute = _check_modes(compress, recompute)
    pre = pretrain_with_report(
        model, classes=tuple(source_classes), seed=seed, progress=progress, **model_kwargs
    )
    backbone = pre.model
    if not isinstance(recompute, bool):
        resolve_recompute(backbone, recompute, find_head(backbone))  # unknown block names: before training
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
                prepared = prepare(net, scheme, copy_model=False, compress=compress, recompute=recompute,
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
            compress=prepared.compress,
            recomputed_blocks=tuple(report.recompute),
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
        recompute=recompute,
    )
