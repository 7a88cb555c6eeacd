"""Whether dynamo handed clusterfx anything: every call of a compiled model is watched, and a
call in which no clusterfx graph ran (or dynamo gave up on a frame) is a *capture problem*:
the user is warned once per cause, `explain()` reports it, and `strict=True` raises.

Why this is needed. Dynamo decides per frame whether to compile, reuse or skip, and its
decisions are silent: past `torch._dynamo.config.recompile_limit` on a code object (HF models
share their forward decorators' code objects), for a frame in its skip list, under a user's
`torch._dynamo.disable` or `torch.compiler.set_stance("force_eager")`, the model simply runs
uncompiled — and every attention runs dense, unreported.

How it is seen. The backend wraps every graph it compiles in a counter (`count_runs`); a call
that ran none of them ran no clusterfx graph. Dynamo's own warnings during the call (its
"hit config.recompile_limit" line) name the cause when there is one; otherwise the cause is
read from the model (`torch._dynamo.disable` on its forward), dynamo's stance and config.

Dynamo's automatic-dynamic memory (which input sizes it has seen vary) is kept per code object
for the whole process: after model A, model B sharing a code object with it (HF's forward
decorators, a wrapper) would be traced with symbolic shapes on its first compile (Swin: 65 s
instead of 3 s). `own_dynamic_state` gives each compile its own memory during its calls.

Every compile gets its own dynamo cache region (`torch.compile(isolate_recompiles=True)`), so
compiles never count against each other's `recompile_limit`; the process-wide
`accumulated_recompile_limit` (256 entries per code object over all regions, never freed while
the process lives) is raised to `ACCUMULATED_LIMIT` during clusterfx's own calls only.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import warnings
from typing import Any

import torch

ACCUMULATED_LIMIT = 1 << 16  # dynamo cache entries per code object, over all compiles


class CaptureWarning(UserWarning):
    """Dynamo did not hand (part of) a call to clusterfx: that part ran uncompiled and dense."""


class _DynamoLog(logging.Handler):
    """Collects dynamo's warnings that mean a frame will run uncompiled."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.limits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log record is not our problem
            return
        if "hit config." in text and "limit" in text:
            self.limits.append(" ".join(text.split("\n")[:2]).strip())


def count_runs(fn: Any, state: Any) -> Any:
    """`fn` (a compiled graph) counting its runs in `state.graph_runs`."""
    def run(*args: Any, **kwargs: Any) -> Any:
        state.graph_runs += 1
        return fn(*args, **kwargs)
    return run


def disabled_parts(target: Any) -> list[str]:
    """Module paths (or the callable's name) whose forward is wrapped in
    `torch._dynamo.disable`: dynamo never traces them."""
    if isinstance(target, torch.nn.Module):
        return [name or "<root>" for name, mod in target.named_modules()
                if getattr(mod.forward, "_torchdynamo_disable", False)
                or getattr(type(mod).forward, "_torchdynamo_disable", False)]
    if getattr(target, "_torchdynamo_disable", False):
        return [getattr(target, "__name__", type(target).__name__)]
    return []


def _no_graph_cause(target: Any) -> str:
    """Why no clusterfx graph ran in a call, as far as it can be told."""
    if os.environ.get("TORCHDYNAMO_DISABLE") == "1" or torch._dynamo.config.disable:
        return "dynamo is disabled (TORCHDYNAMO_DISABLE=1 or torch._dynamo.config.disable)"
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    if stance != "default":
        return f"torch.compiler.set_stance({stance!r}) is in effect"
    disabled = disabled_parts(target)
    if "<root>" in disabled or (disabled and not isinstance(target, torch.nn.Module)):
        return "the model's forward is wrapped in torch._dynamo.disable"
    return ("dynamo skipped every frame of the call (code it does not trace, or a graph break "
            "before any graph); TORCH_LOGS=graph_breaks,recompiles shows why")


@contextlib.contextmanager
def own_dynamic_state(state: Any):
    """During a call: dynamo's automatic-dynamic code state is this compile's own."""
    try:
        from torch._dynamo import pgo
    except ImportError:  # pragma: no cover - another torch layout: nothing to isolate
        yield
        return
    if not hasattr(pgo, "_CODE_STATE") or not hasattr(pgo, "CodeState"):
        yield
        return
    if state.code_state is None:
        state.code_state = collections.defaultdict(pgo.CodeState)
    saved, pgo._CODE_STATE = pgo._CODE_STATE, state.code_state
    try:
        yield
    finally:
        pgo._CODE_STATE = saved


@contextlib.contextmanager
def watching(state: Any, target: Any):
    """Around one call of a compiled model: record capture problems in `state`, warn once per
    cause. `state` is a CompileState; `target` the model or callable that was compiled."""
    handler = _DynamoLog()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    runs = state.graph_runs
    limit = max(torch._dynamo.config.accumulated_recompile_limit, ACCUMULATED_LIMIT)
    try:
        with torch._dynamo.config.patch(accumulated_recompile_limit=limit), \
                own_dynamic_state(state):
            yield
    finally:
        logger.removeHandler(handler)
    state.calls += 1
    if handler.limits:
        state.dynamo_limit = handler.limits[-1]
    causes = []
    if state.graph_runs == runs:
        why = (f"dynamo gave up on it ({state.dynamo_limit})" if state.dynamo_limit
               else _no_graph_cause(target))
        causes.append(f"no clusterfx graph ran in this call, which ran uncompiled and dense: "
                      f"{why}")
    elif handler.limits:
        causes.append(f"part of this call ran uncompiled and dense: dynamo gave up on a frame "
                      f"({handler.limits[-1]})")
    if state.calls == 1:
        parts = [p for p in disabled_parts(target) if p != "<root>"]
        if parts and isinstance(target, torch.nn.Module):
            causes.append(f"torch._dynamo.disable on {', '.join(parts)}: attention inside "
                          f"runs uncompiled and dense")
    for cause in causes:
        state.capture_problems[cause] = state.capture_problems.get(cause, 0) + 1
        if state.capture_problems[cause] == 1:
            warnings.warn(f"clusterfx: {cause}", CaptureWarning, stacklevel=4)
