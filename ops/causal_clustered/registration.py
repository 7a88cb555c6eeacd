"""torch.library registration of the causal clustered-attention ops (namespace ``clusterfx``).

Three custom ops, each with a fake (meta) kernel; ``*spec`` stands for the fields of a
``ClusteringSpec`` in its order (clusters, iterations, bits, seed, clustering, refine, metric)::

    causal_clustered_attention(q, k, v, mask, scale, *spec, topk, block, causal, impl)
        -> (out, key_assign, query_assign, topk_idx)
    causal_clustered_attention_from_choices(q, k, v, mask, key_assign, query_assign,
                                            topk_idx, clusters, scale, block, causal, impl)
        -> out
    causal_clustered_attention_backward(grad, q, k, v, mask, key_assign, query_assign,
                                        topk_idx, clusters, scale, block, causal, impl)
        -> (dq, dk, dv)

``topk = 0`` is causal clustered attention, ``topk >= 1`` causal i-clustered. The discrete
choices are returned so that the backward holds them fixed: the backward op (opaque, so that
compiled training works too) recomputes the differentiable part from (q, k, v) with
``reference`` (impl="reference") or the vectorised ``cpu`` code (otherwise) and differentiates
it with ``torch.func.vjp``. Gradients reach q through its exact and cluster-mean logits, k and
v through the exact keys and the cluster sums; none flows through clustering or selection.

Implementations: "reference" (the oracle) and "cpu" (vectorised torch, which runs on any
device); "auto" is "cpu" on every device. There are no Triton kernels for this family yet, so
impl="triton" raises instead of falling back.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import torch
from torch import Tensor

from clusterfx.ops.causal_clustered import checks, guard
from clusterfx.ops.causal_clustered.common import DrawRows, draw_plan, key_epochs, nblocks
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common import telemetry

IMPLS = ("auto", "reference", "cpu")


def resolve(impl: str) -> str:
    """The implementation that runs: "reference" or "cpu" ("auto" → "cpu", on any device)."""
    checks.check_impl(impl)
    if impl == "triton":
        raise RuntimeError("causal clustered attention has no Triton kernels; use impl='cpu' "
                           "(vectorised torch, any device), 'reference' or 'auto'")
    return "cpu" if impl == "auto" else impl


def implementation(impl: str) -> ModuleType:
    return importlib.import_module(f"clusterfx.ops.causal_clustered.{resolve(impl)}")


def key_valid(mask: Tensor | None, k: Tensor) -> Tensor:
    return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if (
        mask is None) else mask


def topk_width(topk: int, nk) -> int:
    return min(topk, nk) if topk else 0


def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
        spec: ClusteringSpec, topk: int, block: int, causal: bool, backend: str,
        draw_rows: DrawRows | None = None):
    """Clustering, selection and attention by one implementation module, with the rules of
    guard.py around it (zero-size dims and non-finite keys/values at kept positions: exact
    attention; clusters clamped to max(Nq, Nk); bad queries kept out, their rows NaN).
    ``draw_rows``: the random draw of a larger batch's rows (``common.draw_plan``).
    → (out, key_assign, query_assign, topk_idx)."""
    spec = dataclasses.replace(spec, clusters=guard.clamp_clusters(spec.clusters, q.shape[2],
                                                                  k.shape[2]))
    g = None if guard.is_degenerate(q, k, v) else guard.inspect(q, k, v, mask)
    if g is None or g.exact:
        if g is not None:
            telemetry.event("nonfinite_exact")
        ka, qa, idx = (t.zero_() for t in fake_choices(q, k, spec.clusters, topk, block,
                                                       causal))
        return guard.exact_attention(q, k, v, mask, scale, causal).contiguous(), ka, qa, idx
    out, ka, qa, idx = _run(*g.inputs(q, k, v, mask), mask, scale, spec, topk, block, causal,
                            backend, draw_rows)
    return g.finish(out, mask, causal).contiguous(), ka, qa, idx


def _run(q, k, v, mask, scale, spec, topk, block, causal, backend, draw_rows=None):
    mod = implementation(backend)
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    kv = key_valid(mask, k)
    plan = draw_plan(spec.seed, spec.clustering, spec.bits, D, B * Hk, Nk, B * H, Nq,
                     q.device, draw_rows)
    ka = mod.cluster_keys(q, k, kv, spec, block, causal, plan)
    nb = nblocks(Nq, block)
    if topk:
        qv = kv if causal else torch.ones(B, Nq, dtype=torch.bool, device=q.device)
        qa, cents, exists = mod.cluster_queries(q, k, qv, kv, spec, block, causal, plan)
        idx = mod.select_topk(k, kv, cents, exists, topk, scale, block, causal)
    else:
        qa = torch.zeros(B, H, Nq, dtype=torch.int64, device=q.device)
        idx = torch.zeros(B, H, nb, spec.clusters, 0, dtype=torch.int64, device=q.device)
    out = mod.attention_from_choices(q, k, v, kv, ka, qa, idx, spec.clusters, scale, block,
                                     causal, differentiable=False)
    return out.contiguous(), ka.contiguous(), qa.contiguous(), idx.contiguous()


def fake_choices(q, k, clusters: int, topk: int, block: int, causal: bool):
    """Uninitialised (key_assign, query_assign, topk_idx) of the shapes a call returns."""
    B, H, Nq = q.shape[:3]
    nb = (Nq + block - 1) // block
    clusters = guard.clamp_clusters(clusters, Nq, k.shape[2])
    return (q.new_empty(B, k.shape[1], key_epochs(nb, causal), k.shape[2], dtype=torch.int64),
            q.new_empty(B, H, Nq, dtype=torch.int64),
            q.new_empty(B, H, nb, clusters, topk_width(topk, k.shape[2]), dtype=torch.int64))


def _fake_outputs(q, k, v, clusters, topk, block, causal):
    return (q.new_empty(*q.shape[:3], v.shape[-1]),
            *fake_choices(q, k, clusters, topk, block, causal))


@torch.library.custom_op("clusterfx::causal_clustered_attention", mutates_args=())
def causal_clustered_attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float,
    clusters: int, iterations: int, bits: int, seed: int, clustering: str, refine: int,
    metric: str, topk: int, block: int, causal: bool, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    checks.check_inputs(q, k, v, key_padding_mask, scale, causal)
    spec = ClusteringSpec.from_args(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_topk(topk)
    checks.check_block(block)
    backend = resolve(impl)
    telemetry.record("causal_clustered_attention", backend)
    return run(q, k, v, key_padding_mask, scale, spec, topk, block, causal, backend)


@causal_clustered_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale, clusters, iterations, bits, seed, clustering, refine,
      metric, topk, block, causal, impl):
    checks.check_inputs(q, k, v, key_padding_mask, scale, causal)
    ClusteringSpec.from_args(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_topk(topk)
    checks.check_block(block)
    resolve(impl)
    return _fake_outputs(q, k, v, clusters, topk, block, causal)


@torch.library.custom_op("clusterfx::causal_clustered_attention_from_choices", mutates_args=())
def causal_clustered_attention_from_choices_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, key_assign: Tensor,
    query_assign: Tensor, topk_idx: Tensor, clusters: int, scale: float, block: int,
    causal: bool, impl: str,
) -> Tensor:
    checks.check_inputs(q, k, v, key_padding_mask, scale, causal)
    checks.check_choices(key_assign, query_assign, topk_idx, q, k, clusters, block, causal)
    checks.check_choice_values(key_assign, query_assign, topk_idx, clusters, k.shape[2])
    backend = resolve(impl)
    telemetry.record("causal_clustered_attention_from_choices", backend)
    out = implementation(backend).attention_from_choices(
        q, k, v, key_valid(key_padding_mask, k), key_assign, query_assign, topk_idx, clusters,
        scale, block, causal, differentiable=False)
    return out.contiguous()


@causal_clustered_attention_from_choices_op.register_fake
def _(q, k, v, key_padding_mask, key_assign, query_assign, topk_idx, clusters, scale, block,
      causal, impl):
    checks.check_inputs(q, k, v, key_padding_mask, scale, causal)
    checks.check_choices(key_assign, query_assign, topk_idx, q, k, clusters, block, causal)
    resolve(impl)
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("clusterfx::causal_clustered_attention_backward", mutates_args=())
def causal_clustered_attention_backward_op(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
    key_assign: Tensor, query_assign: Tensor, topk_idx: Tensor, clusters: int, scale: float,
    block: int, causal: bool, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    # Autograd is off inside an op's kernel; torch.func.vjp differentiates regardless.
    fn = differentiable(q, k, v, key_padding_mask, key_assign, query_assign, topk_idx,
                        clusters, scale, block, causal, impl)
    _, vjp = torch.func.vjp(fn, q, k, v)
    dq, dk, dv = vjp(grad.contiguous())
    if guard.is_degenerate(q, k, v):  # empty gradients may be views of one another
        return tuple(t.clone(memory_format=torch.contiguous_format) for t in (dq, dk, dv))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def differentiable(q, k, v, keep, key_assign, query_assign, topk_idx, clusters, scale, block,
                   causal, impl):
    """The function of (q, k, v) that the forward computed for these choices, by the same
    rules (guard.py): exact attention, or the choices' attention on the guarded inputs."""
    g = None if guard.is_degenerate(q, k, v) else guard.inspect(q, k, v, keep)
    if g is None or g.exact:
        return lambda q_, k_, v_: guard.exact_attention(q_, k_, v_, keep, scale, causal)
    mod = implementation(impl)
    kv = key_valid(keep, k)
    clusters = guard.clamp_clusters(clusters, q.shape[2], k.shape[2])

    def fn(q_, k_, v_):
        # bad queries keep their own (NaN) rows: their gradients are NaN as dense attention's
        _, k_, v_ = g.inputs(q_, k_, v_, keep)
        return mod.attention_from_choices(q_, k_, v_, kv, key_assign, query_assign, topk_idx,
                                          clusters, scale, block, causal)
    return fn


@causal_clustered_attention_backward_op.register_fake
def _(grad, q, k, v, key_padding_mask, key_assign, query_assign, topk_idx, clusters, scale,
      block, causal, impl):
    fmt = torch.contiguous_format
    return (torch.empty_like(q, memory_format=fmt), torch.empty_like(k, memory_format=fmt),
            torch.empty_like(v, memory_format=fmt))


def backward_of_choices(ctx, grad, key_assign, query_assign, topk_idx):
    """(dq, dk, dv) through the opaque backward op, the choices held fixed."""
    q, k, v, mask = ctx.saved_tensors[:4]
    return torch.ops.clusterfx.causal_clustered_attention_backward(
        grad, q, k, v, mask, key_assign, query_assign, topk_idx, *ctx.args)


def _setup_op(ctx, inputs, output):
    q, k, v, mask, scale, clusters, *_spec, _topk, block, causal, impl = inputs
    ctx.save_for_backward(q, k, v, mask, *output[1:])
    ctx.args = (clusters, scale, block, causal, impl)


def _backward_op(ctx, grad, *_grads_of_choices):
    ka, qa, idx = ctx.saved_tensors[4:]
    return (*backward_of_choices(ctx, grad, ka, qa, idx), *([None] * 13))


def _setup_choices(ctx, inputs, output):
    q, k, v, mask, ka, qa, idx, clusters, scale, block, causal, impl = inputs
    ctx.save_for_backward(q, k, v, mask, ka, qa, idx)
    ctx.args = (clusters, scale, block, causal, impl)


def _backward_choices(ctx, grad):
    ka, qa, idx = ctx.saved_tensors[4:]
    return (*backward_of_choices(ctx, grad, ka, qa, idx), *([None] * 9))


causal_clustered_attention_op.register_autograd(_backward_op, setup_context=_setup_op)
causal_clustered_attention_from_choices_op.register_autograd(
    _backward_choices, setup_context=_setup_choices)
