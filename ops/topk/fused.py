"""Fused CPU top-k attention (impl="cpu"): the C++ kernels of ``csrc/topk.cpp``.

Exact top-k attention needs every score but only k columns of ``P V``: blocks of 128 queries
stream the keys in blocks of 512 (a BLAS GEMM per block), each query keeps its k largest
scores in a streaming selection, then attends to those k keys. Nothing of size Nq×Nk is ever
stored: memory is O(128·512) per thread plus the O(N·k) output (and indices for the backward).
``chunk_size`` does not apply (results never depended on it).

Backward (``topk_attention_backward``): the selection is re-run by the same kernel (so it picks
the same keys as the forward), then a per-query kernel recomputes the k scores and applies the
softmax backward (``backward.py`` has the formulas). The gradient of a floating ``attn_mask``
is not computed here (the torch backward does that).

Masks: bool masks become additive (0 / -inf) in the compute dtype; any broadcast shape is read
by strides. Scores and softmax run in float32 (float64 for float64 inputs).

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), attn_mask rank 4 broadcastable
to (B, H, Nq, Nk) → (B, H, Nq, Dv).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from clusterfx.ops.common import native
from clusterfx.ops.common.checks import compute_dtype

_INTS = ("B", "H", "Hk", "Nq", "Nk", "D", "Dv", "topk", "threads", "is_double", "causal",
         "mB", "mH", "mQ", "mK")
_PTRS = ("q", "k", "v", "mask", "out", "idx", "grad_out", "dq", "dk", "dv")


class _Args(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in _INTS] + [("scale", ctypes.c_double)]
                + [(n, ctypes.c_void_p) for n in _PTRS])


LIB = native.Library("topk", [Path(__file__).resolve().parent / "csrc" / "topk.cpp"],
                     {"cfx_topk_forward": [ctypes.c_void_p],
                      "cfx_topk_backward": [ctypes.c_void_p]})


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A rank-4 mask as an additive one in ``dtype`` (bool: 0 where True, -inf where False)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _args(q, k, v, mask, topk, is_causal, scale, **tensors) -> _Args:
    B, H, Nq, D = q.shape
    strides = (0, 0, 0, 0)
    if mask is not None:  # broadcast dims read with stride 0
        strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    args = _Args(B=B, H=H, Hk=k.shape[1], Nq=Nq, Nk=k.shape[2], D=D, Dv=v.shape[-1],
                 topk=min(topk, k.shape[2]), threads=native.threads(),
                 is_double=int(q.dtype == torch.float64), causal=int(is_causal),
                 mB=strides[0], mH=strides[1], mQ=strides[2], mK=strides[3], scale=float(scale))
    for name, t in dict(q=q, k=k, v=v, mask=mask, **tensors).items():
        setattr(args, name, native.ptr(t))
    return args


def _prepare(q, k, v, attn_mask):
    cdt = compute_dtype(q)
    q, k, v = (t.to(cdt).contiguous() for t in (q, k, v))
    return q, k, v, _additive(attn_mask, cdt)


def topk_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       scale: float) -> torch.Tensor:
    """Top-k attention (arguments validated by the public op). Shapes: module docstring."""
    dtype = q.dtype
    q, k, v, mask = _prepare(q, k, v, attn_mask)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    LIB.load().cfx_topk_forward(ctypes.byref(_args(q, k, v, mask, topk, is_causal, scale,
                                                   out=out)))
    return out.to(dtype)


def topk_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, attn_mask: torch.Tensor | None, *, topk: int,
                            is_causal: bool, scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) with the selection held fixed, in the inputs' dtypes."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, mask = _prepare(q, k, v, attn_mask)
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    idx = torch.empty(B, H, Nq, min(topk, Nk), dtype=torch.int64)
    lib = LIB.load()
    lib.cfx_topk_forward(ctypes.byref(_args(q, k, v, mask, topk, is_causal, scale, idx=idx)))
    g = grad_out.to(q.dtype).contiguous()
    dq = torch.empty_like(q)
    dk = q.new_empty(B, H, Nk, D)  # per query head; GQA groups summed below
    dv = q.new_empty(B, H, Nk, Dv)
    lib.cfx_topk_backward(ctypes.byref(_args(q, k, v, mask, topk, is_causal, scale, idx=idx,
                                             grad_out=g, dq=dq, dk=dk, dv=dv)))
    if H != Hk:
        dk = dk.view(B, Hk, H // Hk, Nk, D).sum(2)
        dv = dv.view(B, Hk, H // Hk, Nk, Dv).sum(2)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])
