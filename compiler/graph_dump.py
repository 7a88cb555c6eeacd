"""Pictures of the graph around each attention site: Graphviz `.dot` text and a self-contained
`.svg` drawn by the small layered layout below (no graphviz binary is needed).

For each node carrying `node.meta["clusterfx_site"]` the picture holds the node, its ancestors up
to depth 4 and its users up to depth 2 (nearest first, at most 40 nodes). Layout: a node's layer
is its longest-path depth from the picture's sources; within a layer, nodes are ordered by the
mean position of their inputs (one barycentre sweep) so that arrows cross little.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import torch
import torch.fx as fx

from clusterfx.passes.site import SITE_META

ANCESTOR_DEPTH = 4
USER_DEPTH = 2
MAX_NODES = 40

_CHAR_W, _LINE_H, _PAD = 7.2, 15, 8  # 12px monospace: glyph width and line height, box padding
_GAP_X, _GAP_Y, _MARGIN, _TITLE_H = 24, 48, 20, 34
_MAX_LABEL = 56
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # not allowed in XML 1.0


def write_site_pictures(gm: fx.GraphModule, folder: Path, graph_index: int) -> list[Path]:
    """Write `graph{index}_site{k}_{fqn}.dot` and `.svg` for every site node in `gm`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sites = [n for n in gm.graph.nodes if n.meta.get(SITE_META) is not None]
    for k, node in enumerate(sites):
        site = node.meta[SITE_META]
        fqn = str(getattr(site, "fqn", "") or node.name)
        title = (f"graph {graph_index} | {fqn} | rewrite: {getattr(site, 'rewrite', '?')}"
                 f" | status: {getattr(site, 'status', '?')}")
        chosen = neighbourhood(node)
        labels = {n.name: f"{_shorten(n.name, 40)}\n{node_label(n)}" for n in chosen}
        edges = [(a.name, n.name) for n in chosen for a in n.all_input_nodes if a in chosen]
        stem = folder / f"graph{graph_index}_site{k}_{sanitise(fqn)}"
        dot, svg = Path(f"{stem}.dot"), Path(f"{stem}.svg")
        dot.write_text(render_graph_dot(labels, edges, title, node.name))
        svg.write_text(render_graph_svg(labels, edges, title, node.name))
        written += [dot, svg]
    return written


def neighbourhood(node: fx.Node, up: int = ANCESTOR_DEPTH, down: int = USER_DEPTH,
                  cap: int = MAX_NODES) -> list[fx.Node]:
    """`node`, its ancestors to depth `up` and users to depth `down`, nearest first, in graph
    order, at most `cap` nodes."""
    distance = {node: 0}
    frontier_up, frontier_down = [node], [node]
    for depth in range(1, max(up, down) + 1):
        if depth <= up:
            frontier_up = _expand(frontier_up, lambda n: n.all_input_nodes, distance, depth)
        if depth <= down:
            frontier_down = _expand(frontier_down, lambda n: list(n.users), distance, depth)
    kept = sorted(distance, key=lambda n: distance[n])[:cap]  # stable: BFS order within depth
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(kept, key=order.__getitem__)


def _expand(frontier: list[fx.Node], step, distance: dict, depth: int) -> list[fx.Node]:
    nxt = []
    for n in frontier:
        for m in step(n):
            if m not in distance:
                distance[m] = depth
                nxt.append(m)
    return nxt


def node_label(node: fx.Node) -> str:
    """`op target` and, when the node's example value is a tensor, `dtype[shape]`."""
    label = _shorten(f"{node.op} {_target_name(node)}", _MAX_LABEL)
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).removeprefix("torch.")
        label += f"\n{dtype}[{', '.join(str(d) for d in val.shape)}]"
    return label


def _target_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "output":
        return ""
    if node.op == "placeholder" and isinstance(target, str):
        # dynamo lifts parameters as `L_self_modules_enc_modules_0_parameters_weight_`
        readable = re.sub(r"^L_(self_)?", "", target)
        readable = re.sub(r"(^|_)(modules|parameters|buffers)_",
                          lambda m: "." if m.group(1) else "", readable)
        return readable.rstrip("_") or target
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return repr(target)
    return name if module in ("", "_operator", "builtins") else f"{module}.{name}"


def _shorten(text: str, limit: int) -> str:
    """`text`, or its head and tail around '...' when longer than `limit`."""
    if len(text) <= limit:
        return text
    head = (limit - 3) // 2
    return text[:head] + "..." + text[len(text) - (limit - 3 - head):]


def sanitise(text: str, limit: int = 80) -> str:
    """A file-name-safe form of a module path: `h.0.attn` stays, anything odd becomes `_`."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")[:limit]
    return clean or "site"


def _clean(text: str) -> str:
    return _CONTROL.sub("?", text)


def render_graph_dot(nodes: Mapping[str, str], edges: Iterable[tuple[str, str]], title: str,
                     highlight: str | Iterable[str] = ()) -> str:
    """Graphviz text for `nodes` ({id: label with '\\n' between lines}) and `edges`."""
    marked = {highlight} if isinstance(highlight, str) else set(highlight)

    def q(text: str) -> str:
        return '"' + _clean(text).replace("\\", "\\\\").replace('"', '\\"').replace(
            "\n", "\\n") + '"'

    lines = [f"digraph {q(title)} {{", f"  label={q(title)}; labelloc=t;",
             '  node [shape=box, fontname="monospace", fontsize=10];']
    for name, label in nodes.items():
        style = ', style=filled, fillcolor="#ffd54f", penwidth=2' if name in marked else ""
        lines.append(f"  {q(name)} [label={q(label)}{style}];")
    lines += [f"  {q(a)} -> {q(b)};" for a, b in edges]
    return "\n".join(lines + ["}"]) + "\n"


def layer_of(nodes: Sequence[str], edges: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Longest-path depth of each node from the sources (Kahn's order); a cycle is an error."""
    preds: dict[str, list[str]] = {n: [] for n in nodes}
    succs: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        if a not in preds or b not in preds:
            raise ValueError(f"edge ({a!r}, {b!r}) names a node that is not in nodes")
        preds[b].append(a)
        succs[a].append(b)
    waiting = {n: len(p) for n, p in preds.items()}
    ready = [n for n in nodes if waiting[n] == 0]
    layer = {n: 0 for n in ready}
    while ready:
        n = ready.pop(0)
        for m in succs[n]:
            layer[m] = max(layer.get(m, 0), layer[n] + 1)
            waiting[m] -= 1
            if waiting[m] == 0:
                ready.append(m)
    stuck = sorted(n for n, count in waiting.items() if count)
    if stuck:
        raise ValueError(f"the graph has a cycle through {stuck}")
    return layer


def render_graph_svg(nodes: Mapping[str, str], edges: Iterable[tuple[str, str]], title: str,
                     highlight: str | Iterable[str] = ()) -> str:
    """A self-contained SVG of a directed acyclic graph, drawn top (inputs) to bottom (users).

    `nodes`: {id: label}, lines separated by '\\n' (the first line is drawn bold); `edges`:
    (source id, target id) pairs; `highlight`: id(s) drawn filled and thick."""
    edges = list(edges)
    marked = {highlight} if isinstance(highlight, str) else set(highlight)
    layer = layer_of(list(nodes), edges)
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for n in nodes:
        rows[layer[n]].append(n)
    position: dict[str, float] = {}
    for row in rows:  # barycentre sweep: order each row by the mean slot of its inputs
        key = {}
        for i, n in enumerate(row):
            slots = [position[a] for a, b in edges if b == n and a in position]
            key[n] = sum(slots) / len(slots) if slots else float(i)
        row.sort(key=key.__getitem__)
        position.update({n: float(i) for i, n in enumerate(row)})

    lines = {n: _clean(label).split("\n") for n, label in nodes.items()}
    size = {n: (max(len(s) for s in ls) * _CHAR_W + 2 * _PAD, len(ls) * _LINE_H + 2 * _PAD)
            for n, ls in lines.items()}
    row_w = [sum(size[n][0] for n in row) + _GAP_X * max(len(row) - 1, 0) for row in rows]
    row_h = [max((size[n][1] for n in row), default=0) for row in rows]
    width = max([*row_w, len(title) * _CHAR_W * 1.1]) + 2 * _MARGIN
    height = _TITLE_H + sum(row_h) + _GAP_Y * max(len(rows) - 1, 0) + 2 * _MARGIN
    box: dict[str, tuple[float, float, float, float]] = {}
    y = _MARGIN + _TITLE_H
    for row, rw, rh in zip(rows, row_w, row_h):
        x = (width - rw) / 2
        for n in row:
            w, h = size[n]
            box[n] = (x, y + (rh - h) / 2, w, h)
            x += w + _GAP_X
        y += rh + _GAP_Y

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="12">',
           f"<title>{escape(_clean(title))}</title>",
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
           'fill="#555"/></marker></defs>',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{_MARGIN}" y="{_MARGIN + 14}" font-size="14" font-weight="bold">'
           f"{escape(_clean(title))}</text>"]
    for a, b in edges:
        ax, ay, aw, ah = box[a]
        bx, by, bw, _ = box[b]
        out.append(f'<line class="edge" x1="{ax + aw / 2:.1f}" y1="{ay + ah:.1f}" '
                   f'x2="{bx + bw / 2:.1f}" y2="{by:.1f}" stroke="#555" '
                   f'marker-end="url(#arrow)"/>')
    for n in nodes:
        x, y0, w, h = box[n]
        fill, stroke, pen = ("#ffd54f", "#c62828", 3) if n in marked else ("#eef3fb", "#4a6fa5", 1)
        cls = "node highlight" if n in marked else "node"
        out.append(f"<g class={quoteattr(cls)} id={quoteattr('node-' + _clean(n))}>"
                   f'<rect x="{x:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4" '
                   f'fill="{fill}" stroke="{stroke}" stroke-width="{pen}"/>')
        for i, text in enumerate(lines[n]):
            weight = ' font-weight="bold"' if i == 0 else ""
            out.append(f'<text x="{x + _PAD:.1f}" y="{y0 + _PAD + (i + 0.8) * _LINE_H:.1f}"'
                       f"{weight}>{escape(text)}</text>")
        out.append("</g>")
    return "\n".join([*out, "</svg>"]) + "\n"
