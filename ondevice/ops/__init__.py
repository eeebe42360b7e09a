"""Memory-saving autograd ops: frozen layers keep nothing, ReLUs keep 1-bit masks.

Freezing a layer's weight removes the need to keep its input for backward, and a ReLU needs only a
1-bit mask (TinyTL, Cai et al. 2020; tiny-training, Lin et al. 2022), but stock PyTorch keeps full
activations anyway. :func:`convert` swaps every supported layer for a subclass that computes the same
outputs and gradients with custom ``torch.autograd.Function``\\ s that keep only what the gradients of the
tensors that actually require grad need, decided at forward time. One module per op family; each
registers itself in :mod:`ondevice.ops.registry`, by module type or, for the layers timm and transformers
models are built from, by qualified name (so importing ondevice imports neither). Subclasses that keep
their parent's ``forward`` get the parent's op; :func:`op_support` says which op applies to a layer, or
why none does.
"""

from ondevice.ops import (
    activation,
    attention,
    conv,
    dropout,
    embedding,
    linear,
    norm,
    pooling,
    sequential,
)
from ondevice.ops.convert import SAVES_NOTHING, convert, restore, unsupported_leaves
from ondevice.ops.registry import (
    MemorySavingModule,
    OpOptions,
    OpSupport,
    find_op,
    library_layers,
    op_support,
    register_op,
    supported_types,
)
from ondevice.ops.sequential import MemorySavingSequential

__all__ = [
    "SAVES_NOTHING",
    "MemorySavingModule",
    "MemorySavingSequential",
    "OpOptions",
    "OpSupport",
    "activation",
    "attention",
    "conv",
    "convert",
    "dropout",
    "embedding",
    "find_op",
    "library_layers",
    "linear",
    "norm",
    "op_support",
    "pooling",
    "register_op",
    "restore",
    "sequential",
    "supported_types",
    "unsupported_leaves",
]
