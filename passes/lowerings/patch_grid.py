"""The patch grid of a vision transformer, read from the model (for PatchToCluster).

A submodule says what grid it cuts images into by one of:
- `grid_size`: (H, W) or an int (timm's `PatchEmbed`, `clusterfx.models.ViT`);
- `image_size` (or `img_size`) and `patch_size`, ints or pairs (Hugging Face
  `ViTPatchEmbeddings`, DeiT's), giving (image_h // patch_h, image_w // patch_w).
"""

from __future__ import annotations

import torch

MAX_PREFIX_TOKENS = 16  # class + distillation + register tokens in the ViTs we know


def _pair(value) -> tuple[int, int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value, value) if value > 0 else None
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def grids_of(root: torch.nn.Module) -> dict[tuple[int, int], str]:
    """{(H, W): the first submodule path declaring it} over the model's submodules."""
    found: dict[tuple[int, int], str] = {}
    for path, module in root.named_modules():
        grid = _pair(getattr(module, "grid_size", None))
        if grid is None:
            image = _pair(getattr(module, "image_size", getattr(module, "img_size", None)))
            patch = _pair(getattr(module, "patch_size", None))
            if image is not None and patch is not None and image[0] >= patch[0] and (
                    image[1] >= patch[1]):
                grid = (image[0] // patch[0], image[1] // patch[1])
        if grid is not None:
            found.setdefault(grid, path or "<root>")
    return found
