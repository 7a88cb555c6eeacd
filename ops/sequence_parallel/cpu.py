"""Block kernels of ring attention on PyTorch's fused CPU attention
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward), which return and take
the log-sum-exp and never materialise a block's Nq × Nk scores. Any device: on other devices,
and where that kernel cannot take the block (value head dim ≠ query head dim), the blocks run
the plain-torch math of `common` (memory Nq × Nk per block); so does a backward with a
gradient into lse (i-clustered's centroids, a few rows per block).

Inputs run in the compute dtype (float64, else float32), so that each block's output and lse
are exact before the fp32 merge. The fused kernel gives a row whose keys are all masked
lse = 0 and out = 0; such rows are set to lse = -inf here, as the merge expects.

Shapes: as `reference`.
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.sequence_parallel.common.blocks import (
    math_block_backward,
    math_block_forward,
    safe_lse,
)

_aten = torch.ops.aten


def _fused(q, v) -> bool:
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1]


def _cast(cd, *xs):
    return [x.to(cd) if x is not None else None for x in xs]


def block_forward(q, k, v, bias, scale: float, causal: bool):
    if not _fused(q, v):
        return math_block_forward(q, k, v, bias, scale, causal)
    cd = compute_dtype(q)
    q, k, v, bias = _cast(cd, q, k, v, bias)
    if bias is not None and causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        bias, causal = bias.masked_fill(~keep, float("-inf")), False
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    if bias is not None:
        empty = ~(bias > float("-inf")).any(-1)  # (B, H, Nq) rows with no key here
        if bool(empty.any()):
            lse = lse.masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def block_backward(dout, q, k, v, out, lse, bias, scale: float, causal: bool, grad_lse=None):
    if grad_lse is not None or not _fused(q, v):  # the fused kernel takes no lse gradient
        return math_block_backward(dout, q, k, v, out, lse, bias, scale, causal, grad_lse)
    cd = compute_dtype(q)
    dout, q, k, v, out, bias = _cast(cd, dout, q, k, v, out, bias)
    if bias is not None and causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        bias, causal = bias.masked_fill(~keep, float("-inf")), False
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, safe_lse(lse).to(cd), 0.0, causal, attn_mask=bias, scale=scale)
    return dq, dk, dv
