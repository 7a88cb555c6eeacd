"""THC (Dai et al., ISBI 2023): a transformer over brain regions whose attention feeds a
hierarchical clustering layer; each level pools the ROIs into communities and has a readout.

    x (B, N, N) ── Linear(N→C) ──► level 1: EncoderLayer ─► S₁ = assign(q, k) (B, N, K₁)
                                             H₁ = LN(S₁ᵀ h)  (B, K₁, C) ─► readout₁ ─┐
                                   level 2: EncoderLayer ─► S₂ (B, K₁, K₂)            │
                                             H₂ = LN(S₂ᵀ h)  (B, K₂, C) ─► readout₂ ─┴► Σ logits

Design decisions (each against `reference/thc.md` and the official code):
- Assignment from the attention scores, computed without the attention matrix. THC's BCluster
  is S = softmax(Ā W) with Ā = mean over heads of the pre-softmax scores q kᵀ/√D and learnable
  centres W (n, K). By associativity Ā W = (1/H) Σ_h q_h (k_hᵀ W)/√D, which is the same number
  at O(n·D·K) instead of O(n²·D), and the attention probabilities are consumed only by `@ v`. So
  the canonicaliser finds every attention (`levels.{l}.layer.attention`), a policy can rewrite
  it (Dense/TopK/Clustered…), and the assignment stays the exact THC statistic of the same q, k.
- Per-sample assignment by default: Ā is each subject's own, so one subject's output never
  depends on the rest of its batch. `assignment="batch"` restores the official behaviour (Ā
  averaged over the batch, one S shared by every subject of the batch).
- Centres are orthonormally initialised with every column normalised (the official
  Gram–Schmidt leaves column 0 unnormalised): Xavier draw, then QR.
- Top-k sparsification as the official `mask_top_k` (keep int(0.1K) entries per row if K > 50,
  else int(0.5K); rows are not renormalised; the LayerNorm after pooling removes the scale).
  `topk=0` keeps all K entries, so rows sum to 1.
- Size: the official flattened-node encoder MLP (n·F → 1024 → 1024 → n·F, 125M parameters at
  N = 200) is dropped (the official `no_encoder` setting); a Linear(N → C) embeds the connection
  profiles instead, so parameters grow as N·C + N·K₁ and a CPU trains it in seconds. No
  stochastic attention noise (both recommended official configs switch it off).
- The model outputs its assignments; `losses.cluster_loss` (modularity + collapse + row
  entropy per level) is the unsupervised term that makes the communities interpretable.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .frontend import dense_connectivity
from .layers import EncoderLayer, Readout

ASSIGNMENT_MODES = ("sample", "batch")


def official_topk(clusters: int) -> int:
    """The official `mask_top_k` rule: 10 % of the clusters above 50, else half."""
    return int(0.1 * clusters) if clusters > 50 else max(1, int(0.5 * clusters))


def orthonormal_columns(rows: int, cols: int, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """A Xavier-uniform (rows, cols) draw made orthonormal by QR: WᵀW = I (every column, the
    first included, has norm 1). Signs follow the draw (diag(R) > 0). Needs rows >= cols."""
    if cols > rows:
        raise ValueError(f"cannot make {cols} orthonormal columns of length {rows}")
    bound = (6.0 / (rows + cols)) ** 0.5
    draw = torch.empty(rows, cols, dtype=torch.float64).uniform_(-bound, bound,
                                                                 generator=generator)
    q, r = torch.linalg.qr(draw)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


class ClusterAssignment(nn.Module):
    """BCluster: soft assignment of n tokens to K learnable centres from the attention scores.

    Math: logits = (1/H) Σ_h q_h (k_hᵀ W) / √D  (= Ā W, Ā the head-mean of q kᵀ/√D),
    per sample, or their mean over the batch when `mode == "batch"`; S = softmax_K(logits);
    with top-k, S_ik is kept for the k largest entries of row i and set to 0 elsewhere.
    Shapes: q, k (B, H, n, D) -> S (B, n, K).
    """

    def __init__(self, tokens: int, clusters: int, topk: int | None = None,
                 mode: str = "sample") -> None:
        super().__init__()
        if mode not in ASSIGNMENT_MODES:
            raise ValueError(f"assignment mode {mode!r} must be one of {ASSIGNMENT_MODES}")
        if not 1 <= clusters <= tokens:
            raise ValueError(f"clusters ({clusters}) must be between 1 and the number of "
                             f"tokens ({tokens})")
        self.mode = mode
        self.topk = official_topk(clusters) if topk is None else (topk or clusters)
        if not 1 <= self.topk <= clusters:
            raise ValueError(f"topk ({topk}) must be between 0 (keep all) and clusters "
                             f"({clusters})")
        self.centres = nn.Parameter(orthonormal_columns(tokens, clusters).float())

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        D = q.shape[-1]
        kw = k.transpose(-2, -1) @ self.centres  # (B, H, D, K)
        logits = (q @ kw).mean(dim=1) * D**-0.5  # (B, H, n, K) -> (B, n, K)
        if self.mode == "batch":
            logits = logits.mean(dim=0, keepdim=True).expand_as(logits)  # one S for the batch
        return logits

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        soft = torch.softmax(self.logits(q, k), dim=-1)  # (B, n, K)
        if self.topk == soft.shape[-1]:
            return soft
        index = soft.topk(self.topk, dim=-1).indices  # (B, n, topk)
        keep = torch.zeros_like(soft).scatter(-1, index, 1.0)
        return soft * keep


class ClusterLevel(nn.Module):
    """One THC level: transformer layer over n tokens, assignment to K clusters, pooling, and
    the level's readout.

    Math: h, q, k = layer(x); S = assign(q, k); H = LayerNorm(Sᵀ h); logits = readout(H).
    Shapes: x (B, n, C) -> H (B, K, C), S (B, n, K), logits (B, classes).
    """

    def __init__(self, tokens: int, clusters: int, dim: int, heads: int, ffn_dim: int,
                 topk: int | None, mode: str, readout_dim: int, readout_hidden: int,
                 classes: int, dropout: float) -> None:
        super().__init__()
        self.layer = EncoderLayer(dim, heads, ffn_dim, dropout)
        self.assign = ClusterAssignment(tokens, clusters, topk, mode)
        self.norm = nn.LayerNorm(dim)
        self.readout = Readout(clusters, dim, readout_dim, readout_hidden, classes, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, q, k = self.layer(x)  # (B, n, C), (B, H, n, D) x2
        s = self.assign(q, k)  # (B, n, K)
        pooled = self.norm(s.transpose(1, 2) @ h)  # (B, K, n) @ (B, n, C) -> (B, K, C)
        return pooled, s, self.readout(pooled)


class THCOutput(NamedTuple):
    """logits (B, classes) summed over levels; assignments[l] (B, n_l, K_l) with n_1 = N and
    n_{l+1} = K_l; pooled[l] (B, K_l, C); level_logits[l] (B, classes)."""

    logits: torch.Tensor
    assignments: tuple[torch.Tensor, ...]
    pooled: tuple[torch.Tensor, ...]
    level_logits: tuple[torch.Tensor, ...]


class THC(nn.Module):
    """Transformer-based hierarchical clustering for brain networks.

    Input: connection profiles as a dense tensor (B, N, N), or a PyG `Batch`/`Data` of brain
    graphs with N nodes each (`frontend.dense_connectivity` densifies it with static sizes; both
    entries give identical outputs). Output: `THCOutput`. Attention sites are at
    `levels.{l}.layer.attention`.
    """

    def __init__(self, num_rois: int, clusters: tuple[int, ...] = (12, 4), dim: int = 64,
                 heads: int = 4, ffn_dim: int = 128, topk: tuple[int | None, ...] | None = None,
                 assignment: str = "sample", readout_dim: int = 8, readout_hidden: int = 32,
                 classes: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        clusters = tuple(int(c) for c in clusters)
        if not clusters:
            raise ValueError("clusters must name at least one level, e.g. (12, 4)")
        sizes = (num_rois, *clusters)
        if any(b > a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"cluster sizes must not grow from level to level: {sizes}")
        topk = tuple(topk) if topk is not None else (None,) * len(clusters)
        if len(topk) != len(clusters):
            raise ValueError(f"topk ({topk}) needs one entry per level ({len(clusters)})")
        self.num_rois = num_rois
        self.clusters = clusters
        self.assignment = assignment
        self.embed = nn.Linear(num_rois, dim)
        self.levels = nn.ModuleList(
            ClusterLevel(n, c, dim, heads, ffn_dim, t, assignment, readout_dim,
                         readout_hidden, classes, dropout)
            for n, c, t in zip(sizes, clusters, topk))

    def forward(self, data: Any) -> THCOutput:
        x = dense_connectivity(data, self.num_rois)  # (B, N, N)
        h = self.embed(x)  # (B, N, C)
        assignments, pooled, level_logits = [], [], []
        for level in self.levels:
            h, s, logits = level(h)  # h (B, K, C) becomes the next level's tokens
            assignments.append(s)
            pooled.append(h)
            level_logits.append(logits)
        total = torch.stack(level_logits).sum(dim=0)  # the official `readout: sum`
        return THCOutput(total, tuple(assignments), tuple(pooled), tuple(level_logits))


def thc_small(num_rois: int = 100, clusters: tuple[int, ...] = (12, 4), **kwargs: Any) -> THC:
    """THC sized for a CPU: C = 64, 4 heads, FFN 128, readouts 8 → 32 (80k parameters at
    N = 100 with 12 → 4 clusters; 149k at N = 1000)."""
    return THC(num_rois, clusters, **kwargs)
