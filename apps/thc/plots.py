"""Pictures of the communities THC finds (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def hierarchy_order(levels: Sequence[np.ndarray]) -> np.ndarray:
    """ROI order that groups ROIs by the coarsest level, then by each finer one (stable)."""
    return np.lexsort(tuple(levels[::-1])) if levels else np.array([], dtype=np.int64)


def _draw_blocks(ax, ids: np.ndarray, color: str, width: float) -> None:
    """Squares on the diagonal around each run of equal ids (ids already in display order)."""
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), i - start, i - start,
                                   fill=False, edgecolor=color, linewidth=width))
            start = i


def _matrix_panel(ax, matrix: np.ndarray, levels: Sequence[np.ndarray], title: str):
    order = hierarchy_order(levels)
    reordered = matrix[np.ix_(order, order)]
    limit = float(np.percentile(np.abs(reordered), 99)) or 1.0
    image = ax.imshow(reordered, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    # finer levels first (thin), the coarsest last (thick) so it stays on top
    for depth, ids in reversed(list(enumerate(levels))):
        _draw_blocks(ax, ids[order], "black" if depth == 0 else "dimgray",
                     2.0 if depth == 0 else 0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("ROI (reordered)")
    ax.set_ylabel("ROI (reordered)")
    return image


def plot_reordered_connectivity(matrix: np.ndarray, found: Sequence[np.ndarray], path: Path,
                                truth: Sequence[np.ndarray] | None = None) -> Path:
    """The group connectivity matrix reordered by the found communities (coarsest first),
    nested squares drawing the hierarchy; beside it, the same for the known communities."""
    panels = [("found by THC", found)] + ([("ground truth", truth)] if truth else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, levels) in zip(axes[0], panels):
        counts = " → ".join(str(len(np.unique(ids))) for ids in levels)
        image = _matrix_panel(ax, matrix, levels, f"{title} ({counts} communities)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean connectivity")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_assignment_heatmap(soft: Sequence[np.ndarray], found: Sequence[np.ndarray],
                            path: Path) -> Path:
    """Soft assignment per level (ROIs × clusters, coarsest level first), rows ordered by the
    found hierarchy, columns by cluster."""
    order = hierarchy_order(found)
    fig, axes = plt.subplots(1, len(soft), figsize=(3.2 * len(soft) + 1.5, 5.0), squeeze=False)
    for i, (ax, s) in enumerate(zip(axes[0], soft)):
        rows = s[order]
        # clusters in the order their first ROI appears, so the picture reads as a diagonal
        columns = np.argsort([np.flatnonzero(rows.argmax(1) == c)[:1].tolist() or [len(rows)]
                              for c in range(s.shape[1])], axis=0, kind="stable")[:, 0]
        image = ax.imshow(rows[:, columns], aspect="auto", cmap="viridis",
                          interpolation="nearest", vmin=0.0, vmax=max(float(s.max()), 1e-12))
        ax.set_title(f"level{i + 1}: {s.shape[1]} clusters", fontsize=10)
        ax.set_xticks(range(s.shape[1]), [str(c) for c in columns],
                      fontsize=7 if s.shape[1] > 12 else 9)
        ax.set_xlabel("cluster")
        ax.set_ylabel("ROI (ordered by found communities)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("THC soft assignment, mean over held-out subjects")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
