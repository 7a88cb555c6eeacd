"""DPC-kNN clustering (density peaks with k-nearest-neighbour density, as TCFormer's CTM)
written out in full: the oracle of the family. O(n²) memory per region.

For the tokens x_1..x_n of one region (C channels), with D_ij = ||x_i - x_j|| / sqrt(C)::

    rho_i   = exp(-mean of D_ij² over the k nearest j, i itself included)      local density
    delta_i = min { D_ij : j denser than i }, or max_ij D_ij for the densest    distance to
                                                                                denser tokens
    centres = the c tokens with the largest rho_i · delta_i
    label_i = the nearest centre (its rank among the centres); a centre is its own label

"j denser than i" means rho_j > rho_i, or rho_j == rho_i and j < i: ties are broken by index
(TCFormer adds U(0, 1e-6) noise instead; a deterministic order makes every implementation
agree and keeps the result a function of the input). Ties of rho·delta and of distances also
go to the lower index.
"""

from __future__ import annotations

import torch


def dpc_knn_reference(x: torch.Tensor, clusters: int, *, k: int = 5, regions: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes: x (B, N, C) -> labels (B, N) int64 in [0, clusters), centres (B, clusters) int64
    token indices. With regions R > 1 the N tokens are R contiguous blocks clustered
    independently into clusters / R clusters each (labels and centres offset per block)."""
    b, n, c = x.shape
    per, cpr = n // regions, clusters // regions
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.detach().to(work).reshape(b * regions, per, c)
    dist = torch.cdist(xs, xs) / c ** 0.5  # (BR, n, n)
    nearest = dist.topk(k, dim=-1, largest=False).values  # (BR, n, k), self included
    rho = torch.exp(-(nearest ** 2).mean(dim=-1))  # (BR, n)
    index = torch.arange(per, device=x.device)
    # denser[g, i, j]: token j is denser than token i
    denser = (rho[:, None, :] > rho[:, :, None]) | (
        (rho[:, None, :] == rho[:, :, None]) & (index[None, :] < index[:, None]))
    inf = torch.tensor(float("inf"), dtype=work, device=x.device)
    delta = torch.where(denser, dist, inf).amin(dim=-1)  # (BR, n)
    peak = torch.isinf(delta)  # the densest token has no denser one
    delta = torch.where(peak, dist.flatten(1).amax(dim=-1, keepdim=True), delta)
    order = torch.sort(rho * delta, dim=-1, descending=True, stable=True).indices
    centres = order[:, :cpr]  # (BR, cpr)
    to_centres = dist.gather(2, centres[:, None, :].expand(-1, per, -1))  # (BR, n, cpr)
    labels = to_centres.argmin(dim=-1)  # first minimum: ties go to the higher-scored centre
    labels.scatter_(1, centres, torch.arange(cpr, device=x.device).expand(b * regions, -1))
    offsets = torch.arange(regions, device=x.device).repeat(b)[:, None]  # region of each row
    labels = (labels + offsets * cpr).reshape(b, n)
    centres = (centres + offsets * per).reshape(b, clusters)
    return labels, centres
