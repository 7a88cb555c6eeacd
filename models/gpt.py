"""A small GPT-like decoder (nanoGPT spelling) with optional grouped-query attention.

The causal mask is built inside forward, softmax runs in float32 with casts around it, and with
n_kv_head < n_head the key/value heads are expanded Llama-style before the dense attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class CausalSelfAttention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention.

    Math: softmax(q k^T / sqrt(D) + causal) v, where query head h reads key/value head
    h // (n_head / n_kv_head).
    Shapes: x (B, T, C) -> (B, T, C), C = n_head * D; k and v carry n_kv_head * D features.
    """

    def __init__(
        self, dim: int, n_head: int, n_kv_head: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if dim % n_head != 0:
            raise ValueError(f"dim ({dim}) must be divisible by n_head ({n_head})")
        if n_kv_head < 1 or n_head % n_kv_head != 0:
            raise ValueError(
                f"n_head ({n_head}) must be a positive multiple of n_kv_head ({n_kv_head})"
            )
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = dim // n_head
        self.kv_dim = n_kv_head * self.head_dim
        self.c_attn = nn.Linear(dim, dim + 2 * self.kv_dim)
        self.c_proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, n_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([C, self.kv_dim, self.kv_dim], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, n_kv, D).transpose(1, 2)  # (B, n_kv, T, D)
        v = v.view(B, T, n_kv, D).transpose(1, 2)  # (B, n_kv, T, D)
        if n_kv < H:
            rep = H // n_kv
            # (B, n_kv, 1, T, D) -> (B, n_kv, rep, T, D) -> (B, H, T, D); head h reads h // rep.
            k = k[:, :, None].expand(B, n_kv, rep, T, D).reshape(B, n_kv * rep, T, D)
            v = v[:, :, None].expand(B, n_kv, rep, T, D).reshape(B, n_kv * rep, T, D)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
        att = (q @ k.mT) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
        att = att.masked_fill(~causal, float("-inf"))
        att = torch.softmax(att.float(), dim=-1).to(q.dtype)
        att = self.attn_dropout(att)
        y = att @ v  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self, dim: int, n_head: int, n_kv_head: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_head, n_kv_head, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-like decoder. Shapes: idx (B, T) of token ids -> logits (B, T, vocab_size).

    Attention sites live at `blocks.{i}.attn`; the LM head shares its weight with `wte`.
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        dim: int = 64,
        depth: int = 2,
        n_head: int = 4,
        n_kv_head: int | None = None,
        max_len: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, n_head, n_kv_head, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(_init_weights)
        self.lm_head.weight = self.wte.weight  # weight tying

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length ({T}) must be at most max_len ({self.max_len})")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)


def _init_weights(module: nn.Module) -> None:
    # nanoGPT's init: N(0, 0.02) weights, zero biases; keeps tied logits small at the start.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def gpt_tiny(
    vocab_size: int = 1000,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    max_len: int = 512,
    **kwargs,
) -> GPT:
    """A tiny GPT for tests; `kv_heads < heads` gives grouped-query attention."""
    return GPT(vocab_size, dim, depth, heads, kv_heads, max_len, **kwargs)
