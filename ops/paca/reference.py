"""Plain-torch patch-to-cluster attention: the oracle every other implementation is checked
against. It writes every step out (explicit softmaxes, the full score matrices) and is meant
for tests, float64 included; ordinary autograd differentiates it.

With P = prefix class/register tokens first and Np = N - P patches::

    z      = softmax_n(logits)                      (B, M, Np)   each cluster: weights over patches
    Kc, Vc = z · K[P:],  z · V[P:]                  (B, H, M, D), shared z over heads
    O[i]   = softmax_j(scale q_i · K'_j) V'_j        i >= P,  K' = [K[:P]; Kc], V' = [V[:P]; Vc]
    O[i]   = softmax_j(scale q_i · K_j) V_j          i <  P   (exact, over all N keys)

``paca_layer_reference``: the whole layer from the patches in torch (``paca_layer``'s "reference"
implementation, equal to ``models.paca_vit.PaCaAttention``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clusterfx.ops.paca.common import cluster_logits


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q kᵀ) v with the probabilities written out. (…, Nq, D) -> (…, Nq, Dv)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp()
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def paca_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             logits: torch.Tensor, *, prefix: int, scale: float) -> torch.Tensor:
    """Shapes: q, k (B, H, N, D), v (B, H, N, Dv), logits (B, M, N - prefix) -> (B, H, N, Dv) in
    q's dtype. fp16/bf16 (and fp32) are computed in fp32, fp64 in fp64. No argument checks."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, logits = q.to(work), k.to(work), v.to(work), logits.to(work)
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    z = shifted.exp() / shifted.exp().sum(dim=-1, keepdim=True)  # (B, M, Np)
    kc = torch.einsum("bmn,bhnd->bhmd", z, k[:, :, prefix:])  # (B, H, M, D)
    vc = torch.einsum("bmn,bhnd->bhmd", z, v[:, :, prefix:])  # (B, H, M, Dv)
    keys = torch.cat([k[:, :, :prefix], kc], dim=2)  # (B, H, P + M, D)
    values = torch.cat([v[:, :, :prefix], vc], dim=2)
    patches = _attend(q[:, :, prefix:], keys, values, scale)  # (B, H, Np, Dv)
    heads = _attend(q[:, :, :prefix], k, v, scale)  # (B, H, P, Dv)
    return torch.cat([heads, patches], dim=2)


def paca_layer_reference(x: torch.Tensor, grid: tuple[int, int], kind: str,
                         head: Sequence[torch.Tensor], q: tuple, kv: tuple, proj: tuple,
                         heads: int, norm: tuple | None = None,
                         prior: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole PaCa layer in torch (``paca_layer``'s formula; differentiable)::

        z = softmax_patches(cluster_logits(x) + prior); tokens = LayerNorm(z x)
        k, v = halves of tokens Wkvᵀ + bkv; out = proj(MHA(x Wqᵀ + bq, k, v))
    """
    b, n, c = x.shape
    params = [*head] + ([prior] if prior is not None else [])
    z = cluster_logits(x, params, kind, grid, prior is not None).softmax(dim=-1)
    tokens = z @ x
    if norm is not None:
        tokens = F.layer_norm(tokens, (c,), norm[0], norm[1], norm[2])
    k, v = F.linear(tokens, *kv).view(b, tokens.shape[1], 2, heads, c // heads).permute(
        2, 0, 3, 1, 4)
    qh = F.linear(x, *q).view(b, n, heads, c // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, k, v)
    return F.linear(out.transpose(1, 2).reshape(b, n, c), *proj), z
