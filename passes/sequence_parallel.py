"""The sequence-parallel slot of the pipeline (after lowering; only with a mesh).

This build has no sequence-parallel rewrite yet: given a mesh, the pass changes nothing and
records, for every attention site, that sequence parallelism was not applied, so the report
never claims it. The model then runs unsharded on every rank.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from clusterfx.passes.base import GraphPass, PassContext, PassResult

NOT_AVAILABLE = "sequence parallelism is not available in this build: the site runs unsharded"


class SequenceParallelPass(GraphPass):
    """Placeholder: declines every site with the reason."""

    name = "sequence_parallel"

    def __init__(self, mesh_key: str):
        self.mesh_key = mesh_key

    def config(self) -> dict[str, Any]:
        return {"mesh": self.mesh_key}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        for site in ctx.sites:
            result.declines.append((site.fqn, NOT_AVAILABLE))
            result.counters["declined"] += 1
        return result
