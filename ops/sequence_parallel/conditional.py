"""torch.library registration of global clustered attention over the mesh, the conditional op
of a clustered site (namespace ``clusterfx``; ``*mesh`` as in `registration`):

    sp_global_clustered_attention(q, k, v, mask, scale, *spec (7), min_length, *mesh, impl,
                                  tag, site) -> (out, assignments, path, lse, qc, oc, counts)
        bwd: sp_global_clustered_attention_backward(dout, q, k, v, mask, out, assignments,
                 path, lse, qc, oc, counts, scale, *mesh, impl, tag) -> (dq, dk, dv)

Per call, as `conditional_attention` decides: S ≥ `min_length` with a key-padding mask (or
none) runs global clustered attention (`global_clustered.py`: clusters equal to one process's
with the same seed, centroids attending to local keys, log-sum-exp merged by all-reduces);
otherwise exact ring attention (K/V rotate). ``spec.clusters`` is clamped to S with the
warning one process gives. Works for any (u, r): with r = 1 (Ulysses alone) nothing crosses
the ring and the draw of all H heads still makes it one process's clustering.

Shapes: q (B, h, Nb, D), k, v (B, hk, Nb, ·) after the all-to-all → out (B, h, Nb, Dv),
assignments (B, h, Nb) int64 in [0, C'] (C': the spare cluster of excluded queries; zeros on
the exact path), path () int64 (index into `PATHS`), lse (B, h, max(Nb, C'+1)) (the
centroids' first C'+1 or the queries' first Nb), qc (B, h, C'+1, D), oc (B, h, C'+1, Dv),
counts (B, h, C'+1) in the compute dtype (zeros on the exact path), C' = min(clusters, S).

A kept key or value that is not finite anywhere on the ring makes the call exact ring
attention (path 3), as one process runs exact attention then. (That flag is summed over the
ring only: under Ulysses a head group holding such a key runs exact while the other head
groups stay clustered, where one process would make every head exact.)
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from clusterfx.ops.clustered import key_padding
from clusterfx.ops.clustering import ClusteringSpec, attention_metric
from clusterfx.ops.common import telemetry
from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.sequence_parallel import global_clustered
from clusterfx.ops.sequence_parallel.common import ring as ring_mod
from clusterfx.ops.sequence_parallel.common.clusters import ring_metric
from clusterfx.ops.sequence_parallel.registration import CONDITIONAL_PATHS, kernels, unpack

PATHS = (*CONDITIONAL_PATHS, "exact: non-finite keys or values")


def _clamped(spec: ClusteringSpec, seq_len: int) -> ClusteringSpec:
    if spec.clusters <= seq_len:
        return spec
    telemetry.event("clusters_clamped")
    warnings.warn(f"clusters ({spec.clusters}) exceeds the number of queries ({seq_len}); "
                  f"using {seq_len} clusters", stacklevel=3)
    return dataclasses.replace(spec, clusters=seq_len)


@torch.library.custom_op("clusterfx::sp_global_clustered_attention", mutates_args=())
def sp_global_clustered_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, clusters: int,
    iterations: int, bits: int, seed: int, clustering: str, refine: int, metric: str,
    min_length: int, seq_len: int, zigzag: bool, ulysses: int, ring: int, ulysses_group: str,
    ring_group: str, timeout: float, impl: str, tag: str, site: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, backend = kernels(impl, q.device)
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    spec = ClusteringSpec(clusters, iterations, bits, seed, clustering, refine, metric)
    path, keep = 1, None
    if seq_len >= min_length:
        ok, keep = key_padding(mask, B, seq_len)
        path = 0 if ok else 2
    C = min(clusters, seq_len) + 1  # the centroids and the spare cluster
    cd = compute_dtype(q)
    found = None
    if not path:
        def metric_of(keys: Tensor) -> Tensor:
            if groups.ring == 1:  # the whole sequence is here: one process's own arithmetic
                return attention_metric(keys, H, keep)
            return ring_metric(keys, H, keep, layout, groups, tag)

        found = global_clustered.forward(q, k, v, keep, scale, _clamped(spec, seq_len), layout,
                                         groups, mod, tag, metric_of,
                                         "reference" if impl == "reference" else "auto")
        path = 0 if found is not None else 3
    telemetry.record("conditional_attention", "ring " + backend, site=site,
                     path=PATHS[path] + f" [ring {backend}, global clustering]")
    if path:
        out, lse = ring_mod.ring_forward(q, k, v, mask, False, scale, layout, groups, mod, tag)
        assignments = torch.zeros(B, H, N, dtype=torch.int64, device=q.device)
        qc, oc, counts = (q.new_zeros(B, H, C, n, dtype=cd) for n in (D, Dv, 1))
        counts = counts[..., 0]
    else:
        out, assignments, qc, oc, lse, counts = found
    lse_out = q.new_zeros(B, H, max(N, C), dtype=cd)
    lse_out[..., :lse.shape[-1]] = lse
    return (out.to(q.dtype).contiguous(), assignments.contiguous(),
            torch.tensor(path, dtype=torch.int64), lse_out, qc.contiguous(), oc.contiguous(),
            counts.contiguous())


@sp_global_clustered_attention.register_fake
def _(q, k, v, mask, scale, clusters, iterations, bits, seed, clustering, refine, metric,
      min_length, seq_len, *args):
    B, H, N, D = q.shape
    C = min(clusters, seq_len) + 1
    cd = compute_dtype(q)
    return (q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N, dtype=torch.int64),
            q.new_empty((), dtype=torch.int64), q.new_empty(B, H, max(N, C), dtype=cd),
            q.new_empty(B, H, C, D, dtype=cd), q.new_empty(B, H, C, v.shape[-1], dtype=cd),
            q.new_empty(B, H, C, dtype=cd))


@torch.library.custom_op("clusterfx::sp_global_clustered_attention_backward", mutates_args=())
def sp_global_clustered_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor,
    assignments: Tensor, path: Tensor, lse: Tensor, qc: Tensor, oc: Tensor, counts: Tensor,
    scale: float, seq_len: int, zigzag: bool, ulysses: int, ring: int, ulysses_group: str,
    ring_group: str, timeout: float, impl: str, tag: str,
) -> tuple[Tensor, Tensor, Tensor]:
    layout, groups = unpack(seq_len, zigzag, ulysses, ring, ulysses_group, ring_group, timeout)
    mod, _ = kernels(impl, q.device)
    B, _, N, _ = out.shape
    dout = dout.contiguous()
    if int(path):
        dq, dk, dv = ring_mod.ring_backward(dout, q, k, v, out, lse[..., :N], mask, False,
                                            scale, layout, groups, mod, tag)
    else:
        _, keep = key_padding(mask, B, seq_len)
        C = qc.shape[2]
        dq, dk, dv = global_clustered.backward(dout, k, v, keep, assignments, qc, oc,
                                               lse[..., :C], counts, scale, layout, groups,
                                               mod, q.dtype, tag)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sp_global_clustered_attention_backward.register_fake
def _(dout, q, k, v, *args):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup(ctx, inputs, output):
    q, k, v, mask, scale = inputs[:5]
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.args = (scale, *inputs[13:22])  # *mesh, impl, tag


def _backward(ctx, grad, *_grads_of_other_outputs):
    q, k, v, mask, out, assignments, path, lse, qc, oc, counts = ctx.saved_tensors
    dq, dk, dv = sp_global_clustered_attention_backward(
        grad, q, k, v, mask, out, assignments, path, lse, qc, oc, counts, *ctx.args)
    return (dq, dk, dv) + (None,) * 20


sp_global_clustered_attention.register_autograd(_backward, setup_context=_setup)
