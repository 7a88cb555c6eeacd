"""torch.library registration of the sequence-parallel ops (namespace ``clusterfx``): schema,
fake kernel and autograd of each. ``*mesh`` stands for (seq_len, zigzag, ulysses, ring,
ulysses_group, ring_group, timeout): the layout of the sequence and the groups it is spread
over, by name (see `SeqLayout`, `comm.Groups`).

    sp_take_local(x, dim, outer, inner, *mesh, tag) -> local tokens    bwd: sp_gather
    sp_gather(x, dim, outer, inner, *mesh, tag, phase) -> all tokens   bwd: sp_take_local
    sp_all_reduce(x, *mesh, tag, phase) -> sum over the u·r ranks
    sp_all_to_all(x, to_heads, *mesh, tag, phase) -> Ulysses a2a       bwd: the inverse a2a
    sp_ring_attention(q, k, v, mask, causal, scale, *mesh, impl, tag) -> (out, lse)
        bwd: sp_ring_attention_backward(dout, q, k, v, out, lse, mask, causal, scale, *mesh,
                                        impl, tag) -> (dq, dk, dv)
    sp_ring_conditional_attention(q, k, v, mask, scale, *spec, min_length, *mesh, impl, tag,
                                  site) -> (out, assignments, path, lse)     clustered.py
    sp_ring_improved_clustered_attention(q, k, v, mask, scale, *spec, topk, min_length, *mesh,
                                         impl, tag, site)
        -> (out, assignments, path, lse, O^c, T positions, k_T, v_T)     improved.py
        (each with its `_backward` op: the assignments and top-k held fixed)

The ops read the rank from the groups at run time, so every rank's graph is the same code.
The gradient conventions (see `passes/sequence_parallel.py`): a value every rank holds whole
gets its whole gradient on every rank; a sharded value, its shard's gradient. Hence gather's
backward takes the local part (no communication) and take_local's gathers the parts.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from clusterfx.ops.clustered import key_padding
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common import telemetry
from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.common.dispatch import resolve_impl
from clusterfx.ops.sequence_parallel import clustered as ring_clustered
from clusterfx.ops.sequence_parallel import improved as ring_improved
from clusterfx.ops.sequence_parallel.common import ring as ring_mod
from clusterfx.ops.sequence_parallel.common import sharding
from clusterfx.ops.sequence_parallel.common.clusters import with_spare
from clusterfx.ops.sequence_parallel.common.comm import Groups
from clusterfx.ops.sequence_parallel.common.layout import SeqLayout

IMPLS = ("auto", "reference", "cpu")


def unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout):
    return (SeqLayout(seq_len, ulysses, ring, zigzag),
            Groups(ulysses, ring, ulysses_group, ring_group, timeout))


def kernels(impl: str, device: torch.device):
    if impl not in IMPLS:
        raise ValueError(f"impl ({impl!r}) must be one of {IMPLS} (ring attention has no "
                         f"Triton kernel: its blocks run the fused CPU kernel or plain torch)")
    backend = resolve_impl(impl, device)
    backend = "cpu" if backend == "triton" else backend
    return importlib.import_module(f"clusterfx.ops.sequence_parallel.{backend}"), backend


def _resized(x: Tensor, dim: int, size) -> Tensor:
    shape = list(x.shape)
    shape[dim % x.dim()] = size
    return x.new_empty(shape)


# ------------------------------------------------------------------------------ take / gather

@torch.library.custom_op("clusterfx::sp_take_local", mutates_args=())
def sp_take_local(x: Tensor, dim: int, outer: int, inner: int, seq_len: int, zigzag: bool,
                  ulysses: int, ring: int, ulysses_group: str, ring_group: str, timeout: float,
                  tag: str) -> Tensor:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    return sharding.take_local(x, dim, outer, inner, layout, groups)


@sp_take_local.register_fake
def _(x, dim, outer, inner, seq_len, zigzag, ulysses, ring, ulysses_group, ring_group,
      timeout, tag):
    layout, _ = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    sharding.check_sequence_dim(x, dim % x.dim(), outer, inner, seq_len, "take_local")
    return _resized(x, dim, outer * layout.local_len * inner)


@torch.library.custom_op("clusterfx::sp_gather", mutates_args=())
def sp_gather(x: Tensor, dim: int, outer: int, inner: int, seq_len: int, zigzag: bool,
              ulysses: int, ring: int, ulysses_group: str, ring_group: str, timeout: float,
              tag: str, phase: str) -> Tensor:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    return sharding.gather(x, dim, outer, inner, layout, groups, tag, phase)


@sp_gather.register_fake
def _(x, dim, outer, inner, seq_len, zigzag, ulysses, ring, ulysses_group, ring_group,
      timeout, tag, phase):
    layout, _ = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    sharding.check_sequence_dim(x, dim % x.dim(), outer, inner, layout.local_len, "gather")
    return _resized(x, dim, outer * seq_len * inner)


def _setup_shard(ctx, inputs, output):
    ctx.args = inputs[1:11]  # dim, outer, inner, *mesh


def _take_local_backward(ctx, grad):
    return (sp_gather(grad, *ctx.args, ctx.tag, "bwd"),) + (None,) * 11


def _setup_take(ctx, inputs, output):
    _setup_shard(ctx, inputs, output)
    ctx.tag = inputs[11]


def _gather_backward(ctx, grad):
    return (sp_take_local(grad, *ctx.args, ""),) + (None,) * 12


sp_take_local.register_autograd(_take_local_backward, setup_context=_setup_take)
sp_gather.register_autograd(_gather_backward, setup_context=_setup_shard)


# -------------------------------------------------------------------------------- all-reduce

@torch.library.custom_op("clusterfx::sp_all_reduce", mutates_args=())
def sp_all_reduce(x: Tensor, seq_len: int, zigzag: bool, ulysses: int, ring: int,
                  ulysses_group: str, ring_group: str, timeout: float, tag: str,
                  phase: str) -> Tensor:
    _, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    return sharding.all_reduce(x, groups, tag, phase)


@sp_all_reduce.register_fake
def _(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class GradSync(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the u·r ranks of the sequence.

    For a value every rank holds whole (a parameter) used by sharded computation: each rank's
    backward yields the part of its gradient that comes from its own tokens."""

    @staticmethod
    def forward(ctx, x, *mesh_and_tag):
        ctx.args = mesh_and_tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (sp_all_reduce(grad, *ctx.args, "bwd"),) + (None,) * len(ctx.args)


def grad_sync(x: Tensor, seq_len: int, zigzag: bool, ulysses: int, ring: int,
              ulysses_group: str, ring_group: str, timeout: float, tag: str) -> Tensor:
    return GradSync.apply(x, seq_len, zigzag, ulysses, ring, ulysses_group, ring_group,
                          timeout, tag)


# ------------------------------------------------------------------------------ all-to-all

@torch.library.custom_op("clusterfx::sp_all_to_all", mutates_args=())
def sp_all_to_all(x: Tensor, to_heads: bool, seq_len: int, zigzag: bool, ulysses: int,
                  ring: int, ulysses_group: str, ring_group: str, timeout: float, tag: str,
                  phase: str) -> Tensor:
    _, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    move = sharding.seq_to_heads if to_heads else sharding.heads_to_seq
    return move(x, groups, tag, phase).contiguous()


@sp_all_to_all.register_fake
def _(x, to_heads, seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout, tag,
      phase):
    B, H, N, D = x.shape
    u = ulysses
    if to_heads:
        if H % u:
            raise ValueError(f"heads ({H}) must be divisible by the ulysses degree ({u})")
        return x.new_empty(B, H // u, N * u, D)
    return x.new_empty(B, H * u, N // u, D)


def _setup_a2a(ctx, inputs, output):
    ctx.to_heads = inputs[1]
    ctx.args = inputs[2:10]


def _a2a_backward(ctx, grad):
    return (sp_all_to_all(grad, not ctx.to_heads, *ctx.args, "bwd"),) + (None,) * 10


sp_all_to_all.register_autograd(_a2a_backward, setup_context=_setup_a2a)


# -------------------------------------------------------------------------- ring attention

@torch.library.custom_op("clusterfx::sp_ring_attention", mutates_args=())
def sp_ring_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                      scale: float, seq_len: int, zigzag: bool, ulysses: int, ring: int,
                      ulysses_group: str, ring_group: str, timeout: float, impl: str,
                      tag: str) -> tuple[Tensor, Tensor]:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, backend = kernels(impl, q.device)
    telemetry.record("sp_ring_attention", backend)
    out, lse = ring_mod.ring_forward(q, k, v, mask, causal, scale, layout, groups, mod, tag)
    return out.contiguous(), lse.contiguous()


@sp_ring_attention.register_fake
def _(q, k, v, mask, causal, scale, seq_len, zigzag, ulysses, ring, ulysses_group, ring_group,
      timeout, impl, tag):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N, dtype=compute_dtype(q))


@torch.library.custom_op("clusterfx::sp_ring_attention_backward", mutates_args=())
def sp_ring_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, mask: Tensor | None, causal: bool, scale: float,
                               seq_len: int, zigzag: bool, ulysses: int, ring: int,
                               ulysses_group: str, ring_group: str, timeout: float, impl: str,
                               tag: str) -> tuple[Tensor, Tensor, Tensor]:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, _ = kernels(impl, q.device)
    dq, dk, dv = ring_mod.ring_backward(dout.contiguous(), q, k, v, out, lse, mask, causal,
                                        scale, layout, groups, mod, tag)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sp_ring_attention_backward.register_fake
def _(dout, q, k, v, out, lse, mask, *args):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_ring(ctx, inputs, output):
    q, k, v, mask = inputs[:4]
    ctx.save_for_backward(q, k, v, mask, output[0], output[1])
    ctx.args = inputs[4:]


def _ring_backward(ctx, grad, _grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = sp_ring_attention_backward(grad, q, k, v, out, lse, mask, *ctx.args)
    return (dq, dk, dv) + (None,) * 12


sp_ring_attention.register_autograd(_ring_backward, setup_context=_setup_ring)


# ---------------------------------------------------------------- clustered attention, ring

CONDITIONAL_PATHS = ("approximate", "exact: shorter than min_length",
                     "exact: mask is not key padding")


def _conditional_path(mask, batch: int, seq_len: int, min_length: int):
    """(path index into CONDITIONAL_PATHS, keep (B, S) or None), as `conditional_attention`
    decides: exact below `min_length` keys or for a mask that is not key padding."""
    if seq_len < min_length:
        return 1, None
    ok, keep = key_padding(mask, batch, seq_len)
    return (0, keep) if ok else (2, None)


@torch.library.custom_op("clusterfx::sp_ring_conditional_attention", mutates_args=())
def sp_ring_conditional_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, clusters: int,
    iterations: int, bits: int, seed: int, clustering: str, refine: int, metric: str,
    min_length: int, seq_len: int, zigzag: bool, ulysses: int, ring: int, ulysses_group: str,
    ring_group: str, timeout: float, impl: str, tag: str, site: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clustered attention over the ring (`clustered.py`), or exact ring attention below
    `min_length` keys or for a mask that is not key padding (as `conditional_attention`).
    Returns (out, assignments, path, lse) with lse (B, H, max(Nb, C + 1)): the centroids'
    (first C + 1, the spare cluster of padded queries counted: `common.clusters.with_spare`) or the
    queries' (first Nb) log-sum-exp, kept for the backward."""
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, backend = kernels(impl, q.device)
    B, H, N, _ = q.shape
    spec = ClusteringSpec(clusters, iterations, bits, seed, clustering, refine, metric)
    path, keep = _conditional_path(mask, B, seq_len, min_length)
    telemetry.record("conditional_attention", "ring " + backend, site=site,
                     path=CONDITIONAL_PATHS[path] + f" [ring {backend}]")
    lse_out = q.new_zeros(B, H, max(N, with_spare(clusters)),
                          dtype=compute_dtype(q))
    if path:
        out, lse = ring_mod.ring_forward(q, k, v, mask, False, scale, layout, groups, mod, tag)
        assignments = torch.zeros(B, H, N, dtype=torch.int64, device=q.device)
    else:
        clustering_impl = "reference" if impl == "reference" else "auto"  # noqa: SIM108
        out, assignments, _, lse = ring_clustered.forward(
            q, k, v, keep, scale, spec, layout, groups, mod, clustering_impl, tag)
    lse_out[..., :lse.shape[-1]] = lse
    return (out.to(q.dtype).contiguous(), assignments, torch.tensor(path, dtype=torch.int64),
            lse_out)


@sp_ring_conditional_attention.register_fake
def _(q, k, v, mask, scale, clusters, *args):
    B, H, N, _ = q.shape
    return (q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N, dtype=torch.int64),
            q.new_empty((), dtype=torch.int64),
            q.new_empty(B, H, max(N, with_spare(clusters)),
                        dtype=compute_dtype(q)))


@torch.library.custom_op("clusterfx::sp_ring_conditional_attention_backward", mutates_args=())
def sp_ring_conditional_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor,
    assignments: Tensor, path: Tensor, lse: Tensor, scale: float, clusters: int, seq_len: int,
    zigzag: bool, ulysses: int, ring: int, ulysses_group: str, ring_group: str,
    timeout: float, impl: str, tag: str,
) -> tuple[Tensor, Tensor, Tensor]:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, _ = kernels(impl, q.device)
    B, H, N, Dv = out.shape
    dout = dout.contiguous()
    if int(path):
        dq, dk, dv = ring_mod.ring_backward(dout, q, k, v, out, lse[..., :N], mask, False,
                                            scale, layout, groups, mod, tag)
    else:
        _, keep = key_padding(mask, B, seq_len)
        clusters = with_spare(clusters)
        # every member of a cluster holds its centroid's row; empty clusters get no gradient
        oc = out.new_zeros(B, H, clusters, Dv).scatter_(
            2, assignments[..., None].expand(B, H, N, Dv), out)
        dq, dk, dv = ring_clustered.backward(dout, q, k, v, keep, assignments, oc,
                                             lse[..., :clusters], scale, clusters, layout,
                                             groups, mod, tag)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sp_ring_conditional_attention_backward.register_fake
def _(dout, q, k, v, *args):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_conditional(ctx, inputs, output):
    q, k, v, mask, scale, clusters = inputs[:6]
    ctx.save_for_backward(q, k, v, mask, output[0], output[1], output[2], output[3])
    ctx.args = (scale, clusters, *inputs[13:22])  # *mesh, impl, tag


def _conditional_backward(ctx, grad, _ga, _gp, _gl):
    q, k, v, mask, out, assignments, path, lse = ctx.saved_tensors
    dq, dk, dv = sp_ring_conditional_attention_backward(grad, q, k, v, mask, out, assignments,
                                                        path, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * 20


sp_ring_conditional_attention.register_autograd(_conditional_backward,
                                                setup_context=_setup_conditional)


# ------------------------------------------------------- improved clustered attention, ring

@torch.library.custom_op("clusterfx::sp_ring_improved_clustered_attention", mutates_args=())
def sp_ring_improved_clustered_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, clusters: int,
    iterations: int, bits: int, seed: int, clustering: str, refine: int, metric: str,
    topk: int, min_length: int, seq_len: int, zigzag: bool, ulysses: int, ring: int,
    ulysses_group: str, ring_group: str, timeout: float, impl: str, tag: str, site: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """i-clustered attention over the ring (`improved.py`), or exact ring attention below
    `min_length` keys or for a mask that is not key padding. Returns (out, assignments, path,
    lse, O^c, T positions, k_T, v_T), the last five kept for the backward: lse (B, H,
    max(Nb, C)) the centroids' (first C) or, on an exact path, the queries' (first Nb)
    log-sum-exp; O^c (B, H, C, Dv) in the compute dtype; T (B, H, C, kk) int64, k_T, v_T
    (B, H, C, kk, ·), kk = min(topk, S) (zeros on an exact path); here C counts the spare
    cluster of padded queries (`common.clusters.with_spare`), and assignments are in [0, C]. The
    blocks run plain torch (the top-k needs each block's centroid scores): telemetry says
    "torch" (or "reference")."""
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, backend = kernels(impl, q.device)
    B, H, N, _ = q.shape
    spec = ClusteringSpec(clusters, iterations, bits, seed, clustering, refine, metric)
    path, keep = _conditional_path(mask, B, seq_len, min_length)
    blocks = backend if path else ("reference" if impl == "reference" else "torch")
    telemetry.record("conditional_attention", "ring " + blocks, site=site,
                     path=CONDITIONAL_PATHS[path] + f" [ring {blocks}]")
    cd = compute_dtype(q)
    lse_out = q.new_zeros(B, H, max(N, with_spare(clusters)), dtype=cd)
    if path:
        out, lse = ring_mod.ring_forward(q, k, v, mask, False, scale, layout, groups, mod, tag)
        assignments = torch.zeros(B, H, N, dtype=torch.int64, device=q.device)
        oc, pos, kt, vt = _improved_state(q, k, v, clusters, topk, seq_len)
    else:
        clustering_impl = "reference" if impl == "reference" else "auto"  # noqa: SIM108
        out, assignments, oc, lse, pos, kt, vt = ring_improved.forward(
            q, k, v, keep, scale, spec, topk, layout, groups, clustering_impl, tag)
    lse_out[..., :lse.shape[-1]] = lse
    return (out.to(q.dtype).contiguous(), assignments, torch.tensor(path, dtype=torch.int64),
            lse_out, oc.contiguous(), pos.contiguous(), kt.contiguous(), vt.contiguous())


def _improved_state(q, k, v, clusters: int, topk: int, seq_len: int, empty=torch.zeros):
    """(O^c, T positions, k_T, v_T) of the improved op, shaped for its outputs."""
    B, H = q.shape[:2]
    kk = min(topk, seq_len)
    clusters = with_spare(clusters)
    return (empty(B, H, clusters, v.shape[-1], dtype=compute_dtype(q), device=q.device),
            empty(B, H, clusters, kk, dtype=torch.int64, device=q.device),
            empty(B, H, clusters, kk, k.shape[-1], dtype=k.dtype, device=q.device),
            empty(B, H, clusters, kk, v.shape[-1], dtype=v.dtype, device=q.device))


@sp_ring_improved_clustered_attention.register_fake
def _(q, k, v, mask, scale, clusters, iterations, bits, seed, clustering, refine, metric, topk,
      min_length, seq_len, *args):
    B, H, N, _ = q.shape
    return (q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N, dtype=torch.int64),
            q.new_empty((), dtype=torch.int64),
            q.new_empty(B, H, max(N, with_spare(clusters)),
                        dtype=compute_dtype(q)),
            *_improved_state(q, k, v, clusters, topk, seq_len, empty=torch.empty))


@torch.library.custom_op("clusterfx::sp_ring_improved_clustered_attention_backward",
                         mutates_args=())
def sp_ring_improved_clustered_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor,
    assignments: Tensor, path: Tensor, lse: Tensor, oc: Tensor, pos: Tensor, kt: Tensor,
    vt: Tensor, scale: float, clusters: int, seq_len: int, zigzag: bool, ulysses: int,
    ring: int, ulysses_group: str, ring_group: str, timeout: float, impl: str, tag: str,
) -> tuple[Tensor, Tensor, Tensor]:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, _ = kernels(impl, q.device)
    B, N = q.shape[0], q.shape[2]
    dout = dout.contiguous()
    if int(path):
        dq, dk, dv = ring_mod.ring_backward(dout, q, k, v, out, lse[..., :N], mask, False,
                                            scale, layout, groups, mod, tag)
    else:
        _, keep = key_padding(mask, B, seq_len)
        clusters = with_spare(clusters)
        dq, dk, dv = ring_improved.backward(dout, q, k, v, keep, assignments, oc,
                                            lse[..., :clusters], pos, kt, vt, scale, clusters,
                                            layout, groups, mod, tag)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sp_ring_improved_clustered_attention_backward.register_fake
def _(dout, q, k, v, *args):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_improved(ctx, inputs, output):
    q, k, v, mask, scale, clusters = inputs[:6]
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.args = (scale, clusters, *inputs[14:23])  # *mesh, impl, tag


def _improved_backward(ctx, grad, *_grads_of_the_rest):
    q, k, v, mask, out, assignments, path, lse, oc, pos, kt, vt = ctx.saved_tensors
    dq, dk, dv = sp_ring_improved_clustered_attention_backward(
        grad, q, k, v, mask, out, assignments, path, lse, oc, pos, kt, vt, *ctx.args)
    return (dq, dk, dv) + (None,) * 21


sp_ring_improved_clustered_attention.register_autograd(_improved_backward,
                                                       setup_context=_setup_improved)
