"""The learnable clustering heads of patch-to-cluster attention: patch features -> cluster
logits, as in PaCa-ViT (Grainger et al. 2023), plus an optional positional prior.

Kinds (C channels in, M clusters out, on an H×W patch grid):

- ``"linear"``: Linear(C, M, bias=False)  (the paper's P2CLinear).
- ``"mlp"``:    Linear(C, 4C) -> GELU -> Linear(4C, M)  (P2CMlp).
- ``"conv"``:   depthwise 7×7 conv -> GELU -> 1×1 conv C->C -> GELU -> 1×1 conv C->M, no bias
  (P2CConv2d, the paper's default); reads the patches as a (C, H, W) map.

``logits = head(x) + prior`` where ``prior`` (M, H·W) is an optional learnable positional bias.

Initialisation (``init``):

- ``"pool"`` (what ``cfx.PatchToCluster`` uses by default): the head's last layer is zero and
  the prior assigns cluster m to the m-th cell of a gh×gw tiling of the grid (gh·gw = M, aspect
  closest to H:W; a raster split of the patches when no tiling fits): 0 inside the cell,
  -(ln(H·W) + 4) outside, so each cluster starts as the average of its cell (under 2% of its
  weight leaks outside). A rewritten pretrained model thus starts as attention over M
  average-pooled regions and learns content-dependent clusters from there. With M = H·W the
  cells are single patches and z is close to, but not exactly, the identity.
- ``"random"`` (the paper's, used by ``models.PaCaViT``-style training from scratch):
  truncated-normal(0.02) weights, zero biases, no prior; logits start near 0, so every cluster
  starts near the mean patch.

The graph a rewrite emits calls ``cluster_logits(x, params, kind, grid, has_prior)`` (defined in
``common.py``, shared with the layer's implementations) with the
module's parameters (``ordered_parameters()``) as graph inputs; ``forward`` calls the same
function.

Shapes: x (B, H·W, C) -> logits (B, M, H·W).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clusterfx.ops.paca.common import CLUSTERINGS, cluster_logits

INITS = ("pool", "random")
CONV_KERNEL = 7
MLP_RATIO = 4


def _tiling(m: int, h: int, w: int) -> tuple[int, int] | None:
    """(gh, gw) with gh·gw = m, gh <= h, gw <= w, aspect closest to h:w; None if none fits."""
    pairs = [(a, m // a) for a in range(1, m + 1) if m % a == 0 and a <= h and m // a <= w]
    if not pairs:
        return None
    return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1]) - math.log(h / w)), p[0]))


def pool_membership(m: int, grid: tuple[int, int]) -> torch.Tensor:
    """(M, H·W) bool: which patches start in cluster m (``init="pool"``). Every cluster gets at
    least one patch; every patch belongs to one cluster when M <= H·W."""
    h, w = grid
    n = h * w
    tiling = _tiling(m, h, w)
    if tiling is not None:
        gh, gw = tiling
        rows = torch.arange(h).repeat_interleave(w) * gh // h  # (Np,) cell row of each patch
        cols = torch.arange(w).repeat(h) * gw // w
        cell = rows * gw + cols
    elif m <= n:
        cell = torch.arange(n) * m // n  # raster order cut into m runs
    else:  # more clusters than patches: cluster j starts on patch j·n // m
        return torch.arange(n)[None, :] == (torch.arange(m) * n // m)[:, None]
    return cell[None, :] == torch.arange(m)[:, None]


class PatchClustering(nn.Module):
    """Cluster logits from patches (see the module docstring).

    Args:
        dim: C, the channels of the patch features.
        clusters: M >= 1.
        grid: (H, W) of the patches (needed by ``"conv"``, and by the prior).
        kind: "conv" | "mlp" | "linear".
        init: "pool" (zero head + positional prior) | "random" (the paper's; no prior).
    """

    def __init__(self, dim: int, clusters: int, grid: tuple[int, int], kind: str = "conv",
                 init: str = "pool") -> None:
        super().__init__()
        for name, value in (("dim", dim), ("clusters", clusters), ("grid[0]", grid[0]),
                            ("grid[1]", grid[1])):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PatchClustering: {name} ({value!r}) must be a positive int")
        if kind not in CLUSTERINGS:
            raise ValueError(f"PatchClustering: kind ({kind!r}) must be one of {CLUSTERINGS}")
        if init not in INITS:
            raise ValueError(f"PatchClustering: init ({init!r}) must be one of {INITS}")
        self.kind, self.init, self.grid = kind, init, (int(grid[0]), int(grid[1]))
        self.dim, self.clusters = dim, clusters
        if kind == "linear":
            self.proj = nn.Linear(dim, clusters, bias=False)
            last = self.proj
        elif kind == "mlp":
            self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
            self.fc2 = nn.Linear(MLP_RATIO * dim, clusters)
            last = self.fc2
        else:
            self.dw = nn.Conv2d(dim, dim, CONV_KERNEL, padding=CONV_KERNEL // 2, groups=dim)
            self.pw = nn.Conv2d(dim, dim, 1)
            self.out = nn.Conv2d(dim, clusters, 1, bias=False)
            last = self.out
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.trunc_normal_(p, std=0.02)
            else:
                nn.init.zeros_(p)
        n = self.grid[0] * self.grid[1]
        if init == "pool":
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
            inside = pool_membership(clusters, self.grid)
            prior = torch.where(inside, 0.0, -(math.log(n) + 4.0))
            self.prior = nn.Parameter(prior)  # (M, Np)
        else:
            self.register_parameter("prior", None)

    @property
    def has_prior(self) -> bool:
        return self.prior is not None

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, clusters={self.clusters}, grid={self.grid}, "
                f"init={self.init!r}")

    def ordered_parameters(self) -> list[nn.Parameter]:
        """The parameters in the order ``cluster_logits`` takes them: the head's, then the
        prior (``parameters()`` would list the prior first)."""
        head = [p for child in self.children() for p in child.parameters()]
        return head + ([self.prior] if self.prior is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H·W, C) -> (B, M, H·W) logits."""
        return cluster_logits(x, self.ordered_parameters(), self.kind, self.grid,
                              self.has_prior)
