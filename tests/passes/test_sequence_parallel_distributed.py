"""`clusterfx.compile(model, mesh=...)` on 2 and 4 gloo processes equals the same model compiled
on one process (every rank computes that oracle itself): outputs and parameter gradients
(float64 <= 1e-10), on the GPT-like and BERT-like reference models and a Hugging Face Llama
(GQA, rotary positions), for Ulysses, ring and USP, with and without zigzag, with Inductor
too. The bytes each site's collectives sent per step, counted at run time, equal the planned
volumes (which tests/passes/test_sequence_parallel.py checks against the formulas), and each
site issues the planned number of collectives per step."""

from __future__ import annotations

import pytest

from tests.distributed_helpers import errors_against, launch, output_and_param_grads

pytestmark = pytest.mark.distributed


def _model(name: str):
    import torch

    from clusterfx.models import bert_tiny, example_inputs, gpt_tiny

    torch.manual_seed(0)
    if name in ("gpt", "gpt-gqa", "gpt-mqa"):
        kv = {"gpt": None, "gpt-gqa": 2, "gpt-mqa": 1}[name]
        model = gpt_tiny(dropout=0.0, depth=2, heads=4, kv_heads=kv)
        return model.double(), example_inputs("gpt", model=model, seq_len=16)
    if name == "bert":
        model = bert_tiny(dropout=0.0, depth=2)
        return model.double(), example_inputs("bert", model=model, seq_len=16)
    if name == "gpt2":
        import transformers

        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="sdpa", bos_token_id=0,
                                      eos_token_id=0)
        gpt2 = transformers.GPT2Model(cfg).double()

        class GPT2(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = gpt2

            def forward(self, ids):
                return self.model(input_ids=ids).last_hidden_state

        ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        return GPT2(), (ids,)
    if name == "llama":
        import transformers

        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
        llama = transformers.LlamaModel(cfg).double()

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = llama

            def forward(self, ids):
                return self.model(input_ids=ids, use_cache=False).last_hidden_state

        ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        return Wrapped(), (ids,)
    raise AssertionError(name)


def _policy(name):
    import clusterfx as cfx

    return {None: None, "clustered": cfx.Clustered(clusters=3, seed=5),
            "clustered-exact": cfx.Clustered(clusters=3, min_length=1000),
            "topk": cfx.TopK(k=4),
            # a decoder: the causal clustered op (approximate path, and its exact path)
            "causal-clustered": cfx.Clustered(clusters=3, min_length=1),
            "causal-exact": cfx.Clustered(clusters=3, min_length=1000),
            "improved": cfx.ImprovedClustered(clusters=3, topk=4, seed=5)}[name]


def model_cases(rank, world, cases):
    import clusterfx as cfx

    results = []
    for case in cases:
        model, inputs = _model(case["model"])
        policy = _policy(case.get("policy"))
        spec = cfx.SequenceParallel(ulysses=case["u"], ring=case["r"],
                                    load_balance=case.get("lb", "zigzag"),
                                    data_parallel=world // (case["u"] * case["r"]))
        if case.get("device_mesh"):  # the user's own DeviceMesh, options from the spec
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (case["u"], case["r"]),
                                    mesh_dim_names=("ulysses", "ring"))
            spec = mesh if case["device_mesh"] == "alone" else (mesh, spec)
        compiled = cfx.compile(model, policy=policy, backend=case["backend"], mesh=spec)
        params = list(model.parameters())
        if case.get("policy") == "improved":  # vs one process given the same assignments
            out, grads, want, want_grads = _improved_against_one_process(
                model, compiled, inputs, params, case, world)
        else:
            out, grads = output_and_param_grads(compiled, inputs, params)
            approximate = case.get("policy") in ("clustered", "causal-clustered")
            single = None if approximate else policy  # vs dense then
            want, want_grads = output_and_param_grads(cfx.compile(model, policy=single,
                                                backend=case["backend"]), inputs, params)
        report = cfx.explain(compiled)
        sites = []
        for row in report:
            record = row.sequence_parallel
            planned = {f"{c.name}.{c.phase}": (c.count, c.bytes) for c in record.collectives}
            sites.append({
                "mode": record.mode, "reason": record.reason,
                "planned_fwd": record.bytes_per_step("fwd"),
                "planned_bwd": record.bytes_per_step("bwd"),
                "ran_fwd": row.measured_bytes_per_step("fwd"),
                "ran_bwd": row.measured_bytes_per_step("bwd"),
                "calls": {k: v for k, v in row.traffic.items() if k.endswith("calls")},
                "paths": row.paths,
                "planned": planned})
        results.append({**errors_against(out, grads, want, want_grads), "sites": sites,
                        "report": str(report) if rank == 0 else ""})
    return results


def _improved_against_one_process(model, compiled, inputs, params, case, world):
    """Runs `compiled` (ImprovedClustered over a ring, u = 1), recording each site's
    assignments on every ring rank; then the model compiled on one process with r·C clusters,
    its clustering replaced by the recorded assignments gathered over the sequence (ring
    rank i's cluster j = global cluster i·C + j), in the same site order. Padded queries sit
    in a spare cluster on both sides, one per ring rank here and one in all there, so the
    outputs at padded positions differ (no model reads them: they are masked as keys and
    kept out of every valid centroid); both runs are compared at the kept positions, with
    the gradients of a projection that is zero at the padded ones."""
    import torch.distributed as dist

    import clusterfx as cfx
    from clusterfx.ops.clustered import registration
    from clusterfx.ops.sequence_parallel import improved
    from clusterfx.ops.sequence_parallel.common.layout import SeqLayout

    policy, r = _policy("improved"), case["r"]
    forward, recorded = improved.forward, []

    def recording(*args, **kwargs):
        result = forward(*args, **kwargs)
        recorded.append(result[1])
        return result

    keep = inputs[1].bool()  # BERT's attention mask (B, S)
    improved.forward = recording
    try:
        out, grads = output_and_param_grads(compiled, inputs, params, keep)
    finally:
        improved.forward = forward
    pieces = [None] * world
    dist.all_gather_object(pieces, recorded)
    layout = SeqLayout(inputs[0].shape[1], 1, r, case.get("lb", "zigzag") == "zigzag")
    first = dist.get_rank() // r * r
    calls = []
    for site, local in enumerate(recorded):
        whole = local.new_zeros(*local.shape[:2], layout.seq_len)
        for ring_rank in range(r):
            a = pieces[first + ring_rank][site]  # the spare cluster (C) is padding
            whole[:, :, layout.block_positions(ring_rank)] = (
                a + ring_rank * policy.clusters).masked_fill(a == policy.clusters, 0)
        calls.append(whole)
    cluster, replayed = registration.cluster, iter(calls)
    registration.cluster = lambda *args, **kwargs: next(replayed)
    try:
        single = cfx.ImprovedClustered(clusters=r * policy.clusters, topk=policy.topk,
                                       seed=policy.seed)
        single_compiled = cfx.compile(model, policy=single, backend=case["backend"])
        want, want_grads = output_and_param_grads(single_compiled, inputs, params, keep)
    finally:
        registration.cluster = cluster
    assert next(replayed, None) is None, "a site clustered more often than recorded"
    return out, grads, want, want_grads


# The distributed tier (scripts/test.sh, ~4 min on 2 loaded cores) runs the essential cases:
# Ulysses (GQA), ring (causal, zigzag), clustered over a ring, USP. The rest are `slow` too:
# `pytest -m distributed` runs them all.
TWO = [dict(model="gpt-gqa", u=2, r=1, backend="eager"),
       dict(model="gpt", u=1, r=2, backend="eager"),
       dict(model="bert", u=1, r=2, backend="eager", policy="clustered"),
       dict(model="bert", u=1, r=2, backend="eager", policy="improved")]
TWO_MORE = [dict(model="bert", u=1, r=2, backend="aot_eager"),
            dict(model="gpt-mqa", u=2, r=1, backend="inductor"),
            dict(model="bert", u=1, r=2, backend="eager", policy="clustered-exact"),
            dict(model="gpt", u=2, r=1, backend="eager", policy="topk"),
            dict(model="gpt", u=2, r=1, backend="eager", policy="causal-clustered"),
            dict(model="gpt", u=2, r=1, backend="eager", policy="causal-exact"),
            dict(model="gpt2", u=1, r=2, backend="eager")]
FOUR = [dict(model="gpt", u=2, r=2, backend="eager")]
FOUR_MORE = [dict(model="gpt-gqa", u=1, r=4, backend="eager", lb="none"),
             dict(model="bert", u=4, r=1, backend="eager"),
             dict(model="bert", u=2, r=2, backend="eager"),
             dict(model="llama", u=2, r=2, backend="eager"),
             dict(model="bert", u=2, r=2, backend="eager", policy="clustered"),
             dict(model="gpt", u=2, r=1, backend="eager"),  # 2 data-parallel replicas of (2, 1)
             dict(model="gpt", u=2, r=2, backend="eager", device_mesh="alone"),
             dict(model="bert", u=2, r=2, backend="eager", device_mesh="with spec", lb="none")]


def _ids(cases):
    return [f"{c['model']}-u{c['u']}r{c['r']}-{c['backend']}-{c.get('lb', 'zigzag')}"
            f"-{c.get('policy') or 'dense'}{'-mesh' if c.get('device_mesh') else ''}"
            for c in cases]


@pytest.fixture(scope="module")
def two_ranks():
    return launch(f"{__name__}:model_cases", 2, {"cases": TWO}, timeout=300)


@pytest.fixture(scope="module")
def two_ranks_more():
    return launch(f"{__name__}:model_cases", 2, {"cases": TWO_MORE}, timeout=500)


@pytest.fixture(scope="module")
def four_ranks():
    return launch(f"{__name__}:model_cases", 4, {"cases": FOUR}, timeout=300)


@pytest.fixture(scope="module")
def four_ranks_more():
    return launch(f"{__name__}:model_cases", 4, {"cases": FOUR_MORE}, timeout=600)


def _check(results, index, case):
    mode = "usp" if case["u"] > 1 and case["r"] > 1 else "ulysses" if case["u"] > 1 else "ring"
    for rank in results:
        res = rank[index]
        if case.get("policy") in ("clustered", "causal-clustered"):  # close to dense, not equal
            assert 0 < res["out"] <= 0.5 and res["grads"] <= 1.0 and not res["missing"], res
            assert all(any(p.startswith("approximate") for p in site["paths"])
                       for site in res["sites"]), res["sites"]
            if case["policy"] == "causal-clustered":
                assert all(any("(causal)" in p for p in site["paths"])
                           for site in res["sites"]), res["sites"]
        else:
            assert res["out"] <= 1e-10 and res["grads"] <= 1e-10 and not res["missing"], res
        if case.get("policy") == "improved":  # the ring i-clustered path ran, not gathered
            assert all(site["paths"] and all(p.startswith("approximate [ring ")
                                             for p in site["paths"])
                       for site in res["sites"]), res["sites"]
        assert len(res["sites"]) == 2
        for site in res["sites"]:
            assert site["mode"] == mode, (site, results[0][index]["report"])
            assert site["ran_fwd"] == site["planned_fwd"] > 0
            assert site["ran_bwd"] == site["planned_bwd"] > 0
            for key, (count, _) in site["planned"].items():
                name, phase = key.rsplit(".", 1)
                counted = name.replace("ring ", "")
                assert site["calls"][f"{counted}.{phase}.calls"] == count, (key, site)


@pytest.mark.parametrize("index", range(len(TWO)), ids=_ids(TWO))
def test_compiled_models_on_two_ranks(two_ranks, index):
    _check(two_ranks, index, TWO[index])


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(TWO_MORE)), ids=_ids(TWO_MORE))
def test_more_compiled_models_on_two_ranks(two_ranks_more, index):
    _check(two_ranks_more, index, TWO_MORE[index])


@pytest.mark.parametrize("index", range(len(FOUR)), ids=_ids(FOUR))
def test_compiled_models_on_four_ranks(four_ranks, index):
    _check(four_ranks, index, FOUR[index])


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(FOUR_MORE)), ids=_ids(FOUR_MORE))
def test_more_compiled_models_on_four_ranks(four_ranks_more, index):
    _check(four_ranks_more, index, FOUR_MORE[index])


def failing_peer(rank, world, behaviour):
    """Rank 1 fails (raises) or never arrives (sleeps); rank 0 runs the compiled model."""
    import time

    import clusterfx as cfx

    model, inputs = _model("gpt")
    compiled = cfx.compile(model, backend="eager",
                           mesh=cfx.SequenceParallel(ulysses=2, timeout=5.0))
    if rank == 1:
        if behaviour == "raise":
            raise RuntimeError("rank 1 failed on purpose")
        time.sleep(90)
    start = time.monotonic()
    try:
        compiled(*inputs)
    except RuntimeError as exc:
        print(f"ELAPSED {time.monotonic() - start:.1f}", flush=True)
        raise exc
    return "no error"


@pytest.mark.parametrize("behaviour", [
    "raise", pytest.param("sleep", marks=pytest.mark.slow)])  # sleep: the 5 s timeout
def test_a_failed_or_absent_peer_ends_the_other_rank_with_a_clear_error(behaviour):
    import re

    results = launch(f"{__name__}:failing_peer", 2, {"behaviour": behaviour}, timeout=240,
                     expect_failure=True, grace=5)
    (code0, log0), (code1, _) = results
    assert code0 == 1 and code1 != 0  # rank 0 ended by itself (not killed), with an error
    assert "sequence parallel: all_to_all at site" in log0, log0[-2000:]
    assert "a peer failed or never arrived" in log0
    elapsed = float(re.search(r"ELAPSED ([0-9.]+)", log0).group(1))
    assert elapsed < 60  # bounded: the 5 s timeout, or at once when the peer's socket closes
