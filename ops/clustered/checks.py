"""Argument validation for the clustered-attention ops (ValueError naming the value, before any
work). Shape/dtype checks only read metadata, so they also run on fake tensors while tracing."""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import (
    NATIVE_IMPLS,
    check_key_value_attention,
    check_positive_int,
)
from clusterfx.ops.common.checks import (
    check_impl as _check_impl,
)


def check_attention_inputs(q, k, v, key_padding_mask, scale) -> None:
    """q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv) of one float dtype and device, H a
    multiple of Hk, key_padding_mask None or bool (B,Nk), scale None or a finite number.
    Zero-size dims are accepted: the ops answer them as exact attention does
    (ops/common/degenerate.py)."""
    check_key_value_attention(q, k, v, key_padding_mask, scale)


def clamped_clusters(clusters: int, q) -> int:
    """Clusters actually used: at most one per query, so that no buffer is sized by a
    requested C larger than Nq (`clusters=10**7` on 16 queries). Works on SymInts."""
    nq = q.shape[2]
    return torch.sym_min(clusters, max(nq, 1)) if isinstance(nq, torch.SymInt) else min(
        clusters, max(nq, 1))


def spare_clusters(clusters: int, q) -> int:
    """Clusters the clustering ops work with: `clamped_clusters` plus the spare cluster that
    holds the queries kept out of the clustering (ops/clustered/nonfinite.py)."""
    return clamped_clusters(clusters, q) + 1


def check_impl(impl) -> None:
    """One of ``NATIVE_IMPLS``: "auto", "reference", "cpu" (fused C++), "torch", "triton"."""
    _check_impl(impl, NATIVE_IMPLS)


def check_topk(topk) -> None:
    check_positive_int("topk", topk)


def check_assignments_meta(assignments, q, clusters) -> None:
    """assignments is int64 with q's (B, H, Nq); clusters is a positive int."""
    check_positive_int("clusters", clusters)
    if not isinstance(assignments, torch.Tensor) or assignments.dtype != torch.int64:
        got = assignments.dtype if isinstance(assignments, torch.Tensor) else assignments
        raise ValueError(f"assignments ({got}) must be an int64 tensor")
    if tuple(assignments.shape) != tuple(q.shape[:3]):
        raise ValueError(f"assignments has shape {tuple(assignments.shape)}; "
                         f"expected {tuple(q.shape[:3])} (B, H, Nq)")


def check_assignments_values(assignments, clusters) -> None:
    """Every assignment lies in [0, clusters) (reads the data: eager only)."""
    lo, hi = int(assignments.min()), int(assignments.max())
    if lo < 0 or hi >= clusters:
        bad = lo if lo < 0 else hi
        raise ValueError(f"assignments contain {bad}; expected values in [0, {clusters})")

__all__ = ["check_assignments_meta", "check_assignments_values", "check_attention_inputs",
           "check_impl", "check_topk"]
