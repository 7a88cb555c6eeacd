"""Building blocks shared by THC and its transformer baseline: dense multi-head self-attention
that also hands back its queries and keys, a post-norm encoder layer, and the per-level readout.

The attention is written as plain dense torch (`softmax(q @ kᵀ * scale) @ v`) so clusterfx's
canonicaliser finds it and a policy can rewrite it like any other site; its probabilities are
consumed only by `@ v` (THC's clustering reads q and k, never the probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention over ROI (or cluster) tokens.

    Math: P = softmax(q kᵀ · D^-1/2), out = W_o (P v), q = x W_q, k = x W_k, v = x W_v.
    Shapes: x (B, n, C) -> out (B, n, C), q (B, H, n, D), k (B, H, n, D), with C = H · D.
    q and k are returned so that a clustering layer can read THC's attention scores q kᵀ without
    touching the probabilities (see `ClusterAssignment`).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, n, C = x.shape
        H, D = self.heads, self.head_dim
        q = self.query(x).view(B, n, H, D).transpose(1, 2)  # (B, H, n, D)
        k = self.key(x).view(B, n, H, D).transpose(1, 2)  # (B, H, n, D)
        v = self.value(x).view(B, n, H, D).transpose(1, 2)  # (B, H, n, D)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, n, n)
        probs = self.dropout(F.softmax(scores, dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(B, n, C)  # (B, H, n, D) -> (B, n, C)
        return self.output(ctx), q, k


class EncoderLayer(nn.Module):
    """Post-norm transformer layer (as `nn.TransformerEncoderLayer`, which THC subclasses):
    h = norm1(x + attn(x)), out = norm2(h + ffn(h)), ffn = Linear -> ReLU -> Linear.

    Shapes: x (B, n, C) -> out (B, n, C), q and k (B, H, n, D) from the attention.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attended, q, k = self.attention(x)
        h = self.norm1(x + self.dropout(attended))
        return self.norm2(h + self.dropout(self.ffn(h))), q, k


class Readout(nn.Module):
    """BNT/THC `DecReadout`: a per-token projection, then an MLP over the flattened tokens.

    Math: z_t = LeakyReLU(W_1 h_t), logits = W_3 LeakyReLU(W_2 [z_1 ‖ … ‖ z_n]).
    Shapes: h (B, n, C) -> logits (B, classes). The token order matters (tokens are clusters with
    a fixed identity, or ROIs), which is why the readout flattens rather than pools.
    """

    def __init__(self, tokens: int, dim: int, token_dim: int, hidden: int, classes: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim, token_dim), nn.LeakyReLU())
        self.mlp = nn.Sequential(
            nn.Linear(tokens * token_dim, hidden), nn.LeakyReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.project(h)  # (B, n, token_dim)
        return self.mlp(z.flatten(1))  # (B, n * token_dim) -> (B, classes)
