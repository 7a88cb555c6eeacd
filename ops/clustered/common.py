"""Code shared by the clustered-attention implementations (cpu, triton) and the registration:
centroid means, masked centroid scores and probabilities, the broadcast back to queries, and
gathers by per-cluster key indices. Plain differentiable torch, any device.

Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), assignments (B,H,Nq) int64,
key_padding_mask (B,Nk) bool (True = keep); GQA: query head h reads kv head h // (H/Hk).
"""

from __future__ import annotations

import torch


def cluster_slots(assignments: torch.Tensor, clusters: int) -> torch.Tensor:
    """Flat (row, cluster) slot ``r·C + a`` of every query. (B,H,Nq) → (B·H·Nq,)."""
    B, H, N = assignments.shape
    offsets = torch.arange(B * H, device=assignments.device).view(B, H, 1) * clusters
    return (assignments + offsets).reshape(-1)


def centroid_means(q: torch.Tensor, assignments: torch.Tensor,
                   clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q^c_j = (1/n_j) Σ_{a(i)=j} q_i`` (0 for an empty cluster) and the counts ``n_j``.

    Shapes: q (B,H,Nq,D), assignments (B,H,Nq) → (B,H,C,D), counts (B,H,C) in q's dtype.
    """
    B, H, N, D = q.shape
    slots = cluster_slots(assignments, clusters)
    sums = q.new_zeros(B * H * clusters, D).index_add(0, slots, q.reshape(-1, D))
    counts = q.new_zeros(B * H * clusters).index_add(0, slots, q.new_ones(B * H * N))
    qc = sums / counts.clamp(min=1)[:, None]
    return qc.view(B, H, clusters, D), counts.view(B, H, clusters)


def mask_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Padded logits become the dtype's lowest finite value, not -inf, so that a row with no
    valid key stays finite through the fused softmax (``softmax_rows`` then zeroes it)."""
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def softmax_rows(logits: torch.Tensor, has_key: torch.Tensor | None) -> torch.Tensor:
    """Fused softmax over the last dim; rows whose ``has_key`` is False become zeros."""
    p = torch.softmax(logits, -1)
    return p if has_key is None else p * has_key.to(p.dtype)


def centroid_scores(qc: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """``s·Q^c Kᵀ + β`` (β: lowest finite value on padded keys).

    Shapes: qc (B,H,C,D), k (B,Hk,Nk,D), mask (B,Nk) → (B,H,C,Nk).
    """
    B, H, C, D = qc.shape
    Hk, Nk = k.shape[1], k.shape[2]
    logits = ((qc * scale).reshape(B, Hk, -1, D) @ k.transpose(-1, -2)).view(B, H, C, Nk)
    if key_padding_mask is not None:
        logits = mask_logits(logits, key_padding_mask[:, None, None, :])
    return logits


def centroid_probs(logits: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``A^c`` from ``centroid_scores``; zero rows for batch elements with no valid key."""
    has_key = None if key_padding_mask is None else key_padding_mask.any(-1)[:, None, None, None]
    return softmax_rows(logits, has_key)


def attend(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``P V`` with GQA. Shapes: p (B,H,C,Nk), v (B,Hk,Nk,Dv) → (B,H,C,Dv)."""
    B, H, C, Nk = p.shape
    return (p.reshape(B, v.shape[1], -1, Nk) @ v).view(B, H, C, v.shape[-1])


def broadcast(xc: torch.Tensor, slots: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Copy each cluster's row to its members. xc (B,H,C,E), slots (n,) → shape + (E,)."""
    return xc.reshape(-1, xc.shape[-1]).index_select(0, slots).view(*shape, xc.shape[-1])


def gather_keys(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``x[b, h // G, idx[b, h, j, t]]``. x (B,Hk,Nk,E), idx (B,H,C,k) → (B,H,C,k,E)."""
    B, Hk, Nk, E = x.shape
    H = idx.shape[1]
    base = (torch.arange(B, device=x.device)[:, None] * Hk
            + torch.arange(H, device=x.device)[None, :] // (H // Hk)) * Nk
    flat = (idx + base[:, :, None, None]).reshape(-1)
    return x.reshape(-1, E).index_select(0, flat).view(*idx.shape, E)
