"""`clusterfx::conditional_attention`: a rewritten attention site, deciding its path per call.

    out, assignments, path, idx = conditional_attention(q, k, v, attn_mask, scale, method,
                                                        *spec, topk, min_length, impl, site)

(``*spec``: the fields of a ``ClusteringSpec``.) Per call, on the concrete inputs (so no
recompile at any new length):
- `Nk < min_length` (the `conditional-full` composition of the paper's library, and `Auto`'s
  crossover from the cost model) → exact attention (path 1);
- an `attn_mask` that is not a key-padding mask (it varies over queries or heads, or an additive
  mask holds values other than 0 and <= -1e4) → exact attention (path 2);
- a zero-size dimension → exact attention's answer (empty, or zeros with no key; path 3);
- otherwise `method` ("clustered" | "improved_clustered") with the mask as key padding (path 0).
The path taken and the implementation are counted for `site` (a telemetry tag: the compile
that emitted the op owns the counts; see `clusterfx.ops.common.telemetry`).

Gradients: the discrete choices (path, cluster assignments, top-k indices) are held fixed; the
backward runs inside `clusterfx::conditional_attention_backward`, an opaque op (so compiled
training works too): the fused clustered backward kernel, or the chosen path's differentiable
part recomputed and differentiated with `torch.func.vjp` (`registration.attention_grads`).
No gradient flows to `attn_mask`; the lowering declines masks that require grad.

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), H a multiple of Hk; attn_mask
broadcastable to (B, H, Nq, Nk), bool (True = attend) or additive → out (B, H, Nq, Dv),
assignments (B, H, Nq) int64 (zeros on exact paths), path () int64, idx (B, H, C' + 1,
min(topk, Nk)) int64 with C' = min(C, Nq): i-clustered's top-k keys per cluster and the spare
cluster's row (zeros otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from clusterfx.ops.attention import dense_attention
from clusterfx.ops.clustered import checks, registration
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common import telemetry
from clusterfx.ops.common.degenerate import degenerate_attention, is_degenerate

PATHS = ("approximate", "exact: shorter than min_length", "exact: mask is not key padding",
         "exact: empty input")
METHODS = ("clustered", "improved_clustered")
_MASKED = -1e4  # additive values at or below this mean "masked"


def key_padding(mask: Tensor | None, batch: int, keys: int) -> tuple[bool, Tensor | None]:
    """(is key padding, keep (B, Nk) bool) for an SDPA-style mask; keep is None without mask."""
    if mask is None:
        return True, None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b|1, h|1, q|1, Nk|1)
    keep = m if m.dtype == torch.bool else m > _MASKED
    if m.dtype != torch.bool and not bool((m[keep] == 0).all()):
        return False, None  # a bias, not a mask
    first = keep[:, :1, :1, :]
    if not bool((keep == first).all()):
        return False, None  # varies over heads or queries
    return True, first.reshape(first.shape[0], first.shape[-1]).expand(batch, keys)


def _idx_shape(q: Tensor, k: Tensor, clusters: int, topk: int) -> tuple:
    """i-clustered's top-k indices: one row per (clamped) cluster and the spare one."""
    return (*q.shape[:2], checks.spare_clusters(clusters, q), min(topk, k.shape[2]))


def _dense(q, k, v, mask, scale):
    if is_degenerate(q, k, v):  # a zero-size dim: empty output, or zeros with no key
        return degenerate_attention(q, k, v, mask, False, scale)
    return dense_attention(q, k, v, mask, 0.0, False, scale, q.shape[1] != k.shape[1])


@torch.library.custom_op("clusterfx::conditional_attention", mutates_args=())
def conditional_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, method: str,
    clusters: int, iterations: int, bits: int, seed: int, clustering: str, refine: int,
    metric: str, topk: int, min_length: int, impl: str, site: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return conditional_forward(q, k, v, attn_mask, scale, method, clusters, iterations, bits,
                               seed, clustering, refine, metric, topk, min_length, impl, site)


def conditional_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                        scale: float, method: str, clusters: int, iterations: int, bits: int,
                        seed: int, clustering: str, refine: int, metric: str, topk: int,
                        min_length: int, impl: str, site: str,
                        draw_rows: tuple[int, Tensor] | None = None):
    """The kernel of `conditional_attention` (its outputs, paths and telemetry); with
    ``draw_rows`` (``clustering.cluster_queries``) the clustering takes the random choices of
    these B·H rows of a larger batch (sequence parallelism: a Ulysses rank's heads)."""
    if method not in METHODS:
        raise ValueError(f"method ({method!r}) must be one of {METHODS}")
    spec = ClusteringSpec.from_args(clusters, iterations, bits, seed, clustering, refine, metric)
    batch, heads, nq = q.shape[:3]
    assignments = torch.zeros(batch, heads, nq, dtype=torch.int64, device=q.device)
    idx = torch.zeros(_idx_shape(q, k, clusters, topk), dtype=torch.int64, device=q.device)
    path = 1
    if is_degenerate(q, k, v):
        path = 3
    elif k.shape[2] >= min_length:
        ok, keep = key_padding(attn_mask, batch, k.shape[2])
        path = 0 if ok else 2
    backend = "dense" if path else registration.resolve(impl, q.device)
    telemetry.record("conditional_attention", backend, site=site,
                     path=PATHS[path] + ("" if path else f" [{backend}]"))
    if path:
        out = _dense(q, k, v, attn_mask, scale)
    elif draw_rows is not None:  # the ops' own code, with the clustering's rows of the draw
        checks.check_attention_inputs(q, k, v, keep, scale)
        if method != "clustered":
            checks.check_topk(topk)
        out, assignments, found = registration.run_clustered(
            f"{method}_attention", q, k, v, keep, scale, spec, impl,
            None if method == "clustered" else topk, draw_rows)
        idx = idx if found is None else found
    elif method == "clustered":
        out, assignments = torch.ops.clusterfx.clustered_attention(
            q, k, v, keep, scale, *spec.to_args(), impl)
    else:
        out, assignments, idx = torch.ops.clusterfx.improved_clustered_attention(
            q, k, v, keep, scale, *spec.to_args(), topk, impl)
    # contiguous, as the fake kernel promises (SDPA may return a transposed layout)
    return (out.contiguous(), assignments, torch.tensor(path, dtype=torch.int64),
            idx.contiguous())


@conditional_attention.register_fake
def _(q, k, v, attn_mask, scale, method, clusters, iterations, bits, seed, clustering, refine,
      metric, topk, min_length, impl, site):
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    return (out, q.new_empty(q.shape[:3], dtype=torch.int64),
            q.new_empty((), dtype=torch.int64),
            q.new_empty(_idx_shape(q, k, clusters, topk), dtype=torch.int64))


@torch.library.custom_op("clusterfx::conditional_attention_backward", mutates_args=())
def conditional_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
    assignments: Tensor, path: Tensor, idx: Tensor, scale: float, method: str, clusters: int,
    topk: int, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    # Autograd is off inside an op's kernel; torch.func.vjp differentiates regardless.
    if int(path):
        fn = lambda q_, k_, v_: _dense(q_, k_, v_, attn_mask, scale)  # noqa: E731
        _, vjp = torch.func.vjp(fn, q, k, v)
        dq, dk, dv = vjp(grad.contiguous())
    else:
        _, keep = key_padding(attn_mask, q.shape[0], k.shape[2])
        clusters = checks.spare_clusters(clusters, q)  # as the forward used
        dq, dk, dv = registration.attention_grads(
            impl, grad, q, k, v, assignments, clusters, keep, scale,
            # an empty idx (a caller without the forward's selection): top-k recomputed
            *((None, None) if method == "clustered" else
              (min(topk, k.shape[2]), idx if idx.numel() else None)))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@conditional_attention_backward.register_fake
def _(grad, q, k, v, attn_mask, assignments, path, idx, scale, method, clusters, topk, impl):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, method, clusters, *_spec, topk, _min_length, impl, _site = inputs
    ctx.save_for_backward(q, k, v, mask, output[1], output[2], output[3])
    ctx.args = (scale, method, clusters, topk, impl)


def _backward(ctx, grad, _grad_assignments, _grad_path, _grad_idx):
    q, k, v, mask, assignments, path, idx = ctx.saved_tensors
    dq, dk, dv = torch.ops.clusterfx.conditional_attention_backward(
        grad, q, k, v, mask, assignments, path, idx, *ctx.args)
    return (dq, dk, dv) + (None,) * 14


conditional_attention.register_autograd(_backward, setup_context=_setup)
