"""`clusterfx bench attention` on tiny sizes, in-process through `main([...])`."""

import json
import math

import pytest

from clusterfx.bench.attention import CPU_TARGETS, evaluate_targets, growth, run_conditions
from clusterfx.cli import main

METHODS = ["dense", "clustered", "i-clustered", "topk"]
RESULT_KEYS = {"method", "n", "pass", "times_s", "repeats", "median_s", "min_s", "max_over_min",
               "peak_bytes",
               "speedup_vs_dense", "memory_saving_vs_dense", "tflops", "essential_gflop",
               "gflop_per_s", "rate_vs_dense"}


def _table_rows(out: str) -> dict[tuple[int, str], list[str]]:
    """Markdown rows `| N | method | ... |` keyed by (N, method); a duplicate key fails."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            key = (int(cells[0]), cells[1])
            assert key not in rows, f"row {key} printed twice"
            rows[key] = cells
    return rows


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_timing_table_json_and_markdown_cover_every_method_and_size(tmp_path, capsys):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    code = main(["bench", "attention", "--sizes", "128", "256", "--repeats", "1", "--no-memory",
                 "--clusters", "16", "--json", str(js), "--markdown", str(md)])
    assert code == 0
    out = capsys.readouterr().out
    assert "float32 on cpu, torch.get_num_threads()=" in out
    assert "B=1 H=8 N in {128, 256} D=64" in out
    rows = _table_rows(out)
    assert set(rows) == {(n, m) for n in (128, 256) for m in METHODS}
    for (_, method), cells in rows.items():  # speed-ups are columns 4 and 10: "1.23x"
        for speedup in (cells[4], cells[10]):
            assert _positive_finite(float(speedup.rstrip("x"))), cells
        assert cells[2] == ("-" if method == "dense" else "cpu"), cells  # the fused kernels ran
        assert float(cells[5].replace(",", "")) > 0 and float(cells[6]) > 0  # GFLOP/s, rate

    data = json.loads(js.read_text())
    assert set(data) == {"benchmark", "settings", "results", "growth", "targets", "wall_s"}
    settings = data["settings"]
    assert (settings["heads"], settings["dim"], settings["dtype"], settings["device"]) == (
        8, 64, "float32", "cpu")
    assert settings["threads"] >= 1 and settings["memory"] is False
    assert set(settings["loadavg"]) == {"start", "end"}
    assert len(data["results"]) == 2 * 4 * 2  # sizes x methods x passes
    for r in data["results"]:
        assert set(r) == RESULT_KEYS
        assert r["repeats"] == len(r["times_s"]) == 1 and r["max_over_min"] == 1.0
        assert _positive_finite(r["speedup_vs_dense"]) and _positive_finite(r["median_s"])
        assert r["peak_bytes"] is None
        assert (r["tflops"] is not None) == (r["method"] == "dense")
        if r["method"] == "dense":
            assert r["speedup_vs_dense"] == 1.0 and r["rate_vs_dense"] == 1.0
            flops = 4 * 8 * r["n"] ** 2 * 64 * (3.5 if r["pass"] == "fwd+bwd" else 1.0)
            assert math.isclose(r["essential_gflop"], flops / 1e9)
        assert math.isclose(r["gflop_per_s"], r["essential_gflop"] / r["median_s"])
    assert {(g["method"], g["pass"], g["from_n"], g["to_n"]) for g in data["growth"]} == {
        (m, p, 128, 256) for m in METHODS for p in ("fwd", "fwd+bwd")}
    assert all(_positive_finite(g["time_ratio"]) for g in data["growth"])
    assert data["targets"] == []  # no target size (4k, 16k, 32k) was measured
    text = md.read_text()
    assert text.startswith("# clusterfx bench attention") and "| 256 | topk |" in text


def test_peak_memory_comes_from_a_subprocess_per_case(tmp_path, capsys):
    js = tmp_path / "m.json"
    # N=1024, not smaller: the kernel's RSS counters lag by up to a few hundred KiB
    code = main(["bench", "attention", "--sizes", "1024", "--methods", "clustered",
                 "--repeats", "1", "--clusters", "16", "--memory", "--json", str(js)])
    assert code == 0
    rows = _table_rows(capsys.readouterr().out)
    assert set(rows) == {(1024, "dense"), (1024, "clustered")}
    results = {(r["method"], r["pass"]): r for r in json.loads(js.read_text())["results"]}
    assert len(results) == 4
    for r in results.values():
        # tensors here are 2 MiB each: a peak in the hundreds of MiB would be the parent's
        # RSS leaking in (what ru_maxrss does across exec)
        assert isinstance(r["peak_bytes"], int) and 0 < r["peak_bytes"] < 64 * 2**20, r
        assert _positive_finite(r["memory_saving_vs_dense"])
    for method in ("dense", "clustered"):  # the backward also holds dq, dk, dv (3 x 2 MiB)
        assert results[method, "fwd+bwd"]["peak_bytes"] > results[method, "fwd"]["peak_bytes"]


def _row(method, n, speedup, seconds, peak, pss="fwd"):
    return {"method": method, "n": n, "pass": pss, "speedup_vs_dense": speedup,
            "median_s": seconds, "peak_bytes": peak}


def test_targets_report_met_and_missed_from_the_measured_numbers():
    rows = [_row("clustered", 16384, 45.0, 1.0, 100), _row("clustered", 32768, 30.0, 2.0, 200),
            _row("clustered", 65536, 30.0, 4.41, 400), _row("clustered", 4096, 3.0, 0.5, 50),
            _row("i-clustered", 16384, 10.5, 1.0, 100),
            _row("clustered", 16384, 31.0, 3.0, 300, "fwd+bwd"),
            _row("topk", 16384, 1.4, 1.0, 10)]
    quiet = evaluate_targets(rows, growth(rows), {"any", "quiet", "d64"})
    by_label = {t["target"].split(" (to")[0]: t for t in quiet}
    expected = {  # label -> (value, met); D=32 and loaded targets do not apply to this run
        CPU_TARGETS[0][0]: (45.0, True), CPU_TARGETS[1][0]: (3.0, False),
        CPU_TARGETS[3][0]: (10.5, False), CPU_TARGETS[4][0]: (31.0, True),
        CPU_TARGETS[5][0]: (1.4, True), CPU_TARGETS[6][0]: (2.1, True)}
    assert set(by_label) == set(expected)
    for label, (value, met) in expected.items():
        assert math.isclose(by_label[label]["value"], value) and by_label[label]["met"] == met
    assert "(to 65536)" in next(t["target"] for t in quiet if "doubling" in t["target"])
    loaded = evaluate_targets(rows, growth(rows), {"any", "loaded"})
    assert {t["target"].split(" (to")[0] for t in loaded} == {CPU_TARGETS[6][0],
                                                               CPU_TARGETS[7][0]}
    assert [t["met"] for t in loaded if t["target"] == CPU_TARGETS[7][0]] == [True]
    d32 = evaluate_targets(rows, growth(rows), run_conditions({"dim": 32, "load_processes": 0}))
    assert CPU_TARGETS[2][0] in {t["target"] for t in d32}


def test_load_option_starts_and_stops_busy_neighbours(capsys, monkeypatch):
    import clusterfx.bench.attention as bench_attention
    from clusterfx.apps.common import busy_neighbours

    seen = []
    real = busy_neighbours

    def spy(count):
        cm = real(count)
        procs = cm.__enter__()
        seen.extend(procs)
        assert all(p.poll() is None for p in procs)  # running while the bench measures

        class _Wrap:
            def __enter__(self):
                return procs

            def __exit__(self, *exc):
                return cm.__exit__(*exc)
        return _Wrap()

    monkeypatch.setattr(bench_attention, "busy_neighbours", spy)
    code = main(["bench", "attention", "--sizes", "64", "--repeats", "1", "--no-memory",
                 "--no-backward", "--methods", "clustered", "--clusters", "4", "--load", "1"])
    assert code == 0
    assert len(seen) == 1 and seen[0].poll() is not None  # stopped after the run
    assert "busy neighbour processes (--load): 1" in capsys.readouterr().out
    assert main(["bench", "attention", "--load", "-1"]) == 2
    assert "--load (-1) must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--methods", "flex"], "flex runs on --device cuda only"),
    (["--sizes", "0"], "--sizes (0) must be a positive integer"),
])
def test_bad_options_exit_2_with_the_offending_value(argv, message, capsys):
    assert main(["bench", "attention", "--no-memory", *argv]) == 2
    assert message in capsys.readouterr().err


def test_paper_methods_run_the_papers_clustering(capsys):
    import torch

    from clusterfx.bench.attention import make_method
    from clusterfx.ops.clustered import clustered_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(3))
    paper = make_method("clustered-paper", 8, 4)(q, k, v)
    want = clustered_attention(q, k, v, clusters=8, seed=0, metric="euclidean", iterations=10,
                               refine=0)
    assert torch.equal(paper, want)
    assert not torch.equal(paper, make_method("clustered", 8, 4)(q, k, v))
    code = main(["bench", "attention", "--sizes", "128", "--repeats", "1", "--no-memory",
                 "--no-backward", "--clusters", "8", "--methods", "i-clustered-paper",
                 "--metric", "euclidean", "--refine", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "metric=euclidean iterations=5 refine=2" in out
    assert {m for _, m in _table_rows(out)} == {"dense", "i-clustered-paper"}
    assert main(["bench", "attention", "--refine", "-1"]) == 2
    assert "--refine (-1) must be >= 0" in capsys.readouterr().err
