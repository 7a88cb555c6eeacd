"""Spellings found in real models (BLOOM, DeBERTa, Longformer, THC) and the rule that every
softmax-over-keys attention of a graph appears as a report row, while softmaxes that are not
attention (assignments to learned centres, pooling) never do."""

from __future__ import annotations

import torch
import torch.nn as nn

import clusterfx as cfx
from tests.helpers import canonical_count, compile_and_compare

DT = torch.float64
B, H, N, D = 2, 4, 10, 8


def _x(seed=0):
    return torch.randn(B, N, H * D, dtype=DT, generator=torch.Generator().manual_seed(seed))


class MergedHeads(nn.Module):
    """BLOOM / DeBERTa layout: bmm on (B·H, N, D), scores viewed per head for the mask (and,
    with `bias`, a score term computed from q and k themselves, as disentangled attention)."""

    def __init__(self, bias: bool = False, fill: bool = False):
        super().__init__()
        self.qkv = nn.Linear(H * D, 3 * H * D, dtype=DT)
        self.rel = nn.Linear(D, D, dtype=DT)
        self.bias, self.fill = bias, fill

    def forward(self, x, keep):
        q, k, v = (t.reshape(B * H, N, D) for t in self.qkv(x).view(B, N, 3, H, D)
                   .permute(2, 0, 3, 1, 4))
        scores = torch.baddbmm(torch.zeros(B * H, 1, N, dtype=DT), q, k.transpose(1, 2),
                               beta=1.0, alpha=D**-0.5)
        if self.bias:
            scores = scores + torch.bmm(q, self.rel(k).transpose(1, 2)) * 0.1
        scores = scores.view(B, H, N, N)
        if self.fill:  # DeBERTa: a (B, 1, N, N) mask that also masks padded query rows
            pair = keep[:, None, :, None] & keep[:, None, None, :]
            scores = scores.masked_fill(~pair, torch.finfo(DT).min)
        else:
            scores = scores + torch.zeros(B, 1, 1, N, dtype=DT).masked_fill(
                ~keep[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(B * H, N, N)
        return torch.bmm(probs, v).view(B, H, N, D)


def _keep():
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, -3:] = False
    return keep


def test_batch_merged_bmm_with_per_head_mask_is_one_site():
    for bias in (False, True):
        report = compile_and_compare(MergedHeads(bias), (_x(), _keep()), rtol=1e-10)
        assert len(report) == 1 and report[0].status == "kept dense", str(report)
        assert report[0].site.q_shape == (B, H, N, D)
        gm = cfx.transform(MergedHeads(bias), (_x(), _keep()), stop_after="canonicalize")
        assert canonical_count(gm) == 1


def test_finite_fill_on_whole_rows_keeps_exact_gradients():
    """`masked_fill(m, finfo.min)` masking entire query rows: the additive form is exact in
    the forward; the gradient of the replaced scores must stay zero (it did not: DeBERTa)."""
    report = compile_and_compare(MergedHeads(bias=True, fill=True), (_x(), _keep()),
                                 rtol=1e-10)
    assert len(report) == 1 and report[0].status == "kept dense"


class Banded(nn.Module):
    """Probabilities edited (masked_fill after the softmax) before the values matmul, as
    Longformer writes its banded attention: attention-shaped, not readable exactly."""

    def forward(self, q, k, v, dead):
        probs = torch.softmax(q @ k.transpose(-2, -1) * D**-0.5, dim=-1)
        probs = probs.masked_fill(dead[:, None, :, None], 0.0)
        return probs @ v


class Assignment(nn.Module):
    """THC's soft assignment to learned centres, S = softmax(q (kᵀ W)), pooled as Sᵀ x: a
    softmax over clusters, not over keys, that must never become a report row."""

    def __init__(self):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(N, 3, dtype=DT))
        self.memory = nn.Parameter(torch.randn(5, D, dtype=DT))

    def forward(self, q, k, x):
        soft = torch.softmax(q @ (k.transpose(-2, -1) @ self.centres), dim=-1)  # (B, H, N, 3)
        pooled = soft.transpose(-2, -1) @ x  # (B, H, 3, D)
        # routers over learned / constant columns: softmax(x Wᵀ) U
        gate = torch.softmax(x @ self.memory.T, dim=-1) @ self.memory
        ones = torch.softmax(x @ x.new_ones(D, 4), dim=-1) @ x.new_ones(4, D)
        return pooled, gate, ones


def _qkv():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(B, H, N, D, dtype=DT, generator=g) for _ in range(3))


def test_unreadable_attention_is_recorded_with_a_reason():
    dead = torch.zeros(B, N, dtype=torch.bool)
    dead[0, 2] = True
    report = compile_and_compare(Banded(), (*_qkv(), dead), rtol=1e-10)
    assert len(report) == 1 and report[0].status == "unsupported"
    assert "masked_fill" in report[0].reason


def test_softmaxes_that_are_not_attention_are_never_rows():
    q, k, x = _qkv()
    report = compile_and_compare(Assignment(), (q, k, x), rtol=1e-10)
    assert len(report) == 0, str(report)


class SharedMemory(nn.Module):
    """Keys and values of rank 2 computed from an input (a memory shared by the whole batch):
    attention over keys, but not in the canonical (..., N, D) layout: a row with the reason."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(D, D, dtype=DT)

    def forward(self, q, memory):
        keys = self.k(memory)  # (M, D)
        return torch.softmax(q @ keys.T * D**-0.5, dim=-1) @ memory


def test_rank_two_keys_from_an_input_are_recorded_not_missed():
    q = _qkv()[0]
    memory = torch.randn(7, D, dtype=DT, generator=torch.Generator().manual_seed(2))
    report = compile_and_compare(SharedMemory(), (q, memory), rtol=1e-10)
    assert len(report) == 1 and report[0].status == "unsupported", str(report)
    assert "rank 2" in report[0].reason
