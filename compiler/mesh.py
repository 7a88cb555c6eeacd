"""Resolve `compile(..., mesh=...)`: a `DeviceMesh` with dims named "ulysses" and/or "ring",
or a `cfx.SequenceParallel` spec, into the key that enters the compile cache key."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from clusterfx.config.parallel import SequenceParallel

MESH_DIMS = ("ulysses", "ring")


def mesh_key(mesh: Any) -> str | None:
    """A stable description of `mesh` (None without one); errors name what is accepted."""
    if mesh is None:
        return None
    if isinstance(mesh, SequenceParallel):
        return f"sp:{mesh.cache_key()}"
    names = getattr(mesh, "mesh_dim_names", None)
    if names is None or not hasattr(mesh, "mesh"):
        raise TypeError(f"mesh ({type(mesh).__name__}) must be a torch DeviceMesh with dims "
                        f"named {MESH_DIMS} or a cfx.SequenceParallel(...)")
    unknown = [n for n in names if n not in MESH_DIMS]
    if unknown:
        raise ValueError(f"mesh dims {list(names)}: {unknown} not understood; name them "
                         f"{MESH_DIMS}")
    blob = json.dumps({"dims": list(names), "ranks": mesh.mesh.tolist()})
    return "mesh:" + hashlib.sha256(blob.encode()).hexdigest()[:16]
