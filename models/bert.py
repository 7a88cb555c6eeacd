"""A small BERT-like encoder with a key-padding mask (the Hugging Face eager spelling).

Token + position embeddings, post-norm layers, and a pooler + classifier used only by
`classify` / `predict_proba`; `forward` returns the last hidden state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask, followed by the output projection.

    Math: softmax(q k^T / sqrt(D) + m) v, with m = finfo.min where the key is padding.
    Shapes: x (B, N, C), mask (B, N) of 1 (keep) / 0 (pad) or None -> (B, N, C), C = H * D.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        H, D = self.heads, self.head_dim
        q = self.query(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k = self.key(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        v = self.value(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)  # (B, H, N, N)
        if mask is not None:
            # mask[:, None, None, :] is (B, 1, 1, N): broadcast over heads and queries.
            scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1)
        probs = self.dropout(probs)
        ctx = torch.matmul(probs, v)  # (B, H, N, D)
        ctx = ctx.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.output(ctx)


class Layer(nn.Module):
    """Post-norm encoder layer: norm(x + attn(x)), then norm(x + ffn(x))."""

    def __init__(self, dim: int, heads: int, ffn_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads, dropout)
        self.attention_norm = nn.LayerNorm(dim, eps=1e-12)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim)
        )
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class Encoder(nn.Module):
    """A stack of post-norm layers at `layer.{i}`."""

    def __init__(self, dim: int, depth: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(dim, heads, dropout=dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class Bert(nn.Module):
    """BERT-like encoder. Shapes: input_ids (B, N), attention_mask (B, N) or None -> (B, N, C).

    Attention sites live at `encoder.layer.{i}.attention`.
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 512,
        num_classes: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.embedding_norm = nn.LayerNorm(dim, eps=1e-12)
        self.embedding_dropout = nn.Dropout(dropout)
        self.encoder = Encoder(dim, depth, heads, dropout)
        self.pooler = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.classifier = nn.Linear(dim, num_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        N = input_ids.shape[1]
        if N > self.max_len:
            raise ValueError(f"sequence length ({N}) must be at most max_len ({self.max_len})")
        positions = torch.arange(N, device=input_ids.device)  # (N,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, N, C)
        x = self.embedding_dropout(self.embedding_norm(x))
        return self.encoder(x, attention_mask)

    def classify(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Class logits (B, num_classes) from the pooled first token."""
        hidden = self(input_ids, attention_mask)  # (B, N, C)
        return self.classifier(self.pooler(hidden[:, 0]))

    def predict_proba(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Class probabilities (B, num_classes): softmax of `classify`."""
        return torch.softmax(self.classify(input_ids, attention_mask), dim=-1)


def bert_tiny(
    vocab_size: int = 1000,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    max_len: int = 512,
    **kwargs,
) -> Bert:
    """A tiny BERT-like encoder for tests; raise `depth` for a 12- or 24-layer model."""
    return Bert(vocab_size, dim, depth, heads, max_len, **kwargs)
