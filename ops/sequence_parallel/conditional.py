"""torch.library registration of global clustered attention over the mesh, the conditional op
of a clustered site (namespace ``clusterfx``; ``*mesh`` as in `registration`); and, at the end,
the clustered sites under Ulysses alone with one process's random draw
(`sp_ulysses_conditional_attention`, `sp_ulysses_causal_conditional_attention`):

    sp_global_clustered_attention(q, k, v, mask, scale, *spec (7), min_length, *mesh, impl,
                                  tag, site) -> (out, assignments, path, lse, qc, oc, counts)
        bwd: sp_global_clustered_attention_backward(dout, q, k, v, mask, out, assignments,
                 path, lse, qc, oc, counts, scale, *mesh, impl, tag) -> (dq, dk, dv)

Per call, as `conditional_attention` decides: S ≥ `min_length` with a key-padding mask (or
none) runs global clustered attention (`global_clustered.py`: clusters equal to one process's
with the same seed, centroids attending to local keys, log-sum-exp merged by all-reduces);
otherwise exact ring attention (K/V rotate). ``spec.clusters`` is clamped to S with the
warning one process gives. Works for any (u, r): with r = 1 (Ulysses alone) nothing crosses
the ring and the draw of all H heads still makes it one process's clustering.

Shapes: q (B, h, Nb, D), k, v (B, hk, Nb, ·) after the all-to-all → out (B, h, Nb, Dv),
assignments (B, h, Nb) int64 in [0, C'] (C': the spare cluster of excluded queries; zeros on
the exact path), path () int64 (index into `PATHS`), lse (B, h, max(Nb, C'+1)) (the
centroids' first C'+1 or the queries' first Nb), qc (B, h, C'+1, D), oc (B, h, C'+1, Dv),
counts (B, h, C'+1) in the compute dtype (zeros on the exact path), C' = min(clusters, S).

A kept key or value that is not finite anywhere on the ring makes the call exact ring
attention (path 3), as one process runs exact attention then. (That flag is summed over the
ring only: under Ulysses a head group holding such a key runs exact while the other head
groups stay clustered, where one process would make every head exact.)
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from clusterfx.ops.causal_clustered import causal_conditional_forward
from clusterfx.ops.clustered import conditional_forward, key_padding
from clusterfx.ops.clustering import ClusteringSpec, attention_metric
from clusterfx.ops.common import telemetry
from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.sequence_parallel import global_clustered
from clusterfx.ops.sequence_parallel.common import ring as ring_mod
from clusterfx.ops.sequence_parallel.common.clusters import ring_metric
from clusterfx.ops.sequence_parallel.global_clustered_clustering import head_rows
from clusterfx.ops.sequence_parallel.registration import CONDITIONAL_PATHS, kernels, unpack

PATHS = (*CONDITIONAL_PATHS, "exact: non-finite keys or values")


def _clamped(spec: ClusteringSpec, seq_len: int) -> ClusteringSpec:
    if spec.clusters <= seq_len:
        return spec
    telemetry.event("clusters_clamped")
    warnings.warn(f"clusters ({spec.clusters}) exceeds the number of queries ({seq_len}); "
                  f"using {seq_len} clusters", stacklevel=3)
    return dataclasses.replace(spec, clusters=seq_len)


@torch.library.custom_op("clusterfx::sp_global_clustered_attention", mutates_args=())
def sp_global_clustered_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, clusters: int,
    iterations: int, bits: int, seed: int, clustering: str, refine: int, metric: str,
    min_length: int, seq_len: int, zigzag: bool, ulysses: int, ring: int, ulysses_group: str,
    ring_group: str, timeout: float, impl: str, tag: str, site: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, backend = kernels(impl, q.device)
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    spec = ClusteringSpec(clusters, iterations, bits, seed, clustering, refine, metric)
    path, keep = 1, None
    if seq_len >= min_length:
        ok, keep = key_padding(mask, B, seq_len)
        path = 0 if ok else 2
    C = min(clusters, seq_len) + 1  # the centroids and the spare cluster
    cd = compute_dtype(q)
    found = None
    if not path:
        def metric_of(keys: Tensor) -> Tensor:
            if groups.ring == 1:  # the whole sequence is here: one process's own arithmetic
                return attention_metric(keys, H, keep)
            return ring_metric(keys, H, keep, layout, groups, tag)

        found = global_clustered.forward(q, k, v, keep, scale, _clamped(spec, seq_len), layout,
                                         groups, mod, tag, metric_of,
                                         "reference" if impl == "reference" else "auto")
        path = 0 if found is not None else 3
    telemetry.record("conditional_attention", "ring " + backend, site=site,
                     path=PATHS[path] + f" [ring {backend}, global clustering]")
    if path:
        out, lse = ring_mod.ring_forward(q, k, v, mask, False, scale, layout, groups, mod, tag)
        assignments = torch.zeros(B, H, N, dtype=torch.int64, device=q.device)
        qc, oc, counts = (q.new_zeros(B, H, C, n, dtype=cd) for n in (D, Dv, 1))
        counts = counts[..., 0]
    else:
        out, assignments, qc, oc, lse, counts = found
    lse_out = q.new_zeros(B, H, max(N, C), dtype=cd)
    lse_out[..., :lse.shape[-1]] = lse
    return (out.to(q.dtype).contiguous(), assignments.contiguous(),
            torch.tensor(path, dtype=torch.int64), lse_out, qc.contiguous(), oc.contiguous(),
            counts.contiguous())


@sp_global_clustered_attention.register_fake
def _(q, k, v, mask, scale, clusters, iterations, bits, seed, clustering, refine, metric,
      min_length, seq_len, *args):
    B, H, N, D = q.shape
    C = min(clusters, seq_len) + 1
    cd = compute_dtype(q)
    return (q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N, dtype=torch.int64),
            q.new_empty((), dtype=torch.int64), q.new_empty(B, H, max(N, C), dtype=cd),
            q.new_empty(B, H, C, D, dtype=cd), q.new_empty(B, H, C, v.shape[-1], dtype=cd),
            q.new_empty(B, H, C, dtype=cd))


@torch.library.custom_op("clusterfx::sp_global_clustered_attention_backward", mutates_args=())
def sp_global_clustered_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor,
    assignments: Tensor, path: Tensor, lse: Tensor, qc: Tensor, oc: Tensor, counts: Tensor,
    scale: float, seq_len: int, zigzag: bool, ulysses: int, ring: int, ulysses_group: str,
    ring_group: str, timeout: float, impl: str, tag: str,
) -> tuple[Tensor, Tensor, Tensor]:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, _ = kernels(impl, q.device)
    B, _, N, _ = out.shape
    dout = dout.contiguous()
    if int(path):
        dq, dk, dv = ring_mod.ring_backward(dout, q, k, v, out, lse[..., :N], mask, False,
                                            scale, layout, groups, mod, tag)
    else:
        _, keep = key_padding(mask, B, seq_len)
        C = qc.shape[2]
        dq, dk, dv = global_clustered.backward(dout, k, v, keep, assignments, qc, oc,
                                               lse[..., :C], counts, scale, layout, groups,
                                               mod, q.dtype, tag)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sp_global_clustered_attention_backward.register_fake
def _(dout, q, k, v, *args):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup(ctx, inputs, output):
    q, k, v, mask, scale = inputs[:5]
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.args = (scale, *inputs[13:22])  # *mesh, impl, tag


def _backward(ctx, grad, *_grads_of_other_outputs):
    q, k, v, mask, out, assignments, path, lse, qc, oc, counts = ctx.saved_tensors
    dq, dk, dv = sp_global_clustered_attention_backward(
        grad, q, k, v, mask, out, assignments, path, lse, qc, oc, counts, *ctx.args)
    return (dq, dk, dv) + (None,) * 20


sp_global_clustered_attention.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------- Ulysses alone: one process's draw
# A clustered site under Ulysses alone (r = 1) with one process's random draw (namespace
# ``clusterfx``; ``*mesh`` as in `registration`):
#
#     sp_ulysses_conditional_attention(q, k, v, mask, scale, method, *spec (7), topk,
#                                      min_length, *mesh, impl, site)
#         -> (out, assignments, path, idx)                  (as `conditional_attention`)
#         bwd: `conditional_attention_backward` (nothing crosses ranks: every head is local)
#
# After the all-to-all a Ulysses rank holds the whole sequence of H/u heads and runs exactly
# `conditional_attention` on them (the same paths, telemetry labels, non-finite rules, fused
# kernels for the clustering and for the attention given the assignments), except that the
# clustering's random choices are those one process draws for all B·H rows, of which the rank
# keeps the rows of its heads (`global_clustered_clustering.head_rows`; the hyperplanes are
# shared, the k-means plan is per row). So with a fixed seed its assignments are one process's,
# and its output and gradients equal one process's up to rounding. No communication.
#
#     sp_ulysses_causal_conditional_attention(q, k, v, mask, scale, method, *spec (7), topk,
#         block, is_causal, causal_queries, min_length, kv_heads, *mesh, impl, site)
#         -> `causal_conditional_attention`'s six outputs; bwd: its backward op
#
# does the same for the causal clustered op (what decoders lower to): its key priorities are
# the rows of the rank's K/V heads among one process's B·Hk (a replicated head: its original
# head's row, `kv_head_rows`), its query priorities those of its query heads, and its pooled path
# (4) takes `conditional_attention`'s draw rows.
#
# What the draw cannot make equal: a kept key or value that is not finite makes one process run
# exact attention for every head, here only for the heads of the rank that holds it (each rank
# sees its own heads' keys; the other head groups stay clustered). And on the causal path with
# the attention metric, when K/V heads are replicated (Hk < u) a rank holds only H/u of the
# H/Hk query heads whose second moment is the key clustering's metric: its key clusters then
# differ from one process's (the query side and everything with u | Hk or the Euclidean metric
# are equal).
#
# Shapes: q (B, h, S, D), k (B, hk, S, D), v (B, hk, S, Dv) (h = H/u heads, hk = Hk·rep/u),
# mask over all S key positions → out (B, h, S, Dv), assignments (B, h, S) int64, path ()
# int64, idx (B, h, C' + 1, min(topk, S)) int64 (`conditional_attention`'s).


@torch.library.custom_op("clusterfx::sp_ulysses_conditional_attention", mutates_args=())
def sp_ulysses_conditional_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, method: str,
    clusters: int, iterations: int, bits: int, seed: int, clustering: str, refine: int,
    metric: str, topk: int, min_length: int, seq_len: int, zigzag: bool, ulysses: int,
    ring: int, ulysses_group: str, ring_group: str, timeout: float, impl: str, site: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    if groups.ring != 1:
        raise ValueError(f"sp_ulysses_conditional_attention runs under Ulysses alone; got a "
                         f"ring of {groups.ring} ranks")
    rows = head_rows(q.shape[0], q.shape[1], groups, q.device)
    return conditional_forward(q, k, v, mask, scale, method, clusters, iterations, bits,
                                      seed, clustering, refine, metric, topk, min_length, impl,
                                      site, draw_rows=rows)


@sp_ulysses_conditional_attention.register_fake
def _(q, k, v, mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
      metric, topk, min_length, *mesh_impl_site):
    return torch.ops.clusterfx.conditional_attention(  # its fake: the same outputs
        q, k, v, mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
        metric, topk, min_length, *mesh_impl_site[-2:])


def _setup_ulysses(ctx, inputs, output):
    q, k, v, mask, scale, method, clusters = inputs[:7]
    topk, impl = inputs[13], inputs[22]
    ctx.save_for_backward(q, k, v, mask, output[1], output[2], output[3])
    ctx.args = (scale, method, clusters, topk, impl)


def _backward_ulysses(ctx, grad, _grad_assignments, _grad_path, _grad_idx):
    q, k, v, mask, assignments, path, idx = ctx.saved_tensors
    dq, dk, dv = torch.ops.clusterfx.conditional_attention_backward(
        grad, q, k, v, mask, assignments, path, idx, *ctx.args)
    return (dq, dk, dv) + (None,) * 21


sp_ulysses_conditional_attention.register_autograd(_backward_ulysses,
                                                       setup_context=_setup_ulysses)


# ------------------------------------------------------------------- the causal clustered op


def kv_head_rows(batch: int, kv_local: int, kv_heads: int, groups) -> tuple[int, Tensor]:
    """(B·Hk, rows): the one-process K/V rows of this rank's kv_local K/V heads. Before the
    all-to-all the Hk heads are replicated ``rep`` times when Hk < u (`kv_replication`), so
    local head i is replicated head j·kv_local + i, i.e. original head (j·kv_local + i) // rep."""
    rep = groups.ulysses // kv_heads if kv_heads < groups.ulysses else 1
    heads = (groups.ulysses_rank() * kv_local + torch.arange(kv_local)) // rep
    return batch * kv_heads, (torch.arange(batch)[:, None] * kv_heads + heads).reshape(-1)


@torch.library.custom_op("clusterfx::sp_ulysses_causal_conditional_attention",
                         mutates_args=())
def sp_ulysses_causal_conditional_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, method: str,
    clusters: int, iterations: int, bits: int, seed: int, clustering: str, refine: int,
    metric: str, topk: int, block: int, is_causal: bool, causal_queries: bool,
    min_length: int, kv_heads: int, seq_len: int, zigzag: bool, ulysses: int, ring: int,
    ulysses_group: str, ring_group: str, timeout: float, impl: str, site: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`causal_conditional_attention` on this rank's heads with one process's draw (module
    docstring); ``kv_heads``: the model's K/V heads Hk (before any replication)."""
    _, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    if groups.ring != 1:
        raise ValueError(f"sp_ulysses_causal_conditional_attention runs under Ulysses alone; "
                         f"got a ring of {groups.ring} ranks")
    B = q.shape[0]
    rows = (*kv_head_rows(B, k.shape[1], kv_heads, groups), *head_rows(B, q.shape[1], groups))
    return causal_conditional_forward(
        q, k, v, mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
        metric, topk, block, is_causal, causal_queries, min_length, impl, site,
        draw_rows=rows)


@sp_ulysses_causal_conditional_attention.register_fake
def _(q, k, v, mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
      metric, topk, block, is_causal, causal_queries, min_length, kv_heads, *mesh_impl_site):
    return torch.ops.clusterfx.causal_conditional_attention(  # its fake: the same outputs
        q, k, v, mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
        metric, topk, block, is_causal, causal_queries, min_length, *mesh_impl_site[-2:])


def _setup_causal(ctx, inputs, output):
    q, k, v, mask, scale, method, clusters = inputs[:7]
    topk, block, is_causal, impl = inputs[13], inputs[14], inputs[15], inputs[26]
    ctx.save_for_backward(q, k, v, mask, *output[1:])
    ctx.args = (scale, method, clusters, topk, block, is_causal, impl)


def _backward_causal(ctx, grad, *_grads_of_choices):
    dq, dk, dv = torch.ops.clusterfx.causal_conditional_attention_backward(
        grad, *ctx.saved_tensors, *ctx.args)
    return (dq, dk, dv) + (None,) * 25


sp_ulysses_causal_conditional_attention.register_autograd(_backward_causal,
                                                          setup_context=_setup_causal)
