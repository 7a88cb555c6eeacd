"""PaCa-ViT (Grainger et al., "PaCa-ViT: Learning Patch-to-Cluster Attention in Vision
Transformers", CVPR 2023) in plain torch: a four-stage pyramid whose attention lets every patch
attend to M learned clusters of patches instead of to every patch.

PaCa attention, for patches x (B, N, C) on an H×W grid (already normalised by the block)::

    z = softmax_n(clustering(x))          (B, M, N)  each cluster: convex weights over patches
    c = LayerNorm(z x)                    (B, M, C)  cluster tokens
    out = proj(MHA(q = x Wq, k = c Wk, v = c Wv))    O(N·M·C) instead of O(N²·C)

`clusters = 0` gives plain multi-head self-attention (the paper's dense last stage). The
clustering head is "conv" (depthwise 7×7 → GELU → 1×1 → GELU → 1×1 to M, the paper's
default), "mlp" (C → 4C → M) or "linear" (C → M). The assignment z is computed by every block
(`share_assignment=False`) or by the first block of a stage and reused by the others, which
recompute c = z x from their own input (`share_assignment=True`, the paper's stage-wise mode:
only a stage's first block has a clustering head). Clustering is learned from the task loss
only. With `record_assignment = True` a layer keeps its last z (detached) in
`last_assignment`, for heat maps (apps/visualize.py).

Stem: two stride-2 3×3 convs (C/2, then C) with LayerNorm (/4); between stages a stride-2 3×3
conv with LayerNorm; blocks are pre-norm with an MLP fc1 → depthwise 3×3 (with shortcut) → GELU
→ fc2; the head mean-pools the last stage. Variants as the paper: `paca_vit_tiny` (dims 96,
192, 320, 384; heads 2, 4, 8, 16; depths 2, 2, 4, 2; M 100, 100, 100, 0) and
`paca_vit_small` (depths 3, 3, 10, 3).

Shapes: images (B, 3, S, S) -> logits (B, num_classes); stage i works on (S/2^(i+2))² tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def depthwise_on_grid(x: torch.Tensor, conv: nn.Conv2d, grid: tuple[int, int]) -> torch.Tensor:
    """A depthwise `conv` of the tokens x (B, H·W, C) read as a map on `grid` -> (B, H·W, C).
    The map is a channels-last view of x (no copy), so the convolution runs its channels-last
    kernel and its output reads back as tokens without a copy (the depthwise 7×7 of the
    clustering head runs 2.2× faster at N = 3136 than through a (B, C, H, W) copy)."""
    b, n, c = x.shape
    out = conv(x.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).reshape(b, n, c)


class Clustering(nn.Module):
    """Cluster logits: (B, N, C) patches on an (H, W) grid -> (B, M, N)."""

    def __init__(self, dim: int, clusters: int, kind: str = "conv") -> None:
        super().__init__()
        if kind not in ("conv", "mlp", "linear"):
            raise ValueError(f"clustering ({kind!r}) must be 'conv', 'mlp' or 'linear'")
        self.kind = kind
        if kind == "conv":
            self.net = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), nn.GELU(),
                                     nn.Conv2d(dim, dim, 1), nn.GELU(),
                                     nn.Conv2d(dim, clusters, 1, bias=False))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                     nn.Linear(4 * dim, clusters))
        else:
            self.net = nn.Linear(dim, clusters, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.kind == "conv":
            dw, pw, out = self.net[0], self.net[2], self.net[4]
            y = F.gelu(depthwise_on_grid(x, dw, grid))  # (B, N, C)
            # the 1×1 convolutions as products over the channels of the (B, N, C) layout: the
            # same weights and result, without the convolution kernels' overhead (1.6× faster
            # head at N = 3136 on CPU)
            y = F.gelu(F.linear(y, pw.weight.flatten(1), pw.bias))
            return out.weight.flatten(1).expand(x.shape[0], -1, -1) @ y.mT  # (B, M, N)
        if self.kind == "linear":
            return self.net.weight.expand(x.shape[0], -1, -1) @ x.mT  # (B, M, N), contiguous
        return self.net(x).transpose(1, 2)  # (B, M, N)


class PaCaAttention(nn.Module):
    """Patch-to-cluster attention (clusters > 0) or dense self-attention (clusters = 0).

    forward(x (B, N, C), grid, z=None) -> (out (B, N, C), z (B, M, N) or None). A given `z` is
    used as the assignment (stage-wise sharing); otherwise the layer computes its own. A layer
    made with `own_clustering=False` has no clustering head and must be given `z`.
    """

    def __init__(self, dim: int, heads: int, clusters: int, clustering: str = "conv",
                 own_clustering: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 0:
            raise ValueError(f"clusters ({clusters!r}) must be an int >= 0 (0 = dense)")
        self.heads, self.clusters = heads, clusters
        self.clustering = Clustering(dim, clusters, clustering) if (
            clusters and own_clustering) else None
        self.cluster_norm = nn.LayerNorm(dim) if clusters else nn.Identity()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.record_assignment = False
        self.last_assignment: torch.Tensor | None = None

    def paca_parameters(self) -> dict:
        """The layer's parameters as ``clusterfx.ops.paca.paca_layer`` takes them (keyword
        arguments after x and grid): kind, head (the clustering head's parameters in order),
        q, kv, proj ((weight, bias) pairs), heads, norm ((weight, bias, eps))."""
        if self.clustering is None:
            raise ValueError("paca_parameters: this layer has no clustering head (dense, or it "
                             "shares its stage's assignment)")
        net = self.clustering.net
        modules = net if isinstance(net, nn.Sequential) else [net]
        norm = self.cluster_norm
        return {"kind": self.clustering.kind,
                "head": [p for module in modules for p in module.parameters()],
                "q": (self.q.weight, self.q.bias), "kv": (self.kv.weight, self.kv.bias),
                "proj": (self.proj.weight, self.proj.bias), "heads": self.heads,
                "norm": (norm.weight, norm.bias, norm.eps)}

    def assignment(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """z = softmax over the patches of the cluster logits: (B, N, C) -> (B, M, N)."""
        return self.clustering(x, grid).softmax(dim=-1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], z: torch.Tensor | None = None):
        b, n, c = x.shape
        h = self.heads
        if self.clusters:
            if z is None:
                if self.clustering is None:
                    raise ValueError("this layer shares its stage's assignment: pass z")
                z = self.assignment(x, grid)
            if self.record_assignment:
                self.last_assignment = z.detach()
            tokens = self.cluster_norm(z @ x)  # (B, M, C)
        else:
            tokens = x
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)  # (B, h, N, C/h)
        k, v = self.kv(tokens).view(b, tokens.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, C/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), z


class ConvMlp(nn.Module):
    """fc1 -> depthwise 3×3 on the grid (with shortcut) -> GELU -> fc2; (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        x = x + depthwise_on_grid(x, self.dw, grid)
        return self.fc2(F.gelu(x))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p (training)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class PaCaBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); passes the assignment on."""

    def __init__(self, dim: int, heads: int, clusters: int, clustering: str, mlp_ratio: float,
                 drop_path: float, own_clustering: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PaCaAttention(dim, heads, clusters, clustering, own_clustering)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, grid, z=None):
        out, z = self.attn(self.norm1(x), grid, z)
        x = x + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x), grid)), z


class PaCaViT(nn.Module):
    """The PaCa-ViT classifier (see the module docstring). Attention layers are at
    `stages.{i}.{j}.attn`; `grids(image_size)` gives each stage's (H, W)."""

    def __init__(self, dims=(96, 192, 320, 384), heads=(2, 4, 8, 16), depths=(2, 2, 4, 2),
                 clusters=(100, 100, 100, 0), clustering: str = "conv", num_classes: int = 1000,
                 in_chans: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 share_assignment: bool = True, stem_stride: int = 4) -> None:
        super().__init__()
        lengths = {len(dims), len(heads), len(depths), len(clusters)}
        if len(lengths) != 1:
            raise ValueError(f"dims, heads, depths and clusters must have one length per stage, "
                             f"got {len(dims)}, {len(heads)}, {len(depths)}, {len(clusters)}")
        if stem_stride not in (2, 4):
            raise ValueError(f"stem_stride ({stem_stride}) must be 2 or 4")
        self.share_assignment = share_assignment
        self.stem_stride = stem_stride
        first = [nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1),
                 LayerNorm2d(dims[0] // 2), nn.GELU()]
        second = nn.Conv2d(dims[0] // 2, dims[0], 3, stride=stem_stride // 2, padding=1)
        self.stem = nn.Sequential(*first, second, LayerNorm2d(dims[0]))
        self.downsamples = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i - 1], dims[i], 3, stride=2, padding=1),
                          LayerNorm2d(dims[i])) for i in range(1, len(dims)))
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(nn.ModuleList(
                PaCaBlock(dims[i], heads[i], clusters[i], clustering, mlp_ratio,
                          rates[start + j], own_clustering=j == 0 or not share_assignment)
                for j in range(depth)))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def grids(self, image_size: int) -> list[tuple[int, int]]:
        side = image_size // self.stem_stride
        return [(side >> i, side >> i) for i in range(len(self.stages))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # (B, C0, S/4, S/4)
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downsamples[i - 1](x)  # (B, Ci, H/2, W/2)
            b, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)  # (B, H·W, Ci)
            z = None
            for block in stage:
                tokens, shared = block(tokens, (h, w), z)
                z = shared if self.share_assignment else None
            x = tokens.transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.norm(x.flatten(2).mean(dim=-1)))  # (B, num_classes)


def paca_vit_tiny(num_classes: int = 1000, clustering: str = "conv", **kwargs) -> PaCaViT:
    """PaCa-Tiny: dims 96/192/320/384, heads 2/4/8/16, depths 2/2/4/2, M 100/100/100/0
    (12.2M parameters with 1000 classes and conv clustering, as the paper's README)."""
    return PaCaViT((96, 192, 320, 384), (2, 4, 8, 16), (2, 2, 4, 2), (100, 100, 100, 0),
                   clustering, num_classes, **kwargs)


def paca_vit_small(num_classes: int = 1000, clustering: str = "conv", **kwargs) -> PaCaViT:
    """PaCa-Small: as Tiny with depths 3/3/10/3 (22.0M parameters in the paper's README)."""
    return PaCaViT((96, 192, 320, 384), (2, 4, 8, 16), (3, 3, 10, 3), (100, 100, 100, 0),
                   clustering, num_classes, **kwargs)
