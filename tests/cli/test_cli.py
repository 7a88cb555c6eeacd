"""The `clusterfx` command line, run in-process through `main([...])`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfx import cli
from clusterfx.cli import BENCHMARKS, main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_model.py"
POLICY = '{"blocks.0": null, "_default": {"type": "clustered", "clusters": 8}}'


def test_explain_prints_every_site_with_its_policy_decision(capsys):
    assert main(["explain", "clusterfx.models:gpt_tiny", "--policy", POLICY]) == 0
    out = capsys.readouterr().out
    assert "2 attention site(s)" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("blocks.")}
    assert sorted(rows) == ["blocks.0.attn", "blocks.1.attn"]
    assert "policy value is None" in rows["blocks.0.attn"]
    assert "clustered" in rows["blocks.1.attn"]


def test_explain_json_lists_sites_and_policy(capsys):
    assert main(["explain", "clusterfx.models:bert_tiny", "--seq-len", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["fqn"] for s in data["sites"]] == [
        "encoder.layer.0.attention", "encoder.layer.1.attention"]
    assert [s["q_shape"][2] for s in data["sites"]] == ["8", "8"]


def test_explain_user_file_finds_einsum_attention_not_the_classifier_softmax(capsys):
    code = main(["explain", f"{EXAMPLE}:make_model", "--inputs", f"{EXAMPLE}:make_inputs",
                 "--markdown"])
    assert code == 0
    out = capsys.readouterr().out
    site_rows = [line for line in out.splitlines() if line.startswith("| attn ")]
    assert len(site_rows) == 1 and "einsum" in site_rows[0]
    assert "1 attention site(s)" in out


def test_check_passes_for_dense_policy(capsys):
    assert main(["check", "clusterfx.models:gpt_tiny", "--policy", '{"_default": null}']) == 0
    out = capsys.readouterr().out
    assert "2 attention site(s)" in out
    assert ": ok" in out


def test_check_exits_1_when_the_error_exceeds_rtol(capsys, monkeypatch):
    class FarOff:
        max_rel_error, min_cosine = 0.5, 0.9

        def ok(self, rtol):
            return self.max_rel_error <= rtol

        def __str__(self):
            return "fake equivalence table"

    monkeypatch.setattr(cli, "check_equivalence",
                        lambda model, compiled, inputs, grads: FarOff())
    assert main(["check", "clusterfx.models:gpt_tiny", "--rtol", "1e-3"]) == 1
    out = capsys.readouterr().out
    assert "fake equivalence table" in out and "FAILED" in out


@pytest.mark.parametrize("argv, bad", [
    ([], "COMMAND"),
    (["demo", "--model", "resnet"], "resnet"),
    (["demo", "--layers", "0", "--backend", "eager"], "--layers (0)"),
    (["demo", "--load", "-1", "--backend", "eager"], "--load (-1) must be >= 0"),
    (["explain", "gpt_tiny"], "gpt_tiny"),
    (["explain", "no_such_module_xyz:make"], "no_such_module_xyz"),
    (["explain", "clusterfx.models:no_such_factory"], "no_such_factory"),
    (["explain", "torch.nn:Identity"], "torch.nn:Identity"),
    (["explain", "clusterfx.models:gpt_tiny", "--seq-len", "4096"], "4096"),
    (["explain", "clusterfx.models:gpt_tiny", "--policy", "{not json"], "{not json"),
    (["explain", "clusterfx.models:gpt_tiny", "--policy", "missing_policy.json"],
     "missing_policy.json"),
    (["explain", "clusterfx.models:gpt_tiny", "--policy", '{"_default": {"type": "bogus"}}'],
     "bogus"),
    (["check", "clusterfx.models:gpt_tiny", "--rtol", "-1"], "-1"),
    (["bench", "nonsense"], "nonsense"),
])
def test_bad_input_exits_2_naming_the_bad_value(capsys, argv, bad):
    assert main(argv) == 2
    assert bad in capsys.readouterr().err


def test_demo_writes_reports_and_graph_dumps(tmp_path, capsys):
    code = main(["demo", "--layers", "4", "--seq-len", "64", "--backend", "eager",
                 "--out", str(tmp_path)])
    assert code == 0
    captured = capsys.readouterr()
    data = json.loads((tmp_path / "report.json").read_text())
    sites = data["sites"]
    assert [s["fqn"] for s in sites] == [f"encoder.layer.{i}.attention" for i in range(4)]
    assert [(s["rewrite"], s["status"]) for s in sites] == [
        ("dense", "kept dense"), ("improved_clustered", "rewritten"),
        ("improved_clustered", "rewritten"), ("clustered", "rewritten")]
    assert sites[2]["paths"] == {"approximate [cpu]": 1}
    assert data["demo"]["settings"]["layers"] == 4
    timing = data["demo"]["timing"]
    assert timing["eager_s"] > 0 and timing["compiled_s"] > 0 and timing["compiled_exact_s"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "| encoder.layer.3.attention |" in markdown
    assert "compiled_exact" in captured.out and "speed-up" in captured.out
    assert "done in" in captured.err  # progress lines go to stderr
    assert data["demo"]["equivalence"]["min_cosine"] > 0.5  # approximate, yet close
    assert list((tmp_path / "graphs").glob("graph0_*_lower.py"))
    layers = timing["layers"]  # per-layer attention, each site's op on its own
    assert [(r["fqn"], r["rewrite"], r["impl"]) for r in layers] == [
        (s["fqn"], s["rewrite"], "sdpa" if s["rewrite"] == "dense" else "cpu") for s in sites]
    assert all(r["exact_ms"] > 0 and r["policy_ms"] > 0 for r in layers)
    assert "per-layer attention" in captured.out and "all attention" in captured.out


def test_bench_passes_reports_each_pass_and_the_total(capsys):
    assert "passes" in BENCHMARKS
    assert main(["bench", "passes", "--layers", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    for name in ("inline_mha", "canonicalize", "lower", "all passes", "compile"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "2 attention sites" in out


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "clusterfx", "bench", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "passes" in done.stdout
