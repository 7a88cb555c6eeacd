"""`clusterfx::causal_conditional_attention`: a rewritten site that may see a decoder, deciding
its path per call from the concrete inputs (no recompile at any length)::

    out, key_assign, query_assign, topk_idx, fam_assign, path = causal_conditional_attention(
        q, k, v, attn_mask, scale, method, *spec, topk, block, is_causal, causal_queries,
        min_length, impl, site)

Paths (``PATHS``), in order of precedence:

2. ``Nk < min_length`` → exact attention;
3. a mask that is neither key padding nor causal ∧ key padding (it varies over heads, holds a
   bias, or has another pattern), or causality with Nq ≠ Nk → exact attention;
0. causal self-attention — ``is_causal``, or a mask equal to ``(j <= i) ∧ keep_j`` as Hugging
   Face decoders build from ``attention_mask`` — → causal (i-)clustered attention;
5. ... of at most ``block`` queries → exact attention: every query's causal block then holds
   all its keys, so the causal variant would compute exact attention anyway (reported as such,
   not as an approximation);
1. key padding only, on a site whose query stream is causal (``causal_queries``: decoder
   cross-attention) → the causal variant with every key visible (``causal=False``): queries are
   never pooled;
4. key padding only, on a site that is neither → clustered attention of
   ``clusterfx::conditional_attention`` (queries pooled, as for encoders).

The path and implementation are counted for ``site`` (a telemetry tag). Gradients: the
discrete choices are held fixed; the backward is the opaque op
`clusterfx::causal_conditional_attention_backward` (so compiled training works too). No
gradient flows to ``attn_mask``; the lowering declines masks that require grad.

Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv); attn_mask broadcastable to
(B,H,Nq,Nk), bool (True = attend) or additive → out (B,H,Nq,Dv),
key_assign (B,Hk,E,Nk) with E = 1 + ceil(log2(ceil(Nq/block))) (one per epoch; path 1 uses
the first), query_assign (B,H,Nq), topk_idx (B,H,ceil(Nq/block),C,k), fam_assign (B,H,Nq) (the
pooled path's query clusters), path () — all int64, zeros where a path does not use them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clusterfx.ops.attention import dense_attention
from clusterfx.ops.causal_clustered import checks, guard, registration
from clusterfx.ops.causal_clustered.common import DrawRows
from clusterfx.ops.clustered import METHODS, conditional_forward
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common import telemetry
from clusterfx.ops.common.dispatch import resolve_impl

PATHS = ("approximate (causal)", "approximate (causal queries, all keys)",
         "exact: shorter than min_length", "exact: mask is neither causal nor key padding",
         "approximate", "exact: within one causal block")
_MASKED = -1e4  # additive values at or below this mean "masked"
_ROWS = 1024  # mask rows compared at a time


def mask_structure(mask: Tensor | None, batch: int, nq: int,
                   nk: int) -> tuple[str, Tensor | None]:
    """What an SDPA-style mask is: ("padding", keep (B,Nk) or None without a mask),
    ("causal_padding", keep) when it equals ``(j <= i) ∧ keep_j`` (Nq = Nk), else
    ("other", None). Reads the whole mask (in chunks of rows)."""
    if mask is None:
        return "padding", None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b|1, h|1, q|1, k|1)
    keep = m if m.dtype == torch.bool else m > _MASKED
    if m.dtype != torch.bool and not bool(torch.where(keep, m, 0).eq(0).all()):
        return "other", None  # a bias, not a mask
    if keep.shape[1] > 1 and not bool((keep == keep[:, :1]).all()):
        return "other", None  # varies over heads
    keep = keep[:, 0].expand(batch, keep.shape[2], nk)  # (B, q|1, Nk)
    pad = keep[:, -1]  # the last query sees every key a causal mask allows
    if keep.shape[1] == 1:
        return "padding", pad
    padding = causal = True
    for lo in range(0, nq, _ROWS):
        rows = keep[:, lo:lo + _ROWS]
        padding = padding and bool((rows == pad[:, None]).all())
        if causal and nq == nk:
            i = torch.arange(lo, lo + rows.shape[1], device=m.device)[:, None]
            tri = i >= torch.arange(nk, device=m.device)[None, :]
            causal = bool((rows == (tri & pad[:, None])).all())
        else:
            causal = False
        if not (padding or causal):
            return "other", None
    return ("causal_padding" if causal else "padding"), pad.contiguous()


def _dense(q, k, v, mask, is_causal, scale):
    return dense_attention(q, k, v, mask, 0.0, is_causal, scale, q.shape[1] != k.shape[1])


def _choose(q, k, attn_mask, is_causal, causal_queries, min_length, block):
    """(path, key keep) for one call."""
    B, _, Nq = q.shape[:3]
    Nk = k.shape[2]
    if Nk < min_length:
        return 2, None
    kind, keep = mask_structure(attn_mask, B, Nq, Nk)
    if kind == "other":
        return 3, None
    if kind == "causal_padding" or is_causal:
        if Nq != Nk:
            return 3, None
        return (5 if Nq <= block else 0), keep
    return (1 if causal_queries else 4), keep


def _topk(method: str, topk: int) -> int:
    return topk if method == "improved_clustered" else 0


@torch.library.custom_op("clusterfx::causal_conditional_attention", mutates_args=())
def causal_conditional_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, method: str,
    clusters: int, iterations: int, bits: int, seed: int, clustering: str, refine: int,
    metric: str, topk: int, block: int, is_causal: bool, causal_queries: bool,
    min_length: int, impl: str, site: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return causal_conditional_forward(q, k, v, attn_mask, scale, method, clusters, iterations,
                                      bits, seed, clustering, refine, metric, topk, block,
                                      is_causal, causal_queries, min_length, impl, site)


def causal_conditional_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                               scale: float, method: str, clusters: int, iterations: int,
                               bits: int, seed: int, clustering: str, refine: int, metric: str,
                               topk: int, block: int, is_causal: bool, causal_queries: bool,
                               min_length: int, impl: str, site: str,
                               draw_rows: DrawRows | None = None):
    """The kernel of `causal_conditional_attention`; with ``draw_rows``
    (``common.draw_plan``) every path's clustering takes the random draw of these key and
    query rows of a larger batch (sequence parallelism: a Ulysses rank's heads)."""
    if method not in METHODS:
        raise ValueError(f"method ({method!r}) must be one of {METHODS}")
    spec = ClusteringSpec.from_args(clusters, iterations, bits, seed, clustering, refine, metric)
    checks.check_topk(topk)
    checks.check_block(block)
    path, keep = _choose(q, k, attn_mask, is_causal, causal_queries, min_length, block)
    ka, qa, idx = (t.zero_() for t in registration.fake_choices(
        q, k, clusters, _topk(method, topk), block, True))
    fam = torch.zeros(q.shape[:3], dtype=torch.int64, device=q.device)
    if path in (2, 3, 5):
        telemetry.record("causal_conditional_attention", "dense", site=site, path=PATHS[path])
        out = _dense(q, k, v, attn_mask, is_causal, scale)
    elif path in (0, 1):
        backend = registration.resolve(impl)
        telemetry.record("causal_conditional_attention", backend, site=site,
                         path=f"{PATHS[path]} [{backend}]")
        out, ka_run, qa, idx = registration.run(q, k, v, keep, scale, spec,
                                                _topk(method, topk), block, path == 0, backend,
                                                draw_rows)
        ka[:, :, :ka_run.shape[2]] = ka_run  # one epoch (slot 0) when every key is visible
    else:
        backend = resolve_impl(impl, q.device)
        telemetry.record("causal_conditional_attention", backend, site=site,
                         path=f"{PATHS[path]} [{backend}]")
        if draw_rows is None:
            out, fam, *_ = torch.ops.clusterfx.conditional_attention(
                q, k, v, attn_mask, scale, method, *spec.to_args(), topk, 0, impl, "")
        else:  # the query rows' draw (the pooled clustering draws per query row)
            out, fam, *_ = conditional_forward(q, k, v, attn_mask, scale, method,
                                               *spec.to_args(), topk, 0, impl, "",
                                               draw_rows=(draw_rows[2], draw_rows[3]))
    return (out.contiguous(), ka, qa, idx, fam,
            torch.tensor(path, dtype=torch.int64, device=q.device))


@causal_conditional_attention.register_fake
def _(q, k, v, attn_mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
      metric, topk, block, is_causal, causal_queries, min_length, impl, site):
    ka, qa, idx = registration.fake_choices(q, k, clusters, _topk(method, topk), block, True)
    return (q.new_empty(*q.shape[:3], v.shape[-1]), ka, qa, idx,
            q.new_empty(q.shape[:3], dtype=torch.int64), q.new_empty((), dtype=torch.int64))


@torch.library.custom_op("clusterfx::causal_conditional_attention_backward", mutates_args=())
def causal_conditional_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_assign: Tensor,
    query_assign: Tensor, topk_idx: Tensor, fam_assign: Tensor, path: Tensor, scale: float,
    method: str, clusters: int, topk: int, block: int, is_causal: bool, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    p = int(path)
    if p == 4:
        no_idx = torch.zeros(0, dtype=torch.int64, device=q.device)  # i-clustered: recompute
        return torch.ops.clusterfx.conditional_attention_backward(
            grad, q, k, v, attn_mask, fam_assign, torch.zeros((), dtype=torch.int64), no_idx,
            scale, method, clusters, topk, impl)
    if p in (2, 3, 5):
        fn = lambda q_, k_, v_: _dense(q_, k_, v_, attn_mask, is_causal, scale)  # noqa: E731
    else:
        _, keep = mask_structure(attn_mask, q.shape[0], q.shape[2], k.shape[2])
        ka = key_assign if p == 0 else key_assign[:, :, :1]
        fn = registration.differentiable(q, k, v, keep, ka, query_assign, topk_idx, clusters,
                                         scale, block, p == 0, impl)
    _, vjp = torch.func.vjp(fn, q, k, v)
    dq, dk, dv = vjp(grad.contiguous())
    if guard.is_degenerate(q, k, v):  # empty gradients may be views of one another
        return tuple(t.clone(memory_format=torch.contiguous_format) for t in (dq, dk, dv))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@causal_conditional_attention_backward.register_fake
def _(grad, q, k, v, attn_mask, key_assign, query_assign, topk_idx, fam_assign, path, scale,
      method, clusters, topk, block, is_causal, impl):
    fmt = torch.contiguous_format
    return (torch.empty_like(q, memory_format=fmt), torch.empty_like(k, memory_format=fmt),
            torch.empty_like(v, memory_format=fmt))


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, method, clusters, *_spec, topk, block, is_causal, _cq, _ml, impl, \
        _site = inputs
    ctx.save_for_backward(q, k, v, mask, *output[1:])
    ctx.args = (scale, method, clusters, topk, block, is_causal, impl)


def _backward(ctx, grad, *_grads_of_choices):
    dq, dk, dv = torch.ops.clusterfx.causal_conditional_attention_backward(
        grad, *ctx.saved_tensors, *ctx.args)
    return (dq, dk, dv) + (None,) * 17


causal_conditional_attention.register_autograd(_backward, setup_context=_setup)
