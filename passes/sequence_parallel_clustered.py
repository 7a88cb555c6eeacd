"""Clustered attention over a ring (placeholder until the ring clustered op lands)."""

from __future__ import annotations

from clusterfx.passes.analysis.sequence_shards import Unsupported


def conditional_ring_check(node):
    raise Unsupported("clustered attention over a ring is not available yet")


def conditional_ring(b, node, q, k, v, mask):
    raise Unsupported("clustered attention over a ring is not available yet")
