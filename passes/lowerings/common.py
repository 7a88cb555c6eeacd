"""Guards and argument plumbing shared by the lowerings."""

from __future__ import annotations

import torch.fx as fx

from clusterfx.config.configs import AttentionConfig
from clusterfx.config.vocabulary import Decline
from clusterfx.passes.analysis.graph_utils import GraphEditor, value_of
from clusterfx.passes.site import Site


def as_four_d(editor: GraphEditor, node: fx.Node, site: Site):
    """The canonical node's (q, k, v, mask) as (B, H, N, D) tensors for the approximate ops,
    and a function that brings a (B, H, Nq, Dv) result back to the site's rank.

    3-D attention (B·H, N, D), as `bmm` spellings and MultiheadAttention write it, gets a unit
    head dim; batch dims that only broadcast (k with batch 1 against q's B) are declined."""
    q, k, v, mask = node.args[:4]
    qv, kv = value_of(q), value_of(k)
    rank = qv.dim()
    if rank not in (3, 4) or kv.dim() != rank:
        raise Decline(f"q/k of rank {rank}/{kv.dim()}; approximate attention takes rank 3 or 4")
    if qv.shape[0] != kv.shape[0]:
        raise Decline(f"k's batch ({kv.shape[0]}) only broadcasts against q's ({qv.shape[0]})")
    if rank == 4:
        return q, k, v, mask, lambda out: out
    lift = lambda x: editor.call("unsqueeze", (x, 1), like=node, method=True)  # noqa: E731
    if mask is not None and value_of(mask).dim() == 3:
        mask = lift(mask)
    return lift(q), lift(k), lift(v), mask, lambda out: editor.call(
        "squeeze", (out, 1), like=node, method=True)


def require_no_dropout(site: Site, config: AttentionConfig) -> None:
    if site.dropout_p:
        raise Decline(f"attention dropout (p={site.dropout_p}) is not supported by "
                      f"{config.name}; use it in eval mode or with p=0")
