"""Command line of THC: `clusterfx thc synth`, `clusterfx thc train`, `clusterfx bench thc`.

    clusterfx thc synth --out DIR [--subjects 300] [--rois 100] [--modules 4] [--submodules 3]
                        [--timepoints 100] [--effect 0.2] [--seed 0]
    clusterfx thc train --data DIR --out OUT [--epochs 60] [--seed 0] [--clusters 12,4] ...
    clusterfx bench thc [--rois 100,200,400,1000] [--batch 8] [--repeats 3] [--out FILE]

Bad input raises ValueError naming the file or value (the CLI prints it, exit code 2).
Also runnable as `python -m clusterfx.apps.thc.command {synth,train,bench} ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers"
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers, e.g. 12,4")
    return values


def _synth(args: argparse.Namespace) -> int:
    from .data import synthesize

    path = synthesize(args.out, args.subjects, args.rois, modules=args.modules,
                      submodules=args.submodules, timepoints=args.timepoints,
                      effect=args.effect, seed=args.seed)
    print(f"wrote {args.subjects} subjects ({args.rois} ROIs, {args.modules} modules × "
          f"{args.submodules} submodules) to {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, run

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"threads ({args.threads}) must be at least 1")
        torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                         lr=args.lr, test_fraction=args.test_fraction, clusters=args.clusters,
                         assignment=args.assignment, cluster_weight=args.cluster_weight,
                         density=args.density,
                         baselines=() if args.no_baselines else ("bnt", "gcn"))
    metrics = run(args.data, args.out, config)
    rows = [("model", "auroc", "accuracy", "seconds", "parameters")]
    for name, m in metrics["models"].items():
        rows.append((name, f"{m['auroc']:.3f}", f"{m['accuracy']:.3f}",
                     f"{m['train_seconds']:.1f}", str(m["parameters"])))
    for row in rows:
        print(f"{row[0]:<6}{row[1]:>8}{row[2]:>10}{row[3]:>10}{row[4]:>12}")
    for key in ("nmi", "ari", "modularity"):
        if key in metrics:
            print(f"thc {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics[key].items()))
    print(f"wrote {args.out}/metrics.json, assignments.csv, predictions.csv, "
          f"connectivity_communities.png, assignment_heatmap.png, thc.pt")
    return 0


def add_parser(subparsers) -> None:
    """Add `thc` with sub-commands `synth` and `train` to an argparse sub-parser set."""
    thc = subparsers.add_parser("thc", help="THC on brain networks: synthesise data, train")
    sub = thc.add_subparsers(dest="thc_command", required=True)
    synth = sub.add_parser("synth", help="write synthetic brain networks with planted "
                           "hierarchical communities")
    synth.add_argument("--out", required=True, help="folder to write")
    synth.add_argument("--subjects", type=int, default=300)
    synth.add_argument("--rois", type=int, default=100)
    synth.add_argument("--modules", type=int, default=4)
    synth.add_argument("--submodules", type=int, default=3)
    synth.add_argument("--timepoints", type=int, default=100)
    synth.add_argument("--effect", type=float, default=0.2,
                       help="extra coupling of modules 0 and 1 in class 1 (variance share)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)
    train = sub.add_parser("train", help="train THC and baselines, write OUT/metrics.json")
    train.add_argument("--data", required=True, help="connectome folder (see `thc synth`)")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--epochs", type=int, default=60)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--test-fraction", type=float, default=0.3)
    train.add_argument("--clusters", type=_ints, default=(12, 4),
                       help="clusters per level, finest first (default 12,4)")
    train.add_argument("--assignment", choices=("sample", "batch"), default="sample",
                       help="one assignment per subject (default) or shared by the batch")
    train.add_argument("--cluster-weight", type=float, default=1.0,
                       help="weight of the modularity + collapse loss")
    train.add_argument("--density", type=float, default=0.1,
                       help="fraction of strongest edges kept in each graph (for the GCN)")
    train.add_argument("--no-baselines", action="store_true")
    train.add_argument("--threads", type=int, default=None)
    train.set_defaults(func=_train)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `clusterfx bench thc`."""
    p.add_argument("--rois", type=_ints, default=(100, 200, 400, 1000))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="eager,inductor",
                   help="comma-separated: eager (forward+backward) and/or inductor (forward)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")


def run_bench(args: argparse.Namespace) -> int:
    """`clusterfx bench thc`: runtime and peak memory of THC against the number of ROIs."""
    from .bench import bench

    results = bench(args.rois, batch=args.batch, repeats=args.repeats,
                    backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
                    threads=args.threads)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m clusterfx.apps.thc.command")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    add_bench_arguments(sub.add_parser("bench", help="runtime and memory against ROIs"))
    if argv and argv[0] in ("synth", "train"):
        argv = ["thc", *argv]
    args = parser.parse_args(argv)
    try:
        return run_bench(args) if args.command == "bench" else args.func(args)
    except ValueError as exc:
        print(f"clusterfx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
