"""Fused CPU query clustering (impl="cpu"): the C++ kernels of ``csrc/clustering.cpp``.

Same contract and results as ``reference.py`` and ``cpu.py`` (the vectorised torch path,
impl="torch"), given the same random plan, which the public API draws. One call clusters every
(batch, head) row in one OpenMP parallel region, a row at a time per thread: hash (or the metric
map), k-means and the Lloyd steps run back to back on data that stays in cache, with packed
64-bit codes and popcount distances for Hamming k-means and BLAS GEMMs for the projections and
the Euclidean/Lloyd distances. The metric root (``clustering.metric_root``) is taken inside the
kernel from LAPACK ``dsyevd`` in float64, per row, single-threaded; without torch's LAPACK
symbols the caller passes the root in instead.

Precision: float64 inputs hash and cluster in float64, all others in float32; the Lloyd steps
run in float32 (as ``clustering.lloyd_refine``).

Shapes: x (R, N, D); planes (bits, D+1); root / metric (R, D, D); masks (R, N) bool;
init_idx (R, C), reseed_idx (iterations-1, R, C), active (R, C) →
assignments (R, N) int64, counts (R, C) int64.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from clusterfx.ops.common import native

_INTS = ("R", "N", "D", "C", "bits", "iterations", "refine", "threads", "mode", "is_double")
_PTRS = ("x", "x32", "planes", "root", "metric_src", "metric", "centre_mask", "valid",
         "init_idx", "reseed_idx", "active", "codes_in", "codes_out", "assign_out",
         "counts_out")
HAMMING, EUCLIDEAN, HASH_ONLY, CODES_KMEANS = range(4)


class _Args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in _INTS] + [(n, ctypes.c_void_p) for n in _PTRS]


LIB = native.Library("clustering", [Path(__file__).resolve().parent / "csrc" / "clustering.cpp"],
                     {"cfx_cluster": [ctypes.c_void_p]})


def _work(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _c(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Contiguous CPU tensor (in ``dtype`` when given), or None."""
    if t is None:
        return None
    return (t if dtype is None else t.to(dtype)).contiguous()


def _run(mode: int, R: int, N: int, D: int, C: int, bits: int, iterations: int, refine: int,
         **tensors: torch.Tensor | None) -> None:
    args = _Args(R=R, N=N, D=D, C=C, bits=bits, iterations=iterations, refine=refine,
                 threads=native.threads(), mode=mode,
                 is_double=int(any(t is not None and t.dtype == torch.float64
                                   for k, t in tensors.items() if k in ("x", "planes"))))
    for name, t in tensors.items():
        setattr(args, name, native.ptr(t))
    LIB.load().cfx_cluster(ctypes.byref(args))


def _plan_tensors(init_idx, reseed_idx, active):
    return dict(init_idx=_c(init_idx, torch.int64), reseed_idx=_c(reseed_idx, torch.int64),
                active=_c(active, torch.bool))


def lsh_hash(x: torch.Tensor, planes: torch.Tensor, root: torch.Tensor | None = None,
             centre_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Packed hash codes (contract: ``cpu.lsh_hash``). x (..., N, D) → (..., N) int64."""
    *batch, N, D = x.shape
    w = _work(x)
    xr = _c(x.reshape(-1, N, D), w)
    R = xr.shape[0]
    codes = torch.empty(R, N, dtype=torch.int64)
    root_r = None if root is None else _c(root.expand(*batch, D, D).reshape(R, D, D), w)
    centre = None if centre_mask is None or root is None else _c(
        centre_mask.expand(*batch, N).reshape(R, N))
    _run(HASH_ONLY, R, N, D, 1, planes.shape[0], 1, 0, x=xr, planes=_c(planes, w), root=root_r,
         centre_mask=centre, codes_out=codes)
    return codes.view(*batch, N)


def hamming_kmeans(hashes: torch.Tensor, init_idx: torch.Tensor, reseed_idx: torch.Tensor,
                   active: torch.Tensor, valid: torch.Tensor,
                   bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hamming k-means on packed codes (contract: ``reference.hamming_kmeans``).

    Shapes: hashes (R, N) int64 → assignments (R, N), counts (R, C)."""
    R, N = hashes.shape
    C = init_idx.shape[-1]
    a = torch.empty(R, N, dtype=torch.int64)
    c = torch.empty(R, C, dtype=torch.int64)
    _run(CODES_KMEANS, R, N, 0, C, bits, reseed_idx.shape[0] + 1, 0, codes_in=_c(hashes),
         valid=_c(valid, torch.bool), assign_out=a, counts_out=c,
         **_plan_tensors(init_idx, reseed_idx, active))
    return a, c


def euclidean_kmeans(x: torch.Tensor, init_idx: torch.Tensor, reseed_idx: torch.Tensor,
                     active: torch.Tensor,
                     valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means (contract: ``reference.euclidean_kmeans``). x (R, N, D)."""
    R, N, D = x.shape
    C = init_idx.shape[-1]
    a = torch.empty(R, N, dtype=torch.int64)
    c = torch.empty(R, C, dtype=torch.int64)
    _run(EUCLIDEAN, R, N, D, C, 1, reseed_idx.shape[0] + 1, 0, x=_c(x, _work(x)),
         valid=_c(valid, torch.bool), assign_out=a, counts_out=c,
         **_plan_tensors(init_idx, reseed_idx, active))
    return a, c


def cluster_queries(x: torch.Tensor, clustering: str, bits: int, planes: torch.Tensor | None,
                    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor], refine: int,
                    metric: torch.Tensor | None = None, root: torch.Tensor | None = None,
                    centre_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash (or map) + k-means + ``refine`` Lloyd steps, in one call (``cluster_queries``).

    ``metric`` (R, D, D): the geometry; its root is taken in the kernel unless ``root`` is
    given. Shapes: x (R, N, D), centre_mask (R, N) → assignments (R, N), counts (R, C).
    """
    R, N, D = x.shape
    C = plan[0].shape[-1]
    w = _work(x)
    xr = _c(x, w)
    a = torch.empty(R, N, dtype=torch.int64)
    c = torch.empty(R, C, dtype=torch.int64)
    metric_src = None
    if metric is not None and root is None:
        metric_src = _c(metric, w)
    x32 = None
    if refine:
        x32 = xr if w == torch.float32 else _c(xr, torch.float32)
    mode = HAMMING if clustering == "hamming" else EUCLIDEAN
    _run(mode, R, N, D, C, bits, plan[1].shape[0] + 1, refine, x=xr, x32=x32,
         planes=_c(planes, w), root=_c(root, w), metric_src=metric_src,
         metric=None if metric is None or not refine else _c(metric, torch.float32),
         centre_mask=None if metric is None else _c(centre_mask), assign_out=a,
         counts_out=c, **_plan_tensors(*plan))
    return a, c
