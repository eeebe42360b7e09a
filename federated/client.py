"""The device side of a federation: its prepared model, its continual learner, and its state on disk.

:class:`DeviceLearner` trains the prepared model on the device's own stream each round with a continual
learner (:func:`ondevice.continual.create_learner`, strategy ``FederatedConfig.strategy``: naive
fine-tuning, replay, latent replay, LwF or online EWC; FedProx adds its proximal term as the learner's
regulariser) and returns the update of the *shared* tensors (the trainable ones, minus the head in
personalised mode). Its state is written atomically after every round and read back when the learner is
rebuilt, so it survives a SuperNode restart (Flower's ``Context.state`` does not):

- ``<state_dir>/device.safetensors``: the learner's checkpoint (:meth:`ondevice.continual.Learner.save`:
  trainable tensors with the personal head, optimizer state, replay buffer, regulariser, metrics), with
  the federation's configuration and the round counters in its ``extra``;
- ``<state_dir>/residuals.safetensors``: the top-k error-feedback residuals (only with top-k uplink),
  tagged with the round count so that a crash between the two writes drops them rather than mixing rounds;
- ``<state_dir>/backbone.safetensors``: the frozen backbone the server shipped (only with
  ``ship_backbone``, :mod:`federated.backbone`), loaded instead of pretraining.

:func:`backbone_digest` (:func:`ondevice.backbone.backbone_digest`) names the frozen backbone as held:
server and devices must hold the same one.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from federated.aggregation import proximal_term
from federated.backbone import BACKBONE_FILE, read_backbone_record
from federated.config import FederatedConfig
from federated.errors import FederatedError, PayloadError
from federated.partition import ClientData, FederatedSplit, client_data, federated_split
from federated.records import TensorSpec, to_numpy
from ondevice.backbone import (
    backbone_digest,
    backbone_tensors,
    load_backbone,
    load_backbone_tensors,
    save_backbone,
)
from ondevice.checkpoint import KIND_FEDERATED_DEVICE_STATE, read_tensors, write_tensors
from ondevice.continual import Learner, LearnerConfig, create_learner
from ondevice.continual.regularizers import Regularizer
from ondevice.continual.state import load_learner, read_learner_state, save_learner
from ondevice.data import as_stream, load_digits
from ondevice.errors import CheckpointError, CheckpointMismatchError
from ondevice.models import create_model
from ondevice.prepared import PreparedModel, prepare
from ondevice.pretrain import pretrain
from ondevice.trainer import EvalResult, evaluate

__all__ = [
    "DeviceLearner",
    "DeviceUpdate",
    "ProximalRegularizer",
    "backbone_digest",
    "build_model",
    "load_split",
    "shared_names",
    "tensor_spec",
]

logger = logging.getLogger(__name__)

STATE_FILE = "device.safetensors"
RESIDUALS_FILE = "residuals.safetensors"
_RESIDUALS_FORMAT = "ondevice.federated.residuals/1"
TENSOR_FIELDS = ("model", "scheme", "frozen_weights", "pretrain_classes", "classes")
"""The :class:`FederatedConfig` fields that decide what a device trains: the architecture, the update
scheme (which tensors train, and their shapes), how frozen weights are held and the head's classes. With
the backbone's digest they key a device's saved state: a state saved under other values cannot be used.
Any other field (``rounds``, ``lr``, ``local_epochs``, compression, timeouts, ...) may change between runs
and the device keeps its state; a changed learner set-up (``strategy``, ``optimizer``, ``buffer_size``,
``batch_size``, ``aggregation``, ``seed``) keeps the trained tensors and round counters and starts the
learner's own state (optimizer moments, replay buffer, regulariser) afresh."""


def build_model(config: FederatedConfig, *, pretrained: bool = True) -> PreparedModel:
    """The pretrained backbone (cached), a new seeded head for ``config.classes``, prepared for the scheme
    with ``config.frozen_weights``.

    ``pretrained=False`` skips pretraining: the bare zoo architecture (seeded weights) is prepared the same
    way, for a shipped backbone to be loaded into (:mod:`federated.backbone`); its head is the same.
    """
    if pretrained:
        net = copy.deepcopy(pretrain(config.model, classes=config.pretrain_classes, seed=config.seed))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = create_model(config.model, num_classes=len(config.pretrain_classes))
        net.eval()  # as pretrain returns it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net.replace_head(len(config.classes))
        return prepare(net, config.scheme_obj, copy_model=False, frozen_weights=config.frozen_weights)


def shared_names(prepared: PreparedModel, *, personalised: bool) -> list[str]:
    """Sorted names of the tensors that travel: all trainable ones, minus the head's when personalised."""
    names = sorted(prepared.trainable_tensors())
    if personalised and prepared.head:
        prefix = prepared.head + "."
        names = [n for n in names if not n.startswith(prefix)]
    return names


def statistic_names(prepared: PreparedModel, *, personalised: bool) -> list[str]:
    """Sorted names of the shared running statistics (see :func:`federated.compression.codec_for`)."""
    buffers = prepared.trainable_buffers()
    return [n for n in shared_names(prepared, personalised=personalised) if n in buffers]


def tensor_spec(
    prepared: PreparedModel, *, personalised: bool
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, numpy dtype) of the shared tensors: what every reply must match."""
    tensors = prepared.trainable_tensors()
    return {
        name: (tuple(tensors[name].shape), to_numpy({name: tensors[name]})[name].dtype)
        for name in shared_names(prepared, personalised=personalised)
    }


def load_split(config: FederatedConfig, prepared: PreparedModel) -> FederatedSplit:
    """The digits laid out for the model, restricted to ``config.classes`` (labels 0..C-1), split."""
    input_shape: tuple[int, ...] = prepared.model.input_shape  # type: ignore[assignment]  # zoo models
    shape = tuple(input_shape)
    if len(shape) == 3:
        data = load_digits(image_size=(shape[1], shape[2]), channels=shape[0])
    else:
        data = load_digits(layout="sequence", length=shape[-1], channels=shape[0])
    data = data.subset(torch.isin(data.y, torch.tensor(config.classes)))
    data = data.map_labels({c: i for i, c in enumerate(config.classes)})
    return federated_split(data, seed=config.seed)


@dataclass(frozen=True, eq=False)
class DeviceUpdate:
    """What a device sends after a round: the update of the shared tensors and its figures."""

    deltas: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class ProximalConfig:
    """FedProx's proximal weight ``mu``."""

    mu: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProximalRegularizer(Regularizer):
    """FedProx's ``mu / 2 * ||w - w_t||^2`` (Li et al. 2020, Eq. 2) as a continual-learner regulariser.

    :meth:`anchor_to` sets ``w_t`` (the global tensors received this round) and the live parameters it
    applies to; it holds no state of its own between rounds.
    """

    kind: ClassVar[str] = "fedprox"

    def __init__(self, mu: float) -> None:
        self.config = ProximalConfig(float(mu))
        self._params: dict[str, nn.Parameter] = {}
        self._anchor: dict[str, Tensor] = {}

    def anchor_to(self, params: Mapping[str, nn.Parameter], anchor: Mapping[str, Tensor]) -> None:
        self._params = {k: p for k, p in params.items() if k in anchor}
        self._anchor = {k: v.detach() for k, v in anchor.items() if k in self._params}

    def loss(self, model: nn.Module, x: Tensor | None, logits: Tensor) -> Tensor | None:
        if not self._params:
            return None
        return proximal_term(self._params, self._anchor, self.config.mu)


def _changes(saved: Mapping[str, Any], current: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """``"name old -> new"`` for each of ``names`` whose value differs between two config dicts."""
    return [f"{n} {saved.get(n)!r} -> {current.get(n)!r}" for n in names if saved.get(n) != current.get(n)]


def _set_aside(path: Path) -> str:
    """Move a refused state file to ``<name>.unusable`` (kept for inspection); says what happened."""
    aside = path.with_name(path.name + ".unusable")
    try:
        os.replace(path, aside)
    except OSError as exc:
        return f"could not move it aside ({exc})"
    return f"moved it to {aside}"


class DeviceLearner:
    """One device: its prepared model, its continual learner, its data, its state directory.

    Args:
        config: the federation's settings.
        partition_id, num_partitions: which share of the digits this device holds.
        state_dir: where the state is kept (created); None keeps it in memory only.
        backbone: with ``config.ship_backbone``, the ``"backbone"`` ``ArrayRecord`` the server shipped in
            this message (None when it sent none: the device loads the one it kept).
        announced_digest: the backbone digest the server announced; a shipped backbone must match it.

    Raises:
        PayloadError: a shipped backbone that does not fit or whose digest differs (nothing is kept).
        FederatedError: ``ship_backbone`` is on and the device holds no usable backbone.
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        partition_id: int,
        num_partitions: int,
        state_dir: str | os.PathLike[str] | None,
        backbone: object = None,
        announced_digest: str | None = None,
    ) -> None:
        self.config = config
        self.partition_id = partition_id
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._kept_backbone: dict[str, Tensor] | None = None  # a shipped backbone, without a state_dir
        self.backbone_shipped = False  # this learner loaded a backbone shipped in its message
        self.prepared, digest = self._build_model(backbone, announced_digest)
        self.data: ClientData = client_data(
            load_split(config, self.prepared),
            partition_id,
            num_partitions,
            config.partition_obj,
            seed=config.seed,
        )
        self.shared = shared_names(self.prepared, personalised=config.personalised)
        self.statistics = statistic_names(self.prepared, personalised=config.personalised)
        self.spec: TensorSpec = tensor_spec(self.prepared, personalised=config.personalised)
        self.digest = digest if digest is not None else backbone_digest(self.prepared)
        self.learner: Learner = self._new_learner()
        self.residuals: dict[str, np.ndarray] = {}
        self.rounds_trained = 0
        self.last_round = 0
        self.state_error: str | None = None  # why a state file on disk was refused, if one was
        self.state_note: str | None = None  # what of a saved state could not be kept, and why
        self.restored = self._load_state()

    # -- the backbone --------------------------------------------------------------------------------
    @property
    def backbone_path(self) -> Path | None:
        """Where a shipped backbone is kept (None without a state directory)."""
        return None if self.state_dir is None else self.state_dir / BACKBONE_FILE

    def _build_model(self, shipped: object, announced: str | None) -> tuple[PreparedModel, str | None]:
        """The prepared model: pretrained here, or (``ship_backbone``) the bare architecture with the
        backbone shipped in this message (checked, then kept) or the one kept from an earlier message;
        and its backbone digest when checking it computed that already (else None)."""
        if not self.config.ship_backbone:
            return build_model(self.config), None
        prepared = build_model(self.config, pretrained=False)
        path = self.backbone_path
        if shipped is not None:
            if announced is None:
                raise PayloadError("a shipped backbone came without the digest the server announced for it")
            tensors = read_backbone_record(shipped, prepared, digest=announced)
            load_backbone_tensors(prepared, tensors, source="the shipped backbone")
            self.backbone_shipped = True
            if path is None:
                self._kept_backbone = {k: v.clone() for k, v in backbone_tensors(prepared).items()}
            else:
                save_backbone(prepared, path)
            logger.info("device %d: loaded the shipped backbone (%s)", self.partition_id, announced[:16])
            return prepared, announced  # read_backbone_record checked the tensors against it
        if path is None or not path.exists():
            raise FederatedError(
                f"device {self.partition_id}: the federation ships the backbone (ship_backbone=True), but "
                f"this message carries none and the device keeps none"
                + ("" if path is None else f" in {path.parent}")
                + "; the server sends it with its next message to a device that has not confirmed it"
            )
        try:
            load_backbone(prepared, path)
        except CheckpointError as exc:
            where = _set_aside(path)
            raise FederatedError(
                f"device {self.partition_id}: the backbone kept in {path} is unusable ({exc}); {where}. The "
                f"server sends the backbone again with its next message to this device"
            ) from None
        kept = backbone_digest(prepared)
        if announced is not None and kept != announced:
            raise FederatedError(
                f"device {self.partition_id}: the backbone kept in {path} (digest {kept[:16]}...) is not the "
                f"server's ({announced[:16]}...); the server sends its backbone again with its next message"
            )
        return prepared, kept

    def _fresh_model(self) -> PreparedModel:
        """The model as the round starts it, before any state is loaded (after a refused state file)."""
        if not self.config.ship_backbone:
            return build_model(self.config)
        prepared = build_model(self.config, pretrained=False)
        if self._kept_backbone is not None:
            load_backbone_tensors(prepared, self._kept_backbone)
        elif self.backbone_path is not None:
            load_backbone(prepared, self.backbone_path)
        return prepared

    def _new_learner(self) -> Learner:
        config = self.config
        seed = config.seed * 1_009 + self.partition_id
        learner = create_learner(
            self.prepared,
            config.strategy,
            buffer_size=config.buffer_size,
            optimizer=config.optimizer,
            lr=config.lr,
            config=LearnerConfig(replay_batch_size=config.batch_size, grow_head=False, seed=seed),
            seed=seed,
        )
        if config.aggregation == "fedprox":
            learner.regularizer = ProximalRegularizer(config.proximal_mu)
        return learner

    @property
    def samples_seen(self) -> int:
        """Samples the learner has observed, over all rounds (each local epoch counts)."""
        return self.learner.samples_seen

    # -- state on disk -----------------------------------------------------------------------------
    @property
    def state_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / STATE_FILE

    def _load_state(self) -> bool:
        """Restore the learner from the state file; False (and a fresh learner) when there is none.

        The state is kept across a change of run configuration that does not change what is trained
        (:data:`TENSOR_FIELDS` and the backbone digest); the learner then runs with the new settings
        (its learning rate is the new ``lr``). A changed learner set-up keeps the trained tensors and
        counters only. A state trained for something else is not used (the device starts afresh and
        :attr:`state_note` says why; the server logs it from the reply). A damaged, foreign or outdated
        state file is refused with a logged error, moved aside to ``<name>.unusable`` (kept for
        inspection, and so that the next save can write) and the device starts from the shared start;
        :attr:`state_error` says why.
        """
        path = self.state_path
        if path is None or not (path.exists() or path.is_symlink()):
            return False
        try:
            tensors, metadata = read_learner_state(path, kind=KIND_FEDERATED_DEVICE_STATE)
            extra = metadata.get("extra") or {}
            saved = extra.get("federation") or {}
            current = self.config.to_dict()
            changed = _changes(saved, current, TENSOR_FIELDS)
            if extra.get("backbone") not in (None, self.digest):
                changed.append(f"backbone {str(extra['backbone'])[:16]}... -> {self.digest[:16]}...")
            if changed:
                self.state_note = (
                    f"its saved state was trained with another {', '.join(changed)} and cannot be used; "
                    "it starts afresh and its next save replaces it"
                )
                logger.warning("device %d: state %s: %s", self.partition_id, path, self.state_note)
                return False
            others = _changes(saved, current, sorted(set(saved) | set(current)))
            try:
                load_learner(self.learner, path, kind=KIND_FEDERATED_DEVICE_STATE)
            except CheckpointMismatchError as exc:  # the learner's set-up changed: keep what was trained
                delta = {k.removeprefix("delta/"): v for k, v in tensors.items() if k.startswith("delta/")}
                self.prepared.load_trainable(delta)
                self.state_note = (
                    f"the learner's set-up changed ({', '.join(others) or exc}): it kept its trained tensors "
                    "and round counts; optimizer state, replay buffer and regulariser start afresh"
                )
                logger.warning("device %d: state %s: %s", self.partition_id, path, self.state_note)
            else:
                for group in self.learner.optimizer.param_groups:  # the run's lr, not the saved one
                    group["lr"] = self.config.lr
                if others:
                    logger.info(
                        "device %d: restored state %s; run configuration changed (%s), not what it trains",
                        self.partition_id,
                        path,
                        ", ".join(others),
                    )
        except (CheckpointError, ValueError) as exc:  # CheckpointMismatchError is a ValueError
            self.state_error = str(exc)
            self.state_note = None
            where = _set_aside(path)
            logger.error(
                "device %d: state file %s refused (%s); %s and starting from the shared start",
                self.partition_id,
                path,
                exc,
                where,
            )
            self.prepared = self._fresh_model()
            self.learner = self._new_learner()
            return False
        counters = extra.get("counters", {})
        self.rounds_trained = int(counters.get("rounds_trained", 0))
        self.last_round = int(counters.get("last_round", 0))
        self.residuals = self._load_residuals()
        return True

    def _load_residuals(self) -> dict[str, np.ndarray]:
        assert self.state_dir is not None
        path = self.state_dir / RESIDUALS_FILE
        if not path.exists():
            return {}
        try:
            tensors, metadata = read_tensors(path, kind=KIND_FEDERATED_DEVICE_STATE)
        except CheckpointError as exc:
            moved = _set_aside(path)
            logger.warning("top-k residuals %s unusable (%s); %s and dropping them", path, exc, moved)
            return {}
        fresh = metadata.get("rounds_trained") == self.rounds_trained
        if metadata.get("format") != _RESIDUALS_FORMAT or not fresh:
            logger.warning("top-k residuals %s are from another round than the learner; dropping them", path)
            return {}
        if metadata.get("compression", self.config.compression) != self.config.compression:
            logger.warning(
                "top-k residuals %s were left by compression %r, this run uses %r; dropping them",
                path,
                metadata.get("compression"),
                self.config.compression,
            )
            return {}
        return {k: v.numpy() for k, v in tensors.items() if k in self.spec}

    def save_state(self) -> Path | None:
        """Write the learner (delta, optimizer, buffer, metrics), counters and residuals atomically."""
        path = self.state_path
        if path is None or self.state_dir is None:
            return None
        residuals_path = self.state_dir / RESIDUALS_FILE
        if self.residuals:
            write_tensors(
                residuals_path,
                {k: torch.from_numpy(np.asarray(v)) for k, v in self.residuals.items()},
                {
                    "format": _RESIDUALS_FORMAT,
                    "rounds_trained": self.rounds_trained,
                    "compression": self.config.compression,
                },
                kind=KIND_FEDERATED_DEVICE_STATE,
            )
        elif residuals_path.exists():
            residuals_path.unlink()
        extra = {
            "federation": self.config.to_dict(),
            "backbone": self.digest,
            "partition_id": self.partition_id,
            "counters": {"rounds_trained": self.rounds_trained, "last_round": self.last_round},
        }
        return save_learner(self.learner, path, extra=extra, kind=KIND_FEDERATED_DEVICE_STATE)

    # -- rounds ------------------------------------------------------------------------------------
    def load_global(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
        """Check the global tensors against the spec and load them; returns them as tensors (the anchor)."""
        if sorted(arrays) != self.shared:
            raise PayloadError(
                f"global tensors have keys {sorted(arrays)[:3]}..., this device shares {self.shared[:3]}..."
            )
        anchor: dict[str, Tensor] = {}
        for name in self.shared:
            shape, dtype = self.spec[name]
            value = arrays[name]
            if self.config.downlink == "fp16" and value.dtype == np.float16 and dtype == np.float32:
                value = value.astype(np.float32)
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise PayloadError(
                    f"global {name!r} is {value.dtype} {value.shape}, expected {dtype} {shape}"
                )
            anchor[name] = torch.from_numpy(np.array(value))
        self.prepared.load_trainable(anchor, strict=False)  # validates finiteness too
        return anchor

    def train_round(self, arrays: Mapping[str, np.ndarray], *, server_round: int) -> DeviceUpdate:
        """Load the global tensors, learn the local stream, return the update (call :meth:`save_state`)."""
        anchor = self.load_global(arrays)
        before = evaluate(self.prepared, self.data.test)
        start = time.perf_counter()
        preq_before = (self.learner.state.correct, self.learner.state.trained_samples)
        self._learn_stream(anchor, server_round=server_round)
        seconds = time.perf_counter() - start
        after_eval = evaluate(self.prepared, self.data.test)
        current = to_numpy({k: v for k, v in self.prepared.trainable_tensors().items() if k in anchor})
        start_np = to_numpy(anchor)
        deltas = {k: (current[k] - start_np[k]).astype(start_np[k].dtype) for k in self.shared}
        self.rounds_trained += 1
        self.last_round = int(server_round)
        hits = self.learner.state.correct - preq_before[0]
        seen = self.learner.state.trained_samples - preq_before[1]
        return DeviceUpdate(
            deltas=deltas,
            num_examples=len(self.data.train),
            metrics={
                "accuracy-before": before.accuracy,
                "accuracy-after": after_eval.accuracy,
                "prequential-accuracy": hits / seen if seen else 0.0,
                "test-samples": float(after_eval.samples),
                "train-seconds": seconds,
                "rounds-trained": float(self.rounds_trained),
                "buffer-bytes": float(self.learner.buffer_bytes),
            },
        )

    def _learn_stream(self, anchor: Mapping[str, Tensor], *, server_round: int) -> int:
        """Observe the device's stream ``local_epochs`` times in shuffled batches; one experience a round.

        The optimizer's state (Adam's moments) is cleared first: as in FedAvg, every round's local
        training starts afresh from the global model (moments accumulated around last round's local model
        mislead the first steps; measured here, they cost the lite-residual scheme 1-4 points). The
        replay buffer, the regulariser and the metrics carry over.
        """
        self.learner.optimizer.state.clear()
        if isinstance(self.learner.regularizer, ProximalRegularizer):
            self.learner.regularizer.anchor_to(self.prepared.trainable_parameters(), anchor)
        stream = as_stream(
            self.data.train,
            batch_size=self.config.batch_size,
            shuffle=True,
            seed=self.config.seed * 100_003 + self.partition_id * 1_009 + int(server_round),
            epochs=self.config.local_epochs,
        )
        observed = self.learner.learn(stream)
        self.learner.end_experience()
        return observed

    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> EvalResult:
        """Accuracy of the global tensors (with the personal head if personalised) on the local test set."""
        self.load_global(arrays)
        return evaluate(self.prepared, self.data.test)
