"""Print the README's coverage table: every architecture of the zoo compiled with one
approximate policy, and what became of its attention sites.

    PYTHONPATH=<checkout's parent> python -m tests.passes.coverage_table [--policy topk]

Columns: sites found, rewritten (of which "runs exact": the approximate path never ran on the
inputs seen, their mask not being key padding), declined (with the reasons, shortened),
unsupported (recorded and left as written, with the reason), and whether every call reached
clusterfx.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter

import torch

import clusterfx as cfx
from tests.passes.hf_zoo import ZOO
from tests.passes.test_coverage_zoo import NN

POLICIES = {"improved_clustered": cfx.ImprovedClustered(clusters=4, topk=4, seed=0),
            "topk": cfx.TopK(k=4)}

_SHORT = [(r"queries are causal", "causal queries"), (r"causal attention", "causal"),
          (r"varies over \d+ heads", "per-head mask/bias"), (r"never key padding", "not padding"),
          (r"requires grad", "learned bias"), (r"tanh", "soft-capping (tanh)"),
          (r"banded or chunked", "banded layout")]


def short(reason: str) -> str:
    for pattern, text in _SHORT:
        if re.search(pattern, reason):
            return text
    return reason[:40]


def rows(policy) -> list[list[str]]:
    out = []
    builds = [(a.name, a.feature, a.build) for a in ZOO] + [
        (name, "torch.nn encoder-decoder", lambda b=build: b()[:2]) for name, (build, _) in
        NN.items()]
    for name, feature, build in builds:
        model, inputs = build()
        compiled = cfx.compile(model, policy=policy, backend="eager")
        with torch.no_grad():
            compiled(*inputs)
        report = cfx.explain(compiled)
        status = Counter(r.status.value for r in report)
        declined = Counter(short(r.reason) for r in report if r.status == "declined")
        unsupported = Counter(short(r.reason) for r in report if r.status == "unsupported")
        fmt = lambda c: ", ".join(f"{k} ×{v}" for k, v in c.items())  # noqa: E731
        exact = status["rewritten, runs exact"]
        rewritten = str(status["rewritten"] + exact) + (f" ({exact} runs exact: mask)"
                                                          if exact else "")
        out.append([name, feature, str(len(report)), rewritten,
                    f"{sum(declined.values())} ({fmt(declined)})" if declined else "0",
                    f"{sum(unsupported.values())} ({fmt(unsupported)})" if unsupported else "0",
                    "yes" if not report.capture_problems else "NO"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", choices=sorted(POLICIES), default="improved_clustered")
    args = parser.parse_args()
    start = time.perf_counter()
    table = rows(POLICIES[args.policy])
    head = ["model", "what it brings", "found", "rewritten", "declined (reason)",
            "unsupported (reason)", "captured"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in table:
        print("| " + " | ".join(row) + " |")
    total = [sum(int(r[i].split()[0]) for r in table) for i in (2, 3, 4, 5)]
    print(f"\n{len(table)} models, policy {POLICIES[args.policy]!r}: {total[0]} sites found, "
          f"{total[1]} rewritten, {total[2]} declined with a reason, {total[3]} unsupported "
          f"with a reason ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
