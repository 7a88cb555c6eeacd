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

import dataclasses
import importlib
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterfx.ops.clustered import checks, fused, nonfinite
from clusterfx.ops.clustering import ClusteringSpec, attention_metric, cluster_with
from clusterfx.ops.common import telemetry
from clusterfx.ops.common.checks import NATIVE_IMPLS
from clusterfx.ops.common.degenerate import degenerate_attention, is_degenerate
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
            backend: str, excluded: Tensor | None = None,
            draw_rows: tuple[int, Tensor] | None = None) -> Tensor:
    """Cluster assignments (B, H, Nq) of the queries, in the geometry ``spec.metric`` names.
    ``excluded`` (B, H, Nq) queries (nonfinite.py) do not move the hash's centre;
    ``draw_rows``: as ``clustering.cluster_queries`` (these B·H rows of a larger batch)."""
    m = centre = None
    if spec.metric == "attention":
        m = attention_metric(k, q.shape[1], key_padding_mask)
        if key_padding_mask is not None and q.shape[2] == k.shape[2]:
            # self-attention: padded positions' queries should not move the hash's centre
            centre = key_padding_mask[:, None, :].expand(q.shape[:3])
        if excluded is not None:
            centre = ~excluded if centre is None else centre & ~excluded
    assignments, _ = cluster_with(q, spec, metric=m, centre_mask=centre, impl=backend,
                                  draw_rows=draw_rows)
    return assignments


def run_clustered(name: str, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None,
                  scale: float, spec: ClusteringSpec, impl: str, topk: int | None = None,
                  draw_rows: tuple[int, Tensor] | None = None,
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Clustered (``topk`` None) or i-clustered attention with clustering inside, with the
    degenerate-input, clamp and non-finite rules applied around the implementation
    (``draw_rows``: the clustering's random choices of these rows of a larger batch, see
    ``cluster``):
    (out, assignments (B, H, Nq) with excluded queries in the spare cluster C, top-k indices
    (B, H, C + 1, k) or None). C = min(clusters, Nq); the spare cluster C is always counted
    (empty unless some query is excluded), so that shapes do not depend on the data."""
    spare = checks.clamped_clusters(spec.clusters, q)
    idx_shape = _topk_shape(q, k, spec.clusters, topk) if topk is not None else None
    if is_degenerate(q, k, v):
        idx = None if topk is None else q.new_zeros(idx_shape, dtype=torch.int64)
        return _exact(q, k, v, keep, scale), _no_assignments(q), idx
    spec = _clamp(spec, q)
    guard = nonfinite.inspect(q, k, v, keep, pooled=spec.clusters < q.shape[2])
    if guard.exact:  # a non-finite key or value that is not masked: dense attention's rows
        telemetry.event("nonfinite_exact")
        idx = None if topk is None else q.new_zeros(idx_shape, dtype=torch.int64)
        return _exact_attention(q, k, v, keep, scale), _no_assignments(q), idx
    backend = _backend(name, impl, q)
    (q_cluster, q), (k, v) = guard.queries(q), guard.keys_values(k, v, keep)
    assignments = guard.assign(cluster(q_cluster, k, keep, spec, backend, guard.excluded,
                                       draw_rows), spare)
    clusters = spare + (guard.excluded is not None)
    mod = implementation(backend)
    if topk is None:
        out = mod.clustered_attention_from_assignments(q, k, v, assignments, clusters, keep,
                                                       scale)
        return guard.finish(out, keep).contiguous(), assignments.contiguous(), None
    out, idx = mod.improved_clustered_attention_from_assignments(q, k, v, assignments,
                                                                 clusters, keep, scale, topk)
    if idx.shape[2] == spare:  # the spare cluster's (unused) row, for a data-free shape
        idx = torch.cat([idx, idx.new_zeros(*idx.shape[:2], 1, idx.shape[3])], 2)
    return guard.finish(out, keep).contiguous(), assignments.contiguous(), idx.contiguous()


def _exact_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None,
                     scale: float) -> Tensor:
    """Exact attention with key padding (zero rows where a batch element has no kept key)."""
    mask = None if keep is None else keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    if keep is not None:
        out = torch.where(keep.any(-1)[:, None, None, None], out, torch.zeros_like(out))
    return out.contiguous()


def _empty_out(q: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _topk_shape(q: Tensor, k: Tensor, clusters: int, topk: int) -> tuple[int, ...]:
    """Top-k indices of the clustering ops: one row per cluster and the spare one."""
    return (*q.shape[:2], checks.clamped_clusters(clusters, q) + 1, min(topk, k.shape[2]))


def _exact(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
           scale: float) -> Tensor:
    """Exact attention for degenerate inputs (a zero-size dim; ops/common/degenerate.py)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return degenerate_attention(q, k, v, mask, False, scale).contiguous()


def _clamp(spec: ClusteringSpec, q: Tensor) -> ClusteringSpec:
    """At most one cluster per query (no buffer sized by a larger requested C), with the
    warning the clustering gives for it."""
    clusters = checks.clamped_clusters(spec.clusters, q)
    if clusters == spec.clusters:
        return spec
    telemetry.event("clusters_clamped")
    warnings.warn(f"clusters ({spec.clusters}) exceeds the number of queries ({q.shape[2]}); "
                  f"using {clusters} clusters", stacklevel=3)
    return dataclasses.replace(spec, clusters=clusters)


def _no_assignments(q: Tensor) -> Tensor:
    return torch.zeros(q.shape[:3], dtype=torch.int64, device=q.device)


# --------------------------------------------------------------------------- explicit assignments


@torch.library.custom_op("clusterfx::clustered_attention_from_assignments", mutates_args=())
def clustered_attention_from_assignments_op(
    q: Tensor, k: Tensor, v: Tensor, assignments: Tensor, key_padding_mask: Tensor | None,
    clusters: int, scale: float, impl: str,
) -> Tensor:
    checks.check_attention_inputs(q, k, v, key_padding_mask, scale)
    checks.check_assignments_meta(assignments, q, clusters)
    if is_degenerate(q, k, v):
        return _exact(q, k, v, key_padding_mask, scale)
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
    if is_degenerate(q, k, v):
        idx = q.new_zeros((*q.shape[:2], clusters, min(topk, k.shape[2])), dtype=torch.int64)
        return _exact(q, k, v, key_padding_mask, scale), idx
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
    idx = (*q.shape[:2], clusters, min(topk, k.shape[2]))  # given assignments: no clamp
    return _empty_out(q, v), q.new_empty(idx, dtype=torch.int64)


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
    out, assignments, _ = run_clustered("clustered_attention", q, k, v, key_padding_mask,
                                        scale, spec, impl)
    return out, assignments


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
    return run_clustered("improved_clustered_attention", q, k, v, key_padding_mask, scale,
                         spec, impl, topk)


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
    if is_degenerate(q, k, v):  # exact attention's gradients (zero-size dims)
        fn = lambda q_, k_, v_: _exact(q_, k_, v_, mask, ctx.scale)  # noqa: E731
        _, pullback = torch.func.vjp(fn, q, k, v)
        grads = pullback(grad_out.contiguous())
        return [g if n else None for g, n in zip(grads, ctx.needs_input_grad[:3], strict=True)]
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
    _save(ctx, q, k, v, output[1], mask, checks.spare_clusters(clusters, q), scale, impl)


def _setup_improved_op(ctx, inputs, output):
    q, k, v, mask, scale, clusters, *_spec_and_topk, impl = inputs
    _save(ctx, q, k, v, output[1], mask, checks.spare_clusters(clusters, q), scale, impl,
          idx=output[2])


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
