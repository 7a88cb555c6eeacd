"""Argument checks for ``paca_attention`` (generic ones from ``clusterfx.ops.common``), run
before any work, eagerly and under fake tensors (they read metadata only).

Every error names the offending value and what would be accepted.
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import check_float, check_impl, check_int, check_scale


def validate(q, k, v, logits, prefix, scale, impl) -> None:
    """Raise ValueError for anything ``paca_attention`` does not accept.

    q (B, H, N, D), k (B, H, N, D), v (B, H, N, Dv) of one float dtype and device (self-attention:
    one sequence); logits (B, M, N - prefix) floating, M >= 1, on the same device; 0 <= prefix < N.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, 4, exact_rank=True)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes ({q.dtype}, {k.dtype}, {v.dtype}) must be the same")
    check_float("logits", logits, 3, exact_rank=True)
    devices = {t.device for t in (q, k, v, logits)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, logits must be on one device, got {sorted(map(str, devices))}")
    b, h, n, d = q.shape
    if tuple(k.shape) != (b, h, n, d):
        raise ValueError(f"k {tuple(k.shape)} must have q's shape {tuple(q.shape)}: patch-to-"
                         f"cluster attention is self-attention over one sequence, one kv head "
                         f"per query head")
    if tuple(v.shape[:3]) != (b, h, n):
        raise ValueError(f"v {tuple(v.shape)} must share (B, H, N) = {(b, h, n)} with q")
    check_int("prefix", prefix, 0)
    if prefix >= n:
        raise ValueError(f"prefix ({prefix}) must be below the sequence length N ({n}): at least "
                         f"one patch must follow the class/register tokens")
    if logits.shape[0] != b or logits.shape[2] != n - prefix:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, M, N - prefix) = "
                         f"({b}, M, {n - prefix})")
    if logits.shape[1] < 1:
        raise ValueError(f"logits have M = {logits.shape[1]} clusters; M must be >= 1")
    check_scale(scale, positive=True)
    check_impl(impl)


def check_triton_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"impl='triton' takes float32, float16 or bfloat16 inputs, got "
                         f"{q.dtype}; use impl='reference' or 'cpu' for float64")
