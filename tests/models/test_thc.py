"""THC, its PyG frontend, its losses and baselines: each property against an independent oracle
(float64 where tolerances matter), and a case where the property must not hold."""

from __future__ import annotations

import ast
import copy
import math
import pathlib
import sys

import networkx as nx
import pytest
import torch
from torch_geometric.data import Batch, Data

import clusterfx as cfx
from clusterfx.models.thc import (
    GCN,
    THC,
    FlatTransformer,
    cluster_loss,
    collapse,
    dense_connectivity,
    from_connectivity,
    from_networkx_graph,
    modularity,
    official_topk,
    orthonormal_columns,
    row_entropy,
)
from tests.helpers import compile_and_compare

N, B = 16, 3
SITES = ["levels.0.layer.attention", "levels.1.layer.attention"]


def _connectivity(batch: int = B, n: int = N, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, n, generator=gen, dtype=dtype)
    x = (x + x.transpose(1, 2)) / 2
    return x - torch.diag_embed(torch.diagonal(x, dim1=1, dim2=2))  # zero diagonal


def _model(dtype=torch.float32, **kwargs) -> THC:
    torch.manual_seed(0)
    return THC(N, clusters=kwargs.pop("clusters", (6, 3)), **kwargs).to(dtype).eval()


def _batch(x: torch.Tensor) -> Batch:
    return Batch.from_data_list([from_connectivity(m, y=i % 2, density=0.3)
                                 for i, m in enumerate(x)])


def _assignment_oracle(model: THC, x: torch.Tensor) -> torch.Tensor:
    """Level 1 the official way: the attention matrix Ā = mean_h q kᵀ/√D, then softmax(Ā W),
    then the official top-k mask (no renormalisation)."""
    attn = model.levels[0].layer.attention
    h = x @ model.embed.weight.T + model.embed.bias  # (B, N, C)
    H, D = attn.heads, attn.head_dim
    q = (h @ attn.query.weight.T + attn.query.bias).unflatten(-1, (H, D)).transpose(1, 2)
    k = (h @ attn.key.weight.T + attn.key.bias).unflatten(-1, (H, D)).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).mean(dim=1)  # (B, N, N), pre-softmax
    soft = torch.softmax(scores @ model.levels[0].assign.centres, dim=-1)
    keep = official_topk(soft.shape[-1])
    cut = soft.sort(dim=-1, descending=True).values[..., keep - 1 : keep]
    return torch.where(soft >= cut, soft, torch.zeros_like(soft))


# ------------------------------------------------------------------------------ the model
def test_shapes_and_attention_module_paths():
    model = _model()
    out = model(_connectivity())
    assert out.logits.shape == (B, 2)
    assert [s.shape for s in out.assignments] == [(B, N, 6), (B, 6, 3)]
    assert [p.shape for p in out.pooled] == [(B, 6, 64), (B, 3, 64)]
    torch.testing.assert_close(out.logits, out.level_logits[0] + out.level_logits[1])
    modules = dict(model.named_modules())
    assert all(site in modules for site in SITES)


@pytest.mark.parametrize(("rows", "cols"), [(100, 12), (12, 4), (200, 90), (360, 90)])
def test_orthonormal_initialisation_normalises_every_column(rows, cols):
    w = orthonormal_columns(rows, cols, torch.Generator().manual_seed(1)).float()
    gram = w.T.double() @ w.double()
    assert float((gram - torch.eye(cols, dtype=torch.float64)).abs().max()) < 1e-5
    assert abs(float(w[:, 0].norm()) - 1.0) < 1e-6  # the official code leaves column 0 at 1.46
    model = THC(rows, clusters=(cols, min(4, cols)))
    centres = model.levels[0].assign.centres.detach().double()
    assert float((centres.T @ centres - torch.eye(cols, dtype=torch.float64)).abs().max()) < 1e-5


def test_orthonormal_columns_rejects_more_columns_than_rows():
    with pytest.raises(ValueError, match="5 orthonormal columns of length 4"):
        orthonormal_columns(4, 5)


def test_assignment_equals_official_attention_score_assignment_float64():
    model = _model(torch.float64)
    x = _connectivity(dtype=torch.float64)
    got = model(x).assignments[0]
    want = _assignment_oracle(model, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_pooling_is_layernorm_of_assignment_transpose_times_tokens():
    model = _model(torch.float64)
    x = _connectivity(dtype=torch.float64)
    out = model(x)
    h, _, _ = model.levels[0].layer(model.embed(x))
    norm = model.levels[0].norm
    want = torch.nn.functional.layer_norm(out.assignments[0].transpose(1, 2) @ h, (64,),
                                          norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out.pooled[0], want, rtol=1e-12, atol=1e-12)


def test_rows_sum_to_one_without_the_mask():
    out = _model(topk=(0, 0))(_connectivity())
    for s in out.assignments:
        assert (s > 0).all()
        torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[:-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("clusters", "kept"), [((6, 3), (3, 1)), ((12, 4), (6, 2))])
def test_top_k_mask_keeps_exactly_k_entries(clusters, kept):
    out = _model(clusters=clusters)(_connectivity())
    for s, k in zip(out.assignments, kept):
        assert ((s > 0).sum(-1) == k).all()
        assert (s.sum(-1) <= 1 + 1e-6).all() and (s.sum(-1) < 1 - 1e-3).any()


def test_official_topk_rule():
    assert [official_topk(k) for k in (4, 12, 50, 51, 90)] == [2, 6, 25, 5, 9]


@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_batch_order_equivariance(mode):
    model = _model(torch.float64, assignment=mode)
    x = _connectivity(batch=5, dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    a, b = model(x), model(x[perm])
    torch.testing.assert_close(b.logits, a.logits[perm], rtol=1e-12, atol=1e-12)
    for sa, sb in zip(a.assignments, b.assignments):
        torch.testing.assert_close(sb, sa[perm], rtol=1e-12, atol=1e-12)


def test_sample_independence_per_sample_and_coupling_in_batch_mode():
    x = _connectivity(batch=4, dtype=torch.float64)
    sample = _model(torch.float64, assignment="sample")
    torch.testing.assert_close(sample(x[:1]).logits, sample(x).logits[:1], rtol=1e-12,
                               atol=1e-12)
    shared = _model(torch.float64, assignment="batch")
    gap = (shared(x[:1]).logits - shared(x).logits[:1]).abs().max()
    assert gap > 1e-3  # the official behaviour: a subject's output depends on its batch
    s = shared(x).assignments[0]
    torch.testing.assert_close(s, s[:1].expand_as(s))  # one assignment for the whole batch


def test_roi_relabelling_is_a_reparametrisation():
    """THC indexes ROIs in the embedding's input columns and the first centres' rows, so
    relabelling ROIs (P x Pᵀ) is not an invariance; permuting those parameter axes with it
    gives identical logits and row-permuted first-level assignments."""
    model = _model(torch.float64)
    x = _connectivity(dtype=torch.float64)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    x_perm = x[:, perm][:, :, perm]
    relabelled = copy.deepcopy(model)
    with torch.no_grad():
        relabelled.embed.weight.copy_(model.embed.weight[:, perm])
        relabelled.levels[0].assign.centres.copy_(model.levels[0].assign.centres[perm])
    a, b = model(x), relabelled(x_perm)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.assignments[0], a.assignments[0][:, perm], rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(b.assignments[1], a.assignments[1], rtol=1e-10, atol=1e-12)
    assert (model(x_perm).logits - a.logits).abs().max() > 1e-4  # parameters must follow


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="must not grow"):
        THC(N, clusters=(4, 6))
    with pytest.raises(ValueError, match="assignment mode 'shared'"):
        THC(N, assignment="shared")
    with pytest.raises(ValueError, match="one entry per level"):
        THC(N, clusters=(6, 3), topk=(2,))


# ------------------------------------------------------------------------------ the frontend
def test_pyg_batch_and_dense_entry_give_identical_outputs():
    model = _model()
    x = _connectivity()
    dense, graph = model(x), model(_batch(x))
    assert torch.equal(dense.logits, graph.logits)
    assert all(torch.equal(a, b) for a, b in zip(dense.assignments, graph.assignments))
    assert torch.equal(model(_batch(x)[1]).logits, model(x[1:2]).logits)  # one Data


def test_compiled_fullgraph_matches_eager_with_gradients_and_lists_sites():
    model = _model()
    report = compile_and_compare(model, (_batch(_connectivity()),), backend="eager",
                                 rtol=1e-5, fullgraph=True)
    assert [r.fqn for r in report.rows] == SITES
    assert all(r.spelling == "matmul" and r.status == "kept dense" for r in report.rows)


def test_a_policy_rewrites_thc_attention_and_the_assignment_does_not_read_it():
    model = _model()
    x = _connectivity()
    eager = model(x)
    exact = cfx.compile(model, policy={"levels.*": cfx.TopK(k=N)}, backend="eager",
                        fullgraph=True)
    torch.testing.assert_close(exact(x).logits, eager.logits, rtol=1e-5, atol=1e-6)
    assert [r.status for r in cfx.explain(exact).rows] == ["rewritten", "rewritten"]
    torch._dynamo.reset()
    approx = cfx.compile(model, policy={"levels.0.layer": cfx.TopK(k=4)}, backend="eager",
                         fullgraph=True)
    out = approx(x)
    rows = {r.fqn: (r.rewrite, r.status) for r in cfx.explain(approx).rows}
    assert rows == {SITES[0]: ("topk", "rewritten"), SITES[1]: ("dense", "kept dense")}
    assert (out.logits - eager.logits).abs().max() > 1e-4  # the rewrite changed attention
    torch.testing.assert_close(out.assignments[0], eager.assignments[0], rtol=1e-5, atol=1e-7)


def test_dense_connectivity_checks_sizes():
    x = _connectivity()
    with pytest.raises(ValueError, match=r"shape \(B, 16, 16\), got \(3, 16, 15\)"):
        dense_connectivity(x[..., :-1], N)
    with pytest.raises(ValueError, match="profiles of 16 values per ROI"):
        dense_connectivity(from_connectivity(_connectivity(1, 12)[0]), N)
    short = Data(x=torch.zeros(12, N), edge_index=torch.zeros(2, 0, dtype=torch.long),
                 edge_attr=torch.zeros(0), num_nodes=12)  # 12 ROIs with 16-wide rows
    graphs = [from_connectivity(m) for m in x[:2]] + [short, from_connectivity(x[2])]
    with pytest.raises(ValueError, match="graph 2 of the batch has 12 ROIs, the model expects"):
        dense_connectivity(Batch.from_data_list(graphs), N)


def test_from_connectivity_edges_follow_threshold_and_density():
    m = _connectivity(1, 8, seed=4)[0]
    data = from_connectivity(m, y=1, threshold=0.5, subject="sub-1")
    assert torch.equal(data.x, m) and data.y.tolist() == [1] and data.subject == "sub-1"
    want = {(i, j) for i in range(8) for j in range(8) if i != j and abs(float(m[i, j])) > 0.5}
    assert set(map(tuple, data.edge_index.T.tolist())) == want
    assert torch.equal(data.edge_attr, m[data.edge_index[0], data.edge_index[1]])
    dens = from_connectivity(m, density=0.25)
    assert dens.edge_index.shape[1] == round(0.25 * 8 * 7)  # random weights: no ties
    kept = m.abs()[dens.edge_index[0], dens.edge_index[1]]
    off = m.abs()[~torch.eye(8, dtype=torch.bool)]
    assert float(kept.min()) >= float(off.sort(descending=True).values[13])
    with pytest.raises(ValueError, match=r"subject 'bad': connectivity must be a square"):
        from_connectivity(torch.zeros(3, 4), subject="bad")
    with pytest.raises(ValueError, match="density"):
        from_connectivity(m, density=1.5)


@pytest.mark.parametrize("directed", [False, True])
def test_from_networkx_graph_matches_networkx_adjacency(directed):
    g = nx.DiGraph() if directed else nx.Graph()
    g.add_nodes_from(["a", "b", "c", "d"])
    g.add_weighted_edges_from([("a", "b", 0.5), ("b", "c", -0.25), ("c", "a", 2.0),
                               ("d", "d", 3.0)])
    g.add_edge("a", "d")  # no weight: counts 1
    data = from_networkx_graph(g, y=0)
    want = torch.tensor(nx.to_numpy_array(g, nodelist=list(g.nodes)), dtype=torch.float32)
    assert torch.equal(data.x, want)
    assert data.edge_index.shape[1] == (4 if directed else 8)  # the self-loop is not an edge
    assert data.num_nodes == 4 and data.y.tolist() == [0]


# ------------------------------------------------------------------------------ the losses
def test_modularity_of_a_hard_partition_equals_networkx():
    adj = _connectivity(1, 12, seed=5, dtype=torch.float64).clamp(min=0)[0]
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    s = torch.nn.functional.one_hot(ids, 3).double()
    graph = nx.from_numpy_array(adj.numpy())
    want = nx.community.modularity(graph, [set(torch.nonzero(ids == c).flatten().tolist())
                                           for c in range(3)])
    assert abs(float(modularity(s[None], adj[None])[0]) - want) < 1e-12


def test_collapse_and_entropy_extremes():
    balanced = torch.eye(4).repeat(3, 1)[None]  # 12 tokens, 3 per cluster
    together = torch.zeros(1, 12, 4)
    together[..., 0] = 1
    assert abs(float(collapse(balanced))) < 1e-6
    assert abs(float(collapse(together)) - (2.0 - 1.0)) < 1e-6  # √K − 1
    assert float(row_entropy(balanced)) == 0.0
    assert abs(float(row_entropy(torch.full((1, 5, 4), 0.25))) - math.log(4)) < 1e-6


def test_cluster_loss_second_level_is_modularity_of_the_composite():
    gen = torch.Generator().manual_seed(6)
    x = _connectivity(2, 10, seed=6, dtype=torch.float64)
    s1 = torch.softmax(torch.randn(2, 10, 5, generator=gen, dtype=torch.float64), -1)
    s2 = torch.softmax(torch.randn(2, 5, 2, generator=gen, dtype=torch.float64), -1)
    adj = x.clamp(min=0) * (1 - torch.eye(10, dtype=torch.float64))
    want = sum((collapse(s) - modularity(s, a) + 0.3 * row_entropy(s)).mean()
               for s, a in ((s1, adj), (s2, s1.transpose(1, 2) @ adj @ s1)))
    torch.testing.assert_close(cluster_loss(x, [s1, s2]), want, rtol=1e-12, atol=1e-12)
    composite = modularity(s1 @ s2, adj)  # pooled-graph modularity = composite modularity
    torch.testing.assert_close(modularity(s2, s1.transpose(1, 2) @ adj @ s1), composite)
    masked = s1 * (s1 >= s1.median(-1, keepdim=True).values)  # rows renormalised inside
    assert float(cluster_loss(x, [masked])) == float(cluster_loss(
        x, [masked / masked.sum(-1, keepdim=True)]))


# ------------------------------------------------------------------------------ baselines
def test_baselines_run_on_pyg_batches_per_graph():
    x = _connectivity()
    torch.manual_seed(0)
    flat, gcn = FlatTransformer(N).eval(), GCN(N).eval()
    batch = _batch(x)
    assert torch.equal(flat(batch), flat(x)) and flat(x).shape == (B, 2)
    whole = gcn(batch)
    single = torch.cat([gcn(Batch.from_data_list([g])) for g in batch.to_data_list()])
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="needs the edges"):
        gcn(x)
    report = cfx.explain(cfx.compile(flat, backend="eager", fullgraph=True), x)
    assert [r.fqn for r in report.rows] == ["layers.0.attention", "layers.1.attention"]


def test_thc_models_import_only_torch_torch_geometric_and_the_standard_library():
    folder = pathlib.Path(__file__).resolve().parents[2] / "models" / "thc"
    offending = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [(0, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.level, node.module or "")]
            else:
                continue
            for level, name in names:
                top = name.split(".")[0]
                local = level == 1  # a sibling inside models/thc
                allowed = top in ("torch", "torch_geometric") or top in sys.stdlib_module_names
                if not (local or (level == 0 and allowed)):
                    offending.append(f"{path.name}: {'.' * level}{name}")
    assert len(list(folder.glob("*.py"))) >= 6
    assert offending == []
