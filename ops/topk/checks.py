"""Argument checks for ``topk_attention`` (generic ones from ``clusterfx.ops.common``), run
before any work (eagerly and under fake tensors).

Every error names the offending value and what would be accepted.
"""

from __future__ import annotations

import math

import torch

from clusterfx.ops.common.checks import (
    FLOAT_DTYPES,
    NATIVE_IMPLS,
    check_impl,
    check_positive_int,
)

DTYPES = FLOAT_DTYPES
_LAYOUTS = {"q": "(B, H, Nq, D)", "k": "(B, Hk, Nk, D)", "v": "(B, Hk, Nk, Dv)"}


def _check_mask(attn_mask, q: torch.Tensor, target: tuple) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be None or a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; accepted: torch.bool (True = "
                        "attend) or a floating dtype (added to the scores)")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    shape = tuple(attn_mask.shape)
    ok = len(shape) <= 4 and all(m == 1 or m == t for m, t in zip(shape[::-1], target[::-1]))
    if not ok:
        raise ValueError(f"attn_mask of shape {shape} is not broadcastable to (B, H, Nq, Nk) = "
                         f"{target}; each of its trailing dims must be 1 or match")


def validate(q, k, v, topk, attn_mask, is_causal, scale, chunk_size, impl) -> None:
    """Raise TypeError/ValueError for anything ``topk_attention`` does not accept."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 {_LAYOUTS[name]}, got rank {t.dim()} "
                             f"with shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; accepted: torch.float16, "
                             "torch.bfloat16, torch.float32, torch.float64")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, nq, d = q.shape
    bk, hk, nk, dk = k.shape
    if bk != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {v.shape[0]}")
    if dk != d:
        raise ValueError(f"q and k head dims differ: q has D={d}, k has D={dk}")
    if v.shape[1] != hk or v.shape[2] != nk:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share (B, Hk, Nk)")
    if (hk == 0 and h != 0) or (hk > 0 and h % hk != 0):
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    check_positive_int("topk", topk)
    check_positive_int("chunk_size", chunk_size)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat)):
            raise TypeError(f"scale must be None or a float, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite float (or None for D**-0.5), "
                             f"got {scale}")
    check_impl(impl, NATIVE_IMPLS)
    if attn_mask is not None:
        _check_mask(attn_mask, q, (b, h, nq, nk))
