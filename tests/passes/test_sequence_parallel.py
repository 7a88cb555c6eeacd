"""The sequence-parallel pass on one process: the graphs it writes for a mesh (resolved by hand,
so no process group is needed to read them), the errors it raises before any communication,
and the cases where it must not fire or must decline. Running those graphs on 2 and 4 gloo
processes is test_sequence_parallel_distributed.py."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import clusterfx as cfx
from clusterfx.compiler.backend import ClusterfxBackend
from clusterfx.compiler.state import CompileState
from clusterfx.config.parallel import ResolvedMesh
from clusterfx.config.policy import Policy
from clusterfx.models import bert_tiny, example_inputs, gpt_tiny
from clusterfx.passes.analysis.graph_utils import SDPA
from clusterfx.passes.analysis.sequence_shards import Shard, view_map
from tests.helpers import count_targets

ops = torch.ops.clusterfx


class _Stop(Exception):
    pass


def sp_graph(model, inputs, ulysses=1, ring=1, policy=None, **options):
    """(rewritten graph, sites, pass result) for `model` on a mesh resolved by hand."""
    mesh = ResolvedMesh(ulysses, ring, "u" if ulysses > 1 else "", "r" if ring > 1 else "",
                        **options)
    state = CompileState(Policy.make(policy), "eager", mesh_key="test", resolved_mesh=mesh)
    captured = []

    class Keep(ClusterfxBackend):
        def __call__(self, gm, example_inputs, mode=None, options=None):
            record = self.state.manager.run(gm, _context(gm, example_inputs, self.state))
            captured.append((gm, record))
            raise _Stop

    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(model, backend=Keep(state), fullgraph=True)(*inputs)
    if not captured:
        raise info.value.__cause__ or info.value
    gm, record = captured[-1]
    return gm, record.sites, record.results[-1]


def _context(gm, example_inputs, state):
    from clusterfx.passes.base import PassContext

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return PassContext(concrete=dict(zip(placeholders, example_inputs)), compile_id="g",
                       tag_prefix=state.telemetry.token)


def _error(model, inputs, **kw):
    with pytest.raises(Exception) as info:
        sp_graph(model, inputs, **kw)
    exc = info.value
    while not isinstance(exc, ValueError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _gpt(**kw):
    torch.manual_seed(0)
    model = gpt_tiny(dropout=0.0, depth=2, **kw).eval()
    return model, example_inputs("gpt", model=model, seq_len=16)


def _sizes(gm, method):
    return [n.args[1:] for n in gm.graph.nodes if n.op == "call_method" and n.target == method]


def test_ulysses_wraps_each_attention_in_four_all_to_alls():
    model, inputs = _gpt(kv_heads=2)
    gm, sites, result = sp_graph(model, inputs, ulysses=2)
    a2a = [n for n in gm.graph.nodes if n.target is ops.sp_all_to_all.default]
    assert len(a2a) == 8 and [n.args[1] for n in a2a].count(True) == 6  # q, k, v in; out back
    assert count_targets(gm, SDPA) == 2 and count_targets(gm, ops.sp_ring_attention.default) == 0
    assert [s.sequence_parallel.mode for s in sites] == ["ulysses", "ulysses"]
    # the token ids are sharded on entry, the position table takes the local tokens, the
    # logits are gathered on exit; sizes become local (16 tokens over 2 ranks: 8)
    assert count_targets(gm, ops.sp_take_local.default) == 2
    assert count_targets(gm, ops.sp_gather.default) == 1
    assert (2, 8, 4, 16) in _sizes(gm, "view") and (2, 8, 64) in _sizes(gm, "view")
    assert result.counters["sharded_inputs"] == 1
    # example values are the local shapes: the sequence is 8 tokens on this rank
    out = next(n for n in gm.graph.nodes if n.target is ops.sp_gather.default)
    assert tuple(out.args[0].meta["example_value"].shape) == (2, 8, 1000)


def test_ring_replaces_the_attention_and_usp_does_both():
    model, inputs = _gpt()
    gm, sites, _ = sp_graph(model, inputs, ring=2)
    assert count_targets(gm, ops.sp_ring_attention.default) == 2 and count_targets(gm, SDPA) == 0
    assert count_targets(gm, ops.sp_all_to_all.default) == 0
    ring = next(n for n in gm.graph.nodes if n.target is ops.sp_ring_attention.default)
    assert ring.args[4] is True and ring.args[5] == 0.25  # causal, scale from the site
    gm, sites, _ = sp_graph(model, inputs, ulysses=2, ring=2)
    assert count_targets(gm, ops.sp_ring_attention.default) == 2
    assert count_targets(gm, ops.sp_all_to_all.default) == 8
    assert {s.sequence_parallel.mode for s in sites} == {"usp"}


def test_planned_volumes_follow_the_formulas():
    """(u, r) = (2, 2), MHA, S = 16, B = 2, H = 4, D = 16, fp32: Ulysses (u-1)/u·B·S·D·
    (2H+2H)/P elements per direction; ring 2(r-1)/r·B·S·H·D/u forward and again backward,
    plus dK, dV over r hops in fp32."""
    model, inputs = _gpt()
    _, sites, _ = sp_graph(model, inputs, ulysses=2, ring=2)
    B, S, H, D, u, r, P = 2, 16, 4, 16, 2, 2, 4
    per = {(c.name, c.phase): (c.count, c.bytes) for c in sites[0].sequence_parallel.collectives}
    a2a = (u - 1) * B * S * D * (4 * H) // (u * P) * 4
    x = B * S * H * D // u
    assert per[("all_to_all", "fwd")] == per[("all_to_all", "bwd")] == (4, a2a)
    assert per[("ring k,v", "fwd")] == per[("ring k,v", "bwd")] == (2, 2 * (r - 1) * x // r * 4)
    assert per[("ring dk,dv", "bwd")] == (4, 2 * x * 4)


def test_gqa_with_fewer_kv_heads_than_ulysses_replicates_them():
    model, inputs = _gpt(heads=4, kv_heads=1)
    gm, sites, _ = sp_graph(model, inputs, ulysses=2)
    rep = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "repeat_interleave"]
    assert len(rep) == 4 and all(n.args[1:] == (2, 1) for n in rep)  # k and v, two sites
    record = sites[0].sequence_parallel
    assert record.kv_replication == 2 and "kv heads x2" in record.summary()


def test_bert_gathers_the_key_padding_mask_for_the_attention():
    torch.manual_seed(0)
    model = bert_tiny(dropout=0.0, depth=1).eval()
    inputs = example_inputs("bert", model=model, seq_len=16)
    gm, sites, result = sp_graph(model, inputs, ring=2)
    assert result.counters["sharded_inputs"] == 2  # ids and the mask
    ring = next(n for n in gm.graph.nodes if n.target is ops.sp_ring_attention.default)
    mask = ring.args[3]
    assert mask.target is ops.sp_gather.default  # the mask over all key positions
    assert tuple(mask.meta["example_value"].shape) == (2, 1, 1, 16)


def test_no_mesh_no_rewrite():
    model, inputs = _gpt()
    gm = cfx.transform(model, inputs)
    assert not any(str(n.target).startswith("clusterfx.sp_") for n in gm.graph.nodes)
    assert all(r.site.sequence_parallel is None for r in gm.meta["clusterfx_report"])


def test_topk_composes_with_ulysses_and_declines_a_ring_with_the_reason():
    model, inputs = _gpt()
    gm, sites, _ = sp_graph(model, inputs, ulysses=2, policy=cfx.TopK(k=4))
    assert count_targets(gm, ops.topk_attention.default) == 2
    assert count_targets(gm, ops.sp_all_to_all.default) == 8
    gm, sites, result = sp_graph(model, inputs, ring=2, policy=cfx.TopK(k=4))
    assert {s.sequence_parallel.mode for s in sites} == {"gathered"}
    assert "running top-k" in sites[0].sequence_parallel.reason
    assert len(result.declines) == 2
    # the site runs on the gathered q, k, v; its output takes the local tokens again
    topk = next(n for n in gm.graph.nodes if n.target is ops.topk_attention.default)
    assert all(a.target is ops.sp_gather.default for a in topk.args[:3])


def test_causal_clustered_composes_with_ulysses_and_declines_a_ring_with_the_reason():
    """A decoder under a Clustered policy lowers to the causal op (ops/causal_clustered): it
    runs on its H/u heads of the whole sequence after the all-to-all, with one process's
    random draw (`sp_ulysses_causal_conditional_attention`; ring_clustering="local": the plain
    op); over a ring it runs on the gathered sequence, and the report says why (never
    silently unsharded)."""
    model, inputs = _gpt()
    policy = cfx.Clustered(clusters=3, min_length=1)
    causal = ops.causal_conditional_attention.default
    for clustering, target in (("global", ops.sp_ulysses_causal_conditional_attention.default),
                               ("local", causal)):
        gm, sites, _ = sp_graph(model, inputs, ulysses=2, policy=policy,
                                ring_clustering=clustering)
        assert {s.sequence_parallel.mode for s in sites} == {"ulysses"}
        assert count_targets(gm, target) == 2
        assert count_targets(gm, ops.sp_all_to_all.default) == 8
        op = next(n for n in gm.graph.nodes if n.target is target)
        assert all(a.target is ops.sp_all_to_all.default for a in op.args[:3])
        assert op.args[15] is True  # still causal: the whole sequence is there, in order
        if clustering == "global":
            assert count_targets(gm, causal) == 0
            assert op.args[18] == 4  # the model's K/V heads: rows of one process's draw
            assert "one process's clustering" in sites[0].sequence_parallel.summary()
    gm, sites, result = sp_graph(model, inputs, ulysses=2, ring=2, policy=policy)
    assert {s.sequence_parallel.mode for s in sites} == {"gathered"}
    assert "causal clustered attention over a ring" in sites[0].sequence_parallel.reason
    assert len(result.declines) == 2
    op = next(n for n in gm.graph.nodes if n.target is causal)
    assert all(a.target is ops.sp_gather.default for a in op.args[:3])


def test_improved_clustered_runs_over_a_ring_and_causal_declines_with_the_reason():
    """An encoder under ImprovedClustered: its conditional op becomes the ring i-clustered op
    (topk passed on; the same collectives planned as ring clustered: K/V, the metric's
    all-reduce, dK/dV); a decoder lowers to the causal op, which still runs gathered."""
    torch.manual_seed(0)
    model = bert_tiny(dropout=0.0, depth=1).eval()
    inputs = example_inputs("bert", model=model, seq_len=16)
    policy = cfx.ImprovedClustered(clusters=3, topk=5)
    gm, sites, result = sp_graph(model, inputs, ring=2, policy=policy)
    ring = next(n for n in gm.graph.nodes
                if n.target is ops.sp_ring_improved_clustered_attention.default)
    assert ring.args[12] == 5 and ring.args[3].target is ops.sp_gather.default
    assert count_targets(gm, ops.conditional_attention.default) == 0
    assert [s.sequence_parallel.mode for s in sites] == ["ring"] and not result.declines
    planned = {(c.name, c.phase) for c in sites[0].sequence_parallel.collectives}
    assert planned == {("ring k,v", "fwd"), ("ring k,v", "bwd"), ("ring dk,dv", "bwd"),
                       ("all_reduce", "fwd")}
    model, inputs = _gpt()
    gm, sites, result = sp_graph(model, inputs, ring=2, policy=cfx.ImprovedClustered(
        clusters=3, topk=4, min_length=1))
    assert {s.sequence_parallel.mode for s in sites} == {"gathered"}
    assert "causal clustered attention over a ring" in sites[0].sequence_parallel.reason
    assert len(result.declines) == 2


@pytest.mark.parametrize("clustering", ["global", "local"])
def test_clustered_runs_locally_after_the_all_to_all(clustering):
    """Ulysses alone: the op after the all-to-all is the global one (which draws the
    clustering's random numbers for all H heads, as one process), or with
    ring_clustering="local" the plain op on H/u heads."""
    model, inputs = (lambda m: (m, example_inputs("bert", model=m, seq_len=32)))(
        bert_tiny(dropout=0.0, depth=1).eval())
    gm, sites, _ = sp_graph(model, inputs, ulysses=2, policy=cfx.Clustered(clusters=4),
                            ring_clustering=clustering)
    target = (ops.sp_global_clustered_attention if clustering == "global"
              else ops.conditional_attention).default
    assert count_targets(gm, ops.conditional_attention.default) == (clustering == "local")
    op = next(n for n in gm.graph.nodes if n.target is target)
    assert all(a.target is ops.sp_all_to_all.default for a in op.args[:3])
    assert op.args[3].target is ops.sp_gather.default
    (user,) = [u for u in op.users if u.target is operator.getitem]
    assert next(iter(user.users)).target is ops.sp_all_to_all.default
    assert sites[0].sequence_parallel.mode == "ulysses"


class _CumsumModel(nn.Module):
    """An op that mixes tokens (a cumulative sum over the sequence) before attention."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 48)

    def forward(self, x):
        x = x.cumsum(1)
        q, k, v = self.proj(x).view(2, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(2, 16, 16)


def test_an_op_over_the_sequence_runs_gathered_then_takes_the_local_tokens():
    gm, sites, result = sp_graph(_CumsumModel(), (torch.randn(2, 16, 12),), ulysses=2)
    cumsum = next(n for n in gm.graph.nodes if n.target == "cumsum")
    assert cumsum.args[0].target is ops.sp_gather.default
    gathers = [o for o in result.outside if o.what == "gather"]
    assert any("cumsum over the sequence dim" in o.why for o in gathers)
    assert sites[0].sequence_parallel.mode == "ulysses"


def test_errors_before_any_communication():
    model, inputs = _gpt(heads=4)
    exc = _error(model, inputs, ulysses=8)
    assert "heads (4) must be divisible by the ulysses degree (8)" in str(exc)
    model, inputs = _gpt(heads=4, kv_heads=4)
    torch.manual_seed(0)
    ids = (torch.randint(0, 1000, (2, 18)),)
    exc = _error(model, ids, ulysses=2, ring=2)
    assert "sequence length (18) must be divisible by 2·ulysses·ring" in str(exc)
    exc = _error(model, (torch.randint(0, 1000, (2, 18)),), ring=4, load_balance="none")
    assert "must be divisible by ulysses·ring = 1·4 = 4" in str(exc)


def test_an_input_with_two_sequence_dims_must_be_named():
    class Pair(nn.Module):
        def forward(self, x, pair):  # x (B, S, D), pair (B, S, S)
            q = x[:, None]
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            return out[:, 0] + pair.mean(-1, keepdim=True)

    x, pair = torch.randn(2, 8, 4), torch.randn(2, 8, 8)
    exc = _error(Pair(), (x, pair), ulysses=1, ring=2)
    assert "input 'pair' of shape (2, 8, 8) has several dims" in str(exc)
    assert "sequence_inputs" in str(exc)
    gm, _, result = sp_graph(Pair(), (x, pair), ring=2, sequence_inputs=(("pair", 1),
                                                                           ("x", 1)))
    assert result.counters["sharded_inputs"] == 2
    exc = _error(Pair(), (x, pair), ring=2, sequence_inputs=(("labels", 1),))
    assert "sequence_inputs ['labels'] are not inputs of the graph" in str(exc)


def test_in_place_update_of_a_sharded_tensor_declines_the_graph():
    class InPlace(nn.Module):
        def forward(self, x):
            x = x * 1.0
            x[:, 0] = 0.0  # writes one token: cannot run on local tokens
            q = x[:, None]
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    gm, sites, result = sp_graph(InPlace(), (torch.randn(2, 8, 4),), ring=2)
    assert all(s.sequence_parallel.mode == "unsharded" for s in sites)
    assert "in place" in sites[0].sequence_parallel.reason
    assert not any(str(n.target).startswith("clusterfx.sp_") for n in gm.graph.nodes)


def test_gather_output_false_returns_local_tokens():
    model, inputs = _gpt()
    gm, _, _ = sp_graph(model, inputs, ulysses=2, gather_output=False)
    assert count_targets(gm, ops.sp_gather.default) == 0
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert tuple(out.args[0][0].meta["example_value"].shape) == (2, 8, 1000)


@pytest.mark.parametrize("in_shape,out_shape,shard,want", [
    ((2, 16, 64), (2, 16, 4, 16), Shard(1), Shard(1)),
    ((2, 16, 64), (32, 64), Shard(1), Shard(0, 2, 1)),  # B·S rows: outer = B
    ((32, 64), (2, 16, 64), Shard(0, 2, 1), Shard(1)),
    ((2, 4, 16, 8), (2, 4, 128), Shard(2), Shard(2, 1, 8)),  # merged with the head dim after
    ((2, 16, 64), (2, 4, 4, 64), Shard(1), None),  # the sequence split in two dims
])
def test_view_map(in_shape, out_shape, shard, want):
    assert view_map(in_shape, out_shape, shard, 16) == want


def test_mesh_resolution_errors_without_and_with_a_process_group():
    model, _ = _gpt()
    with pytest.raises(ValueError, match="init_process_group"):
        cfx.compile(model, mesh=cfx.SequenceParallel(ulysses=2))
    with pytest.raises(TypeError, match="DeviceMesh"):
        cfx.compile(model, mesh="ulysses=2")
    with pytest.raises(ValueError, match=r"load_balance \('ring'\) must be one of"):
        cfx.SequenceParallel(load_balance="ring")
    with pytest.raises(ValueError, match="sequence_inputs"):
        cfx.SequenceParallel(sequence_inputs={"ids": "1"})


def test_compile_key_differs_per_mesh():
    from clusterfx.compiler.mesh import mesh_key

    a = mesh_key(cfx.SequenceParallel(ulysses=2))
    assert a == mesh_key(cfx.SequenceParallel(ulysses=2))
    assert a != mesh_key(cfx.SequenceParallel(ulysses=2, load_balance="none"))
    assert a != mesh_key(cfx.SequenceParallel(ring=2))



def test_the_report_shows_causal_balance_over_the_ring():
    model, inputs = _gpt()
    _, sites, _ = sp_graph(model, inputs, ring=4)
    record = sites[0].sequence_parallel
    assert record.ring_work == [34, 34, 34, 34] and record.imbalance == 1.0
    assert "balanced" in record.summary()
    _, sites, _ = sp_graph(model, inputs, ring=4, load_balance="none")
    record = sites[0].sequence_parallel
    assert record.ring_work == [10, 26, 42, 58]  # 16 tokens, blocks of 4: 16·i + 10
    assert "imbalance 5.80x" in record.summary()


def test_report_rows_show_the_collectives_and_serialise():
    import json

    from clusterfx.compiler.report import Report, Row

    model, inputs = _gpt()
    _, sites, result = sp_graph(model, inputs, ulysses=2, ring=2)
    report = Report(rows=[Row(s) for s in sites], sequence_parallel={
        "mesh": "test", "seq_len": [16], "traffic": {},
        "outside": [(o.what, o.node, o.collective, o.why) for o in result.outside]})
    text = str(report)
    assert "parallel" in text.splitlines()[0] and "usp:" in text
    assert "gradient sum: all_reduce (bwd)" in text
    row = json.loads(json.dumps(report.to_dict()))["sites"][0]["sequence_parallel"]
    assert row["mode"] == "usp" and row["bytes_fwd"] > 0
    assert {c["name"] for c in row["collectives"]} == {"all_to_all", "ring k,v", "ring dk,dv"}
    assert Row(sites[0]).measured_bytes_per_step("fwd") is None  # nothing ran: no claim
