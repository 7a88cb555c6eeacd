"""The layers point one way (tests/layers.py has the rules): the package passes, and each kind
of planted violation — a lower layer importing a higher one (also inside a function), an
implementation importing a sibling implementation, a family reaching into another family's
internals, a model importing the passes, a third-party import in ops, a cycle — is caught."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.layers import check_tree

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_follows_the_layer_rules():
    violations, cycles = check_tree(ROOT)
    assert not violations, "\n".join(map(str, violations))
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    base = {
        "__init__.py": "from clusterfx.compiler import api\n",
        "config/__init__.py": "", "config/configs.py": "import dataclasses\n",
        "ops/__init__.py": "", "ops/common/__init__.py": "", "ops/common/checks.py": "",
        "ops/fam/__init__.py": "from clusterfx.ops.fam import registration\n",
        "ops/fam/registration.py": "from clusterfx.ops.fam import cpu, reference\n",
        "ops/fam/common.py": "import torch\n",
        "ops/fam/cpu.py": "from clusterfx.ops.fam import common\n",
        "ops/fam/reference.py": "import torch\n",
        "ops/other/__init__.py": "", "ops/other/cpu.py": "import torch\n",
        "models/__init__.py": "import torch\n",
        "passes/__init__.py": "", "passes/lower.py": "from clusterfx.ops import fam\n",
        "compiler/__init__.py": "", "compiler/api.py": "from clusterfx.passes import lower\n",
        "cli/__init__.py": "import clusterfx\nfrom clusterfx.compiler import api\n",
    }
    for rel, text in {**base, **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_a_clean_planted_tree_passes(tmp_path):
    assert check_tree(_tree(tmp_path, {})) == ([], [])


@pytest.mark.parametrize(("files", "expected"), [
    ({"passes/bad.py": "def f():\n    from clusterfx.compiler import api\n"},
     "must not import the higher layer compiler/"),
    ({"ops/fam/cpu.py": "from clusterfx.ops.fam import reference\n"},
     "implementation fam/cpu imports fam/reference"),
    ({"ops/fam/cpu.py": "from clusterfx.ops.other import cpu\n"},
     "reaches into family other's internals"),
    ({"models/net.py": "from clusterfx.passes import lower\n"},
     "models/ imports only torch"),
    ({"ops/fam/common.py": "import sklearn\n"}, "ops/ may import only"),
    ({"config/configs.py": "import torch\n"}, "config/ may import only"),
    ({"passes/lower.py": "import clusterfx\n"}, "must not import the public facade"),
    ({"ops/fam/common.py": "from clusterfx.ops.fam import cpu\n"},
     "shared module fam/common must not import fam/cpu"),
])
def test_planted_violations_are_caught(tmp_path, files, expected):
    violations, _ = check_tree(_tree(tmp_path, files))
    assert any(expected in str(v) for v in violations), violations


def test_a_planted_cycle_is_caught(tmp_path):
    _, cycles = check_tree(_tree(tmp_path, {
        "compiler/a.py": "from clusterfx.compiler import b\n",
        "compiler/b.py": "def later():\n    from clusterfx.compiler import a\n",
    }))
    assert ["clusterfx.compiler.a", "clusterfx.compiler.b", "clusterfx.compiler.a"] in cycles
