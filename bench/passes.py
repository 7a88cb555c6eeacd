"""`clusterfx bench passes`: the cost of the pass pipeline against the whole compile (capture +
passes + backend), per pass, on a deep reference model."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from clusterfx.apps.common import (
    DEMO_DIM,
    DEMO_HEADS,
    Progress,
    build_reference,
    compile_and_run,
    describe_inputs,
    machine_load,
)
from clusterfx.apps.demo import demo_policy
from clusterfx.models import MODEL_FACTORIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(MODEL_FACTORIES), default="gpt")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--target", type=float, default=1.0, help="seconds the passes may take")


def _seconds(fn: Callable, inputs: tuple) -> float:
    start = time.perf_counter()
    fn(*inputs)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
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
    print(f"bench passes: {args.model}, {args.layers} layers, dim {DEMO_DIM}, "
          f"{DEMO_HEADS} heads, {len(report)} attention sites in {report.graphs} graph(s); "
          f"float32 on cpu; {describe_inputs(inputs)}; {machine_load()}")
    print(f"{'pass':<18}{'seconds':>10}{'of compile':>12}")
    for name, seconds in per_pass.items():
        print(f"{name:<18}{seconds:>10.4f}{seconds / compile_s:>11.1%}")
    total = report.pass_seconds
    verdict = "met" if total <= args.target else "MISSED"
    print(f"{'all passes':<18}{total:>10.4f}{total / compile_s:>11.1%}   "
          f"(target <= {args.target:g} s: {verdict})")
    print(f"{'compile':<18}{compile_s:>10.4f}{1:>11.1%}   (first call {first_call:.3f} s "
          f"minus a steady call {steady:.4f} s)")
    return 0
