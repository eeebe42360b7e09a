"""Attention: ``nn.MultiheadAttention`` supported, its projections keeping only what their gradients need.

``nn.MultiheadAttention`` computes its projections with ``F.linear`` on its own parameters
(``in_proj_weight``/``in_proj_bias``, ``out_proj.weight``/``out_proj.bias``; its ``out_proj`` child, a
``NonDynamicallyQuantizableLinear``, is never called). Stock autograd keeps a linear map's input only when
its weight trains, so with frozen projections the layer keeps what attention itself needs: with
``need_weights=False`` it runs ``F.scaled_dot_product_attention``, which keeps q, k, v, the output and the
per-row log-sum-exp (no ``L x L`` matrix); with ``need_weights=True`` (the default) it must return the
attention matrix, and keeps it as stock does. This layer therefore runs torch's own forward and exists so
that ``convert`` counts the layer as supported (``out_proj``, a Linear subclass keeping Linear's
forward, gets the Linear op, harmlessly). Attention blocks of the libraries (transformers' BERT, ViT and
GPT-2 attention, timm's ``Attention``) call ``scaled_dot_product_attention`` themselves on the outputs
of ``nn.Linear``/``Conv1D`` children, which ``convert`` converts.
"""

from __future__ import annotations

from torch import nn

from ondevice.ops.registry import MemorySavingModule, register_op

__all__ = ["MemorySavingMultiheadAttention"]


class MemorySavingMultiheadAttention(MemorySavingModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention``: frozen projections keep nothing beyond what attention needs (as stock)."""

    stock_type = nn.MultiheadAttention


register_op(nn.MultiheadAttention, MemorySavingMultiheadAttention.from_module)
