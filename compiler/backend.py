"""The dynamo backend: run the compile's pass manager on each captured graph, then hand the
graph to the chosen compiler (Inductor by default, or aot_eager / eager / any registered
backend)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from clusterfx.compiler.capture import count_runs
from clusterfx.compiler.install import lift_installed, with_parameters
from clusterfx.compiler.state import CompileState
from clusterfx.config.policy import Policy
from clusterfx.passes.analysis.graph_utils import frame_sources, rebase_module_paths
from clusterfx.passes.base import PassContext

_OWN_NAME = "clusterfx"


def available_backends() -> list[str]:
    names = set(torch._dynamo.list_backends(exclude_tags=())) | {"eager", "inductor"}
    names.discard(_OWN_NAME)
    return sorted(names)


def check_backend(name: Any) -> str:
    if not isinstance(name, str) or name not in available_backends():
        raise ValueError(f"backend ({name!r}) must be one of {available_backends()}")
    return name


def _frame_key() -> str:
    ctx = torch._guards.CompileContext.try_get()
    cid = ctx.compile_id if ctx is not None else None
    return f"frame{getattr(cid, 'frame_id', None)}"


def _resolve(source: str, f_locals: dict) -> Any:
    """The object a frame source names: `L['self']`, `L['args'][0]`."""
    m = re.match(r"^L\['([^']*)'\]((?:\[\d+\])*)$", source)
    if not m or m.group(1) not in f_locals:
        return None
    obj = f_locals[m.group(1)]
    for index in re.findall(r"\[(\d+)\]", m.group(2)):
        try:
            obj = obj[int(index)]
        except (TypeError, IndexError, KeyError):
            return None
    return obj


def frame_roots(gm: fx.GraphModule, module_paths: dict[int, str]) -> dict[str, str]:
    """{frame source: module path in the compiled model} for the frame being compiled, so that
    a graph captured inside a submodule's forward (after a graph break) reports full paths."""
    if not module_paths:
        return {}
    try:  # dynamo is tracing this frame: its translator holds the frame's real locals
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = InstructionTranslator.current_tx().f_locals
    except Exception:  # noqa: BLE001 - no translator (e.g. called outside dynamo): no rebase
        return {}
    roots = {}
    for source in frame_sources(gm):
        obj = _resolve(source, f_locals)
        if obj is not None and id(obj) in module_paths:
            roots[source] = module_paths[id(obj)]
    return roots


class ClusterfxBackend:
    """`torch.compile(model, backend=ClusterfxBackend(state))`."""

    def __init__(self, state: CompileState):
        self.state = state
        self._subgraph_counter: dict[str, int] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs: list, mode: str | None = None,
                 options: dict | None = None):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        rebase_module_paths(gm, frame_roots(gm, self.state.module_paths))
        with self.state.lock:
            index = len(self.state.records)
            ctx = torch._guards.CompileContext.try_get()
            cid = str(ctx.compile_id) if ctx is not None and ctx.compile_id else str(index)
            # graph breaks: several graphs per frame compile; number them within the attempt
            n = self._subgraph_counter.get(cid, 0)
            self._subgraph_counter[cid] = n + 1
        pass_ctx = PassContext(concrete=dict(zip(placeholders, example_inputs)),
                               graph_index=index, compile_id=f"{_frame_key()}/{n}",
                               tag_prefix=self.state.telemetry.token,
                               causal_modules=self.state.causal_modules, root=self.state.root)
        record = self.state.manager.run(gm, pass_ctx, self.state.stop_after,
                                        self.state.dump_dir)
        with self.state.lock:
            self.state.records.append(record)
        lifted = lift_installed(gm)  # modules a rewrite added to the model (compiler/install)
        if lifted is None:
            compiled = _downstream(self.state.backend, gm, example_inputs, mode, options,
                                   self.state.cache_key())
        else:
            gm, params, examples = lifted
            compiled = with_parameters(_downstream(self.state.backend, gm,
                                                   [*example_inputs, *examples], mode, options,
                                                   self.state.cache_key()), params)
        return count_runs(compiled, self.state)


class CacheStamp(CustomGraphPass):
    """A no-op post-grad pass whose uuid puts the compile's pass uuids (pass sources, policy,
    mesh) into Inductor's FX-graph cache key: graphs rewritten under different policies may
    look alike to Inductor, and its key does not see clusterfx's passes."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return self.key.encode()


def _downstream(name: str, gm, example_inputs, mode, options, cache_key: str = ""):
    if name == "eager":
        return gm.forward
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = dict(options or {})
        if mode:
            patches = {**torch._inductor.list_mode_options(mode), **patches}
        if torch._inductor.config.post_grad_custom_post_pass is None:
            patches.setdefault("post_grad_custom_post_pass", CacheStamp(cache_key))
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    return torch._dynamo.lookup_backend(name)(gm, example_inputs)


def _named_backend(gm: fx.GraphModule, example_inputs: list, mode: str | None = None,
                   options: dict | None = None):
    """`torch.compile(m, backend="clusterfx", options={"policy": ..., "backend": ...})`;
    the remaining options go to Inductor. `clusterfx.explain()` reports the latest one."""
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
