"""Helpers of long-running commands: progress lines, side-by-side timing, input descriptions,
and the reference models the demo and the benchmarks build."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clusterfx.compiler.api import compile as cfx_compile
from clusterfx.compiler.api import explain
from clusterfx.models import MODEL_FACTORIES, example_inputs

BACKENDS = ("inductor", "aot_eager", "eager")
DEMO_DIM, DEMO_HEADS, BATCH = 128, 4, 2


class Progress:
    """One stderr line when a long step starts and one when it ends, with elapsed seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def step(self, what: str):
        began = time.perf_counter()
        print(f"[{began - self.start:7.1f}s] {what} ...", file=sys.stderr, flush=True)
        yield
        now = time.perf_counter()
        print(f"[{now - self.start:7.1f}s] {what}: done in {now - began:.2f}s",
              file=sys.stderr, flush=True)


def describe_inputs(inputs: tuple) -> str:
    parts = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"
             if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]
    return f"inputs [{'; '.join(parts)}], torch threads {torch.get_num_threads()}"


def machine_load() -> str:
    """The 1-minute load average and core count, for printing beside timings."""
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        load = "n/a"
    return f"load {load} on {os.cpu_count()} cores"


def _die_with_parent() -> None:
    """In a child, before exec: get SIGKILL when the parent dies (Linux prctl; else nothing)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def busy_neighbours(count: int):
    """Run ``count`` busy-looping processes (``while True: pass``, one core each) for the
    duration of the block, to time how code copes with a neighbour taking a core; they are
    killed on exit, also on error or Ctrl-C (and, on Linux, when this process dies)."""
    if count < 0:
        raise ValueError(f"count ({count}) must be >= 0")
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def reference_inputs(name: str, model: Any, seq_len: int) -> tuple:
    max_len = getattr(model, "max_len", None)
    if max_len is not None and seq_len > max_len:
        raise ValueError(f"--seq-len ({seq_len}) must be at most the model's max_len "
                         f"({max_len})")
    return example_inputs(name, batch=BATCH, seq_len=seq_len, model=model)


def build_reference(name: str, layers: int, seq_len: int, dim: int = DEMO_DIM,
                    heads: int = DEMO_HEADS) -> tuple[torch.nn.Module, tuple]:
    """One of `clusterfx.models` with `layers` blocks and inputs of about `seq_len` tokens
    (ViT: an image of round(sqrt(seq_len)) patches a side, plus the class token)."""
    if layers < 1 or seq_len < 2:
        raise ValueError(f"--layers ({layers}) must be >= 1 and --seq-len ({seq_len}) >= 2")
    factory = MODEL_FACTORIES[name]
    if name == "vit":
        side = max(1, round(seq_len ** 0.5))
        model = factory(image_size=8 * side, patch_size=8, dim=dim, depth=layers, heads=heads)
    else:
        model = factory(dim=dim, depth=layers, heads=heads, max_len=max(512, seq_len))
    model.eval()
    return model, reference_inputs(name, model, seq_len)


def time_side_by_side(fns: dict[str, Callable], inputs: tuple, warmup: int = 2,
                      runs: int = 9) -> dict[str, Any]:
    """Median forward seconds of each function, interleaved so machine noise hits all alike;
    speed-ups are relative to the first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for i in range(warmup + runs):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(*inputs)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[next(iter(fns))]
    return {**{f"{name}_s": m for name, m in medians.items()},
            **{f"speedup_{name}": base / m for name, m in medians.items()},
            "runs": runs, "warmup": warmup}


def compile_and_run(model: Any, inputs: tuple, policy: Any, backend: str, *,
                    strict: bool = False, dump_dir=None) -> tuple[Any, Any]:
    """Compile, run once without grad, and return (compiled model, its report)."""
    torch._dynamo.reset()  # fresh caches: every command compiles its own model from scratch
    compiled = cfx_compile(model, policy=policy, backend=backend, strict=strict,
                           dump_dir=dump_dir)
    with torch.no_grad():
        compiled(*inputs)
    return compiled, explain(compiled)


def proc_status_kib(key: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmHWM``, ``VmRSS``...) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)
