"""The pass protocol: a pass has a name, runs on a graph with a context, returns a typed
result, and has a `uuid()` that enters the compile cache key.

    result = pass_.run(gm, ctx)     # edits gm in place
    result.counters["matched"]      # named counters
    result.declines                 # (module path, reason) of what it saw and left alone

`uuid()` hashes the source of the pass's own module (and any others it names in
`source_modules()`) with its configuration (`config()`), so that an edit to a pass or a change of
its policy invalidates compiled artefacts, and nothing else does.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from clusterfx.passes.site import Site


@dataclass
class PassContext:
    """What every pass of one captured graph may read: the graph's concrete example inputs (by
    placeholder), its index and compile id, the sites found so far, how to name a site for
    the run-time telemetry (`tag`), and the compiled module (`root`)."""

    concrete: dict[fx.Node, Any] = field(default_factory=dict)
    graph_index: int = 0
    compile_id: str = ""
    sites: list[Site] = field(default_factory=list)
    tag_prefix: str = ""  # the compile's telemetry sink token
    # module path -> why it declares a causal query stream (`is_causal` / `is_decoder` set on
    # the module, as Hugging Face attention modules do); see passes/analysis/causality.py
    causal_modules: dict[str, str] = field(default_factory=dict)
    # the user's nn.Module being compiled (None for a plain function): rewrites that add
    # learnable modules (PatchToCluster) install them on it (passes/installed.py)
    root: Any = None

    def tag(self, site: Site, number: int) -> str:
        """The telemetry tag of the `number`-th run-time site of this graph. Stable across
        recompiles of the same graph, so their counts add up."""
        name = f"{self.compile_id}#{number}"
        site.runtime_tag = name
        return f"{self.tag_prefix}/{name}" if self.tag_prefix else ""


@dataclass
class PassResult:
    """What one pass did to one graph."""

    name: str
    counters: Counter[str] = field(default_factory=Counter)
    declines: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def source_hash(modules: list[str], config: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        module = sys.modules.get(name)
        try:
            digest.update(inspect.getsource(module).encode())
        except (OSError, TypeError):
            digest.update(name.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class GraphPass:
    """Base of the passes: subclasses set `name` and implement `run`."""

    name: ClassVar[str] = "pass"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What, besides the source, decides this pass's output (e.g. the policy)."""
        return {}

    def source_modules(self) -> list[str]:
        return [type(self).__module__]

    def uuid(self) -> str:
        return source_hash(self.source_modules(), {"name": self.name, **self.config()})
