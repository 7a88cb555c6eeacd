"""Lower canonical self-attention over image patches to patch-to-cluster attention
(`PatchToCluster`, PaCa-ViT).

Before (any ViT spelling, canonicalised; x the attention's input tokens, B×N×C):
    q, k, v = linear(x, Wq), linear(x, Wk), linear(x, Wv)   (fused or not), as (B, H, N, D)
    o = torch.ops.clusterfx.attention(q, k, v, None, 0.0, False, 0.125, False)
After (P class/register tokens, then the H×W patches):
    logits = cluster_logits(x[:, P:], [<the site's clustering parameters>], 'conv', (H, W), True)
    o = torch.ops.clusterfx.paca_attention(q, k, v, logits, P, 0.125, 'auto', 'c0/frame0/0#0')

The clustering module (ops/paca/clustering.py: "conv", "mlp" or "linear" head, `init` as the
config says, in the projection weight's dtype and device) is installed on the compiled model
at `<site path>.paca_clustering` (passes/installed.py), created when the site is first lowered
and reused by every later compile of that site. Its parameters are trained by whatever
optimizer holds `model.parameters()` once the model has run.

Declined, kept dense with the reason: causal attention, masks, attention dropout, GQA, 3-D
(B·H, N, D) spellings, q/k/v that are not linear projections of one tensor (cross-attention),
a dynamic sequence length, no patch grid (neither in the config nor on the model, or several
on the model), and a sequence that is not the grid plus 0..16 prefix tokens.

Cost (M clusters, Np = N - P patches, C = H·D): cluster logits about 2·B·Np·C·M (the linear
head; the conv head adds its 7x7 and 1x1 convs), pooling 2·BH·M·Np·(D + Dv), attention
2·BH·Np·(P + M)·(D + Dv) + 2·BH·P·N·(D + Dv); memory BH·(P + M)·(D + Dv) + B·M·Np.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from clusterfx.config.configs import PatchToCluster
from clusterfx.config.vocabulary import Decline
from clusterfx.ops.paca import PatchClustering
from clusterfx.ops.paca.clustering import cluster_logits
from clusterfx.passes.analysis.graph_utils import value_of
from clusterfx.passes.analysis.projection import shared_input
from clusterfx.passes.cost_model import Cost, Dims, register_cost
from clusterfx.passes.installed import install, read_parameters, require_module
from clusterfx.passes.lowerings.common import require_no_dropout
from clusterfx.passes.lowerings.patch_grid import MAX_PREFIX_TOKENS, grids_of
from clusterfx.passes.registry import LoweringContext, register_lowering
from clusterfx.passes.site import Site

MODULE_NAME = "paca_clustering"


def _static(value, what: str) -> int:
    if isinstance(value, torch.SymInt):
        raise Decline(f"{what} is dynamic ({value}); patch-to-cluster attention needs a fixed "
                      f"patch grid (compile with dynamic=False, or mark only the batch dynamic)")
    return int(value)


def _check_site(node: fx.Node, site: Site, config: PatchToCluster) -> None:
    require_no_dropout(site, config)
    if site.causal or getattr(site, "causal_queries", False):
        raise Decline("causal attention (or a causal query stream) is not self-attention over "
                      "patches: a cluster token mixes every position")
    if node.args[3] is not None:
        raise Decline("the attention has a mask; patch-to-cluster attention takes unmasked "
                      "self-attention over patches")
    if node.args[7]:
        raise Decline("grouped-query attention (fewer kv heads than query heads)")
    q, k = value_of(node.args[0]), value_of(node.args[1])
    if q.dim() != 4:
        raise Decline(f"q has rank {q.dim()}; patch-to-cluster attention needs (B, H, N, D) so "
                      f"that the rows of one image are known (3-D (B·H, N, D) spellings such "
                      f"as nn.MultiheadAttention are not supported)")
    if q.shape[-2] != k.shape[-2]:
        raise Decline(f"{q.shape[-2]} queries and {k.shape[-2]} keys: not self-attention")


def _tokens(editor, x: fx.Node, batch, n: int, like: fx.Node) -> fx.Node:
    """x as (B, N, C): the projection input in batch-first or sequence-first layout (a dynamic
    batch must be batch-first)."""
    shape = tuple(value_of(x).shape)
    if len(shape) != 3:
        raise Decline(f"the projection input has shape {shape}; expected (B, N, C)")
    if isinstance(batch, torch.SymInt):
        if not isinstance(shape[1], torch.SymInt) and shape[1] == n:
            return x
        raise Decline(f"the projection input {shape} is not (B, N, C) with N={n}")
    first, second = (_static(d, "the projection input's shape") for d in shape[:2])
    if (first, second) == (batch, n) and batch != n:
        return x
    if (first, second) == (n, batch) and batch != n:
        return editor.call("transpose", (x, 0, 1), like=like, method=True)
    if first == second == n:
        raise Decline(f"cannot tell the batch dim from the sequence dim of the projection "
                      f"input {shape} (batch = N = {n})")
    raise Decline(f"the projection input {shape} is not (B, N, C) with B={batch}, N={n}")


def _grid(root, config: PatchToCluster) -> tuple[int, int]:
    if config.grid is not None:
        return config.grid
    grids = grids_of(root)
    if not grids:
        raise Decline("no patch grid found on the model (no submodule has grid_size, or "
                      "image_size and patch_size); give PatchToCluster(grid=(H, W))")
    if len(grids) > 1:
        listed = ", ".join(f"{g} at {p}" for g, p in grids.items())
        raise Decline(f"several patch grids on the model ({listed}); give "
                      f"PatchToCluster(grid=(H, W))")
    return next(iter(grids))


def _prefix(n: int, grid: tuple[int, int], config: PatchToCluster) -> int:
    patches = grid[0] * grid[1]
    prefix = n - patches
    if config.prefix_tokens is not None and prefix != config.prefix_tokens:
        raise Decline(f"the sequence has {n} tokens, but the {grid[0]}x{grid[1]} grid plus "
                      f"prefix_tokens={config.prefix_tokens} makes "
                      f"{patches + config.prefix_tokens}")
    if not 0 <= prefix <= MAX_PREFIX_TOKENS:
        raise Decline(f"the sequence has {n} tokens, which is not the {grid[0]}x{grid[1]} patch "
                      f"grid ({patches}) plus 0..{MAX_PREFIX_TOKENS} class/register tokens")
    return prefix


@register_lowering(PatchToCluster)
def lower_patch_to_cluster(lctx: LoweringContext, node: fx.Node, site: Site,
                           config: PatchToCluster) -> fx.Node:
    _check_site(node, site, config)
    require_module(lctx.ctx.root)
    q, k, v = node.args[:3]
    x, projections, why = shared_input(q, k, v)
    if x is None:
        raise Decline(f"not self-attention over one set of tokens: {why}")
    batch = value_of(q).shape[0]
    n = _static(value_of(q).shape[-2], "the sequence length")
    grid = _grid(lctx.ctx.root, config)
    prefix = _prefix(n, grid, config)
    tokens = _tokens(lctx.editor, x, batch, n, node)
    weight = value_of(projections[1].args[1])  # the key projection's weight
    dim = _static(value_of(x).shape[-1], "the token width")

    def build() -> PatchClustering:
        module = PatchClustering(dim, config.clusters, grid, config.clustering, config.init)
        return module.to(device=weight.device, dtype=weight.dtype)

    def fits(existing: torch.nn.Module) -> str:
        if not isinstance(existing, PatchClustering):
            return f"it is a {type(existing).__name__}, not a PatchClustering"
        want = (config.clustering, config.clusters, grid, dim, config.init)
        have = (existing.kind, existing.clusters, existing.grid, existing.dim, existing.init)
        return "" if want == have else f"it was made for {have}, this site needs {want}"

    path = site.fqn
    module, created = install(lctx.ctx.root, path, MODULE_NAME, build, fits)
    editor = lctx.editor
    params = read_parameters(editor, path, MODULE_NAME, module, module.ordered_parameters(),
                             like=node)
    patches = editor.call(operator.getitem, (tokens, (slice(None), slice(prefix, None))),
                          like=node)
    logits = editor.call(cluster_logits, (patches, params, module.kind, module.grid,
                                          module.has_prior), like=node)
    out = editor.call(torch.ops.clusterfx.paca_attention.default,
                      (q, k, v, logits, prefix, node.args[6], "auto", lctx.tag(site)), like=node)
    count = sum(p.numel() for p in module.parameters())
    site.reason = (f"{'installed' if created else 'reused'} {path + '.' if path else ''}"
                   f"{MODULE_NAME} ({config.clustering}, M={config.clusters}, grid "
                   f"{grid[0]}x{grid[1]}, {prefix} prefix tokens, {count} parameters)")
    return out


@register_cost(PatchToCluster, efficiency=0.5)
def patch_to_cluster_cost(dims: Dims, config: PatchToCluster) -> Cost:
    bh, n, d, dv = dims.bh, dims.nq, dims.d, dims.dv
    m = sympy.Integer(config.clusters)
    flops = 2 * bh * n * d * m + 2 * bh * m * n * (d + dv) + 2 * bh * n * m * (d + dv)
    return Cost(flops, bh * (m * (d + dv) + n * (dv + 1)) * dims.itemsize)
