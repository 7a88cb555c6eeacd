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

Implementations (``impl``) and their modules: "reference" → ``reference.py``, "cpu" →
``fused.py`` (the C++ kernels), "torch" → ``cpu.py`` (vectorised torch), "triton" →
``triton.py``; "auto" resolves as ``clusterfx.ops.common.dispatch.resolve_impl`` says.

The discrete choices (assignments, top-k indices ``idx`` (B,H,C,k)) are returned so that the
backward can hold them fixed (``attention_grads``): clustered attention on the fused path runs
the fused backward kernel; otherwise the differentiable part is recomputed from (q, k, v) with
the explicit-assignment torch code (``reference`` for impl="reference", the vectorised
``cpu.py`` code otherwise; both run on any device) and differentiated by ``torch.func.vjp``.
Gradients thus reach q through the centroid means (and, for i-clustered, the exact top-k
scores), k and v through the centroid attention and the top-k attention; none flows through
hashing, k-means or top-k.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from clusterfx.ops.clustered import checks, fused
from clusterfx.ops.clustering import ClusteringSpec, attention_metric, cluster_with
from clusterfx.ops.common import telemetry
from clusterfx.ops.common.checks import NATIVE_IMPLS
from clusterfx.ops.common.dispatch import resolve_impl

MODULES = {"reference": "reference", "cpu": "fused", "torch": "cpu", "triton": "triton"}


def implementation(backend: str) -> ModuleType:
    """The module of an implementation ("reference", "cpu", "torch", "triton"); imported when
    first used, so that this module imports without Triton."""
    return importlib.import_module(f"clusterfx.ops.clustered.{MODULES[backend]}")


def resolve(impl: str, device: torch.device) -> str:
    """The implementation that runs for ``impl`` on ``device`` (explicit ones never fall back)."""
    return resolve_impl(impl, device, NATIVE_IMPLS, fused.LIB)


def differentiable(impl: str) -> ModuleType:
    """The torch code that recomputes the forward for the backward pass (any device)."""
    return implementation("reference" if impl == "reference" else "torch")


def _backend(op: str, impl: str, q: Tensor) -> str:
    backend = resolve(impl, q.device)
    telemetry.record(op, backend)
    return backend


def attention_grads(impl: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                    assignments: Tensor, clusters: int, mask: Tensor | None, scale: float,
                    topk: int | None = None, idx: Tensor | None = None,
                    needs: tuple[bool, bool, bool] = (True, True, True)):
    """(dq, dk, dv) of clustered (``topk`` None) or i-clustered attention with the discrete
    choices (assignments, top-k ``idx``) held fixed; None where ``needs`` is False.

    Works inside autograd formulas and inside op kernels (``torch.func.vjp``)."""
    if topk is None and resolve(impl, q.device) == "cpu":
        grads = torch.ops.clusterfx.clustered_attention_backward(
            grad_out, q, k, v, assignments, mask, clusters, scale)
        return [g if n else None for g, n in zip(grads, needs, strict=True)]
    mod = differentiable(impl)
    if topk is None:
        fn = lambda q_, k_, v_: mod.clustered_attention_from_assignments(  # noqa: E731
            q_, k_, v_, assignments, clusters, mask, scale)
    else:
        fn = lambda q_, k_, v_: mod.improved_clustered_attention_from_assignments(  # noqa: E731
            q_, k_, v_, assignments, clusters, mask, scale, topk, idx)[0]
    _, pullback = torch.func.vjp(fn, q, k, v)
    grads = pullback(grad_out.contiguous())
    return [g if n else None for g, n in zip(grads, needs, strict=True)]


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


@torch.library.custom_op("clusterfx::clustered_attention_backward", mutates_args=())
def clustered_attention_backward_op(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, assignments: Tensor,
    key_padding_mask: Tensor | None, clusters: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of clustered attention, assignments held fixed: the fused kernel, as one
    opaque node (so compiled training does not trace into it)."""
    dq, dk, dv = fused.clustered_attention_backward(grad, q, k, v, assignments, clusters,
                                                    key_padding_mask, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@clustered_attention_backward_op.register_fake
def _(grad, q, k, v, assignments, key_padding_mask, clusters, scale):
    fmt = torch.contiguous_format
    return (torch.empty_like(q, memory_format=fmt), torch.empty_like(k, memory_format=fmt),
            torch.empty_like(v, memory_format=fmt))



def _save(ctx, q, k, v, assignments, mask, clusters, scale, impl, idx=None) -> None:
    ctx.save_for_backward(q, k, v, assignments, mask, idx)
    ctx.clusters, ctx.scale, ctx.impl = clusters, scale, impl


def _input_grads(ctx, grad_out) -> list[Tensor | None]:
    q, k, v, assignments, mask, idx = ctx.saved_tensors
    return attention_grads(ctx.impl, grad_out, q, k, v, assignments, ctx.clusters, mask,
                           ctx.scale, None if idx is None else idx.shape[-1], idx,
                           tuple(ctx.needs_input_grad[:3]))


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
