"""Learnable modules that a rewrite adds to the user's model (PatchToCluster's clustering).

A lowering runs inside the dynamo backend, on a captured graph whose inputs dynamo fixed; the
user's parameters are graph inputs. A rewrite that needs new parameters therefore

1. installs the module on the user's model (`PassContext.root`) under the site's module path,
   `root.get_submodule(path).add_module(name, module)`, so `model.parameters()`, optimizers
   built afterwards and `state_dict()` see it; a recompile of the same site (new shapes,
   train/eval) finds it there and reuses it, never making a second one;
2. registers the same module on the graph module under `INSTALLED_PREFIX + <path>` and reads
   its parameters with `get_attr` nodes, so the graph runs as it is (eager backend, and the
   graph `clusterfx.transform` returns);
3. leaves to the compiler (compiler/install.py) the lifting of those `get_attr` parameters into
   trailing graph inputs before AOT-based backends (Inductor, aot_eager) compile the graph: the
   compiled function is called with dynamo's inputs plus the live parameters, so gradients
   reach them and optimizer updates are seen without a recompile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from clusterfx.config.vocabulary import Decline
from clusterfx.passes.analysis.graph_utils import GraphEditor

INSTALLED_PREFIX = "clusterfx_installed__"


def attribute_name(path: str, name: str) -> str:
    """The graph module attribute holding the module installed at `path.name`."""
    return INSTALLED_PREFIX + f"{path}.{name}".strip(".").replace(".", "__")


def require_module(root) -> None:
    """Decline unless a module was compiled (a plain function has nowhere to hold modules)."""
    if not isinstance(root, torch.nn.Module):
        raise Decline("it adds a learnable module to the model, and what was compiled is not "
                      "an nn.Module; compile the module itself")


def install(root: torch.nn.Module | None, path: str, name: str,
            build: Callable[[], torch.nn.Module],
            fits: Callable[[torch.nn.Module], str]) -> tuple[torch.nn.Module, bool]:
    """The module at `path.name` of `root`: the one already installed, or `build()` installed
    now. `fits(existing)` returns "" when an existing module can serve, else why not.
    Returns (module, created). Raises Decline when there is nowhere to install."""
    require_module(root)
    try:
        owner = root.get_submodule(path) if path else root
    except AttributeError:
        raise Decline(f"the site's module path {path!r} is not a submodule of the compiled "
                      f"model, so its learnable module has no place") from None
    existing = owner._modules.get(name)
    if existing is not None:
        why = fits(existing)
        if why:
            raise Decline(f"{path}.{name} already holds a module that does not fit: {why}")
        return existing, False
    if hasattr(owner, name):
        raise Decline(f"{path or '<root>'} already has an attribute {name!r}")
    module = build()
    owner.add_module(name, module)
    return module, True


def read_parameters(editor: GraphEditor, path: str, name: str, module: torch.nn.Module,
                    params: list[torch.nn.Parameter], like: fx.Node) -> list[fx.Node]:
    """`get_attr` nodes reading `params` of `module` (registered on the graph module), each
    with a fake example value."""
    attr = attribute_name(path, name)
    editor.gm.add_submodule(attr, module)
    names = {id(p): n for n, p in module.named_parameters()}
    nodes = []
    for p in params:
        node = editor.graph.get_attr(f"{attr}.{names[id(p)]}")
        for key in ("nn_module_stack", "stack_trace"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        if editor.fake_mode is not None:
            node.meta["example_value"] = editor.fake_mode.from_tensor(p, static_shapes=True)
        nodes.append(node)
    return nodes
