"""`clusterfx bench attention`: dense SDPA against clustered, i-clustered and top-k attention.

    clusterfx bench attention [--sizes 1024 2048 ... 32768] [--methods dense clustered ...]
        [--repeats 3] [--heads 8] [--dim 64] [--clusters 100] [--topk 32] [--dtype float32]
        [--metric attention|euclidean] [--iterations 5] [--refine 1]
        [--device cpu|cuda] [--threads T] [--budget 240] [--no-backward] [--no-memory]
        [--load N] [--json PATH] [--markdown PATH]

Self-attention on q, k, v ~ N(0, 1) of shape (B=1, H, N, D) from a seeded generator; every
method runs through its public op with impl="auto" and clustering seed 0; dense is
``F.scaled_dot_product_attention`` without a mask. The implementation that ran (telemetry
counters) is printed per method ("clustered [cpu]" = the fused C++ kernels). The opt-in
``*-torch`` methods run the same ops with impl="torch" (the vectorised torch path), for a side
by side view of what the fused kernels buy.

``--load N`` starts N busy-looping processes (``while True: pass``) before the first timing and
stops them afterwards, always (also on error or Ctrl-C; on Linux they also die with the bench),
to measure how each method copes with a neighbour taking a core.

Work rate: every method also gets its *essential* FLOPs (``essential_flops``: for clustered
attention hashing 2·BH·N·D·bits, Lloyd steps refine·2·BH·N·C·D, centroid attention
2·BH·C·N·(D + Dv), the keys' covariance 2·B·Hk·min(N, 4096)·D²; i-clustered adds
2·BH·N·k·(D + Dv); top-k 2·BH·N²·D + 2·BH·N·k·Dv; dense 4·BH·N²·D; backward passes count
2.5× the differentiable part) and the table shows achieved GFLOP/s and that rate as a fraction of
the same run's SDPA rate: the distance to the machine's limit.

Time: the median of R calls after one warm-up call, for the forward (under ``no_grad``) and for
the forward + backward (``out.backward(g)``, g fixed). All methods run in this one process, round
robin for each N (warm-ups, then R rounds of every method), so a burst of load on a shared machine
hits them all alike; speed-up = t_dense / t_method. A case whose warm-up took more than
``budget / R`` seconds gets ``max(1, budget // warm-up)`` repeats instead, shown in the table.

Peak memory on CPU (``--memory``, the default; it adds one call per case): torch's CPU allocator
is plain malloc, invisible to tracemalloc, so each (method, N, pass) runs once more in a fresh
``python -m clusterfx.bench.attention --worker SPEC``, which reports its peak RSS minus
its RSS after creating the inputs (and after one call at N ≤ 1024, so code pages and thread pools
are not counted). The child gets ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every buffer
of 64 KiB or more by mmap and unmaps it on free, so RSS follows the live tensors. The peak is
``VmHWM`` from /proc/self/status, reset by writing 5 to /proc/self/clear_refs after the baseline:
``ru_maxrss`` is not usable on Linux because a child keeps its parent's peak RSS across exec
(a child of a 1 GiB parent reports at least 1 GiB); it is only the fallback without /proc. The
peak counts the output and, for fwd+bwd, the gradients of q, k, v. The kernel's RSS counters
are batched per CPU, so a peak is only good to a few hundred KiB.

CUDA (``--device cuda``) -- UNTESTED, written without a GPU: defaults become bf16, H=16 and N up
to 65536; each call is timed by CUDA events after ``torch.cuda.synchronize()``; memory is
``torch.cuda.max_memory_allocated()`` minus the allocation before the call, in-process; a
``flex`` method (FlexAttention under ``torch.compile``, no block mask) is added when importable.

Dense (and flex) also report achieved TFLOP/s: 4·B·H·N²·D flops forward, 2.5 times that backward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from clusterfx.apps.common import busy_neighbours, proc_status_kib
from clusterfx.bench.limits import check_sizes
from clusterfx.config.configs import ImprovedClustered
from clusterfx.ops.common.telemetry import counters

METHODS = ("dense", "clustered", "i-clustered", "topk", "flex", "clustered-paper",
           "i-clustered-paper", "clustered-torch", "i-clustered-torch", "topk-torch")
OPT_IN = ("flex", "clustered-paper", "i-clustered-paper", "clustered-torch",
          "i-clustered-torch", "topk-torch")  # not run unless asked for
# the op whose telemetry counter tells which implementation ran, per method family
OPS = {"clustered": "clustered_attention", "i-clustered": "improved_clustered_attention",
       "topk": "topk_attention"}
# the paper's clustering (fast-transformers' defaults), for side-by-side cost comparisons
PAPER_CLUSTERING = {"metric": "euclidean", "iterations": 10, "refine": 0}
CPU_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)
CUDA_SIZES = (*CPU_SIZES, 65536)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = ("fwd", "fwd+bwd")
SEED = 0
_NOISY = 2.0  # slowest / fastest timed run above which a case is listed as noisy
_ANNOUNCE_S = 30.0  # timed calls expected to take longer get a "started" progress line
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# (label, method, pass, quantity, N, at least?, bound, condition); checked on CPU runs only.
# condition: which runs a target applies to -- "quiet" (no --load), "loaded" (--load >= 1),
# "d64" / "d32" (quiet runs with that --dim), or "any".
CPU_TARGETS = (
    ("clustered fwd speed-up at 16k >= 40 (D=64)", "clustered", "fwd", "speedup", 16384, True,
     40.0, "d64"),
    ("clustered fwd speed-up at 4k >= 8 (D=64)", "clustered", "fwd", "speedup", 4096, True,
     8.0, "d64"),
    ("clustered fwd speed-up at 16k >= 20 (D=32)", "clustered", "fwd", "speedup", 16384, True,
     20.0, "d32"),
    ("i-clustered fwd speed-up at 16k >= 20", "i-clustered", "fwd", "speedup", 16384, True,
     20.0, "quiet"),
    ("clustered fwd+bwd speed-up at 16k >= 30", "clustered", "fwd+bwd", "speedup", 16384, True,
     30.0, "quiet"),
    ("top-k fwd speed-up at 16k >= 1.3", "topk", "fwd", "speedup", 16384, True, 1.3, "quiet"),
    ("clustered fwd time per doubling from 16k <= 2.2", "clustered", "fwd", "doubling", 16384,
     False, 2.2, "any"),
    ("clustered fwd speed-up at 16k >= 20 with a busy neighbour (--load >= 1)", "clustered",
     "fwd", "speedup", 16384, True, 20.0, "loaded"),
    ("clustered fwd peak(32k)/peak(16k) <= 2.3 (O(N·C))", "clustered", "fwd", "memory_growth",
     32768, False, 2.3, "any"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", help="sequence lengths N (default "
                   f"{' '.join(map(str, CPU_SIZES))}; on cuda up to 65536)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: dense, clustered, "
                   "i-clustered, topk (and flex on cuda when importable); dense is always "
                   "added as the baseline; *-paper: (i-)clustered with the paper's clustering "
                   "(metric euclidean, 10 iterations, no refinement)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (median)")
    p.add_argument("--heads", type=int, help="H (default 8 on cpu, 16 on cuda)")
    p.add_argument("--dim", type=int, default=64, help="head dim D")
    p.add_argument("--clusters", type=int, default=100, help="C for clustered and i-clustered")
    p.add_argument("--topk", type=int, default=32, help="k for i-clustered and top-k")
    default = ImprovedClustered()
    p.add_argument("--metric", choices=("attention", "euclidean"), default=default.metric,
                   help="clustering geometry of (i-)clustered (the paper: euclidean)")
    p.add_argument("--iterations", type=int, default=default.iterations,
                   help="k-means iterations of (i-)clustered (default %(default)s; paper 10)")
    p.add_argument("--refine", type=int, default=default.refine,
                   help="Lloyd steps of (i-)clustered (default %(default)s; paper 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 cpu, bfloat16 cuda")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds of timed calls per case before repeats are reduced")
    p.add_argument("--no-backward", dest="backward", action="store_false",
                   help="time the forward only")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory (on cpu: one subprocess per case)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="start N busy-looping processes for the run (stopped afterwards)")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the report as Markdown")


# ------------------------------------------------------------------------------ what is timed
def make_method(name: str, clusters: int, topk: int,
                clustering: dict | None = None) -> Callable:
    """(q, k, v) -> out for one method, through its public op (impl="auto", fixed seed;
    ``*-torch``: impl="torch"); ``clustering``: metric / iterations / refine of (i-)clustered
    (default: the ops')."""
    clustering = clustering or {}
    impl = "auto"
    if name.endswith("-paper"):
        name, clustering = name.removesuffix("-paper"), PAPER_CLUSTERING
    if name.endswith("-torch"):
        name, impl = name.removesuffix("-torch"), "torch"
    if name == "dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if name == "clustered":
        from clusterfx.ops.clustered import clustered_attention
        return lambda q, k, v: clustered_attention(q, k, v, clusters=clusters, seed=SEED,
                                                   impl=impl, **clustering)
    if name == "i-clustered":
        from clusterfx.ops.clustered import improved_clustered_attention
        return lambda q, k, v: improved_clustered_attention(q, k, v, clusters=clusters,
                                                            topk=topk, seed=SEED, impl=impl,
                                                            **clustering)
    if name == "topk":
        from clusterfx.ops.topk import topk_attention
        return lambda q, k, v: topk_attention(q, k, v, topk=topk, impl=impl)
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v)


def make_inputs(n: int, cfg: dict) -> tuple[torch.Tensor, ...]:
    """q, k, v (requiring grad) and the output gradient, (1, H, n, D) each, seeded."""
    gen = torch.Generator().manual_seed(SEED)
    shape = (1, cfg["heads"], n, cfg["dim"])
    dtype = DTYPES[cfg["dtype"]]
    q, k, v, g = (torch.randn(shape, generator=gen).to(cfg["device"], dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g


def run_once(fn: Callable, inputs: tuple[torch.Tensor, ...], backward: bool) -> float:
    """Seconds for one forward (no_grad) or forward + backward call."""
    q, k, v, g = inputs
    cuda = q.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
    if backward:
        fn(q, k, v).backward(g)
    else:
        with torch.no_grad():
            fn(q, k, v)
    if not cuda:
        seconds = time.perf_counter() - began
    else:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    q.grad = k.grad = v.grad = None
    return seconds


# ------------------------------------------------------------------------------- peak memory
def worker(spec: dict) -> dict:
    """In a fresh process: peak resident bytes of one call above the RSS with inputs ready."""
    import gc
    import resource

    torch.set_num_threads(spec["threads"])
    fn = make_method(spec["method"], spec["clusters"], spec["topk"], spec["clustering"])
    run_once(fn, make_inputs(min(spec["n"], 1024), spec), spec["backward"])  # page code in
    inputs = make_inputs(spec["n"], spec)
    gc.collect()
    with_proc = Path("/proc/self/clear_refs").exists()
    if with_proc:
        base_kib = proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    else:  # ru_maxrss: KiB on Linux, bytes on macOS
        base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = run_once(fn, inputs, spec["backward"])
    peak_kib = (proc_status_kib("VmHWM") if with_proc
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if not with_proc and sys.platform == "darwin":
        base_kib, peak_kib = base_kib / 1024, peak_kib / 1024
    return {"peak_bytes": int(max(peak_kib - base_kib, 0) * 1024), "seconds": seconds,
            "memory_method": "VmHWM-after-clear_refs" if with_proc else "ru_maxrss"}


def peak_memory(fn: Callable, method: str, n: int, backward: bool, cfg: dict) -> int:
    """Peak bytes of one call: a worker subprocess on CPU, the caching allocator on CUDA."""
    if cfg["device"] == "cuda":
        inputs = make_inputs(n, cfg)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(fn, inputs, backward)
        return torch.cuda.max_memory_allocated() - base
    spec = {**cfg, "method": method, "n": n, "backward": backward}
    done = subprocess.run(
        [sys.executable, "-m", "clusterfx.bench.attention", "--worker", json.dumps(spec)],
        env={**os.environ, **_MALLOC_ENV}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {method} N={n} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


# ---------------------------------------------------------------------------------- the run
def _settings(args: argparse.Namespace) -> dict:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False; use --device cpu")
    methods = list(args.methods or [m for m in METHODS if m not in OPT_IN]
                   + (["flex"] if cuda and _has_flex() else []))
    if "flex" in methods and not cuda:
        raise ValueError("method flex runs on --device cuda only; drop it or pass --device cuda")
    methods = ["dense"] + [m for m in dict.fromkeys(methods) if m != "dense"]
    sizes = sorted(set(args.sizes or (CUDA_SIZES if cuda else CPU_SIZES)))
    for name, value in [("--sizes", min(sizes)), ("--repeats", args.repeats),
                        ("--heads", args.heads or 1), ("--dim", args.dim),
                        ("--clusters", args.clusters), ("--topk", args.topk),
                        ("--iterations", args.iterations),
                        ("--threads", args.threads or 1)]:
        if value < 1:
            raise ValueError(f"{name} ({value}) must be a positive integer")
    if args.refine < 0:
        raise ValueError(f"--refine ({args.refine}) must be >= 0")
    heads, dtype = args.heads or (16 if cuda else 8), args.dtype or (
        "bfloat16" if cuda else "float32")
    check_sizes(sizes, 1, heads, args.dim, dtype, args.device)
    if args.load < 0:
        raise ValueError(f"--load ({args.load}) must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    return {"batch": 1, "heads": args.heads or (16 if cuda else 8), "dim": args.dim,
            "dtype": args.dtype or ("bfloat16" if cuda else "float32"), "device": args.device,
            "threads": torch.get_num_threads(), "sizes": sizes, "methods": methods,
            "passes": list(PASSES if args.backward else PASSES[:1]), "repeats": args.repeats,
            "clusters": args.clusters, "topk": args.topk, "seed": SEED, "impl": "auto",
            "clustering": {"metric": args.metric, "iterations": args.iterations,
                           "refine": args.refine},
            "budget_s": args.budget, "memory": args.memory, "load_processes": args.load,
            "memory_method": (None if not args.memory else "cuda.max_memory_allocated" if cuda
                              else f"subprocess VmHWM - VmRSS, {_MALLOC_ENV}"),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _loadavg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flops(n: int, cfg: dict, backward: bool) -> float:
    forward = 4.0 * cfg["batch"] * cfg["heads"] * n * n * cfg["dim"]
    return forward * (3.5 if backward else 1.0)


def essential_flops(method: str, n: int, cfg: dict, backward: bool) -> float:
    """The work a method cannot avoid (module docstring), N queries and N keys, Dv = D."""
    base = method.removesuffix("-paper").removesuffix("-torch")
    bh, d, kk = cfg["batch"] * cfg["heads"], cfg["dim"], min(cfg["topk"], n)
    if base in ("dense", "flex"):
        return _flops(n, cfg, backward)
    if base == "topk":
        return 2.0 * bh * n * n * d + 2.0 * bh * n * kk * d * (3.5 if backward else 1.0)
    spec = PAPER_CLUSTERING if method.endswith("-paper") else cfg["clustering"]
    c = min(cfg["clusters"], n)
    clustering = 2.0 * bh * n * d * 63 + spec["refine"] * 2.0 * bh * n * c * d
    if spec["metric"] == "attention":
        clustering += 2.0 * cfg["batch"] * cfg["heads"] * min(n, 4096) * d * d
    attention = 2.0 * bh * c * n * 2 * d
    if base == "i-clustered":
        attention += 2.0 * bh * n * kk * 2 * d
    return clustering + attention * (3.5 if backward else 1.0)


def _ran(before: dict, method: str) -> str:
    """The implementation(s) whose counters moved since ``before`` ("-" for dense/flex)."""
    op = OPS.get(method.removesuffix("-paper").removesuffix("-torch"))
    if op is None:
        return "-"
    moved = sorted(k.split(".", 1)[1] for k, v in counters.items()
                   if k.startswith(op + ".") and v > before.get(k, 0))
    return "+".join(moved) or "?"


def measure(cfg: dict, log: Callable[[str], None]) -> list[dict]:
    """Timings (round robin per N, in this process) and peak memory of every case."""
    fns = {m: make_method(m, cfg["clusters"], cfg["topk"], cfg["clustering"])
           for m in cfg["methods"]}
    cfg.setdefault("ran", {})
    rows = []
    for n in cfg["sizes"]:
        inputs = make_inputs(n, cfg)
        cases = [(m, p) for m in cfg["methods"] for p in cfg["passes"]]
        times, reps, warms = {c: [] for c in cases}, {}, {}
        for m, p in cases:
            before = dict(counters)
            warms[m, p] = warm = run_once(fns[m], inputs, p == "fwd+bwd")
            cfg["ran"].setdefault(m, _ran(before, m))
            budget_reps = int(cfg["budget_s"] // max(warm, 1e-9))
            reps[m, p] = max(1, min(cfg["repeats"], budget_reps))
            log(f"N={n} {m} {p} warm-up {warm:.3f}s -> {reps[m, p]} repeat(s)")
        for r in range(cfg["repeats"]):
            for m, p in [c for c in cases if r < reps[c]]:
                if warms[m, p] > _ANNOUNCE_S:
                    log(f"N={n} {m} {p} run {r + 1}/{reps[m, p]} started (warm-up took "
                        f"{warms[m, p]:.0f}s)")
                times[m, p].append(run_once(fns[m], inputs, p == "fwd+bwd"))
                log(f"N={n} {m} {p} run {r + 1}/{reps[m, p]}: {times[m, p][-1]:.3f}s")
        del inputs
        for m, p in cases:
            peak = None
            if cfg["memory"]:
                peak = peak_memory(fns[m], m, n, p == "fwd+bwd", cfg)
                log(f"N={n} {m} {p} peak memory {peak / 2**20:.1f} MiB")
            rows.append({"method": m, "n": n, "pass": p, "times_s": times[m, p],
                         "repeats": reps[m, p], "median_s": statistics.median(times[m, p]),
                         "min_s": min(times[m, p]), "max_over_min": max(times[m, p]) / min(
                             times[m, p]), "peak_bytes": peak})
    for row in rows:
        dense = next(d for d in rows if d["method"] == "dense" and d["n"] == row["n"]
                     and d["pass"] == row["pass"])
        row["speedup_vs_dense"] = dense["median_s"] / row["median_s"]
        row["memory_saving_vs_dense"] = (dense["peak_bytes"] / row["peak_bytes"]
                                         if row["peak_bytes"] and dense["peak_bytes"] else None)
        row["tflops"] = (_flops(row["n"], cfg, row["pass"] == "fwd+bwd") / row["median_s"] / 1e12
                         if row["method"] in ("dense", "flex") else None)
        row["essential_gflop"] = essential_flops(row["method"], row["n"], cfg,
                                                 row["pass"] == "fwd+bwd") / 1e9
        row["gflop_per_s"] = row["essential_gflop"] / row["median_s"]
    for row in rows:
        dense = next(d for d in rows if d["method"] == "dense" and d["n"] == row["n"]
                     and d["pass"] == row["pass"])
        row["rate_vs_dense"] = row["gflop_per_s"] / dense["gflop_per_s"]
    return rows


def growth(rows: list[dict]) -> list[dict]:
    """t(N)/t(N_prev) and peak(N)/peak(N_prev) between the two largest sizes."""
    sizes = sorted({r["n"] for r in rows})
    if len(sizes) < 2:
        return []
    at = {(r["method"], r["pass"], r["n"]): r for r in rows}
    out = []
    for (m, p, n), hi in at.items():
        lo = at.get((m, p, sizes[-2])) if n == sizes[-1] else None
        if lo is not None:
            mem = (hi["peak_bytes"] / lo["peak_bytes"]
                   if hi["peak_bytes"] and lo["peak_bytes"] else None)
            out.append({"method": m, "pass": p, "from_n": sizes[-2], "to_n": n,
                        "time_ratio": hi["median_s"] / lo["median_s"], "memory_ratio": mem})
    return out


def run_conditions(cfg: dict) -> set[str]:
    """Which CPU_TARGETS conditions this run satisfies (module constant CPU_TARGETS)."""
    loaded = cfg.get("load_processes", 0) >= 1
    conds = {"any", "loaded" if loaded else "quiet"}
    if not loaded:
        conds.add(f"d{cfg['dim']}")
    return conds


def evaluate_targets(rows: list[dict], grown: list[dict],
                     conditions: set[str] | frozenset[str] = frozenset({"any", "quiet", "d64"})
                     ) -> list[dict]:
    """The CPU targets whose numbers were measured and whose condition this run meets:
    value, bound, met. "doubling" is (t(N_max)/t(N))^(1/log2(N_max/N)), the time factor per
    doubling of N from N up to the largest size measured."""
    out = []
    at = {(r["method"], r["pass"], r["n"]): r for r in rows}
    largest = max((r["n"] for r in rows), default=0)
    for label, method, pss, quantity, n, at_least, bound, condition in CPU_TARGETS:
        if condition not in conditions:
            continue
        value = None
        if quantity == "speedup" and (method, pss, n) in at:
            value = at[method, pss, n]["speedup_vs_dense"]
        elif quantity == "doubling" and largest > n and (method, pss, n) in at:
            ratio = at[method, pss, largest]["median_s"] / at[method, pss, n]["median_s"]
            value = ratio ** (1.0 / math.log2(largest / n))
        elif quantity == "memory_growth":
            hit = [g["memory_ratio"] for g in grown if (g["method"], g["pass"], g["to_n"])
                   == (method, pss, n) and g["from_n"] == n // 2]
            value = hit[0] if hit else None
        if value is not None:
            met = value >= bound if at_least else value <= bound
            label = label if quantity != "doubling" else f"{label} (to {largest})"
            out.append({"target": label, "value": value, "bound": bound, "met": met})
    return out


# ---------------------------------------------------------------------------------- reporting
def header(cfg: dict) -> str:
    sizes = ", ".join(map(str, cfg["sizes"]))
    return (f"bench attention: B={cfg['batch']} H={cfg['heads']} N in {{{sizes}}} "
            f"D={cfg['dim']}, {cfg['dtype']} on {cfg['device']}, torch.get_num_threads()="
            f"{cfg['threads']}; clusters={cfg['clusters']} topk={cfg['topk']} "
            f"metric={cfg['clustering']['metric']} iterations={cfg['clustering']['iterations']} "
            f"refine={cfg['clustering']['refine']} impl=auto "
            f"seed={cfg['seed']}; median of {cfg['repeats']} after a warm-up (fewer where "
            f"noted); busy neighbour processes (--load): {cfg['load_processes']}; "
            f"torch {cfg['torch']} ({cfg['cpu_capability']}); {os.cpu_count()} CPUs")


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: list[dict], cfg: dict) -> str:
    """One row per (N, method): the implementation that ran, then per pass: time, speed-up
    (t_dense/t), essential GFLOP/s and that rate over SDPA's, peak MiB, dense/method memory."""
    at = {(r["method"], r["n"], r["pass"]): r for r in rows}
    cols = ["N", "method", "impl"]
    for p in cfg["passes"]:
        cols += [f"{p} ms", f"{p} speed-up", f"{p} GFLOP/s", f"{p} rate/SDPA",
                 f"{p} peak MiB", f"{p} mem dense/x"]
    lines = ["| " + " | ".join(cols + ["repeats"]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    ran = cfg.get("ran", {})
    for n in cfg["sizes"]:
        for m in cfg["methods"]:
            cells = [str(n), m, ran.get(m, "-")]
            for p in cfg["passes"]:
                r = at[m, n, p]
                peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
                cells += [f"{r['median_s'] * 1e3:,.1f}", _ratio(r['speedup_vs_dense']),
                          f"{r['gflop_per_s']:,.1f}", f"{r['rate_vs_dense']:.2f}",
                          _cell(peak, ",.1f"), _cell(r["memory_saving_vs_dense"], ".2f")]
            reps = "/".join(str(at[m, n, p]["repeats"]) for p in cfg["passes"])
            lines.append("| " + " | ".join(cells + [reps]) + " |")
    return "\n".join(lines)


def _ratio(x: float) -> str:
    """A speed-up cell: two decimals, or two significant digits below 0.1 (a method 1000×
    slower than dense under a loaded machine reads 0.00099x, not 0.00x)."""
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def summary_lines(rows: list[dict], grown: list[dict], targets: list[dict],
                  cfg: dict) -> list[str]:
    load = cfg["loadavg"]
    lines = [f"1-min load average {load['start']:.2f} at start, {load['end']:.2f} at end, on "
             f"{os.cpu_count()} CPUs; this run adds about {cfg['threads']}, more means other "
             f"processes took cores, which slows many-small-op methods the most"]
    noisy = [r for r in rows if r["max_over_min"] > _NOISY]
    if noisy:
        cases = ", ".join(f"{r['method']} {r['pass']} N={r['n']} {r['min_s']:.3f}-"
                          f"{max(r['times_s']):.3f}s" for r in noisy)
        lines.append(f"noisy (slowest/fastest run > {_NOISY:g}; the JSON has every run): {cases}")
    for g in grown:
        mem = "" if g["memory_ratio"] is None else f", peak x{g['memory_ratio']:.2f}"
        lines.append(f"growth {g['method']} {g['pass']} N {g['from_n']} -> {g['to_n']}: "
                     f"time x{g['time_ratio']:.2f}{mem}")
    for r in rows:
        if r["tflops"] is not None:
            lines.append(f"achieved {r['method']} {r['pass']} N={r['n']}: "
                         f"{r['tflops']:.3f} TFLOP/s")
    for t in targets:
        lines.append(f"target {t['target']}: {t['value']:.2f} -> "
                     f"{'met' if t['met'] else 'MISSED'}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table, and write --json / --markdown when asked."""
    cfg = _settings(args)
    cfg["loadavg"] = {"start": _loadavg()}
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr,
                           flush=True)
    with busy_neighbours(cfg["load_processes"]):
        if cfg["load_processes"]:
            log(f"started {cfg['load_processes']} busy-looping neighbour process(es)")
        rows = measure(cfg, log)
        cfg["loadavg"]["end"] = _loadavg()
    grown = growth(rows)
    targets = (evaluate_targets(rows, grown, run_conditions(cfg)) if cfg["device"] == "cpu"
               else [])
    table = markdown_table(rows, cfg)
    notes = summary_lines(rows, grown, targets, cfg)
    print(header(cfg), table, *notes, sep="\n")
    if args.json:
        data = {"benchmark": "attention", "settings": cfg, "results": rows, "growth": grown,
                "targets": targets, "wall_s": time.perf_counter() - start}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown:
        body = ["# clusterfx bench attention", "", header(cfg), "", table, "",
                *[f"- {line}" for line in notes]]
        Path(args.markdown).write_text("\n".join(body) + "\n")
    return 0


if __name__ == "__main__":
    spec_arg = sys.argv[sys.argv.index("--worker") + 1] if "--worker" in sys.argv else None
    if spec_arg is None:
        sys.exit("usage: python -m clusterfx.bench.attention --worker SPEC_JSON "
                 "(use `clusterfx bench attention` for the benchmark)")
    print(json.dumps(worker(json.loads(spec_arg))))
