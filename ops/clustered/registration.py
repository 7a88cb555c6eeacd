"""torch.library registration of the clustered-attention ops (namespace ``clusterfx``).

Four custom ops, each with a fake (meta) kernel and an autograd formula; ``*spec`` stands for
the fields of a ``ClusteringSpec`` in its order (clusters, iterations, bits, seed, clustering,
refine, metric)::

    clustered_attention(q, k, v, mask, scale, *spec, impl) -> (out, assignments)
    improved_clustered_attention(q, k, v, mask, scale, *spec, topk, impl)
        -> (out, assignments, idx)
    clustered_attention_from_assignments(q, k, v, assignments, mask, C, scale, impl) -> out
    improved_clustered_attention_from_assignments(q, k, v, assignments, mask, C, topk, scale,
                                                  impl) -> (out, idx)

The discrete choices (assignments, top-k indices ``idx`` (B,H,C,k)) are returned so that the
backward can hold them fixed: it recomputes the differentiable part from (q, k, v) with the
explicit-assignment torch code (``reference`` for impl="reference", the vectorised ``cpu`` code
otherwise; both run on any device) and calls ``torch.autograd.grad``. Gradients thus reach q
through the centroid means (and, for i-clustered, the exact top-k scores), k and v through the
centroid attention and the top-k attention; none flows through hashing, k-means or top-k.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from clusterfx.ops.clustered import checks
from clusterfx.ops.clustering import ClusteringSpec, attention_metric, cluster_with
from clusterfx.ops.common import telemetry
from clusterfx.ops.common.dispatch import resolve_impl


def implementation(backend: str) -> ModuleType:
    """The module of an implementation ("reference", "cpu", "triton"); imported when first
    used, so that this module imports without Triton."""
    return importlib.import_module(f"clusterfx.ops.clustered.{backend}")


def differentiable(impl: str) -> ModuleType:
    """The torch code that recomputes the forward for the backward pass (any device)."""
    return implementation("reference" if impl == "reference" else "cpu")


def _backend(op: str, impl: str, q: Tensor) -> str:
    backend = resolve_impl(impl, q.device)
    telemetry.record(op, backend)
    return backend


def vjp(fn, inputs: tuple[Tensor, ...], needs: tuple[bool, ...], grad_out: Tensor):
    """Gradients of ``fn(*inputs)`` (a tensor) w.r.t. the inputs flagged in ``needs``."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs, strict=True)]
        out = fn(*leaves)
        wanted = [t for t, n in zip(leaves, needs, strict=True) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    return [next(grads) if n else None for n in needs]


def cluster(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, spec: ClusteringSpec,
            backend: str) -> Tensor:
    """Cluster assignments (B, H, Nq) of the queries, in the geometry ``spec.metric`` names."""
    m = centre = None
    if spec.metric == "attention":
        m = attention_metric(k, q.shape[1], key_padding_mask)
        if key_padding_mask is not None and q.shape[2] == k.shape[2]:
            # self-attention: padded positions' queries should not move the hash's centre
            centre = key_padding_mask[:, None, :].expand(q.shape[:3])
    assignments, _ = cluster_with(q, spec, metric=m, centre_mask=centre, impl=backend)
    return assignments


def _empty_out(q: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _topk_shape(q: Tensor, k: Tensor, clusters: int, topk: int) -> tuple[int, ...]:
    return (*q.shape[:2], clusters, min(topk, k.shape[2]))


# --------------------------------------------------------------------------- explicit assignments


@torch.library.custom_op("clusterfx::clustered_attention_from_assignments", mutates_args=())
def clustered_attention_from_assignments_op(
    q: Tensor, k: Tensor, v: Tensor, assignments: Tensor, key_padding_mask: Tensor | None,
    clusters: int, scale: float, impl: str,
) -> Tensor:
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    checks.check_assignments_meta(assignments, q, clusters)
    checks.check_assignments_values(assignments, clusters)
    mod = implementation(_backend("clustered_attention_from_assignments", impl, q))
    return mod.clustered_attention_from_assignments(q, k, v, assignments, clusters,
                                                    key_padding_mask, scale).contiguous()


@clustered_attention_from_assignments_op.register_fake
def _(q, k, v, assignments, key_padding_mask, clusters, scale, impl):
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    checks.check_assignments_meta(assignments, q, clusters)
    return _empty_out(q, v)


@torch.library.custom_op("clusterfx::improved_clustered_attention_from_assignments",
                         mutates_args=())
def improved_clustered_attention_from_assignments_op(
    q: Tensor, k: Tensor, v: Tensor, assignments: Tensor, key_padding_mask: Tensor | None,
    clusters: int, topk: int, scale: float, impl: str,
) -> tuple[Tensor, Tensor]:
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    checks.check_assignments_meta(assignments, q, clusters)
    checks.check_topk(topk)
    checks.check_assignments_values(assignments, clusters)
    mod = implementation(_backend("improved_clustered_attention_from_assignments", impl, q))
    out, idx = mod.improved_clustered_attention_from_assignments(q, k, v, assignments,
                                                                 clusters, key_padding_mask,
                                                                 scale, topk)
    return out.contiguous(), idx.contiguous()  # the fake kernel's layout


@improved_clustered_attention_from_assignments_op.register_fake
def _(q, k, v, assignments, key_padding_mask, clusters, topk, scale, impl):
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    checks.check_assignments_meta(assignments, q, clusters)
    checks.check_topk(topk)
    return _empty_out(q, v), q.new_empty(_topk_shape(q, k, clusters, topk), dtype=torch.int64)


# --------------------------------------------------------------------------- clustering inside


@torch.library.custom_op("clusterfx::clustered_attention", mutates_args=())
def clustered_attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float,
    clusters: int, iterations: int, bits: int, seed: int, clustering: str, refine: int,
    metric: str, impl: str,
) -> tuple[Tensor, Tensor]:
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    spec = ClusteringSpec.from_args(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_impl(impl)
    backend = _backend("clustered_attention", impl, q)
    assignments = cluster(q, k, key_padding_mask, spec, backend)
    out = implementation(backend).clustered_attention_from_assignments(
        q, k, v, assignments, spec.clusters, key_padding_mask, scale)
    return out.contiguous(), assignments.contiguous()


@clustered_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale, clusters, iterations, bits, seed, clustering, refine,
      metric, impl):
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    ClusteringSpec.from_args(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_impl(impl)
    return _empty_out(q, v), q.new_empty(q.shape[:3], dtype=torch.int64)


@torch.library.custom_op("clusterfx::improved_clustered_attention", mutates_args=())
def improved_clustered_attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float,
    clusters: int, iterations: int, bits: int, seed: int, clustering: str, refine: int,
    metric: str, topk: int, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    spec = ClusteringSpec.from_args(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_topk(topk)
    checks.check_impl(impl)
    backend = _backend("improved_clustered_attention", impl, q)
    assignments = cluster(q, k, key_padding_mask, spec, backend)
    out, idx = implementation(backend).improved_clustered_attention_from_assignments(
        q, k, v, assignments, spec.clusters, key_padding_mask, scale, topk)
    return out.contiguous(), assignments.contiguous(), idx.contiguous()


@improved_clustered_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale, clusters, iterations, bits, seed, clustering, refine,
      metric, topk, impl):
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    ClusteringSpec.from_args(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_topk(topk)
    checks.check_impl(impl)
    idx = q.new_empty(_topk_shape(q, k, clusters, topk), dtype=torch.int64)
    return _empty_out(q, v), q.new_empty(q.shape[:3], dtype=torch.int64), idx


# --------------------------------------------------------------------------- autograd


def _save(ctx, q, k, v, assignments, mask, clusters, scale, impl, idx=None) -> None:
    ctx.save_for_backward(q, k, v, assignments, mask, idx)
    ctx.clusters, ctx.scale, ctx.impl = clusters, scale, impl


def _input_grads(ctx, grad_out) -> list[Tensor | None]:
    q, k, v, assignments, mask, idx = ctx.saved_tensors
    mod = differentiable(ctx.impl)
    if idx is None:
        fn = lambda q_, k_, v_: mod.clustered_attention_from_assignments(
            q_, k_, v_, assignments, ctx.clusters, mask, ctx.scale)
    else:
        fn = lambda q_, k_, v_: mod.improved_clustered_attention_from_assignments(
            q_, k_, v_, assignments, ctx.clusters, mask, ctx.scale, idx.shape[-1], idx)[0]
    return vjp(fn, (q, k, v), tuple(ctx.needs_input_grad[:3]), grad_out)


def _setup_from_assignments(ctx, inputs, output):
    q, k, v, assignments, mask, clusters, scale, impl = inputs
    _save(ctx, q, k, v, assignments, mask, clusters, scale, impl)


def _setup_improved_from_assignments(ctx, inputs, output):
    q, k, v, assignments, mask, clusters, _topk, scale, impl = inputs
    _save(ctx, q, k, v, assignments, mask, clusters, scale, impl, idx=output[1])


def _setup_op(ctx, inputs, output):
    q, k, v, mask, scale, clusters, *_spec, impl = inputs
    _save(ctx, q, k, v, output[1], mask, clusters, scale, impl)


def _setup_improved_op(ctx, inputs, output):
    q, k, v, mask, scale, clusters, *_spec_and_topk, impl = inputs
    _save(ctx, q, k, v, output[1], mask, clusters, scale, impl, idx=output[2])


def _backward(n_inputs: int):
    """Backward returning gradients for q, k, v and None for the other inputs."""
    def backward(ctx, grad_out, *_grads_of_index_outputs):
        return (*_input_grads(ctx, grad_out), *([None] * (n_inputs - 3)))
    return backward


clustered_attention_from_assignments_op.register_autograd(
    _backward(8), setup_context=_setup_from_assignments)
improved_clustered_attention_from_assignments_op.register_autograd(
    _backward(9), setup_context=_setup_improved_from_assignments)
clustered_attention_op.register_autograd(_backward(13), setup_context=_setup_op)
improved_clustered_attention_op.register_autograd(_backward(14), setup_context=_setup_improved_op)
