"""The spelling coverage table: every attention spelling becomes one canonical node; the
compiled model equals eager (outputs and gradients, float64); softmaxes that are not
attention are never touched."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clusterfx as cfx
from clusterfx.passes.analysis.graph_utils import SOFTMAXES
from tests.helpers import canonical_count, compile_and_compare, count_targets

B, H, N, D = 2, 4, 12, 8
DT = torch.float64


def qkv(n=N, heads=H, kv_heads=None, dtype=DT, d=D):
    g = torch.Generator().manual_seed(0)
    kvh = kv_heads or heads
    return (torch.randn(B, heads, n, d, generator=g, dtype=dtype),
            torch.randn(B, kvh, n, d, generator=g, dtype=dtype),
            torch.randn(B, kvh, n, d, generator=g, dtype=dtype))


def pad_keep(n=N):
    keep = torch.ones(B, n, dtype=torch.bool)
    keep[1, n - 3:] = False
    return keep


class Attn(nn.Module):
    """Wraps a spelling so the site has a module path (`attn`)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.attn = Attn(fn)

    def forward(self, *args):
        return self.attn(*args)


def s_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def s_sdpa_bool(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pad_keep()[:, None, None, :])


def s_sdpa_float(q, k, v):
    bias = torch.linspace(-1, 1, N * N, dtype=q.dtype).view(N, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def s_sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def s_sdpa_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def s_mul(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(D)), dim=-1) @ v


def s_div_sqrt(q, k, v):
    return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.size(-1)),
                                  dim=-1), v)


def s_pow(q, k, v):
    return (q @ k.mT * q.shape[-1] ** -0.5).softmax(-1) @ v


def s_scale_q(q, k, v):
    return ((q * D**-0.5) @ k.transpose(-1, -2)).softmax(dim=-1) @ v


def s_scale_split(q, k, v):
    s = D**-0.25
    return ((q * s) @ (k * s).transpose(-2, -1)).softmax(-1) @ v


def s_permute_k(q, k, v):
    kt = k.permute(0, 1, 3, 2)
    return torch.softmax(q @ kt / 3.0, -1) @ v


def s_bmm(q, k, v):
    q3, k3, v3 = (x.reshape(B * H, N, D) for x in (q, k, v))
    return torch.bmm(torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * 0.25, -1), v3)


def s_baddbmm(q, k, v):
    q3, k3, v3 = (x.reshape(B * H, N, D) for x in (q, k, v))
    bias = torch.zeros(B * H, N, N, dtype=q.dtype).masked_fill(~pad_keep().repeat_interleave(
        H, 0)[:, None, :], float("-inf"))
    return torch.bmm(torch.baddbmm(bias, q3 * 0.3, k3.transpose(-2, -1)).softmax(-1), v3)


def s_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.3
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def s_einsum_bqhd(q, k, v):
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, N, H, D)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(dim=-1), v)


def s_einsum_ellipsis(q, k, v):
    s = torch.einsum("...qd,...kd->...qk", q, k) * 0.3
    return torch.einsum("...qk,...kd->...qd", s.softmax(-1), v)


def s_additive(q, k, v):
    bias = torch.zeros(B, 1, 1, N, dtype=q.dtype).masked_fill(
        ~pad_keep()[:, None, None, :], -1e9)
    return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + bias, dim=-1) @ v


def s_masked_fill_inf(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.3
    s = s.masked_fill(~pad_keep()[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def s_masked_fill_min(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.3
    mask = pad_keep().long()
    s = s.masked_fill(mask[:, None, None, :] == 0, torch.finfo(s.dtype).min)
    return s.softmax(-1) @ v


def s_where(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.3
    s = torch.where(pad_keep()[:, None, None, :], s, torch.finfo(s.dtype).min)
    return s.softmax(-1) @ v


def s_causal_tril(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-2, -1) * 0.3
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).tril() == 0, float("-inf"))
    return s.softmax(-1) @ v


def s_causal_arange(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    s = q @ k.transpose(-2, -1) * 0.3
    s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
    return s.softmax(-1) @ v


def s_causal_triu_plus_pad(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-2, -1) * 0.3
    s = s.masked_fill(torch.triu(torch.ones(n, n), diagonal=1).bool(), float("-inf"))
    s = s + torch.zeros(B, 1, 1, n, dtype=s.dtype).masked_fill(
        ~pad_keep()[:, None, None, :], -1e9)
    return s.softmax(-1) @ v


def s_fp32_casts(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.3
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def s_softmax_dtype(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.3
    return F.softmax(s, dim=-1, dtype=torch.float32).type_as(q) @ v


def s_dropout_eval(q, k, v):
    p = F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1), p=0.1, training=False)
    return p @ v


def s_repeat_kv(q, k, v):
    # k, v have H // 2 heads, Llama's repeat_kv
    b, hk, n, d = k.shape
    k = k[:, :, None].expand(b, hk, 2, n, d).reshape(b, hk * 2, n, d)
    v = v[:, :, None].expand(b, hk, 2, n, d).reshape(b, hk * 2, n, d)
    return torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ v


def s_repeat_interleave(q, k, v):
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    return F.scaled_dot_product_attention(q, k, v)


def s_sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def s_mqa_broadcast(q, k, v):
    k, v = k[:, :1], v[:, :1]  # one kv head broadcast by matmul
    return torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ v


SPELLINGS = {
    "sdpa": (s_sdpa, "sdpa", None, False),
    "sdpa_bool_mask": (s_sdpa_bool, "sdpa", "boolean", False),
    "sdpa_float_mask": (s_sdpa_float, "sdpa", "additive", False),
    "sdpa_is_causal": (s_sdpa_causal, "sdpa", None, True),
    "sdpa_scale": (s_sdpa_scale, "sdpa", None, False),
    "mul_scale": (s_mul, "matmul", None, False),
    "div_sqrt": (s_div_sqrt, "matmul", None, False),
    "pow_head_dim_mT": (s_pow, "matmul", None, False),
    "scale_on_q": (s_scale_q, "matmul", None, False),
    "scale_split_q_k": (s_scale_split, "matmul", None, False),
    "permute_k": (s_permute_k, "matmul", None, False),
    "bmm": (s_bmm, "bmm", None, False),
    "baddbmm_bias": (s_baddbmm, "baddbmm", "additive", False),
    "einsum": (s_einsum, "einsum", None, False),
    "einsum_bqhd": (s_einsum_bqhd, "einsum", None, False),
    "einsum_ellipsis": (s_einsum_ellipsis, "einsum", None, False),
    "additive_mask": (s_additive, "matmul", "additive", False),
    "masked_fill_inf": (s_masked_fill_inf, "matmul", "boolean", False),
    "masked_fill_finfo_min": (s_masked_fill_min, "matmul", "additive", False),
    "where_finfo_min": (s_where, "matmul", "additive", False),
    "causal_tril_in_forward": (s_causal_tril, "matmul", None, True),
    "causal_arange": (s_causal_arange, "matmul", None, True),
    "causal_triu_and_padding": (s_causal_triu_plus_pad, "matmul", "additive", True),
    "softmax_fp32_casts": (s_fp32_casts, "matmul", None, False),
    "softmax_dtype_type_as": (s_softmax_dtype, "matmul", None, False),
    "dropout_eval": (s_dropout_eval, "matmul", None, False),
    "repeat_kv_gqa": (s_repeat_kv, "matmul", None, False),
    "repeat_interleave_gqa": (s_repeat_interleave, "sdpa", None, False),
    "sdpa_enable_gqa": (s_sdpa_gqa, "sdpa", None, False),
    "mqa_broadcast": (s_mqa_broadcast, "matmul", None, False),
}
GQA = {"repeat_kv_gqa", "repeat_interleave_gqa", "sdpa_enable_gqa"}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling(name):
    fn, spelling, mask, causal = SPELLINGS[name]
    dtype = torch.float32 if name.startswith("softmax_") else DT
    inputs = qkv(kv_heads=H // 2 if name in GQA else None, dtype=dtype)
    model = Net(fn)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    report = compile_and_compare(model, inputs, rtol=rtol)
    assert len(report) == 1
    site = report[0].site
    assert (site.fqn, site.spelling, site.status) == ("attn", spelling, "kept dense")
    assert site.mask == (mask or "none")
    assert site.causal is causal
    if name in GQA:
        assert site.gqa_groups == 2
    # node counts: the captured graph has the attention; the canonical graph has one node and
    # no softmax; the lowered graph has neither
    canon = cfx.transform(model, inputs, stop_after="canonicalize")
    assert canonical_count(canon) == 1
    assert count_targets(canon, *SOFTMAXES, "softmax") == 0
    lowered = cfx.transform(model, inputs)
    assert canonical_count(lowered) == 0


def test_causal_buffer_slice_nanogpt():
    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))

        def forward(self, q, k, v):
            t = q.size(-2)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            return F.softmax(att, dim=-1) @ v

    report = compile_and_compare(Causal(), qkv(), rtol=1e-10)
    assert len(report) == 1 and report[0].site.causal and report[0].site.mask == "none"


def test_non_causal_static_mask_is_kept_as_mask():
    def banded(q, k, v):
        n = q.shape[-2]
        i = torch.arange(n)
        far = (i[None, :] - i[:, None]).abs() > 2
        return (q @ k.mT * 0.3).masked_fill(far, float("-inf")).softmax(-1) @ v

    report = compile_and_compare(Net(banded), qkv(), rtol=1e-10)
    assert not report[0].site.causal and report[0].site.mask == "boolean"


def test_dropout_in_training_is_carried():
    def train_dropout(q, k, v):
        p = F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1), p=0.25, training=True)
        return p @ v

    gm = cfx.transform(Net(train_dropout), qkv())
    site = gm.meta["clusterfx_report"][0].site
    assert site.dropout_p == 0.25
    sdpa = [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 1 and sdpa[0].kwargs["dropout_p"] == 0.25


class ClassifierHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 5, dtype=DT)

    def forward(self, x):
        return torch.softmax(self.proj(x), dim=-1)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Linear(D, D, dtype=DT)

    def forward(self, x):
        return torch.softmax(self.g(x), -1) * x


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.r = nn.Linear(D, 4, dtype=DT)
        self.experts = nn.Parameter(torch.randn(4, D, D, dtype=DT))

    def forward(self, x):
        probs = torch.softmax(self.r(x), dim=-1)  # (B, N, 4)
        w, idx = probs.topk(2, dim=-1)
        return (w.unsqueeze(-1) * x.unsqueeze(-2)).sum(-2) + idx.float().sum() * 0


class SoftAssignPool(nn.Module):
    """softmax over tokens then probs @ x: pooling, its scores do not come from q @ kᵀ."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(D, 3, dtype=DT)

    def forward(self, x):
        a = torch.softmax(self.score(x).transpose(-2, -1), dim=-1)  # (B, 3, N)
        return a @ x


@pytest.mark.parametrize("module", [ClassifierHead, Gate, Router, SoftAssignPool])
def test_non_attention_softmax_is_never_touched(module):
    model = module()
    x = torch.randn(B, N, D, dtype=DT)
    report = compile_and_compare(model, (x,), rtol=1e-12)
    assert len(report) == 0
    gm = cfx.transform(model, (x,))
    assert count_targets(gm, *SOFTMAXES, "softmax") == 1


def test_probabilities_used_elsewhere_stay_as_written():
    def returns_probs(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1)
        return p @ v, p.mean(dim=1)

    report = compile_and_compare(Net(returns_probs), qkv(), rtol=1e-12)
    assert len(report) == 1
    site = report[0].site
    assert site.status == "unsupported" and "probabilities" in site.reason
    gm = cfx.transform(Net(returns_probs), qkv())
    assert canonical_count(gm) == 0 and count_targets(gm, *SOFTMAXES, "softmax") == 1


def test_unreadable_score_edit_is_reported_not_rewritten():
    def clipped(q, k, v):  # tanh soft-capping between matmul and softmax
        s = torch.tanh(q @ k.transpose(-2, -1) * 0.3) * 5.0
        return s.softmax(-1) @ v

    report = compile_and_compare(Net(clipped), qkv(), rtol=1e-12)
    assert len(report) == 1 and report[0].site.status == "unsupported"
    assert "tanh" in report[0].site.reason


def test_in_place_mask_on_scores_is_not_lost():
    def inplace(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.3
        s.masked_fill_(~pad_keep()[:, None, None, :], float("-inf"))  # result unused
        return s.softmax(-1) @ v

    report = compile_and_compare(Net(inplace), qkv(), rtol=1e-12)
    assert len(report) == 1 and report[0].site.status == "unsupported"
    assert "in place" in report[0].site.reason


def test_mask_written_in_place_is_not_mistaken_for_causal():
    def tril_then_pad(q, k, v):
        n = q.shape[-2]
        keep = torch.ones(B, 1, n, n, dtype=torch.bool).tril()
        keep[1, :, :, -3:] = False  # padding written in place after the causal pattern
        return (q @ k.mT * 0.3).masked_fill(~keep, float("-inf")).softmax(-1) @ v

    report = compile_and_compare(Net(tril_then_pad), qkv(), rtol=1e-10)
    assert report[0].site.causal is False and report[0].site.mask == "boolean"
