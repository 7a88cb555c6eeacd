"""DPC-kNN (TCFormer's token clustering): implementations against the oracle, the properties
of the clustering, local (per-region) clustering, and argument errors."""

from __future__ import annotations

import pytest
import torch

from clusterfx.ops.dpc_knn import dpc_knn, dpc_knn_reference


def blobs(centres=5, per=40, dim=8, seed=0, spread=0.1):
    gen = torch.Generator().manual_seed(seed)
    c = 10 * torch.randn(centres, dim, generator=gen, dtype=torch.float64)
    x = (c[:, None] + spread * torch.randn(centres, per, dim, generator=gen,
                                           dtype=torch.float64)).reshape(-1, dim)
    truth = torch.arange(centres).repeat_interleave(per)
    perm = torch.randperm(centres * per, generator=gen)
    return x[perm], truth[perm]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b induce the same partition (equal up to relabelling)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_recovers_separated_blobs(impl):
    x, truth = blobs()
    labels, centres = dpc_knn(x[None], 5, impl=impl)
    assert same_partition(labels[0], truth)
    assert sorted(set(labels[0].tolist())) == [0, 1, 2, 3, 4]
    assert torch.equal(labels[0, centres[0]], torch.arange(5))  # centres label themselves


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_permutation_equivariant_up_to_relabelling(impl):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 60, 6, generator=gen, dtype=torch.float64)
    perm = torch.randperm(60, generator=gen)
    labels, _ = dpc_knn(x, 12, impl=impl)
    permuted, _ = dpc_knn(x[:, perm], 12, impl=impl)
    for i in range(2):
        assert same_partition(permuted[i], labels[i, perm])


@pytest.mark.parametrize("regions", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_equals_reference(regions, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 96, 16, generator=gen).to(dtype)
    want = dpc_knn(x, 24, k=4, regions=regions, impl="reference")
    got = dpc_knn(x, 24, k=4, regions=regions, impl="cpu")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_every_cluster_non_empty_and_labels_in_range():
    x = torch.randn(2, 50, 4, generator=torch.Generator().manual_seed(3))
    labels, centres = dpc_knn(x, 13)
    assert labels.min() >= 0 and labels.max() < 13
    for row in labels:
        assert torch.bincount(row, minlength=13).min() >= 1


def test_local_clustering_with_one_region_equals_global_dpc():
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    local = dpc_knn(x, 16, regions=1, impl="cpu")
    glob = dpc_knn_reference(x, 16)  # the global oracle, full N×N
    assert torch.equal(local[0], glob[0]) and torch.equal(local[1], glob[1])


def test_local_clustering_is_global_clustering_of_each_region():
    """With R regions no cluster crosses a region, each region gets clusters / R centres, and
    each region is clustered exactly as it would be alone."""
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels, centres = dpc_knn(x, 16, regions=4, impl="cpu")
    for r in range(4):
        block = slice(16 * r, 16 * (r + 1))
        alone, alone_centres = dpc_knn_reference(x[:, block], 4)
        assert torch.equal(labels[:, block], alone + 4 * r)
        assert torch.equal(centres[:, 4 * r:4 * (r + 1)], alone_centres + 16 * r)


def test_compiles_in_one_graph():
    x = torch.randn(2, 32, 8)

    def fn(x):
        return dpc_knn(x, 8, regions=2)[0] + 1

    assert torch._dynamo.explain(fn)(x).graph_break_count == 0
    assert torch.equal(torch.compile(fn, backend="aot_eager", fullgraph=True)(x), fn(x))


@pytest.mark.parametrize("kwargs, message", [
    ({"clusters": 0}, r"clusters \(0\) must be a positive int"),
    ({"clusters": 33}, r"clusters \(33\) must be at most the number of tokens N \(32\)"),
    ({"clusters": 8, "k": 9, "regions": 4}, r"k \(9\) must be at most the tokens per region"),
    ({"clusters": 8, "regions": 3}, r"regions \(3\) must divide the number of tokens"),
    ({"clusters": 6, "regions": 4}, r"regions \(4\) must divide clusters \(6\)"),
    ({"clusters": 8, "impl": "triton"}, r"no Triton kernel"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpc_knn(torch.randn(2, 32, 8), **kwargs)
