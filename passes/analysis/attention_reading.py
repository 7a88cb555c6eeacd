"""Reading attention spellings off a dynamo FX graph: the node tests and walks the
canonicaliser is built from (softmax and its dim, casts, dropout, score producers, transposes,
scalar scales, GQA `repeat_kv`), with no graph edits."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from clusterfx.config.vocabulary import Decline
from clusterfx.passes.analysis import graph_utils as gu
from clusterfx.passes.analysis.mask_analysis import evaluate_static


def softmax_dim(node: fx.Node) -> tuple[Any, Any] | None:
    if gu.is_function(node, *gu.SOFTMAXES):
        return gu.arg(node, 0, "input"), gu.arg(node, 1, "dim")
    if gu.is_method(node, "softmax"):
        return node.args[0], gu.arg(node, 1, "dim")
    return None


def is_cast(node: Any) -> bool:
    if gu.is_method(node, *gu.CAST_METHODS):
        val = gu.value_of(node)
        return isinstance(val, torch.Tensor) and val.is_floating_point()
    return False


def dropout(node: fx.Node) -> float | None:
    """The effective dropout probability of a dropout node, or None if `node` is none."""
    if gu.is_function(node, torch.nn.functional.dropout):
        p, training = gu.arg(node, 1, "p", 0.5), gu.arg(node, 2, "training", True)
    elif gu.is_function(node, torch.dropout):
        p, training = gu.arg(node, 1, "p"), gu.arg(node, 2, "train")
    else:
        return None
    if not isinstance(training, bool) or gu.static_number(p) is None:
        raise Decline("dropout with a non-constant probability or training flag")
    return float(p) if training else 0.0


def matmul_operands(node: Any) -> tuple[Any, Any] | None:
    if gu.is_function(node, *gu.MATMULS):
        return node.args[0], node.args[1]
    if gu.is_method(node, "matmul", "bmm", "__matmul__"):
        return node.args[0], node.args[1]
    return None


def is_score_producer(node: Any) -> bool:
    return (matmul_operands(node) is not None or gu.is_function(node, torch.baddbmm)
            or gu.is_method(node, "baddbmm") or gu.is_function(node, *gu.EINSUMS))


def einsum_parts(node: fx.Node) -> tuple[str, list]:
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return eq, ops


def swap_last2(node: Any) -> bool:
    """Is `node` a transpose of exactly the last two dims?"""
    nd = gu.ndim(node)
    if nd is None:
        return False
    if gu.is_function(node, getattr) and node.args[1] == "mT":
        return True
    if gu.is_method(node, "transpose") or gu.is_function(node, torch.transpose):
        dims = sorted(d % nd for d in node.args[1:3])
        return dims == [nd - 2, nd - 1]
    if gu.is_method(node, "permute") or gu.is_function(node, torch.permute):
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        perm = [p % nd for p in perm]
        return perm == list(range(nd - 2)) + [nd - 1, nd - 2]
    return False


def scalar_operand(node: fx.Node) -> tuple[Any, Any] | None:
    """For `x * s` / `s * x` with s scalar-like: (x, s)."""
    a, b = node.args[0], node.args[1]
    if gu.is_scalar_like(b) and isinstance(a, fx.Node) and not gu.is_scalar_like(a):
        return a, b
    if gu.is_scalar_like(a) and isinstance(b, fx.Node) and not gu.is_scalar_like(b):
        return b, a
    return None


class Reciprocal:
    def __init__(self, x: Any):
        self.x = x


def peel_scale(node: Any, factors: list) -> Any:
    """Strip scalar multiplications/divisions (and `contiguous`) off a q or k operand."""
    while isinstance(node, fx.Node):
        if gu.is_function(node, *gu.MUL_FUNCS) or gu.is_method(node, "mul"):
            split = scalar_operand(node)
            if split is None:
                break
            node = split[0]
            factors.append(split[1])
        elif (gu.is_function(node, *gu.DIV_FUNCS) or gu.is_method(node, "div")) and \
                gu.is_scalar_like(node.args[1]) and not gu.is_scalar_like(node.args[0]):
            factors.append(Reciprocal(node.args[1]))
            node = node.args[0]
        elif gu.is_method(node, "contiguous"):
            node = node.args[0]
        else:
            break
    return node


def reaches_scores(node: Any, depth: int = 16) -> bool:
    """Does `node` come from a score matmul through ops the backward walk accepts?"""
    while isinstance(node, fx.Node) and depth > 0:
        if is_score_producer(node):
            return True
        if gu.is_function(node, *gu.ADD_FUNCS) or gu.is_method(node, "add", "add_"):
            return any(reaches_scores(a, depth - 1) for a in node.args[:2])
        if gu.is_function(node, torch.where):
            return any(reaches_scores(a, depth - 1) for a in node.args[1:3])
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
        depth -= 1
    return False


def has_score_ancestor(node: Any, depth: int = 8) -> bool:
    """Is a score producer (matmul/bmm/baddbmm/einsum) among the ancestors within `depth`?"""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if is_score_producer(n):
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


def fill_value(value: Any, concrete: dict) -> float | None:
    number = gu.static_number(value)
    if number is None and isinstance(value, fx.Node):
        tensor = evaluate_static(value, concrete)  # rare: a tensor-valued fill
        if tensor is not None and tensor.numel() == 1:
            number = float(tensor.item())
    return number


def dropout_or_none(node: fx.Node) -> float | None:
    try:
        return dropout(node)
    except Decline:
        return 0.0


def probs_matmul(user: fx.Node, probs: fx.Node) -> bool:
    ops = matmul_operands(user)
    if ops is not None:
        return ops[0] is probs and ops[1] is not probs
    if gu.is_function(user, *gu.EINSUMS):
        _, operands = einsum_parts(user)
        return len(operands) == 2 and probs in operands
    return False


def feeds(user: fx.Node, chain: set) -> bool:
    """An in-place op whose result continues the walked score chain (`s += mask`)."""
    return user in chain


def node_of(ref: Any) -> Any:
    return ref[1] if isinstance(ref, tuple) else ref


def describe(node: fx.Node) -> str:
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__",
                                                                  node.target)
    return f"{node.op} {target!s}"


def unwrap_gqa(k: Any, v: Any) -> tuple[Any, Any, int]:
    """Fold Llama-style `repeat_kv` (expand + reshape) or `repeat_interleave` on both k and v."""
    kb, kg = repeat_base(k)
    vb, vg = repeat_base(v)
    if kg > 1 and kg == vg:
        return kb, vb, kg
    return k, v, 1


def repeat_base(node: Any) -> tuple[Any, int]:
    val = gu.value_of(node)
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return node, 1
    if gu.is_method(node, "repeat_interleave") and len(node.args) >= 2:
        reps, dim = node.args[1], gu.arg(node, 2, "dim")
        if isinstance(reps, int) and dim in (1, -3):
            return node.args[0], reps
        return node, 1
    if not (gu.is_method(node, "reshape", "view") or gu.is_function(node, torch.reshape)):
        return node, 1
    expand = node.args[0]
    if not gu.is_method(expand, "expand"):
        return node, 1
    unsq = expand.args[0]
    ev = gu.value_of(expand)
    if gu.is_method(unsq, "unsqueeze") and unsq.args[1] in (2, -3):
        base = unsq.args[0]
    elif gu.is_function(unsq, operator.getitem) and is_none_at_2(unsq.args[1]):
        base = unsq.args[0]
    else:
        return node, 1
    bv = gu.value_of(base)
    if not isinstance(bv, torch.Tensor) or bv.dim() != 4 or ev.dim() != 5:
        return node, 1
    groups = ev.shape[2]
    if not isinstance(groups, int) or list(ev.shape[:2]) != list(bv.shape[:2]):
        return node, 1
    return base, groups


def is_none_at_2(index: Any) -> bool:
    if not isinstance(index, tuple) or len(index) < 3:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and index[2] is None



# ----------------------------------------------------------------------------- batch layouts

def batch_split(node: Any) -> tuple | None:
    """For `x.view(b0, b1, Nq, Nk)` / `reshape` of a rank-3 x (b0·b1, Nq, Nk) — scores computed
    by `bmm` on merged batch and head dims, viewed per head for the mask (BLOOM, DeBERTa) —
    the sizes (b0, b1) as the view wrote them (ints, size nodes, or one -1); None otherwise."""
    if not (gu.is_method(node, "view", "reshape") or gu.is_function(node, torch.reshape)):
        return None
    src, out = gu.value_of(node.args[0]), gu.value_of(node)
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if src.dim() != 3 or out.dim() != 4 or list(src.shape[1:]) != list(out.shape[2:]):
        return None
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
        else node.args[1:]
    if gu.is_function(node, torch.reshape):
        sizes = node.args[1]
    return tuple(sizes[:2]) if len(sizes) == 4 else None


def batch_merge(node: Any) -> bool:
    """Is `node` a view/reshape (b0, b1, Nq, Nk) -> (b0·b1, Nq, Nk) (the probabilities going
    back to the merged layout for `bmm` with the values)?"""
    if not (gu.is_method(node, "view", "reshape") or gu.is_function(node, torch.reshape)):
        return False
    src, out = gu.value_of(node.args[0]), gu.value_of(node)
    return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() == 4
            and out.dim() == 3 and list(src.shape[2:]) == list(out.shape[1:]))


# ------------------------------------------------------- attention-shaped, but not readable

# ops that end a walk looking for an attention around a softmax: layers with weights, norms,
# another softmax (a classifier head or router is `softmax(linear(x))`, not `softmax(q·kᵀ)`)
_BARRIERS = (torch.nn.functional.linear, torch._C._nn.linear, torch.nn.functional.layer_norm,
             torch.nn.functional.group_norm, torch.nn.functional.embedding, torch.conv1d,
             torch.conv2d, torch.nn.functional.conv1d, torch.nn.functional.conv2d)


def _barrier(node: fx.Node) -> bool:
    return (gu.is_function(node, *_BARRIERS, *gu.SOFTMAXES) or gu.is_method(node, "softmax")
            or node.op in ("placeholder", "get_attr", "output"))


def _weight(x: Any) -> bool:
    """A parameter or buffer of the model (a placeholder lifted from one, or a get_attr)."""
    if not isinstance(x, fx.Node):
        return False
    if x.op == "get_attr":
        return True
    if x.op != "placeholder":
        return False
    source = getattr(x.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else name
    return any(t in f"{name} {x.name}" for t in ("_parameters", "parameters_", "_buffers",
                                                  "buffers_"))


def weight_only(node: Any, limit: int = 64) -> bool:
    """Is `node` computed from weights and constants only (no input of the model)?"""
    if not isinstance(node, fx.Node):
        return True
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return False
        if n.op == "placeholder" and not _weight(n):
            return False
        if gu.is_method(n, "new_ones", "new_zeros", "new_full", "new_empty") or gu.is_function(
                n, torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like):
            continue  # a constant: its input only lends a shape, dtype and device
        stack.extend(n.all_input_nodes)
    return True


def _with_weight(node: fx.Node) -> bool:
    """A matmul with a weight operand is a layer (`softmax(S @ W)`: an assignment to learned
    centres, not attention over keys)."""
    return any(_weight(x) for x in node.all_input_nodes)


def score_ancestor(node: Any, depth: int = 24) -> bool:
    """Is a product of two activations (matmul/bmm/baddbmm/einsum) among the ancestors of
    `node`, walking only through ops that are not layers (see `_BARRIERS`; a product with a
    weight is one too)?"""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen or _barrier(n):
                continue
            seen.add(n)
            if is_score_producer(n):
                if _with_weight(n):
                    continue
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


def _moves_last_dim(node: fx.Node) -> bool:
    """A transpose / permute that moves the last dim (the keys of the probabilities)."""
    nd = gu.ndim(node.args[0]) if node.args else None
    if nd is None:
        return False
    if gu.is_function(node, getattr) and node.args[1] == "mT":
        return True
    if gu.is_method(node, "transpose", "swapaxes") or gu.is_function(node, torch.transpose):
        return (nd - 1) in [d % nd for d in node.args[1:3] if isinstance(d, int)]
    if gu.is_method(node, "permute") or gu.is_function(node, torch.permute):
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return bool(perm) and isinstance(perm[-1], int) and perm[-1] % nd != nd - 1
    return gu.is_method(node, "t") or gu.is_function(node, torch.t)


def _contracts_keys(user: fx.Node, operand: fx.Node) -> bool:
    """Does `user` (a matmul / einsum) contract the last dim of `operand`, as `probs @ v`?"""
    ops = matmul_operands(user)
    if ops is not None:
        return ops[0] is operand and ops[1] is not operand
    if gu.is_function(user, *gu.EINSUMS):
        eq, operands = einsum_parts(user)
        if len(operands) != 2 or not isinstance(eq, str) or "->" not in eq:
            return False
        lhs, out = eq.replace(" ", "").split("->")
        terms = lhs.split(",")
        if len(terms) != 2 or operand not in operands or "..." in terms[operands.index(operand)]:
            return False
        term = terms[operands.index(operand)]
        return bool(term) and term[-1] not in out
    return False


def values_consumer(sm: fx.Node, depth: int = 16) -> fx.Node | None:
    """The first matmul/bmm/einsum with another activation that contracts the probabilities'
    key dim, reached from the softmax through ops that are not layers and do not move that
    dim (a pooling `softmax(...)ᵀ @ x` contracts the other dim: not attention), or None."""
    frontier, seen = [sm], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if is_score_producer(u):
                    if not _with_weight(u) and _contracts_keys(u, n):
                        return u
                    continue
                if not _barrier(u) and not _moves_last_dim(u):
                    nxt.append(u)
        frontier = nxt
    return None


def first_unread_user(sm: fx.Node) -> str:
    """What the probabilities pass through that the forward walk does not accept."""
    cur = sm
    for _ in range(8):
        users = list(cur.users)
        nxt = [u for u in users if is_cast(u) or dropout_or_none(u) is not None]
        if len(nxt) == 1 and len(users) == 1:
            cur = nxt[0]
            continue
        other = [u for u in users if u not in nxt]
        return describe(other[0]) if other else f"{len(users)} users"
    return describe(cur)
