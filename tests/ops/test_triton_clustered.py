"""Triton clustering and clustered-attention kernels against float64 plain-torch oracles.

Runs on CPU under TRITON_INTERPRET=1, set here before this module imports triton. Tolerances
come from the dtype: two roundings in the storage dtype (probabilities before P·V, and the
output) plus a fp32-accumulation allowance, scaled by the magnitude of what is summed.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tests.helpers import oracle_tolerance  # noqa: E402

pytestmark = pytest.mark.triton

_ROOT = Path(__file__).resolve().parents[2]


def _interpret_triton_stdlib() -> int:
    """Re-wrap triton.language's own @jit helpers (tl.sum, tl.max, ...) for the interpreter.

    triton decides interpreted-or-compiled per function when it is decorated, and its stdlib is
    decorated when triton is first imported. Under pytest that happens before this module runs:
    the package root imports torch._dynamo, which imports triton. Our kernels (decorated below,
    after the setdefault) are interpreted, but would call compiled-mode helpers, which raise
    "Cannot call @triton.jit'd outside of the scope of a kernel" (triton-lang/triton#5142).
    Every module of triton.language gets the same replacement object, so identity checks such
    as the interpreter's `combine_fn is tl.standard._sum_combine` fast path still hold.
    Returns the number of helpers re-wrapped (0 when triton was imported in interpreter mode).
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return 0
    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("triton.language") and m is not None]
    wrapped: dict[int, InterpretedFunction] = {}
    for module in modules:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                if id(obj) not in wrapped:
                    wrapped[id(obj)] = InterpretedFunction(obj.fn)
                setattr(module, name, wrapped[id(obj)])
    return len(wrapped)


_interpret_triton_stdlib()


def _load(name: str, rel: str):
    # by file path: the kernels are tested on their own, whatever the package __init__ imports
    spec = importlib.util.spec_from_file_location(name, _ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tc = _load("_clusterfx_clustering_triton_under_test", "ops/clustering/triton.py")
ta = _load("_clusterfx_clustered_triton_under_test", "ops/clustered/triton_kernels.py")

B, H, HK, N, C, D, DV = 2, 4, 2, 37, 5, 16, 24
SCALE = 1.0 / math.sqrt(D)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rtol(dtype: torch.dtype) -> float:
    """Relative bound: rounding the output to dtype (none for fp32 outputs) plus fp32
    accumulation over D = 16."""
    return oracle_tolerance(dtype, 1.0, reduction=16,
                            rounding_ulps=0.0 if dtype == torch.float32 else 2.0)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float):
    """max |out - ref| <= rtol(dtype) * scale, scale being the magnitude of the summed terms."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    bound = _rtol(dtype) * max(scale, 1e-30)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} ({dtype})"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _popcount(x: torch.Tensor) -> torch.Tensor:
    bits = torch.arange(64, dtype=torch.int64)
    return ((x[..., None] >> bits) & 1).sum(-1)


def _kv_head(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.double().repeat_interleave(groups, dim=1)


def _softmax_attention(q, k, v, keep):
    """float64 oracle; keep (..., M, Nk) bool. Rows with no key -> 0 output, -inf lse."""
    s = (q.double() @ k.transpose(-1, -2)) * SCALE
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def test_kernels_run_in_the_interpreter():
    import triton.language as tl

    assert os.environ["TRITON_INTERPRET"] == "1"
    kernels = [tc._lsh_hash_kernel, tc._hamming_assign_kernel, tc._hamming_centroids_kernel,
               ta._centroid_attention_kernel, ta._topk_gather_kernel,
               ta._cluster_broadcast_kernel, ta._cluster_mean_kernel]
    assert all(isinstance(kern, InterpretedFunction) for kern in kernels)
    assert all(isinstance(f, InterpretedFunction) for f in (tl.sum, tl.max, tl.min, tl.zeros))
    assert tl.sum is tl.standard.sum


# ---------------------------------------------------------------------------------- clustering


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,d", [(31, D), (63, 70)])  # 63 bits: top bit; D=70: two D blocks
def test_lsh_hash_matches_float64(dtype, bits, d):
    x = _randn(B, H, N, d, dtype=dtype, seed=1)
    planes = _randn(bits, d + 1, seed=2)
    codes = tc.lsh_hash(x, planes)
    assert codes.dtype == torch.int64 and codes.shape == (B, H, N)
    assert (codes >= 0).all()
    proj = x.double() @ planes[:, :d].double().T - planes[:, d].double()
    ref_bits = proj > 0
    got_bits = ((codes[..., None] >> torch.arange(bits)) & 1).bool()
    assert (codes >> bits == 0).all()
    # fp32 sums may flip a bit only where the projection sits within rounding of its threshold
    near = proj.abs() <= 64 * torch.finfo(torch.float32).eps * (x.double().abs() @ planes[
        :, :d].double().abs().T + planes[:, d].double().abs())
    assert ((got_bits == ref_bits) | near).all()
    assert ref_bits.any() and (~ref_bits).any()


def test_lsh_hash_reads_strided_input():
    x = _randn(B, N, H, D, seed=3).transpose(1, 2)  # (B, H, N, D), not contiguous
    planes = _randn(20, D + 1, seed=4)
    assert torch.equal(tc.lsh_hash(x, planes), tc.lsh_hash(x.contiguous(), planes))


def test_hamming_assign_matches_popcount_argmin():
    hashes = torch.randint(0, 2**62, (B, H, N), generator=_gen(5)) * 2 + 1  # up to 63 bits
    centroids = torch.randint(0, 2**62, (B, H, 40), generator=_gen(6))
    got = tc.hamming_assign(hashes, centroids, block_n=16, block_c=16)  # 3 centroid chunks
    dist = _popcount(hashes[..., :, None] ^ centroids[..., None, :])
    assert torch.equal(got, dist.argmin(-1))  # argmin returns the first minimum


def test_hamming_assign_ties_go_to_the_lowest_index():
    # query 0 is equidistant (1 bit) from centroids 1 and 2; query 1 equals centroids 3 and 35,
    # which sit in different chunks of 16; query 2 equals centroid 39 only
    centroids = torch.full((1, 40), 0b111111, dtype=torch.int64)
    centroids[0, 1], centroids[0, 2] = 0b01, 0b10
    centroids[0, 3] = centroids[0, 35] = 0b1010000
    centroids[0, 39] = 2**62 + 5
    hashes = torch.tensor([[0b00, 0b1010000, 2**62 + 5]])
    got = tc.hamming_assign(hashes, centroids, block_n=16, block_c=16)
    assert got.tolist() == [[1, 3, 39]]


def test_hamming_centroids_majority_vote():
    hashes = torch.randint(0, 2**62, (B, H, N), generator=_gen(7)) * 2 + 1
    assignments = torch.randint(0, C + 1, (B, H, N), generator=_gen(8))  # label C: not counted
    assignments[0, 0] = torch.where(assignments[0, 0] == 2, 0, assignments[0, 0])  # empty cluster
    assignments[0, 0, -1] = -1  # also not counted
    centroids, counts = tc.hamming_centroids(hashes, assignments, C, 63, block_n=16)
    member = assignments[..., None] == torch.arange(C)  # (B, H, N, C)
    bit = (hashes[..., None] >> torch.arange(63)) & 1  # (B, H, N, 63)
    ones = torch.einsum("bhnc,bhnk->bhck", member.long(), bit)
    ref_counts = member.sum(2)
    ref = ((2 * ones > ref_counts[..., None]).long() << torch.arange(63)).sum(-1)
    assert torch.equal(counts, ref_counts)
    assert torch.equal(centroids, ref)
    assert counts[0, 0, 2] == 0 and centroids[0, 0, 2] == 0


def test_hamming_centroids_tie_gives_zero():
    # cluster 0: two members that disagree on bits 0 and 1 and agree on bit 2 -> 0b100
    # cluster 1: three members, bit 0 set in two of them -> 0b1
    hashes = torch.tensor([[0b101, 0b110, 0b1, 0b1, 0b0]])
    assignments = torch.tensor([[0, 0, 1, 1, 1]])
    centroids, counts = tc.hamming_centroids(hashes, assignments, 3, 3)
    assert centroids.tolist() == [[0b100, 0b1, 0]]
    assert counts.tolist() == [[2, 3, 0]]


def test_clustering_rejects_bad_inputs():
    x, planes = _randn(2, 8, 4), _randn(10, 5)
    with pytest.raises(ValueError, match="columns"):
        tc.lsh_hash(x, _randn(10, 4))
    with pytest.raises(ValueError, match="bits"):
        tc.lsh_hash(x, _randn(64, 5))
    with pytest.raises(ValueError, match="float32"):
        tc.lsh_hash(x.long(), planes)
    i32, i64 = torch.int32, torch.int64
    with pytest.raises(ValueError, match="int64"):
        tc.hamming_assign(torch.zeros(2, 8, dtype=i32), torch.zeros(2, 3, dtype=i32))
    with pytest.raises(ValueError, match="leading dims"):
        tc.hamming_assign(torch.zeros(2, 8, dtype=i64), torch.zeros(3, 3, dtype=i64))
    with pytest.raises(ValueError, match="clusters"):
        tc.hamming_centroids(torch.zeros(2, 8, dtype=torch.int64),
                             torch.zeros(2, 8, dtype=torch.int64), 0, 8)


# ------------------------------------------------------------------------- clustered attention


def _qkv(dtype, m=C, seed=10):
    q = _randn(B, H, m, D, dtype=dtype, seed=seed)
    k = _randn(B, HK, N, D, dtype=dtype, seed=seed + 1)
    v = _randn(B, HK, N, DV, dtype=dtype, seed=seed + 2)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
def test_centroid_attention_with_padding_and_gqa(dtype):
    qc, k, v = _qkv(dtype)
    keep = torch.rand(B, N, generator=_gen(13)) > 0.3
    keep[0, :20] = False  # key blocks 0 (and part of 1) of 16 fully padded: -inf running max
    keep[1] = False  # a fully padded batch row: out 0, lse -inf
    out, lse = ta.centroid_attention(qc, k, v, keep, SCALE, block_m=16, block_n=16)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref, ref_lse = _softmax_attention(qc, _kv_head(k, H // HK), _kv_head(v, H // HK),
                                      keep[:, None, None, :].expand(B, H, C, N))
    _assert_close(out, ref, dtype, v.abs().max().item())
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()
    _assert_close(lse[0], ref_lse[0], torch.float32, ref_lse[0].abs().max().item())


def test_centroid_attention_without_mask_and_strided_kv():
    qc, k, v = _qkv(torch.float32, m=19)
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    out, lse = ta.centroid_attention(qc, k_strided, v, None, SCALE)  # default blocks
    keep = torch.ones(B, H, 19, N, dtype=torch.bool)
    ref, ref_lse = _softmax_attention(qc, _kv_head(k, 2), _kv_head(v, 2), keep)
    _assert_close(out, ref, torch.float32, v.abs().max().item())
    _assert_close(lse, ref_lse, torch.float32, ref_lse.abs().max().item())


def _gather_oracle(q, k, v, idx, mass):
    groups = q.shape[1] // k.shape[1]
    kk, vv = _kv_head(k, groups), _kv_head(v, groups)
    bi = torch.arange(q.shape[0])[:, None, None, None]
    hi = torch.arange(q.shape[1])[None, :, None, None]
    valid = idx >= 0
    ids = idx.clamp(min=0)
    s = (q.double()[..., None, :] * kk[bi, hi, ids]).sum(-1) * SCALE
    p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    out = (p[..., None] * vv[bi, hi, ids]).sum(-2)
    return out if mass is None else out * mass.double()[..., None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mass", [True, False])
def test_topk_gather_attention_with_padded_idx(dtype, with_mass):
    q, k, v = _qkv(dtype, m=N, seed=20)
    idx = torch.randint(0, N, (B, H, N, 7), generator=_gen(23))
    idx[..., 5:] = -1  # trailing padding
    idx[0, 1, 3] = -1  # a row with no key: output 0
    idx[1, 2, 4, 0] = idx[1, 2, 4, 1]  # a duplicate counts twice
    mass = torch.rand(B, H, N, generator=_gen(24)) if with_mass else None
    out = ta.topk_gather_attention(q, k, v, idx, SCALE, mass, block_m=8, block_k=4)
    assert out.dtype == dtype
    _assert_close(out, _gather_oracle(q, k, v, idx, mass), dtype, v.abs().max().item())
    assert torch.equal(out[0, 1, 3], torch.zeros(DV, dtype=dtype))


def test_topk_gather_over_all_keys_equals_centroid_attention():
    q, k, v = _qkv(torch.float32, m=9, seed=30)
    idx = torch.arange(N).expand(B, H, 9, N).flip(-1).contiguous()  # every key, reversed
    out = ta.topk_gather_attention(q, k, v, idx, SCALE)  # default blocks
    dense, _ = ta.centroid_attention(q, k, v, None, SCALE)
    _assert_close(out, dense.double(), torch.float32, v.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_broadcast_copies_rows(dtype):
    values = _randn(B, H, C, DV, dtype=dtype, seed=40)
    assignments = torch.randint(-1, C + 1, (B, H, N), generator=_gen(41))  # -1 and C: padding
    out = ta.cluster_broadcast(values, assignments, block_m=16)
    inside = (assignments >= 0) & (assignments < C)
    index = assignments.clamp(0, C - 1)[..., None].expand(-1, -1, -1, DV)
    gathered = torch.gather(values, 2, index)
    assert torch.equal(out, torch.where(inside[..., None], gathered, torch.zeros((), dtype=dtype)))
    assert (~inside).any() and inside.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_mean_with_empty_cluster(dtype):
    x = _randn(B, H, N, DV, dtype=dtype, seed=50)
    assignments = torch.randint(0, C, (B, H, N), generator=_gen(51))
    assignments[0, 0] = torch.where(assignments[0, 0] == 3, 4, assignments[0, 0])  # 3 empty
    assignments[1, 1, :4] = -1  # padded rows are no member
    means, counts = ta.cluster_mean(x, assignments, C, block_c=16, block_n=16)
    member = (assignments[..., None] == torch.arange(C)).double()  # (B, H, N, C)
    ref_counts = member.sum(2)
    ref = (member.transpose(-1, -2) @ x.double()) / ref_counts.clamp(min=1)[..., None]
    assert means.dtype == dtype and torch.equal(counts, ref_counts.long())
    assert counts[0, 0, 3] == 0 and torch.equal(means[0, 0, 3], torch.zeros(DV, dtype=dtype))
    _assert_close(means, ref, dtype, x.abs().max().item())


def test_clustered_rejects_bad_inputs():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(ValueError, match=r"heads \(4\) must be divisible by kv heads \(3\)"):
        ta.centroid_attention(q, _randn(B, 3, N, D), _randn(B, 3, N, DV), None, SCALE)
    with pytest.raises(ValueError, match="share a dtype"):
        ta.centroid_attention(q, k.half(), v, None, SCALE)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ta.centroid_attention(q, k, v, torch.ones(B, N - 1, dtype=torch.bool), SCALE)
    with pytest.raises(ValueError, match="head dim D"):
        ta.centroid_attention(_randn(B, H, C, 300), _randn(B, HK, N, 300), v, None, SCALE)
    with pytest.raises(ValueError, match="scale"):
        ta.centroid_attention(q, k, v, None, float("nan"))
    with pytest.raises(ValueError, match="idx must be int64"):
        ta.topk_gather_attention(q, k, v, torch.zeros(B, H, C, 3, dtype=torch.int32), SCALE)
    with pytest.raises(ValueError, match="mass"):
        ta.topk_gather_attention(q, k, v, torch.zeros(B, H, C, 3, dtype=torch.int64), SCALE,
                                 torch.ones(B, H, C, dtype=torch.float64))
    with pytest.raises(ValueError, match="assignments"):
        ta.cluster_broadcast(v, torch.zeros(B, H + 1, N, dtype=torch.int64))
    with pytest.raises(ValueError, match="clusters"):
        ta.cluster_mean(v, torch.zeros(B, HK, N, dtype=torch.int64), 0)
