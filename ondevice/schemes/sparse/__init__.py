"""tiny-training's sparse update: configuration, the partial-channel layer, its memory-saving op, and how
the scheme is applied."""

from ondevice.schemes.sparse import apply as _apply  # noqa: F401  (registers the applicator)
from ondevice.schemes.sparse import op as _op  # noqa: F401  (registers the memory-saving op)
from ondevice.schemes.sparse.config import Sparse
from ondevice.schemes.sparse.layers import PartialChannelUpdate, select_input_channels
from ondevice.schemes.sparse.op import MemorySavingPartialChannelUpdate

__all__ = ["MemorySavingPartialChannelUpdate", "PartialChannelUpdate", "Sparse", "select_input_channels"]
