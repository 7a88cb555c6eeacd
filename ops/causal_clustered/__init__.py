"""Causal clustered and i-clustered attention: clustered attention for decoders, with no
leak from the future, ever.

Why a new design: clustered attention (``clusterfx.ops.clustered``) pools *queries* — a
centroid row mixes queries of different positions, so query i's output would depend on later
queries. Here queries are never pooled; the approximation is on the key side, and every
statistic a query uses comes from positions before its block (or from itself).

Design (b = ``block``, C = ``clusters``, s the scale; query i is in block β = ⌊i/b⌋ with start
σ = β·b; "valid" = not padded)::

    local  L_i = {valid j : σ ≤ j ≤ i}            exact logits  ℓ_ij = s·q_i·k_j
    far    F_i = {valid j : j < σ}                 through key clusters (below)
    i-clustered only: T_i ⊆ F_i, |T_i| ≤ k          exact logits  ℓ_ij = s·q_i·k_j
    for every cluster c, the far unselected members R_ic = {j ∈ F_i \\ T_i : a(j) = c},
    n = |R_ic|, k̄ = mean of their keys, their logit  s·q_i·k̄  each (mass n·e^{s·q_i·k̄}):

    out_i = [Σ_{L∪T} e^{ℓ_ij} v_j + Σ_c e^{s·q_i·k̄_ic} Σ_{j∈R_ic} v_j]
            / [Σ_{L∪T} e^{ℓ_ij} + Σ_c |R_ic|·e^{s·q_i·k̄_ic}]

merged by log-sum-exp. The far field of block β is a prefix sum over the blocks before it of
per-block cluster sums (Σ k, Σ v, counts), so it costs O(C) per query, not O(i).

Clustering, in epochs: blocks [1, 2), [2, 4), [4, 8), … form epochs; at the start of epoch
[r, 2r) the codebooks are updated from the positions before block r only (mini-batch k-means:
the positions new since the last update join, empty clusters are seeded with them in a seeded
random order, then ``iterations`` rounds of (cluster means / majority codes from every
member; reassign the new positions) and ``refine`` rounds of Lloyd in the metric, each kind
stopping at a fixed point). Then every key of the epoch's blocks joins its nearest cluster
(clusters still empty are given to the epoch's keys in (block, priority) order), and block β
of the epoch reads the cluster sums of the keys before it under that assignment. So the
clustering is O(log N) batched steps of O(N·C) work in all. ``clustering="hamming"`` assigns
by the Hamming distance of LSH codes (``bits`` hyperplanes on ``(x - μ)L``, μ the mean of the
positions before the epoch, L Lᵀ = M) to the clusters' majority codes; ``"kmeans"`` by
``(x - c)ᵀ M (x - c)``. Keys use M = the second moment of the queries before the epoch
(``metric="attention"``: keys are close when every query gives them similar logits) or I
(``"euclidean"``). Centroids for the attention are always the plain means.

Selection (i-clustered): queries are clustered the same way (metric: the covariance of the
keys before the epoch), and each query of an epoch is assigned to the nearest of its codebook's
clusters (never seeding one: a centroid must not be a later query). For block β and query
cluster c, T_βc = the ``topk`` far keys with the highest ``s·Q̄_c·k_j``; query i uses
T_{β, a(i)}. The codebook is fixed within an epoch, so T_βc is kept up to date by merging the
keys of block β-1 into T_{β-1,c}: linear time.

Causality (the proof the perturbation tests check, bit for bit, in float64): the output of
query i (block β of epoch [r, 2r)) reads q_i; keys/values at positions ≤ i of its block; the
keys/values before σ with their cluster assignment; the selection of (β, a(i)); the epoch's
query codebook. The codebooks are built from positions before r·b ≤ σ; a far key of block
β' ∈ [r, β) is assigned with them (and, if seeded, by its place among the epoch's keys of
blocks ≤ β'); the selection scores keys before σ. Nothing a query reads is computed from a
later position; padded positions take part in nothing.

``causal=False`` (a decoder's cross-attention, whose keys are the encoder's and visible to all
queries, while the *query* stream is causal): there is no local block; F_i = every valid key;
the keys are clustered once, in the Euclidean geometry (a query metric would pool positions);
the first query block has no query codebook yet, so it gets no selected keys.

Exactness: ``block >= N`` is dense causal attention; C at least the number of valid keys gives
one key per cluster, i.e. dense attention; ``topk`` at least the number of far keys makes every
far key exact (blocks after the first).

Memory O(N·(b + C + k)) per (batch, head); no Nq×Nk matrix in the ``cpu`` implementation.
Compute per (batch, head): local N·b/2·(D + Dv), far 2·N·C·(D + Dv), clustering
~(iterations + refine + 1)·N·C·D, selection ~4·N·C·D, top-k 2·N·k·(D + Dv) (i-clustered).
fp16/bf16 run in float32 and return their dtype; float64 runs in float64. GQA: query head h
reads key/value head h // (H/Hk); key clusters are per key head. Seeds as the clustered family
(``seed=-1``: torch's global RNG; otherwise one generator draws everything up front).

Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), key_padding_mask (B,Nk) bool (True =
keep) → out (B,H,Nq,Dv) in q's dtype. ``causal=True`` needs Nq = Nk (self-attention, top-left
aligned as SDPA's ``is_causal``).
"""

from __future__ import annotations

import torch

from clusterfx.ops.causal_clustered import checks, conditional, registration
from clusterfx.ops.causal_clustered.conditional import (
    PATHS,
    causal_conditional_forward,
    mask_structure,
)
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common.telemetry import counters

__all__ = ["PATHS", "ClusteringSpec", "causal_clustered_attention",
           "causal_clustered_attention_from_choices", "causal_conditional_forward",
           "causal_improved_clustered_attention", "conditional", "counters", "mask_structure"]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is None:  # head dim 0: every score is 0 whatever the scale
        return float(q.shape[-1] ** -0.5) if q.shape[-1] else 1.0
    return float(scale)


def causal_clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               clusters: int, block: int = 128, causal: bool = True,
                               key_padding_mask: torch.Tensor | None = None,
                               scale: float | None = None, iterations: int = 5, bits: int = 63,
                               seed: int = -1, clustering: str = "hamming", refine: int = 1,
                               metric: str = "attention", impl: str = "auto",
                               return_choices: bool = False):
    """Causal clustered attention (module docstring): exact inside each query's block up to
    itself, C key-cluster centroids of the earlier blocks beyond it.

    ``return_choices``: also return (key_assign, query_assign, topk_idx), the discrete
    choices, for ``causal_clustered_attention_from_choices``.

    Shapes: see the module docstring → (B, H, Nq, Dv).
    """
    return _call(q, k, v, clusters, block, causal, key_padding_mask, scale, iterations, bits,
                 seed, clustering, refine, metric, 0, impl, return_choices)


def causal_improved_clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                        clusters: int, topk: int = 32, block: int = 128,
                                        causal: bool = True,
                                        key_padding_mask: torch.Tensor | None = None,
                                        scale: float | None = None, iterations: int = 5,
                                        bits: int = 63, seed: int = -1,
                                        clustering: str = "hamming", refine: int = 1,
                                        metric: str = "attention", impl: str = "auto",
                                        return_choices: bool = False):
    """Causal i-clustered attention: ``causal_clustered_attention`` plus exact attention to
    ``topk`` far keys per query, those its causal query cluster's centroid scores highest.

    Shapes: see the module docstring → (B, H, Nq, Dv).
    """
    checks.check_topk(topk)
    if topk < 1:
        raise ValueError(f"topk ({topk}) must be >= 1 for i-clustered attention; use "
                         f"causal_clustered_attention for none")
    return _call(q, k, v, clusters, block, causal, key_padding_mask, scale, iterations, bits,
                 seed, clustering, refine, metric, topk, impl, return_choices)


def _call(q, k, v, clusters, block, causal, mask, scale, iterations, bits, seed, clustering,
          refine, metric, topk, impl, return_choices):
    checks.check_inputs(q, k, v, mask, scale, causal)
    spec = ClusteringSpec(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_block(block)
    registration.resolve(impl)
    out, ka, qa, idx = torch.ops.clusterfx.causal_clustered_attention(
        q, k, v, mask, _scale(q, scale), *spec.to_args(), topk, block, causal, impl)
    return (out, (ka, qa, idx)) if return_choices else out


def causal_clustered_attention_from_choices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                            key_assign: torch.Tensor,
                                            query_assign: torch.Tensor,
                                            topk_idx: torch.Tensor, clusters: int, *,
                                            block: int = 128, causal: bool = True,
                                            key_padding_mask: torch.Tensor | None = None,
                                            scale: float | None = None,
                                            impl: str = "auto") -> torch.Tensor:
    """The attention for given discrete choices: key assignments (B,Hk,Nk) in [0, C), query
    assignments (B,H,Nq), top-k indices (B,H,ceil(Nq/block),C,k) (-1: none; a (block,
    cluster) row's entries distinct; entries that are not far keys of the block are ignored;
    k = 0 for clustered). Differentiable in q, k, v.

    Shapes: as above → (B, H, Nq, Dv).
    """
    checks.check_inputs(q, k, v, key_padding_mask, scale, causal)
    checks.check_choices(key_assign, query_assign, topk_idx, q, k, clusters, block, causal)
    registration.resolve(impl)
    return torch.ops.clusterfx.causal_clustered_attention_from_choices(
        q, k, v, key_padding_mask, key_assign, query_assign, topk_idx, clusters,
        _scale(q, scale), block, causal, impl)
