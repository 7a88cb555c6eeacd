"""Which dim of each value in a graph is the sharded sequence, when the sequence inputs are cut
into each rank's L = S/P tokens: the propagation rules of the sequence-parallel pass.

A value is either whole (the same on every rank) or sharded along one dim, described by
`Shard(dim, outer, inner)`: that dim's global size is outer·S·inner, laid out as
[outer][token][inner] (outer = B after flattening (B, S, C) to (B·S, C)); locally it holds
outer·L·inner. A rule reads a node's *global* shapes (the captured graph's example values),
says which dim of its output is sharded, and may edit the node for the local shapes (a size
literal n at the sharded dim becomes n·L/S). Rules raise `Unsupported(reason)` when the op
mixes tokens (a reduction, a softmax, a slice or contraction over the sequence dim, an
unknown op); the pass then gathers the op's sharded inputs and runs it whole.

Supported: pointwise and broadcasting ops (whole operands that span the sequence take the
local tokens: `Context.localize`), linear / matmul / addmm / embedding on the token dims,
layer/RMS norm, softmax and reductions over other dims, cat/split/chunk along other dims,
view/reshape/flatten (with a general dim mapping), transpose/permute/unsqueeze/squeeze/expand,
basic indexing that keeps the sequence dim whole, and ops that only create from sizes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from clusterfx.passes.analysis.graph_utils import value_of


@dataclass(frozen=True)
class Shard:
    """The sharded sequence dim of a value: global size outer·S·inner at `dim`."""

    dim: int
    outer: int = 1
    inner: int = 1


class Unsupported(Exception):
    """This op cannot run on the local tokens; the message says why."""


def gval(node: Any) -> Any:
    """The global example value of a node (what it held in the captured graph)."""
    if isinstance(node, fx.Node):
        return node.meta.get("sp_global", value_of(node))
    return node


def gshape(node: Any) -> tuple[int, ...]:
    val = gval(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(gval(node), torch.Tensor)


class Context:
    """What rules may use: the shard of each node and the sequence length S and local length
    L. Rules ask for whole operands to take the local tokens (`localize`) or note a whole
    operand used by sharded computation (`whole_use`, e.g. a weight); the pass carries these
    out from `pending` once the rule has succeeded."""

    def __init__(self, seq_len: int, local_len: int):
        self.S, self.L = seq_len, local_len
        self.shards: dict[fx.Node, Any] = {}
        self.pending: list[tuple[str, fx.Node, fx.Node, Shard | None]] = []

    def localize(self, node: fx.Node, operand: fx.Node, shard: Shard) -> None:
        self.pending.append(("localize", node, operand, shard))

    def whole_use(self, node: fx.Node, operand: fx.Node) -> None:
        self.pending.append(("whole", node, operand, None))

    def shard(self, node: Any) -> Any:
        return self.shards.get(node) if isinstance(node, fx.Node) else None

    def local(self, n: int) -> int:
        return n * self.L // self.S

    def align_whole(self, node: fx.Node, out: Shard, out_ndim: int, operands: list) -> None:
        """Whole operands broadcast against the sharded output: those spanning the sequence at
        the output's sharded dim take the local tokens; others (weights) are marked."""
        for a in operands:
            if not is_tensor(a) or self.shard(a) is not None:
                continue
            shape = gshape(a)
            d = out.dim - (out_ndim - len(shape))
            if 0 <= d < len(shape) and shape[d] != 1:
                if shape[d] != out.outer * self.S * out.inner:
                    raise Unsupported(f"operand of shape {shape} does not match the sequence "
                                      f"dim {out.dim}")
                self.localize(node, a, Shard(d, out.outer, out.inner))
            else:
                self.whole_use(node, a)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if is_tensor(n) else n)
    return list(dict.fromkeys(found))


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


# ------------------------------------------------------------------------------------ rules

def pointwise(node: fx.Node, cx: Context) -> Shard | None:
    if not isinstance(gval(node), torch.Tensor):
        raise Unsupported(f"{_name(node)} returns no tensor")
    out_ndim = len(gshape(node))
    key = None
    for a in _tensor_args(node):
        s = cx.shard(a)
        if s is None:
            continue
        if not isinstance(s, Shard):
            raise Unsupported("a tuple operand")
        d = s.dim + out_ndim - len(gshape(a))
        if key not in (None, (d, s.outer, s.inner)):
            raise Unsupported("operands sharded along different dims")
        key = (d, s.outer, s.inner)
    out = Shard(*key)
    if gshape(node)[out.dim] != out.outer * cx.S * out.inner:
        raise Unsupported("the output does not keep the sequence dim")
    cx.align_whole(node, out, out_ndim, _tensor_args(node))
    return out


def _first(node: fx.Node, cx: Context) -> tuple[fx.Node, Shard]:
    x = node.args[0]
    s = cx.shard(x)
    if not isinstance(s, Shard):
        raise Unsupported("the sequence is not in the first operand")
    for a in _tensor_args(node):
        if a is not x and cx.shard(a) is not None:
            raise Unsupported("several sharded operands")
    return x, s


def _others_whole(node: fx.Node, x: fx.Node, cx: Context) -> None:
    for a in _tensor_args(node):
        if a is not x:
            cx.whole_use(node, a)


def over_dim(index: int, name: str, default: Any = None):
    """Ops that work along one dim (softmax, cumsum, split...): fine unless it is the sequence's."""
    def rule(node: fx.Node, cx: Context) -> Any:
        x, s = _first(node, cx)
        dim = _arg(node, index, name, default)
        if dim is None or _norm(dim, len(gshape(x))) == s.dim:
            raise Unsupported(f"{_name(node)} over the sequence dim")
        _others_whole(node, x, cx)
        val = gval(node)
        if isinstance(val, (tuple, list)):  # split / chunk
            return tuple(s for _ in val)
        return s
    return rule


def reduction(node: fx.Node, cx: Context) -> Shard:
    x, s = _first(node, cx)
    nd = len(gshape(x))
    dim = _arg(node, 1, "dim")
    if dim is None:
        raise Unsupported(f"{_name(node)} over all dims, the sequence's included")
    dims = {_norm(d, nd) for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
    if s.dim in dims:
        raise Unsupported(f"{_name(node)} over the sequence dim")
    keep = _arg(node, 2, "keepdim", False)
    return s if keep else Shard(s.dim - sum(d < s.dim for d in dims), s.outer, s.inner)


def norm_last(shape_index: int):
    def rule(node: fx.Node, cx: Context) -> Shard:
        x, s = _first(node, cx)
        normalized = len(_arg(node, shape_index, "normalized_shape"))
        if s.dim >= len(gshape(x)) - normalized:
            raise Unsupported("normalization over the sequence dim")
        _others_whole(node, x, cx)
        return s
    return rule


def contract_last(node: fx.Node, cx: Context) -> Shard:
    """linear(x, w, b), x @ W: the last dim of x is contracted."""
    a, b = node.args[0], node.args[1]
    sa, sb = cx.shard(a), cx.shard(b)
    if sb is not None or not isinstance(sa, Shard):
        raise Unsupported("a contraction with the sequence in its right operand")
    nd_a, nd_b, nd_out = len(gshape(a)), len(gshape(b)), len(gshape(node))
    if sa.dim == nd_a - 1 or nd_a < 2:
        raise Unsupported("a contraction over the sequence dim")
    shift = 1 if nd_b == 1 and _name(node) != "linear" else 0
    out = Shard(sa.dim - nd_a + nd_out + shift, sa.outer, sa.inner)
    if _name(node) != "linear" and sa.dim < nd_a - 2 and nd_b > 2:
        cx.align_whole(node, out, nd_out, [b])  # batch dims of b may span the sequence
    else:
        _others_whole(node, a, cx)
    return out


def addmm(node: fx.Node, cx: Context) -> Shard:
    bias, m1, m2 = node.args[:3]
    s = cx.shard(m1)
    if not isinstance(s, Shard) or s.dim != 0 or cx.shard(m2) or cx.shard(bias):
        raise Unsupported("addmm with the sequence outside the rows of its first matrix")
    _others_whole(node, m1, cx)
    return s


def embedding(node: fx.Node, cx: Context) -> Shard:
    x, s = _first(node, cx)
    _others_whole(node, x, cx)
    return s


def creates(node: fx.Node, cx: Context) -> None:
    """new_zeros/new_ones/...: the output depends only on sizes (whole on every rank)."""
    return None


def size_query(node: fx.Node, cx: Context) -> None:
    x, s = _first(node, cx)
    dim = _arg(node, 1, "dim")
    if dim is None or _norm(dim, len(gshape(x))) == s.dim:
        raise Unsupported("the size of the sequence dim is read")
    return None


def cat(node: fx.Node, cx: Context) -> Shard:
    tensors = list(_arg(node, 0, "tensors"))
    nd = len(gshape(node))
    dim = _norm(_arg(node, 1, "dim", 0), nd)
    empty = [t for t in tensors if cx.shard(t) is None and is_tensor(t)
             and gval(t).numel() == 0]  # an empty cache before the new keys
    if empty and len(tensors) - len(empty) == 1 and isinstance(cx.shard(tensors[-1]), Shard):
        s = cx.shard(tensors[-1])
        if s.dim == dim:
            for t in empty:  # its local part is empty too: the same node will do
                cx.whole_use(node, t)
            return s
    shards = [cx.shard(t) for t in tensors if cx.shard(t) is not None]
    if len(set(shards)) != 1 or not isinstance(shards[0], Shard):
        raise Unsupported("cat of differently sharded tensors")
    s = shards[0]
    if dim == s.dim:
        raise Unsupported("cat along the sequence dim")
    cx.align_whole(node, s, nd, tensors)
    return s


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target))


# -------------------------------------------------------------------------- shape rules

def view_map(in_shape: tuple, out_shape: tuple, s: Shard, seq: int) -> Shard | None:
    """Where the token axis of `s` lands after a view from `in_shape` to `out_shape`
    (row-major): the output dim holding all of it, or None when it is split."""
    inner = s.inner * math.prod(in_shape[s.dim + 1:])  # flat stride of the token axis
    for j, n in enumerate(out_shape):
        stride = math.prod(out_shape[j + 1:])
        if inner % stride == 0 and (stride * n) % (inner * seq) == 0 and stride * n >= inner * seq:
            new_inner = inner // stride
            return Shard(j, n // (seq * new_inner), new_inner)
    return None


def _sizes(node: fx.Node, start: int) -> tuple[list, bool]:
    """The size arguments from position `start`: (sizes, given as one tuple/list)."""
    rest = node.args[start:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), True
    if not rest and "size" in node.kwargs:
        return list(node.kwargs["size"]), True
    return list(rest), False


def _set_sizes(node: fx.Node, start: int, sizes: list, packed: bool) -> None:
    if not node.args[start:] and "size" in node.kwargs:
        node.kwargs = {**node.kwargs, "size": tuple(sizes)}
        return
    node.args = tuple(node.args[:start]) + ((tuple(sizes),) if packed else tuple(sizes))


def _localize_size(node: fx.Node, start: int, j: int, cx: Context) -> None:
    sizes, packed = _sizes(node, start)
    if j >= len(sizes):
        raise Unsupported("sizes not readable")
    n = sizes[j]
    if isinstance(n, fx.Node) or not isinstance(n, int):
        raise Unsupported("a symbolic size at the sequence dim")
    if n != -1:
        sizes[j] = cx.local(n)
        _set_sizes(node, start, sizes, packed)


def view(start: int):
    def rule(node: fx.Node, cx: Context) -> Shard:
        x, s = _first(node, cx)
        out = view_map(gshape(x), gshape(node), s, cx.S)
        if out is None:
            raise Unsupported("a view that splits the sequence dim")
        _localize_size(node, start, out.dim, cx)
        return out
    return rule


def flatten(node: fx.Node, cx: Context) -> Shard:
    x, s = _first(node, cx)
    out = view_map(gshape(x), gshape(node), s, cx.S)
    if out is None:
        raise Unsupported("a flatten that splits the sequence dim")
    return out


def expand(node: fx.Node, cx: Context) -> Shard:
    x, s = _first(node, cx)
    out_nd = len(gshape(node))
    j = s.dim + out_nd - len(gshape(x))
    _localize_size(node, 1, j, cx)
    return Shard(j, s.outer, s.inner)


def permute_dims(node: fx.Node, cx: Context) -> Shard:
    x, s = _first(node, cx)
    nd = len(gshape(x))
    name = _name(node)
    if name in ("transpose", "swapaxes"):
        a, b = _norm(node.args[1], nd), _norm(node.args[2], nd)
        order = list(range(nd))
        order[a], order[b] = order[b], order[a]
    elif name == "t":
        order = list(reversed(range(nd)))
    else:  # permute(*dims) or permute(dims)
        dims = node.args[1:]
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        order = [_norm(d, nd) for d in dims]
    return Shard(order.index(s.dim), s.outer, s.inner)


def squeeze_like(node: fx.Node, cx: Context) -> Shard:
    """unsqueeze / squeeze: the sequence dim keeps its size, so find it by the shapes."""
    x, s = _first(node, cx)
    out = view_map(gshape(x), gshape(node), s, cx.S)
    if out is None:
        raise Unsupported("squeeze of the sequence dim")
    return out


def getitem(node: fx.Node, cx: Context) -> Any:
    src, index = node.args
    s = cx.shard(src)
    if isinstance(s, tuple):  # an element of split / chunk
        return s[index]
    if not isinstance(s, Shard):
        raise Unsupported("indexing")
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(
            i, (int, slice))) for i in items):
        raise Unsupported("indexing by a tensor")
    nd_in = len(gshape(src))
    if Ellipsis in items:
        e = items.index(Ellipsis)
        used = sum(i is not None for i in items) - 1
        items[e:e + 1] = [slice(None)] * (nd_in - used)
    out_dim, in_dim = 0, 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == s.dim:
            if item != slice(None):
                raise Unsupported("indexing into the sequence dim")
            return Shard(out_dim, s.outer, s.inner)
        in_dim += 1
        out_dim += 0 if isinstance(item, int) else 1
    return Shard(out_dim + (s.dim - in_dim), s.outer, s.inner)


# --------------------------------------------------------------------------------- tables

_POINTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.mod, operator.pow, operator.neg, operator.pos, operator.invert, operator.and_,
    operator.or_, operator.xor, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, operator.abs, torch.add, torch.sub, torch.mul, torch.div,
    torch.true_divide, torch.where, torch.masked_fill, torch.maximum, torch.minimum, torch.pow,
    torch.rsqrt, torch.sqrt, torch.exp, torch.log, torch.tanh, torch.sigmoid, torch.relu,
    torch.abs, torch.clamp, torch.neg, torch.cos, torch.sin, torch.erf, torch.square,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
    torch.randn_like, torch.logical_and, torch.logical_or, torch.logical_not, torch.reciprocal,
    F.gelu, F.silu, F.relu, F.dropout, F.tanh, F.sigmoid, F.softplus, F.mish, F.leaky_relu,
    F.elu, F.hardtanh, F.relu6, torch._C._nn.gelu, torch._C._nn.silu, torch.nn.functional.glu,
}
_POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "truediv", "pow", "masked_fill", "float", "half", "bfloat16",
    "double", "int", "long", "bool", "to", "type", "type_as", "contiguous", "clone", "detach",
    "neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "abs", "cos", "sin",
    "clamp", "clamp_min", "clamp_max", "eq", "ne", "lt", "le", "gt", "ge", "logical_not",
    "logical_and", "logical_or", "square", "reciprocal", "sign", "where", "__and__", "__or__",
    "__invert__", "erf", "sub_", "add_", "mul_", "div_", "masked_fill_", "zero_", "fill_",
}
_RULES: dict[Any, Callable] = {
    F.softmax: over_dim(1, "dim"), torch.softmax: over_dim(1, "dim"),
    F.log_softmax: over_dim(1, "dim"), torch.log_softmax: over_dim(1, "dim"),
    "softmax": over_dim(1, "dim"), "log_softmax": over_dim(1, "dim"),
    torch.cumsum: over_dim(1, "dim"), "cumsum": over_dim(1, "dim"),
    torch.split: over_dim(2, "dim", 0), "split": over_dim(2, "dim", 0),
    torch.chunk: over_dim(2, "dim", 0), "chunk": over_dim(2, "dim", 0),
    torch.repeat_interleave: over_dim(2, "dim"), "repeat_interleave": over_dim(2, "dim"),
    "mean": reduction, "sum": reduction, "amax": reduction, "amin": reduction,
    "var": reduction, "std": reduction, "norm": reduction, "logsumexp": reduction,
    torch.mean: reduction, torch.sum: reduction, torch.amax: reduction, torch.amin: reduction,
    torch.logsumexp: reduction,
    F.layer_norm: norm_last(1), F.rms_norm: norm_last(1),
    F.linear: contract_last, torch._C._nn.linear: contract_last,
    operator.matmul: contract_last, torch.matmul: contract_last, "matmul": contract_last,
    torch.addmm: addmm, F.embedding: embedding,
    "new_zeros": creates, "new_ones": creates, "new_full": creates, "new_empty": creates,
    "new_tensor": creates, "size": size_query, "dim": creates,
    torch.cat: cat, torch.concat: cat,
    "view": view(1), "reshape": view(1), torch.reshape: view(1),
    "flatten": flatten, torch.flatten: flatten,
    "expand": expand, "transpose": permute_dims, torch.transpose: permute_dims,
    "swapaxes": permute_dims, "permute": permute_dims, torch.permute: permute_dims,
    "t": permute_dims, "unsqueeze": squeeze_like, torch.unsqueeze: squeeze_like,
    "squeeze": squeeze_like, torch.squeeze: squeeze_like, operator.getitem: getitem,
}


def rule_for(node: fx.Node) -> Callable | None:
    if node.op == "call_method":
        if node.target in _POINTWISE_METHODS:
            return pointwise
        return _RULES.get(node.target)
    if node.op == "call_function":
        if node.target in _POINTWISE_FUNCS:
            return pointwise
        try:
            return _RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None
