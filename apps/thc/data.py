"""Connectome folders: the synthetic generator and the reader/validator of the public format.

Folder format (the contract for real data too):
    <subject>.npy               one N×N connectivity matrix per subject (or <subject>.npz holding
                                one array, or an array named `connectivity`)
    labels.csv                  columns `subject,label`; label 0 or 1; subject = the file's stem
    communities.csv (optional)  columns `roi,level1[,level2]`: ground-truth communities per ROI
                                (roi = 0..N-1, row/column index of the matrices), level1 the
                                coarsest partition, level2 a finer one
Matrices must be square, symmetric, finite and of one size; an infinite diagonal (Fisher z of a
self-correlation of 1) is read as 0.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYMMETRY_RTOL, SYMMETRY_ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class Connectomes:
    """A validated folder. matrices (S, N, N) float32, labels (S,) int64 in {0, 1},
    communities: level name -> (N,) int64 community ids, or None."""

    folder: Path
    subjects: tuple[str, ...]
    matrices: np.ndarray
    labels: np.ndarray
    communities: dict[str, np.ndarray] | None

    @property
    def num_rois(self) -> int:
        return int(self.matrices.shape[1])


# ---------------------------------------------------------------------------------- synthesis
def planted_communities(rois: int, modules: int, submodules: int) -> tuple[np.ndarray, ...]:
    """(level1, level2) community ids of ROIs 0..N-1 before shuffling: `modules` contiguous
    near-equal modules, each cut into `submodules` near-equal submodules (ids 0..M·m−1)."""
    if modules < 1 or submodules < 1 or rois < modules * submodules:
        raise ValueError(f"rois ({rois}) must be at least modules × submodules "
                         f"({modules} × {submodules})")
    level1 = np.zeros(rois, dtype=np.int64)
    level2 = np.zeros(rois, dtype=np.int64)
    for m, module in enumerate(np.array_split(np.arange(rois), modules)):
        level1[module] = m
        for j, part in enumerate(np.array_split(module, submodules)):
            level2[part] = m * submodules + j
    return level1, level2


def synthesize(out: str | Path, subjects: int = 300, rois: int = 100, *, modules: int = 4,
               submodules: int = 3, timepoints: int = 100, effect: float = 0.2,
               jitter: float = 0.2, seed: int = 0) -> Path:
    """Write a folder of synthetic brain networks with planted hierarchical communities.

    Per subject, T time series from a factor model (always positive definite):
        X = √0.1·z_global + a·Z_module[level1] + b·Z_submodule[level2] + √0.4·E,
    a² = 0.3, b² = 0.4 each scaled by U(1 − jitter, 1 + jitter) per subject, so that
    Σ = 0.1·11ᵀ + a²·[same module] + b²·[same submodule] + 0.4·I (the recipe of
    `reference/thc.md`). Label 1 subjects get one more factor √effect·z_link shared by modules 0
    and 1 (their coupling rises): the label depends on the community structure. Connectivity is
    Fisher z of the correlation, with a zero diagonal. ROIs are shuffled (seeded) so communities
    are not contiguous; communities.csv records them. Labels are balanced.
    """
    if subjects < 4:
        raise ValueError(f"subjects ({subjects}) must be at least 4")
    if timepoints < 3:
        raise ValueError(f"timepoints ({timepoints}) must be at least 3")
    if effect < 0 or not 0 <= jitter < 1:
        raise ValueError(f"effect ({effect}) must be >= 0 and jitter ({jitter}) in [0, 1)")
    level1, level2 = planted_communities(rois, modules, submodules)
    rng = np.random.default_rng(seed)
    order = rng.permutation(rois)  # ROI i of the files is planted ROI order[i]
    level1, level2 = level1[order], level2[order]
    labels = rng.permutation(np.arange(subjects) % 2)
    linked = np.isin(level1, [0, 1]) if modules > 1 else level1 == 0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(subjects)))
    names = [f"sub-{i + 1:0{width}d}" for i in range(subjects)]
    for name, label in zip(names, labels):
        a, b = np.sqrt([0.3, 0.4]) * rng.uniform(1 - jitter, 1 + jitter, size=2)
        x = (np.sqrt(0.1) * rng.standard_normal((timepoints, 1))
             + a * rng.standard_normal((timepoints, modules))[:, level1]
             + b * rng.standard_normal((timepoints, modules * submodules))[:, level2]
             + np.sqrt(0.4) * rng.standard_normal((timepoints, rois)))  # (T, N)
        if label:
            x = x + np.sqrt(effect) * rng.standard_normal((timepoints, 1)) * linked
        r = np.corrcoef(x.T)  # (N, N)
        z = np.arctanh(np.clip(r, -1 + 1e-7, 1 - 1e-7))
        np.fill_diagonal(z, 0.0)
        np.save(out / f"{name}.npy", z.astype(np.float32))
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "label"])
        w.writerows(zip(names, labels.tolist()))
    with open(out / "communities.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["roi", "level1", "level2"])
        w.writerows(zip(range(rois), level1.tolist(), level2.tolist()))
    return out


# ------------------------------------------------------------------------------------ reading
def _load_array(path: Path) -> np.ndarray:
    """The array in a .npy, or in a .npz (its only array, or the one named `connectivity`)."""
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "connectivity" in keys or len(keys) == 1:
                return archive["connectivity" if "connectivity" in keys else keys[0]]
    except Exception as exc:  # corrupt, pickled, or not numpy at all
        raise ValueError(f"{path}: cannot be read as a numpy array ({exc})") from None
    raise ValueError(f"{path}: an .npz must hold one array or one named 'connectivity', "
                     f"found {keys}")


def _read_matrix(path: Path) -> np.ndarray:
    m = _load_array(path)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{path}: connectivity must be a square N×N matrix, got shape "
                         f"{m.shape}")
    if not np.issubdtype(m.dtype, np.number) or np.iscomplexobj(m):
        raise ValueError(f"{path}: connectivity must be real numbers, got dtype {m.dtype}")
    m = m.astype(np.float64)
    diagonal = np.diagonal(m).copy()
    if np.isnan(m).any():
        i, j = np.argwhere(np.isnan(m))[0]
        raise ValueError(f"{path}: {int(np.isnan(m).sum())} NaN value(s), first at ({i}, {j})")
    m[np.diag_indices_from(m)] = np.where(np.isinf(diagonal), 0.0, diagonal)
    if not np.isfinite(m).all():
        i, j = np.argwhere(~np.isfinite(m))[0]
        raise ValueError(f"{path}: infinite value {m[i, j]} at ({i}, {j}) off the diagonal")
    gap = np.abs(m - m.T)
    if (gap > SYMMETRY_ATOL + SYMMETRY_RTOL * np.abs(m)).any():
        i, j = np.unravel_index(int(np.argmax(gap)), gap.shape)
        raise ValueError(f"{path}: connectivity is not symmetric: m[{i}, {j}] = {m[i, j]:.6g} "
                         f"but m[{j}, {i}] = {m[j, i]:.6g}")
    return m.astype(np.float32)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {header}, expected "
                             f"{','.join(columns)}")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]


def _read_labels(path: Path, subjects: list[str], files: dict[str, Path]) -> np.ndarray:
    if not path.exists():
        raise ValueError(f"{path} is missing: expected a labels.csv with columns subject,label")
    labels: dict[str, int] = {}
    for row in _read_csv(path, ("subject", "label")):
        subject = row["subject"].removesuffix(".npy").removesuffix(".npz")
        value = row["label"]
        if value not in ("0", "1", "0.0", "1.0"):
            raise ValueError(f"{path}: label {value!r} of subject {subject!r} is not binary "
                             f"(accepted: 0 or 1)")
        if subject in labels:
            raise ValueError(f"{path}: subject {subject!r} is labelled twice")
        labels[subject] = int(float(value))
    unlabelled = [s for s in subjects if s not in labels]
    if unlabelled:
        raise ValueError(f"{path}: no label for {len(unlabelled)} subject file(s), e.g. "
                         f"{files[unlabelled[0]]}")
    extra = sorted(set(labels) - set(subjects))
    if extra:
        warnings.warn(f"{path}: {len(extra)} labelled subject(s) have no matrix file and are "
                      f"ignored, e.g. {extra[0]!r}", stacklevel=3)
    return np.array([labels[s] for s in subjects], dtype=np.int64)


def _read_communities(path: Path, rois: int) -> dict[str, np.ndarray]:
    rows = _read_csv(path, ("roi", "level1"))
    levels = ["level1"] + (["level2"] if rows and "level2" in rows[0] else [])
    out = {name: np.full(rois, -1, dtype=np.int64) for name in levels}
    seen: set[int] = set()
    for row in rows:
        try:
            roi = int(row["roi"])
            ids = {name: int(row[name]) for name in levels}
        except ValueError:
            raise ValueError(f"{path}: roi and level columns must be integers, got row "
                             f"{row}") from None
        if not 0 <= roi < rois:
            raise ValueError(f"{path}: roi {roi} is outside 0..{rois - 1} (the matrices are "
                             f"{rois}×{rois})")
        if roi in seen:
            raise ValueError(f"{path}: roi {roi} is listed twice")
        seen.add(roi)
        for name, value in ids.items():
            out[name][roi] = value
    for name, ids in out.items():
        if (ids < 0).any():
            raise ValueError(f"{path}: {name} has no non-negative community for roi "
                             f"{int(np.argmax(ids < 0))} (every roi 0..{rois - 1} needs one)")
    return out


def load_connectomes(folder: str | Path) -> Connectomes:
    """Read and validate a connectome folder (see the module docstring); errors name the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist or is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".npy", ".npz") or not path.is_file():
            continue
        if path.stem in files:
            raise ValueError(f"subject {path.stem!r} has two files: {files[path.stem]} and {path}")
        files[path.stem] = path
    if not files:
        raise ValueError(f"data folder {folder} holds no subject file (<subject>.npy or .npz)")
    subjects = list(files)
    matrices = [_read_matrix(files[s]) for s in subjects]
    sizes = [m.shape[0] for m in matrices]
    common = max(set(sizes), key=sizes.count)
    odd = [s for s, n in zip(subjects, sizes) if n != common]
    if odd:
        raise ValueError(f"{files[odd[0]]}: {sizes[subjects.index(odd[0])]} ROIs, but "
                         f"{sizes.count(common)} other subject(s) have {common} "
                         f"({len(odd)} file(s) differ)")
    labels = _read_labels(folder / "labels.csv", subjects, files)
    communities_path = folder / "communities.csv"
    communities = (_read_communities(communities_path, common)
                   if communities_path.exists() else None)
    return Connectomes(folder, tuple(subjects), np.stack(matrices), labels, communities)
