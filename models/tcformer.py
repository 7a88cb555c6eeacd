"""TCFormer (Zeng et al., "Not All Tokens Are Equal: Human-centric Visual Analysis via Token
Clustering Transformer", CVPR 2022) with TCFormerV2's local clustering, in plain torch that
torch.compile captures in one graph (tokens <-> maps by gather/scatter, models/tcformer_tokens).

    stage 1   overlapping patch embedding (k 7, stride `stem_stride`) -> H1×W1 grid tokens ->
              blocks with spatial-reduction attention (keys/values from a stride-sr conv of
              the token map) and an MLP with a depthwise 3×3 conv on the token map
    CTM       TokenConv (skip Linear + stride-2 3×3 conv of the token map, read back into the
              same N tokens) -> LayerNorm -> importance score s = Linear(C, 1) ->
              DPC-kNN into ceil(N / 4) clusters (per region of `regions[i]`, V2's local CTM,
              or global for (1, 1)) -> merge, weighted by exp(s)
    stage i   the first block attends from the merged tokens to the pre-merge tokens with the
              keys' importance added to the logits, softmax(q·kᵀ·scale + s_k); later blocks
              attend among the merged tokens
    head      LayerNorm, mean of the last tokens, Linear

`forward_features` returns every stage's `Tokens` (x, idx_token, agg_weight, map size): the
clusters of stage i are `idx_token` drawn on the initial grid (apps/visualize.py colours them).
`MTANeck` aggregates the stages top-down by `token_downup` (multi-stage token aggregation) and
returns one feature map per stage. `cluster_fn(x, clusters, k, regions) -> labels` replaces
the built-in DPC-kNN (e.g. `clusterfx.ops.dpc_knn`'s fast path); it must return (B, N) labels.

Shapes: images (B, C_in, S, S) -> logits (B, num_classes); stage i works on the
(S / stem_stride / 2^i)² map with N_1 = H1·W1 and N_{i+1} = N_i / 4 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .tcformer_tokens import (
    Tokens,
    dpc_knn,
    grid_tokens,
    map2token,
    merge_tokens,
    region_order,
    token2map,
    token_downup,
)


class TokenAttention(nn.Module):
    """Multi-head attention from query tokens to key tokens, keys spatially reduced by a
    stride-`sr` conv of their token map (sr = 1: no reduction), with an optional additive
    per-key bias (the keys' importance score)."""

    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.sr = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.reduce = nn.Conv2d(dim, dim, sr, stride=sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, xq: torch.Tensor, keys: Tokens, xk: torch.Tensor, size: tuple[int, int],
                score: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = xq.shape
        h = self.heads
        if self.sr > 1:  # keys drawn on the query map, then reduced
            xk = self.reduce(token2map(keys, xk, size)).flatten(2).transpose(1, 2)
            xk = self.norm(xk)
            if score is not None:
                score = F.avg_pool2d(token2map(keys, score, size), self.sr).flatten(2)  # (B,1,M)
        elif score is not None:
            score = score.transpose(1, 2)  # (B, 1, Nk)
        q = self.q(xq).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(xk).view(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)
        bias = None if score is None else score[:, None].to(q.dtype)  # (B, 1, 1, Nk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TokenMlp(nn.Module):
    """fc1 -> (+ depthwise 3×3 conv of the token map, read back) -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        x = self.fc1(x)
        x = x + map2token(tokens, self.dw(token2map(tokens, x)))
        return self.fc2(F.gelu(x))


class TCBlock(nn.Module):
    """Pre-norm block on dynamic tokens. With `keys` (the pre-merge tokens) and their `score`,
    the queries attend to those keys (the first block after a CTM)."""

    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio))

    def forward(self, t: Tokens, keys: Tokens | None = None,
                score: torch.Tensor | None = None) -> Tokens:
        xq = self.norm1(t.x)
        if keys is None:
            keys, xk = t, xq
        else:
            xk = self.norm1(keys.x)
        x = t.x + self.attn(xq, keys, xk, t.map_size, score)
        x = x + self.mlp(self.norm2(x), t)
        return t._replace(x=x)


class CTM(nn.Module):
    """Clustering-based token merge: N tokens of width C_in -> N / 4 tokens of width C_out on
    a map of half the size. Returns (merged tokens, pre-merge tokens, their score)."""

    def __init__(self, dim_in: int, dim_out: int, regions: tuple[int, int], k: int,
                 cluster_fn: Callable | None) -> None:
        super().__init__()
        self.skip = nn.Linear(dim_in, dim_out)
        self.conv = nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim_out)
        self.score = nn.Linear(dim_out, 1)
        self.regions, self.k = regions, k
        self.cluster_fn = cluster_fn or dpc_knn

    def forward(self, t: Tokens) -> tuple[Tokens, Tokens, torch.Tensor]:
        size = (t.map_size[0] // 2, t.map_size[1] // 2)
        down = t._replace(map_size=size)
        x = self.skip(t.x) + map2token(down, self.conv(token2map(t)))  # (B, N, C_out)
        x = self.norm(x)
        score = self.score(x)  # (B, N, 1)
        down = down._replace(x=x)
        n = x.shape[1]
        clusters = math.ceil(n / 4)
        count = self.regions[0] * self.regions[1]
        if count > 1:
            order = region_order(t.layout, self.regions, n, x.device)
            labels = torch.empty_like(t.idx_token[:, :n]).scatter_(
                1, order.expand(x.shape[0], n), self.cluster_fn(x[:, order], clusters, self.k,
                                                                 count))
        else:
            labels = self.cluster_fn(x, clusters, self.k, 1)
        merged = merge_tokens(down, labels, clusters, score, size, self.regions)
        return merged, down, score


class TCFormer(nn.Module):
    """The TCFormer classifier (see the module docstring)."""

    def __init__(self, image_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), depths=(2, 2, 2, 2),
                 mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1),
                 regions=((4, 4), (2, 2), (1, 1)), k: int = 5, stem_stride: int = 4,
                 cluster_fn: Callable | None = None) -> None:
        super().__init__()
        stages = len(dims)
        if not (len(heads) == len(depths) == len(mlp_ratios) == len(sr_ratios) == stages):
            raise ValueError("dims, heads, depths, mlp_ratios and sr_ratios need one entry per "
                             f"stage ({stages})")
        if len(regions) != stages - 1:
            raise ValueError(f"regions needs one (rh, rw) per CTM ({stages - 1}), got "
                             f"{len(regions)}")
        side = image_size // stem_stride
        if side * stem_stride != image_size or side % (1 << (stages - 1)):
            raise ValueError(f"image_size ({image_size}) / stem_stride ({stem_stride}) must be "
                             f"an int divisible by 2^{stages - 1}")
        layout, n = (side, side), side * side
        for i, (rh, rw) in enumerate(regions):
            if layout[0] % rh or layout[1] % rw:
                raise ValueError(f"CTM {i + 1}: regions {(rh, rw)} must tile the previous "
                                 f"region grid {layout}")
            if (n // 4) % (rh * rw) or n % 4:
                raise ValueError(f"CTM {i + 1}: {n} tokens into {n // 4} clusters cannot be "
                                 f"split evenly over {rh * rw} regions")
            if n // (rh * rw) < k:
                raise ValueError(f"CTM {i + 1}: regions of {n // (rh * rw)} tokens are fewer "
                                 f"than k ({k})")
            layout, n = (rh, rw), n // 4
        self.image_size, self.stem_stride = image_size, stem_stride
        self.embed = nn.Conv2d(in_chans, dims[0], 7, stride=stem_stride, padding=3)
        self.embed_norm = nn.LayerNorm(dims[0])
        self.ctms = nn.ModuleList(CTM(dims[i], dims[i + 1], tuple(regions[i]), k, cluster_fn)
                                  for i in range(stages - 1))
        self.stages = nn.ModuleList(
            nn.ModuleList(TCBlock(dims[i], heads[i], sr_ratios[i], mlp_ratios[i])
                          for _ in range(depths[i])) for i in range(stages))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, images: torch.Tensor) -> list[Tokens]:
        """Every stage's output tokens."""
        fmap = self.embed(images)  # (B, C0, H1, W1)
        size = (fmap.shape[2], fmap.shape[3])
        t = grid_tokens(self.embed_norm(fmap.flatten(2).transpose(1, 2)), size)
        outs = []
        for i, blocks in enumerate(self.stages):
            keys = score = None
            if i:
                t, keys, score = self.ctms[i - 1](t)
            for j, block in enumerate(blocks):
                t = block(t, keys, score) if j == 0 and keys is not None else block(t)
            outs.append(t)
        return outs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        last = self.forward_features(images)[-1]
        return self.head(self.norm(last.x).mean(dim=1))


class MTANeck(nn.Module):
    """Multi-stage token aggregation: lateral Linear to `dim` per stage, then from the last
    stage down, x_i += token_downup(stage i <- stage i+1) followed by a TCBlock; each level is
    drawn on its map at the end. Returns [(B, dim, H_i, W_i)] for the stages."""

    def __init__(self, in_dims, dim: int = 128, heads: int = 2, sr_ratios=(8, 4, 2, 1)) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Linear(d, dim) for d in in_dims)
        self.blocks = nn.ModuleList(TCBlock(dim, heads, sr, 4.0)
                                    for sr in sr_ratios[:len(in_dims)])

    def forward(self, stages: list[Tokens]) -> list[torch.Tensor]:
        levels = [t._replace(x=lat(t.x)) for t, lat in zip(stages, self.lateral)]
        for i in range(len(levels) - 2, -1, -1):
            up = token_downup(levels[i], levels[i + 1])
            levels[i] = levels[i]._replace(x=levels[i].x + up)
        levels = [block(t) for t, block in zip(levels, self.blocks)]
        return [token2map(t) for t in levels]


def tcformer_light(num_classes: int = 1000, **kwargs) -> TCFormer:
    """TCFormer-light: dims 64/128/320/512, heads 1/2/5/8, depths 2/2/2/2, MLP ratios 8/8/4/4,
    sr 8/4/2/1; local clustering over 4×4 then 2×2 regions, then global (V2)."""
    return TCFormer(num_classes=num_classes, depths=(2, 2, 2, 2), **kwargs)


def tcformer(num_classes: int = 1000, **kwargs) -> TCFormer:
    """TCFormer: as light with depths 3/4/6/3."""
    return TCFormer(num_classes=num_classes, depths=(3, 4, 6, 3), **kwargs)
