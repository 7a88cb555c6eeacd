"""What users call: `compile`, `transform`, `explain`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from clusterfx.compiler.backend import LAST_STATE, ClusterfxBackend, check_backend
from clusterfx.compiler.capture import own_dynamic_state, watching
from clusterfx.compiler.mesh import mesh_key
from clusterfx.compiler.mesh import resolve as resolve_mesh
from clusterfx.compiler.pass_manager import check_stop_after
from clusterfx.compiler.report import (
    Report,
    Row,
    sequence_parallel_summary,
    sequence_parallel_traffic,
)
from clusterfx.compiler.state import CompileState
from clusterfx.config.policy import Policy
from clusterfx.config.vocabulary import PolicyError


@contextlib.contextmanager
def _mha_fast_path_off():
    """nn.MultiheadAttention / TransformerEncoderLayer take a fused fast path in eval under
    no_grad; tracing the ordinary path lets the passes see (and rewrite) the attention."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _causal_hint_as_given(mask, is_causal=None, size=None):
    """`nn.Transformer*`'s causal-mask detection without its `.item()` (a graph break that left
    `nn.Transformer` with no graph at all): the hint stays what the caller gave (None: False).
    The hint only lets SDPA drop a causal mask for `is_causal=True`; with it False the mask
    itself is applied, so the result is the same."""
    return bool(is_causal)


@contextlib.contextmanager
def _traceable_library_code():
    """While a compiled model runs: library code dynamo would break on is replaced by
    traceable equivalents (same results); see `_causal_hint_as_given`."""
    from torch.nn.modules import transformer

    before = transformer._detect_is_causal_mask
    transformer._detect_is_causal_mask = _causal_hint_as_given
    try:
        yield
    finally:
        transformer._detect_is_causal_mask = before


@contextlib.contextmanager
def _own_errors():
    """Errors clusterfx raises on purpose (strict policies, bad configs) reach the caller as
    themselves, not wrapped in dynamo's BackendCompilerFailed."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        inner = getattr(exc, "inner_exception", None)
        if isinstance(inner, (PolicyError, ValueError, TypeError)):
            raise inner from None
        raise


def _run(compiled: Any, state: CompileState, target: Any, args: tuple, kwargs: dict) -> Any:
    """One call of a compiled model, watched (compiler/capture.py); under `strict=True`, the
    first call that compiles raises for policy keys that matched no site, and any call that
    ran (partly) uncompiled raises."""
    graphs, problems = len(state.records), sum(state.capture_problems.values())
    with _mha_fast_path_off(), _traceable_library_code(), _own_errors(), \
            watching(state, target):
        out = compiled(*args, **kwargs)
    if state.policy.strict:
        if sum(state.capture_problems.values()) > problems:
            raise PolicyError(f"strict policy: {next(reversed(state.capture_problems))}")
        if len(state.records) > graphs:
            _checked(state)
    return out


class CompiledModule(torch.nn.Module):
    """The result of `clusterfx.compile` on an `nn.Module`: call it like the model."""

    def __init__(self, model: torch.nn.Module, compiled: Any, state: CompileState):
        super().__init__()
        self._orig_mod = model
        self._compiled = compiled
        self._clusterfx_state = state

    def forward(self, *args, **kwargs):
        return _run(self._compiled, self._clusterfx_state, self._orig_mod, args, kwargs)


class CompiledFunction:
    """The result of `clusterfx.compile` on a plain callable."""

    def __init__(self, fn: Any, compiled: Any, state: CompileState):
        self._orig_fn = fn
        self._compiled = compiled
        self._clusterfx_state = state

    def __call__(self, *args, **kwargs):
        return _run(self._compiled, self._clusterfx_state, self._orig_fn, args, kwargs)


def compile(model: Any, policy: Any = None, backend: str = "inductor", mesh: Any = None, *,
            strict: bool = False, dump_dir: str | Path | None = None,
            **torch_compile_kwargs: Any) -> CompiledModule | CompiledFunction:
    """Compile `model` with every attention rewritten per `policy` (see `Policy`).

    `backend`: "inductor" (default), "aot_eager", "eager", or any registered dynamo backend.
    `strict=True`: a config that cannot apply raises while compiling; a policy key that
    matches no site raises at the first call; so does a call dynamo did not hand to clusterfx.
    `dump_dir`: write each graph's code before/after every pass and SVG pictures of each site.
    `mesh`: sequence parallelism over torch.distributed (see `compiler/mesh.py`): a
    `cfx.SequenceParallel(ulysses=, ring=, ...)`, a DeviceMesh with dims "ulysses"/"ring", or
    both as a pair; every rank then calls the model with the same whole inputs (shapes are
    static: each new length compiles again).
    Other keyword arguments (`dynamic`, `fullgraph`, `mode`, `options`...) go to torch.compile.

    Every call is watched: when dynamo does not hand (part of) a call to clusterfx (a
    recompile limit, a skipped frame, `torch._dynamo.disable`), a `CaptureWarning` names the
    cause once and `explain()` reports it. Each compile has its own dynamo cache region, so any
    number of compiles in one process all apply.
    """
    if not callable(model):
        raise TypeError(f"model ({type(model).__name__}) must be an nn.Module or a callable")
    resolved = Policy.make(policy, strict=strict)
    check_backend(backend)
    dump = _check_dump_dir(dump_dir)
    key = mesh_key(mesh)
    if key is not None:
        # sequence parallelism: resolved against the process group now (errors before any
        # work); static shapes, so that every length is sharded with literal sizes
        torch_compile_kwargs.setdefault("dynamic", False)
    for name in ("isolate_recompiles", "backend"):
        if name in torch_compile_kwargs:
            raise TypeError(f"compile() sets torch.compile's {name!r} itself; got "
                            f"{name}={torch_compile_kwargs[name]!r}")
    state = CompileState(resolved, backend, dump, mesh=mesh, mesh_key=key,
                         resolved_mesh=resolve_mesh(mesh),
                         root=model if isinstance(model, torch.nn.Module) else None,
                         module_paths=_module_paths(model),
                         causal_modules=_causal_modules(model))
    compiled = torch.compile(model, backend=ClusterfxBackend(state), isolate_recompiles=True,
                             **torch_compile_kwargs)
    if isinstance(model, torch.nn.Module):
        return CompiledModule(model, compiled, state)
    return CompiledFunction(model, compiled, state)


def _module_paths(model: Any) -> dict[int, str]:
    if not isinstance(model, torch.nn.Module):
        return {}
    return {id(m): name for name, m in model.named_modules()}


def _causal_modules(model: Any) -> dict[str, str]:
    """Module paths whose module declares a causal query stream: `is_causal=True` or
    `is_decoder=True` set on it (Hugging Face attention modules, cross-attention included)."""
    if not isinstance(model, torch.nn.Module):
        return {}
    out = {}
    for name, mod in model.named_modules():
        for attr in ("is_causal", "is_decoder"):
            if getattr(mod, attr, None) is True:
                out[name] = f"{name or '<root>'} ({type(mod).__name__}) declares {attr}=True"
                break
    return out


def _check_dump_dir(dump_dir: Any) -> Path | None:
    """`dump_dir` as a folder that exists (created now), or a ValueError naming it."""
    if dump_dir is None:
        return None
    if not isinstance(dump_dir, (str, Path)) or str(dump_dir) == "":
        raise ValueError(f"dump_dir ({dump_dir!r}) must be a folder path (str or Path)")
    path = Path(dump_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"dump_dir ({str(path)!r}) is an existing file; it must be a folder "
                         f"(created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"dump_dir ({str(path)!r}) cannot be created as a folder: "
                         f"{exc.strerror or exc}") from None
    return path


def transform(model: Any, example_inputs: Any, policy: Any = None, *,
              strict: bool = False, stop_after: str | None = None,
              **torch_compile_kwargs: Any) -> fx.GraphModule:
    """Capture `model(*example_inputs)` and return the rewritten graph (code that runs; its
    inputs are the captured graph's placeholders: the model's tensors, then its parameters).

    The model must capture as one graph (no graph breaks). `stop_after="canonicalize"` returns
    the graph with canonical `clusterfx.attention` nodes, before lowering. The report is in
    `gm.meta["clusterfx_report"]`."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (
        example_inputs,)
    resolved = Policy.make(policy, strict=strict)
    check_stop_after(stop_after)
    state = CompileState(resolved, "eager", stop_after=stop_after,
                         root=model if isinstance(model, torch.nn.Module) else None,
                         module_paths=_module_paths(model),
                         causal_modules=_causal_modules(model))
    captured: list[fx.GraphModule] = []

    class _Keep(ClusterfxBackend):
        def __call__(self, gm, ex, mode=None, options=None):
            fn = super().__call__(gm, ex)
            captured.append(gm)
            return fn

    with _mha_fast_path_off(), _traceable_library_code(), _own_errors(), \
            own_dynamic_state(state):
        torch.compile(model, backend=_Keep(state), fullgraph=True, isolate_recompiles=True,
                      **torch_compile_kwargs)(*inputs)
    gm = captured[-1]
    gm.meta["clusterfx_report"] = _checked(state)
    return gm


def _report(state: CompileState) -> Report:
    records = state.latest_records()
    # a recompiled graph replaces its earlier record; its sites keep their telemetry names,
    # so run-time path counts of all versions add up
    rows = [Row(site, state.telemetry.paths(site.runtime_tag) if site.runtime_tag else {},
                sequence_parallel_traffic(site.sequence_parallel.tag)
                if site.sequence_parallel is not None else {})
            for rec in records for site in rec.sites]
    paths = [r.fqn for r in rows]
    return Report(rows=rows, unmatched_keys=state.policy.unmatched_keys(paths),
                  graphs=len(records), compiles=len(state.records), calls=state.calls,
                  capture_problems=dict(state.capture_problems),
                  pass_seconds=sum(sum(r.pass_seconds.values()) for r in records),
                  policy=state.policy.to_dict(),
                  sequence_parallel=sequence_parallel_summary(records, state.resolved_mesh))


def _checked(state: CompileState) -> Report:
    """The report; under a strict policy, an error if a key matched no site."""
    report = _report(state)
    if state.policy.strict and report.unmatched_keys:
        raise PolicyError(f"policy keys matched no attention site: {report.unmatched_keys}; "
                         f"sites are {[r.fqn for r in report.rows]}")
    return report


def explain(compiled: Any = None, *inputs: Any, **kwargs: Any) -> Report:
    """The Report of a `clusterfx.compile`d model (after at least one call). With inputs, the
    model is first run on them. With no argument, the latest `backend="clusterfx"` compile."""
    if compiled is None:
        state = LAST_STATE[0]
        if state is None:
            raise ValueError("nothing has been compiled with backend='clusterfx' yet")
        return _report(state)
    state = getattr(compiled, "_clusterfx_state", None)
    if state is None:
        raise TypeError(f"explain() takes what clusterfx.compile returned, got "
                        f"{type(compiled).__name__}")
    if inputs or kwargs:
        compiled(*inputs, **kwargs)
    if not state.records and not state.capture_problems:
        raise ValueError("the model has not run yet: call it once, or pass inputs to explain()")
    return _checked(state)
