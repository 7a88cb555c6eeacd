"""Argument validation of the clustering family (the generic checks live once, in
``clusterfx.ops.common.checks``; this module adds the clustering-specific ones).

Every check raises ``ValueError`` naming the offending value and what would be accepted, and runs
before any work is done. They read shapes, dtypes and Python scalars only, never tensor data.
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import check_bits

CLUSTERINGS = ("hamming", "kmeans")
METRICS = ("attention", "euclidean")


def check_hashes(hashes: torch.Tensor) -> None:
    if not isinstance(hashes, torch.Tensor) or hashes.dtype != torch.int64 or hashes.dim() < 1:
        got = f"{hashes.dtype}, rank {hashes.dim()}" if isinstance(hashes, torch.Tensor) else hashes
        raise ValueError(f"hashes ({got}) must be an int64 tensor of shape (..., N)")


def check_planes(planes: torch.Tensor, dim: int) -> None:
    if not isinstance(planes, torch.Tensor) or planes.dim() != 2 or planes.shape[1] != dim + 1:
        got = tuple(planes.shape) if isinstance(planes, torch.Tensor) else planes
        raise ValueError(f"planes ({got}) must have shape (bits, {dim + 1}) for inputs of "
                         f"dim {dim}")
    check_bits(planes.shape[0])
    if not planes.is_floating_point():
        raise ValueError(f"planes.dtype ({planes.dtype}) must be floating point")


def check_clustering(clustering) -> None:
    if clustering not in CLUSTERINGS:
        raise ValueError(f"clustering ({clustering!r}) must be one of {CLUSTERINGS}")


def check_metric_name(metric) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric ({metric!r}) must be one of {METRICS}")
