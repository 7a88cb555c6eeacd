"""Clustered and improved clustered attention over a ring: the lowered `conditional_attention`
node becomes `sp_ring_conditional_attention` (method "clustered";
ops/sequence_parallel/clustered.py) or `sp_ring_improved_clustered_attention` (method
"improved_clustered"; ops/sequence_parallel/improved.py). Each ring rank clusters its own
block's queries (the keys' statistics of the attention metric reduced over the ring); the
centroids attend to all keys by ring attention with the log-sum-exp merge, and i-clustered
keeps each centroid's top-k keys running across the rotating K/V blocks (their k, v rows
copied as they pass) and attends them exactly per query, the gradients of the selected keys
travelling home in the ring backward's dK/dV accumulators. Exact ring attention below
`min_length` keys or for a mask that is not key padding, as on one process.

Before:
    r = torch.ops.clusterfx.conditional_attention(q, k, v, mask, 0.125, 'improved_clustered',
            100, 5, 63, -1, 'hamming', 1, 'attention', 32, 0, 'auto', 'c0/frame0/0#0')
After (q, k, v after the Ulysses all-to-all when u > 1; mask over all key positions):
    r = torch.ops.clusterfx.sp_ring_improved_clustered_attention(q, k, v, mask, 0.125, 100,
            5, 63, -1, 'hamming', 1, 'attention', 32, 0, *mesh, 'auto', tag, 'c0/frame0/0#0')
(method "clustered": `sp_ring_conditional_attention`, the same arguments without topk).

Declined (the site runs on the gathered sequence, with the reason): a method this build has
no ring version of. Causal clustered and causal i-clustered attention (decoders) lower to
`causal_conditional_attention`, whose ring version is not built (sequence_parallel_sites.py
declines it).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from clusterfx.ops import sequence_parallel as _sp  # noqa: F401 - registers the ring ops
from clusterfx.passes.analysis.sequence_shards import Unsupported

# conditional_attention(q, k, v, mask, scale, method, *spec (7), topk, min_length, impl, site)
_METHOD, _SPEC, _TOPK, _MIN_LENGTH, _IMPL, _SITE = 5, slice(6, 13), 13, 14, 15, 16
_RING_METHODS = ("clustered", "improved_clustered")


def conditional_ring_check(node: fx.Node) -> None:
    method = node.args[_METHOD]
    if method not in _RING_METHODS:
        raise Unsupported(f"conditional attention method {method!r} has no ring version "
                          f"(ring methods: {', '.join(_RING_METHODS)})")


def conditional_ring_volumes(node: fx.Node, batch: int, kv_heads: int, dim: int, ring: int,
                             seq_len: int) -> list[tuple[str, str, str, int, int]]:
    """What the ring clustered ops send besides K/V: the attention metric's key statistics
    (n, Σk, Σk kᵀ per batch and kv head, float64), all-reduced over the ring — when the
    clustered path runs (not below `min_length`). i-clustered sends nothing more: its top-k
    keys are copied from the K/V blocks passing by, and their gradients ride home in the
    dK/dV accumulators."""
    spec = node.args[_SPEC]
    if seq_len < node.args[_MIN_LENGTH] or spec[-1] != "attention":
        return []
    stats = batch * kv_heads * (1 + dim + dim * dim) * 8
    return [("all_reduce", "ring", "fwd", 1, 2 * (ring - 1) * stats // ring)]


def conditional_ring(b, node: fx.Node, q, k, v, mask) -> fx.Node:
    args = node.args
    if args[_METHOD] == "improved_clustered":
        target = torch.ops.clusterfx.sp_ring_improved_clustered_attention.default
        extra = (args[_TOPK],)
    else:
        target, extra = torch.ops.clusterfx.sp_ring_conditional_attention.default, ()
    result = b.call(target, (q, k, v, mask, args[4], *args[_SPEC], *extra, args[_MIN_LENGTH],
                             *b.mesh_args, b.impl, b.tag, args[_SITE]))
    return b.call(operator.getitem, (result, 0))
