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
import contextlib
import importlib
import importlib.util
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models import MODEL_FACTORIES, example_inputs
from . import bench_attention
from .api import compile as cfx_compile
from .api import explain
from .configs import Clustered, Dense, ImprovedClustered, TopK
from .policy import Policy
from .report import Report

BACKENDS = ("inductor", "aot_eager", "eager")
# Where each reference model keeps its attention layers (module path prefix of layer i).
_LAYER_PREFIX = {"gpt": "blocks", "bert": "encoder.layer", "vit": "blocks"}
_DEMO_DIM, _DEMO_HEADS, _BATCH = 128, 4, 2


class CliError(Exception):
    """Bad input: printed as `clusterfx: error: ...`, exit code 2."""


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


# ---------------------------------------------------------------- user objects, inputs, policy
def load_object(spec: str, what: str) -> Callable:
    """`"pkg.mod:name"` or `"path/to/file.py:name"` -> the callable `name`."""
    module_name, sep, attr = spec.rpartition(":")
    if (not sep or not module_name or ":" in module_name
            or not attr.replace(".", "").replace("_", "").isalnum()):
        raise CliError(f"{what} ({spec!r}) must look like MODULE:NAME, "
                       f"e.g. clusterfx.models:gpt_tiny or path/to/file.py:make_model")
    try:
        module = _import(module_name)
    except Exception as exc:  # user code may raise anything on import
        raise CliError(f"{what}: cannot import module {module_name!r}: "
                       f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{what}: {spec} is a {type(obj).__name__}, not a callable")
    return obj


def _import(module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        name = f"_clusterfx_user_{path.stem}_{abs(hash(str(path)))}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the console script does not put cwd on the path
    return importlib.import_module(module_name)


def build_model(spec: str) -> tuple[Any, str | None]:
    """Call the factory; returns (model in eval mode, our model name or None)."""
    factory = load_object(spec, "FACTORY")
    try:
        model = factory()
    except Exception as exc:  # user code may raise anything
        raise CliError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    if isinstance(model, torch.nn.Module):
        model.eval()
    elif not callable(model):
        raise CliError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    ours = next((n for n, f in MODEL_FACTORIES.items() if f is factory), None)
    return model, ours


def build_inputs(args: argparse.Namespace, model: Any, ours: str | None) -> tuple:
    if args.inputs is not None:
        fn = load_object(args.inputs, "--inputs")
        try:
            takes_model = bool(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            takes_model = True
        try:
            out = fn(model) if takes_model else fn()
        except Exception as exc:  # user code may raise anything
            raise CliError(f"--inputs {args.inputs} failed: {type(exc).__name__}: {exc}") from None
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)
    if ours is None:
        raise CliError(f"{args.factory} is not one of the clusterfx.models factories "
                       f"({', '.join(f.__name__ for f in MODEL_FACTORIES.values())}); "
                       f"pass --inputs MODULE:FN returning its example inputs")
    return _our_inputs(ours, model, args.seq_len)


def _our_inputs(name: str, model: Any, seq_len: int) -> tuple:
    max_len = getattr(model, "max_len", None)
    if max_len is not None and seq_len > max_len:
        raise CliError(f"--seq-len ({seq_len}) must be at most the model's max_len ({max_len})")
    try:
        return example_inputs(name, batch=_BATCH, seq_len=seq_len, model=model)
    except ValueError as exc:
        raise CliError(f"--seq-len: {exc}") from None


def parse_policy(text: str | None) -> Policy | None:
    """`--policy`: a JSON object (starts with `{`) or the path of a JSON file."""
    if text is None:
        return None
    raw = text
    if not text.lstrip().startswith("{"):
        try:
            raw = Path(text).read_text()
        except OSError as exc:
            raise CliError(f"--policy ({text!r}) is neither a JSON object nor a readable file: "
                           f"{exc.strerror}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CliError(f"--policy ({text!r}) is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"--policy must be a JSON object of module path -> config, got "
                       f"{type(data).__name__}")
    try:
        return Policy.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise CliError(f"--policy: {exc}") from None


def compile_and_run(model: Any, inputs: tuple, policy: Any, backend: str, *,
                    strict: bool = False, dump_dir: Path | None = None) -> tuple[Any, Report]:
    """Compile, run once without grad, and return (compiled model, its report)."""
    torch._dynamo.reset()  # fresh caches: every command compiles its own model from scratch
    try:
        compiled = cfx_compile(model, policy=policy, backend=backend, strict=strict,
                               dump_dir=dump_dir)
        with torch.no_grad():
            compiled(*inputs)
        return compiled, explain(compiled)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        inner = getattr(exc, "inner_exception", None)
        if isinstance(inner, (ValueError, TypeError)):
            raise CliError(str(inner)) from None
        raise


def load_check_equivalence() -> Callable | None:
    """The equivalence checker, imported lazily (None when this build lacks it)."""
    try:
        from .equivalence import check_equivalence
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith("equivalence"):
            return None
        raise
    return check_equivalence


# ------------------------------------------------------------------------------ shared printing
def describe_inputs(inputs: tuple) -> str:
    parts = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"
             if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]
    return f"inputs [{'; '.join(parts)}], torch threads {torch.get_num_threads()}"


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
        raise CliError(f"--rtol ({args.rtol}) must be a number >= 0")
    check_equivalence = load_check_equivalence()
    if check_equivalence is None:
        raise CliError("this build has no clusterfx.compiler.equivalence; cannot check")
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


def demo_policy(model_name: str, layers: int) -> dict[str, Any]:
    """Layer 0 exact, layer 1 top-k, layers 2..(L/2) i-clustered, the rest clustered.
    (On the causal GPT model, (i-)clustered layers are declined and stay exact: see the report.)"""
    prefix = _LAYER_PREFIX[model_name]
    half = max(3, (layers + 1) // 2)
    middle = "|".join(str(i) for i in range(2, half)) or "2"
    return {f"{prefix}.0": Dense(), f"{prefix}.1": TopK(k=32),
            f"re:{prefix.replace('.', chr(92) + '.')}\\.({middle})":
                ImprovedClustered(clusters=25, topk=32, seed=0),
            "_default": Clustered(clusters=100, seed=0)}


def build_reference(name: str, layers: int, seq_len: int, dim: int = _DEMO_DIM,
                    heads: int = _DEMO_HEADS) -> tuple[torch.nn.Module, tuple]:
    """One of `clusterfx.models` with `layers` blocks and inputs of about `seq_len` tokens
    (ViT: an image of round(sqrt(seq_len)) patches a side, plus the class token)."""
    if layers < 1 or seq_len < 2:
        raise CliError(f"--layers ({layers}) must be >= 1 and --seq-len ({seq_len}) >= 2")
    factory = MODEL_FACTORIES[name]
    if name == "vit":
        side = max(1, round(seq_len ** 0.5))
        model = factory(image_size=8 * side, patch_size=8, dim=dim, depth=layers, heads=heads)
    else:
        model = factory(dim=dim, depth=layers, heads=heads, max_len=max(512, seq_len))
    model.eval()
    return model, _our_inputs(name, model, seq_len)


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


def _timing_line(timing: dict[str, Any], names: list[str]) -> str:
    parts = [f"{name} {timing[name + '_s'] * 1e3:.2f} ms ({timing['speedup_' + name]:.2f}x)"
             for name in names]
    return f"forward, median of {timing['runs']} after {timing['warmup']} warm-up: " + \
        ", ".join(parts)


def cmd_demo(args: argparse.Namespace) -> int:
    progress = Progress()
    out = Path(args.out)
    with progress.step(f"building {args.model} ({args.layers} layers, seq-len {args.seq_len})"):
        model, inputs = build_reference(args.model, args.layers, args.seq_len)
    policy = demo_policy(args.model, args.layers)
    print(f"model {args.model}: {args.layers} layers, dim {_DEMO_DIM}, {_DEMO_HEADS} heads, "
          f"float32 on cpu; {describe_inputs(inputs)}; backend {args.backend}")
    print("policy (first matching key wins; `_default` last):")
    for key, config in policy.items():
        print(f"  {key!r}: {config!r}")
    dump_dir = out / "graphs"
    if importlib.util.find_spec(f"{__package__}.graph_dump") is None:
        print("note: graph dumps need clusterfx.compiler.graph_dump, absent from this build")
        dump_dir = None
    with progress.step(f"compiling (backend={args.backend}) and first call"):
        compiled, report = compile_and_run(model, inputs, policy, args.backend,
                                           dump_dir=dump_dir)
    print(report)
    with progress.step(f"compiling an all-exact baseline (backend={args.backend})"):
        exact, _ = compile_and_run(model, inputs, None, args.backend)
    with progress.step("timing eager vs compiled-exact vs compiled-with-policy forward"):
        timing = time_side_by_side({"eager": model, "compiled_exact": exact,
                                    "compiled": compiled}, inputs, warmup=1, runs=5)
    print(_timing_line(timing, ["eager", "compiled_exact", "compiled"])
          + f"; {describe_inputs(inputs)}")
    print(f"attention rewrites speed-up (compiled exact / compiled with policy): "
          f"{timing['compiled_exact_s'] / timing['compiled_s']:.2f}x")
    equivalence = None
    check_equivalence = load_check_equivalence()
    if check_equivalence is None:
        print("note: equivalence check skipped: clusterfx.compiler.equivalence is not available")
    else:
        with progress.step("checking equivalence (outputs and gradients)"):
            equivalence = check_equivalence(model, compiled, inputs, grads=True)
        print(equivalence)
    _write_demo_reports(out, args, report, timing, equivalence, inputs)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}"
          + (f" and graph dumps under {dump_dir}" if dump_dir is not None else ""))
    return 0


def _write_demo_reports(out: Path, args: argparse.Namespace, report: Report,
                        timing: dict[str, float], equivalence: Any, inputs: tuple) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "layers": args.layers, "seq_len": args.seq_len,
                "backend": args.backend, "dim": _DEMO_DIM, "heads": _DEMO_HEADS,
                "inputs": describe_inputs(inputs), "threads": torch.get_num_threads()}
    eq_dict = equivalence.to_dict() if equivalence is not None else None
    data = {**report.to_dict(), "demo": {"settings": settings, "timing": timing,
                                         "equivalence": eq_dict}}
    (out / "report.json").write_text(_write_json(data) + "\n")
    lines = [f"# clusterfx demo: {args.model}, {args.layers} layers, seq-len {args.seq_len}", "",
             f"backend `{args.backend}`; {settings['inputs']}", "", report.to_markdown(),
             "## Timing", "", _timing_line(timing, ["eager", "compiled_exact", "compiled"]),
             f"(threads {torch.get_num_threads()})", "",
             "## Equivalence to the eager model (approximate layers differ by design)", ""]
    lines.append(f"```\n{equivalence}\n```" if equivalence is not None else "not available")
    (out / "report.md").write_text("\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------- bench
@dataclass(frozen=True)
class Benchmark:
    """A `clusterfx bench NAME` entry: its help, its options, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _passes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(MODEL_FACTORIES), default="gpt")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--target", type=float, default=1.0, help="seconds the passes may take")


def _seconds(fn: Callable, inputs: tuple) -> float:
    start = time.perf_counter()
    fn(*inputs)
    return time.perf_counter() - start


def bench_passes(args: argparse.Namespace) -> int:
    """Cost of the pass pipeline against the whole compile (capture + passes + backend)."""
    progress = Progress()
    with progress.step(f"building {args.model} with {args.layers} layers"):
        model, inputs = build_reference(args.model, args.layers, args.seq_len)
    with progress.step("compiling (backend=eager) and first call"):
        start = time.perf_counter()
        compiled, report = compile_and_run(model, inputs, demo_policy(args.model, args.layers),
                                           "eager")
        first_call = time.perf_counter() - start
    with torch.no_grad():
        steady = statistics.median(_seconds(compiled, inputs) for _ in range(3))
    compile_s = max(first_call - steady, 1e-9)  # capture + passes + backend
    per_pass: dict[str, float] = {}
    for record in compiled._clusterfx_state.latest_records():
        for name, seconds in record.pass_seconds.items():
            per_pass[name] = per_pass.get(name, 0.0) + seconds
    print(f"bench passes: {args.model}, {args.layers} layers, dim {_DEMO_DIM}, "
          f"{_DEMO_HEADS} heads, {len(report)} attention sites in {report.graphs} graph(s); "
          f"float32 on cpu; {describe_inputs(inputs)}")
    print(f"{'pass':<14}{'seconds':>10}{'of compile':>12}")
    for name, seconds in per_pass.items():
        print(f"{name:<14}{seconds:>10.4f}{seconds / compile_s:>11.1%}")
    total = report.pass_seconds
    verdict = "met" if total <= args.target else "MISSED"
    print(f"{'all passes':<14}{total:>10.4f}{total / compile_s:>11.1%}   "
          f"(target <= {args.target:g} s: {verdict})")
    print(f"{'compile':<14}{compile_s:>10.4f}{1:>11.1%}   (first call {first_call:.3f} s "
          f"minus a steady call {steady:.4f} s)")
    return 0


BENCHMARKS: dict[str, Benchmark] = {
    "passes": Benchmark("pass-pipeline cost vs whole compile time", _passes_arguments,
                        bench_passes),
    "attention": Benchmark("dense SDPA vs clustered / i-clustered / top-k: time, memory",
                           bench_attention.add_arguments, bench_attention.bench_attention),
    # imported when used: it imports this module, and transformers only when it runs
    "quality": Benchmark(
        "pretrained all-MiniLM-L6-v2, attention rewritten without retraining: embedding cosine "
        "and retrieval vs dense",
        lambda p: importlib.import_module(".bench_quality", __package__).add_arguments(p),
        lambda a: importlib.import_module(".bench_quality", __package__).run(a)),
}


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
    demo.add_argument("--seq-len", type=int, default=4096)
    demo.add_argument("--out", default="clusterfx-out", help="folder for reports and dumps")
    demo.add_argument("--backend", choices=BACKENDS, default="inductor")
    demo.set_defaults(func=cmd_demo)

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

    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS))
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, entry in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=entry.help)
        entry.add_arguments(p)
        p.set_defaults(func=entry.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.func(args)
    except CliError as exc:
        print(f"clusterfx: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["BENCHMARKS", "Benchmark", "CliError", "build_parser", "main"]
