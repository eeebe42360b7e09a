"""The device side of a federation: its prepared model, its data stream, and its state on disk.

:class:`DeviceLearner` trains the prepared model on the device's own stream each round and returns the
update of the *shared* tensors (the trainable ones, minus the head in personalised mode). Its state, the
trainable tensors (personal head included), the top-k error-feedback residuals and its counters, is
written atomically to ``<state_dir>/device.safetensors`` after every round and read back when the
learner is rebuilt, so it survives a SuperNode restart (Flower's ``Context.state`` does not).

Seam: the per-round training is :meth:`DeviceLearner._train_locally` (a :class:`ondevice.Trainer` over
the device's stream); the continual learner (``ondevice.continual``, replay buffer, drift) plugs in
there once its API lands, the exchange around it staying the same.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from federated.aggregation import proximal_term
from federated.config import FederatedConfig
from federated.errors import PayloadError
from federated.partition import ClientData, FederatedSplit, client_data, federated_split
from federated.payload import TensorSpec, to_numpy
from ondevice.checkpoint import read_tensors, write_tensors
from ondevice.errors import CheckpointError
from ondevice.prepared import PreparedModel, prepare
from ondevice.trainer import EvalResult, Trainer, evaluate

__all__ = [
    "DeviceLearner",
    "DeviceUpdate",
    "backbone_digest",
    "build_model",
    "load_split",
    "shared_names",
    "tensor_spec",
]

logger = logging.getLogger(__name__)

STATE_FILE = "device.safetensors"
_STATE_FORMAT = "ondevice.federated.device/1"
_MODEL = "model/"
_RESIDUAL = "residual/"


def build_model(config: FederatedConfig) -> PreparedModel:
    """The pretrained backbone (cached), a new seeded head for ``config.classes``, prepared for the scheme."""
    from ondevice.pretrain import pretrain

    backbone = pretrain(config.model, classes=config.pretrain_classes, seed=config.seed)
    net = copy.deepcopy(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net.replace_head(len(config.classes))
        return prepare(net, config.scheme_obj, copy_model=False)


def shared_names(prepared: PreparedModel, *, personalised: bool) -> list[str]:
    """Sorted names of the tensors that travel: all trainable ones, minus the head's when personalised."""
    names = sorted(prepared.trainable_tensors())
    if personalised and prepared.head:
        prefix = prepared.head + "."
        names = [n for n in names if not n.startswith(prefix)]
    return names


def tensor_spec(
    prepared: PreparedModel, *, personalised: bool
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, numpy dtype) of the shared tensors: what every reply must match."""
    tensors = prepared.trainable_tensors()
    return {
        name: (tuple(tensors[name].shape), to_numpy({name: tensors[name]})[name].dtype)
        for name in shared_names(prepared, personalised=personalised)
    }


def backbone_digest(prepared: PreparedModel) -> str:
    """SHA-256 (16 hex) of the frozen tensors' bytes: server and devices must share the same backbone."""
    trainable = set(prepared.trainable_tensors())
    digest = hashlib.sha256()
    for name, tensor in sorted(prepared.model.state_dict().items()):
        if name in trainable:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_split(config: FederatedConfig, prepared: PreparedModel) -> FederatedSplit:
    """The digits laid out for the model, restricted to ``config.classes`` (labels 0..C-1), split."""
    from ondevice.data import load_digits

    shape = tuple(prepared.model.input_shape)
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


class DeviceLearner:
    """One device: its prepared model, its data, its state directory.

    Args:
        config: the federation's settings.
        partition_id, num_partitions: which share of the digits this device holds.
        state_dir: where the state is kept (created); None keeps it in memory only.
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        partition_id: int,
        num_partitions: int,
        state_dir: str | os.PathLike[str] | None,
    ) -> None:
        self.config = config
        self.partition_id = partition_id
        self.prepared = build_model(config)
        self.data: ClientData = client_data(
            load_split(config, self.prepared),
            partition_id,
            num_partitions,
            config.partition_obj,
            seed=config.seed,
        )
        self.shared = shared_names(self.prepared, personalised=config.personalised)
        self.spec: TensorSpec = tensor_spec(self.prepared, personalised=config.personalised)
        self.digest = backbone_digest(self.prepared)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.residuals: dict[str, np.ndarray] = {}
        self.rounds_trained = 0
        self.samples_seen = 0
        self.last_round = 0
        self.restored = self._load_state()

    # -- state on disk -----------------------------------------------------------------------------
    @property
    def state_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / STATE_FILE

    def _load_state(self) -> bool:
        path = self.state_path
        if path is None or not path.exists():
            return False
        try:
            tensors, metadata = read_tensors(path)
            if metadata.get("format") != _STATE_FORMAT or metadata.get("config") != self.config.to_dict():
                logger.warning("device state %s belongs to another run configuration; starting afresh", path)
                return False
            model = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
            self.prepared.load_trainable(model)
        except (CheckpointError, ValueError) as exc:
            logger.warning("device state %s unusable (%s); starting afresh", path, exc)
            return False
        self.residuals = {
            k[len(_RESIDUAL) :]: v.numpy() for k, v in tensors.items() if k.startswith(_RESIDUAL)
        }
        counters = metadata.get("counters", {})
        self.rounds_trained = int(counters.get("rounds_trained", 0))
        self.samples_seen = int(counters.get("samples_seen", 0))
        self.last_round = int(counters.get("last_round", 0))
        return True

    def save_state(self) -> Path | None:
        """Write the trainable tensors, residuals and counters atomically; returns the file (or None)."""
        path = self.state_path
        if path is None:
            return None
        tensors: dict[str, Tensor] = {_MODEL + k: v for k, v in self.prepared.trainable_tensors().items()}
        tensors.update({_RESIDUAL + k: torch.from_numpy(np.asarray(v)) for k, v in self.residuals.items()})
        metadata = {
            "format": _STATE_FORMAT,
            "config": self.config.to_dict(),
            "partition_id": self.partition_id,
            "counters": {
                "rounds_trained": self.rounds_trained,
                "samples_seen": self.samples_seen,
                "last_round": self.last_round,
            },
        }
        return write_tensors(path, tensors, metadata)

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
        """Load the global tensors, train on the local stream, return the update; state is saved."""
        anchor = self.load_global(arrays)
        before = evaluate(self.prepared, self.data.test)
        start = time.perf_counter()
        fit_samples = self._train_locally(anchor, server_round=server_round)
        seconds = time.perf_counter() - start
        after_eval = evaluate(self.prepared, self.data.test)
        current = to_numpy({k: v for k, v in self.prepared.trainable_tensors().items() if k in anchor})
        start_np = to_numpy(anchor)
        deltas = {k: (current[k] - start_np[k]).astype(start_np[k].dtype) for k in self.shared}
        self.rounds_trained += 1
        self.samples_seen += fit_samples
        self.last_round = int(server_round)
        return DeviceUpdate(
            deltas=deltas,
            num_examples=len(self.data.train),
            metrics={
                "accuracy-before": before.accuracy,
                "accuracy-after": after_eval.accuracy,
                "test-samples": float(after_eval.samples),
                "train-seconds": seconds,
                "rounds-trained": float(self.rounds_trained),
            },
        )

    def _train_locally(self, anchor: Mapping[str, Tensor], *, server_round: int) -> int:
        """Train on the device's stream for ``local_epochs``; FedProx adds mu/2 ||w - w_t||^2 to the loss."""
        mu = self.config.proximal_mu
        params = {k: p for k, p in self.prepared.trainable_parameters().items() if k in anchor}

        def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
            loss = F.cross_entropy(logits, y)
            return loss + proximal_term(params, anchor, mu) if mu > 0 else loss

        trainer = Trainer(
            self.prepared,
            optimizer=self.config.optimizer,
            lr=self.config.lr,
            batch_size=self.config.batch_size,
            loss_fn=loss_fn,
        )
        fit = trainer.fit(
            self.data.train,
            epochs=self.config.local_epochs,
            seed=self.config.seed * 100_003 + self.partition_id * 1_009 + int(server_round),
        )
        return int(fit.samples)

    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> EvalResult:
        """Accuracy of the global tensors (with the personal head if personalised) on the local test set."""
        self.load_global(arrays)
        return evaluate(self.prepared, self.data.test)
