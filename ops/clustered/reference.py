"""Reference (oracle) clustered and improved-clustered attention, given the query clusters.

Plain eager torch that materialises every matrix, float64 for float64 inputs and float32
otherwise, differentiable by ordinary autograd (assignments and top-k indices are integers, so
they get no gradient). Tests compare every other backend with this module in float64.

Notation (reference notes §1.1–1.2): queries Q (Nq×D), keys K (Nk×D), values V (Nk×Dv),
assignment a(i) ∈ [0, C), one-hot M (Nq×C), member counts n_j, scale s, key bias β_l ∈ {0, -inf}.

* centroids ``Q^c_j = (1/n_j) Σ_{i: a(i)=j} q_i`` (an empty cluster's centroid is 0, unused);
* centroid attention ``A^c = softmax(s·Q^c Kᵀ + β)`` (C×Nk), clustered attention
  ``A_i = A^c_{a(i)}`` so ``O = M A^c V``;
* improved: ``T_j`` = the top-k keys of row j of ``s·Q^c Kᵀ + β``, ``m̂_j = Σ_{l∈T_j} A^c_jl``;
  for query i in cluster j, ``A^t_il = m̂_j softmax_{l∈T_j}(s·q_i·k_l + β_l)`` on ``T_j`` and
  ``A^t_il = A^c_jl`` elsewhere; ``O = A^t V``.

A softmax row whose keys are all padded is defined as all zeros (no NaN), so a batch element
with no valid key gets a zero output. GQA: query head h reads key/value head ``h // (H/Hk)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfx.ops.common.checks import compute_dtype


def safe_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row that is entirely ``-inf`` gives zeros, not NaN."""
    m = logits.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hk, N, E) → (B, H, N, E): query head h reads key/value head h // (H / Hk)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _scores(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """``s·Q Kᵀ + β``. Shapes: q (B,H,L,D), k (B,H,Nk,D), mask (B,Nk) → (B,H,L,Nk)."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return logits


def _centroids(q: torch.Tensor, assignments: torch.Tensor,
               clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot membership M (B,H,Nq,C) and centroid means Q^c = diag(1/n) Mᵀ Q (B,H,C,D)."""
    one_hot = F.one_hot(assignments, clusters).to(q.dtype)
    counts = one_hot.sum(-2)
    return one_hot, (one_hot.transpose(-1, -2) @ q) / counts.clamp(min=1)[..., None]


def clustered_attention_weights(q, k, assignments, clusters, key_padding_mask=None, scale=None):
    """The clustered attention matrix ``A = M A^c``.

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), assignments (B,H,Nq) int64, mask (B,Nk) bool
    → (B,H,Nq,Nk) in the compute dtype.
    """
    cdt = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = q.to(cdt), _expand_heads(k.to(cdt), q.shape[1])
    one_hot, qc = _centroids(q, assignments, clusters)
    return one_hot @ safe_softmax(_scores(qc, k, key_padding_mask, scale))


def improved_clustered_attention_weights(q, k, assignments, clusters, key_padding_mask=None,
                                         scale=None, topk=32, topk_indices=None):
    """The improved-clustered attention matrix ``A^t`` and the top-k key indices ``T``.

    ``topk`` is clamped to Nk; ``topk_indices`` (B,H,C,k), when given, replaces the selection.

    Shapes: as ``clustered_attention_weights`` → (B,H,Nq,Nk), indices (B,H,C,min(topk, Nk)).
    """
    cdt = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = q.to(cdt), _expand_heads(k.to(cdt), q.shape[1])
    one_hot, qc = _centroids(q, assignments, clusters)
    logits_c = _scores(qc, k, key_padding_mask, scale)  # (B,H,C,Nk)
    a_c = safe_softmax(logits_c)
    if topk_indices is None:
        topk_indices = logits_c.topk(min(topk, k.shape[2]), dim=-1).indices
    in_top = torch.zeros_like(a_c, dtype=torch.bool).scatter(-1, topk_indices, True)
    mass = (a_c * in_top).sum(-1, keepdim=True)  # m̂ (B,H,C,1)
    in_top_q = (one_hot @ in_top.to(cdt)) > 0.5  # T_{a(i)} per query (B,H,Nq,Nk)
    logits_q = _scores(q, k, key_padding_mask, scale).masked_fill(~in_top_q, float("-inf"))
    top = (one_hot @ mass) * safe_softmax(logits_q)
    return torch.where(in_top_q, top, one_hot @ a_c), topk_indices


def clustered_attention_from_assignments(q, k, v, assignments, clusters, key_padding_mask=None,
                                         scale=None):
    """Clustered attention ``O = M A^c V`` for given assignments.

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), assignments (B,H,Nq) int64,
    key_padding_mask (B,Nk) bool (True = keep) → (B,H,Nq,Dv) in q's dtype.
    """
    weights = clustered_attention_weights(q, k, assignments, clusters, key_padding_mask, scale)
    return (weights @ _expand_heads(v.to(weights.dtype), q.shape[1])).to(q.dtype)


def improved_clustered_attention_from_assignments(q, k, v, assignments, clusters,
                                                  key_padding_mask=None, scale=None, topk=32,
                                                  topk_indices=None):
    """Improved clustered attention ``O = A^t V`` and the top-k indices used.

    Shapes: as ``clustered_attention_from_assignments`` → (B,H,Nq,Dv) in q's dtype,
    indices (B,H,C,min(topk, Nk)) int64.
    """
    weights, idx = improved_clustered_attention_weights(q, k, assignments, clusters,
                                                        key_padding_mask, scale, topk,
                                                        topk_indices)
    return (weights @ _expand_heads(v.to(weights.dtype), q.shape[1])).to(q.dtype), idx
