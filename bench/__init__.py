"""Benchmarks (`clusterfx bench NAME`): each module has `add_arguments(parser)` and
`run(args) -> exit code`, raises ValueError for bad input, and prints ratios measured side by
side with shapes, dtype, device, threads and machine load. Modules are imported when their
benchmark runs (some import transformers)."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    """A `clusterfx bench NAME` entry: its help and the module that runs it."""

    help: str
    module: str

    def load(self):
        return importlib.import_module(f"clusterfx.bench.{self.module}")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.load().add_arguments(p)

    def run(self, args: argparse.Namespace) -> int:
        return self.load().run(args)


BENCHMARKS: dict[str, Benchmark] = {
    "passes": Benchmark("pass-pipeline cost vs whole compile time", "passes"),
    "attention": Benchmark("dense SDPA vs clustered / i-clustered / top-k: time, memory",
                           "attention"),
    "quality": Benchmark("pretrained all-MiniLM-L6-v2, attention rewritten without retraining: "
                         "embedding cosine and retrieval vs dense", "quality"),
    "causal": Benchmark("causal clustered attention for decoders: speed vs SDPA is_causal, and "
                        "perplexity of a GPT trained on the stdlib", "causal"),
    "thc": Benchmark("THC on brain networks: runtime and memory vs number of ROIs", "thc"),
    "paca": Benchmark("patch-to-cluster attention vs dense MHA, DPC-kNN global vs local: "
                      "time, memory", "paca"),
    "parallel": Benchmark("one attention layer fwd+bwd: one process vs Ulysses / Ring / USP "
                          "over gloo processes, dense and clustered; bytes per layer; an 8-GPU "
                          "projection", "parallel"),
}
