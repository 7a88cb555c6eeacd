"""`clusterfx.compile(bert, policy=Clustered(...), mesh=SequenceParallel(...))` with global ring
clustering (the default) equals the same model compiled on one process with the same policy
and seed: outputs and parameter gradients (float64 <= 1e-10), on gloo processes, over a ring,
under Ulysses alone and over USP; the report says global clustering ran at every site, K/V
never rotated, and the bytes each site sent per step equal its planned all-reduces.

The fast tier runs the ring on 2 processes; the rest is `slow` (`pytest -m distributed`)."""

from __future__ import annotations

import pytest

from tests.distributed_helpers import (
    errors_against,
    launch,
    output_and_param_grads,
    site_records,
)

pytestmark = pytest.mark.distributed


def compiled_cases(rank, world, cases):
    import torch

    import clusterfx as cfx
    from clusterfx.models import bert_tiny, example_inputs

    results = []
    for case in cases:
        torch.manual_seed(0)
        model = bert_tiny(dropout=0.0, depth=2).double()
        inputs = example_inputs("bert", model=model, seq_len=32)  # the last row is padded
        policy = cfx.Clustered(clusters=3, seed=5, **case.get("knobs", {}))
        mesh = cfx.SequenceParallel(ulysses=case["u"], ring=case["r"],
                                    data_parallel=world // (case["u"] * case["r"]))
        if case.get("device_mesh"):  # the user's DeviceMesh alone: the options' defaults
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (case["u"], case["r"]),
                                    mesh_dim_names=("ulysses", "ring"))
        params = list(model.parameters())

        backend = case.get("backend", "eager")
        compiled = cfx.compile(model, policy=policy, backend=backend, mesh=mesh)
        out, grads = output_and_param_grads(compiled, inputs, params)
        single = cfx.compile(model, policy=policy, backend=backend)
        want, want_grads = output_and_param_grads(single, inputs, params)
        results.append({**errors_against(out, grads, want, want_grads),
                        "sites": site_records(compiled)})
    return results


def _check(results, case):
    for rank in results:
        for res in rank:
            assert res["out"] <= 1e-10 and res["grads"] <= 1e-10 and not res["missing"], res
            assert len(res["sites"]) == 2
            for site in res["sites"]:
                assert "global clustering" in site["summary"], site
                assert all("global clustering" in p for p in site["paths"]), site
                assert any(p.startswith("approximate") for p in site["paths"]), site
                assert not any(k.startswith(("k,v", "dk,dv")) for k in site["traffic"]), site
                assert site["ran_fwd"] == site["planned_fwd"] > 0, site
                assert site["ran_bwd"] == site["planned_bwd"] > 0, site
                for name, phase, count in site["collectives"]:
                    assert site["traffic"][f"{name}.{phase}.calls"] == count, site


def test_compiled_bert_over_a_ring_equals_one_process():
    cases = [dict(u=1, r=2)]
    _check(launch(f"{__name__}:compiled_cases", 2, {"cases": cases}, timeout=300), cases)


@pytest.mark.slow
def test_compiled_bert_under_ulysses_and_usp_equals_one_process():
    """(2, 2), (4, 1), (1, 4) Euclidean k-means, the user's DeviceMesh alone (the default
    ring_clustering), AOTAutograd (the op's backward traced as a custom op)."""
    cases = [dict(u=2, r=2), dict(u=4, r=1), dict(u=1, r=4, knobs=dict(clustering="kmeans")),
             dict(u=2, r=2, device_mesh=True), dict(u=1, r=4, backend="aot_eager")]
    _check(launch(f"{__name__}:compiled_cases", 4, {"cases": cases}, timeout=600), cases)
