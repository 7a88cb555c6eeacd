"""The import rules of clusterfx's layers (DESIGN.md, Layout), checked by reading every module's
imports with `ast` — module-level and function-level imports alike.

Layers, lowest first; a module may import the package only from layers below its own, or from
its own layer under the layer's own rule:

    config   the data layer: imports nothing of the package but config itself
    ops      torch/triton only; within a family, the implementations (reference, cpu, triton,
             and any other implementation module) import only their own files (`triton_*`), the
             family's shared modules (common, checks, spec) and ops/common — never each other;
             the API/registration level (__init__, registration, conditional, backward) may use
             them all; a family uses another only through its public API (the package)
    models   torch (and torch_geometric) only; nothing else of the package
    passes   config, ops, passes
    compiler config, ops, models, passes, compiler
    apps     the layers below, apps, and the public facade (`import clusterfx`)
    bench    the layers below, apps, bench, the facade
    cli      anything below, the facade
The facade `clusterfx/__init__.py` and `__main__.py` may import any layer. There are no import
cycles between modules (a package's `__init__` importing its own submodules is the usual
package pattern, not a cycle: edges go to the most specific module named).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "clusterfx"
LAYERS = ["config", "ops", "models", "passes", "compiler", "apps", "bench", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}
# what each layer may import besides lower layers (None: only what the rank allows)
MODELS_THIRD_PARTY = {"torch", "torch_geometric"}
OPS_THIRD_PARTY = {"torch", "triton", "numpy"}
CONFIG_THIRD_PARTY: set[str] = set()
# ops family modules by role: the API and registration level (may use anything of the family),
# the shared modules (common code of the implementations), and everything else: implementations
REGISTRATION_LEVEL = {"__init__", "registration", "conditional", "backward"}
IMPLEMENTATIONS_SHARED = {"common", "checks", "spec"}
FACADE_USERS = {"apps", "bench", "cli"}


@dataclass(frozen=True)
class Violation:
    module: str
    imported: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}: {self.rule}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def discover(root: Path) -> dict[str, Path]:
    """Every module of the package under `root` (tests, examples, scripts excluded)."""
    skip = {"tests", "examples", "scripts", "results", "build", "docs"}
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in skip or any(p.startswith(".") for p in rel):
            continue
        out[module_name(root, path)] = path
    return out


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file; `from pkg import sub` resolves to
    the submodule when `pkg.sub` is a module."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def _top(module: str) -> str:
    return module.split(".")[0]


def check_module(name: str, imported: str, line: int, modules: dict[str, Path]) -> str | None:
    """The rule `name` importing `imported` breaks, or None."""
    layer = _layer(name)
    internal = _top(imported) == PACKAGE
    if layer is None:  # the facade and __main__
        return None
    stdlib = _top(imported) in sys.stdlib_module_names
    if not internal:
        allowed = {"config": CONFIG_THIRD_PARTY, "ops": OPS_THIRD_PARTY,
                   "models": MODELS_THIRD_PARTY}.get(layer)
        if allowed is not None and not stdlib and _top(imported) not in allowed:
            return f"{layer}/ may import only {sorted(allowed) or 'the standard library'}"
        return None
    if imported == PACKAGE:
        return None if layer in FACADE_USERS else (
            f"{layer}/ must not import the public facade `clusterfx` (it sits above)")
    target = _layer(imported)
    if target is None:
        return f"{layer}/ imports {imported}, which is outside the layers"
    if layer == "models" and target != "models":
        return "models/ imports only torch (and torch_geometric), never the rest of clusterfx"
    if RANK[target] > RANK[layer]:
        return f"{layer}/ must not import the higher layer {target}/"
    if layer == "ops" and target == "ops":
        return _ops_rule(name, imported, modules)
    return None


def _family(module: str) -> tuple[str, str]:
    """(family, file) of an ops module: clusterfx.ops.<family>.<file>."""
    parts = module.split(".")
    family = parts[2] if len(parts) > 2 else ""
    file = parts[3] if len(parts) > 3 else "__init__"
    return family, file


def _ops_rule(name: str, imported: str, modules: dict[str, Path]) -> str | None:
    family, file = _family(name)
    target_family, target_file = _family(imported)
    if target_family in ("", "common"):
        return None
    if target_family != family:
        if target_file == "__init__":
            return None
        return (f"ops family {family} reaches into family {target_family}'s internals "
                f"({target_file}); use its public API (clusterfx.ops.{target_family})")
    if file in REGISTRATION_LEVEL or target_file in IMPLEMENTATIONS_SHARED:
        return None
    if file in IMPLEMENTATIONS_SHARED:
        return f"shared module {family}/{file} must not import {family}/{target_file}"
    if target_file.startswith(f"{file}_"):  # an implementation split in files: triton_kernels
        return None
    return (f"implementation {family}/{file} imports {family}/{target_file}; implementations "
            f"import only their own files, their family's shared modules and ops/common")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Elementary cycles found by a depth-first search (one per back edge)."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def check_tree(root: Path) -> tuple[list[Violation], list[list[str]]]:
    """All rule violations and import cycles of the package rooted at `root`."""
    modules = discover(root)
    violations: list[Violation] = []
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        for imported, line in imports_of(name, path, modules):
            rule = check_module(name, imported, line, modules)
            if rule:
                violations.append(Violation(name, imported, line, rule))
            if imported in modules and imported != name:
                parent = name.rsplit(".", 1)[0]
                if path.name == "__init__.py" or imported != parent:
                    graph.setdefault(name, set()).add(imported)
    return violations, find_cycles(graph)
