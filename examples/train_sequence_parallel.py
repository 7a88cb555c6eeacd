"""Train the GPT-like reference model with one sequence spread over 4 processes (USP: Ulysses 2
× ring 2), and check every step against the same model trained on one process.

One machine, 4 CPU processes (gloo):

    torchrun --nproc-per-node 4 examples/train_sequence_parallel.py

Several machines (run on each; NODE_RANK differs, the endpoint is the first machine's):

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1 \\
        examples/train_sequence_parallel.py --ulysses 8 --ring 2 --seq-len 4096

Every rank builds the same model and draws the same batches (the same seed), and calls the
compiled model with the whole sequence; clusterfx shards it. Rank 0 prints, per step, the
loss of the sequence-parallel model and of the one-process model, and the largest gradient
difference relative to the largest gradient.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import clusterfx as cfx
from clusterfx.models import gpt_tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ulysses", type=int, default=2)
    p.add_argument("--ring", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backend", default="eager", help="eager, aot_eager or inductor")
    p.add_argument("--load-balance", default="zigzag", choices=["zigzag", "none"])
    args = p.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))

    torch.manual_seed(0)  # the same weights and batches on every rank
    model = gpt_tiny(vocab_size=512, dim=64, depth=2, heads=4, kv_heads=2, dropout=0.0,
                     max_len=max(512, args.seq_len))
    single = copy.deepcopy(model)  # the one-process reference, trained alongside
    spec = cfx.SequenceParallel(ulysses=args.ulysses, ring=args.ring,
                                load_balance=args.load_balance,
                                data_parallel=dist.get_world_size() // (args.ulysses * args.ring))
    compiled = cfx.compile(model, mesh=spec, backend=args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_single = torch.optim.AdamW(single.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)

    for step in range(args.steps):
        ids = torch.randint(0, 512, (2, args.seq_len + 1), generator=data)
        x, y = ids[:, :-1], ids[:, 1:]
        # every rank passes the whole sequence and gets the whole logits back
        loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        loss.backward()
        loss_single = F.cross_entropy(single(x).flatten(0, 1), y.flatten())
        loss_single.backward()
        pairs = list(zip(model.parameters(), single.parameters()))
        scale = max(float(b.grad.abs().max()) for _, b in pairs)
        grad_diff = max(float((a.grad - b.grad).abs().max()) for a, b in pairs) / scale
        if rank == 0:
            print(f"step {step}: loss {loss.item():.6f}  one process {loss_single.item():.6f}"
                  f"  |diff| {abs(loss.item() - loss_single.item()):.2e}"
                  f"  max grad diff / max grad {grad_diff:.2e}", flush=True)
        for o in (opt, opt_single):
            o.step()
            o.zero_grad()
    if rank == 0:
        print(cfx.explain(compiled))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
