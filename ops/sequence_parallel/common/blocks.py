"""Block attention with its log-sum-exp, in plain torch (any device, float64-capable), and the
log-sum-exp merge: what ring attention is made of.

For one block of keys (additive bias β, -inf = masked; `causal`: key j ≤ query i, both
counted from the block's start)::

    s = scale · q kᵀ + β,   lse = log Σ_j e^{s_j},   out = Σ_j e^{s_j - lse} v_j

Merging two blocks' (out, lse) gives the attention over their union::

    lse = log(e^{lse_a} + e^{lse_b}),   out = e^{lse_a - lse} out_a + e^{lse_b - lse} out_b

A row with no unmasked key in a block has lse = -inf and out = 0; a row with none at all
stays (0, -inf), as SDPA gives zeros for it.

Backward of one block, given the *global* out O and lse (so that p is the final softmax)::

    p = e^{s - lse},  dv = pᵀ dO,  dp = dO vᵀ,  δ = rowsum(dO ⊙ O),  ds = p ⊙ (dp - δ)
    dq = scale · ds k,  dk = scale · dsᵀ q

and with a gradient g_lse flowing into lse too (∂lse/∂s = p): ds = p ⊙ (dp - (δ - g_lse)).

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) with H a multiple of Hk (query
head h reads kv head h // (H/Hk)), bias broadcastable to (B, H, Nq, Nk) → out (B, H, Nq, Dv),
lse (B, H, Nq), both in the compute dtype (float64 for float64, float32 otherwise).
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import compute_dtype


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hk, N, E) → (B, heads, N, E): kv head h serves query heads h·G .. h·G+G-1."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def fold_kv(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, N, E) → (B, Hk, N, E): the sum over each kv head's query heads (GQA grads)."""
    B, H, N, E = x.shape
    return x if H == kv_heads else x.view(B, kv_heads, H // kv_heads, N, E).sum(2)


def block_scores(q, k, bias, scale: float, causal: bool) -> torch.Tensor:
    cd = compute_dtype(q)
    s = (q.to(cd) @ expand_kv(k, q.shape[1]).to(cd).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(cd)
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def scores_forward(s, v):
    """(out, lse) of one block from its scores s (B, H, Nq, Nk) in the compute dtype."""
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    out = p @ expand_kv(v, s.shape[1]).to(s.dtype)
    return out, lse


def math_block_forward(q, k, v, bias, scale: float, causal: bool):
    """(out, lse) of one block, materialising its Nq × Nk scores."""
    return scores_forward(block_scores(q, k, bias, scale, causal), v)


def safe_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a row without any key) as +inf, so that e^{s - lse} = 0, not NaN."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def math_block_backward(dout, q, k, v, out, lse, bias, scale: float, causal: bool,
                        grad_lse=None):
    """(dq, dk, dv) of one block in the compute dtype, given the global out and lse, and
    optionally a gradient `grad_lse` (B, H, Nq) flowing into lse (∂lse/∂s = p, so it joins
    δ: ds = p ⊙ (dp - (δ - g_lse)))."""
    cd = compute_dtype(q)
    H, Hk = q.shape[1], k.shape[1]
    s = block_scores(q, k, bias, scale, causal)
    p = torch.exp(s - safe_lse(lse).to(cd)[..., None])
    do = dout.to(cd)
    ve = expand_kv(v, H).to(cd)
    dv = p.transpose(-1, -2) @ do
    dp = do @ ve.transpose(-1, -2)
    delta = (do * out.to(cd)).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(cd)[..., None]
    ds = p * (dp - delta)
    dq = (ds @ expand_kv(k, H).to(cd)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(cd)) * scale
    return dq, fold_kv(dk, Hk), fold_kv(dv, Hk)


def merge(out, lse, block_out, block_lse):
    """Fold one block's (out, lse) into the running (out, lse) (stable, -inf safe)."""
    new = torch.logaddexp(lse, block_lse)
    ref = new.masked_fill(torch.isneginf(new), 0.0)
    wa = torch.exp(lse - ref).masked_fill(torch.isneginf(new), 0.0)[..., None]
    wb = torch.exp(block_lse - ref).masked_fill(torch.isneginf(new), 0.0)[..., None]
    return out * wa + block_out.to(out.dtype) * wb, new


def additive_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool keep-mask (True = attend) as 0 / -inf; a float mask as it is, in `dtype`."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, float("-inf"))
    return mask.to(dtype)
