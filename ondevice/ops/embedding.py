"""Embedding: supported as is, because stock autograd already keeps only what its gradient needs.

``y = W[ids]``: the input is integer indices, which need no gradient, and ``dW`` is a scatter-add of ``dy``
into the rows ``ids`` (``embedding_backward``), which needs only the indices. Stock autograd keeps just the
indices when the weight trains, and builds no graph at all when it is frozen (nothing to keep). So the
memory-saving Embedding runs ``nn.Embedding``'s own forward (``max_norm`` renormalisation included) and
exists so that ``convert``, ``unsupported_leaves`` and ``prepare`` count Embedding layers as supported.
"""

from __future__ import annotations

from torch import nn

from ondevice.ops.registry import MemorySavingModule, register_op

__all__ = ["MemorySavingEmbedding"]


class MemorySavingEmbedding(MemorySavingModule, nn.Embedding):
    """``nn.Embedding``: frozen, it keeps nothing; with a training weight, only the indices (as stock)."""

    stock_type = nn.Embedding


register_op(nn.Embedding, MemorySavingEmbedding.from_module)
