"""THC training and evaluation: the split, the metrics against independent computations, a
smoke run of `thc train` through the CLI harness, the benchmark, and (slow) the full run."""

from __future__ import annotations

import argparse
import json
import shutil

import networkx as nx
import numpy as np
import pytest
import torch

from clusterfx.apps.thc import command, evaluate
from clusterfx.apps.thc.bench import bench
from clusterfx.apps.thc.data import synthesize
from clusterfx.apps.thc.plots import hierarchy_order
from clusterfx.apps.thc.train import TrainConfig, run, split_subjects
from clusterfx.models.thc import modularity


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clusterfx")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("tiny"), subjects=24, rois=16, modules=2,
                      submodules=2, timepoints=80, effect=0.4, seed=0)


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.array([0] * 30 + [1] * 70)
    train, test = split_subjects(labels, 0.3, seed=4)
    assert len(test) == 30 and not set(train) & set(test) and len(train) + len(test) == 100
    assert labels[test].sum() == 21  # 70 % positives, as in the whole set
    again = split_subjects(labels, 0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((train, test), again))
    assert not np.array_equal(test, split_subjects(labels, 0.3, seed=5)[1])
    with pytest.raises(ValueError, match=r"cannot split 5 subjects \(4 of class 0, 1 of class"):
        split_subjects(np.array([0, 0, 0, 0, 1]), 0.3, seed=0)


def test_composite_assignments_are_coarsest_first_means_of_products():
    gen = torch.Generator().manual_seed(0)
    s1 = torch.softmax(torch.randn(3, 8, 4, generator=gen), -1)
    s2 = torch.softmax(torch.randn(3, 4, 2, generator=gen), -1)
    coarse, fine = evaluate.composite_assignments([s1, s2])
    want = np.mean([(s1[b] @ s2[b]).numpy() for b in range(3)], axis=0)
    np.testing.assert_allclose(coarse, want, rtol=1e-6)
    np.testing.assert_allclose(fine, s1.mean(0).numpy(), rtol=1e-6)


def test_community_metrics_match_level_names_and_the_torch_modularity():
    rng = np.random.default_rng(0)
    w = rng.random((10, 10))
    matrices = np.stack([(w + w.T) / 2 - 0.3] * 2)
    graph = evaluate.group_graph(matrices)
    coarse = np.array([0] * 5 + [1] * 5)
    fine = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    truth = {"level1": (coarse + 1) % 2, "level2": fine}  # relabelled: NMI must still be 1
    out = evaluate.community_metrics([coarse, fine], truth, graph)
    assert out["nmi"] == {"level1": 1.0, "level2": 1.0} and out["ari"]["level1"] == 1.0
    adj = torch.tensor(nx.to_numpy_array(graph))[None]
    hard = torch.nn.functional.one_hot(torch.tensor(fine)).double()[None]
    assert abs(out["modularity"]["level2"] - float(modularity(hard, adj)[0])) < 1e-12
    shuffled = evaluate.community_metrics([rng.permutation(coarse), fine], truth, graph)
    assert shuffled["nmi"]["level1"] < 0.5
    assert "nmi" not in evaluate.community_metrics([coarse], None, graph)


def test_hierarchy_order_groups_coarse_then_fine():
    coarse, fine = np.array([1, 0, 1, 0, 1]), np.array([3, 1, 2, 0, 2])
    order = hierarchy_order([coarse, fine])
    assert order.tolist() == [3, 1, 2, 4, 0]


def test_train_smoke_through_the_cli_writes_metrics_assignments_and_pictures(tiny, tmp_path):
    out = tmp_path / "out"
    code = _cli(["thc", "train", "--data", str(tiny), "--out", str(out), "--epochs", "2",
                 "--clusters", "4,2", "--batch-size", "8", "--test-fraction", "0.5"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"thc", "bnt", "gcn"}
    for m in metrics["models"].values():
        assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0 and m["parameters"] > 0
    assert metrics["auroc"] == metrics["models"]["thc"]["auroc"]
    assert set(metrics["nmi"]) == set(metrics["ari"]) == {"level1", "level2"}
    assert metrics["split"] == {"seed": 0, "train": 12, "test": 12, "test_positive": 6}
    rows = (out / "assignments.csv").read_text().splitlines()
    assert rows[0] == "roi,level1,level2" and len(rows) == 17
    coarse = np.array([int(r.split(",")[1]) for r in rows[1:]])
    fine = np.array([int(r.split(",")[2]) for r in rows[1:]])
    assert coarse.max() < 2 and fine.max() < 4
    for name in ("connectivity_communities.png", "assignment_heatmap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "thc.pt")
    assert state["num_rois"] == 16 and "embed.weight" in state["state_dict"]


def test_training_is_deterministic_for_a_seed(tiny, tmp_path):
    config = TrainConfig(epochs=1, clusters=(4, 2), batch_size=8, baselines=(), seed=3)
    a = run(tiny, tmp_path / "a", config)
    b = run(tiny, tmp_path / "b", config)
    assert a["models"]["thc"]["final_train_loss"] == b["models"]["thc"]["final_train_loss"]
    assert a["auroc"] == b["auroc"]
    with pytest.raises(ValueError, match="unknown baseline"):
        TrainConfig(baselines=("svm",))


def test_training_without_known_communities_reports_modularity_only(tiny, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(tiny, folder)
    (folder / "communities.csv").unlink()
    metrics = run(folder, tmp_path / "out", TrainConfig(epochs=1, clusters=(4, 2), baselines=()))
    assert "nmi" not in metrics and "ari" not in metrics
    assert set(metrics["modularity"]) == {"level1", "level2"}
    assert "planted_modularity" not in metrics["reference"]
    assert (tmp_path / "out" / "connectivity_communities.png").stat().st_size > 0


def test_bench_reports_time_and_memory_growing_with_rois(capsys):
    result = bench((12, 48), batch=2, repeats=1, backends=("eager",))
    small, large = result["rows"]
    assert large["peak_memory_mb"] > small["peak_memory_mb"] > 0
    assert large["train_step_ms"] > 0
    printed = capsys.readouterr().out
    assert "float32" in printed and "threads" in printed and "load average" in printed
    with pytest.raises(ValueError, match="accepted are"):
        bench((12,), backends=("cuda",))


@pytest.mark.slow
def test_full_synthetic_run_meets_the_targets(tmp_path):
    """100 ROIs, 4 modules × 3 submodules, 300 subjects: AUROC ≥ 0.95, top-level NMI ≥ 0.9,
    THC trained within 3 minutes on this CPU."""
    data = synthesize(tmp_path / "syn", subjects=300, rois=100, seed=0)
    metrics = run(data, tmp_path / "out", TrainConfig(epochs=60, seed=0))
    assert metrics["auroc"] >= 0.95
    assert metrics["nmi"]["level1"] >= 0.9
    assert metrics["models"]["thc"]["train_seconds"] <= 180
    print(json.dumps({k: metrics[k] for k in ("auroc", "accuracy", "nmi", "ari")}))
