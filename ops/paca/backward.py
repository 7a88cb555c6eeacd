"""Backward of patch-to-cluster attention, written out (one implementation for every impl).

Forward (see the family's ``__init__``): z = softmax(L), Kc = z K_p, Vc = z V_p,
K' = [K_pre; Kc], V' = [V_pre; Vc], A = softmax(s Q_p K'ᵀ), O_p = A V', and the prefix rows
O_pre = softmax(s Q_pre Kᵀ) V. With G = dL/dO::

    dV'  = Aᵀ G_p                      dS = A ⊙ (G_p V'ᵀ - rowsum(G_p ⊙ O_p))
    dQ_p = s dS K'                     dK' = s dSᵀ Q_p
    dK_p += zᵀ dKc,  dV_p += zᵀ dVc    (dKc, dVc: the last M rows of dK', dV')
    dz   = Σ_h (dKc K_pᵀ + dVc V_pᵀ)   dL = z ⊙ (dz - rowsum(dz ⊙ z))

and the same attention formulas for the prefix rows against all N keys. The forward's
intermediates are recomputed (the op returns only O). Memory O(B·H·Np·(P + M)) for A and
O(B·H·P·N) for the prefix rows: never N². fp32 accumulation (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch

from clusterfx.ops.paca.common import compute_dtype


def _attention_backward(q, k, v, g, scale):
    """(dq, dk, dv) of softmax(scale q kᵀ) v for output gradient g. Shapes (…, Nq|Nk, D)."""
    a = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (…, Nq, Nk)
    o = a @ v
    dv = a.transpose(-1, -2) @ g
    ds = a * (g @ v.transpose(-1, -2) - (g * o).sum(dim=-1, keepdim=True))
    return scale * (ds @ k), scale * (ds.transpose(-1, -2) @ q), dv


def paca_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, logits: torch.Tensor, *, prefix: int, scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dlogits), each shaped and typed like its input.

    Shapes: grad (B, H, N, Dv), q, k (B, H, N, D), v (B, H, N, Dv), logits (B, M, N - prefix).
    """
    work = compute_dtype(q.dtype)
    g, qw, kw, vw = grad.to(work), q.to(work), k.to(work), v.to(work)
    z = torch.softmax(logits.to(work), dim=-1)  # (B, M, Np)
    zh = z.unsqueeze(1)  # (B, 1, M, Np): shared by the heads
    kp, vp = kw[:, :, prefix:], vw[:, :, prefix:]
    keys = torch.cat([kw[:, :, :prefix], zh @ kp], dim=2)  # (B, H, P + M, D)
    values = torch.cat([vw[:, :, :prefix], zh @ vp], dim=2)
    dq = torch.empty_like(qw)
    dq[:, :, prefix:], dkeys, dvalues = _attention_backward(qw[:, :, prefix:], keys, values,
                                                            g[:, :, prefix:], scale)
    dkc, dvc = dkeys[:, :, prefix:], dvalues[:, :, prefix:]  # (B, H, M, D|Dv)
    zt = zh.transpose(-1, -2)  # (B, 1, Np, M)
    dk = torch.cat([dkeys[:, :, :prefix], zt @ dkc], dim=2)
    dv = torch.cat([dvalues[:, :, :prefix], zt @ dvc], dim=2)
    dz = (dkc @ kp.transpose(-1, -2) + dvc @ vp.transpose(-1, -2)).sum(dim=1)  # (B, M, Np)
    dlogits = z * (dz - (dz * z).sum(dim=-1, keepdim=True))
    if prefix:
        dq_pre, dk_pre, dv_pre = _attention_backward(qw[:, :, :prefix], kw, vw,
                                                     g[:, :, :prefix], scale)
        dq[:, :, :prefix] = dq_pre
        dk = dk + dk_pre
        dv = dv + dv_pre
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlogits.to(logits.dtype)
