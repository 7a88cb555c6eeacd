"""The pass manager: the fixed order built from the compile state, typed results per pass, the
uuid that enters the cache key (passes' sources + policy + mesh, nothing else), stop_after, and
run-time telemetry kept per compile."""

from __future__ import annotations

import gc

import pytest
import torch

import clusterfx as cfx
from clusterfx.compiler.pass_manager import PASS_NAMES, PassManager
from clusterfx.compiler.state import CompileState
from clusterfx.models import bert_tiny, example_inputs, gpt_tiny
from clusterfx.ops.common import telemetry


def _bert():
    torch.manual_seed(0)
    model = bert_tiny(depth=2).eval()
    return model, example_inputs("bert", model=model, seq_len=32)


def test_order_without_and_with_a_mesh():
    policy = cfx.Policy.make(None)
    assert PassManager.configure(policy).names == ["inline_mha", "canonicalize", "lower"]
    with_mesh = PassManager.configure(policy, mesh_key="sp:abc")
    assert with_mesh.names == list(PASS_NAMES)


def test_uuid_hashes_passes_policy_and_mesh_only():
    a = PassManager.configure(cfx.Policy.make(cfx.Clustered(clusters=4)))
    same = PassManager.configure(cfx.Policy.make(cfx.Clustered(clusters=4)))
    other = PassManager.configure(cfx.Policy.make(cfx.Clustered(clusters=5)))
    meshed = PassManager.configure(cfx.Policy.make(cfx.Clustered(clusters=4)), "sp:x")
    assert a.uuid() == same.uuid()
    assert len({a.uuid(), other.uuid(), meshed.uuid()}) == 3
    sources = {m for p in a.passes for m in p.source_modules()}
    ours = {m for m in sources if m.startswith("clusterfx.")}
    assert all(m.startswith("clusterfx.passes.") for m in ours), ours  # no bench, cli, apps
    assert "clusterfx.passes.lowerings.clustered" in sources  # the registered rewrites
    state = CompileState(cfx.Policy.make(None), "eager",
                         mesh=cfx.SequenceParallel(ulysses=2), mesh_key="sp:1")
    assert state.cache_key() == state.manager.uuid() != CompileState(
        cfx.Policy.make(None), "eager").cache_key()


def test_each_pass_returns_a_typed_result_with_counters():
    model, inputs = _bert()
    compiled = cfx.compile(model, policy={"encoder.layer.0": cfx.TopK(k=4),
                                          "_default": None}, backend="eager")
    with torch.no_grad():
        compiled(*inputs)
    (record,) = compiled._clusterfx_state.latest_records()
    assert [r.name for r in record.results] == ["inline_mha", "canonicalize", "lower"]
    canon, lower = record.results[1], record.results[2]
    assert canon.counters["canonical"] == 2 and not canon.declines
    assert lower.counters == {"rewritten": 1, "kept_dense": 1}
    assert all(r.seconds >= 0 for r in record.results)
    assert set(record.pass_seconds) == {"inline_mha", "canonicalize", "lower"}


@pytest.mark.parametrize("stop", PASS_NAMES[:3])
def test_stop_after_each_pass(stop):
    model, inputs = _bert()
    gm = cfx.transform(model, inputs, stop_after=stop)
    statuses = {r.status for r in gm.meta["clusterfx_report"]}
    assert statuses == ({"kept dense"} if stop == "lower" else {"canonical"} if
                        stop == "canonicalize" else set())


def test_stop_after_rejects_unknown_names():
    model, inputs = _bert()
    with pytest.raises(ValueError, match=r"stop_after \('lowering'\) must be one of"):
        cfx.transform(model, inputs, stop_after="lowering")


def test_a_mesh_without_a_process_group_is_an_error_and_an_unresolved_one_declines():
    model, inputs = _bert()
    with pytest.raises(ValueError, match="init_process_group"):
        cfx.compile(model, mesh=cfx.SequenceParallel(ulysses=2), backend="eager")
    with pytest.raises(TypeError, match="DeviceMesh"):
        cfx.compile(model, mesh="ulysses=2")
    # a pass manager given a mesh key but no resolved mesh declines every site, saying why
    from clusterfx.compiler.backend import ClusterfxBackend

    state = CompileState(cfx.Policy.make(None), "eager", mesh_key="sp:x")
    with torch.no_grad():
        torch.compile(model, backend=ClusterfxBackend(state))(*inputs)
    (record,) = state.latest_records()
    sp = record.results[-1]
    assert sp.name == "sequence_parallel" and len(sp.declines) == 2
    assert all("no resolved mesh" in reason for _, reason in sp.declines)


def test_run_time_paths_are_counted_per_compile_and_freed_with_it():
    torch.manual_seed(0)
    model = gpt_tiny(depth=1).eval()
    ids = example_inputs("gpt", model=model, seq_len=16)
    first = cfx.compile(model, policy=cfx.TopK(k=4), backend="eager")
    second = cfx.compile(model, policy=cfx.TopK(k=4), backend="eager")
    with torch.no_grad():
        for _ in range(3):
            first(*ids)
        second(*ids)
    assert cfx.explain(first)[0].paths == {"top-k [cpu]": 3}
    assert cfx.explain(second)[0].paths == {"top-k [cpu]": 1}
    # the counts live in the compile's state, not in the process: once dynamo lets go of the
    # compiled code (its caches hold the backend) and the model is gone, so are they
    token = first._clusterfx_state.telemetry.token
    assert token in telemetry._sinks
    del first, second
    torch._dynamo.reset()
    gc.collect()
    assert token not in telemetry._sinks
