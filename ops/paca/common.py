"""What the implementations and the backward of the PaCa family share (not a backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfx.ops.common.checks import compute_dtype

CLUSTERINGS = ("conv", "mlp", "linear")


def default_scale(head_dim: int, scale: float | None) -> float:
    """The score scale: ``scale``, or D**-0.5 when None."""
    return head_dim ** -0.5 if scale is None else float(scale)


def flops(b: int, h: int, n: int, d: int, dv: int, m: int, prefix: int) -> int:
    """Forward FLOPs (multiply-adds count 2): pooling K and V over the patches, the patch
    queries against P + M keys, and the prefix queries against all N keys."""
    patches = n - prefix
    pool = 2 * b * h * m * patches * (d + dv)
    attend = 2 * b * h * patches * (prefix + m) * (d + dv)
    heads = 2 * b * h * prefix * n * (d + dv)
    return pool + attend + heads


def cluster_logits(x: torch.Tensor, params: list[torch.Tensor] | tuple[torch.Tensor, ...],
                   kind: str, grid: tuple[int, int], has_prior: bool) -> torch.Tensor:
    """Cluster logits of the patches ``x`` (B, H·W, C) -> (B, M, H·W), from the parameters of a
    ``PatchClustering`` in its registration order (the head's, then the prior)."""
    params = list(params)
    prior = params.pop() if has_prior else None
    if kind == "linear":
        (w,) = params
        logits = w.expand(x.shape[0], -1, -1) @ x.mT  # (B, M, Np) contiguous: one bmm
    elif kind == "mlp":
        w1, b1, w2, b2 = params
        logits = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).transpose(1, 2)
    elif kind == "conv":
        w_dw, b_dw, w_pw, b_pw, w_out = params
        # the 1×1 convolutions as channel products in the (B, Np, C) layout: same weights and
        # result, without the convolution kernels' overhead
        y = F.gelu(F.linear(F.gelu(depthwise_on_grid(x, w_dw, b_dw, grid)), w_pw.flatten(1),
                            b_pw))
        logits = w_out.flatten(1).expand(x.shape[0], -1, -1) @ y.mT  # (B, M, Np) contiguous
    else:
        raise ValueError(f"clustering ({kind!r}) must be one of {CLUSTERINGS}")
    return logits if prior is None else logits + prior


def depthwise_on_grid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      grid: tuple[int, int]) -> torch.Tensor:
    """A depthwise convolution (``weight`` (C, 1, k, k), 'same' padding) of the tokens ``x``
    (B, H·W, C) read as a map on ``grid``: (B, H·W, C) -> (B, H·W, C).

    The map is a channels-last view of ``x`` (no copy), so the convolution runs its
    channels-last kernel and its output reads back as tokens without a copy: 2.2× faster than
    through a (B, C, H, W) copy at N = 3136, 3.2× at 12544 (C = 96, 2 CPU threads)."""
    b, n, c = x.shape
    fmap = x.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)  # (B, C, H, W), channels last
    out = F.conv2d(fmap, weight, bias, padding=weight.shape[-1] // 2, groups=c)
    return out.permute(0, 2, 3, 1).reshape(b, n, c)


__all__ = ["CLUSTERINGS", "cluster_logits", "compute_dtype", "default_scale",
           "depthwise_on_grid", "flops"]
