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
