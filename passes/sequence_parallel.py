"""The sequence-parallel pass (after lowering; only with a mesh): one sequence over u·r ranks.

Every rank calls the compiled model with the same full inputs. The pass

1. shards the sequence inputs on entry (token ids, masks, positions, labels: the inputs with a
   dim of the attention's length S, or those named in `SequenceParallel(sequence_inputs=...)`)
   to this rank's L = S/(u·r) tokens (`SeqLayout`: zigzag when balancing);
2. runs everything between attentions (embeddings, norms, MLPs) on those tokens, following
   the sequence dim through the graph (`analysis.sequence_shards`): a size literal S becomes
   L, a whole operand that spans the sequence (a position table) takes the local tokens, an
   op that mixes tokens (a reduction over the sequence, an unknown op) runs on the gathered
   sequence instead (reported, with the reason);
3. rewrites each attention site::

       o = attention(q, k, v, mask)          # (B, H, S, D), causal or not
   becomes
       q, k, v = all_to_all(q), all_to_all(k), all_to_all(v)   # (B, H/u, S/r, D)   [u > 1]
       o = attention(q, k, v, gather(mask))  # whole sequence of H/u heads            [r = 1]
       o = ring_attention(q, k, v, gather(mask))[0]                                   [r > 1]
       o = all_to_all_back(o)                # (B, H, L, D)                           [u > 1]

   (GQA: K/V heads replicated up to u when fewer; a site whose op cannot compose with a ring
   runs on the gathered sequence, with the reason);
4. gathers the outputs back to the whole sequence in token order (unless `gather_output=False`);
5. makes gradients those of one process: a whole value (a parameter) used by sharded
   computation sums its gradient over the ranks in the backward (`grad_sync`).

Heads not divisible by u, or S not by u·r (2·u·r with zigzag over a ring), raise ValueError
here, before any communication. Where the whole graph cannot be sharded (an in-place update
of a sharded tensor), every site declines with the reason and the model runs unsharded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from clusterfx.config.parallel import ResolvedMesh
from clusterfx.ops import sequence_parallel as sp
from clusterfx.passes.analysis.graph_utils import GraphEditor, is_inplace, value_of
from clusterfx.passes.analysis.sequence_shards import (
    Context,
    Shard,
    Unsupported,
    gshape,
    gval,
    is_tensor,
    rule_for,
)
from clusterfx.passes.base import GraphPass, PassContext, PassResult
from clusterfx.passes.sequence_parallel_plan import (
    Builder,
    GraphDecline,
    Outside,
    SequenceParallelRecord,
    find_site_ops,
    rewrite_site,
    sequence_inputs,
    sequence_length,
)

NOT_RESOLVED = "no resolved mesh was given to the pass: the site runs unsharded"


@dataclass
class SequenceParallelResult(PassResult):
    """The pass's result, plus the collectives it inserted outside the attention sites."""

    outside: list[Outside] = field(default_factory=list)
    seq_len: int | None = None
    tag: str = ""  # run-time traffic of the collectives outside the sites is counted here


class SequenceParallelPass(GraphPass):
    """Shard the sequence over the mesh; Ulysses / ring / USP at every attention site."""

    name = "sequence_parallel"

    def __init__(self, mesh_key: str, mesh: ResolvedMesh | None = None):
        self.mesh_key = mesh_key
        self.mesh = mesh

    def config(self) -> dict[str, Any]:
        return {"mesh": self.mesh_key}

    def source_modules(self) -> list[str]:
        return [__name__, "clusterfx.passes.sequence_parallel_plan",
                "clusterfx.passes.sequence_parallel_sites",
                "clusterfx.passes.sequence_parallel_clustered",
                "clusterfx.passes.sequence_parallel_global",
                "clusterfx.passes.analysis.sequence_shards"]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> SequenceParallelResult:
        result = SequenceParallelResult(self.name)
        if self.mesh is None:
            for site in ctx.sites:
                result.declines.append((site.fqn, NOT_RESOLVED))
                result.counters["declined"] += 1
            return result
        if not ctx.sites:
            result.counters["no_sites"] += 1
            return result
        original = gm.graph
        copy = fx.Graph(owning_module=gm)
        env: dict[fx.Node, fx.Node] = {}
        out = copy.graph_copy(original, env)
        copy.output(out)
        for old, new in env.items():  # what dynamo keeps on nodes besides meta
            if hasattr(old, "_dynamo_source"):
                new._dynamo_source = old._dynamo_source
        gm.graph = copy
        try:
            _Rewriter(gm, ctx, self.mesh, result, env).run()
        except GraphDecline as exc:
            gm.graph = original
            for site in ctx.sites:
                site.sequence_parallel = SequenceParallelRecord("unsharded", str(exc))
                result.declines.append((site.fqn, str(exc)))
                result.counters["declined"] += 1
            result.outside = []
        gm.recompile()
        return result


def _tag(ctx: PassContext, name: str) -> str:
    full = f"{ctx.compile_id}#{name}"
    return f"{ctx.tag_prefix}/{full}" if ctx.tag_prefix else full


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext, mesh: ResolvedMesh,
                 result: SequenceParallelResult, env: dict[fx.Node, fx.Node]):
        self.gm, self.graph, self.ctx, self.mesh, self.result = gm, gm.graph, ctx, mesh, result
        self.concrete = {env[k]: v for k, v in ctx.concrete.items() if k in env}
        self.editor = GraphEditor(gm)
        self.site_ops = find_site_ops(self.graph)
        self.seq_len = sequence_length(self.site_ops)
        result.seq_len = self.seq_len
        if self.seq_len is None:
            raise GraphDecline("no self-attention site with a static sequence length: nothing "
                               "to shard")
        self.layout = sp.SeqLayout(self.seq_len, mesh.ulysses, mesh.ring, mesh.zigzag)
        self.cx = Context(self.seq_len, self.layout.local_len)
        self.builder = Builder(self.graph, self.layout, mesh, _tag(ctx, "sp"))
        result.tag = self.builder._tag("graph")
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.localized: dict[tuple[fx.Node, Shard], fx.Node] = {}
        self.whole_uses: dict[fx.Node, set[fx.Node]] = {}
        self.dead: set[fx.Node] = set()
        self.site_number = 0

    # ------------------------------------------------------------------------------ walk
    def run(self) -> None:
        inputs = sequence_inputs(self.graph, self.concrete, self.seq_len,
                                 self.mesh.sequence_inputs)
        for node in list(self.graph.nodes):
            if node in self.dead:
                continue
            if node.op == "placeholder" and node in inputs:
                self._shard_input(node, inputs[node])
            elif node.op == "output":
                self._outputs(node)
            elif node in self.site_ops:
                self._site(node)
            elif node.op in ("call_function", "call_method"):
                self._propagate(node)
        self._sync_gradients()
        while True:
            free = [n for n in self.dead if not n.users]
            if not free:
                break
            for node in free:
                self.graph.erase_node(node)
                self.dead.discard(node)
        self.graph.lint()
        _propagate_meta(self.gm, self.editor.fake_mode)
        self.result.counters["sharded_inputs"] = len(inputs)

    def _shard_input(self, node: fx.Node, dim: int) -> None:
        with self.graph.inserting_after(node):
            local = self.builder.take_local(node, Shard(dim), "graph")
        node.replace_all_uses_with(local, delete_user_cb=lambda u: u is not local)
        self.cx.shards[local] = Shard(dim)
        self.result.outside.append(Outside("shard input", node.name, "take_local",
                                           f"sequence dim {dim}"))

    def _propagate(self, node: fx.Node) -> None:
        if not any(self.cx.shard(a) is not None for a in node.all_input_nodes):
            return
        rule = rule_for(node)
        self.cx.pending.clear()
        try:
            if rule is None:
                raise Unsupported(f"{_name(node)} is not known to keep the sequence dim")
            out = rule(node, self.cx)
        except Unsupported as why:
            if is_inplace(node):
                raise GraphDecline(f"{_name(node)} updates a sharded tensor in place "
                                   f"({why}): sequence parallelism needs it out of place"
                                   ) from None
            self._run_gathered(node, str(why))
            return
        for kind, user, operand, shard in self.cx.pending:
            if kind == "localize":
                user.replace_input_with(operand, self._localize(operand, shard))
            elif gval(operand).requires_grad:
                self.whole_uses.setdefault(operand, set()).add(user)
        self.cx.shards[node] = out

    def _run_gathered(self, node: fx.Node, why: str, output: fx.Node | None = None) -> None:
        """Run `node` on its gathered inputs; when its output (or `output`, e.g. item 0 of a
        tuple) keeps a gathered input's shape, it takes the local tokens again right after
        (exact for any whole tensor, and the rest of the graph stays sharded)."""
        shards = []
        for a in _tensor_inputs(node):
            s = self.cx.shard(a)
            if isinstance(s, Shard):
                node.replace_input_with(a, self._gather(a, f"{_name(node)}: {why}"))
                shards.append((gshape(a), s))
            elif s is not None:
                raise GraphDecline(f"{_name(node)} takes a sharded tuple ({why})")
        self.cx.shards[node] = None
        output = node if output is None else output
        out = gval(output)
        if not isinstance(out, torch.Tensor):
            return
        for shape, s in shards:
            if tuple(out.shape) == shape:
                local = self._localize(output, s, replace=True)
                self.cx.shards[local] = s
                return

    def _gather(self, node: fx.Node, why: str) -> fx.Node:
        if node not in self.gathered:
            with self.graph.inserting_after(node):
                self.gathered[node] = self.builder.gather(node, self.cx.shard(node), "graph")
            self.result.outside.append(Outside("gather", node.name, "all_gather", why))
        return self.gathered[node]

    def _localize(self, node: fx.Node, shard: Shard, replace: bool = False) -> fx.Node:
        key = (node, shard)
        if key not in self.localized:
            with self.graph.inserting_after(node):
                self.localized[key] = local = self.builder.take_local(node, shard, "graph")
            if replace:  # every later use reads the local tokens
                node.replace_all_uses_with(local, delete_user_cb=lambda u: u is not local)
            grad = gval(node).requires_grad
            self.result.outside.append(Outside(
                "local tokens", node.name, "take_local" + (" (bwd all_gather)" if grad else ""),
                f"a whole {tuple(gshape(node))} operand spans the sequence"))
        return self.localized[key]

    def _outputs(self, node: fx.Node) -> None:
        def out(x):
            s = self.cx.shard(x) if isinstance(x, fx.Node) else None
            if not isinstance(s, Shard) or not self.mesh.gather_output:
                return x
            return self._gather(x, "output (gather_output=True)")
        with self.graph.inserting_before(node):
            node.args = fx.node.map_arg(node.args, out)

    def _site(self, node: fx.Node) -> None:
        site = self.site_ops[node]
        record, out, shard = rewrite_site(self, node, site, self.site_number)
        self.site_number += 1
        site.sequence_parallel = record
        self.result.counters[record.mode] += 1
        if record.mode == "gathered":
            self.result.declines.append((site.fqn, record.reason))
        if out is not None:
            self.cx.shards[out] = shard

    def _sync_gradients(self) -> None:
        """A whole value with a gradient, used by sharded ops: identity forward, gradient
        summed over the ranks backward (once at the value when every use is sharded)."""
        for value, users in self.whole_uses.items():
            live = [u for u in users if u not in self.dead]
            if not live:
                continue
            everywhere = set(value.users) <= set(live)
            if everywhere:
                with self.graph.inserting_after(value):
                    synced = self.builder.grad_sync(value)
                value.replace_all_uses_with(synced, delete_user_cb=lambda u, s=synced: u is not s)
            else:
                for user in live:
                    with self.graph.inserting_before(user):
                        user.replace_input_with(value, self.builder.grad_sync(value))
            self.result.outside.append(Outside(
                "gradient sum", value.name, "all_reduce (bwd)",
                f"whole {tuple(gshape(value))} value used by {len(live)} sharded op(s)"))


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if is_tensor(n) else n)
    return list(dict.fromkeys(found))


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target))


def _propagate_meta(gm: fx.GraphModule, fake_mode) -> None:
    """Recompute every node's example value at the local shapes (and check the rewritten
    graph: a shape error here is a bug of the pass, reported as a decline)."""
    if fake_mode is None:
        return
    env: dict[fx.Node, Any] = {}
    try:
        with fake_mode:
            for node in gm.graph.nodes:
                if node.op == "placeholder":
                    env[node] = value_of(node)
                    continue
                if node.op == "output":
                    continue
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                if node.op == "call_function":
                    val = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    val = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "get_attr":
                    val = fake_mode.from_tensor(_attr(gm, node.target)) if isinstance(
                        _attr(gm, node.target), torch.Tensor) else _attr(gm, node.target)
                else:
                    raise GraphDecline(f"{node.op} nodes are not supported")
                node.meta["example_value"] = val
                env[node] = val
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise GraphDecline(f"the sharded graph does not check at the local shapes "
                           f"({type(exc).__name__}: {str(exc)[:300]})") from None


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

