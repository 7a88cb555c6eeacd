"""Clustered and improved-clustered (i-clustered) attention (Vyas et al., NeurIPS 2020).

Per (batch, head) the queries are grouped into C clusters (LSH + Hamming k-means, or Euclidean
k-means; see ``clusterfx.ops.clustering``), and attention is computed once per centroid::

    Q^c_j = mean_{i: a(i)=j} q_i,   A^c = softmax(s·Q^c Kᵀ + β),   O_i = (A^c V)_{a(i)}

i-clustered additionally lets each query attend exactly to its cluster's top-k keys T_j, rescaled
to the centroid's mass on them, ``m̂_j = Σ_{l∈T_j} A^c_jl``::

    A^t_il = m̂_j · softmax_{l∈T_j}(s·q_i·k_l + β_l)  (l ∈ T_j),   A^t_il = A^c_jl  (l ∉ T_j)

Conventions: ``s`` defaults to D**-0.5; β_l = -inf on padded keys (``key_padding_mask`` False);
a batch element whose keys are all padded gets a zero output (documented, never NaN); GQA: query
head h reads key/value head ``h // (H / Hk)``; Nq ≠ Nk (cross-attention) is fine. fp16/bf16
inputs are computed in float32 and returned in their dtype; float64 is computed in float64.

Backends (``impl``): "reference" (oracle, materialises Nq×Nk), "cpu" (vectorised torch, O(N·C)
memory), "triton" (``triton.py`` around the kernels of ``triton_kernels.py``, CUDA or
TRITON_INTERPRET=1),
"auto" (triton on CUDA, cpu otherwise). An explicit impl never falls back. Each function is a
``torch.library`` custom op (``torch.ops.clusterfx.*``) with a fake kernel and autograd, so it
compiles as one opaque node; hashing, k-means and top-k selection get no gradient.

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), key_padding_mask (B, Nk) bool,
assignments (B, H, Nq) int64 → out (B, H, Nq, Dv) in q's dtype.
"""

from __future__ import annotations

import torch

from clusterfx.ops.clustered import checks, conditional, registration  # noqa: F401 - the ops
from clusterfx.ops.clustered.conditional import METHODS, PATHS, conditional_forward, key_padding
from clusterfx.ops.clustered.fused import LIB as NATIVE_LIBRARY  # the fused kernels
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common.telemetry import counters

__all__ = ["METHODS", "NATIVE_LIBRARY", "PATHS", "ClusteringSpec", "clustered_attention",
           "clustered_attention_from_assignments", "conditional_forward", "counters",
           "improved_clustered_attention",
           "improved_clustered_attention_from_assignments", "key_padding"]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    return 1.0 if q.shape[-1] == 0 else float(q.shape[-1] ** -0.5)  # D = 0: scores are 0


def clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, clusters: int,
                        key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                        iterations: int = 5, bits: int = 63, seed: int = -1,
                        clustering: str = "hamming", refine: int = 1,
                        metric: str = "attention", impl: str = "auto") -> torch.Tensor:
    """Clustered attention: cluster the queries, attend once per centroid, broadcast back.

    ``clusters`` larger than Nq is clamped (with a warning). ``seed`` seeds the hyperplanes and
    k-means (``-1``: torch's global RNG). ``clustering``: "hamming" (LSH with ``bits`` bits, then
    ``iterations`` of Hamming k-means; the paper's method) or "kmeans" (Euclidean). ``metric``:
    the geometry of the clustering — "attention" (the keys' covariance, see
    ``clustering.attention_metric``) or "euclidean" (the raw queries, as the paper). ``refine``:
    Lloyd steps in that geometry after the clustering.

    Shapes: see the module docstring → (B, H, Nq, Dv).
    """
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    spec = ClusteringSpec(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_impl(impl)
    return torch.ops.clusterfx.clustered_attention(
        q, k, v, key_padding_mask, _scale(q, scale), *spec.to_args(), impl)[0]


def improved_clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                 clusters: int, topk: int = 32,
                                 key_padding_mask: torch.Tensor | None = None,
                                 scale: float | None = None, iterations: int = 5,
                                 bits: int = 63, seed: int = -1, clustering: str = "hamming",
                                 refine: int = 1, metric: str = "attention",
                                 impl: str = "auto") -> torch.Tensor:
    """i-clustered attention: clustered attention plus exact attention to each cluster's top-k
    keys (``topk`` is clamped to Nk). Other arguments as ``clustered_attention``.

    Shapes: see the module docstring → (B, H, Nq, Dv).
    """
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    spec = ClusteringSpec(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_topk(topk)
    checks.check_impl(impl)
    return torch.ops.clusterfx.improved_clustered_attention(
        q, k, v, key_padding_mask, _scale(q, scale), *spec.to_args(), topk, impl)[0]


def clustered_attention_from_assignments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                         assignments: torch.Tensor, clusters: int,
                                         key_padding_mask: torch.Tensor | None = None,
                                         scale: float | None = None,
                                         impl: str = "auto") -> torch.Tensor:
    """Clustered attention for given cluster ``assignments`` (values in [0, clusters)).

    Shapes: assignments (B, H, Nq) int64; the rest as the module docstring → (B, H, Nq, Dv).
    """
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    checks.check_assignments_meta(assignments, q, clusters)
    checks.check_impl(impl)
    return torch.ops.clusterfx.clustered_attention_from_assignments(
        q, k, v, assignments, key_padding_mask, clusters, _scale(q, scale), impl)


def improved_clustered_attention_from_assignments(q: torch.Tensor, k: torch.Tensor,
                                                  v: torch.Tensor, assignments: torch.Tensor,
                                                  clusters: int, key_padding_mask=None,
                                                  scale: float | None = None, topk: int = 32,
                                                  impl: str = "auto") -> torch.Tensor:
    """i-clustered attention for given cluster ``assignments`` (top-k chosen inside).

    Shapes: assignments (B, H, Nq) int64; the rest as the module docstring → (B, H, Nq, Dv).
    """
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    checks.check_assignments_meta(assignments, q, clusters)
    checks.check_topk(topk)
    checks.check_impl(impl)
    return torch.ops.clusterfx.improved_clustered_attention_from_assignments(
        q, k, v, assignments, key_padding_mask, clusters, topk, _scale(q, scale), impl)[0]
