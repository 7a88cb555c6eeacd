"""Baselines trained beside THC on the same split: a BNT-like transformer with a flat readout,
and a graph convolutional network on the thresholded brain graphs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GCNConv, global_mean_pool

from .frontend import dense_connectivity
from .layers import EncoderLayer, Readout


class FlatTransformer(nn.Module):
    """BNT-like: post-norm transformer layers over ROIs (connection profiles embedded by
    Linear(N → C)), then a flat readout over all ROIs instead of a clustering readout.

    Math: h = layers(x W_e); logits = readout(h) (per-ROI projection, flatten, MLP).
    Shapes: x (B, N, N) or a PyG Batch of N-node graphs -> logits (B, classes).
    Attention sites are at `layers.{i}.attention`.
    """

    def __init__(self, num_rois: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 ffn_dim: int = 128, readout_dim: int = 8, readout_hidden: int = 32,
                 classes: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_rois = num_rois
        self.embed = nn.Linear(num_rois, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, dropout)
                                    for _ in range(depth))
        self.readout = Readout(num_rois, dim, readout_dim, readout_hidden, classes, dropout)

    def forward(self, data: Any) -> torch.Tensor:
        h = self.embed(dense_connectivity(data, self.num_rois))  # (B, N, C)
        for layer in self.layers:
            h, _, _ = layer(h)
        return self.readout(h)


class GCN(nn.Module):
    """GCN baseline on the sparse thresholded graph, with global mean pooling.

    Math: h⁽ˡ⁺¹⁾ = ReLU(D̂^-1/2 Â D̂^-1/2 h⁽ˡ⁾ Θ⁽ˡ⁾) with Â = |W| + I on the kept edges (GCN's
    normalisation needs non-negative weights, so edge strength is |w_ij|); logits =
    MLP(mean over each graph's nodes).
    Shapes: Batch with x (ΣN, N), edge_index (2, E), edge_attr (E,) -> logits (B, classes).
    """

    def __init__(self, num_rois: int, hidden: int = 64, depth: int = 2, classes: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.num_rois = num_rois
        self.convs = nn.ModuleList(GCNConv(num_rois if i == 0 else hidden, hidden)
                                   for i in range(depth))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, data: Data | Batch) -> torch.Tensor:
        if isinstance(data, torch.Tensor):
            raise TypeError("GCN takes a PyG Data/Batch (it needs the edges), not a dense tensor")
        h = data.x
        weight = data.edge_attr.abs() if data.edge_attr is not None else None
        for conv in self.convs:
            h = self.dropout(torch.relu(conv(h, data.edge_index, weight)))
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        return self.head(global_mean_pool(h, batch))
