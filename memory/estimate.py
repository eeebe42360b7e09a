"""Estimate the memory of one training step without computing anything: execution on fake tensors.

``estimate`` copies the model, turns its parameters and buffers into ``FakeTensor``\\ s (tensors with a
shape, dtype, device and storage size but no data) and runs the very training step ``memory.measure``
runs -- forward, loss, backward, optimizer step -- through the model's own modules, so whatever ops the
model really uses (the memory-saving ops of ``ondevice.ops``, partial-channel layers, lite residual
branches) decide what is kept. Both trackers of :mod:`memory.measure` look only at storage identity and
size, so the report is the one a real step would give (the tests hold it to 2 % of ``measure`` on every
zoo model and scheme) for any batch size and resolution, at no compute and no activation memory. This is
how PyTorch's own ``torch._subclasses.fake_tensor`` is used to trace shapes; TinyTL and tiny-training
count their memory analytically instead (Cai et al. 2020, Sec. 2; Lin et al. 2022, Sec. 3).

Not covered, as for ``measure``: memory a kernel allocates for itself and allocator overhead.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memory.flops import FlopCount
from memory.measure import LossFn, check_trainable, training_step_report
from memory.report import MemoryReport
from ondevice.errors import ConfigError
from ondevice.optim import OptimizerConfig, build_optimizer, resolve_optimizer
from ondevice.prepared import PreparedModel
from ondevice.quantize import quantizable_frozen, quantize_frozen_weights, quantized_layers

__all__ = ["OptimizerSpec", "default_input_shape", "estimate", "make_optimizer"]

logger = logging.getLogger(__name__)

OptimizerSpec = (
    OptimizerConfig | str | Mapping[str, Any] | Callable[[list[nn.Parameter]], torch.optim.Optimizer]
)
"""An optimizer for ``estimate``/``plan``: an ``OptimizerConfig``, ``"sgd"``/``"adam"``, a config dict, or
a factory called with the trainable parameters (e.g. ``torch.optim.Adam`` or ``lambda ps: SGD(ps, lr=1)``).
"""


def make_optimizer(spec: OptimizerSpec | None, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``spec`` describes, over ``params``; ``None`` gives ``measure``'s default.

    The default is ``SGD(lr=0, momentum=0.9)``: it keeps the state of a momentum optimizer.
    """
    if spec is None:
        return torch.optim.SGD(params, lr=0.0, momentum=0.9)
    if isinstance(spec, OptimizerConfig | str | Mapping):
        return build_optimizer(resolve_optimizer(spec), params)
    if callable(spec):
        opt = spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(
                f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        return opt
    raise ConfigError(
        f"optimizer must be an OptimizerConfig, 'sgd', 'adam', a dict or a factory taking the trainable "
        f"parameters, got {type(spec).__name__}"
    )


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The per-sample input shape a model declares (zoo models' ``input_shape``, also inside a
    ``PreparedModel``), or ``None``."""
    for candidate in (model, getattr(model, "model", None)):
        shape = getattr(candidate, "input_shape", None)
        if isinstance(shape, tuple) and shape and all(isinstance(s, int) for s in shape):
            return shape
    return None


def _batch_shape(
    model: nn.Module, input_shape: Sequence[int] | None, batch_size: int | None
) -> tuple[int, ...]:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if input_shape is None:
        sample = default_input_shape(model)
        if sample is None:
            raise ConfigError(
                f"{type(model).__name__} declares no input_shape; pass input_shape=(N, C, H, W) (or the "
                f"per-sample shape with batch_size=N)"
            )
        return (batch_size or 1, *sample)
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ConfigError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    return shape if batch_size is None else (batch_size, *shape)


def fake_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are fake tensors of ``mode``.

    The copy is made on real tensors, outside the fake mode, then each parameter and buffer is replaced
    through its owning module (``requires_grad`` kept), so ``model`` itself is untouched.
    """
    work = copy.deepcopy(model)
    fakeify(work, mode)
    return work


def fakeify(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Replace ``model``'s parameters and buffers by fake tensors of ``mode``, in place (see fake_copy)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(mode.from_tensor(param.detach()), param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, mode.from_tensor(buffer))
    return model


def _quantize_copy(work: nn.Module, mode: FakeTensorMode) -> bool:
    """Hold the frozen weights of the fake copy ``work`` in int8 as ``prepare`` would; returns whether
    the step must run under ``int8_saved_weights`` itself (a bare module: a ``PreparedModel`` does)."""
    inner = work.model if isinstance(work, PreparedModel) else work
    if not quantizable_frozen(inner):  # no frozen layer weight: frozen parameters count at 8 bits instead
        return False
    with mode:
        names = quantize_frozen_weights(inner)
    if isinstance(work, PreparedModel):
        work.int8_layers = tuple(names)
        return False
    return True


def estimate(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    target: Tensor | None = None,
    optimizer: OptimizerSpec | None = None,
    loss_fn: LossFn | None = None,
    frozen_param_bits: int = 32,
    copy_model: bool = True,
) -> MemoryReport:
    """Estimate the memory of one training step of ``model`` without running it on data.

    The same step as :func:`memory.measure` (forward in the model's current mode, loss, backward,
    optimizer step, from no gradients) runs on fake tensors, so the returned report -- activations kept
    for backward, peak, state, per-module breakdown -- is what ``measure`` would report, with
    ``source="estimated"``.

    Args:
        model: the model as it will train, e.g. ``ondevice.prepare(...)`` or its ``.model``.
        input_shape: the batch shape ``(N, C, H, W)``; with ``batch_size`` given, the per-sample shape.
            Default: the model's ``input_shape`` (zoo models) with ``batch_size`` (default 1).
        batch_size: samples per step (see ``input_shape``).
        dtype: dtype of the input (default: the model's first floating parameter's, else float32).
        target: labels for the loss (a real or fake tensor; only its shape and dtype matter); by default
            class 0 for every sample, as in ``measure``.
        optimizer: what steps (see :data:`OptimizerSpec`); by default ``measure``'s ``SGD(lr=0,
            momentum=0.9)``.
        loss_fn: ``loss_fn(output, target) -> scalar``; by default ``memory.measure.default_loss``.
        frozen_param_bits: width frozen weights are counted at in ``frozen_param_bytes``: 32 as they
            are; 16 (half the bytes); 8: the step of the model with its frozen weights held in int8,
            exactly as ``prepare(..., frozen_weights="int8")`` holds them (the copy is quantised before
            the step, so activations, peak and frozen bytes are those of the int8 model: int8 weights,
            a float32 scale per output channel, float norms), as TinyTL and tiny-training deploy frozen
            weights on a microcontroller. A model without a frozen Conv/Linear/Embedding weight counts
            its frozen parameters at one byte each instead.
        copy_model: work on a copy (default). ``False`` turns ``model``'s own parameters into fake
            tensors for good; for callers that throw the model away (the planner does).

    Raises:
        ConfigError: no parameter requires grad, a bad shape, optimizer or ``frozen_param_bits``.
    """
    if frozen_param_bits not in (8, 16, 32):
        raise ConfigError(f"frozen_param_bits must be 8, 16 or 32, got {frozen_param_bits!r}")
    shape = _batch_shape(model, input_shape, batch_size)
    check_trainable(model)
    if dtype is None:
        floating = (p.dtype for p in model.parameters() if p.is_floating_point())
        dtype = next(floating, torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    work = fake_copy(model, mode) if copy_model else fakeify(model, mode)
    for param in work.parameters():
        param.grad = None
    int8_hooks = False
    if frozen_param_bits == 8 and not quantized_layers(work):
        int8_hooks = _quantize_copy(work, mode)
    fake_target = mode.from_tensor(target) if isinstance(target, Tensor) else None
    with mode:
        x = torch.empty(shape, dtype=dtype, device=device)
        trainable = [p for p in work.parameters() if p.requires_grad]
        opt = make_optimizer(optimizer, trainable)
        with FlopCount() as flops:
            report = training_step_report(
                work,
                (x,),
                target=fake_target,
                optimizer=opt,
                loss_fn=loss_fn,
                source="estimated",
                frozen_param_bits=frozen_param_bits,
                int8_hooks=int8_hooks,
            )
    report = dataclasses.replace(report, step_flops=flops.total)
    logger.debug(
        "estimated %s at %s: %d activation bytes, %d peak bytes",
        type(model).__name__,
        shape,
        report.activation_bytes,
        report.peak_bytes,
    )
    return report
