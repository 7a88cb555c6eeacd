"""The ordered pass pipeline run on every graph dynamo captures.

    inline_mha -> canonicalize -> lower [-> sequence_parallel]

Each pass reads only the previous pass's graph; `stop_after` ends the pipeline early to inspect a
stage. The pipeline times every pass and, on request, dumps the graph's code before and after
each pass plus a picture of the graph around each site.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.fx as fx

from ..passes import lower_clustered, lower_topk  # noqa: F401 - register their lowerings
from ..passes.canonicalize import canonicalize_attention
from ..passes.inline_mha import inline_multi_head_attention
from ..passes.lower import lower_attention
from ..passes.site import UNSUPPORTED, Site
from .policy import Policy

PASS_NAMES = ("inline_mha", "canonicalize", "lower")


def check_stop_after(stop_after: str | None) -> None:
    if stop_after is not None and stop_after not in PASS_NAMES:
        raise ValueError(f"stop_after ({stop_after!r}) must be one of {list(PASS_NAMES)}")


@dataclass
class GraphRecord:
    """What the pipeline did to one captured graph."""

    index: int
    compile_id: str
    sites: list[Site] = field(default_factory=list)
    pass_seconds: dict[str, float] = field(default_factory=dict)
    dumps: list[Path] = field(default_factory=list)


def run_pipeline(gm: fx.GraphModule, concrete: dict[fx.Node, Any], policy: Policy,
                 index: int = 0, compile_id: str = "", dump_dir: Path | None = None,
                 stop_after: str | None = None) -> GraphRecord:
    record = GraphRecord(index, compile_id)
    declined: list[Site] = []
    canonical: list[Site] = []

    def inline(g):
        for d in inline_multi_head_attention(g):
            site = Site(d.fqn, d.spelling, graph_index=index)
            site.mark(UNSUPPORTED, d.reason)
            declined.append(site)

    def canon(g):
        canonical.extend(canonicalize_attention(g, concrete, index))

    def lower(g):
        lower_attention(g, policy)

    passes = list(zip(PASS_NAMES, (inline, canon, lower)))
    check_stop_after(stop_after)
    if stop_after is not None:
        passes = passes[:PASS_NAMES.index(stop_after) + 1]
    if dump_dir is not None:
        record.dumps.append(_dump(dump_dir, index, 0, "captured", gm))
    for step, (name, fn) in enumerate(passes, start=1):
        start = time.perf_counter()
        fn(gm)
        record.pass_seconds[name] = time.perf_counter() - start
        if dump_dir is not None:
            record.dumps.append(_dump(dump_dir, index, step, name, gm))
    record.sites = declined + canonical
    if dump_dir is not None:
        from .graph_dump import write_site_pictures

        record.dumps.extend(write_site_pictures(gm, dump_dir, index))
    return record


def _dump(folder: Path, index: int, step: int, name: str, gm: fx.GraphModule) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"graph{index}_{step}_{name}.py"
    path.write_text(f"# graph {index} after pass '{name}'\n{gm.code}")
    return path
