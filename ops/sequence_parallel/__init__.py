"""Sequence-parallel attention on torch.distributed: Ulysses, Ring, and both (USP).

One sequence of S tokens is spread over u·r ranks (`SeqLayout`: ring blocks of S/r tokens,
each cut into u parts; zigzag pairs chunk i with chunk 2r-1-i for causal balance). An
attention over it runs as::

    q, k, v (B, H, L, D) ──Ulysses all-to-all (sequence ↔ heads)──▶ (B, H/u, S/r, D)
        ──ring attention over the ring group (K/V rotate, blocks merged by log-sum-exp)──▶
    out (B, H/u, S/r, D) ──all-to-all back──▶ (B, H, L, D)

With u = 1 there is no all-to-all; with r = 1 the attention after it is any local attention
(dense, clustered, top-k) on the whole sequence of H/u heads. Clustered attention runs over the
ring too (`usp_clustered_attention`: each ring rank clusters its own block's queries, the
centroids attend all keys by ring attention; `clustered.py`), and so does improved clustered
attention (`topk=`: each centroid's top-k keys kept running across the rotating K/V blocks,
attended exactly per query; `improved.py`). GQA: K/V keep Hk heads when u
divides Hk; when Hk divides u they are replicated to u heads first (the extra all-to-all
traffic is counted), and their gradients summed back.

Every collective is a custom op (`registration`) with a fake kernel and autograd, so compiled
graphs keep them (no graph break); each is bounded by the groups' timeout
(`SequenceParallelTimeout`) and counted in `traffic[tag]` (bytes per collective and phase).

Backward is exact: the ring backward uses the global out and lse, rotates K/V again and
returns the fp32 dK/dV accumulators to their owners.

Clustered attention has two forms over the mesh: `usp_global_clustered_attention` (what a
compiled model runs by default, `SequenceParallel(ring_clustering="global")`; `conditional.py`,
`global_clustered.py`): the clustering of the whole sequence equals one process's with the
same seed and the centroids attend to local keys, merged by all-reduces (K/V never rotate);
and `usp_clustered_attention` ("local"; `clustered.py`): each ring rank clusters its block.

Implementations of the ring's blocks (``impl``): "reference" (plain torch, float64-capable,
materialises each block), "cpu" (PyTorch's fused CPU attention with log-sum-exp; plain torch
on other devices), "auto" = "cpu".

Shapes: q (B, H, N, D), k, v (B, Hk, N, D|Dv); masks over original token positions,
broadcastable to (B, H, S, S), bool (True = attend) or additive.
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import check_positive_int
from clusterfx.ops.sequence_parallel import (
    conditional,  # noqa: F401 - global clustered attention; clustered sites under Ulysses
    registration,  # noqa: F401 - registers the ops
)
from clusterfx.ops.sequence_parallel.common.clusters import ring_metric
from clusterfx.ops.sequence_parallel.common.comm import Groups, SequenceParallelTimeout, traffic
from clusterfx.ops.sequence_parallel.common.layout import (
    LOAD_BALANCES,
    SeqLayout,
    check_load_balance,
)
from clusterfx.ops.sequence_parallel.registration import IMPLS, grad_sync

__all__ = ["IMPLS", "LOAD_BALANCES", "Groups", "SeqLayout", "SequenceParallelTimeout",
           "check_heads", "check_load_balance", "gather", "grad_sync", "heads_to_seq",
           "kv_replication", "local_positions", "ring_attention", "ring_metric",
           "seq_to_heads", "take_local", "traffic", "usp_attention", "usp_clustered_attention",
           "usp_global_clustered_attention"]

_ops = torch.ops.clusterfx


def mesh_args(layout: SeqLayout, groups: Groups) -> tuple:
    """The ``*mesh`` arguments of the ops."""
    return (layout.seq_len, layout.zigzag, *groups.to_args())


def check_heads(heads: int, kv_heads: int, ulysses: int) -> None:
    """Query heads must split over the Ulysses ranks; kv heads split too, or are replicated
    when they divide the degree. ValueError otherwise (before any communication)."""
    if heads % ulysses:
        raise ValueError(f"heads ({heads}) must be divisible by the ulysses degree "
                         f"({ulysses})")
    if kv_heads % ulysses and ulysses % kv_heads:
        raise ValueError(f"kv heads ({kv_heads}) must be divisible by the ulysses degree "
                         f"({ulysses}), or divide it (then they are replicated)")


def kv_replication(kv_heads: int, ulysses: int) -> int:
    """How many copies of each kv head the all-to-all carries (1 unless Hk < u)."""
    return ulysses // kv_heads if kv_heads < ulysses else 1


def local_positions(layout: SeqLayout, groups: Groups, device=None) -> torch.Tensor:
    """Token positions this rank holds, (L,)."""
    return layout.positions(groups.ring_rank(), groups.ulysses_rank(), device)


def take_local(x: torch.Tensor, dim: int, layout: SeqLayout, groups: Groups, *,
               outer: int = 1, inner: int = 1, tag: str = "") -> torch.Tensor:
    """This rank's tokens of a tensor every rank holds whole (no communication; the
    backward all-gathers the gradient)."""
    return _ops.sp_take_local(x, dim, outer, inner, *mesh_args(layout, groups), tag)


def gather(x: torch.Tensor, dim: int, layout: SeqLayout, groups: Groups, *, outer: int = 1,
           inner: int = 1, tag: str = "") -> torch.Tensor:
    """All tokens, in token order, from every rank's local ones (the backward takes the
    local part of the gradient: every rank must compute the same thing from the result)."""
    return _ops.sp_gather(x, dim, outer, inner, *mesh_args(layout, groups), tag, "fwd")


def seq_to_heads(x: torch.Tensor, layout: SeqLayout, groups: Groups,
                 tag: str = "") -> torch.Tensor:
    """Ulysses all-to-all: (B, H, L, D) → (B, H/u, S/r, D)."""
    return _ops.sp_all_to_all(x, True, *mesh_args(layout, groups), tag, "fwd")


def heads_to_seq(x: torch.Tensor, layout: SeqLayout, groups: Groups,
                 tag: str = "") -> torch.Tensor:
    """The inverse all-to-all: (B, H/u, S/r, D) → (B, H, L, D)."""
    return _ops.sp_all_to_all(x, False, *mesh_args(layout, groups), tag, "fwd")


def ring_attention(q, k, v, layout: SeqLayout, groups: Groups, *, mask=None,
                   causal: bool = False, scale: float | None = None, impl: str = "auto",
                   tag: str = ""):
    """Attention of this ring rank's ring block (after the Ulysses all-to-all) to all S
    keys. Shapes: q (B, H, S/r, D), k, v (B, Hk, S/r, ·) → (out (B, H, S/r, Dv), lse
    (B, H, S/r) in float32, or float64 for float64 inputs)."""
    _check_ring_inputs(q, k, v, mask, layout)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ops.sp_ring_attention(q, k, v, mask, causal, scale, *mesh_args(layout, groups),
                                  impl, tag)


def _to_heads(q, k, v, layout: SeqLayout, groups: Groups, tag: str):
    """K/V heads replicated up to the Ulysses degree, then the all-to-all sequence -> heads
    (a no-op for u = 1)."""
    u = groups.ulysses
    rep = kv_replication(k.shape[1], u)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if u > 1:
        q, k, v = (seq_to_heads(x, layout, groups, tag) for x in (q, k, v))
    return q, k, v


def usp_attention(q, k, v, layout: SeqLayout, groups: Groups, *, mask=None,
                  causal: bool = False, scale: float | None = None, impl: str = "auto",
                  tag: str = ""):
    """The whole USP attention on local tokens: all-to-all, ring, all-to-all back.
    Shapes: q (B, H, L, D), k, v (B, Hk, L, ·) → (B, H, L, Dv)."""
    u = groups.ulysses
    check_heads(q.shape[1], k.shape[1], u)
    q, k, v = _to_heads(q, k, v, layout, groups, tag)
    out, _ = ring_attention(q, k, v, layout, groups, mask=mask, causal=causal, scale=scale,
                            impl=impl, tag=tag)
    return heads_to_seq(out, layout, groups, tag) if u > 1 else out


def usp_clustered_attention(q, k, v, layout: SeqLayout, groups: Groups, *, clusters: int,
                            key_padding_mask=None, scale: float | None = None,
                            iterations: int = 5, bits: int = 63, seed: int = -1,
                            clustering: str = "hamming", refine: int = 1,
                            metric: str = "attention", topk: int | None = None,
                            impl: str = "auto", tag: str = ""):
    """Clustered attention on local tokens over the whole mesh: all-to-all, then each ring
    rank clusters its ring block's queries and the centroids attend to all keys by ring
    attention (`clustered.py`), all-to-all back. With `topk`: improved clustered attention,
    each cluster's top-k keys (over all S) attended exactly per query (`improved.py`).
    `key_padding_mask` (B, S) over token positions (True = keep). Shapes: q (B, H, L, D),
    k, v (B, Hk, L, ·) → (out (B, H, L, Dv), assignments (B, H/u, S/r) of this rank's heads
    and ring block)."""
    u = groups.ulysses
    check_heads(q.shape[1], k.shape[1], u)
    if topk is not None:
        check_positive_int("topk", topk)
    q, k, v = _to_heads(q, k, v, layout, groups, tag)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    spec = (clusters, iterations, bits, seed, clustering, refine, metric)
    if topk is None:
        out, assignments, _, _ = _ops.sp_ring_conditional_attention(
            q, k, v, mask, scale, *spec, 0, *mesh_args(layout, groups), impl, tag, "")
    else:
        out, assignments = _ops.sp_ring_improved_clustered_attention(
            q, k, v, mask, scale, *spec, topk, 0, *mesh_args(layout, groups), impl, tag,
            "")[:2]
    return (heads_to_seq(out, layout, groups, tag) if u > 1 else out), assignments


def usp_global_clustered_attention(q, k, v, layout: SeqLayout, groups: Groups, *,
                                   clusters: int, key_padding_mask=None,
                                   scale: float | None = None, iterations: int = 5,
                                   bits: int = 63, seed: int = -1, clustering: str = "hamming",
                                   refine: int = 1, metric: str = "attention",
                                   impl: str = "auto", tag: str = ""):
    """Clustered attention on local tokens over the whole mesh, equal to one process's
    `clustered_attention` on the gathered sequence with the same seed (`global_clustered.py`:
    the queries of all S positions and H heads clustered as one process does, the centroids
    attending to each rank's local keys, merged by log-sum-exp over the ring; K/V never
    rotate). `key_padding_mask` (B, S) over token positions (True = keep). Shapes: q (B, H, L,
    D), k, v (B, Hk, L, ·) → (out (B, H, L, Dv), assignments (B, H/u, S/r) of this rank's
    heads and ring block, in [0, min(clusters, S)))."""
    u = groups.ulysses
    check_heads(q.shape[1], k.shape[1], u)
    q, k, v = _to_heads(q, k, v, layout, groups, tag)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out, assignments, *_ = _ops.sp_global_clustered_attention(
        q, k, v, mask, scale, clusters, iterations, bits, seed, clustering, refine, metric, 0,
        *mesh_args(layout, groups), impl, tag, "")
    return (heads_to_seq(out, layout, groups, tag) if u > 1 else out), assignments


def _check_ring_inputs(q, k, v, mask, layout: SeqLayout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if q.shape[2] != layout.block_len or k.shape[2] != layout.block_len:
        raise ValueError(f"q and k hold {q.shape[2]} and {k.shape[2]} tokens; a ring block "
                         f"holds S/r = {layout.block_len}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads "
                         f"({k.shape[1]})")
    if mask is not None:
        if mask.requires_grad:
            raise ValueError("the mask requires grad (a learned bias): ring attention takes "
                             "no gradient for masks")
        if mask.shape[-1] != layout.seq_len or mask.shape[-2] not in (1, layout.seq_len):
            raise ValueError(f"mask {tuple(mask.shape)} must be over token positions: "
                             f"(..., S|1, S) with S = {layout.seq_len}")
