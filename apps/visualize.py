"""`visualize_clusters(model, image, out_dir)`: heat maps of what clustering attention groups.

- PaCa-ViT (`clusterfx.models.PaCaViT`): per stage, the M soft assignment maps z_m (each a
  distribution over the patches, shown over the image, colour scale per map) and their argmax
  as coloured regions. Only layers that compute an assignment are shown (with stage-wise
  sharing, a stage's first block).
- A model rewritten by `cfx.PatchToCluster` (it holds `PatchClustering` modules after its
  first compiled call; pass the model or what `cfx.compile` returned): the same per site. The
  assignment is recomputed eagerly from the site module's input, captured by a forward
  pre-hook while the (uncompiled) model runs; a site whose input is not (1, P + H·W, C)
  tokens is skipped with a message.
- TCFormer (`clusterfx.models.TCFormer`): per stage after a CTM, the token clusters drawn on
  the image as coloured regions with their borders (each initial grid cell coloured by the
  token that owns it), and one panel with every stage.

`image` is what the model takes: (C, H, W) or (1, C, H, W). `display` is the picture drawn
underneath (H×W×3 floats in [0, 1] or uint8); default: the image, min-max scaled per channel.
Returns the paths written (PNG, matplotlib's Agg backend, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clusterfx.models.paca_vit import PaCaAttention, PaCaViT
from clusterfx.models.tcformer import TCFormer
from clusterfx.ops.paca import PatchClustering

MAX_MAPS = 100  # assignment maps drawn per layer (the first M)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _display(image: torch.Tensor, display: Any) -> np.ndarray:
    if display is not None:
        arr = np.asarray(display)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"display has shape {arr.shape}; expected (H, W, 3)")
        return np.clip(arr, 0.0, 1.0)
    img = image[0].detach().float()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    lo = img.flatten(1).amin(1)[:, None, None]
    hi = img.flatten(1).amax(1)[:, None, None]
    return ((img[:3] - lo[:3]) / (hi[:3] - lo[:3]).clamp_min(1e-8)).permute(1, 2, 0).numpy()


def _upsample(maps: torch.Tensor, size: tuple[int, int], mode: str) -> np.ndarray:
    """(M, h, w) -> (M, H, W) numpy."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(maps[:, None].float(), size=size, mode=mode, **kwargs)[:, 0]
    return out.numpy()


def _palette(count: int, seed: int = 0) -> np.ndarray:
    """`count` distinct-looking RGB colours (random hues, fixed seed)."""
    rng = np.random.default_rng(seed)
    plt = _pyplot()
    hues = rng.permutation(count) / max(count, 1)
    return plt.cm.hsv(hues)[:, :3] * 0.85 + 0.1


def _write_assignment(z: torch.Tensor, grid: tuple[int, int], picture: np.ndarray, title: str,
                      path: Path, max_maps: int) -> list[Path]:
    """z (M, H·W) soft assignment: a grid of heat maps and the argmax regions."""
    plt = _pyplot()
    size = picture.shape[:2]
    m = min(z.shape[0], max_maps)
    maps = z[:m].reshape(m, *grid)
    heat = _upsample(maps, size, "bilinear")
    cols = math.ceil(math.sqrt(m))
    rows = math.ceil(m / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    grey = picture.mean(axis=2)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < m:
            ax.imshow(grey, cmap="gray")
            ax.imshow(heat[i], cmap="jet", alpha=0.55)  # colour scale per map
            ax.set_title(f"{i}", fontsize=6)
    fig.suptitle(f"{title}: {m} of {z.shape[0]} cluster assignment maps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    hard = z.argmax(dim=0).reshape(1, *grid).float()
    labels = _upsample(hard, size, "nearest")[0].astype(int)
    colours = _palette(z.shape[0])[labels]
    regions = path.with_name(path.stem + "_argmax.png")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(0.5 * picture + 0.5 * colours)
    ax.axis("off")
    ax.set_title(f"{title}: most likely cluster of each patch", fontsize=9)
    fig.tight_layout()
    fig.savefig(regions, dpi=110)
    plt.close(fig)
    return [path, regions]


def _name(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_") or "root"


def _paca_vit(model: PaCaViT, image, picture, out: Path, max_maps: int) -> list[Path]:
    layers = [(i, j, block.attn) for i, stage in enumerate(model.stages)
              for j, block in enumerate(stage)
              if block.attn.clusters and block.attn.clustering is not None]
    for _, _, layer in layers:
        layer.record_assignment, layer.last_assignment = True, None
    try:
        with torch.no_grad():
            model(image)
    finally:
        for _, _, layer in layers:
            layer.record_assignment = False
    grids = model.grids(image.shape[-1])
    written = []
    for i, j, layer in layers:
        z = layer.last_assignment[0]
        written += _write_assignment(z, grids[i], picture, f"PaCa stage {i + 1} block {j + 1}",
                                     out / f"paca_stage{i + 1}_block{j + 1}.png", max_maps)
        layer.last_assignment = None
    return written


def _rewritten(model: torch.nn.Module, image, picture, out: Path, max_maps: int) -> list[Path]:
    sites = [(name.rsplit(".", 1)[0] if "." in name else "", module)
             for name, module in model.named_modules() if isinstance(module, PatchClustering)]
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for path, _ in sites:
        owner = model.get_submodule(path) if path else model

        def grab(_module, args, path=path):
            if args and isinstance(args[0], torch.Tensor):
                captured[path] = args[0].detach()

        hooks.append(owner.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for hook in hooks:
            hook.remove()
    written = []
    for path, clustering in sites:
        x = captured.get(path)
        patches = clustering.grid[0] * clustering.grid[1]
        if x is None or x.dim() != 3 or x.shape[0] != 1 or x.shape[1] < patches:
            print(f"visualize_clusters: skipped {path}: its input is "
                  f"{None if x is None else tuple(x.shape)}, not (1, P + {patches}, C) tokens")
            continue
        with torch.no_grad():
            z = clustering(x[:, x.shape[1] - patches:]).softmax(dim=-1)[0]
        written += _write_assignment(z, clustering.grid, picture, f"PatchToCluster {path}",
                                     out / f"paca_{_name(path)}.png", max_maps)
    return written


def _tcformer(model: TCFormer, image, picture, out: Path) -> list[Path]:
    plt = _pyplot()
    with torch.no_grad():
        stages = model.forward_features(image)
    size = picture.shape[:2]
    panels = []
    written = []
    for i, tokens in enumerate(stages[1:], start=2):
        grid = tokens.init_grid
        owner = tokens.idx_token[0].reshape(1, *grid).float()
        labels = _upsample(owner, size, "nearest")[0].astype(int)
        colours = _palette(tokens.x.shape[1], seed=i)[labels]
        border = np.zeros(size, dtype=bool)
        border[1:, :] |= labels[1:, :] != labels[:-1, :]
        border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        blend = 0.45 * picture + 0.55 * colours
        blend[border] = 1.0
        panels.append((f"stage {i}: {tokens.x.shape[1]} tokens", blend))
        path = out / f"tcformer_stage{i}.png"
        plt.imsave(path, np.clip(blend, 0, 1))
        written.append(path)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4.3))
    for ax, (title, img) in zip(axes, [("image", picture), *panels]):
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("TCFormer token clusters (each colour: one merged token)", fontsize=10)
    fig.tight_layout()
    path = out / "tcformer_clusters.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*written, path]


def visualize_clusters(model: Any, image: torch.Tensor, out_dir: str | Path, *,
                       display: Any = None, max_maps: int = MAX_MAPS) -> list[Path]:
    """Write cluster heat maps of `model` on `image` into `out_dir`; return the PNG paths.

    Raises ValueError for a model without clustering attention (no PaCa layer, no
    PatchToCluster module, not a TCFormer) or an image of the wrong rank.
    """
    model = getattr(model, "_orig_mod", model)  # what cfx.compile returned -> the user's model
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model ({type(model).__name__}) must be an nn.Module")
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
        raise ValueError("image must be a tensor (C, H, W) or (1, C, H, W) that the model takes")
    image = image if image.dim() == 4 else image[None]
    if image.shape[0] != 1:
        raise ValueError(f"image has batch {image.shape[0]}; give one image")
    image = image.to(next(model.parameters()).dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    picture = _display(image, display)
    if picture.shape[:2] != tuple(image.shape[-2:]):
        picture_t = torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1)[None]
        picture = F.interpolate(picture_t.float(), size=tuple(image.shape[-2:]), mode="bilinear",
                                align_corners=False)[0].permute(1, 2, 0).clamp(0, 1).numpy()
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, PaCaViT):
            return _paca_vit(model, image, picture, out, max_maps)
        if isinstance(model, TCFormer):
            return _tcformer(model, image, picture, out)
        if any(isinstance(m, PatchClustering) for m in model.modules()):
            return _rewritten(model, image, picture, out, max_maps)
        if any(isinstance(m, PaCaAttention) and m.clusters for m in model.modules()):
            raise ValueError("PaCa layers outside a PaCaViT: call visualize on the PaCaViT")
    finally:
        model.train(was_training)
    raise ValueError(f"{type(model).__name__} has no clustering attention to show: expected a "
                     f"PaCaViT, a TCFormer, or a model compiled with cfx.PatchToCluster (after "
                     f"its first call)")
