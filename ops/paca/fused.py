"""The fused CPU forward of a whole patch-to-cluster attention layer (``paca_layer``'s
impl="cpu"): the C++ kernels of ``csrc/paca.cpp``, for inference.

- ``cluster_side(x, grid, dw, hidden, logits, prior)``: per tile of patches, on one thread and
  in its cache, the clustering head (depthwise k×k + GELU, hidden linear + GELU, linear to M
  logits, + prior), exponentiated against the tile's own maxima, with per-tile column sums and
  E^T X; the tiles merge as in online softmax (the softmax over all N patches) -> (z (B, M, N),
  z x).
- ``projected_attention(x, wq, bq, k, v, wo, bo, heads, scale)``: for x (B, N, Cin) and M
  cluster keys and values k (B, M, H·D), v (B, M, H·Dv)::

      out = concat_h( softmax(scale (x Wqᵀ + bq)_h k_hᵀ) v_h ) Woᵀ + bo        (B, N, Cout)

  per tile of queries: the query projection, per head the scores, softmax and ``P V`` (two
  GEMMs), the output projection; k and v are read in place by strides (the two halves of a
  fused kv projection).
- ``layer_forward``: the two around the M-row LayerNorm and kv projection (torch).

No (B, H, N, D) transposes, no N-sized intermediate but the (B, N, M) assignment, a few
parallel regions per call. Forward only, no autograd: ``available_for`` is False where a
gradient is wanted (or under torch.compile tracing); ``paca_layer`` then runs the torch form.
float32 and float64; equal to the torch form up to rounding (tests/ops/test_paca_layer.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from clusterfx.ops.common import native

_INTS = ("B", "N", "H", "D", "Dv", "M", "Cin", "Cout", "tile", "threads", "is_double", "xB",
         "xN", "kB", "kM", "vB", "vM", "oB", "oN")
_PTRS = ("x", "k", "v", "wq", "bq", "wo", "bo", "out")
DTYPES = (torch.float32, torch.float64)
TILE = 512  # rows (patches or queries) per work item, about (see _tile)


class _Args(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in _INTS] + [("scale", ctypes.c_double)]
                + [(n, ctypes.c_void_p) for n in _PTRS])


_CLUSTER_INTS = ("B", "N", "C", "Hg", "Wg", "M", "C1", "K", "tile", "threads", "is_double")
_CLUSTER_PTRS = ("x", "dw_w", "dw_b", "w1", "b1", "w2", "b2", "prior", "zt", "zx")


class _ClusterArgs(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in _CLUSTER_INTS]
                + [(n, ctypes.c_void_p) for n in _CLUSTER_PTRS])


LIB = native.Library("paca", [Path(__file__).resolve().parent / "csrc" / "paca.cpp"],
                     {"cfx_paca_clusters": [ctypes.c_void_p],
                      "cfx_paca_queries": [ctypes.c_void_p]})


def available_for(*tensors: torch.Tensor | None) -> bool:
    """Whether the fused kernels can run on these tensors: all on the CPU in one dtype
    among float32 / float64, no gradient wanted, not under torch.compile tracing, and the
    library loads (built by ``python -m clusterfx.ops.build``)."""
    present = [t for t in tensors if t is not None]
    if not present or torch.compiler.is_compiling():
        return False
    dtype = present[0].dtype
    if dtype not in DTYPES or any(t.device.type != "cpu" or t.dtype != dtype for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return LIB.available()


def _tile(batch: int, n: int, threads: int) -> int:
    """Rows per work item: about TILE, with the item count a multiple of the thread count (so
    no thread waits on another's last item) and at least two items per thread."""
    batch = max(1, batch)  # an empty batch runs no item
    items = max(2 * threads, -(-batch * n // TILE))
    items = -(-items // threads) * threads
    per_row = max(1, -(-items // batch))
    return max(1, -(-n // per_row))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def projected_attention(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None,
                        k: torch.Tensor, v: torch.Tensor, wo: torch.Tensor,
                        bo: torch.Tensor | None, heads: int, scale: float) -> torch.Tensor:
    """The query side of a PaCa layer (module docstring): x (B, N, Cin), wq (H·D, Cin), bq
    (H·D), k (B, M, H·D), v (B, M, H·Dv), wo (Cout, H·Dv), bo (Cout) -> (B, N, Cout); head h
    uses columns h·D:(h+1)·D of q and k. Check ``available_for`` first."""
    x, k, v = _rows(x), _rows(k), _rows(v)
    wq, wo = wq.contiguous(), wo.contiguous()
    bq, bo = (None if t is None else t.contiguous() for t in (bq, bo))
    b, n, cin = x.shape
    hd, hdv, cout = wq.shape[0], v.shape[-1], wo.shape[0]
    if (hd % heads or hdv % heads or k.shape[-1] != hd or wq.shape[1] != cin
            or wo.shape[1] != hdv or k.shape[:2] != v.shape[:2] or k.shape[0] != b):
        raise ValueError(f"projected_attention: shapes x {tuple(x.shape)}, wq "
                         f"{tuple(wq.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, wo "
                         f"{tuple(wo.shape)} do not fit {heads} heads")
    out = x.new_empty(b, n, cout)
    threads = native.threads()
    args = _Args(B=b, N=n, H=heads, D=hd // heads, Dv=hdv // heads, M=k.shape[1], Cin=cin,
                 Cout=cout, tile=_tile(b, n, threads), threads=threads,
                 is_double=int(x.dtype == torch.float64), xB=x.stride(0), xN=x.stride(1),
                 kB=k.stride(0), kM=k.stride(1), vB=v.stride(0), vM=v.stride(1),
                 oB=out.stride(0), oN=out.stride(1), scale=float(scale))
    for name, t in dict(x=x, k=k, v=v, wq=wq, bq=bq, wo=wo, bo=bo, out=out).items():
        setattr(args, name, native.ptr(t))
    LIB.load().cfx_paca_queries(ctypes.byref(args))
    return out


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def cluster_side(x: torch.Tensor, grid: tuple[int, int], dw: tuple | None,
                 hidden: tuple | None, logits: tuple, prior: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cluster side of a PaCa layer: x (B, N, C) patches on ``grid`` -> (z (B, M, N), a
    transposed view whose rows sum to 1 over the patches, and z x (B, M, C)).

    The clustering head is ``dw`` = (weight (C, 1, k, k), bias or None): depthwise k×k
    convolution + GELU, or None; ``hidden`` = (weight (C1, C), bias or None): linear + GELU, or
    None; ``logits`` = (weight (M, C1 or C), bias or None); ``prior`` (M, N) is added to the
    logits. Check ``available_for`` first."""
    x = x.contiguous()
    b, n, c = x.shape
    w2, b2 = logits
    m = w2.shape[0]
    zt = x.new_empty(b, n, m)
    zx = x.new_empty(b, m, c)
    threads = native.threads()
    k = 0 if dw is None else dw[0].shape[-1]
    args = _ClusterArgs(B=b, N=n, C=c, Hg=grid[0], Wg=grid[1], M=m,
                        C1=0 if hidden is None else hidden[0].shape[0], K=k,
                        tile=_tile(b, n, threads), threads=threads,
                        is_double=int(x.dtype == torch.float64))
    tensors = dict(x=x, dw_w=None if dw is None else dw[0], dw_b=None if dw is None else dw[1],
                   w1=None if hidden is None else hidden[0],
                   b1=None if hidden is None else hidden[1], w2=w2, b2=b2, prior=prior, zt=zt,
                   zx=zx)
    keep = {name: _c(t) for name, t in tensors.items()}  # alive until the call returns
    for name, t in keep.items():
        setattr(args, name, native.ptr(t))
    LIB.load().cfx_paca_clusters(ctypes.byref(args))
    return zt.mT, zx


def layer_forward(x, grid, kind, head, q, kv, proj, heads, norm, prior):
    """``paca_layer`` on the fused kernels (arguments validated there): the cluster side, the
    M-row LayerNorm and kv projection in torch, the query side."""
    c = x.shape[-1]
    if kind == "conv":
        w_dw, b_dw, w_pw, b_pw, w_out = head
        dw, hidden, logits = (w_dw, b_dw), (w_pw.flatten(1), b_pw), (w_out.flatten(1), None)
    elif kind == "mlp":
        dw, hidden, logits = None, (head[0], head[1]), (head[2], head[3])
    else:
        dw, hidden, logits = None, None, (head[0], None)
    z, pooled = cluster_side(x, grid, dw, hidden, logits, prior)
    if norm is not None:
        pooled = F.layer_norm(pooled, (c,), norm[0], norm[1], norm[2])
    kvt = F.linear(pooled, *kv)  # (B, M, 2C)
    out = projected_attention(x, q[0], q[1], kvt[..., :c], kvt[..., c:], proj[0], proj[1], heads,
                              (c // heads) ** -0.5)
    return out, z
