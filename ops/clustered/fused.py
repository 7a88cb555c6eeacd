"""Fused CPU clustered and improved-clustered attention (impl="cpu"): ``csrc/clustered.cpp``.

Same math as ``reference.py`` (notation there) and ``cpu.py`` (the vectorised torch path,
impl="torch"). One call runs every (batch, head) row in one OpenMP parallel region, a row per
work item: centroid means, then the centroid attention by blocks of keys with a running softmax
(BLAS GEMMs, a vectorised exp; no C×Nk matrix), then the broadcast back to the queries; for
i-clustered the top-k keys of every centroid row are selected while the key blocks stream by,
and each cluster's members attend to its k keys with two small GEMMs. The clustered backward
(``clustered_attention_backward``) is fused the same way; i-clustered's backward runs the
vectorised torch recompute (see ``registration.attention_grads``).

fp16/bf16 inputs are computed in float32 and returned in their dtype; float64 in float64. A
batch element without a valid key gets zeros (and zero gradients).

Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), assignments (B,H,Nq) int64 in [0, C),
key_padding_mask (B,Nk) bool (True = keep) → (B,H,Nq,Dv); top-k indices (B,H,C,min(topk, Nk)).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from clusterfx.ops.common import native
from clusterfx.ops.common.checks import compute_dtype

_INTS = ("B", "H", "Hk", "Nq", "Nk", "D", "Dv", "C", "topk", "threads", "is_double")
_PTRS = ("q", "k", "v", "assign", "mask", "out", "idx_out", "grad_out", "dq", "dk", "dv")


class _Args(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in _INTS] + [("scale", ctypes.c_double)]
                + [(n, ctypes.c_void_p) for n in _PTRS])


LIB = native.Library("clustered", [Path(__file__).resolve().parent / "csrc" / "clustered.cpp"],
                     {"cfx_clustered_forward": [ctypes.c_void_p],
                      "cfx_clustered_backward": [ctypes.c_void_p]})


def _prepare(q, k, v, assignments, key_padding_mask):
    cdt = compute_dtype(q)
    q, k, v = (t.to(cdt).contiguous() for t in (q, k, v))
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    return cdt, q, k, v, assignments.contiguous(), mask


def _args(q, k, v, assignments, mask, clusters, scale, topk=0, **tensors) -> _Args:
    B, H, Nq, D = q.shape
    args = _Args(B=B, H=H, Hk=k.shape[1], Nq=Nq, Nk=k.shape[2], D=D, Dv=v.shape[-1],
                 C=clusters, topk=topk, threads=native.threads(),
                 is_double=int(q.dtype == torch.float64), scale=float(scale))
    for name, t in dict(q=q, k=k, v=v, assign=assignments, mask=mask, **tensors).items():
        setattr(args, name, native.ptr(t))
    return args


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def clustered_attention_from_assignments(q, k, v, assignments, clusters, key_padding_mask=None,
                                         scale=None):
    """Clustered attention ``O = M softmax(s·Q^c Kᵀ + β) V``. Shapes: module docstring."""
    dtype = q.dtype
    cdt, q, k, v, a, mask = _prepare(q, k, v, assignments, key_padding_mask)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    LIB.load().cfx_clustered_forward(ctypes.byref(
        _args(q, k, v, a, mask, clusters, _scale(q, scale), out=out)))
    return out.to(dtype)


def improved_clustered_attention_from_assignments(q, k, v, assignments, clusters,
                                                  key_padding_mask=None, scale=None, topk=32):
    """i-clustered attention and the top-k key indices of every cluster (reference §1.2).

    Shapes: module docstring → (B,H,Nq,Dv), indices (B,H,C,min(topk, Nk)) int64."""
    dtype = q.dtype
    cdt, q, k, v, a, mask = _prepare(q, k, v, assignments, key_padding_mask)
    kk = min(topk, k.shape[2])
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    idx = torch.empty(*q.shape[:2], clusters, kk, dtype=torch.int64)
    LIB.load().cfx_clustered_forward(ctypes.byref(
        _args(q, k, v, a, mask, clusters, _scale(q, scale), topk=kk, out=out, idx_out=idx)))
    return out.to(dtype), idx


def clustered_attention_backward(grad_out, q, k, v, assignments, clusters, key_padding_mask=None,
                                 scale=None):
    """(dq, dk, dv) of clustered attention with the assignments held fixed, in the inputs'
    dtypes. Shapes: grad_out (B,H,Nq,Dv); the rest as the module docstring."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    cdt, q, k, v, a, mask = _prepare(q, k, v, assignments, key_padding_mask)
    g = grad_out.to(cdt).contiguous()
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dq = torch.empty_like(q)
    dk = q.new_empty(B, H, Nk, D)  # per query head; GQA groups are summed below
    dv = q.new_empty(B, H, Nk, Dv)
    LIB.load().cfx_clustered_backward(ctypes.byref(
        _args(q, k, v, a, mask, clusters, _scale(q, scale), grad_out=g, dq=dq, dk=dk, dv=dv)))
    if H != Hk:
        dk = dk.view(B, Hk, H // Hk, Nk, D).sum(2)
        dv = dv.view(B, Hk, H // Hk, Nk, Dv).sum(2)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])
