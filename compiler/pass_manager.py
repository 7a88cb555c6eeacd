"""The ordered pass pipeline run on every graph dynamo captures:

    inline_mha → canonicalize → lower → sequence_parallel (only with a mesh)

then the backend (Inductor by default). Built once per compile from its state (the policy and
the mesh); each pass reads only the previous pass's graph. `stop_after` ends the pipeline early
to inspect a stage. The manager times every pass, keeps each pass's typed result, and, on
request, dumps the graph's code before and after each named pass plus a picture of the graph
around each site. `uuid()` hashes the passes' uuids (their sources and configuration: the policy
and the mesh) and enters the compile cache key.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.fx as fx

from clusterfx.config.parallel import ResolvedMesh
from clusterfx.config.policy import Policy
from clusterfx.passes.base import GraphPass, PassContext, PassResult
from clusterfx.passes.canonicalize import Canonicalize
from clusterfx.passes.inline_mha import InlineMHA
from clusterfx.passes.lower import LowerAttention
from clusterfx.passes.sequence_parallel import SequenceParallelPass
from clusterfx.passes.site import Site

PASS_NAMES = ("inline_mha", "canonicalize", "lower", "sequence_parallel")


def check_stop_after(stop_after: str | None) -> None:
    if stop_after is not None and stop_after not in PASS_NAMES:
        raise ValueError(f"stop_after ({stop_after!r}) must be one of {list(PASS_NAMES)}")


@dataclass
class GraphRecord:
    """What the pipeline did to one captured graph."""

    index: int
    compile_id: str
    sites: list[Site] = field(default_factory=list)
    results: list[PassResult] = field(default_factory=list)
    dumps: list[Path] = field(default_factory=list)

    @property
    def pass_seconds(self) -> dict[str, float]:
        return {r.name: r.seconds for r in self.results}


class PassManager:
    """The passes of one compile, in order."""

    def __init__(self, passes: list[GraphPass]):
        self.passes = passes

    @classmethod
    def configure(cls, policy: Policy, mesh_key: str | None = None,
                  mesh: ResolvedMesh | None = None) -> PassManager:
        passes: list[GraphPass] = [InlineMHA(), Canonicalize(), LowerAttention(policy)]
        if mesh_key is not None:
            passes.append(SequenceParallelPass(mesh_key, mesh))
        return cls(passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def uuid(self) -> str:
        digest = hashlib.sha256()
        for p in self.passes:
            digest.update(f"{p.name}:{p.uuid()};".encode())
        return digest.hexdigest()[:16]

    def run(self, gm: fx.GraphModule, ctx: PassContext, stop_after: str | None = None,
            dump_dir: Path | None = None) -> GraphRecord:
        check_stop_after(stop_after)
        record = GraphRecord(ctx.graph_index, ctx.compile_id)
        if dump_dir is not None:
            record.dumps.append(_dump(dump_dir, ctx.graph_index, 0, "captured", gm))
        for step, p in enumerate(self.passes, start=1):
            start = time.perf_counter()
            result = p.run(gm, ctx)
            result.seconds = time.perf_counter() - start
            record.results.append(result)
            if dump_dir is not None:
                record.dumps.append(_dump(dump_dir, ctx.graph_index, step, p.name, gm))
            if p.name == stop_after:
                break
        record.sites = list(ctx.sites)
        if dump_dir is not None:
            from clusterfx.compiler.graph_dump import write_site_pictures

            record.dumps.extend(write_site_pictures(gm, dump_dir, ctx.graph_index))
        return record


def _dump(folder: Path, index: int, step: int, name: str, gm: fx.GraphModule) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"graph{index}_{step}_{name}.py"
    path.write_text(f"# graph {index} after pass '{name}'\n{gm.code}")
    return path
