"""Policy resolution, serialisation, cache keys and config validation."""

from __future__ import annotations

import pytest

import clusterfx as cfx
from clusterfx.config.configs import config_from_dict
from clusterfx.config.policy import Policy, ancestors

SITES = ["encoder.layer.0.attention.self", "encoder.layer.3.attention.self",
         "encoder.layer.11.attention.self", "decoder.block.0.attn", ""]


def test_ancestors():
    assert ancestors("a.b.c") == ["a.b.c", "a.b", "a", ""]
    assert ancestors("") == [""]


def test_first_matching_key_wins_and_default_is_last():
    dense, c100, ic = cfx.Dense(), cfx.Clustered(clusters=100), cfx.ImprovedClustered(
        clusters=25, topk=32)
    policy = Policy.make({
        "_default": cfx.TopK(k=8),  # written first, still the fallback
        "encoder.layer.0": dense,  # an ancestor path
        "re:encoder\\.layer\\.[1-5]\\..*": ic,
        "encoder.layer.*": c100,  # glob
        "decoder.block.0.attn": None,  # exact, leave dense
    })
    got = {p: policy.resolve(p) for p in SITES}
    assert got["encoder.layer.0.attention.self"].config == dense
    assert got["encoder.layer.3.attention.self"].config == ic
    assert got["encoder.layer.3.attention.self"].key == "re:encoder\\.layer\\.[1-5]\\..*"
    assert got["encoder.layer.11.attention.self"].config == c100
    assert got["decoder.block.0.attn"].config is None
    assert got[""].config == cfx.TopK(k=8) and got[""].key == "_default"


def test_exact_key_does_not_match_a_sibling_prefix():
    policy = Policy.make({"encoder.layer.1": None})
    assert policy.resolve("encoder.layer.11.attention").key is None  # not "layer.1"'s child
    assert policy.resolve("encoder.layer.1.attention").key == "encoder.layer.1"


def test_no_policy_means_dense():
    assert Policy.make(None).resolve("x").config == cfx.Dense()
    assert Policy.make(cfx.Clustered(clusters=4)).resolve("x").config == cfx.Clustered(
        clusters=4)


def test_unmatched_keys():
    policy = Policy.make({"encoder.layer.0": None, "nope.*": cfx.Dense(), "_default": None})
    assert policy.unmatched_keys(SITES) == ["nope.*"]


def test_round_trip_and_cache_key():
    policy = Policy.make({"re:a\\..*": cfx.ImprovedClustered(clusters=7, topk=3, seed=1),
                          "b": None, "_default": cfx.Auto(candidate=cfx.TopK(k=4))})
    again = Policy.from_dict(policy.to_dict())
    assert again.to_dict() == policy.to_dict()
    assert again.cache_key() == policy.cache_key()
    changed = Policy.make({"re:a\\..*": cfx.ImprovedClustered(clusters=8, topk=3, seed=1),
                           "b": None, "_default": cfx.Auto(candidate=cfx.TopK(k=4))})
    assert changed.cache_key() != policy.cache_key()
    # strictness is part of the key too
    assert Policy.make({"b": None}, strict=True).cache_key() != Policy.make(
        {"b": None}).cache_key()


@pytest.mark.parametrize("bad, message", [
    ({"a": "clustered"}, "must be a config"),
    ({"a": 3}, "must be a config"),
    ({1: cfx.Dense()}, "must be a str"),
    ({"re:(": cfx.Dense()}, "not a valid regex"),
])
def test_bad_policy_entries(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        Policy.make(bad)


def test_bad_policy_type():
    with pytest.raises(TypeError, match="must be a dict"):
        Policy.make(["a"])


@pytest.mark.parametrize("make, message", [
    (lambda: cfx.Clustered(clusters=0), r"clusters \(0\) must be a positive int"),
    (lambda: cfx.Clustered(clusters=-3), r"clusters \(-3\)"),
    (lambda: cfx.Clustered(clusters=4, bits=64), r"bits \(64\) must be an int in 1\.\.63"),
    (lambda: cfx.Clustered(clusters=4, iterations=0), r"iterations \(0\)"),
    (lambda: cfx.Clustered(clusters=4, clustering="pq"), "clustering"),
    (lambda: cfx.Clustered(clusters=4, refine=-1), r"refine \(-1\)"),
    (lambda: cfx.Clustered(clusters=4, metric="cosine"),
     r"metric \('cosine'\) must be one of \('attention', 'euclidean'\)"),
    (lambda: cfx.ImprovedClustered(clusters=4, topk=0), r"topk \(0\)"),
    (lambda: cfx.TopK(k=0), r"k \(0\)"),
    (lambda: cfx.TopK(k=True), r"k \(True\)"),
    (lambda: cfx.PatchToCluster(clusters=2.5), r"clusters \(2\.5\)"),
    (lambda: cfx.Auto(candidate="clustered"), "candidate"),
])
def test_config_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_configs_are_frozen_and_hashable():
    c = cfx.Clustered(clusters=10)
    with pytest.raises(AttributeError):
        c.clusters = 11
    assert hash(c) == hash(cfx.Clustered(clusters=10))
    assert config_from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="config type"):
        config_from_dict({"type": "linear"})
