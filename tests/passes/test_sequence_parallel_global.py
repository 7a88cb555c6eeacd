"""`SequenceParallel(ring_clustering=...)` on one process: the graphs the pass writes for a
clustered site over a ring (the global op, or the local ring op), what the report says ran,
the planned volumes against the formulas written out here, and the option's validation and
cache key. Running the graphs on 2 and 4 gloo processes: test_sequence_parallel_global_
distributed.py; the op itself: tests/ops/test_sequence_parallel_global.py."""

from __future__ import annotations

import pytest
import torch

import clusterfx as cfx
from clusterfx.models import bert_tiny, example_inputs
from tests.helpers import count_targets
from tests.passes.test_sequence_parallel import sp_graph

ops = torch.ops.clusterfx
B, S, H, D = 2, 32, 4, 16  # bert_tiny(dim=64, heads=4) on 2 × 32 tokens


def _bert():
    torch.manual_seed(0)
    model = bert_tiny(dropout=0.0, depth=1).eval()
    return model, example_inputs("bert", model=model, seq_len=S)


def _ring_volumes(r, u, C, iterations, bits, refine, item=4, cd=4, B=B, H=H, D=D):
    """All-reduces of one site per step (hand-written from the op's docstring): metric stats,
    centre, seeds (+ a checksum of the draw), rounds, refine, centroids (+1 spare row, +1
    flag), lse max, merged outputs; backward dO^c and dQ^c. Each sends 2(r-1)/r of its buffer."""
    h = H // u
    R = B * h
    fwd = [B * h * (1 + D + D * D) * 8, R * (D + 1) * item, (iterations * R * C + 1) * 8]
    fwd += [R * C * (bits + 1) * 4] * (iterations - 1) + [R * C * (D + 1) * 4] * refine
    fwd += [(R * (C + 1) * (D + 1) + 1) * cd, R * (C + 1) * cd, R * (C + 1) * (D + 1) * cd]
    bwd = [R * (C + 1) * D * cd] * 2
    send = lambda xs: sum(2 * (r - 1) * x // r for x in xs)  # noqa: E731
    return {("all_reduce", "fwd"): (len(fwd), send(fwd)), ("all_reduce", "bwd"): (2, send(bwd))}


@pytest.mark.parametrize("u,r", [(1, 2), (2, 2), (1, 4)])
def test_global_clustering_replaces_the_k_v_ring_with_all_reduces(u, r):
    model, inputs = _bert()
    policy = cfx.Clustered(clusters=3, seed=5, iterations=4, refine=2)
    gm, sites, _ = sp_graph(model, inputs, ulysses=u, ring=r, policy=policy)
    assert count_targets(gm, ops.sp_global_clustered_attention.default) == 1
    assert count_targets(gm, ops.sp_ring_conditional_attention.default) == 0
    assert count_targets(gm, ops.conditional_attention.default) == 0
    record = sites[0].sequence_parallel
    assert record.mode == ("usp" if u > 1 else "ring")
    assert "global clustering: 3 clusters of all 32 queries" in record.summary()
    planned = {(c.name, c.phase): (c.count, c.bytes) for c in record.collectives
               if c.group == "ring"}
    assert planned == _ring_volumes(r, u, 3, 4, 63, 2)
    assert not any("k,v" in c.name for c in record.collectives)


def test_local_clustering_keeps_the_ring_of_before():
    model, inputs = _bert()
    gm, sites, _ = sp_graph(model, inputs, ring=2, policy=cfx.Clustered(clusters=3),
                            ring_clustering="local")
    assert count_targets(gm, ops.sp_ring_conditional_attention.default) == 1
    assert count_targets(gm, ops.sp_global_clustered_attention.default) == 0
    record = sites[0].sequence_parallel
    assert "local clustering" in record.summary()
    assert {c.name for c in record.collectives} >= {"ring k,v", "ring dk,dv"}


def test_below_min_length_the_exact_ring_runs_and_is_planned():
    model, inputs = _bert()
    gm, sites, _ = sp_graph(model, inputs, ring=2,
                            policy=cfx.Clustered(clusters=3, min_length=1000))
    assert count_targets(gm, ops.sp_global_clustered_attention.default) == 1
    record = sites[0].sequence_parallel
    assert "exact ring attention (S=32 < min_length)" in record.summary()
    assert {c.name for c in record.collectives} == {"ring k,v", "ring dk,dv"}


def test_the_global_op_sends_a_fraction_of_the_k_v_rotation_at_length():
    """S = 16384, B = 2, H = 8, D = 64, fp32, r = 4, C = 100 (5 rounds, 63 bits, refine 1):
    the K/V rotation's forward sends 3·B·S/r·H·2D·4 bytes = 101 MB per rank; the global op
    5.3 MB (its rounds' votes are O(C·bits), the rest O(C·D) and the metric's O(D²))."""
    from clusterfx.passes.sequence_parallel_plan import itemsizes, volumes

    r, C, S_, H_, D_ = 4, 100, 16384, 8, 64
    shape = (B, H_, S_, D_)
    ring = volumes(shape, shape, shape, 1, 1, r, S_ // r, S_, *itemsizes(torch.float32))
    kv_fwd = sum(c.bytes for c in ring if c.phase == "fwd")
    assert kv_fwd == 3 * B * S_ // r * H_ * 2 * D_ * 4
    glob = _ring_volumes(r, 1, C, 5, 63, 1, B=B, H=H_, D=D_)
    assert glob[("all_reduce", "fwd")][1] < kv_fwd / 15
    assert glob[("all_reduce", "bwd")][1] < kv_fwd / 50  # backward: K/V again, dK/dV


def test_ring_clustering_is_validated_and_keyed():
    from clusterfx.compiler.mesh import mesh_key
    from clusterfx.config.parallel import ResolvedMesh

    assert cfx.SequenceParallel().ring_clustering == "global"
    with pytest.raises(ValueError, match=r"ring_clustering \('ring'\) must be one of "
                                         r"\('global', 'local'\)"):
        cfx.SequenceParallel(ring_clustering="ring")
    spec = cfx.SequenceParallel(ring=2, ring_clustering="local")
    assert spec.to_dict()["ring_clustering"] == "local"
    assert mesh_key(spec) != mesh_key(cfx.SequenceParallel(ring=2))
    assert "ring_clustering=global" in ResolvedMesh(1, 2, "", "r").describe()
