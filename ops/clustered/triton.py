"""The ``impl="triton"`` forward: torch glue around the Triton kernels of
``clusterfx.ops.clustered.triton_kernels`` (imported lazily, so this module imports without Triton).

Kernel contract (provided by ``triton_kernels.py``):

* ``centroid_attention(qc (B,H,C,D), k, v, key_padding_mask | None, scale)
  -> (out (B,H,C,Dv), lse (B,H,C) float32)``: dense attention of the C centroids;
* ``topk_gather_attention(q (B,H,Nq,D), k, v, idx (B,H,Nq,k) int64, scale, mass (B,H,Nq) | None)
  -> (B,H,Nq,Dv)``: ``mass_i · Σ_{l∈idx_i} softmax_l(s·q_i·k_l) v_l``, no key mask.

Clustered: means (torch ``index_add``) → ``centroid_attention`` → broadcast. Improved: the
top-k selection needs the full C×Nk centroid scores, so the centroid attention runs as torch
GEMMs here and only the per-query top-k attention runs on the kernel. The kernel has no key mask,
so when a row has fewer valid keys than k, that row's index list is cut to its valid keys (the
selection sorts valid keys first; padded ones carry zero weight in the definition anyway), one
kernel call per distinct cut. Rows with no valid key get zeros, as in the reference.
"""

from __future__ import annotations

import torch

from clusterfx.ops.clustered import common
from clusterfx.ops.common.checks import compute_dtype


def _kernels():
    from clusterfx.ops.clustered import triton_kernels

    return triton_kernels


def clustered_attention_from_assignments(q, k, v, assignments, clusters, key_padding_mask,
                                         scale):
    """Shapes: as ``cpu.clustered_attention_from_assignments``."""
    tr = _kernels()
    qc, _ = common.centroid_means(q.to(compute_dtype(q)), assignments, clusters)
    out_c, _ = tr.centroid_attention(qc.to(q.dtype), k, v, key_padding_mask, scale)
    if key_padding_mask is not None:  # no valid key: zeros, whatever the kernel returned
        has_key = key_padding_mask.any(-1)[:, None, None, None]
        out_c = torch.where(has_key, out_c, torch.zeros_like(out_c))
    slots = common.cluster_slots(assignments, clusters)
    return common.broadcast(out_c, slots, assignments.shape).to(q.dtype)


def improved_clustered_attention_from_assignments(q, k, v, assignments, clusters,
                                                  key_padding_mask, scale, topk,
                                                  topk_indices=None):
    """Shapes: as ``cpu.improved_clustered_attention_from_assignments``."""
    tr = _kernels()
    cdt = compute_dtype(q)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    qc, _ = common.centroid_means(q.to(cdt), assignments, clusters)
    logits_c = common.centroid_scores(qc, k.to(cdt), key_padding_mask, scale)
    a_c = common.centroid_probs(logits_c, key_padding_mask)
    if topk_indices is None:
        topk_indices = logits_c.topk(min(topk, Nk), dim=-1).indices  # sorted: valid keys first
    kk = topk_indices.shape[-1]
    a_top = a_c.gather(-1, topk_indices)
    v_top = common.gather_keys(v.to(cdt), topk_indices)
    v_bottom = common.attend(a_c, v.to(cdt)) - (a_top[..., None] * v_top).sum(-2)
    slots = common.cluster_slots(assignments, clusters)
    out = common.broadcast(v_bottom, slots, (B, H, Nq))
    idx_q = common.broadcast(topk_indices, slots, (B, H, Nq))  # (B,H,Nq,k)
    mass_q = a_top.sum(-1).reshape(-1).index_select(0, slots).view(B, H, Nq).float()
    if key_padding_mask is None:
        cuts = {kk: torch.arange(B, device=q.device)}
    else:
        n_keep = key_padding_mask.sum(-1).clamp(max=kk).tolist()
        cuts = {c: torch.tensor([b for b in range(B) if n_keep[b] == c], device=q.device)
                for c in sorted(set(n_keep)) if c > 0}
    for cut, rows in cuts.items():
        top = tr.topk_gather_attention(q[rows], k[rows], v[rows],
                                       idx_q[rows, :, :, :cut].contiguous(), scale, mass_q[rows])
        out[rows] = out[rows] + top.to(cdt)
    return out.to(q.dtype), topk_indices
