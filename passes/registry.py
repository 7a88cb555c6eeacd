"""The open registry of the lowering pass: per config type, the function that lowers a
canonical attention node to that config's op (its cost formula registers in `cost_model`).

A rewrite registers both beside the op it emits (one file in `passes/lowerings/`, imported by
the lowering pass with every other file of that folder), so adding a rewrite is one config
class, one lowering file and one op family, with no edit elsewhere:

    @register_lowering(MyConfig)
    def lower_mine(lctx: LoweringContext, node, site, config) -> fx.Node: ...

    @register_cost(MyConfig, efficiency=0.5)
    def mine_cost(dims: Dims, config) -> Cost: ...

Lookups walk the config's MRO, so a subclass inherits its parent's entries unless it registers
its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from clusterfx.config.configs import AttentionConfig
from clusterfx.passes.analysis.graph_utils import GraphEditor
from clusterfx.passes.base import PassContext
from clusterfx.passes.cost_model import COSTS
from clusterfx.passes.site import Site


@dataclass
class LoweringContext:
    """What a lowering may use: the graph editor, and the pass context (for telemetry tags)."""

    editor: GraphEditor
    ctx: PassContext
    runtime_sites: int = 0

    def tag(self, site: Site) -> str:
        """A telemetry tag for an op that reports its run-time path (see ops.common.telemetry)."""
        self.runtime_sites += 1
        return self.ctx.tag(site, self.runtime_sites - 1)


Lowering = Callable[[LoweringContext, fx.Node, Site, AttentionConfig], fx.Node]
LOWERINGS: dict[type, Lowering] = {}


def register_lowering(config_type: type) -> Callable[[Lowering], Lowering]:
    if not (isinstance(config_type, type) and issubclass(config_type, AttentionConfig)):
        raise TypeError(f"lowerings are keyed by an AttentionConfig subclass, got "
                        f"{config_type!r}")

    def wrap(fn: Lowering) -> Lowering:
        LOWERINGS[config_type] = fn
        return fn
    return wrap


def lowering_for(config: AttentionConfig) -> Lowering | None:
    """The lowering registered for the config's type or its nearest base."""
    return next((LOWERINGS[c] for c in type(config).__mro__ if c in LOWERINGS), None)


def registered_modules() -> list[str]:
    """Modules holding the registered lowerings and cost formulas (their source enters the
    lowering pass's uuid)."""
    fns = [*LOWERINGS.values(), *(e.formula for e in COSTS.values())]
    return sorted({fn.__module__ for fn in fns if fn.__module__ in sys.modules})
