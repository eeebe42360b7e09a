"""``FederatedConfig``: everything a federation agrees on, as one frozen, JSON-serialisable dataclass.

It rides in Flower's run config (``[tool.flwr.app.config]``, flat ``kebab-case`` keys, see
:meth:`FederatedConfig.to_run_config`) and in every train message's ``ConfigRecord`` as JSON, so server
and devices check that they run the same experiment.

The task (decided here): the backbone is pretrained on digits ``pretrain_classes`` (0-4 by default) and
the devices learn all ten digits with a new 10-way head, so the pretrained classes are a subset of what
the devices learn and 5-9 are new to the backbone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from federated.compression import Compression
from federated.partition import Partition
from ondevice._jsonable import fields_to_dict
from ondevice.continual.learner import STRATEGIES, Strategy
from ondevice.errors import ConfigError, UnknownNameError, format_choices
from ondevice.quantize import FROZEN_WEIGHT_FORMATS
from ondevice.schemes import Scheme, resolve_scheme

__all__ = ["CONFIG_VERSION", "FederatedConfig"]

CONFIG_VERSION = 1


def _field(owner: str, value: object, parse: Callable[[Any], Any]) -> Any:
    """``parse(value)``; an invalid value's error names the field (``FederatedConfig.<owner>``)."""
    try:
        return parse(value)
    except UnknownNameError:
        raise  # says "unknown <kind> <name>" and lists the valid names
    except ConfigError as exc:
        raise ConfigError(f"FederatedConfig.{owner}={value!r} is invalid: {exc}") from None


def _positive_int(owner: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"FederatedConfig.{owner} must be a positive int, got {value!r}")


def _number(
    owner: str, value: object, *, low: float, high: float | None = None, open_low: bool = True
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and isinstance(value, int | float):
        ok = (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"FederatedConfig.{owner} must be a number {bound}, got {value!r}")


@dataclass(frozen=True)
class FederatedConfig:
    """A federated run: model, update scheme, learner settings, aggregation, compression, validation.

    The defaults are the one source of defaults: ``FederatedConfig()``, ``federated.simulate()`` and
    ``ondevice simulate`` without options all run the same federation (10 devices, 5 rounds, lite residual,
    Dirichlet(0.3) split, 2 local epochs of Adam at lr 1e-2).

    Attributes:
        model: zoo model (pretrained on the digits by :func:`ondevice.pretrain`, cached).
        scheme: update scheme as a dict (a :class:`Scheme` or a name is accepted and normalised).
        frozen_weights: how devices (and the server) hold the frozen Conv/Linear/Embedding weights:
            ``"float"`` or ``"int8"`` (int8 with a float32 scale per output channel, about a quarter of
            the memory; ``ondevice.prepare(..., frozen_weights=...)``). Not with the ``full`` scheme.
        ship_backbone: the server sends its frozen backbone (as held: int8 + scales under
            ``frozen_weights="int8"``) once to each device, which then builds the bare architecture and
            loads it instead of pretraining, and keeps it in its state directory
            (:mod:`federated.backbone`); off, every device pretrains (or loads its cache) itself.
        pretrain_classes: digits the backbone is pretrained on.
        classes: digits the devices learn (the head has ``len(classes)`` outputs; labels are remapped).
        partition: ``"iid"`` or ``"dirichlet:ALPHA"``.
        num_clients: devices in a simulation (a deployment takes ``num-partitions`` from node config).
        rounds: federated rounds.
        fraction_train: share of connected devices sampled each round.
        local_epochs, batch_size, optimizer, lr: the device's training per round (its stream is
            observed ``local_epochs`` times, in batches of ``batch_size``).
        strategy: the device's continual-learning strategy (:func:`ondevice.continual.create_learner`):
            ``"naive"`` (plain fine-tuning), ``"replay"``, ``"latent-replay"``, ``"lwf"`` or ``"ewc"``.
        buffer_size: replay buffer samples per device (replay strategies; the replayed mini-batch has
            ``batch_size`` samples).
        aggregation: ``"fedavg"`` (McMahan et al. 2017) or ``"fedprox"`` (Li et al. 2020).
        proximal_mu: FedProx's mu (must be > 0 for fedprox, 0 for fedavg).
        server_lr, server_momentum: the server's step on the averaged update (FedAvgM, Hsu et al. 2019,
            Flower's ``FedAvgM`` via :class:`federated.strategy.SparseFedAvgM`, the step itself
            :func:`federated.aggregation.server_step`); 1 and 0 are plain averaging. Composes with
            either aggregation.
        compression: uplink codec, ``"none"``, ``"fp16"``, ``"int8"`` or ``"topk:RATIO"``.
        downlink: precision of the global tensors the server broadcasts (the server keeps float32).
        personalised: keep the head on each device (head tensors never leave it).
        norm_factor: reject updates whose norm exceeds this many times the round's lower median.
        min_replies: valid replies needed to update the global model in a round.
        round_timeout_s: how long the server waits for replies in a round.
        seed: data split, partition and head initialisation.
    """

    model: str = "cnn"
    scheme: Any = field(default_factory=lambda: {"name": "lite_residual"})
    frozen_weights: Literal["float", "int8"] = "float"
    ship_backbone: bool = False
    pretrain_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    partition: str = "dirichlet:0.3"
    num_clients: int = 10
    rounds: int = 5
    fraction_train: float = 1.0
    local_epochs: int = 2
    batch_size: int = 16
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-2
    strategy: Strategy = "naive"
    buffer_size: int = 200
    aggregation: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    compression: str = "none"
    downlink: Literal["fp32", "fp16"] = "fp32"
    personalised: bool = False
    norm_factor: float = 10.0
    min_replies: int = 1
    round_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"FederatedConfig.model must be a zoo model name, got {self.model!r}")
        object.__setattr__(
            self, "scheme", _field("scheme", self.scheme, lambda s: resolve_scheme(s).to_dict())
        )
        if self.frozen_weights not in FROZEN_WEIGHT_FORMATS:
            raise ConfigError(
                f"FederatedConfig.frozen_weights must be one of {format_choices(FROZEN_WEIGHT_FORMATS)}, got "
                f"{self.frozen_weights!r}"
            )
        if self.frozen_weights == "int8" and self.scheme["name"] == "full":
            raise ConfigError(
                "FederatedConfig.frozen_weights='int8' holds frozen weights in int8, but scheme 'full' "
                "trains every weight; use frozen_weights='float' with 'full', or a scheme that freezes the "
                "backbone ('bias', 'lite_residual', 'sparse', ...)"
            )
        if not isinstance(self.ship_backbone, bool):
            raise ConfigError(f"FederatedConfig.ship_backbone must be a bool, got {self.ship_backbone!r}")
        for name in ("pretrain_classes", "classes"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if (
                not isinstance(value, tuple)
                or len(value) < 2
                or len(set(value)) != len(value)
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 9 for c in value)
            ):
                raise ConfigError(f"FederatedConfig.{name} must be 2+ distinct digits 0-9, got {value!r}")
        object.__setattr__(
            self, "partition", _field("partition", self.partition, lambda p: Partition.parse(p).spec())
        )
        object.__setattr__(
            self,
            "compression",
            _field("compression", self.compression, lambda c: Compression.parse(c).spec()),
        )
        for name in ("num_clients", "rounds", "local_epochs", "batch_size", "min_replies", "buffer_size"):
            _positive_int(name, getattr(self, name))
        _number("fraction_train", self.fraction_train, low=0.0, high=1.0)
        _number("lr", self.lr, low=0.0)
        _number("proximal_mu", self.proximal_mu, low=0.0, open_low=False)
        _number("server_lr", self.server_lr, low=0.0)
        _number("server_momentum", self.server_momentum, low=0.0, open_low=False)
        if self.server_momentum >= 1:
            raise ConfigError(
                f"FederatedConfig.server_momentum must be in [0, 1) (0.9 is the usual upper end), "
                f"got {self.server_momentum!r}"
            )
        _number("norm_factor", self.norm_factor, low=1.0)
        _number("round_timeout_s", self.round_timeout_s, low=0.0)
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"FederatedConfig.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"FederatedConfig.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        if self.aggregation not in ("fedavg", "fedprox"):
            raise ConfigError(
                f"FederatedConfig.aggregation must be 'fedavg' or 'fedprox', got {self.aggregation!r}"
            )
        if self.aggregation == "fedprox" and self.proximal_mu <= 0:
            raise ConfigError(
                f"aggregation='fedprox' needs proximal_mu > 0, got proximal_mu={self.proximal_mu!r}; "
                "set proximal_mu=0.01 (for example), or use aggregation='fedavg' without it"
            )
        if self.aggregation == "fedprox" and self.strategy in ("lwf", "ewc"):
            raise ConfigError(
                f"aggregation='fedprox' adds its own regulariser and cannot be combined with "
                f"strategy={self.strategy!r}; use strategy='naive' or strategy='replay' with fedprox"
            )
        if self.aggregation == "fedavg" and self.proximal_mu != 0:
            raise ConfigError(
                f"proximal_mu only applies to aggregation='fedprox', got proximal_mu={self.proximal_mu!r} "
                "with aggregation='fedavg'; set proximal_mu=0, or use aggregation='fedprox'"
            )
        if self.downlink not in ("fp32", "fp16"):
            raise ConfigError(f"FederatedConfig.downlink must be 'fp32' or 'fp16', got {self.downlink!r}")
        if not isinstance(self.personalised, bool):
            raise ConfigError(f"FederatedConfig.personalised must be a bool, got {self.personalised!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"FederatedConfig.seed must be an int, got {self.seed!r}")

    # -- typed views ------------------------------------------------------------------------------
    @property
    def scheme_obj(self) -> Scheme:
        """The scheme as an object."""
        return resolve_scheme(self.scheme)

    @property
    def compression_obj(self) -> Compression:
        return Compression.parse(self.compression)

    @property
    def partition_obj(self) -> Partition:
        return Partition.parse(self.partition)

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with a version tag."""
        return {"version": CONFIG_VERSION, **fields_to_dict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_dict(payload: Mapping[str, Any]) -> FederatedConfig:
        """Rebuild from :meth:`to_dict` output, validating version and fields."""
        if not isinstance(payload, Mapping):
            raise ConfigError(f"a FederatedConfig dict is needed, got {type(payload).__name__}")
        data = dict(payload)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"FederatedConfig version {version!r}, this ondevice reads {CONFIG_VERSION}")
        known = {f.name for f in dataclasses.fields(FederatedConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"FederatedConfig has no field(s) {unknown}; its fields are {sorted(known)}")
        return FederatedConfig(**data)

    @staticmethod
    def from_json(text: str) -> FederatedConfig:
        try:
            payload = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"FederatedConfig JSON does not parse: {exc}") from None
        return FederatedConfig.from_dict(payload)

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """Flat kebab-case keys for Flower's run config (tuples and the scheme as JSON strings)."""
        out: dict[str, str | int | float | bool] = {}
        for key, value in self.to_dict().items():
            if key == "version":
                continue
            if isinstance(value, list | dict):
                value = json.dumps(value, sort_keys=True, separators=(",", ":"))
            out[key.replace("_", "-")] = value
        return out

    @staticmethod
    def from_run_config(run_config: Mapping[str, Any]) -> FederatedConfig:
        """Read the fields present in a Flower run config (other keys are ignored); defaults for the rest."""
        known = {f.name: f for f in dataclasses.fields(FederatedConfig)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = str(key).replace("-", "_")
            if name not in known:
                continue
            if name in ("scheme", "pretrain_classes", "classes") and isinstance(value, str):
                text = value.strip()
                if name == "scheme" and not text.startswith("{"):
                    kwargs[name] = text
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"run config {key!r} is not valid JSON: {exc}") from None
            # TOML and JSON write 1.0 as 1: a float field takes an int as its float.
            if known[name].type == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            kwargs[name] = value
        return FederatedConfig(**kwargs)
