"""Read the two einsums of an attention (`scores = einsum(q, k)`, `out = einsum(p, v)`) as
permutations onto the canonical layouts q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv)."""

from __future__ import annotations

from dataclasses import dataclass

from clusterfx.config.vocabulary import Decline

_SPARE = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _expand_ellipsis(eq: str, ndims: list[int]) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        raise Decline("einsum without an explicit output ('->')")
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or len(ndims) != 2:
        raise Decline("einsum with other than two operands")
    used = set(eq) - set(".,->")
    spare = [c for c in _SPARE if c not in used]
    width = max((nd - len(t.replace("...", "")) for t, nd in zip(terms, ndims)
                 if "..." in t), default=0)
    fill = "".join(spare[:width])
    expanded = []
    for t, nd in zip(terms, ndims):
        if "..." in t:
            t = t.replace("...", fill[width - (nd - len(t.replace("...", ""))):])
        expanded.append(t)
    return expanded, out.replace("...", fill)


@dataclass(frozen=True)
class ScoreEinsum:
    """scores[out] = Σ_d a[ta] b[tb]; q = a.permute(perm_a), k = b.permute(perm_b)."""

    perm_a: tuple[int, ...]
    perm_b: tuple[int, ...]
    out: str


def read_scores(eq: str, ndims: list[int]) -> ScoreEinsum:
    (ta, tb), out = _expand_ellipsis(eq, ndims)
    contracted = [c for c in ta if c in tb and c not in out]
    if len(contracted) != 1 or len(out) < 3:
        raise Decline(f"einsum {eq!r} does not contract exactly one head dim")
    d = contracted[0]
    q, k = out[-2], out[-1]
    batch = out[:-2]
    if q not in ta or q in tb or k not in tb or k in ta:
        raise Decline(f"einsum {eq!r} is not (query, key) ordered")
    if sorted(ta) != sorted(batch + q + d) or sorted(tb) != sorted(batch + k + d):
        raise Decline(f"einsum {eq!r} broadcasts or sums batch dims")
    perm_a = tuple(ta.index(c) for c in batch + q + d)
    perm_b = tuple(tb.index(c) for c in batch + k + d)
    return ScoreEinsum(perm_a, perm_b, out)


@dataclass(frozen=True)
class ValueEinsum:
    """out = einsum(p, v): v = v.permute(perm_v) is (..., Nk, Dv); the canonical output
    (..., Nq, Dv) is permuted by `perm_out` to the einsum's output layout."""

    probs_first: bool
    perm_v: tuple[int, ...]
    perm_out: tuple[int, ...]


def read_values(eq: str, ndims: list[int], probs_first: bool) -> ValueEinsum:
    terms, out = _expand_ellipsis(eq, ndims)
    tp, tv = terms if probs_first else terms[::-1]
    if len(tp) < 3:
        raise Decline(f"einsum {eq!r}: probabilities must be (..., Nq, Nk)")
    batch, q, k = tp[:-2], tp[-2], tp[-1]
    dv = [c for c in tv if c not in tp]
    if len(dv) != 1 or k in out or k not in tv or sorted(tv) != sorted(batch + k + dv[0]):
        raise Decline(f"einsum {eq!r} is not probabilities @ values")
    canonical = batch + q + dv[0]
    if sorted(out) != sorted(canonical):
        raise Decline(f"einsum {eq!r} reduces over batch dims")
    return ValueEinsum(probs_first, tuple(tv.index(c) for c in batch + k + dv[0]),
                       tuple(canonical.index(c) for c in out))
