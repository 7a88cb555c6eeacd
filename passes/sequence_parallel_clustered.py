"""Clustered attention over a ring: the lowered `conditional_attention` node becomes
`sp_ring_conditional_attention` (ops/sequence_parallel/clustered.py): each ring rank clusters
its own block's queries (the keys' statistics of the attention metric reduced over the ring),
the centroids attend to all keys by ring attention with the log-sum-exp merge; exact ring
attention below `min_length` keys or for a mask that is not key padding, as on one process.

Before:
    r = torch.ops.clusterfx.conditional_attention(q, k, v, mask, 0.125, 'clustered', 100, 5,
            63, -1, 'hamming', 1, 'attention', 1, 0, 'auto', 'c0/frame0/0#0')
After (q, k, v after the Ulysses all-to-all when u > 1; mask over all key positions):
    r = torch.ops.clusterfx.sp_ring_conditional_attention(q, k, v, mask, 0.125, 100, 5, 63,
            -1, 'hamming', 1, 'attention', 0, *mesh, 'auto', tag, 'c0/frame0/0#0')

Declined (the site runs on the gathered sequence, with the reason): improved clustered
attention, whose per-cluster top-k keys would have to be kept running across the rotating
blocks and their gradients routed back to the keys' owners.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from clusterfx.ops import sequence_parallel as _sp  # noqa: F401 - registers the ring ops
from clusterfx.passes.analysis.sequence_shards import Unsupported

# conditional_attention(q, k, v, mask, scale, method, *spec (7), topk, min_length, impl, site)
_METHOD, _SPEC, _MIN_LENGTH, _IMPL, _SITE = 5, slice(6, 13), 14, 15, 16


def conditional_ring_check(node: fx.Node) -> None:
    if node.args[_METHOD] != "clustered":
        raise Unsupported("improved clustered attention over a ring would need each cluster's "
                          "top-k keys kept running across the rotating blocks (and their "
                          "gradients sent back to the keys' owners), which this build does not "
                          "have; use ulysses alone, or Clustered")


def conditional_ring_volumes(node: fx.Node, batch: int, kv_heads: int, dim: int, ring: int,
                             seq_len: int) -> list[tuple[str, str, str, int, int]]:
    """What the ring clustered op sends besides K/V: the attention metric's key statistics
    (n, Σk, Σk kᵀ per batch and kv head, float64), all-reduced over the ring — when the
    clustered path runs (not below `min_length`)."""
    spec = node.args[_SPEC]
    if seq_len < node.args[_MIN_LENGTH] or spec[-1] != "attention":
        return []
    stats = batch * kv_heads * (1 + dim + dim * dim) * 8
    return [("all_reduce", "ring", "fwd", 1, 2 * (ring - 1) * stats // ring)]


def conditional_ring(b, node: fx.Node, q, k, v, mask) -> fx.Node:
    args = node.args
    result = b.call(torch.ops.clusterfx.sp_ring_conditional_attention.default,
                    (q, k, v, mask, args[4], *args[_SPEC], args[_MIN_LENGTH], *b.mesh_args,
                     b.impl, b.tag, args[_SITE]))
    return b.call(operator.getitem, (result, 0))
