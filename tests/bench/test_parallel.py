"""`clusterfx bench parallel`: argument errors, the per-layer byte formulas, and (slow tier) a
tiny run on 4 gloo processes whose counted bytes equal the formulas."""

import json
import re

import pytest

from clusterfx.bench.parallel import formula_bytes
from clusterfx.cli import main

ARGS = {"heads": 8, "kv_heads": 8, "dim": 64}


@pytest.mark.parametrize("argv,message", [
    (["--world", "3"], r"--world \(3\) must be an even number"),
    (["--heads", "6"], r"--heads \(6\) must be divisible by --world"),
    (["--lengths", "100"], r"--lengths: 100 must be divisible by 2·world = 8"),
    (["--steps", "0"], r"--steps \(0\) must be >= 1"),
    (["--topk", "0"], r"--topk \(0\) must be >= 1"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(["bench", "parallel", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_formulas_per_layer():
    S, H, D = 4096, 8, 64
    # Ulysses, P = u = 4: 4·(P-1)/P²·S·H·D elements each way (q, k, v, out), fwd + bwd
    assert formula_bytes(S, 4, 1, ARGS) == 2 * 4 * 3 / 16 * S * H * D * 4
    # ring, r = 4: 2(r-1)/r·X K/V each way, plus dK, dV over r hops (X = S·H·D)
    x = S * H * D
    assert formula_bytes(S, 1, 4, ARGS) == 2 * 2 * 3 / 4 * x * 4 + 2 * x * 4
    # clustered over the ring adds the metric's statistics (float64), all-reduced
    extra = 2 * 3 / 4 * H * (1 + D + D * D) * 8
    assert formula_bytes(S, 1, 4, ARGS, method="clustered") == pytest.approx(
        formula_bytes(S, 1, 4, ARGS) + extra)
    # global clustering: all-reduces of O(C·(D + bits)) per head instead of rotating K/V
    glob = formula_bytes(S, 1, 4, {**ARGS, "clusters": 100}, method="global")
    assert 0 < glob < formula_bytes(S, 1, 4, ARGS) / 10
    assert formula_bytes(S, 4, 1, ARGS, method="global") == formula_bytes(S, 4, 1, ARGS)
    # improved clustered sends nothing more: its top-k keys are copied from the passing blocks
    assert formula_bytes(S, 1, 4, ARGS, method="improved") == formula_bytes(
        S, 1, 4, ARGS, method="clustered")


@pytest.mark.distributed
@pytest.mark.slow  # ~1 min of process start-up on 2 cores; the ops tests count bytes too
def test_tiny_run_counts_the_formula_bytes(tmp_path, capsys):
    out = tmp_path / "parallel.json"
    assert main(["bench", "parallel", "--lengths", "64", "--steps", "1", "--heads", "4",
                 "--dim", "8", "--clusters", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PROJECTION (not measured)" in text and "no GPU" in text
    result = json.loads(out.read_text())
    assert {r["config"] for r in result["sp"]} == {"ulysses", "ring", "usp"}
    for row in result["sp"]:
        assert row["bytes_per_step"] == pytest.approx(row["formula_bytes"]), row
        assert row["seconds"] > 0
