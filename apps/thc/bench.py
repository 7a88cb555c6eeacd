"""`clusterfx bench thc`: THC's runtime and peak memory against the number of ROIs.

For each N: one training step (forward + backward, eager, train mode) timed as the median of
`repeats` after a warm-up; its peak live tensor memory from the profiler's memory timeline
(parameters, activations and gradients; CPU); and, side by side in the same process, the eval
forward in eager and compiled by `clusterfx.compile(backend="inductor", fullgraph=True)`, with
their largest difference. Ratios are against the smallest N (dense attention makes time and
memory grow like N², the input itself is B·N² numbers).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import clusterfx as cfx

from ...models.thc import THC

BACKENDS = ("eager", "inductor")


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocator, lazy initialisation, compiled-code caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak live tensor bytes (CPU) while `fn` runs, from the profiler memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA; fine on CPU
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return int(max(sum(row) for row in sizes)) if sizes else 0


def _machine() -> dict[str, object]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()]}


def bench_one(rois: int, batch: int, repeats: int, backends: tuple[str, ...]) -> dict:
    torch.manual_seed(0)
    model = THC(rois)
    x = torch.randn(batch, rois, rois)
    x = (x + x.transpose(1, 2)) / 2  # (B, N, N) symmetric, like connectivity

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).logits.sum().backward()

    row: dict[str, object] = {"rois": rois, "batch": batch,
                              "parameters": sum(p.numel() for p in model.parameters())}
    if "eager" in backends:
        model.train()
        row["train_step_ms"] = 1e3 * _median_seconds(train_step, repeats)
        row["peak_memory_mb"] = peak_memory_bytes(train_step) / 2**20
    if "inductor" in backends:
        model.eval()
        torch._dynamo.reset()
        compiled = cfx.compile(model, backend="inductor", fullgraph=True)
        with torch.no_grad():
            start = time.perf_counter()
            got = compiled(x).logits
            row["compile_s"] = time.perf_counter() - start
            want = model(x).logits
            row["max_abs_diff"] = float((got - want).abs().max())
            row["eager_forward_ms"] = 1e3 * _median_seconds(lambda: model(x), repeats)
            row["inductor_forward_ms"] = 1e3 * _median_seconds(lambda: compiled(x), repeats)
    return row


def format_table(rows: list[dict]) -> str:
    base = rows[0]
    head = ("ROIs", "params", "train ms", "×", "peak MB", "×", "eager fwd ms", "inductor fwd ms",
            "eager/ind", "compile s", "max|diff|")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        def ratio(key: str, r=r) -> str:
            return f"{r[key] / base[key]:.1f}" if key in r and base.get(key) else "-"

        def value(key: str, fmt: str, r=r) -> str:
            return format(r[key], fmt) if key in r else "-"

        speed = (f"{r['eager_forward_ms'] / r['inductor_forward_ms']:.2f}"
                 if "inductor_forward_ms" in r else "-")
        lines.append(" | ".join([
            str(r["rois"]), str(r["parameters"]), value("train_step_ms", ".1f"),
            ratio("train_step_ms"), value("peak_memory_mb", ".1f"), ratio("peak_memory_mb"),
            value("eager_forward_ms", ".1f"), value("inductor_forward_ms", ".1f"), speed,
            value("compile_s", ".1f"), value("max_abs_diff", ".1e")]))
    return "\n".join(lines)


def bench(rois: tuple[int, ...] = (100, 200, 400, 1000), *, batch: int = 8, repeats: int = 3,
          backends: tuple[str, ...] = BACKENDS, threads: int | None = None) -> dict:
    """Run the benchmark, print the table with shapes, dtype, threads and load; return it."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"backends {list(backends)}: accepted are {list(BACKENDS)}")
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch ({batch}) and repeats ({repeats}) must be at least 1")
    small = [n for n in rois if n < 12]
    if small:
        raise ValueError(f"rois {small}: THC's default 12 → 4 clusters need at least 12 ROIs")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads ({threads}) must be at least 1")
        torch.set_num_threads(threads)
    before = _machine()
    print(f"THC N → 12 → 4 clusters (defaults), input (B={batch}, N, N) float32, CPU "
          f"{before['cpu']} ({before['cores']} cores), {before['threads']} threads, torch "
          f"{before['torch']}, load average {before['load_average']}", flush=True)
    rows = []
    for n in rois:
        rows.append(bench_one(n, batch, repeats, backends))
        print(f"  N = {n}: done", flush=True)
    after = _machine()
    print(format_table(rows))
    print(f"load average after: {after['load_average']}; medians of {repeats} runs; the "
          f"machine may be shared, compare ratios rather than absolute times")
    return {"machine": before, "load_after": after["load_average"], "batch": batch,
            "dtype": "float32", "repeats": repeats, "rows": rows}
