"""Held-out metrics for brain-network classifiers and for the communities THC finds.

Classification: AUROC of p(class 1) and accuracy at p > 0.5 (sklearn). Communities: each ROI's
community at each level is the argmax of the assignment averaged over held-out subjects (the
composite S₁S₂…S_l for level l, as the official `get_assignments_with_loader` averages per
batch); NMI (arithmetic normalisation) and ARI against `communities.csv` (sklearn); Newman
modularity of the found partition on the group graph (networkx).

Level names follow the folder format: `level1` is the coarsest partition, so the model's last
(coarsest) level is compared with `level1`, the one before it with `level2`.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
    roc_auc_score,
)


def classification_metrics(labels: np.ndarray, prob1: np.ndarray) -> dict[str, float]:
    """{"auroc", "accuracy"} of p(class 1) against binary labels (both classes needed)."""
    return {"auroc": float(roc_auc_score(labels, prob1)),
            "accuracy": float(accuracy_score(labels, (prob1 > 0.5).astype(np.int64)))}


def composite_assignments(assignments: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Per-ROI soft assignments at every level, coarsest first, averaged over subjects.
    Shapes: assignments[l] (B, n_l, K_l) -> [(N, K_L), …, (N, K_1)] (composite S₁…S_l)."""
    out, composite = [], None
    for s in assignments:
        composite = s if composite is None else composite @ s  # (B, N, K_l)
        out.append(composite.mean(dim=0).detach().double().numpy())
    return out[::-1]


def group_graph(matrices: np.ndarray) -> nx.Graph:
    """The group connectivity graph: mean matrix over subjects, negative weights clipped to 0,
    no self-loops (modularity needs non-negative weights)."""
    w = np.clip(matrices.astype(np.float64).mean(axis=0), 0.0, None)
    np.fill_diagonal(w, 0.0)
    return nx.from_numpy_array(w)


def partition_modularity(graph: nx.Graph, ids: np.ndarray) -> float:
    """networkx modularity (weight='weight') of the partition ROI i -> ids[i]."""
    groups = [set(np.flatnonzero(ids == c).tolist()) for c in np.unique(ids)]
    return float(nx.community.modularity(graph, groups, weight="weight"))


def community_metrics(found: Sequence[np.ndarray], truth: dict[str, np.ndarray] | None,
                      graph: nx.Graph) -> dict[str, dict[str, float]]:
    """NMI/ARI per known level (when `truth`), and modularity of each found level.
    found: hard ids per level, coarsest first; truth: level name -> ids, coarsest first."""
    names = [f"level{i + 1}" for i in range(len(found))]
    out: dict[str, dict[str, float]] = {
        "modularity": {n: partition_modularity(graph, ids) for n, ids in zip(names, found)}}
    if truth:
        out["nmi"], out["ari"] = {}, {}
        for name, ids in zip(truth, found):
            out["nmi"][name] = float(normalized_mutual_info_score(truth[name], ids))
            out["ari"][name] = float(adjusted_rand_score(truth[name], ids))
    return out


def louvain_reference(graph: nx.Graph, truth: dict[str, np.ndarray] | None, seed: int
                      ) -> dict[str, float]:
    """Louvain on the group graph: a model-free reference for the communities."""
    groups = nx.community.louvain_communities(graph, weight="weight", seed=seed)
    ids = np.zeros(graph.number_of_nodes(), dtype=np.int64)
    for c, members in enumerate(groups):
        ids[list(members)] = c
    out = {"communities": len(groups), "modularity": partition_modularity(graph, ids)}
    if truth:
        first = next(iter(truth))
        out[f"nmi_{first}"] = float(normalized_mutual_info_score(truth[first], ids))
        out[f"ari_{first}"] = float(adjusted_rand_score(truth[first], ids))
    return out
