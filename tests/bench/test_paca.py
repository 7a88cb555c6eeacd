"""`clusterfx bench paca` on small sizes: every method runs, ratios and targets are reported,
memory comes from the subprocess worker, bad input exits 2."""

from __future__ import annotations

import json

from clusterfx.cli import main


def test_small_run_reports_every_method(tmp_path, capsys):
    out = tmp_path / "paca.json"
    code = main(["bench", "paca", "--sizes", "64", "256", "--dim", "16", "--clusters", "8",
                 "--dpc-dim", "8", "--repeats", "1", "--no-memory", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| 256 | layer | paca-conv |" in text and "no GPU measurement" in text
    data = json.loads(out.read_text())
    methods = {(r["n"], r["method"]) for r in data["results"]}
    for n in (64, 256):
        assert {(n, m) for m in ("dense-sdpa", "dense-mha", "paca-conv", "paca-linear",
                                 "sdpa-core", "paca-core", "dpc-global", "dpc-local",
                                 "dpc-reference")} <= methods
    assert all(r["time_s"] > 0 and r["speedup"] > 0 for r in data["results"])
    assert data["targets"] == []  # the targets are at N = 3136 and 12544


def test_memory_worker_measures_a_case_in_a_subprocess():
    from clusterfx.bench.paca import peak_memory

    cfg = {"device": "cpu", "dtype": "float32", "dim": 16, "heads": 2, "clusters": 8,
           "dpc_dim": 8, "threads": 1}
    # the dense layer at N = 1024 holds no N×N matrix (fused SDPA); MHA's weights are 4 MiB
    assert peak_memory("dense-mha", 1024, cfg) >= 4 * 2**20


def test_bad_sizes_exit_2(capsys):
    assert main(["bench", "paca", "--sizes", "99", "--no-memory"]) == 2
    assert "--sizes: 99 must be a perfect square" in capsys.readouterr().err
    assert main(["bench", "paca", "--dim", "10", "--heads", "3"]) == 2
