"""A small GPT trained on Python's standard library, for `clusterfx bench causal --part
train|quality`: the corpus, training in resumable segments, and perplexity under a policy.

Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages excluded),
sorted by path, as UTF-8 bytes (vocabulary 256). Every 20th file is held out for evaluation.
Model: ``clusterfx.models.gpt.GPT`` (learned positions up to 4096, tied embeddings), trained
with exact attention (its attention rewritten to fused causal SDPA by ``Dense``), AdamW, a
linear warm-up and a cosine decay over the time budget; the first 60% of the budget on
windows of 1024 bytes (batch 4), the rest on windows of 4096 (batch 1), so every position
the evaluation uses is trained. A segment trains until its own minutes or the total budget
run out and saves a checkpoint the next segment resumes from (model, optimiser, step, time,
sampler state).
"""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clusterfx.compiler.api import compile as cfx_compile
from clusterfx.config.configs import Dense
from clusterfx.models.gpt import GPT

VOCAB, MAX_LEN = 256, 4096
MODEL = dict(dim=128, depth=4, n_head=4)
HOLD_OUT = 20  # every HOLD_OUT-th file is evaluation text
PHASES = ((0.6, 1024, 4), (1.0, 4096, 1))  # (until this fraction of the budget, length, batch)
LR, WARMUP = 2e-3, 100
TRAIN_BACKEND = "inductor"


def corpus(limit_bytes: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train bytes, eval bytes, number of files) of the standard library's Python sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise ValueError(f"no .py files under {root}: cannot build the corpus")
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        data = path.read_bytes()
        (held if i % HOLD_OUT == 0 else train).extend(data + b"\n")
        if len(train) + len(held) > limit_bytes:
            break
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held), len(files)


def new_model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, max_len=MAX_LEN, dropout=0.0, **MODEL)


def _lr(fraction: float, step: int) -> float:
    return LR * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(fraction, 1)))


def train_segment(checkpoint: Path, total_minutes: float, segment_minutes: float,
                  log=print) -> dict:
    """Train until ``segment_minutes`` pass or the total budget is used; save and return the
    state summary (step, minutes trained, last losses)."""
    if total_minutes <= 0 or segment_minutes <= 0:
        raise ValueError(f"--train-minutes ({total_minutes}) and --segment-minutes "
                         f"({segment_minutes}) must be > 0")
    train, _, _ = corpus()
    model = new_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    state = {"step": 0, "seconds": 0.0, "losses": [], "gen": None}
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
    gen = torch.Generator().manual_seed(0)
    if state["gen"] is not None:
        gen.set_state(state["gen"])
    compiled = cfx_compile(model, policy=Dense(), backend=TRAIN_BACKEND)
    budget = total_minutes * 60
    began = time.perf_counter()
    while state["seconds"] < budget and time.perf_counter() - began < segment_minutes * 60:
        start = time.perf_counter()
        fraction = state["seconds"] / budget
        _, length, batch = next(p for p in PHASES if fraction < p[0])
        offsets = torch.randint(0, train.numel() - length - 1, (batch,), generator=gen)
        x = torch.stack([train[o:o + length + 1] for o in offsets.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr(fraction, state["step"])
        logits = compiled(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["seconds"] += time.perf_counter() - start
        state["losses"] = (state["losses"] + [loss.item()])[-50:]
        if state["step"] % 50 == 0:
            log(f"step {state['step']}  len {length}  loss {loss.item():.3f}  "
                f"{state['seconds'] / 60:.2f} of {total_minutes} min")
    state["gen"] = gen.get_state()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state},
               checkpoint)
    return {"step": state["step"], "minutes": state["seconds"] / 60,
            "loss": sum(state["losses"]) / max(1, len(state["losses"])),
            "done": state["seconds"] >= budget}


def load_trained(checkpoint: Path) -> GPT:
    if not checkpoint.exists():
        raise ValueError(f"no checkpoint at {checkpoint}: run `clusterfx bench causal --part "
                         f"train` first")
    model = new_model()
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    return model.eval()


def windows(data: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``length`` + 1 bytes. → (count, L+1)."""
    usable = min(count, (data.numel() - 1) // length)
    if usable < 1:
        raise ValueError(f"the held-out text ({data.numel()} bytes) is shorter than one "
                         f"window of {length}")
    return torch.stack([data[i * length:i * length + length + 1] for i in range(usable)])


def perplexity(model, data: torch.Tensor, length: int, count: int, policy=None,
               batch: int = 4) -> dict:
    """Mean next-byte NLL over every position of the windows, as perplexity and bits per
    byte, with the model's attention rewritten by ``policy`` (None: exact). Also over the
    second half of each window (the positions with the most far context)."""
    torch._dynamo.reset()
    run = model if policy is None else cfx_compile(model, policy=policy, backend="eager")
    total = late = 0.0
    n = n_late = 0
    xs = windows(data, length, count)
    with torch.no_grad():
        for i in range(0, xs.shape[0], batch):
            x = xs[i:i + batch]
            nll = F.cross_entropy(run(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1),
                                  reduction="none").view(x.shape[0], -1)
            total, n = total + float(nll.sum()), n + nll.numel()
            late, n_late = late + float(nll[:, length // 2:].sum()), n_late + nll[
                :, length // 2:].numel()
    mean, mean_late = total / n, late / n_late
    return {"ppl": math.exp(mean), "bits_per_byte": mean / math.log(2),
            "ppl_second_half": math.exp(mean_late), "tokens": n}
