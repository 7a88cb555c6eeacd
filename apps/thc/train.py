"""`clusterfx thc train`: split the subjects, train THC and two baselines on the same split,
evaluate on held-out subjects, and write metrics, communities and pictures to OUT.

THC's loss is cross-entropy plus `cluster_weight` × the modularity + collapse term per level
(`models.thc.losses.cluster_loss`); the baselines use cross-entropy. Every model sees the same
PyG batches (thresholded brain graphs; THC and the transformer densify them, the GCN uses the
edges), in the same seeded order.
"""

from __future__ import annotations

import csv
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch_geometric.loader import DataLoader

from ...models.thc import GCN, THC, FlatTransformer, cluster_loss, from_connectivity
from ...models.thc.frontend import dense_connectivity
from . import evaluate, plots
from .data import Connectomes, load_connectomes


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    seed: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    test_fraction: float = 0.3
    clusters: tuple[int, ...] = (12, 4)
    assignment: str = "sample"
    cluster_weight: float = 1.0
    density: float = 0.1  # edges kept per graph (strongest |w|), for the GCN
    baselines: tuple[str, ...] = ("bnt", "gcn")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch size ({self.batch_size}) must "
                             f"be at least 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test fraction ({self.test_fraction}) must be in (0, 1)")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density ({self.density}) must be in (0, 1]")
        unknown = set(self.baselines) - {"bnt", "gcn"}
        if unknown:
            raise ValueError(f"unknown baseline(s) {sorted(unknown)}; accepted: bnt, gcn")


@dataclass
class Trained:
    name: str
    model: torch.nn.Module
    seconds: float
    history: list[float] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def split_subjects(labels: np.ndarray, test_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test indices (both classes in each part)."""
    counts = np.bincount(labels, minlength=2)
    n_test = int(np.ceil(test_fraction * len(labels)))
    if counts.min() < 2 or n_test < 2 or len(labels) - n_test < 2:
        raise ValueError(f"cannot split {len(labels)} subjects ({counts[0]} of class 0, "
                         f"{counts[1]} of class 1) with test fraction {test_fraction}: each "
                         f"part needs both classes")
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=n_test, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


class Progress:
    """One line per model on stderr: rewritten in place on a terminal, else every ~10 %."""

    def __init__(self, name: str, epochs: int) -> None:
        self.name, self.epochs, self.start = name, epochs, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, epoch: int, loss: float, accuracy: float) -> None:
        elapsed = time.perf_counter() - self.start
        line = (f"{self.name:>4} epoch {epoch:>3}/{self.epochs}  loss {loss:.4f}  "
                f"train acc {accuracy:.3f}  {elapsed:6.1f}s")
        if self.tty:
            end = "\n" if epoch == self.epochs else ""
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        elif epoch == self.epochs or epoch % max(1, self.epochs // 10) == 0:
            print(line, file=sys.stderr, flush=True)


def build_model(name: str, rois: int, config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    if name == "thc":
        return THC(rois, config.clusters, assignment=config.assignment)
    if name == "bnt":
        return FlatTransformer(rois)
    return GCN(rois)


def _logits(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and the extra loss (THC's cluster term, else 0)."""
    out = model(batch)
    if isinstance(model, THC):
        x = dense_connectivity(batch, model.num_rois)
        return out.logits, cluster_loss(x, out.assignments)
    return out, out.new_zeros(())


def fit(name: str, graphs: list, config: TrainConfig, rois: int) -> Trained:
    """Train one model for `config.epochs` epochs with Adam; a seeded shuffle per epoch."""
    model = build_model(name, rois, config)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    loader = DataLoader(graphs, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed))
    weight = config.cluster_weight if name == "thc" else 0.0
    progress, history = Progress(name, config.epochs), []
    start = time.perf_counter()
    model.train()
    for epoch in range(1, config.epochs + 1):
        total, correct, seen = 0.0, 0, 0
        for batch in loader:
            logits, extra = _logits(model, batch)
            loss = F.cross_entropy(logits, batch.y) + weight * extra
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * batch.num_graphs
            correct += int((logits.argmax(-1) == batch.y).sum())
            seen += batch.num_graphs
        history.append(total / seen)
        progress.update(epoch, total / seen, correct / seen)
    return Trained(name, model.eval(), time.perf_counter() - start, history)


@torch.no_grad()
def predict(model: torch.nn.Module, graphs: list, batch_size: int):
    """p(class 1) per subject, and THC's assignments per level (concatenated over batches)."""
    probs, levels = [], []
    for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False):
        out = model(batch)
        logits = out.logits if isinstance(model, THC) else out
        probs.append(logits.softmax(-1)[:, 1])
        if isinstance(model, THC):
            levels.append(out.assignments)
    assignments = [torch.cat(parts) for parts in zip(*levels)] if levels else []
    return torch.cat(probs).numpy(), assignments


def _write_assignments(path: Path, found: list[np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["roi", *(f"level{i + 1}" for i in range(len(found)))])
        w.writerows(zip(range(len(found[0])), *(ids.tolist() for ids in found)))


def _write_predictions(path: Path, subjects: list[str], labels: np.ndarray,
                       predictions: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "label", *(f"p_{name}" for name in predictions)])
        for i, subject in enumerate(subjects):
            w.writerow([subject, int(labels[i]), *(f"{p[i]:.6f}" for p in predictions.values())])


def run(data: Connectomes | str | Path, out: str | Path, config: TrainConfig) -> dict:
    """Train and evaluate; write OUT/metrics.json, assignments.csv (per-ROI communities),
    predictions.csv (held-out p(class 1) per model), the two pictures, and thc.pt."""
    data = data if isinstance(data, Connectomes) else load_connectomes(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_idx, test_idx = split_subjects(data.labels, config.test_fraction, config.seed)
    graphs = [from_connectivity(m, y=int(y), density=config.density, subject=s)
              for s, m, y in zip(data.subjects, data.matrices, data.labels)]
    train_graphs = [graphs[i] for i in train_idx]
    test_graphs = [graphs[i] for i in test_idx]
    y_test = data.labels[test_idx]
    results: dict[str, dict] = {}
    predictions: dict[str, np.ndarray] = {}
    thc_assignments: list[torch.Tensor] = []
    for name in ("thc", *config.baselines):
        trained = fit(name, train_graphs, config, data.num_rois)
        prob1, assignments = predict(trained.model, test_graphs, config.batch_size)
        predictions[name] = prob1
        results[name] = {**evaluate.classification_metrics(y_test, prob1),
                         "train_seconds": round(trained.seconds, 2),
                         "parameters": trained.parameters,
                         "final_train_loss": trained.history[-1]}
        if name == "thc":
            thc_assignments = assignments
            torch.save({"state_dict": trained.model.state_dict(), "config": asdict(config),
                        "num_rois": data.num_rois}, out / "thc.pt")
    graph = evaluate.group_graph(data.matrices[test_idx])
    soft = evaluate.composite_assignments(thc_assignments)  # coarsest first
    found = [s.argmax(axis=1) for s in soft]
    communities = evaluate.community_metrics(found, data.communities, graph)
    results["thc"].update(communities)
    reference = {"louvain": evaluate.louvain_reference(graph, data.communities, config.seed)}
    if data.communities:
        reference["planted_modularity"] = {
            name: evaluate.partition_modularity(graph, ids)
            for name, ids in data.communities.items()}
    _write_assignments(out / "assignments.csv", found)
    _write_predictions(out / "predictions.csv", [data.subjects[i] for i in test_idx], y_test,
                       predictions)
    mean_matrix = data.matrices[test_idx].mean(axis=0)
    truth = list(data.communities.values()) if data.communities else None
    plots.plot_reordered_connectivity(mean_matrix, found, out / "connectivity_communities.png",
                                      truth)
    plots.plot_assignment_heatmap(soft, found, out / "assignment_heatmap.png")
    metrics = {
        **{k: results["thc"][k] for k in ("auroc", "accuracy")},
        **{k: results["thc"][k] for k in ("nmi", "ari", "modularity") if k in results["thc"]},
        "models": results,
        "reference": reference,
        "split": {"seed": config.seed, "train": len(train_idx), "test": len(test_idx),
                  "test_positive": int(y_test.sum())},
        "data": {"folder": str(data.folder), "subjects": len(data.subjects),
                 "rois": data.num_rois},
        "config": asdict(config),
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "processor": platform.machine()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
