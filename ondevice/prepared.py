"""``ondevice.prepare(model, scheme)``: freeze a pretrained model for an update scheme.

prepare copies the model (unless told not to), validates it, freezes every parameter, lets the scheme
choose what trains and attach its branches (replacing children through their parents), swaps in
memory-saving autograd ops, and wraps the result in a :class:`PreparedModel` that validates inputs, keeps
frozen norm statistics frozen in ``train()`` mode, and exposes, saves and loads only what trains.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ondevice._example import example_spec
from ondevice._stock import StockLayer, stock_autograd_layers, stock_layers, warn_stock
from ondevice._version import __version__
from ondevice.adapters import LiteResidualPlan, lite_residual_plan
from ondevice.backbone import load_backbone, save_backbone
from ondevice.checkpoint import KIND_DELTA, check_model_fingerprint, read_tensors, write_tensors
from ondevice.errors import (
    CheckpointMismatchError,
    ConfigError,
    InputDtypeError,
    InputShapeError,
    UnsupportedModuleError,
)
from ondevice.ops import convert, supported_types
from ondevice.ops.convert import effective_compress
from ondevice.ops.norm import mark_shared_norms
from ondevice.quantize import FROZEN_WEIGHT_FORMATS, int8_saved_weights, quantize_frozen_weights
from ondevice.recompute import RecomputeChoice, apply_recompute
from ondevice.schemes import Scheme, resolve_scheme
from ondevice.schemes._tree import BATCH_NORM_TYPES, COMPUTE_TYPES, leaves
from ondevice.schemes.base import ApplyContext, apply_scheme

__all__ = [
    "DELTA_FORMAT",
    "InputSpec",
    "PrepareReport",
    "PreparedModel",
    "StockLayer",
    "find_head",
    "model_fingerprint",
    "prepare",
    "stock_autograd_layers",
]

logger = logging.getLogger(__name__)

DELTA_FORMAT = "ondevice.delta/1"
"""Format tag written into every delta checkpoint."""


def find_head(model: nn.Module, head: str | None = None) -> str | None:
    """Qualified name of the classifier head.

    ``head`` if given (it must name a Linear/Conv layer); else a root attribute ``classifier``, ``fc`` or
    ``head`` that is an ``nn.Linear``; else the last ``nn.Linear`` leaf in registration order; else None.
    """
    if head is not None:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            raise ConfigError(f"head={head!r} is not a module of {type(model).__name__}") from None
        if not isinstance(module, COMPUTE_TYPES):
            raise ConfigError(
                f"head={head!r} is a {type(module).__name__}; the head must be a Linear or Conv layer"
            )
        return head
    for attr in ("classifier", "fc", "head"):
        if isinstance(getattr(model, attr, None), nn.Linear):
            return attr
    linears = [name for name, module in leaves(model) if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class and the names, shapes and dtypes of its parameters and buffers."""
    entries = [type(model).__qualname__] + [
        f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in sorted(model.state_dict().items())
    ]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class InputSpec:
    """What a batch must look like: ``ndim`` dims, ``channels`` at dim 1 (or ``features`` in the last dim),
    or integer token ids (``token_ids``) for a model whose first layer is an embedding."""

    ndim: int | None
    channels: int | None = None
    features: int | None = None
    flat_features: int | None = None
    token_ids: bool = False

    @staticmethod
    def infer(model: nn.Module) -> InputSpec:
        """From the model's ``input_shape`` (zoo models) or its first layer in registration order."""
        shape = getattr(model, "input_shape", None)
        if isinstance(shape, tuple) and shape and all(isinstance(s, int) for s in shape):
            return InputSpec(
                ndim=len(shape) + 1,
                channels=shape[0] if len(shape) > 1 else None,
                features=shape[0] if len(shape) == 1 else None,
            )
        ordered = list(leaves(model))
        for index, (_, module) in enumerate(ordered):
            if isinstance(module, nn.Embedding):
                return InputSpec(ndim=None, token_ids=True)
            if isinstance(module, nn.Conv1d | nn.Conv2d):
                return InputSpec(ndim=3 if isinstance(module, nn.Conv1d) else 4, channels=module.in_channels)
            if isinstance(module, nn.Linear):
                flattened = any(isinstance(m, nn.Flatten) for _, m in ordered[:index])
                if flattened:
                    return InputSpec(ndim=None, flat_features=module.in_features)
                return InputSpec(ndim=None, features=module.in_features)
        return InputSpec(ndim=None)

    def check(self, x: object, *, dtype: torch.dtype) -> None:
        """Raise InputShapeError/InputDtypeError, naming what was given and what is expected."""
        if not isinstance(x, Tensor):
            raise InputDtypeError(f"the model input must be a torch.Tensor, got {type(x).__name__}")
        if self.token_ids:
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise InputDtypeError(
                    f"the model's first layer is an embedding, so its input must be integer token ids, got "
                    f"{x.dtype}; tokenize the text, or convert indices with x.long()"
                )
            return
        if not x.is_floating_point():
            raise InputDtypeError(
                f"the model input must be floating point ({dtype}), got {x.dtype}; convert with x.to({dtype})"
            )
        if x.dtype != dtype:
            raise InputDtypeError(
                f"the model's parameters are {dtype} but the input is {x.dtype}; convert with x.to({dtype})"
            )
        if self.ndim is not None and x.ndim != self.ndim:
            raise InputShapeError(
                f"expected a batch with {self.ndim} dims ({self.describe()}), got shape {tuple(x.shape)}; "
                f"add a batch dimension with x.unsqueeze(0) for a single sample"
            )
        if self.channels is not None and x.shape[1] != self.channels:
            raise InputShapeError(
                f"expected {self.channels} channels at dim 1 ({self.describe()}), got shape {tuple(x.shape)}"
            )
        if self.features is not None and (x.ndim < 2 or x.shape[-1] != self.features):
            raise InputShapeError(
                f"expected {self.features} features in the last dim, got shape {tuple(x.shape)}"
            )
        if self.flat_features is not None and (x.ndim < 2 or x[0].numel() != self.flat_features):
            raise InputShapeError(
                f"expected {self.flat_features} values per sample, got shape {tuple(x.shape)}"
            )

    def describe(self) -> str:
        if self.ndim == 4:
            return f"N x {self.channels} x H x W"
        if self.ndim == 3:
            return f"N x {self.channels} x L"
        return "N x ..."


@dataclass(frozen=True)
class PrepareReport:
    """What prepare did: the scheme, parameter counts, the names of the trainable tensors.

    ``stock_layers`` lists the layers without a memory-saving op (they run on stock autograd) with the
    bytes each keeps for backward on the batch ``example`` describes (batch 1). ``lite_residual`` says
    where a lite residual scheme placed its branches, how wide, and their share of the model's parameters.
    ``recompute`` names the blocks that keep only their inputs and are recomputed in backward;
    ``int8_layers`` the layers whose frozen weight is held in int8 (``frozen_weights="int8"``).
    """

    scheme: dict[str, Any]
    total_params: int
    trainable_params: int
    added_params: int
    trainable_names: tuple[str, ...]
    memory_saving: bool
    stock_layers: tuple[StockLayer, ...] = ()
    example: str | None = None
    lite_residual: LiteResidualPlan | None = None
    recompute: tuple[str, ...] = ()
    int8_layers: tuple[str, ...] = ()

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(1, self.total_params)

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["trainable_names"] = list(self.trainable_names)
        payload["stock_layers"] = [asdict(layer) for layer in self.stock_layers]
        payload["lite_residual"] = None if self.lite_residual is None else self.lite_residual.to_dict()
        payload["recompute"] = list(self.recompute)
        payload["int8_layers"] = list(self.int8_layers)
        payload["trainable_fraction"] = self.trainable_fraction
        return payload


class PreparedModel(nn.Module):
    """A model prepared for on-device training under an update scheme.

    Attributes:
        model: the prepared network (a copy of the original unless ``copy=False``).
        scheme: the update scheme.
        head: qualified name (inside ``model``) of the classifier head, or None.
        fingerprint: :func:`model_fingerprint` of the original model; checkpoints carry it.
        input_spec: what :meth:`forward` accepts.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        scheme: Scheme,
        head: str | None,
        fingerprint: str,
        input_spec: InputSpec,
        frozen_norms: tuple[str, ...],
        memory_saving: bool,
        added_params: int,
        mask: Literal["bit", "byte"] = "bit",
        compress: Literal["int8", "2bit"] | None = None,
        stock_layers: tuple[StockLayer, ...] = (),
        example: str | None = None,
        recompute: tuple[str, ...] = (),
        int8_layers: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.scheme = scheme
        self.head = head
        self.fingerprint = fingerprint
        self.input_spec = input_spec
        self.memory_saving = memory_saving
        self.mask = mask
        self.compress = compress
        self._frozen_norms = frozen_norms
        self._added_params = added_params
        self._stock_layers = stock_layers
        self._example = example
        self.recompute = recompute
        self.int8_layers = int8_layers
        self.train()

    # -- forward and modes -------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The model's output for batch ``x`` (further arguments go to the model as they are)."""
        self.input_spec.check(x, dtype=self.dtype)
        if not self.int8_layers:
            return self.model(x, *args, **kwargs)
        with int8_saved_weights():  # int8 weights saved for backward stay int8
            return self.model(x, *args, **kwargs)

    @property
    def frozen_weights(self) -> str:
        """``"int8"`` when frozen Conv/Linear/Embedding weights are held in int8, else ``"float"``."""
        return "int8" if self.int8_layers else "float"

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the model's floating-point parameters (int8-held frozen weights aside)."""
        first = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return first.dtype if first is not None else torch.get_default_dtype()

    def train(self, mode: bool = True) -> PreparedModel:
        """Like ``nn.Module.train``, but BatchNorm layers whose statistics are frozen stay in eval mode."""
        super().train(mode)
        for name in self._frozen_norms:
            self.model.get_submodule(name).eval()
        return self

    def with_ops(self, module: nn.Module) -> nn.Module:
        """``module`` with the memory-saving ops this model was prepared with (itself when they are off).

        For layers added after prepare, e.g. a head grown for new classes.
        """
        if not self.memory_saving:
            return module
        return convert(module, mask=self.mask, compress=self.compress)

    # -- what trains ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by name (inside ``model``), sorted by name."""
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        return dict(sorted(params.items()))

    def trainable_buffers(self) -> dict[str, Tensor]:
        """Buffers that change while training (running statistics of updating norms), sorted by name."""
        if not self.scheme.update_norm_stats:
            return {}
        frozen = set(self._frozen_norms)
        buffers = {
            name: b
            for name, b in self.model.named_buffers()
            if name.rpartition(".")[0] not in frozen and name.rpartition(".")[2] in _NORM_BUFFERS
        }
        return dict(sorted(buffers.items()))

    def trainable_tensors(self) -> dict[str, Tensor]:
        """Everything training changes, by name, sorted: the delta that is saved and shared.

        The tensors are the live ones (detached views sharing storage): clone them to keep a snapshot.
        """
        tensors = {name: p.detach() for name, p in self.trainable_parameters().items()}
        tensors.update(self.trainable_buffers())
        return dict(sorted(tensors.items()))

    def load_trainable(self, tensors: Mapping[str, Tensor], *, strict: bool = True) -> None:
        """Copy ``tensors`` into the trainable tensors, checking names, shapes, dtypes and finiteness.

        Args:
            tensors: name -> tensor, as returned by :meth:`trainable_tensors`.
            strict: require exactly the same names (otherwise load the ones given, all of which must exist).
        """
        own = self.trainable_tensors()
        unknown = sorted(set(tensors) - set(own))
        missing = sorted(set(own) - set(tensors))
        if unknown or (strict and missing):
            raise CheckpointMismatchError(
                f"trainable tensors do not match this prepared model (scheme {self.scheme.name!r}): "
                f"unexpected {unknown[:5]}{'...' if len(unknown) > 5 else ''}, missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}. Load a delta saved from the same model "
                f"and scheme"
            )
        for name, value in tensors.items():
            target = own[name]
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(target.shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise CheckpointMismatchError(
                    f"tensor {name!r} has shape {shape}, the model expects {tuple(target.shape)}"
                )
            if value.is_floating_point() != target.is_floating_point():
                raise CheckpointMismatchError(
                    f"tensor {name!r} has dtype {value.dtype}, expected {target.dtype}"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointMismatchError(f"tensor {name!r} holds NaN or Inf; refusing to load it")
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value.to(device=own[name].device, dtype=own[name].dtype))

    # -- reporting -----------------------------------------------------------------------------------
    @property
    def report(self) -> PrepareReport:
        """Counts and names of what trains."""
        trainable = self.trainable_parameters()
        return PrepareReport(
            scheme=self.scheme.to_dict(),
            total_params=sum(p.numel() for p in self.model.parameters()),
            trainable_params=sum(p.numel() for p in trainable.values()),
            added_params=self._added_params,
            trainable_names=tuple(trainable),
            memory_saving=self.memory_saving,
            stock_layers=self._stock_layers,
            example=self._example,
            lite_residual=lite_residual_plan(self.model),
            recompute=self.recompute,
            int8_layers=self.int8_layers,
        )

    def extra_repr(self) -> str:
        report = self.report
        return (
            f"scheme={self.scheme.name}, trainable={report.trainable_params:,}/{report.total_params:,} "
            f"params in {len(report.trainable_names)} tensors, memory_saving={self.memory_saving}"
        )

    # -- checkpoints ---------------------------------------------------------------------------------
    def delta_metadata(self) -> dict[str, Any]:
        """The metadata every delta carries: format, ondevice version, scheme, model fingerprint (and
        ``frozen_weights: "int8"`` when the backbone is held in int8: its deltas adapt to those weights)."""
        return {
            "format": DELTA_FORMAT,
            "ondevice_version": __version__,
            "scheme": self.scheme.to_dict(),
            "model_fingerprint": self.fingerprint,
            "model_class": type(self.model).__qualname__,
        } | ({"frozen_weights": "int8"} if self.int8_layers else {})

    def save_delta(self, path: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the trainable tensors (and only those) to a safetensors file, atomically.

        The file carries its kind (``"delta"``) and a SHA-256 digest (see :mod:`ondevice.checkpoint`).

        Raises:
            CheckpointError: ``path`` is a directory, or a file that is not a delta checkpoint (it is left
                unchanged).
        """
        metadata = self.delta_metadata()
        if extra:
            metadata["extra"] = dict(extra)
        return write_tensors(path, self.trainable_tensors(), metadata, kind=KIND_DELTA)

    def check_delta_metadata(self, metadata: Mapping[str, Any], *, source: str = "checkpoint") -> None:
        """Raise CheckpointMismatchError if ``metadata`` belongs to another model or scheme."""
        if metadata.get("format") != DELTA_FORMAT:
            raise CheckpointMismatchError(
                f"{source} has format {metadata.get('format')!r}, expected {DELTA_FORMAT!r}"
            )
        check_model_fingerprint(metadata, self.model, self.fingerprint, source=source,
                                fix="load it into the model it was saved from")  # fmt: skip
        theirs = metadata.get("scheme")
        if theirs != self.scheme.to_dict():
            raise CheckpointMismatchError(
                f"{source} was saved under scheme {json.dumps(theirs, sort_keys=True)}, but this model is "
                f"prepared with {self.scheme.to_json()}; prepare the model with the checkpoint's scheme"
            )
        saved = metadata.get("frozen_weights", "float")
        if saved != self.frozen_weights:
            raise CheckpointMismatchError(
                f"{source} was trained with {saved!r} frozen weights, but this model holds them as "
                f"{self.frozen_weights!r}; prepare it with frozen_weights={saved!r} to load this checkpoint"
            )

    def load_delta(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a delta written by :meth:`save_delta`; returns its metadata.

        Everything is validated (digest, kind, model, scheme, names, shapes, finiteness) before a single
        tensor is copied, so a failed load leaves the model as it was.

        Raises:
            CheckpointError: the file is missing, damaged, foreign or of another kind.
            CheckpointMismatchError: it belongs to another model or scheme.
        """
        tensors, metadata = read_tensors(path, kind=KIND_DELTA)
        self.check_delta_metadata(metadata, source=f"checkpoint {str(path)!r}")
        self.load_trainable(tensors)
        return metadata

    def save_backbone(self, path: str | os.PathLike[str]) -> Path:
        """Write the frozen tensors as held (int8 + scales, or float); see :mod:`ondevice.backbone`."""
        return save_backbone(self, path)

    def load_backbone(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a backbone file, all validated first; returns its metadata. See :mod:`ondevice.backbone`."""
        return load_backbone(self, path)


_NORM_BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def prepare(
    model: nn.Module,
    scheme: Scheme | str | Mapping[str, Any] = "bias",
    *,
    head: str | None = None,
    memory_saving: bool = True,
    mask: Literal["bit", "byte"] = "bit",
    compress: Literal["int8", "2bit"] | None = None,
    copy_model: bool = True,
    example_input: Tensor | Sequence[int] | None = None,
    strict: bool = False,
    recompute: RecomputeChoice = False,
    frozen_weights: Literal["float", "int8"] = "float",
) -> PreparedModel:
    """Prepare ``model`` for on-device training under ``scheme``.

    Args:
        model: any ``nn.Module``. Layers with a memory-saving op (``ondevice.ops.supported_types()``, and
            subclasses that keep their parent's ``forward``) get it; other layers run on stock autograd,
            with a :class:`~ondevice.errors.StockAutogradWarning` and a line each in
            ``report.stock_layers``.
        scheme: a scheme object, its name (``"bias"``, ``"lite_residual"``, ...) or its dict form.
        head: qualified name of the classifier head (found automatically when omitted, see
            :func:`find_head`).
        memory_saving: swap in ondevice's memory-saving autograd ops (default). Off gives stock PyTorch
            layers, e.g. as a reference.
        mask: how ReLU-family ops keep their gradient mask: ``"bit"`` (packed, 1 bit per element, the
            default) or ``"byte"`` (faster, 8x larger).
        compress: what smooth activations (SiLU, GELU, Hardswish, Sigmoid, Tanh) keep for backward:
            ``"int8"``, their input in 8 bits with a per-group scale; ``"2bit"``, 2 bits per element that
            select a 4-level step derivative (ReGELU2/ReSiLU2; forward exact, backward approximate).
            Under both, attention keeps q, k and v in float16 where they fit its range. Both lossy and
            off by default; ReLU-family masks are exact anyway. On a model without such activations a
            warning says so and nothing changes.
        copy_model: work on a deep copy (default) so the caller's model is untouched.
        example_input: a batch (or its shape, e.g. ``(1, 3, 224, 224)``) the model can be traced with, to
            place lite residual branches and count what layers keep. Default: what the model states (zoo
            ``input_shape``, a transformers ``config``, a timm ``pretrained_cfg``) or its first layer.
        strict: refuse a model with layers that have no memory-saving op instead of running them stock.
        recompute: keep only each block's inputs and recompute the block in backward (exact gradients, one
            more forward of each block per step): ``True`` for every block ``ondevice.recompute.find_blocks``
            finds (a transformer's layers, a CNN's residual blocks), or a tuple of block names.
        frozen_weights: ``"int8"`` holds every frozen Conv/Linear/Embedding weight in int8 with a float32
            scale per output channel and never keeps it in float (see :mod:`ondevice.quantize`): about a
            quarter of the frozen weight memory, gradients those of the dequantised model. Weights that
            train stay float; a scheme that trains every weight (``full``) is refused.

    Returns:
        A :class:`PreparedModel` whose output equals the original's until it trains.

    Raises:
        UnsupportedModuleError: ``strict`` is set and layers have no memory-saving op (all are named).
        UnknownSchemeError / ConfigError: a bad scheme or scheme field.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare() needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, PreparedModel):
        raise ConfigError("this model is already prepared; prepare the original model instead")
    resolved = resolve_scheme(scheme)
    if mask not in ("bit", "byte"):
        raise ConfigError(f"mask must be 'bit' or 'byte', got {mask!r}")
    if compress not in (None, "int8", "2bit"):
        raise ConfigError(f"compress must be None, 'int8' or '2bit', got {compress!r}")
    if compress is not None and not memory_saving:
        raise ConfigError(
            f"compress={compress!r} needs the memory-saving ops; use memory_saving=True with compress=, or "
            f"memory_saving=False without it"
        )
    if frozen_weights not in FROZEN_WEIGHT_FORMATS:
        raise ConfigError(
            f"frozen_weights must be one of {', '.join(map(repr, FROZEN_WEIGHT_FORMATS))}, got "
            f"{frozen_weights!r}"
        )
    if strict and memory_saving:
        refused = stock_autograd_layers(model)
        if refused:
            raise UnsupportedModuleError(refused, [t.__name__ for t in supported_types()])
    example = example_spec(model, example_input)
    fingerprint = model_fingerprint(model)
    input_spec = InputSpec.infer(model)
    work = copy.deepcopy(model) if copy_model else model
    head_name = find_head(work, head)
    original_count = sum(p.numel() for p in work.parameters())
    norms_before = {id(m) for m in work.modules() if isinstance(m, BATCH_NORM_TYPES)}
    for param in work.parameters():
        param.requires_grad_(False)
    apply_scheme(work, resolved, ApplyContext(head=head_name, example=example))
    added = sum(p.numel() for p in work.parameters()) - original_count
    frozen_norms = (
        ()
        if resolved.update_norm_stats
        else tuple(name for name, m in work.named_modules() if id(m) in norms_before)
    )
    if memory_saving:
        compress = effective_compress(work, compress)  # warns and is None where nothing would change
        convert(work, mask=mask, compress=compress)
        mark_shared_norms(work, example)  # LayerNorms whose output the next layer keeps keep only that
    recomputed = apply_recompute(work, recompute, head=head_name, example=example)
    int8_layers = tuple(quantize_frozen_weights(work)) if frozen_weights == "int8" else ()
    stock, example_text = stock_layers(work, example) if memory_saving else ((), None)
    if stock:
        warn_stock(stock, example_text)
    prepared = PreparedModel(
        work,
        scheme=resolved,
        head=head_name,
        fingerprint=fingerprint,
        input_spec=input_spec,
        frozen_norms=frozen_norms,
        memory_saving=memory_saving,
        added_params=added,
        mask=mask,
        compress=compress,
        stock_layers=stock,
        example=example_text,
        recompute=recomputed,
        int8_layers=int8_layers,
    )
    logger.info("prepared %s with %s", type(model).__name__, prepared.extra_repr())
    return prepared
