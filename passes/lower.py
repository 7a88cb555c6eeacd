"""The lowering pass: each `clusterfx::attention` node becomes the op of the config the policy
chooses for its module path.

Before:
    o = torch.ops.clusterfx.attention(q, k, v, mask, 0.0, False, 0.125, False)
After (Dense or None):
    o = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, ...)
or the op of the site's config, from the lowering registered for its type (`registry`; one
file per rewrite in `lowerings/`). A lowering that cannot apply raises `Decline(reason)`: the
site stays exact (SDPA), its status is "declined" with the reason; under `strict=True` that
is a `PolicyError` instead. Counters: `rewritten`, `kept_dense`, `declined`.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from clusterfx.config.configs import AttentionConfig, Dense
from clusterfx.config.policy import Policy
from clusterfx.config.vocabulary import Decline, PolicyError, Status
from clusterfx.ops.attention import attention as canonical_attention
from clusterfx.passes import lowerings  # noqa: F401 - imports (registers) every rewrite
from clusterfx.passes.analysis.graph_utils import GraphEditor
from clusterfx.passes.base import GraphPass, PassContext, PassResult
from clusterfx.passes.cost_model import estimate
from clusterfx.passes.lowerings.dense import lower_dense
from clusterfx.passes.registry import LoweringContext, lowering_for, registered_modules
from clusterfx.passes.site import SITE_META, Site


class LowerAttention(GraphPass):
    """canonical attention → the policy's op per site (or exact attention, with a reason)."""

    name = "lower"

    def __init__(self, policy: Policy):
        self.policy = policy

    def config(self) -> dict[str, Any]:
        return {"policy": self.policy.cache_key()}

    def source_modules(self) -> list[str]:
        return [__name__, *registered_modules()]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        lctx = LoweringContext(GraphEditor(gm), ctx)
        for node in list(gm.graph.nodes):
            if not (node.op == "call_function" and node.target is canonical_attention):
                continue
            site: Site = node.meta[SITE_META]
            resolution = self.policy.resolve(site.fqn)
            site.policy_key = resolution.key
            site.cost_before = estimate(site, None, fused=site.spelling == "sdpa")
            with gm.graph.inserting_before(node):
                new = self._lower_one(lctx, node, site, resolution.config)
            result.counters[site.status.name.lower()] += 1
            if site.status is Status.DECLINED:
                result.declines.append((site.fqn, site.reason))
            site.cost_after = estimate(site, site.config, fused=True)
            new.meta[SITE_META] = site
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
        return result

    def _lower_one(self, lctx: LoweringContext, node: fx.Node, site: Site,
                   config: AttentionConfig | None) -> fx.Node:
        if config is None or isinstance(config, Dense):
            why = "policy value is None: leave dense" if config is None else ""
            site.config = config
            site.mark(Status.KEPT_DENSE, why, rewrite="dense")
            return lower_dense(lctx, node, site)
        site.config = config  # a lowering may replace it with what really runs (Auto)
        try:
            lowering = lowering_for(config)
            if lowering is None:
                raise Decline(f"no lowering for {config.name} is available in this build")
            new = lowering(lctx, node, site, config)
        except Decline as exc:
            if self.policy.strict:
                raise PolicyError(f"site {site.fqn or '<root>'}: {config.name} cannot apply: "
                                  f"{exc}") from None
            site.config = None
            site.mark(Status.DECLINED, f"{config.name} declined: {exc}", rewrite="dense")
            return lower_dense(lctx, node, site)
        site.mark(Status.REWRITTEN, site.reason, rewrite=config.name)
        return new
