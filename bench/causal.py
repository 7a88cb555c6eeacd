"""`clusterfx bench causal`: causal clustered attention for decoders — speed and quality.

    clusterfx bench causal --part speed [--sizes 4096 8192 16384] [--heads 8] [--dim 64]
        [--clusters 100] [--iclusters 25] [--topk 32] [--block 128] [--runs 5]
    clusterfx bench causal --part train [--checkpoint results/causal_lm.pt]
        [--train-minutes 10] [--segment-minutes 2.5]
    clusterfx bench causal --part quality [--checkpoint ...] [--contexts 1024 2048 4096]
        [--eval-tokens 65536] [--clusters 100] [--iclusters 25] [--topk 32] [--block 128]
        [--json PATH]

speed: one self-attention layer, q, k, v ~ N(0, 1) of shape (1, H, N, D), float32, forward
under ``no_grad``: dense = ``F.scaled_dot_product_attention(is_causal=True)`` (the fused flash
kernel), against ``causal_clustered_attention`` and ``causal_improved_clustered_attention``
with the knobs of the quality part's configs (``CausalClustered(clusters, block)``,
``CausalImprovedClustered(iclusters, topk, block)``, their defaults otherwise; impl "cpu",
seed 0), timed round robin in this one process (median of ``--runs`` after one warm-up);
speed-up = t_dense / t_method.

train: the GPT of ``bench/causal_lm.py`` on the standard library's Python sources, for at most
``--train-minutes`` in all, in segments of ``--segment-minutes`` (run the command again to
resume), so no single run holds the machine long.

quality: the trained model's byte-level perplexity on held-out files at each context length
(``--eval-tokens`` per context, in windows of that length), with its attention exact, and
rewritten by ``clusterfx.compile`` to causal clustered (``Clustered(clusters)``) and causal
i-clustered (``ImprovedClustered(iclusters, topk)``) attention — the causal sites take the
causal variant with ``block``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from clusterfx.apps.common import machine_load, time_side_by_side
from clusterfx.bench import causal_lm
from clusterfx.config.configs import CausalClustered, CausalImprovedClustered
from clusterfx.ops.causal_clustered import (
    causal_clustered_attention,
    causal_improved_clustered_attention,
)

PARTS = ("speed", "train", "quality")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", choices=PARTS, default="speed")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--iclusters", type=int, default=25)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--checkpoint", type=Path, default=Path("results/causal_lm.pt"))
    p.add_argument("--train-minutes", type=float, default=10.0)
    p.add_argument("--segment-minutes", type=float, default=2.5)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--json", type=Path, default=None)


def _check(args: argparse.Namespace) -> None:
    for name in ("heads", "dim", "clusters", "iclusters", "topk", "block", "runs",
                 "eval_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    for n in args.sizes + args.contexts:
        if n < 2:
            raise ValueError(f"sizes and contexts ({n}) must be >= 2")
    if max(args.contexts) > causal_lm.MAX_LEN:
        raise ValueError(f"--contexts ({max(args.contexts)}) must be at most the model's "
                         f"max_len ({causal_lm.MAX_LEN})")


def _header() -> str:
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, {machine_load()}"


def _configs(args: argparse.Namespace):
    """The two policies' configs (the speed part times the same knobs)."""
    return (CausalClustered(clusters=args.clusters, block=args.block, seed=0),
            CausalImprovedClustered(clusters=args.iclusters, topk=args.topk, block=args.block,
                                    seed=0))


def _knobs(config) -> dict:
    return {name: getattr(config, name) for name in (
        "clusters", "iterations", "bits", "seed", "clustering", "refine", "metric")}


def speed(args: argparse.Namespace) -> dict:
    print(f"causal attention forward, float32, cpu, B=1 H={args.heads} D={args.dim}; "
          f"{_header()}")
    clus, iclus = _configs(args)
    ck, ik = _knobs(clus), _knobs(iclus)
    print(f"clustered: {clus}\ni-clustered: {iclus}")
    print("| N | dense SDPA is_causal (ms) | causal clustered (ms) | speed-up | "
          "causal i-clustered (ms) | speed-up |\n|---|---|---|---|---|---|")
    rows = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=g) for _ in range(3))
        fns = {
            "dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "clustered": lambda q, k, v: causal_clustered_attention(
                q, k, v, block=args.block, impl="cpu", **ck),
            "i-clustered": lambda q, k, v: causal_improved_clustered_attention(
                q, k, v, topk=args.topk, block=args.block, impl="cpu", **ik),
        }
        t = time_side_by_side(fns, (q, k, v), warmup=1, runs=args.runs)
        rows.append({"n": n, **t})
        print(f"| {n} | {t['dense_s'] * 1e3:.0f} | {t['clustered_s'] * 1e3:.0f} | "
              f"{t['speedup_clustered']:.1f}x | {t['i-clustered_s'] * 1e3:.0f} | "
              f"{t['speedup_i-clustered']:.1f}x |", flush=True)
    print(_header())
    return {"speed": rows}


def quality(args: argparse.Namespace) -> dict:
    model = causal_lm.load_trained(args.checkpoint)
    _, held, files = causal_lm.corpus()
    clus, iclus = _configs(args)
    policies = {"dense": None, "causal clustered": clus, "causal i-clustered": iclus}
    print(f"held-out text: {held.numel()} bytes from every {causal_lm.HOLD_OUT}th of {files} "
          f"files; {_header()}")
    print("| context | " + " | ".join(policies) + " |\n|---|" + "---|" * len(policies))
    rows = []
    for n in args.contexts:
        count = max(1, args.eval_tokens // n)
        res = {name: causal_lm.perplexity(model, held, n, count, pol)
               for name, pol in policies.items()}
        rows.append({"context": n, **res})
        cells = [f"{r['ppl']:.3f} ({r['bits_per_byte']:.3f} bpb; 2nd half "
                 f"{r['ppl_second_half']:.3f})" for r in res.values()]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    return {"quality": rows}


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.part == "speed":
        result = speed(args)
    elif args.part == "train":
        result = causal_lm.train_segment(args.checkpoint, args.train_minutes,
                                         args.segment_minutes)
        print(f"trained {result['minutes']:.2f} min, {result['step']} steps, recent loss "
              f"{result['loss']:.3f}{' (budget used)' if result['done'] else ''}; {_header()}")
    else:
        result = quality(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0
