import torch, torch.distributed as dist
import clusterfx as cfx
from clusterfx.models import gpt_tiny, bert_tiny, example_inputs

def run(rank, world, u, r, model="gpt", backend="eager", lb="zigzag", S=16):
    torch.manual_seed(0)
    m = (gpt_tiny(dropout=0.0, depth=2, kv_heads=2) if model=="gpt" else bert_tiny(dropout=0.0, depth=2)).double()
    ins = example_inputs(model, seq_len=S, model=m)
    cm = cfx.compile(m, backend=backend, mesh=cfx.SequenceParallel(ulysses=u, ring=r, load_balance=lb))
    out = cm(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out*g).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    ref = cfx.compile(m, backend=backend)(*ins); (ref*g).sum().backward()
    err = float((out-ref).abs().max()/ref.abs().max())
    big = max(float(p.grad.abs().max()) for n,p in m.named_parameters() if n in grads)
    gerr = max(float((grads[n]-p.grad).abs().max())/big for n,p in m.named_parameters() if n in grads)
    rep = cfx.explain(cm)
    print(rep, flush=True)
    recs = cm._clusterfx_state.latest_records(); res = recs[0].results[-1]
    rep = [str(res.counters), res.declines, [str(o) for o in res.outside], [str(s.sequence_parallel) for s in recs[0].sites]]
    if rank == 0: print(rep, flush=True)
    return {'err': err, 'gerr': gerr, 'rep': str(cfx.explain(cm)) if rank == 0 else ''}
    return {"err": err, "gerr": gerr}
