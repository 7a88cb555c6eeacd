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
                                 "fused-conv", "fused-linear", "sdpa-core", "paca-core",
                                 "dpc-global", "dpc-local", "dpc-reference")} <= methods
    assert all(r["time_s"] > 0 and r["speedup"] > 0 for r in data["results"])
    assert data["targets"] == []  # the targets are at N = 3136 and 12544


def test_fused_cases_compute_the_model_layers_outputs():
    """fused-conv / fused-linear run the same layer (same seed, same parameters) as paca-conv /
    paca-linear through ops.paca.paca_layer: equal outputs, so the ratios compare like with
    like."""
    import torch

    from clusterfx.bench.paca import build

    cfg = {"device": "cpu", "dtype": "float32", "dim": 16, "heads": 2, "clusters": 8}
    with torch.no_grad():
        for kind in ("conv", "linear"):
            fn, inputs = build(f"paca-{kind}", 256, cfg)
            fused, fused_inputs = build(f"fused-{kind}", 256, cfg)
            torch.testing.assert_close(fused_inputs[0], inputs[0], rtol=0, atol=0)
            torch.testing.assert_close(fused(*fused_inputs), fn(*inputs), rtol=1e-5, atol=1e-5)


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


def test_flop_counts_agree_with_torch_flop_counter():
    """The shape-derived counts equal torch's FlopCounterMode wherever it sees the products;
    it does not see CPU SDPA, whose 4·N·Nk·C term is added by hand."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clusterfx.bench.paca import build, matmul_flops

    cfg = {"device": "cpu", "dtype": "float32", "dim": 16, "heads": 2, "clusters": 8}
    n, c, m = 64, 16, 8
    unseen = {"dense-sdpa": 4 * n * n * c, "paca-conv": 4 * n * m * c,
              "paca-linear": 4 * n * m * c, "paca-core": 0}  # fused-*: C++, unseen
    for method, sdpa in unseen.items():
        fn, inputs = build(method, n, cfg)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(*inputs)
        assert matmul_flops(method, n, cfg) - sdpa == counter.get_total_flops(), method


def test_target_ceiling_from_the_gemm_rate():
    from clusterfx.bench.paca import evaluate_targets, target_note

    def row(method, t, gflop):
        return {"n": 3136, "method": method, "time_s": t, "gflop": gflop,
                "gflop_per_s": None if gflop is None else gflop / t}

    rows = [row("dense-mha", 0.08, 4.0), row("paca-conv", 0.006, 0.45),
            row("gemm", 0.015, 2.1)]  # 140 GFLOP/s: paca-conv can take no less than 3.2 ms
    t = next(x for x in evaluate_targets(rows) if x["target"].startswith("PaCa layer vs dense MHA"))
    assert abs(t["ratio"] - 0.08 / 0.006) < 1e-9 and not t["met"]
    assert abs(t["ceiling"] - 0.08 / (0.45 / 140.0)) < 1e-9  # 24.9x < 25x
    assert "out of reach" in target_note(t)
    rows[0]["time_s"] = 0.2
    t = next(x for x in evaluate_targets(rows) if x["target"].startswith("PaCa layer vs dense MHA"))
    assert "out of reach" not in target_note(t) and t["ceiling"] > 25


def test_without_the_fused_kernels_the_fused_cases_are_skipped_with_the_reason(monkeypatch,
                                                                               tmp_path, capsys):
    from clusterfx.ops.common.native import NativeUnavailable
    from clusterfx.ops.paca import NATIVE_LIBRARY

    def unavailable():
        raise NativeUnavailable("no C++ compiler (g++) here")

    monkeypatch.setattr(NATIVE_LIBRARY, "available", lambda: False)
    monkeypatch.setattr(NATIVE_LIBRARY, "load", unavailable)
    out = tmp_path / "paca.json"
    assert main(["bench", "paca", "--sizes", "64", "--dim", "16", "--clusters", "8",
                 "--dpc-dim", "8", "--repeats", "1", "--no-memory", "--json", str(out)]) == 0
    assert "fused-conv / fused-linear not run: no C++ compiler (g++) here" in \
        capsys.readouterr().out
    methods = {r["method"] for r in json.loads(out.read_text())["results"]}
    assert "paca-conv" in methods and not methods & {"fused-conv", "fused-linear"}
