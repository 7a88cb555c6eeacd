"""Canonicalise attention: every spelling becomes one `clusterfx::attention` node.

Before (one of many spellings; dynamo torch IR):
    s = q @ k.transpose(-2, -1) / math.sqrt(d)
    s = s.masked_fill(pad[:, None, None, :] == 0, float("-inf"))
    p = F.dropout(torch.softmax(s.float(), dim=-1).to(q.dtype), 0.1, training)
    o = p @ v
After:
    o = torch.ops.clusterfx.attention(q, k, v, keep_mask, 0.1, False, 0.125, False)

The match starts at each softmax over the last dim: forward through casts and dropout to a
matmul whose left operand are the probabilities (`@`, `matmul`, `bmm`, `einsum`), backward through
casts, scalar scales, additive masks, `masked_fill` and `where` to the score matmul
(`@`, `matmul`, `bmm`, `baddbmm`, `einsum`), whose operands yield q and k (scales on q or k,
transposes, `.mT`, permutes and GQA `expand`/`repeat_interleave` are folded). Explicit
`F.scaled_dot_product_attention` calls are read directly. A softmax whose forward side is not
`probs @ v` is not attention and is never touched. An attention-shaped softmax that cannot be
read, or whose probabilities are used elsewhere, stays as written and is recorded with a reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from clusterfx.config.vocabulary import Decline, Status
from clusterfx.ops.attention import attention as canonical_attention
from clusterfx.passes.analysis import attention_reading as rd
from clusterfx.passes.analysis import causality
from clusterfx.passes.analysis import graph_utils as gu
from clusterfx.passes.analysis.einsum_spec import read_scores, read_values
from clusterfx.passes.analysis.mask_analysis import evaluate_static, is_causal_pattern
from clusterfx.passes.base import GraphPass, PassContext, PassResult
from clusterfx.passes.site import SITE_META, Site, hints_of, shape_of

_MIN_FILL = -1e4  # a fill at or below this is a mask, not a score edit


@dataclass
class MaskTerm:
    node: Any  # the mask tensor node (bool or float)
    kind: str  # "keep" (bool, True = attend) | "drop" (bool, True = masked) | "add"
    fill: float | None = None  # for keep/drop: the value given to masked scores
    outer: list = field(default_factory=list)  # scale factors applied after this term
    dtype: torch.dtype = torch.float32  # the scores' dtype where the term was applied
    merged: bool = False  # in the (b0·b1, Nq, Nk) layout of a batch-merged bmm (`Match.split`)


@dataclass
class Match:
    spelling: str
    q: Any
    k: Any
    v: Any
    factors: list = field(default_factory=list)
    masks: list[MaskTerm] = field(default_factory=list)
    dropout_p: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False  # SDPA's own flag; repeat_kv spellings are found in emit()
    out_perm: tuple | None = None
    chain: set = field(default_factory=set)  # score nodes walked so far (softmax side)
    # (b0, b1) when the scores were computed on merged batch dims, (b0·b1, Nq, Nk), and viewed
    # as (b0, b1, Nq, Nk) before the softmax: the canonical node works on the split layout
    split: tuple | None = None

    def add_mask(self, term: MaskTerm) -> None:
        term.merged = self.split is not None
        self.masks.append(term)


# --------------------------------------------------------------------------- the matcher

class Canonicalizer:
    def __init__(self, gm: fx.GraphModule, concrete: dict[fx.Node, Any]):
        self.gm = gm
        self.editor = gu.GraphEditor(gm)
        self.concrete = concrete
        self._static: dict[fx.Node, torch.Tensor | None] = {}
        self._positions = {n: i for i, n in enumerate(gm.graph.nodes)}

    # forward side: softmax -> (casts, dropout) -> probs @ v
    def forward_side(self, sm: fx.Node
                     ) -> tuple[fx.Node, float, list[fx.Node], list[str]] | None:
        """(probs @ v node, dropout p, the softmax chain, other users of the probabilities), or
        None when the softmax is not an attention (classifier head, gate, router...)."""
        cur, dropout_p, chain, others = sm, 0.0, [sm], []
        while True:
            nxt = [u for u in cur.users if rd.is_cast(u) or rd.dropout_or_none(u) is not None
                   or rd.batch_merge(u)]
            others += [u.name for u in cur.users if u not in nxt and not rd.probs_matmul(u, cur)]
            pv = [u for u in cur.users if rd.probs_matmul(u, cur)]
            if pv and not nxt:
                if len(pv) > 1:
                    others += [u.name for u in pv[1:]]
                return pv[0], dropout_p, chain, others
            if len(nxt) != 1:
                return None  # the probabilities are not multiplied with values
            p = rd.dropout(nxt[0])
            if p is not None:
                if dropout_p and p:
                    raise Decline("two dropouts on the attention probabilities")
                dropout_p = p or dropout_p
            others += [u.name for u in pv]
            cur = nxt[0]
            chain.append(cur)

    # backward side: scores <- (casts, scales, masks) <- q @ kᵀ
    def backward_side(self, x: Any, match: Match) -> fx.Node:
        while True:
            if not isinstance(x, fx.Node):
                raise Decline("scores are not a tensor computed in this graph")
            written = gu.inplace_users(x)
            if any(not rd.feeds(u, match.chain) for u in written):
                raise Decline(f"scores are modified in place by {written[0].name}")
            match.chain.add(x)
            if rd.is_cast(x):
                x = x.args[0]
            elif gu.is_function(x, *gu.ADD_FUNCS) or gu.is_method(x, "add", "add_"):
                a, b = x.args[0], x.args[1]
                alpha = x.kwargs.get("alpha", 1)
                if alpha != 1:
                    raise Decline("add with alpha on the scores")
                if gu.is_scalar_like(b) or gu.is_scalar_like(a):  # softmax is shift-invariant
                    x = a if gu.is_scalar_like(b) else b
                    continue
                if rd.reaches_scores(a):
                    x, mask = a, b
                elif rd.reaches_scores(b):
                    x, mask = b, a
                else:
                    raise Decline("scores are a sum of two non-matmul tensors")
                match.add_mask(MaskTerm(mask, "add", outer=list(match.factors)))
            elif gu.is_method(x, "masked_fill", "masked_fill_") or gu.is_function(
                    x, torch.masked_fill):
                fill = rd.fill_value(gu.arg(x, 2, "value"), self.concrete)
                if fill is None or fill > _MIN_FILL:
                    raise Decline(f"masked_fill with value {fill!r} (not a mask: a mask fills "
                                      f"with -inf or a value <= {_MIN_FILL:g})")
                match.add_mask(MaskTerm(x.args[1], "drop", fill, list(match.factors),
                                        gu.value_of(x).dtype))
                x = x.args[0]
            elif gu.is_function(x, torch.where):
                cond, a, b = x.args[:3]
                if isinstance(a, fx.Node) and rd.reaches_scores(a):
                    kind, fill, x = "keep", rd.fill_value(b, self.concrete), a
                elif isinstance(b, fx.Node) and rd.reaches_scores(b):
                    kind, fill, x = "drop", rd.fill_value(a, self.concrete), b
                else:
                    raise Decline("torch.where on the scores without a matmul branch")
                if fill is None or fill > _MIN_FILL:
                    raise Decline(f"torch.where fills scores with {fill!r}, not a mask value")
                match.add_mask(MaskTerm(cond, kind, fill, list(match.factors),
                                        gu.value_of(x).dtype))
            elif gu.is_function(x, *gu.MUL_FUNCS) or gu.is_method(x, "mul"):
                split = rd.scalar_operand(x)
                if split is None:
                    raise Decline("scores multiplied by a tensor (not a scalar scale)")
                x = split[0]
                match.factors.append(split[1])
            elif (gu.is_function(x, *gu.DIV_FUNCS) or gu.is_method(x, "div")) and \
                    gu.is_scalar_like(x.args[1]):
                match.factors.append(rd.Reciprocal(x.args[1]))
                x = x.args[0]
            elif rd.batch_split(x) is not None and match.split is None:
                match.split = rd.batch_split(x)
                x = x.args[0]
            elif rd.is_score_producer(x):
                return x
            else:
                raise Decline(f"scores pass through {rd.describe(x)} before the softmax")

    def read_qk(self, producer: fx.Node, match: Match) -> None:
        if gu.is_function(producer, *gu.EINSUMS):
            eq, ops = rd.einsum_parts(producer)
            spec = read_scores(eq, [gu.ndim(o) or 0 for o in ops])
            match.spelling = "einsum"
            match.q = ("permute", rd.peel_scale(ops[0], match.factors), spec.perm_a)
            match.k = ("permute", rd.peel_scale(ops[1], match.factors), spec.perm_b)
            return
        if gu.is_function(producer, torch.baddbmm) or gu.is_method(producer, "baddbmm"):
            bias, a, b = (gu.arg(producer, 0, "input"), gu.arg(producer, 1, "batch1"),
                          gu.arg(producer, 2, "batch2"))
            beta = gu.static_number(producer.kwargs.get("beta", 1))
            alpha = producer.kwargs.get("alpha", 1)
            if beta not in (0.0, 1.0):
                raise Decline(f"baddbmm with beta={beta!r}")
            if beta == 1.0:
                match.add_mask(MaskTerm(bias, "add", outer=list(match.factors)))
            if alpha != 1:
                match.factors.append(alpha)
            match.spelling = "baddbmm"
        else:
            a, b = rd.matmul_operands(producer)
        match.q = rd.peel_scale(a, match.factors)
        kt = rd.peel_scale(b, match.factors)
        if rd.swap_last2(kt):
            match.k = rd.peel_scale(kt.args[0], match.factors)
        else:
            match.k = ("transpose", kt)

    def read_v(self, pv: fx.Node, probs: fx.Node, match: Match) -> None:
        if gu.is_function(pv, *gu.EINSUMS):
            eq, ops = rd.einsum_parts(pv)
            first = ops[0] is probs
            spec = read_values(eq, [gu.ndim(o) or 0 for o in ops], first)
            match.v = ("permute", ops[1] if first else ops[0], spec.perm_v)
            if spec.perm_out != tuple(range(len(spec.perm_out))):
                match.out_perm = spec.perm_out
        else:
            match.v = rd.matmul_operands(pv)[1]

    # ----------------------------------------------------------------------- building
    def materialise(self, ref: Any, like: fx.Node) -> Any:
        if isinstance(ref, tuple) and ref[0] == "permute":
            _, node, perm = ref
            if perm == tuple(range(len(perm))):
                return node
            return self.editor.call("permute", (node, *perm), like=like, method=True)
        if isinstance(ref, tuple) and ref[0] == "transpose":
            return self.editor.call("transpose", (ref[1], -2, -1), like=like, method=True)
        return ref

    def scale_value(self, factors: list, like: fx.Node, q: Any) -> tuple[float, Any]:
        """Fold the factors into a float scale; symbolic factors are multiplied into q."""
        static, dynamic = 1.0, []
        for f in factors:
            inverse = isinstance(f, rd.Reciprocal)
            x = f.x if inverse else f
            n = gu.static_number(x)
            if n is not None:
                static = static / n if inverse else static * n
            else:
                dynamic.append((x, inverse))
        for x, inverse in dynamic:
            op = gu.DIV_FUNCS[0] if inverse else gu.MUL_FUNCS[0]
            q = self.editor.call(op, (q, x), like=like)
        return static, q

    def static_value(self, node: Any) -> torch.Tensor | None:
        """`evaluate_static`, once per node (layers often share one mask)."""
        if not isinstance(node, fx.Node):
            return None
        if node not in self._static:
            self._static[node] = evaluate_static(node, self.concrete, self._positions)
        return self._static[node]

    def combine_masks(self, terms: list[MaskTerm], like: fx.Node) -> tuple[Any, bool, Any]:
        """One SDPA-style mask (bool keep or additive float) from all terms, causality, and the
        rows a finite fill masks entirely (or None).

        A finite fill (`masked_fill(m, finfo.min)`) *replaces* the scores: as an additive mask
        the forward is the same (`fill + s` rounds to `fill`), but gradients would flow into
        the scores of masked entries. They are exactly zero (softmax weight 0) except on rows
        masked entirely, where the softmax is uniform; so additive terms applied before such a
        fill are zeroed where it masks, and the caller zeroes those rows' queries."""
        causal = False
        keeps, adds, replaced = [], [], []  # replaced: finite-fill drop masks seen so far
        for t in terms:
            static = self.static_value(t.node)
            if static is not None:
                keep_view = ~static if t.kind == "drop" and static.dtype == torch.bool else static
                if t.kind in ("keep", "drop") and is_causal_pattern(keep_view, additive=False):
                    causal = True
                    continue
                if t.kind == "add" and _static_scale_ok(t) and is_causal_pattern(static, True):
                    causal = True
                    continue
            if t.kind == "add":
                node = t.node
                for f in t.outer:
                    inverse = isinstance(f, rd.Reciprocal)
                    op = gu.DIV_FUNCS[0] if inverse else gu.MUL_FUNCS[0]
                    node = self.editor.call(op, (node, f.x if inverse else f), like=like)
                if replaced:  # a fill applied after this term replaced it where it masks
                    node = self.editor.call(torch.where, (self._union(replaced, like), 0.0,
                                                          node), like=like)
                adds.append(node)
                continue
            if t.fill == float("-inf"):
                keeps.append(t.node if t.kind == "keep" else self.editor.call(
                    torch.logical_not, (t.node,), like=like))
            else:  # a finite fill is exact only as an additive mask
                drop = t.node if t.kind == "drop" else self.editor.call(
                    torch.logical_not, (t.node,), like=like)
                adds.append(self._additive(drop, t.fill, t.dtype, like))
                replaced.append(drop)
        dead = None
        if replaced:
            dead = self.editor.call("all", (self._union(replaced, like), -1), {"keepdim": True},
                                    like=like, method=True)
        if adds:
            dtype = gu.value_of(adds[0]).dtype
            for keep in keeps:
                drop = self.editor.call(torch.logical_not, (keep,), like=like)
                adds.append(self._additive(drop, float("-inf"), dtype, like))
            mask = adds[0]
            for extra in adds[1:]:
                mask = self.editor.call(gu.ADD_FUNCS[0], (mask, extra), like=like)
            return mask, causal, dead
        if not keeps:
            return None, causal, dead
        mask = keeps[0]
        for extra in keeps[1:]:
            mask = self.editor.call(torch.logical_and, (mask, extra), like=like)
        return mask, causal, dead

    def _union(self, drops: list, like: fx.Node) -> Any:
        union = drops[0]
        for extra in drops[1:]:
            union = self.editor.call(torch.logical_or, (union, extra), like=like)
        return union

    def _split_mask(self, mask: Any, split: tuple, like: fx.Node) -> Any:
        """A mask term of the merged layout (b0·b1 | 1, Nq | 1, Nk) in the split layout."""
        val = gu.value_of(mask)
        if not isinstance(val, torch.Tensor) or val.dim() != 3:
            return mask  # rank <= 2 broadcasts over any batch layout
        if val.shape[0] == 1:
            return self.editor.call("unsqueeze", (mask, 0), like=like, method=True)
        return self.editor.call("unflatten", (mask, 0, split), like=like, method=True)

    def _additive(self, drop: fx.Node, fill: float, dtype: torch.dtype, like: fx.Node):
        """`zeros(drop.shape, dtype).masked_fill(drop, fill)`: the additive form of a mask."""
        zeros = self.editor.call(torch.zeros_like, (drop,), {"dtype": dtype}, like=like)
        return self.editor.call("masked_fill", (zeros, drop, fill), like=like, method=True)

    def emit(self, match: Match, anchor: fx.Node, like: fx.Node) -> tuple[fx.Node, fx.Node]:
        """Insert the canonical node before `anchor` and return it (or its output permute)."""
        with self.gm.graph.inserting_before(anchor):
            q = self.materialise(match.q, like)
            k = self.materialise(match.k, like)
            v = self.materialise(match.v, like)
            if match.split is not None:  # (b0·b1, N, D) -> (b0, b1, N, D), masks alike
                q, k, v = (self.editor.call("unflatten", (x, 0, match.split), like=like,
                                            method=True) for x in (q, k, v))
                for t in match.masks:
                    if t.merged:
                        t.node = self._split_mask(t.node, match.split, like)
            k, v, groups = rd.unwrap_gqa(k, v)
            match.enable_gqa = match.enable_gqa or groups > 1
            scale, q = self.scale_value(match.factors, like, q)
            mask, causal, dead = self.combine_masks(match.masks, like)
            if dead is not None:  # rows a finite fill masks entirely: no gradient to q·kᵀ
                q = self.editor.call(torch.where, (dead, 0.0, q), like=like)
            match.is_causal = match.is_causal or causal
            node = self.editor.call(
                canonical_attention,
                (q, k, v, mask, match.dropout_p, match.is_causal, scale, match.enable_gqa),
                like=like)
            out = node
            if match.split is not None:
                out = self.editor.call("flatten", (node, 0, 1), like=like, method=True)
            if match.out_perm is not None:
                out = self.editor.call("permute", (node, *match.out_perm), like=like,
                                       method=True)
        return node, out


def _site_of(node: fx.Node) -> Site | None:
    if node.op == "call_function" and node.target is canonical_attention:
        return node.meta.get(SITE_META)
    return None


def _static_scale_ok(term: MaskTerm) -> bool:
    """A causal additive mask stays causal under positive static scales."""
    for f in term.outer:
        x = f.x if isinstance(f, rd.Reciprocal) else f
        n = gu.static_number(x)
        if n is None or n <= 0:
            return False
    return True


# --------------------------------------------------------------------------- the pass

class Canonicalize(GraphPass):
    """every attention spelling → one `clusterfx::attention` node carrying a `Site`.
    Counters: `canonical`, `unsupported`; declines: the unsupported sites and why."""

    name = "canonicalize"

    def source_modules(self) -> list[str]:
        return [__name__, rd.__name__, gu.__name__, evaluate_static.__module__,
                read_scores.__module__, causality.__name__]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        for site in canonicalize_attention(gm, ctx.concrete, ctx.graph_index,
                                           ctx.causal_modules):
            ctx.sites.append(site)
            result.counters[site.status.name.lower()] += 1
            if site.status is Status.UNSUPPORTED:
                result.declines.append((site.fqn, site.reason))
        return result


def canonicalize_attention(gm: fx.GraphModule, concrete: dict[fx.Node, Any] | None = None,
                           graph_index: int = 0,
                           causal_modules: dict[str, str] | None = None) -> list[Site]:
    """Rewrite every attention of `gm` into `clusterfx::attention`; return one Site each,
    with its mask kind and causal query stream (passes/analysis/causality.py).
    `concrete` maps placeholders to real example inputs (for static mask evaluation);
    `causal_modules` maps module paths to why they declare a causal stream."""
    canon = Canonicalizer(gm, concrete or {})
    sites: list[Site] = []
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        if gu.is_function(node, gu.SDPA):
            sites.append(_canonicalize_sdpa(canon, node, graph_index))
            continue
        parsed = rd.softmax_dim(node)
        if parsed is None:
            continue
        site = _canonicalize_softmax(canon, node, parsed, graph_index)
        if site is not None:
            sites.append(site)
    causality.annotate(gm, concrete or {}, causal_modules or {}, _site_of)
    gm.graph.lint()
    gm.recompile()
    return sites


def _canonicalize_softmax(canon: Canonicalizer, sm: fx.Node, parsed, graph_index) -> Site | None:
    scores, dim = parsed
    nd = gu.ndim(scores)
    if nd is None or not isinstance(dim, int) or dim % nd != nd - 1:
        return None
    try:
        forward = canon.forward_side(sm)
    except Decline as exc:
        return _unsupported(sm, "softmax-matmul", str(exc), graph_index)
    if forward is None:
        # not `probs @ v` as written; attention-shaped all the same when a product of two
        # activations feeds the scores and the probabilities reach one (banded layouts,
        # probabilities edited before the values): recorded, never silently missed
        if rd.score_ancestor(scores) and rd.values_consumer(sm) is not None:
            return _unsupported(sm, "softmax-matmul", (
                f"the probabilities reach the values matmul through {rd.first_unread_user(sm)} "
                f"(e.g. a banded or chunked layout); left as written"), graph_index)
        return None
    pv, dropout_p, chain, others = forward
    match = Match("matmul", None, None, None, dropout_p=dropout_p)
    try:
        producer = canon.backward_side(scores, match)
        canon.read_qk(producer, match)
        canon.read_v(pv, chain[-1], match)
        if (match.split is not None) != any(rd.batch_merge(n) for n in chain):
            raise Decline("the scores and the probabilities are in different batch layouts")
    except Decline as exc:
        if not rd.has_score_ancestor(scores):
            return None  # e.g. softmax(linear(x)).mT @ x: pooling, not q·kᵀ attention
        return _unsupported(sm, "softmax-matmul", str(exc), graph_index)
    if nd < 3:
        return _unsupported(sm, match.spelling, "unbatched 2-D attention", graph_index)
    refs = [rd.node_of(r) for r in (match.q, match.k, match.v)]
    if any((gu.ndim(r) or 0) < 3 for r in refs):
        if any(rd.weight_only(r) for r in refs[1:]):
            return None  # softmax(x @ W) @ U over learned columns: a router, not attention
        return _unsupported(sm, match.spelling, "keys or values of rank 2 (shared by the "
                            "whole batch); the canonical op takes (..., N, D)", graph_index)
    if match.spelling == "matmul" and gu.is_function(producer, torch.bmm):
        match.spelling = "bmm"
    site = Site(gu.module_path(sm), match.spelling, graph_index=graph_index)
    if others:
        site.probs_used_by = tuple(others)
        site.mark(Status.UNSUPPORTED, "attention probabilities are also used by "
                  f"{', '.join(others)}; no rewrite yields them, left as written")
        _fill_shapes(site, *(rd.node_of(r) for r in (match.q, match.k, match.v)))
        return site
    node, out = canon.emit(match, pv, like=sm)
    pv.replace_all_uses_with(out)
    _erase_dead(canon.gm.graph, [pv, *reversed(chain), scores])
    _finish(site, node)
    return site


def _canonicalize_sdpa(canon: Canonicalizer, node: fx.Node, graph_index: int) -> Site:
    q, k, v = node.args[:3]
    mask = gu.arg(node, 3, "attn_mask")
    dropout_p = gu.arg(node, 4, "dropout_p", 0.0)
    is_causal = gu.arg(node, 5, "is_causal", False)
    scale = gu.arg(node, 6, "scale")
    gqa = gu.arg(node, 7, "enable_gqa", False)
    site = Site(gu.module_path(node), "sdpa", graph_index=graph_index)
    if not isinstance(is_causal, bool) or gu.static_number(dropout_p) is None:
        site.mark(Status.UNSUPPORTED, "non-constant is_causal or dropout_p")
        return site
    match = Match("sdpa", q, k, v, dropout_p=float(dropout_p), is_causal=is_causal,
                  enable_gqa=bool(gqa))
    if scale is None:
        head_dim = gu.value_of(q).shape[-1]
        scale = (1.0 / math.sqrt(head_dim) if head_dim else 1.0) if isinstance(
            head_dim, int) else None  # D = 0: every score is 0, whatever the scale
        if scale is None:
            with canon.gm.graph.inserting_before(node):
                size = canon.editor.call("size", (q, -1), like=node, method=True)
                scale = canon.editor.call(operator.pow, (size, -0.5), like=node)
    match.factors = [scale]
    if mask is not None:
        kind = "keep" if gu.value_of(mask).dtype == torch.bool else "add"
        match.masks = [MaskTerm(mask, kind, float("-inf") if kind == "keep" else None)]
    new, out = canon.emit(match, node, like=node)
    node.replace_all_uses_with(out)
    canon.gm.graph.erase_node(node)
    _finish(site, new)
    return site


def _finish(site: Site, node: fx.Node) -> None:
    q, k, v, mask, dropout_p, causal, scale, gqa = node.args
    _fill_shapes(site, q, k, v, mask)
    site.causal = causal
    site.scale = scale
    site.dropout_p = dropout_p
    if gqa:
        hq, hk = gu.value_of(q).shape[-3], gu.value_of(k).shape[-3]
        site.gqa_groups = int(gu.symbolic_hint(hq // hk))
    site.node_name = node.name
    node.meta[SITE_META] = site


def _fill_shapes(site: Site, q, k=None, v=None, mask=None) -> None:
    site.q_shape = shape_of(gu.value_of(q))
    site.k_shape = shape_of(gu.value_of(k))
    site.v_shape = shape_of(gu.value_of(v))
    site.hints = hints_of(*(gu.value_of(x) for x in (q, k, v)))
    val = gu.value_of(q)
    site.dtype = str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else ""
    if mask is not None:
        mval = gu.value_of(mask)
        site.mask = "boolean" if mval.dtype == torch.bool else "additive"
        site.mask_shape = shape_of(mval)


def _unsupported(node: fx.Node, spelling: str, reason: str, graph_index: int) -> Site:
    site = Site(gu.module_path(node), spelling, graph_index=graph_index)
    site.mark(Status.UNSUPPORTED, reason)
    _fill_shapes(site, node)
    return site


def _erase_dead(graph: fx.Graph, start: list[fx.Node]) -> None:
    """Erase the matched nodes and their now-unused pure ancestors."""
    stack, erased = list(start), set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in erased or n.users or n.op in (
                "placeholder", "output"):
            continue
        if n.op == "call_function" and n.is_impure():
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
