"""Run a function on several gloo processes on this machine, bounded in time, none left behind.

    results = launch("tests.distributed.workers:ring_cases", world=2, args={...})

starts `world` fresh Python processes (`python -m tests.distributed_helpers ...`, each in its
own session), which join one gloo group on 127.0.0.1 at a free port (init and collectives
time out after `collective_timeout` seconds), call ``fn(rank, world, **args)`` and write its
JSON-able return value to a file. The launcher waits at most `timeout` seconds in all; if a
process fails or the time runs out, every process is killed and the test fails with each
rank's exit status and the tail of its output. Processes use one thread each (CI has 2 cores).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def _tail(path: Path, n: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-n:]



def output_and_param_grads(fn, inputs, params, keep=None):
    """Output and parameter gradients of a fixed random projection of it (zero at the
    positions `keep` (B, S) leaves out, and those outputs zeroed, when given)."""
    import torch

    for p in params:
        p.grad = None
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    if keep is not None:
        g = g * keep[..., None]
    (out * g).sum().backward()
    out = out.detach() if keep is None else out.detach() * keep[..., None]
    return out, [None if p.grad is None else p.grad.clone() for p in params]

def errors_against(out, grads, want, want_grads) -> dict:
    """Relative errors of an output and parameter gradients against the one-process ones:
    out (max |Δ| / max |want|), grads (max |Δ| / the largest gradient entry), missing (how
    many gradients exist on one side only)."""
    scale = max(float(g.abs().max()) for g in want_grads if g is not None)
    return {"out": float((out - want).abs().max() / want.abs().max()),
            "grads": max(float((a - b).abs().max()) / scale
                         for a, b in zip(grads, want_grads) if b is not None),
            "missing": sum((a is None) != (b is None) for a, b in zip(grads, want_grads))}


def site_records(compiled) -> list[dict]:
    """Per site of a compiled model's report: its sequence-parallel summary, run-time paths,
    planned and measured bytes per step (forward, backward), traffic counters and planned
    collectives (name, phase, count)."""
    import clusterfx as cfx

    sites = []
    for row in cfx.explain(compiled):
        record = row.sequence_parallel
        sites.append({"summary": record.summary(), "paths": dict(row.paths),
                      "planned_fwd": record.bytes_per_step("fwd"),
                      "planned_bwd": record.bytes_per_step("bwd"),
                      "ran_fwd": row.measured_bytes_per_step("fwd"),
                      "ran_bwd": row.measured_bytes_per_step("bwd"),
                      "traffic": dict(row.traffic),
                      "collectives": [(c.name, c.phase, c.count) for c in record.collectives]})
    return sites


def launch(target: str, world: int, args: dict[str, Any] | None = None, *,
           timeout: float = 300.0, collective_timeout: float = 60.0,
           expect_failure: bool = False, grace: float = 30.0) -> list[Any]:
    """Results of ``target(rank, world, **args)`` per rank (see the module docstring).
    `expect_failure=True`: return each rank's (exit status, output) instead of raising; the
    other ranks get `grace` seconds after the first failure to end by themselves."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="cfx-dist-") as tmp:
        folder = Path(tmp)
        procs, logs = [], []
        for rank in range(world):
            log = folder / f"rank{rank}.log"
            logs.append(log)
            cmd = [sys.executable, "-m", "tests.distributed_helpers", target, str(rank),
                   str(world), str(port), json.dumps(args or {}), str(folder / f"{rank}.json"),
                   str(collective_timeout)]
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs):
                failed = [p for p in procs if p.poll() not in (None, 0)]
                if failed and not expect_failure or time.monotonic() > deadline:
                    break
                if failed:  # let the others end by themselves for a while, then kill them
                    deadline = min(deadline, time.monotonic() + grace)
                time.sleep(0.2)
            timed_out = any(p.poll() is None for p in procs)
        finally:
            _kill(procs)
        codes = [p.returncode for p in procs]
        if expect_failure:
            return [(code, _tail(log, 20000)) for code, log in zip(codes, logs)]
        if timed_out or any(codes):
            why = f"timed out after {timeout:g}s" if timed_out else "a rank failed"
            report = "\n".join(f"--- rank {r} exit {c}\n{_tail(log)}"
                               for r, (c, log) in enumerate(zip(codes, logs)))
            raise AssertionError(f"distributed run of {target} on {world} ranks: {why}\n"
                                 f"{report}")
        return [json.loads((folder / f"{r}.json").read_text()) for r in range(world)]


def _main(target: str, rank: str, world: str, port: str, args: str, out: str,
          collective_timeout: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=int(world),
        timeout=datetime.timedelta(seconds=float(collective_timeout)))
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    result = fn(int(rank), int(world), **json.loads(args))
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _main(*sys.argv[1:])
