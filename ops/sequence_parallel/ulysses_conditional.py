"""A clustered site under Ulysses alone (r = 1) with one process's random draw (namespace
``clusterfx``; ``*mesh`` as in `registration`):

    sp_ulysses_conditional_attention(q, k, v, mask, scale, method, *spec (7), topk,
                                     min_length, *mesh, impl, site)
        -> (out, assignments, path, idx)                  (as `conditional_attention`)
        bwd: `conditional_attention_backward` (nothing crosses ranks: every head is local)

After the all-to-all a Ulysses rank holds the whole sequence of H/u heads and runs exactly
`conditional_attention` on them (the same paths, telemetry labels, non-finite rules, fused
kernels for the clustering and for the attention given the assignments), except that the
clustering's random choices are those one process draws for all B·H rows, of which the rank
keeps the rows of its heads (`global_clustered_clustering.head_rows`; the hyperplanes are
shared, the k-means plan is per row). So with a fixed seed its assignments are one process's,
and its output and gradients equal one process's up to rounding. No communication.

    sp_ulysses_causal_conditional_attention(q, k, v, mask, scale, method, *spec (7), topk,
        block, is_causal, causal_queries, min_length, kv_heads, *mesh, impl, site)
        -> `causal_conditional_attention`'s six outputs; bwd: its backward op

does the same for the causal clustered op (what decoders lower to): its key priorities are
the rows of the rank's K/V heads among one process's B·Hk (a replicated head: its original
head's row, `kv_head_rows`), its query priorities those of its query heads, and its pooled path
(4) takes `conditional_attention`'s draw rows.

What the draw cannot make equal: a kept key or value that is not finite makes one process run
exact attention for every head, here only for the heads of the rank that holds it (each rank
sees its own heads' keys; the other head groups stay clustered). And on the causal path with
the attention metric, when K/V heads are replicated (Hk < u) a rank holds only H/u of the
H/Hk query heads whose second moment is the key clustering's metric: its key clusters then
differ from one process's (the query side and everything with u | Hk or the Euclidean metric
are equal).

Shapes: q (B, h, S, D), k (B, hk, S, D), v (B, hk, S, Dv) (h = H/u heads, hk = Hk·rep/u),
mask over all S key positions → out (B, h, S, Dv), assignments (B, h, S) int64, path ()
int64, idx (B, h, C' + 1, min(topk, S)) int64 (`conditional_attention`'s).
"""

from __future__ import annotations

import torch
from torch import Tensor

from clusterfx.ops.causal_clustered import conditional as causal_single
from clusterfx.ops.causal_clustered import registration as causal_registration
from clusterfx.ops.clustered import conditional as single
from clusterfx.ops.sequence_parallel.global_clustered_clustering import head_rows
from clusterfx.ops.sequence_parallel.registration import unpack


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
    return single.conditional_forward(q, k, v, mask, scale, method, clusters, iterations, bits,
                                      seed, clustering, refine, metric, topk, min_length, impl,
                                      site, draw_rows=rows)


@sp_ulysses_conditional_attention.register_fake
def _(q, k, v, mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
      metric, topk, min_length, *mesh_impl_site):
    return (q.new_empty(*q.shape[:3], v.shape[-1]),
            q.new_empty(q.shape[:3], dtype=torch.int64), q.new_empty((), dtype=torch.int64),
            q.new_empty(single._idx_shape(q, k, clusters, topk), dtype=torch.int64))


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, method, clusters = inputs[:7]
    topk, impl = inputs[13], inputs[22]
    ctx.save_for_backward(q, k, v, mask, output[1], output[2], output[3])
    ctx.args = (scale, method, clusters, topk, impl)


def _backward(ctx, grad, _grad_assignments, _grad_path, _grad_idx):
    q, k, v, mask, assignments, path, idx = ctx.saved_tensors
    dq, dk, dv = torch.ops.clusterfx.conditional_attention_backward(
        grad, q, k, v, mask, assignments, path, idx, *ctx.args)
    return (dq, dk, dv) + (None,) * 21


sp_ulysses_conditional_attention.register_autograd(_backward, setup_context=_setup)


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
    return causal_single.causal_conditional_forward(
        q, k, v, mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
        metric, topk, block, is_causal, causal_queries, min_length, impl, site,
        draw_rows=rows)


@sp_ulysses_causal_conditional_attention.register_fake
def _(q, k, v, mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
      metric, topk, block, is_causal, causal_queries, min_length, *mesh_impl_site):
    ka, qa, idx = causal_registration.fake_choices(
        q, k, clusters, topk if method == "improved_clustered" else 0, block, True)
    return (q.new_empty(*q.shape[:3], v.shape[-1]), ka, qa, idx,
            q.new_empty(q.shape[:3], dtype=torch.int64), q.new_empty((), dtype=torch.int64))


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
