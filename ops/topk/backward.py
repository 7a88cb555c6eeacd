"""Backward of top-k attention: gradients of the softmax over the selected keys.

The selection T_i is discrete, so it is a constant of the backward. With ``a`` the selected
softmax weights of query i, ``o_i = sum_j a_ij v_j`` and ``g_i = dL/do_i``::

    dv_j  += a_ij g_i                                  for j in T_i
    ds_ij  = a_ij (<g_i, v_j> - <g_i, o_i>)
    dq_i   = scale * sum_j ds_ij k_j
    dk_j  += scale * ds_ij q_i                         (summed over the G heads sharing k)
    dmask_ij = ds_ij                                   (additive float mask, reduced over its
                                                        broadcast dims)

The custom op's schema returns only the output, so the indices cannot be saved from the
forward: this function re-runs the same chunked selection (``selection.py``, shared with the
cpu and triton forwards, hence the same keys), then applies the formulas above per chunk.
Memory is O(C*Nk + C*k*(D+Dv)) per chunk plus the gradients themselves; the mask gradient,
only computed when asked for, is as large as the mask. It is plain torch for every ``impl``.
"""

from __future__ import annotations

import torch

from clusterfx.ops.topk.common import (
    chunk_scores,
    compute_dtype,
    gather_rows,
    mask_rows,
    query_chunks,
    scatter_rows_add_,
    select_topk,
    softmax_selected,
)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dims where ``shape`` is 1 (the adjoint of broadcasting, rank 4)."""
    dims = [i for i in range(4) if shape[i] == 1 and t.shape[i] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def topk_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, attn_mask: torch.Tensor | None, *, topk: int,
                            is_causal: bool, scale: float, chunk_size: int, mask_grad: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor | None]:
    """(dq, dk, dv, dmask) of top-k attention; dmask is None unless ``mask_grad``.

    Shapes: grad_out (B, H, Nq, Dv), q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv),
    attn_mask None or rank 4 broadcastable to (B, H, Nq, Nk) -> gradients shaped and typed like
    q, k, v and attn_mask. Accumulation runs in fp32 (fp64 for fp64 inputs).
    """
    work = compute_dtype(q.dtype)
    k_c, v_c = k.to(work), v.to(work)
    dq = torch.empty(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    want_mask = mask_grad and attn_mask is not None
    dmask = torch.zeros(attn_mask.shape, dtype=work, device=q.device) if want_mask else None
    for start, end in query_chunks(q.shape[2], chunk_size):
        scores = chunk_scores(q, k_c, attn_mask, start, end, is_causal, scale)
        values, idx = select_topk(scores, topk)
        del scores
        a = softmax_selected(values)  # (B, H, C, k)
        k_sel = gather_rows(k_c, idx)  # (B, H, C, k, D)
        v_sel = gather_rows(v_c, idx)  # (B, H, C, k, Dv)
        g = grad_out[:, :, start:end].to(work)  # (B, H, C, Dv)
        o = (a.unsqueeze(-2) @ v_sel).squeeze(-2)  # (B, H, C, Dv)
        dp = (v_sel @ g.unsqueeze(-1)).squeeze(-1)  # (B, H, C, k)
        ds = a * (dp - (g * o).sum(dim=-1, keepdim=True))  # (B, H, C, k)
        dq[:, :, start:end] = scale * (ds.unsqueeze(-2) @ k_sel).squeeze(-2)
        q_c = q[:, :, start:end].to(work)
        scatter_rows_add_(dk, idx, scale * ds.unsqueeze(-1) * q_c.unsqueeze(-2))
        scatter_rows_add_(dv, idx, a.unsqueeze(-1) * g.unsqueeze(-2))
        if dmask is not None:
            full = torch.zeros(*idx.shape[:-1], k.shape[2], dtype=work, device=q.device)
            full.scatter_add_(-1, idx, ds)  # (B, H, C, Nk)
            rows = mask_rows(dmask, start, end)
            rows += _sum_to(full, rows.shape)
    dmask_out = dmask.to(attn_mask.dtype) if dmask is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask_out
