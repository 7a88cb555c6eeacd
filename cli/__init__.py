"""The `clusterfx` command line (also `python -m clusterfx`).

    clusterfx demo    [--model gpt|bert|vit] [--layers 4] [--seq-len 256] [--out DIR] [--backend B]
    clusterfx explain MODULE:FACTORY [--inputs MODULE:FN] [--policy JSON|PATH] [--markdown|--json]
    clusterfx check   MODULE:FACTORY [--inputs MODULE:FN] [--policy JSON|PATH] [--rtol 1e-5]
    clusterfx bench   passes [--model gpt] [--layers 24]

MODULE is an importable module (the current directory is importable) or a `.py` file path.
`--inputs` names a function called with the model (or with nothing, if it takes no argument) that
returns the example inputs; without it, `clusterfx.models` factories get `example_inputs`.
Exit codes: 0 ok, 1 a check failed, 2 bad input (the message names the bad value).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clusterfx.apps.common import BACKENDS, compile_and_run
from clusterfx.apps.demo import run_demo
from clusterfx.apps.digits import add_parser as add_train_parser
from clusterfx.apps.thc import command as thc_command
from clusterfx.bench import BENCHMARKS
from clusterfx.cli.loading import build_inputs, build_model, parse_policy
from clusterfx.compiler.equivalence import check_equivalence
from clusterfx.models import MODEL_FACTORIES


def _write_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


# ---------------------------------------------------------------------------------- subcommands
def cmd_explain(args: argparse.Namespace) -> int:
    model, ours = build_model(args.factory)
    inputs = build_inputs(args, model, ours)
    _, report = compile_and_run(model, inputs, parse_policy(args.policy), "eager",
                                strict=args.strict)
    if args.json:
        print(_write_json(report.to_dict()))
    elif args.markdown:
        print(report.to_markdown(), end="")
    else:
        print(report)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if not args.rtol >= 0:
        raise ValueError(f"--rtol ({args.rtol}) must be a number >= 0")
    model, ours = build_model(args.factory)
    inputs = build_inputs(args, model, ours)
    compiled, report = compile_and_run(model, inputs, parse_policy(args.policy), args.backend,
                                       strict=args.strict)
    print(report)
    result = check_equivalence(model, compiled, inputs, grads=not args.no_grads)
    print(result)
    ok = result.ok(args.rtol)  # every output and gradient within rtol; NaN never is
    print(f"max relative error {result.max_rel_error:.3g} vs rtol {args.rtol:g}, "
          f"min cosine {result.min_cosine:.6f}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------- parser
def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="a function returning the model, e.g. clusterfx.models:gpt_tiny")
    p.add_argument("--inputs", metavar="MODULE:FN",
                   help="FN(model) or FN() returns the example inputs (a tensor or a tuple)")
    p.add_argument("--policy", metavar="JSON|PATH",
                   help='e.g. \'{"blocks.0": null, "_default": {"type": "clustered", '
                        '"clusters": 50}}\'; a JSON file path also works')
    p.add_argument("--seq-len", type=int, default=16,
                   help="sequence length of the built-in example inputs (default 16)")
    p.add_argument("--strict", action="store_true",
                   help="a policy key that matches no site is an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clusterfx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="compile a reference model with a per-layer policy")
    demo.add_argument("--model", choices=sorted(MODEL_FACTORIES), default="bert")
    demo.add_argument("--layers", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=8192)
    demo.add_argument("--out", default="clusterfx-out", help="folder for reports and dumps")
    demo.add_argument("--backend", choices=BACKENDS, default="inductor")
    demo.add_argument("--load", type=int, default=0, metavar="N",
                      help="run N busy-looping processes beside the timings (stopped after)")
    demo.set_defaults(func=run_demo)

    exp = sub.add_parser("explain", help="print the attention sites found and what was done")
    _add_model_options(exp)
    fmt = exp.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="a Markdown table")
    fmt.add_argument("--json", action="store_true", help="the report as JSON")
    exp.set_defaults(func=cmd_explain)

    chk = sub.add_parser("check", help="compile and compare with the model (exit 1 if off)")
    _add_model_options(chk)
    chk.add_argument("--rtol", type=float, default=1e-5, help="largest relative error allowed")
    chk.add_argument("--backend", choices=BACKENDS, default="eager")
    chk.add_argument("--no-grads", action="store_true", help="compare outputs only")
    chk.set_defaults(func=cmd_check)

    thc_command.add_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS))
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, entry in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=entry.help)
        entry.add_arguments(p)
        p.set_defaults(func=entry.run)
    add_train_parser(sub)  # clusterfx train digits --model ...
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:  # bad input: the message names the value
        print(f"clusterfx: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["BENCHMARKS", "build_parser", "main"]
