"""PyTorch Geometric frontend for brain networks: connectivity matrix or networkx graph → `Data`,
and a `Batch` of such graphs → one static-size dense tensor for the model.

A brain graph here has one node per region of interest (ROI); `x` holds the rows of the
connectivity matrix (the connection profiles, x[i, j] = w_ij, so F = N) and `edge_index` /
`edge_attr` hold the thresholded matrix. `x` is stored explicitly because the edges cannot give
it back: thresholding drops entries and a Fisher-z matrix has a zero diagonal.

Densifying uses `to_dense_batch(..., max_num_nodes=N, batch_size=B)` with Python ints taken from
the model and the batch, so `torch.compile(fullgraph=True)` sees static shapes (without them it
stops on a data-dependent node count).
"""

from __future__ import annotations

from typing import Any

import torch
from torch_geometric.data import Batch, Data
from torch_geometric.utils import dense_to_sparse, to_dense_adj, to_dense_batch


def from_connectivity(matrix: Any, *, y: int | None = None, threshold: float | None = None,
                      density: float | None = None, subject: str | None = None) -> Data:
    """A brain graph from one connectivity matrix.

    Edges are the off-diagonal entries with |w_ij| > threshold (`threshold`), or the strongest
    `density` fraction of off-diagonal |w_ij| (proportional thresholding, ties kept); with
    neither, every non-zero off-diagonal entry. `edge_attr` holds the signed weights w_ij.
    Shapes: matrix (N, N) -> Data(x (N, N) float32, edge_index (2, E), edge_attr (E,),
    y (1,) long if given, num_nodes N).
    """
    w = torch.as_tensor(matrix, dtype=torch.float32)
    name = f"subject {subject!r}: " if subject is not None else ""
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"{name}connectivity must be a square (N, N) matrix, got shape "
                         f"{tuple(w.shape)}")
    if threshold is not None and density is not None:
        raise ValueError("give threshold or density, not both")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density ({density}) must be in (0, 1]")
    n = w.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    strength = w.abs().masked_fill(~off, 0.0)
    if n < 2:
        keep = torch.zeros(n, n, dtype=torch.bool)
    elif density is not None:
        count = max(1, round(density * n * (n - 1)))
        cut = strength[off].sort(descending=True).values[min(count, n * (n - 1)) - 1]
        keep = (strength >= cut) & (strength > 0)
    else:
        keep = strength > (threshold if threshold is not None else 0.0)
    edge_index, edge_attr = dense_to_sparse(w * keep)
    data = Data(x=w.clone(), edge_index=edge_index, edge_attr=edge_attr, num_nodes=n)
    if y is not None:
        data.y = torch.tensor([int(y)], dtype=torch.long)
    if subject is not None:
        data.subject = subject
    return data


def from_networkx_graph(graph: Any, *, weight: str = "weight", y: int | None = None,
                        subject: str | None = None) -> Data:
    """A brain graph from a networkx graph: nodes (in `graph.nodes` order) are ROIs, `x` is the
    weighted adjacency (edges without `weight` count 1; undirected graphs give a symmetric x),
    and the edges are the graph's own edges (no further thresholding).
    Shapes: N nodes, E edges -> Data(x (N, N), edge_index (2, E') with E' = 2E if undirected).
    """
    nodes = list(graph.nodes)
    if not nodes:
        raise ValueError("the networkx graph has no nodes")
    index = {node: i for i, node in enumerate(nodes)}
    pairs = [(index[u], index[v], float(w)) for u, v, w in graph.edges(data=weight, default=1.0)]
    n = len(nodes)
    if pairs:
        src, dst, w = zip(*pairs)
        edge_index = torch.tensor([src, dst], dtype=torch.long)
        edge_attr = torch.tensor(w, dtype=torch.float32)
        if not graph.is_directed():
            edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
            edge_attr = torch.cat([edge_attr, edge_attr])
        x = to_dense_adj(edge_index, edge_attr=edge_attr, max_num_nodes=n)[0]  # (N, N)
        if not graph.is_directed():  # a self-loop was added twice above
            x.diagonal().mul_(0.5)
    else:
        x = torch.zeros(n, n)
    return from_connectivity(x, y=y, threshold=0.0, subject=subject)


def dense_connectivity(data: torch.Tensor | Data | Batch, num_rois: int) -> torch.Tensor:
    """The model's input: connection profiles as one dense tensor with static sizes.

    Accepts a dense tensor (B, N, N), a `Batch` of brain graphs of N nodes each, or one `Data`.
    Shapes: -> (B, N, N), B = number of graphs. Eager calls check every graph has N nodes; under
    torch.compile the check is skipped (it would read data-dependent node counts).
    """
    if isinstance(data, torch.Tensor):
        if data.dim() != 3 or data.shape[1] != num_rois or data.shape[2] != num_rois:
            raise ValueError(f"dense input must have shape (B, {num_rois}, {num_rois}), got "
                             f"{tuple(data.shape)}")
        return data
    x = data.x
    if x.dim() != 2 or x.shape[1] != num_rois:
        raise ValueError(f"graph node features x must be connection profiles of {num_rois} "
                         f"values per ROI, got x of shape {tuple(x.shape)}")
    if not isinstance(data, Batch):
        if not torch.compiler.is_compiling() and x.shape[0] != num_rois:
            raise ValueError(f"the graph has {x.shape[0]} ROIs, the model expects {num_rois}")
        return x.unsqueeze(0)  # (1, N, N)
    batch_size = data.num_graphs
    if not torch.compiler.is_compiling():
        sizes = (data.ptr[1:] - data.ptr[:-1]).tolist()
        bad = [(i, s) for i, s in enumerate(sizes) if s != num_rois]
        if bad:
            i, s = bad[0]
            raise ValueError(f"graph {i} of the batch has {s} ROIs, the model expects {num_rois}"
                             f" ({len(bad)} graph(s) differ)")
    dense, _ = to_dense_batch(x, data.batch, max_num_nodes=num_rois, batch_size=batch_size)
    return dense  # (B, N, N)
