"""The unsupervised clustering term that makes THC's communities readable.

The official code trains with cross-entropy plus a binary-entropy term on sigmoid(W) that makes
the assignment logits confident, and no community objective: its assignments follow only the
label, and nothing ties them to the brain's modules. `reference/thc.md` measured that a
DMoN-style modularity + collapse loss on S = softmax(Ā W) recovers planted modules (NMI = 1.0
for K = 4, K = 12, and for the composite S₁S₂ of a 12 → 4 hierarchy with pooled adjacency SᵀAS).
THC's training adds it per level, with the official term's intent (confident assignments) kept as
the row entropy of S: without it, soft rows spread over the top-k clusters keep the modularity
gradient small and the first level merged whole modules in our runs (top-level NMI 0.86, against
1.0 with it on 3/3 seeds).

Top-k masked rows sum to less than 1; every term here renormalises the rows first, so that the
collapse term cannot be lowered by the mask alone (it went negative in our runs without this).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def connectivity_adjacency(x: torch.Tensor) -> torch.Tensor:
    """Graph weights from connection profiles: A = max(x, 0) with a zero diagonal (modularity
    needs non-negative weights; self-correlation is not an edge).
    Shapes: x (B, N, N) -> A (B, N, N)."""
    eye = torch.eye(x.shape[-1], dtype=torch.bool, device=x.device)
    return x.clamp(min=0).masked_fill(eye, 0.0)


def modularity(s: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """Soft Newman modularity per graph (DMoN): Q = tr(Sᵀ A S − Sᵀ d dᵀ S / 2m) / 2m, with
    d = A 1 and 2m = 1ᵀ A 1. For a hard one-hot S it equals networkx's modularity of the
    partition (resolution 1). Shapes: s (B, n, K), adj (B, n, n) -> (B,)."""
    degrees = adj.sum(dim=-1)  # (B, n)
    two_m = degrees.sum(dim=-1).clamp(min=torch.finfo(adj.dtype).tiny)  # (B,)
    within = (s * (adj @ s)).sum(dim=(-2, -1))  # tr(Sᵀ A S), (B,)
    expected = ((degrees.unsqueeze(-2) @ s).squeeze(-2) ** 2).sum(dim=-1) / two_m  # |Sᵀ d|² / 2m
    return (within - expected) / two_m


def collapse(s: torch.Tensor) -> torch.Tensor:
    """DMoN collapse regulariser: ‖Σ_i S_i‖₂ · √K / n − 1, 0 when clusters are equally sized and
    √K − 1 when every token lands in one cluster. Shapes: s (B, n, K) -> (B,)."""
    n, k = s.shape[-2], s.shape[-1]
    return s.sum(dim=-2).norm(dim=-1) * k**0.5 / n - 1.0


def row_entropy(s: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of S: 0 for one-hot rows, ln K for uniform rows.
    Shapes: s (B, n, K) -> (B,)."""
    return -(s * s.clamp(min=torch.finfo(s.dtype).tiny).log()).sum(dim=-1).mean(dim=-1)


def cluster_loss(x: torch.Tensor, assignments: Sequence[torch.Tensor],
                 collapse_weight: float = 1.0, entropy_weight: float = 0.3) -> torch.Tensor:
    """Σ_levels mean_batch(−Q(Ŝ_l, A_l) + collapse_weight · collapse(Ŝ_l)
    + entropy_weight · H(Ŝ_l)), with Ŝ the row-normalised S, A_1 the subject's connectivity
    graph and A_{l+1} = Ŝ_lᵀ A_l Ŝ_l the pooled graph (so level l's modularity is that of the
    composite Ŝ_1…Ŝ_l on A_1). Shapes: x (B, N, N), assignments[l] (B, n_l, K_l) -> scalar."""
    adj = connectivity_adjacency(x)
    total = x.new_zeros(())
    for s in assignments:
        s = s / s.sum(dim=-1, keepdim=True)
        level = (collapse_weight * collapse(s) - modularity(s, adj)
                 + entropy_weight * row_entropy(s))
        total = total + level.mean()
        adj = s.transpose(-2, -1) @ adj @ s  # (B, K, K)
    return total
