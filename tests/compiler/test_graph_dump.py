"""Graph dumps: per-pass code files and one picture (.dot + .svg) per attention site."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch
import torch.fx as fx

import clusterfx as cfx
from clusterfx.compiler.graph_dump import (
    layer_of,
    neighbourhood,
    render_graph_svg,
    sanitise,
    write_site_pictures,
)
from clusterfx.models import example_inputs, gpt_tiny
from clusterfx.passes.site import SITE_META, Site

SVG = "{http://www.w3.org/2000/svg}"


def _texts(element: ET.Element) -> list[str]:
    return [t.text or "" for t in element.iter(f"{SVG}text")]


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    torch._dynamo.reset()
    folder = tmp_path_factory.mktemp("dump")
    torch.manual_seed(0)
    model = gpt_tiny(depth=2).eval()
    compiled = cfx.compile(model, backend="eager", dump_dir=folder)
    compiled(*example_inputs("gpt", model=model))
    return folder, cfx.explain(compiled)


def test_every_pass_dumps_readable_code(dumped):
    folder, _ = dumped
    code = {}
    for step, name in enumerate(["captured", "inline_mha", "canonicalize", "lower"]):
        path = folder / f"graph0_{step}_{name}.py"
        assert path.is_file(), sorted(p.name for p in folder.iterdir())
        code[name] = path.read_text()
        compile(code[name], str(path), "exec")  # the dump is valid Python
        assert "def forward" in code[name]
    assert "clusterfx.attention" not in code["captured"]
    assert "clusterfx.attention" in code["canonicalize"]
    assert "scaled_dot_product_attention" in code["lower"]
    assert "clusterfx.attention" not in code["lower"]


def test_one_valid_svg_and_dot_per_site(dumped):
    folder, report = dumped
    fqns = [row.fqn for row in report.rows]
    assert fqns == ["blocks.0.attn", "blocks.1.attn"]
    svgs = sorted(folder.glob("graph0_site*.svg"))
    assert [p.name for p in svgs] == [f"graph0_site{k}_{fqn}.svg" for k, fqn in enumerate(fqns)]
    for path, fqn in zip(svgs, fqns):
        root = ET.parse(path).getroot()  # well-formed XML
        assert root.tag == f"{SVG}svg"
        assert fqn in root.find(f"{SVG}title").text
        assert "rewrite: dense" in root.find(f"{SVG}title").text
        marked = [g for g in root.iter(f"{SVG}g") if "highlight" in g.get("class", "")]
        assert len(marked) == 1
        texts = " ".join(_texts(marked[0]))
        assert "scaled_dot_product_attention" in texts
        assert "float32[2, 4, 16, 16]" in texts  # the shape of the attention output
        nodes = [g for g in root.iter(f"{SVG}g") if "node" in g.get("class", "")]
        assert 4 <= len(nodes) <= 40
        assert len(list(root.iter(f"{SVG}line"))) >= len(nodes) - 1  # connected picture
        dot = path.with_suffix(".dot").read_text()
        assert dot.startswith("digraph") and "fillcolor" in dot and "->" in dot


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyparsing names inside pydot
def test_dot_parses_with_pydot(dumped):
    pydot = pytest.importorskip("pydot")
    folder, _ = dumped
    for path in folder.glob("*.dot"):
        (graph,) = pydot.graph_from_dot_data(path.read_text())
        assert len(graph.get_edges()) > 0


def test_svg_escapes_xml_and_layers_by_longest_path():
    nodes = {"a": 'a<&>"x"', "b": "b\nshape", "c": "c", "d": "d\x01"}
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d")]
    svg = render_graph_svg(nodes, edges, title="t <&> 'q'", highlight="c")
    root = ET.fromstring(svg)
    texts = _texts(root)
    assert 'a<&>"x"' in texts and "t <&> 'q'" in texts and "d?" in texts
    ys = {}
    for g in root.iter(f"{SVG}g"):
        ys[g.get("id")] = float(g.find(f"{SVG}rect").get("y"))
    # c sits below b although a -> c is a direct edge: layers are longest paths
    assert ys["node-a"] < ys["node-b"] < ys["node-c"] < ys["node-d"]
    assert layer_of(list(nodes), edges) == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert [g.get("id") for g in root.iter(f"{SVG}g") if "highlight" in g.get("class")] == [
        "node-c"]


def test_layout_rejects_cycles_and_unknown_nodes():
    with pytest.raises(ValueError, match="cycle"):
        layer_of(["a", "b"], [("a", "b"), ("b", "a")])
    with pytest.raises(ValueError, match="'z'"):
        render_graph_svg({"a": "a"}, [("a", "z")], "t")


def _chain(x):
    for _ in range(12):
        x = x.sin()
    return x


def test_neighbourhood_depths_and_cap(tmp_path):
    gm = fx.symbolic_trace(_chain)
    chain = [n for n in gm.graph.nodes if n.op == "call_method"]
    site_node = chain[6]
    kept = neighbourhood(site_node)
    assert kept == chain[2:9]  # 4 ancestors, the node, 2 users
    assert len(neighbourhood(site_node, up=10, down=10, cap=5)) == 5
    assert site_node in neighbourhood(site_node, cap=1)

    site_node.meta[SITE_META] = Site("layers.3/attn <x>", "matmul", rewrite="topk",
                                     status="rewritten")
    paths = write_site_pictures(gm, tmp_path, graph_index=7)
    assert [p.name for p in paths] == ["graph7_site0_layers.3_attn_x.dot",
                                       "graph7_site0_layers.3_attn_x.svg"]
    root = ET.parse(paths[1]).getroot()
    title = root.find(f"{SVG}title").text
    assert "layers.3/attn <x>" in title and "topk" in title and "rewritten" in title
    names = {t for g in root.iter(f"{SVG}g") for t in _texts(g)[:1]}
    assert names == {n.name for n in chain[2:9]}


def test_sanitise():
    assert sanitise("encoder.layer.0.attention") == "encoder.layer.0.attention"
    assert sanitise("a/b c*d") == "a_b_c_d"
    assert sanitise("///") == "site"
    assert len(sanitise("x" * 500)) == 80
