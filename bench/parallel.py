"""`clusterfx bench parallel`: one attention layer, forward + backward, on one process vs spread
over several gloo processes on this machine with Ulysses, Ring and USP: dense, clustered
(local and global clustering over the ring) and improved clustered (opt in: --methods ...
improved).

    clusterfx bench parallel [--lengths 4096 8192 16384 32768] [--world 4] [--methods dense
        clustered global improved] [--heads 8] [--kv-heads 8] [--dim 64] [--clusters 100]
        [--topk 32] [--steps 2] [--causal] [--json PATH]

Workload: q, k, v ~ N(0, 1) of shape (1, H, S, D) float32 from a seeded generator, attention
forward and `out.backward(g)`. "one process": the whole sequence in this process with every
core (dense: `F.scaled_dot_product_attention`; clustered: `ops.clustered.clustered_attention`,
C clusters, seed 0; improved: `ops.clustered.improved_clustered_attention`, C clusters, top-k
keys). Sequence-parallel: `world` fresh processes (gloo on 127.0.0.1, each with
cores/world threads) hold S/world tokens each and run `ops.sequence_parallel.usp_attention` /
`usp_clustered_attention` ("clustered": each ring rank clusters its own block, K/V rotate) /
`usp_global_clustered_attention` ("global": one process's clustering of the whole sequence,
centroids attend local K/V, log-sum-exp merged by all-reduces; the default of a compiled
model) for ulysses = (world, 1), ring = (1, world) and usp = (2, world/2);
a step is timed from a barrier to a barrier (the slowest rank), the median of `--steps` after
one warm-up. Bytes per layer: what one rank sent per step (fwd + bwd), counted by the
collectives themselves, next to the reference formulas (they must agree).

On one shared machine the processes share the same cores, so the sequence-parallel times show
the overhead of the decomposition and of gloo, not a speed-up: what SP buys here is memory per
rank (S/P tokens; no rank ever holds an S × S block). The projection at the end estimates an
8-GPU node from the formulas (checked against the measured bytes above) and published figures:
NVLink 4 (H100 SXM) 450 GB/s per direction per GPU, PCIe 5 x16 64 GB/s, attention compute at
FlashAttention-3's 740 TFLOP/s (bf16 on H100; forward 4·S²·H·D, backward 2.5 times that,
halved when causal). It is a projection, not a measurement: no GPU was used (this command
measures single-GPU block kernel times only when CUDA is available: not implemented here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from clusterfx.apps.common import machine_load

METHODS = ("dense", "clustered", "global", "improved")
DEFAULT_METHODS = ("dense", "clustered", "global")
NVLINK, PCIE, FA3 = 450e9, 64e9, 740e12


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--world", type=int, default=4, help="processes per sequence (even)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--topk", type=int, default=32, help="keys per cluster (improved)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    p.add_argument("--causal", action="store_true", help="causal dense attention (zigzag)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for all workers")
    p.add_argument("--json", type=Path, default=None)


def _check(args) -> None:
    if args.world < 2 or args.world % 2:
        raise ValueError(f"--world ({args.world}) must be an even number >= 2")
    kv = args.kv_heads or args.heads
    if args.heads % args.world or kv % 2 or args.heads % kv:
        raise ValueError(f"--heads ({args.heads}) must be divisible by --world "
                         f"({args.world}) and by --kv-heads ({kv}), an even number")
    for s in args.lengths:
        if s % (2 * args.world):
            raise ValueError(f"--lengths: {s} must be divisible by 2·world = {2 * args.world}")
    if args.steps < 1:
        raise ValueError(f"--steps ({args.steps}) must be >= 1")
    if args.topk < 1:
        raise ValueError(f"--topk ({args.topk}) must be >= 1")


def configs(world: int) -> dict[str, tuple[int, int]]:
    return {"ulysses": (world, 1), "ring": (1, world), "usp": (2, world // 2)}


def _qkvg(S: int, a) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    kv = a["kv_heads"]
    return tuple(torch.randn(1, h, S, a["dim"], generator=gen)
                 for h in (a["heads"], kv, kv, a["heads"]))


def _time(step, steps: int, barrier=None) -> float:
    times = []
    for i in range(steps + 1):
        if barrier:
            barrier()
        start = time.perf_counter()
        step()
        if barrier:
            barrier()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def single_process(S: int, method: str, a) -> float:
    import torch.nn.functional as F

    from clusterfx.ops.clustered import clustered_attention, improved_clustered_attention

    q, k, v, g = _qkvg(S, a)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def step():
        if method == "dense":
            out = F.scaled_dot_product_attention(*leaves, is_causal=a["causal"],
                                                 enable_gqa=k.shape[1] != q.shape[1])
        elif method in ("clustered", "global"):  # one process's clustered attention
            out = clustered_attention(*leaves, clusters=a["clusters"], seed=0)
        else:
            out = improved_clustered_attention(*leaves, clusters=a["clusters"], topk=a["topk"],
                                               seed=0)
        out.backward(g)
    return _time(step, a["steps"])


def worker(rank: int, world: int, port: int, a: dict, out: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from clusterfx.ops import sequence_parallel as sp

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    warnings.filterwarnings("ignore", message="clusters .* exceeds")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    results = []
    meshes = {}
    for name, (u, r) in configs(world).items():
        mesh = init_device_mesh("cpu", (r, u), mesh_dim_names=("ring", "ulysses"))
        meshes[name] = sp.Groups(u, r, mesh.get_group("ulysses").group_name if u > 1 else "",
                                 mesh.get_group("ring").group_name if r > 1 else "", 600.0)
    for S in a["lengths"]:
        q, k, v, g = _qkvg(S, a)
        for name, groups in meshes.items():
            for method in a["methods"]:
                layout = sp.SeqLayout(S, groups.ulysses, groups.ring, True)
                pos = sp.local_positions(layout, groups)
                leaves = [x[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
                tag = f"{name}-{method}-{S}"

                def step(leaves=leaves, layout=layout, groups=groups, tag=tag, method=method,
                         grad=g[:, :, pos]):
                    if method == "dense":
                        o = sp.usp_attention(*leaves, layout, groups, causal=a["causal"],
                                             tag=tag)
                    elif method == "global":
                        o, _ = sp.usp_global_clustered_attention(
                            *leaves, layout, groups, clusters=a["clusters"], seed=0, tag=tag)
                    else:
                        topk = a["topk"] if method == "improved" else None
                        o, _ = sp.usp_clustered_attention(*leaves, layout, groups,
                                                          clusters=a["clusters"], seed=0,
                                                          topk=topk, tag=tag)
                    o.backward(grad)
                seconds = _time(step, a["steps"], dist.barrier)
                sent = sum(v for k_, v in sp.traffic[tag].items() if k_.endswith("bytes"))
                results.append({"S": S, "config": name, "method": method, "seconds": seconds,
                                "bytes_per_step": sent / (a["steps"] + 1)})
    Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def formula_bytes(S: int, u: int, r: int, a, itemsize: int = 4, cd: int = 4,
                  method: str = "dense") -> float:
    """Per-rank bytes per layer (fwd + bwd), from the reference formulas."""
    H, D = a["heads"], a["dim"]
    hkv = max(a["kv_heads"], u)
    P = u * r
    total = 2 * (u - 1) * S * D * (2 * H + 2 * hkv) * itemsize / (u * P) if u > 1 else 0.0
    if r > 1 and method == "global":
        return total + global_bytes(S, u, r, a)
    if r > 1:
        x = S * hkv * D / u
        total += 2 * 2 * (r - 1) / r * x * itemsize + 2 * x * cd
        if method != "dense":  # the metric's key statistics, all-reduced over the ring
            total += 2 * (r - 1) / r * (hkv // u) * (1 + D + D * D) * 8
    return total


def global_bytes(S: int, u: int, r: int, a, iterations: int = 5, bits: int = 63,
                 refine: int = 1) -> int:
    """Per-rank bytes per layer of global clustered attention's all-reduces over the ring
    (B = 1, float32, Hamming in the attention metric; `passes/sequence_parallel_global.py`
    lists them): key statistics, hash centre, seeds (+ checksum), k-means rounds, refine,
    centroids (+ spare cluster, flag), lse max, merged outputs; backward dO^c, dQ^c."""
    D, h, hk = a["dim"], a["heads"] // u, max(a["kv_heads"], u) // u
    C = min(a["clusters"], S)
    fwd = [hk * (1 + D + D * D) * 8, h * (D + 1) * 4, (iterations * h * C + 1) * 8]
    fwd += [h * C * (bits + 1) * 4] * (iterations - 1) + [h * C * (D + 1) * 4] * refine
    fwd += [(h * (C + 1) * (D + 1) + 1) * 4, h * (C + 1) * 4, h * (C + 1) * (D + 1) * 4]
    bwd = [h * (C + 1) * D * 4] * 2
    return sum(2 * (r - 1) * n // r for n in fwd + bwd)


def _launch(args, a: dict) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"{r}.json") for r in range(args.world)]
        ctx = mp.start_processes(_entry, args=(args.world, port, a, outs), nprocs=args.world,
                                 start_method="spawn", join=False)
        deadline = time.monotonic() + args.timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise RuntimeError(f"bench parallel: workers ran past --timeout "
                                   f"{args.timeout:g}s")
        per_rank = [json.loads(Path(o).read_text()) for o in outs]
    return per_rank[0]  # timed barrier to barrier: rank 0's times are the slowest rank's


def _entry(rank, world, port, a, outs):
    worker(rank, world, port, a, outs[rank])


def run(args: argparse.Namespace) -> int:
    _check(args)
    warnings.filterwarnings("ignore", message="clusters .* exceeds")  # short --lengths
    a = {"lengths": args.lengths, "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
         "dim": args.dim, "clusters": args.clusters, "topk": args.topk, "steps": args.steps,
         "causal": args.causal, "methods": args.methods}
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"attention fwd+bwd, B=1 H={args.heads} Hkv={a['kv_heads']} D={args.dim} float32 "
          f"cpu, dense {'causal' if args.causal else 'non-causal'}, clustered non-causal "
          f"(it declines causality) C={args.clusters}, improved top-k={args.topk}; "
          f"one process: {threads} threads; SP: {args.world} gloo processes x "
          f"{max(1, threads // args.world)} thread(s); {machine_load()}")
    single: dict[tuple[int, str], float] = {}
    for S in args.lengths:
        for m in args.methods:  # "global" and "clustered" are one process's clustered attention
            twin = {"clustered": "global", "global": "clustered"}.get(m)
            single[(S, m)] = single[(S, twin)] if (S, twin) in single else \
                single_process(S, m, a)
    rows = _launch(args, a)
    print(f"\n{'S':>6} {'method':>9} {'one process':>12} " + " ".join(
        f"{name + ' (' + 'x'.join(map(str, ur)) + ')':>24}"
        for name, ur in configs(args.world).items()))
    results = []
    for S in args.lengths:
        for m in args.methods:
            cells = []
            for name, (u, r) in configs(args.world).items():
                row = next(x for x in rows if (x["S"], x["config"], x["method"]) == (S, name, m))
                formula = formula_bytes(S, u, r, a, method=m)
                row["formula_bytes"] = formula
                results.append(row)
                cells.append(f"{row['seconds']:7.3f}s {row['bytes_per_step'] / 1e6:7.2f}MB"
                             f"{'' if abs(row['bytes_per_step'] - formula) < 1 else '!'}")
            print(f"{S:>6} {m:>9} {single[(S, m)]:11.3f}s " + " ".join(f"{c:>24}" for c in cells))
    print("\n(seconds per step; MB sent per rank per layer, fwd+bwd; '!' = differs from the "
          "formula)")
    _projection(args, a)
    if args.json:
        args.json.write_text(json.dumps({"single": {f"{S}-{m}": t for (S, m), t in
                                                    single.items()}, "sp": results}, indent=1))
    return 0


def _projection(args, a) -> None:
    print("\nPROJECTION (not measured) to one 8-GPU node, bf16, per layer fwd+bwd, per GPU: "
          "communication at NVLink 450 GB/s | PCIe 64 GB/s vs dense attention compute at "
          "FA3's 740 TFLOP/s; no GPU was available to measure block kernel times")
    print(f"{'S':>7} {'config':>12} {'MB':>9} {'NVLink ms':>10} {'PCIe ms':>9} "
          f"{'compute ms':>11} {'comm/compute (NVLink)':>22}")
    H, D = a["heads"], a["dim"]
    for S in sorted(set(args.lengths) | {65536, 131072}):
        flops = 3.5 * 4 * S * S * H * D * (0.5 if args.causal else 1.0) / 8
        compute = flops / FA3
        for name, (u, r) in {"ulysses 8": (8, 1), "ring 8": (1, 8), "usp 2x4": (2, 4),
                             "usp 4x2": (4, 2)}.items():
            b = formula_bytes(S, u, r, {**a, "heads": max(H, 8)}, itemsize=2, cd=4)
            print(f"{S:>7} {name:>12} {b / 1e6:9.2f} {b / NVLINK * 1e3:10.3f} "
                  f"{b / PCIE * 1e3:9.3f} {compute * 1e3:11.3f} {b / NVLINK / compute:22.3f}")
