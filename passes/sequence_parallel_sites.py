"""How the sequence-parallel pass reads and rewrites each kind of lowered attention op.

An `AttentionOp` says where an op keeps q, k, v and its mask, whether it is causal, and how
to emit its ring version; ops register by target (`register_site_op`), so another family
(a causal clustered op, say) makes its op sequence-parallel from its own file:

    register_site_op(torch.ops.clusterfx.my_attention.default,
                     AttentionOp(mask=(3, None), causal=lambda n: n.args[5], ring=None))

Ulysses needs nothing more of an op than that it treats heads independently and takes the
whole sequence: after the all-to-all it runs unchanged on H/u heads. A ring needs the op's
attention split over key blocks with a log-sum-exp merge: `ring(builder, node, q, k, v, mask)`
emits it (or raises `Unsupported(reason)`: the site then runs on the gathered sequence).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from clusterfx.ops import causal_clustered as _causal  # noqa: F401 - causal_conditional_...
from clusterfx.ops import clustered as _clustered  # noqa: F401 - conditional_attention
from clusterfx.ops import topk as _topk  # noqa: F401 - registers clusterfx::topk_attention
from clusterfx.ops.attention import dense_attention
from clusterfx.passes.analysis.graph_utils import SDPA
from clusterfx.passes.analysis.sequence_shards import Unsupported
from clusterfx.passes.sequence_parallel_clustered import (
    conditional_ring_check,
    conditional_ring_volumes,
)
from clusterfx.passes.sequence_parallel_global import (
    causal_ulysses,
    global_ring,
    global_ulysses,
)


@dataclass(frozen=True)
class AttentionOp:
    """Where a lowered attention op keeps its operands. `mask`: (positional index, keyword)
    of the mask; `causal(node)`; `ring(builder, node, q, k, v, mask) -> out node` or None
    (then `no_ring` says why); `ring_check(node)` raises Unsupported for arguments its ring
    cannot take (before anything is emitted); `tuple_output`: the op returns a tuple whose
    item 0 is the attention output. A ring (or Ulysses) version may put in its output node's
meta "sp_collectives" (its whole list of ring collectives, replacing the K/V rotation) and
"sp_detail" (what the report says it runs)."""

    mask: tuple[int | None, str | None]
    causal: Callable[[fx.Node], bool]
    ring: Callable[..., fx.Node] | None = None
    no_ring: str = "it has no ring version"
    ring_check: Callable[[fx.Node], None] = field(default=lambda node: None)
    tuple_output: bool = False
    # (node, B, kv heads per rank, D, r, S) -> [(collective, group, phase, count, bytes)]
    # that the ring version sends besides K/V and their gradients
    ring_volumes: Callable[..., list] = field(default=lambda node, *dims: [])
    # under Ulysses alone (r = 1): `ulysses(builder, node, q, k, v, mask) -> out node` replaces
    # the op after the all-to-all, or returns None (the op runs as it is on H/u heads)
    ulysses: Callable[..., fx.Node | None] = field(default=lambda b, node, *operands: None)

    def operands(self, node: fx.Node) -> tuple[Any, Any, Any, Any]:
        q, k, v = node.args[:3]
        index, name = self.mask
        mask = None
        if index is not None and len(node.args) > index:
            mask = node.args[index]
        elif name is not None:
            mask = node.kwargs.get(name)
        return q, k, v, mask

    def set_operands(self, node: fx.Node, q, k, v, mask) -> None:
        args = list(node.args)
        args[:3] = [q, k, v]
        index, name = self.mask
        if index is not None and len(args) > index:
            args[index] = mask
        elif name is not None and name in node.kwargs:
            node.kwargs = {**node.kwargs, name: mask}
        node.args = tuple(args)


SITE_OPS: dict[Any, AttentionOp] = {}


def register_site_op(target: Any, op: AttentionOp) -> None:
    SITE_OPS[target] = op


def _kw(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _no_dropout(index: int, name: str):
    def check(node: fx.Node) -> None:
        p = _kw(node, index, name, 0.0)
        if not isinstance(p, (int, float)) or p:
            raise Unsupported(f"attention dropout (p={p}) over a ring (its blocks would need "
                              f"one dropout mask); runs on the gathered sequence")
    return check


def _dense_ring(dropout: tuple[int, str], causal: Callable, scale: Callable):
    del dropout  # checked by ring_check
    def emit(b, node: fx.Node, q, k, v, mask) -> fx.Node:
        s = scale(node)
        if s is None:
            s = float(b.global_shape(q)[-1]) ** -0.5
        out = b.call(torch.ops.clusterfx.sp_ring_attention.default,
                     (q, k, v, mask, bool(causal(node)), float(s), *b.mesh_args, b.impl,
                      b.tag))
        return b.call(operator.getitem, (out, 0))
    return emit


_sdpa_causal = lambda n: bool(_kw(n, 5, "is_causal", False))  # noqa: E731
_sdpa_scale = lambda n: _kw(n, 6, "scale", None)  # noqa: E731
register_site_op(SDPA, AttentionOp(
    mask=(3, "attn_mask"), causal=_sdpa_causal,
    ring=_dense_ring((4, "dropout_p"), _sdpa_causal, _sdpa_scale),
    ring_check=_no_dropout(4, "dropout_p")))
_dense_causal = lambda n: bool(_kw(n, 5, "is_causal", False))  # noqa: E731
register_site_op(dense_attention, AttentionOp(
    mask=(3, "attn_mask"), causal=_dense_causal,
    ring=_dense_ring((4, "dropout_p"), _dense_causal, lambda n: _kw(n, 6, "scale", 1.0)),
    ring_check=_no_dropout(4, "dropout_p")))


register_site_op(torch.ops.clusterfx.topk_attention.default, AttentionOp(
    mask=(4, None), causal=lambda n: bool(n.args[5]),
    no_ring="TopK over a ring would need a running top-k across the rotating key blocks, "
            "which this build does not have (use ulysses alone for TopK)"))
register_site_op(torch.ops.clusterfx.conditional_attention.default, AttentionOp(
    mask=(3, None), causal=lambda n: False, ring=global_ring,
    ring_check=conditional_ring_check, tuple_output=True,
    ring_volumes=conditional_ring_volumes, ulysses=global_ulysses))
# causal_conditional_attention(q, k, v, mask, scale, method, *spec (7), topk, block,
#                              is_causal, causal_queries, min_length, impl, site)
register_site_op(torch.ops.clusterfx.causal_conditional_attention.default, AttentionOp(
    mask=(3, None), causal=lambda n: bool(n.args[15]), tuple_output=True,
    ulysses=causal_ulysses,
    no_ring="causal clustered attention over a ring would need its key clusters of earlier "
            "blocks (and their running sums) built across the rotating key blocks, which this "
            "build does not have (use ulysses alone for the causal clustered family: "
            "Clustered and ImprovedClustered on a decoder)"))
