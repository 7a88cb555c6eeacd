"""`dpc_knn`: density-peaks clustering with k-nearest-neighbour density (DPC-kNN), the token
clustering of TCFormer's CTM, globally or per region (TCFormerV2's local CTM).

    labels, centres = dpc_knn(x, clusters, k=5, regions=1)

x (B, N, C) tokens -> labels (B, N) int64 in [0, clusters), centres (B, clusters) int64 token
indices; the label of a centre is its own rank. See ``reference.py`` for the math (density
rho from the k nearest neighbours, distance delta to the nearest denser token, centres = the
largest rho·delta, every token to its nearest centre; ties broken by index, so the result is
deterministic and equal across implementations).

Local clustering: with ``regions`` = R the N tokens are R contiguous blocks of N/R (region-major
order, the caller arranges it: for a grid, tokens sorted by region), each clustered into
clusters/R clusters independently; labels of block r are offset by r·clusters/R. The pairwise
cost falls from N²·C to N²·C/R. No cluster crosses a region; R = 1 is global DPC-kNN.

Implementations: ``"reference"`` (full N×N matrices, the oracle), ``"cpu"`` (chunked GEMM
distances, O(chunk·N) memory, half the work in the delta pass; device-agnostic torch, also
what "auto" runs on CUDA: there is no Triton kernel in this family). No gradients: the
result is discrete (TCFormer runs it under no_grad too). A ``torch.library`` op, so compiled
models keep it in one graph.
"""

from __future__ import annotations

import torch

from clusterfx.ops.common import telemetry
from clusterfx.ops.dpc_knn.checks import validate
from clusterfx.ops.dpc_knn.cpu import dpc_knn_cpu
from clusterfx.ops.dpc_knn.reference import dpc_knn_reference

__all__ = ["dpc_knn", "dpc_knn_reference"]


@torch.library.custom_op("clusterfx::dpc_knn", mutates_args=())
def _dpc_knn_op(x: torch.Tensor, clusters: int, k: int = 5, regions: int = 1,
                impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    validate(x, clusters, k, regions, impl)
    name = "reference" if impl == "reference" else "cpu"
    telemetry.record("dpc_knn", name)
    fn = dpc_knn_reference if name == "reference" else dpc_knn_cpu
    labels, centres = fn(x, clusters, k=k, regions=regions)
    return labels.contiguous(), centres.contiguous()


@_dpc_knn_op.register_fake
def _dpc_knn_fake(x, clusters, k=5, regions=1, impl="auto"):
    validate(x, clusters, k, regions, impl)
    long = torch.int64
    return (x.new_empty(x.shape[:2], dtype=long), x.new_empty(x.shape[0], clusters, dtype=long))


def dpc_knn(x: torch.Tensor, clusters: int, *, k: int = 5, regions: int = 1,
            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN labels (B, N) and centres (B, clusters) of tokens x (B, N, C).

    Raises ValueError (before any work) for a non-float or non-3-D x, clusters outside
    [1, N], k outside [1, N / regions], regions not dividing N and clusters, or an unknown impl.
    """
    validate(x, clusters, k, regions, impl)
    return torch.ops.clusterfx.dpc_knn(x.detach(), clusters, k, regions, impl)
