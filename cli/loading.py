"""Reading the command line's user objects: `MODULE:FACTORY` models, `--inputs MODULE:FN`,
`--policy JSON|PATH`. Every problem is a ValueError naming the value (exit code 2)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clusterfx.apps.common import reference_inputs
from clusterfx.config.policy import Policy
from clusterfx.models import MODEL_FACTORIES


def load_object(spec: str, what: str) -> Callable:
    """`"pkg.mod:name"` or `"path/to/file.py:name"` -> the callable `name`."""
    module_name, sep, attr = spec.rpartition(":")
    if (not sep or not module_name or ":" in module_name
            or not attr.replace(".", "").replace("_", "").isalnum()):
        raise ValueError(f"{what} ({spec!r}) must look like MODULE:NAME, "
                         f"e.g. clusterfx.models:gpt_tiny or path/to/file.py:make_model")
    try:
        module = _import(module_name)
    except Exception as exc:  # user code may raise anything on import
        raise ValueError(f"{what}: cannot import module {module_name!r}: "
                         f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what}: {spec} is a {type(obj).__name__}, not a callable")
    return obj


def _import(module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        name = f"_clusterfx_user_{path.stem}_{abs(hash(str(path)))}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the console script does not put cwd on the path
    return importlib.import_module(module_name)


def build_model(spec: str) -> tuple[Any, str | None]:
    """Call the factory; returns (model in eval mode, our model name or None)."""
    factory = load_object(spec, "FACTORY")
    try:
        model = factory()
    except Exception as exc:  # user code may raise anything
        raise ValueError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    if isinstance(model, torch.nn.Module):
        model.eval()
    elif not callable(model):
        raise ValueError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    ours = next((n for n, f in MODEL_FACTORIES.items() if f is factory), None)
    return model, ours


def build_inputs(args: argparse.Namespace, model: Any, ours: str | None) -> tuple:
    if args.inputs is not None:
        fn = load_object(args.inputs, "--inputs")
        try:
            takes_model = bool(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            takes_model = True
        try:
            out = fn(model) if takes_model else fn()
        except Exception as exc:  # user code may raise anything
            raise ValueError(f"--inputs {args.inputs} failed: {type(exc).__name__}: "
                             f"{exc}") from None
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)
    if ours is None:
        raise ValueError(f"{args.factory} is not one of the clusterfx.models factories "
                         f"({', '.join(f.__name__ for f in MODEL_FACTORIES.values())}); "
                         f"pass --inputs MODULE:FN returning its example inputs")
    try:
        return reference_inputs(ours, model, args.seq_len)
    except ValueError as exc:
        raise ValueError(f"--seq-len: {exc}") from None


def parse_policy(text: str | None) -> Policy | None:
    """`--policy`: a JSON object (starts with `{`) or the path of a JSON file."""
    if text is None:
        return None
    raw = text
    if not text.lstrip().startswith("{"):
        try:
            raw = Path(text).read_text()
        except OSError as exc:
            raise ValueError(f"--policy ({text!r}) is neither a JSON object nor a readable "
                             f"file: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--policy ({text!r}) is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--policy must be a JSON object of module path -> config, got "
                         f"{type(data).__name__}")
    try:
        return Policy.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"--policy: {exc}") from None
