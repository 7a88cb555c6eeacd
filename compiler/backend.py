"""The dynamo backend: run the pass pipeline on each captured graph, then hand the graph to
the chosen compiler (Inductor by default, or aot_eager / eager / any registered backend)."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .pipeline import GraphRecord, run_pipeline
from .policy import Policy

_OWN_NAME = "clusterfx"


def available_backends() -> list[str]:
    names = set(torch._dynamo.list_backends(exclude_tags=())) | {"eager", "inductor"}
    names.discard(_OWN_NAME)
    return sorted(names)


def check_backend(name: Any) -> str:
    if not isinstance(name, str) or name not in available_backends():
        raise ValueError(f"backend ({name!r}) must be one of {available_backends()}")
    return name


@dataclass
class CompileState:
    """Shared by the compiled model and `explain()`: the policy and what each graph got."""

    policy: Policy
    backend: str
    dump_dir: Path | None = None
    stop_after: str | None = None
    records: list[GraphRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def latest_records(self) -> list[GraphRecord]:
        """One record per captured graph: a recompile replaces the earlier record."""
        latest: dict[str, GraphRecord] = {}
        for rec in self.records:
            latest[rec.compile_id] = rec
        return list(latest.values())


def _graph_key() -> str:
    ctx = torch._guards.CompileContext.try_get()
    cid = ctx.compile_id if ctx is not None else None
    frame = getattr(cid, "frame_id", None)
    return f"frame{frame}"


class ClusterfxBackend:
    """`torch.compile(model, backend=ClusterfxBackend(state))`."""

    def __init__(self, state: CompileState):
        self.state = state
        self._subgraph_counter: dict[str, int] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs: list, mode: str | None = None,
                 options: dict | None = None):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        concrete = dict(zip(placeholders, example_inputs))
        with self.state.lock:
            index = len(self.state.records)
            ctx = torch._guards.CompileContext.try_get()
            cid = str(ctx.compile_id) if ctx is not None and ctx.compile_id else str(index)
            frame = _graph_key()
            # graph breaks: several graphs per frame compile; number them within the attempt
            n = self._subgraph_counter.get(cid, 0)
            self._subgraph_counter[cid] = n + 1
        record = run_pipeline(gm, concrete, self.state.policy, index=index,
                              compile_id=f"{frame}/{n}", dump_dir=self.state.dump_dir,
                              stop_after=self.state.stop_after)
        with self.state.lock:
            self.state.records.append(record)
        return _downstream(self.state.backend, gm, example_inputs, mode, options,
                           self.state.policy.cache_key())


@functools.cache
def _source_files() -> tuple[str, ...]:
    root = Path(__file__).resolve().parent.parent
    return tuple(sorted(str(p) for p in root.rglob("*.py")
                        if ".venv" not in p.parts and "tests" not in p.parts))


class CacheStamp(CustomGraphPass):
    """A no-op post-grad pass whose uuid puts clusterfx's own sources (op kernels, fake
    kernels, passes) and the policy into Inductor's FX-graph cache key: Inductor does not hash
    custom ops' Python code, so without it an edited op could reuse stale compiled code."""

    def __init__(self, policy_key: str):
        self.policy_key = policy_key

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return get_hash_for_files(_source_files(), extra=self.policy_key)


def _downstream(name: str, gm, example_inputs, mode, options, policy_key: str = ""):
    if name == "eager":
        return gm.forward
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = dict(options or {})
        if mode:
            patches = {**torch._inductor.list_mode_options(mode), **patches}
        if torch._inductor.config.post_grad_custom_post_pass is None:
            patches.setdefault("post_grad_custom_post_pass", CacheStamp(policy_key))
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    return torch._dynamo.lookup_backend(name)(gm, example_inputs)


def _named_backend(gm: fx.GraphModule, example_inputs: list, mode: str | None = None,
                   options: dict | None = None):
    """`torch.compile(m, backend="clusterfx", options={"policy": ..., "backend": ...})`;
    the remaining options go to Inductor. The latest state is `clusterfx.last_compile_state`."""
    options = dict(options or {})
    policy = Policy.make(options.pop("policy", None), strict=options.pop("strict", False))
    backend = check_backend(options.pop("backend", "inductor"))
    dump = options.pop("dump_dir", None)
    state = _NAMED_STATES.setdefault(policy.cache_key() + backend, CompileState(
        policy, backend, Path(dump) if dump else None))
    LAST_STATE[0] = state
    return ClusterfxBackend(state)(gm, example_inputs, mode, options or None)


_NAMED_STATES: dict[str, CompileState] = {}
LAST_STATE: list[CompileState | None] = [None]
torch._dynamo.register_backend(_named_backend, name=_OWN_NAME)
