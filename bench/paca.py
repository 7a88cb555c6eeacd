"""`clusterfx bench paca`: patch-to-cluster attention against dense multi-head attention, and
DPC-kNN token clustering global against local, side by side in one process.

    clusterfx bench paca [--sizes 784 3136 12544] [--dim 96] [--heads 2] [--clusters 100]
        [--dpc-dim 128] [--repeats 5] [--dtype float32] [--device cpu|cuda] [--threads T]
        [--no-memory] [--no-reference] [--json PATH] [--markdown PATH]

Attention, on x ~ N(0, 1) of shape (1, N, C) from a seeded generator, forward under no_grad:
- layer: two dense baselines, "dense-mha" = `nn.MultiheadAttention(C, heads)` called as
  `mha(x, x, x)` (its default `need_weights=True`: it materialises and returns the
  head-averaged N×N weights, the dense MHA of the PaCa authors' code), and "dense-sdpa" = the
  same layer as PaCa's with dense attention (`PaCaAttention(clusters=0)`: q/k/v projections,
  fused `F.scaled_dot_product_attention`, output projection; no N×N matrix), against the
  PaCa-ViT layer (`models.paca_vit.PaCaAttention`: clustering
  head, z = softmax over patches, cluster tokens LayerNorm(z x), q from the patches, k and v
  from the M cluster tokens, output projection) with the paper's "conv" head and the "linear"
  head, in plain torch as the model computes it; and "fused-conv" / "fused-linear": the same
  layer's parameters through the op family's whole-layer op `clusterfx.ops.paca.paca_layer`
  (impl "cpu": the fused C++ forward; CPU only). All on an √N×√N grid, M = `--clusters`.
- core: `F.scaled_dot_product_attention(q, k, v)` against `clusterfx::paca_attention(q, k, v,
  logits)` (impl auto) on (1, heads, N, C / heads) with given logits (1, M, N): the attention
  alone, without projections or the clustering head.
DPC-kNN (`clusterfx.ops.dpc_knn`) on (1, N, `--dpc-dim`) tokens into N/4 clusters: "global"
(one region) against "local" (TCFormerV2's per-region clustering: 2×2 regions at N=784, 4×4
above), both the chunked cpu path; "reference" is the full-matrix oracle (global, as the
original TCFormer computes it), skipped above N=3136 with --no-reference.

Time: the median of R calls after one warm-up, all methods of one N round robin so load hits
them alike; ratio = t(baseline) / t(method).

Ceiling: each attention case's matrix-product FLOPs, counted from its shapes (projections,
clustering head, pooling, attention; softmax, LayerNorm and GELU not counted, so a lower
bound), and this machine's dense GEMM rate, measured in the same rounds ("gemm": a 2048³
matmul in the run's dtype; the smaller, thinner products of the attention cases run slower). A
target's ceiling is t(baseline) · rate / FLOPs(method): the ratio the method would reach if
every product ran at that rate and nothing else cost time. A target above its ceiling is out
of reach of any implementation of that method on this machine at this dtype.

Peak memory on CPU: each case runs once more in a
fresh `python -m clusterfx.bench.paca --worker SPEC`, reporting peak RSS minus RSS after
building the module and inputs (VmHWM reset through /proc/self/clear_refs; glibc told to mmap
buffers >= 64 KiB so RSS follows live tensors); good to a few hundred KiB.

CUDA (`--device cuda`) -- UNTESTED, written without a GPU: bf16 by default, CUDA-event timing,
`torch.cuda.max_memory_allocated()` in process; dense-sdpa is then flash SDPA.
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

from clusterfx.apps.common import proc_status_kib

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYER = ("dense-sdpa", "dense-mha", "paca-conv", "paca-linear", "fused-conv", "fused-linear")
FUSED = ("fused-conv", "fused-linear")
CORE = ("sdpa-core", "paca-core")
DPC = ("dpc-global", "dpc-local", "dpc-reference")
PEAK = "gemm"
GEMM_SIZE = 2048
BASELINE = {"layer": "dense-sdpa", "core": "sdpa-core", "dpc": "dpc-global", "peak": PEAK}
SEED = 0
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# (label, group, method, baseline, N, bound): ratio t(baseline) / t(method) >= bound
TARGETS = (
    ("PaCa layer vs dense MHA at 3136 >= 25x", "layer", "paca-conv", "dense-mha", 3136, 25),
    ("PaCa layer vs dense MHA at 12544 >= 60x", "layer", "paca-conv", "dense-mha", 12544, 60),
    ("PaCa fused layer op vs dense MHA at 3136 >= 25x", "layer", "fused-conv", "dense-mha", 3136,
     25),
    ("PaCa fused layer op vs dense MHA at 12544 >= 60x", "layer", "fused-conv", "dense-mha",
     12544, 60),
    ("PaCa layer vs dense SDPA layer at 3136 >= 25x", "layer", "paca-conv", "dense-sdpa", 3136,
     25),
    ("PaCa layer vs dense SDPA layer at 12544 >= 60x", "layer", "paca-conv", "dense-sdpa",
     12544, 60),
    ("PaCa op vs SDPA at 3136 >= 25x", "core", "paca-core", "sdpa-core", 3136, 25),
    ("PaCa op vs SDPA at 12544 >= 60x", "core", "paca-core", "sdpa-core", 12544, 60),
    ("DPC-kNN local vs global at 12544 >= 10x", "dpc", "dpc-local", "dpc-global", 12544, 10),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[784, 3136, 12544],
                   help="token counts N, perfect squares (default 784 3136 12544)")
    p.add_argument("--dim", type=int, default=96, help="C of the attention (default 96)")
    p.add_argument("--heads", type=int, default=2, help="heads (default 2, PaCa stage 1)")
    p.add_argument("--clusters", type=int, default=100, help="M (default 100)")
    p.add_argument("--dpc-dim", type=int, default=128, help="token width for DPC-kNN")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 cpu, bfloat16 cuda")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory (on cpu: one subprocess per case)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="time the DPC-kNN oracle (global, full N×N) up to N=3136")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the report as Markdown")


def _regions(n: int) -> int:
    return 4 if n <= 1024 else 16


def build(method: str, n: int, cfg: dict) -> tuple[Callable, tuple]:
    """(fn, inputs) of one case, seeded; modules in eval mode on cfg's device and dtype."""
    from clusterfx.models.paca_vit import PaCaAttention
    from clusterfx.ops.dpc_knn import dpc_knn
    from clusterfx.ops.paca import paca_attention, paca_layer

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    dev, dtype = cfg["device"], DTYPES[cfg["dtype"]]
    c, h, m = cfg["dim"], cfg["heads"], cfg["clusters"]
    side = math.isqrt(n)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dev, dtype)  # noqa: E731
    if method == "dense-mha":
        mha = torch.nn.MultiheadAttention(c, h, batch_first=True).to(dev, dtype).eval()
        return (lambda x: mha(x, x, x)[0]), (rand(1, n, c),)
    if method in LAYER:
        clusters, kind = (0, "conv") if method == "dense-sdpa" else (m, method.split("-")[1])
        layer = PaCaAttention(c, h, clusters=clusters, clustering=kind).to(dev, dtype).eval()
        if method in FUSED:
            params = layer.paca_parameters()
            return (lambda x: paca_layer(x, (side, side), impl="cpu", **params)[0]), (
                rand(1, n, c),)
        return (lambda x: layer(x, (side, side))[0]), (rand(1, n, c),)
    if method == PEAK:
        a, b = rand(GEMM_SIZE, GEMM_SIZE), rand(GEMM_SIZE, GEMM_SIZE)
        return torch.mm, (a, b)
    if method in CORE:
        q, k, v = (rand(1, h, n, c // h) for _ in range(3))
        if method == "sdpa-core":
            return F.scaled_dot_product_attention, (q, k, v)
        return (lambda q, k, v, lg: paca_attention(q, k, v, lg)), (q, k, v, rand(1, m, n))
    x = torch.randn(1, n, cfg["dpc_dim"], generator=gen).to(dev)
    regions = _regions(n) if method == "dpc-local" else 1
    impl = "reference" if method == "dpc-reference" else "cpu"
    return (lambda x: dpc_knn(x, n // 4, regions=regions, impl=impl)), (x,)


def matmul_flops(method: str, n: int, cfg: dict) -> float | None:
    """FLOPs of the matrix products (and convolutions) of one forward of an attention case,
    from its shapes; None for cases that are not attention (DPC-kNN, the GEMM probe)."""
    c, m = cfg["dim"], cfg["clusters"]
    attention_dense = 4 * n * n * c  # QKᵀ and PV over all heads
    if method in ("dense-sdpa", "dense-mha"):
        return 8 * n * c * c + attention_dense  # q, k, v, out projections
    if method == "sdpa-core":
        return attention_dense
    pooled = 4 * m * n * c  # z·k and z·v (the op pools keys and values)
    if method == "paca-core":
        return pooled + 4 * n * m * c
    if method in ("paca-conv", "paca-linear", *FUSED):
        head = (2 * n * c * 49 + 2 * n * c * c + 2 * n * c * m if method.endswith("conv")
                else 2 * n * c * m)  # depthwise 7×7, 1×1, 1×1 to M | linear to M
        return head + 2 * m * n * c + 4 * n * c * c + 4 * m * c * c + 4 * n * m * c
    return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker(spec: dict) -> dict:
    """Peak bytes of one call of one case (run in a fresh process)."""
    torch.set_num_threads(spec["threads"])
    fn, inputs = build(spec["method"], spec["n"], spec)
    with torch.no_grad():
        if spec["n"] <= 1024:
            fn(*inputs)  # code pages and thread pools are not the method's memory
        base = proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        fn(*inputs)
    return {"peak_bytes": max(0, proc_status_kib("VmHWM") - base) * 1024}


def peak_memory(method: str, n: int, cfg: dict) -> int | None:
    if cfg["device"] == "cuda":
        fn, inputs = build(method, n, cfg)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.no_grad():
            fn(*inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not Path("/proc/self/clear_refs").exists():
        return None
    spec = json.dumps({**cfg, "method": method, "n": n})
    done = subprocess.run([sys.executable, "-m", "clusterfx.bench.paca", "--worker", spec],
                          capture_output=True, text=True, env={**os.environ, **_MALLOC_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {method} N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _fused_runs(cfg: dict) -> bool:
    """The fused layer cases run on CPU where the fused kernels build and load."""
    from clusterfx.ops.paca import NATIVE_LIBRARY

    return cfg["device"] == "cpu" and NATIVE_LIBRARY.available()


def _methods(n: int, cfg: dict) -> list[tuple[str, str]]:
    groups = [("layer", m) for m in LAYER if m not in FUSED or _fused_runs(cfg)]
    groups += [("core", m) for m in CORE]
    dpc = ["dpc-global", "dpc-local"]
    if cfg["reference"] and n <= 3136 and cfg["device"] == "cpu":
        dpc.append("dpc-reference")
    return groups + [("dpc", m) for m in dpc] + [("peak", PEAK)]


def measure(cfg: dict, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for n in cfg["sizes"]:
        cases = [(g, m, *build(m, n, cfg)) for g, m in _methods(n, cfg)]
        times: dict[str, list[float]] = {m: [] for _, m, _, _ in cases}
        log(f"N={n}: {len(cases)} methods, {cfg['repeats']} rounds")
        with torch.no_grad():
            for i in range(cfg["repeats"] + 1):
                for _, method, fn, inputs in cases:
                    _sync(cfg["device"])
                    start = time.perf_counter()
                    fn(*inputs)
                    _sync(cfg["device"])
                    if i:  # round 0 warms up
                        times[method].append(time.perf_counter() - start)
        for group, method, _, _ in cases:
            mem = peak_memory(method, n, cfg) if cfg["memory"] and group != "peak" else None
            flops = (2 * GEMM_SIZE ** 3 if method == PEAK else matmul_flops(method, n, cfg))
            t = statistics.median(times[method])
            rows.append({"n": n, "group": group, "method": method, "time_s": t,
                         "peak_bytes": mem, "gflop": None if flops is None else flops / 1e9,
                         "gflop_per_s": None if flops is None else flops / 1e9 / t})
        del cases
    for r in rows:
        base = next(x for x in rows if x["n"] == r["n"] and x["method"] == BASELINE[r["group"]])
        r["speedup"] = base["time_s"] / r["time_s"]
        r["memory_ratio"] = (base["peak_bytes"] / r["peak_bytes"]
                             if r["peak_bytes"] and base["peak_bytes"] else None)
    return rows


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Each target's measured ratio and its ceiling (module docstring) on this machine."""
    out = []
    for label, _group, method, baseline, n, bound in TARGETS:
        row = {r["method"]: r for r in rows if r["n"] == n}
        if method in row and baseline in row:
            ratio = row[baseline]["time_s"] / row[method]["time_s"]
            ceiling = None
            if PEAK in row and row[method]["gflop"]:
                floor_s = row[method]["gflop"] / row[PEAK]["gflop_per_s"]
                ceiling = row[baseline]["time_s"] / floor_s
            out.append({"target": label, "ratio": ratio, "met": ratio >= bound,
                        "bound": bound, "ceiling": ceiling})
    return out


def target_note(t: dict) -> str:
    text = f"target {t['target']}: {t['ratio']:.1f}x -> {'met' if t['met'] else 'MISSED'}"
    if t["ceiling"] is not None:
        reach = "" if t["ceiling"] >= t["bound"] else ", out of reach on this machine"
        text += f" (ceiling {t['ceiling']:.1f}x at the measured GEMM rate{reach})"
    return text


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| N | group | method | time | speed-up vs baseline | peak memory | memory ratio "
             "| GFLOP | GFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.1f}x"
        flops = ("- | -" if r.get("gflop") is None
                 else f"{r['gflop']:.3f} | {r['gflop_per_s']:.1f}")
        lines.append(f"| {r['n']} | {r['group']} | {r['method']} | {1e3 * r['time_s']:.2f} ms "
                     f"| {r['speedup']:.1f}x | {_mib(r['peak_bytes'])} | {ratio} | {flops} |")
    return "\n".join(lines)


def _settings(args: argparse.Namespace) -> dict:
    for name in ("repeats", "dim", "heads", "clusters", "dpc_dim"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    if args.dim % args.heads:
        raise ValueError(f"--dim ({args.dim}) must be divisible by --heads ({args.heads})")
    for n in args.sizes:
        if n < 16 or math.isqrt(n) ** 2 != n or n % 4 or n % _regions(n):
            raise ValueError(f"--sizes: {n} must be a perfect square >= 16 divisible by 4 and "
                             f"by its region count ({_regions(n)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads ({args.threads}) must be >= 1")
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return {"sizes": args.sizes, "dim": args.dim, "heads": args.heads,
            "clusters": args.clusters, "dpc_dim": args.dpc_dim, "repeats": args.repeats,
            "dtype": dtype, "device": args.device, "threads": torch.get_num_threads(),
            "memory": args.memory, "reference": args.reference}


def run(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:7.1f}s] {msg}",  # noqa: E731
                            file=sys.stderr, flush=True)
    rows = measure(cfg, log)
    load.append(os.getloadavg()[0])
    targets = evaluate_targets(rows)
    header = (f"clusterfx bench paca: C={cfg['dim']}, heads={cfg['heads']}, M={cfg['clusters']}"
              f", DPC C={cfg['dpc_dim']} into N/4 clusters (local: 2x2 regions at N<=1024, "
              f"4x4 above), batch 1, {cfg['dtype']} on {cfg['device']}, "
              f"{cfg['threads']} threads, median of {cfg['repeats']}, load average "
              f"{load[0]:.2f} -> {load[1]:.2f} on {os.cpu_count()} cores; baselines: layer "
              f"dense-sdpa, core sdpa-core, dpc dpc-global")
    notes = [target_note(t) for t in targets]
    if cfg["device"] == "cpu" and not _fused_runs(cfg):
        from clusterfx.ops.common.native import unavailable_message
        from clusterfx.ops.paca import NATIVE_LIBRARY

        notes.append(f"fused-conv / fused-linear not run: {unavailable_message(NATIVE_LIBRARY)}")
    if cfg["device"] == "cpu":
        notes.append("no GPU measurement: this run had no CUDA device (the bf16 / flash SDPA "
                     "comparison runs with --device cuda)")
    table = markdown_table(rows)
    print(header, table, *notes, sep="\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": cfg, "load": load, "results": rows,
                                               "targets": targets}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text("\n".join(["# clusterfx bench paca", "", header, "",
                                                  table, "", *[f"- {x}" for x in notes]]) + "\n")
    return 0


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        sys.exit("usage: python -m clusterfx.bench.paca --worker SPEC_JSON "
                 "(use `clusterfx bench paca` for the benchmark)")
    print(json.dumps(worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))))
