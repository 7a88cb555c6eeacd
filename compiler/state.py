"""`CompileState`: what one `clusterfx.compile` call owns — its policy, mesh, pass manager,
the record of every graph it compiled, and the run-time counts of its sites. Shared by the
compiled model, the dynamo backend and `explain()`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterfx.compiler.pass_manager import GraphRecord, PassManager
from clusterfx.config.parallel import ResolvedMesh
from clusterfx.config.policy import Policy
from clusterfx.ops.common.telemetry import SiteCounts, new_sink


@dataclass
class CompileState:
    policy: Policy
    backend: str
    dump_dir: Path | None = None
    stop_after: str | None = None
    mesh: Any = None
    mesh_key: str | None = None
    root: Any = None  # the compiled nn.Module, where rewrites install learnable modules
    resolved_mesh: ResolvedMesh | None = None
    records: list[GraphRecord] = field(default_factory=list)
    # call-time capture watch (compiler/capture.py): calls of the compiled model, runs of the
    # graphs clusterfx compiled, and why a call (or part of one) ran uncompiled
    calls: int = 0
    graph_runs: int = 0
    capture_problems: dict[str, int] = field(default_factory=dict)
    # id(module) -> its path in the compiled model (graphs captured inside a submodule's
    # forward after a graph break name their modules from that submodule)
    module_paths: dict[int, str] = field(default_factory=dict, repr=False)
    # module path -> why it declares a causal query stream (passes/analysis/causality.py)
    causal_modules: dict[str, str] = field(default_factory=dict, repr=False)
    dynamo_limit: str = ""  # dynamo's last "hit config.*_limit" warning in a call of this model
    code_state: Any = field(default=None, repr=False)  # dynamo's automatic-dynamic memory
    telemetry: SiteCounts = field(default_factory=new_sink, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    manager: PassManager = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.manager = PassManager.configure(self.policy, self.mesh_key, self.resolved_mesh)

    def cache_key(self) -> str:
        """Enters Inductor's cache key: the passes' uuids (sources, policy, mesh)."""
        return self.manager.uuid()

    def latest_records(self) -> list[GraphRecord]:
        """One record per captured graph: a recompile replaces the earlier record."""
        latest: dict[str, GraphRecord] = {}
        for rec in self.records:
            latest[rec.compile_id] = rec
        return list(latest.values())
