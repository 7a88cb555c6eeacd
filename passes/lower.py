"""Lower each `clusterfx::attention` node per the policy.

Before:
    o = torch.ops.clusterfx.attention(q, k, v, mask, 0.0, False, 0.125, False)
After (Dense):
    o = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, ...)
or the op of the site's config, registered with `@register_lowering(ConfigType)`. A lowering
that cannot apply raises `Decline(reason)`: the site stays exact (SDPA) and the report says why;
under `strict=True` that is an error instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from ..compiler.configs import AttentionConfig, Dense
from ..compiler.policy import Policy
from ..ops.attention import attention as canonical_attention
from ..ops.attention import dense_attention
from .cost_model import estimate
from .graph_utils import SDPA, GraphEditor, value_of
from .site import KEPT_DENSE, REWRITTEN, SITE_META, Site


class Decline(Exception):
    """A lowering that does not apply to a site; the message is the reason."""


class PolicyError(ValueError):
    """Raised under `strict=True` when a policy entry cannot be honoured."""


Lowering = Callable[[GraphEditor, fx.Node, Site, AttentionConfig], fx.Node]
LOWERINGS: dict[type, Lowering] = {}


def register_lowering(config_type: type) -> Callable[[Lowering], Lowering]:
    def wrap(fn: Lowering) -> Lowering:
        LOWERINGS[config_type] = fn
        return fn
    return wrap


def lower_dense(editor: GraphEditor, node: fx.Node, site: Site, config=None) -> fx.Node:
    """Exact attention: SDPA directly, or `dense_attention` when SDPA cannot take the
    arguments as they are (mask together with causality, a float mask of another dtype,
    batch dims that only broadcast)."""
    q, k, v, mask, dropout_p, causal, scale, gqa = node.args
    qv, kv, mv = value_of(q), value_of(k), value_of(mask)
    direct = (mv is None or not causal) and (
        mv is None or mv.dtype == torch.bool or mv.dtype == qv.dtype) and (
        gqa or tuple(qv.shape[:-2]) == tuple(kv.shape[:-2]))
    if direct:
        return editor.call(SDPA, (q, k, v), {"attn_mask": mask, "dropout_p": dropout_p,
                                             "is_causal": causal, "scale": scale,
                                             "enable_gqa": gqa}, like=node)
    return editor.call(dense_attention, node.args, like=node)


register_lowering(Dense)(lower_dense)


def lower_attention(gm: fx.GraphModule, policy: Policy) -> list[Site]:
    """Replace every canonical node; fill each site's rewrite, status, reason and costs."""
    editor = GraphEditor(gm)
    sites = []
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is canonical_attention):
            continue
        site: Site = node.meta[SITE_META]
        sites.append(site)
        resolution = policy.resolve(site.fqn)
        site.policy_key = resolution.key
        config = resolution.config
        fused_before = site.spelling == "sdpa"
        site.extra["cost_before"] = estimate(site, None, fused=fused_before)
        with gm.graph.inserting_before(node):
            new, config_used = _lower_one(editor, node, site, config, policy.strict)
        site.extra["cost_after"] = estimate(site, config_used, fused=True)
        new.meta[SITE_META] = site
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return sites


def _lower_one(editor, node, site, config, strict):
    if config is None:
        site.mark(KEPT_DENSE, "policy value is None: leave dense", rewrite="dense")
        return lower_dense(editor, node, site), None
    if isinstance(config, Dense):
        site.mark(KEPT_DENSE, "", rewrite="dense")
        return lower_dense(editor, node, site), config
    lowering = LOWERINGS.get(type(config))
    try:
        if lowering is None:
            raise Decline(f"no lowering for {config.name} is available in this build")
        new = lowering(editor, node, site, config)
    except Decline as exc:
        if strict:
            raise PolicyError(f"site {site.fqn or '<root>'}: {config.name} cannot apply: "
                              f"{exc}") from None
        site.mark(KEPT_DENSE, f"{config.name} declined: {exc}", rewrite="dense")
        return lower_dense(editor, node, site), None
    site.mark(REWRITTEN, site.extra.get("note", ""), rewrite=config.name)
    # a lowering may say what it really runs at the observed shape (Auto: its candidate)
    return new, site.extra.get("effective_config", config)


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
