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
    site.mark(REWRITTEN, "", rewrite=config.name)
    return new, config
