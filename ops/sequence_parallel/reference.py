"""The oracle block kernels of ring attention: plain torch, materialising each block's scores
(float64-capable). See `common` for the math.

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), bias broadcastable to
(B, H, Nq, Nk) or None → out (B, H, Nq, Dv), lse (B, H, Nq) in the compute dtype.
"""

from __future__ import annotations

from clusterfx.ops.sequence_parallel.common.blocks import math_block_backward, math_block_forward


def block_forward(q, k, v, bias, scale: float, causal: bool):
    return math_block_forward(q, k, v, bias, scale, causal)


def block_backward(dout, q, k, v, out, lse, bias, scale: float, causal: bool, grad_lse=None):
    return math_block_backward(dout, q, k, v, out, lse, bias, scale, causal, grad_lse)
