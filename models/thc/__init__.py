"""THC, a transformer with hierarchical clustering for brain networks, its PyTorch Geometric
frontend, its clustering loss, and two baselines. Imports only torch and torch_geometric."""

from .baselines import GCN, FlatTransformer
from .frontend import dense_connectivity, from_connectivity, from_networkx_graph
from .losses import cluster_loss, collapse, connectivity_adjacency, modularity, row_entropy
from .model import THC, ClusterAssignment, THCOutput, official_topk, orthonormal_columns, thc_small

__all__ = [
    "GCN", "THC", "ClusterAssignment", "FlatTransformer", "THCOutput", "cluster_loss",
    "collapse", "connectivity_adjacency", "dense_connectivity", "from_connectivity",
    "from_networkx_graph", "modularity", "official_topk", "orthonormal_columns", "row_entropy",
    "thc_small",
]
