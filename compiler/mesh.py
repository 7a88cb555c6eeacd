"""Resolve `compile(..., mesh=...)` into the key that enters the compile cache key and the
`ResolvedMesh` the sequence-parallel pass works with.

Accepted meshes:
- `cfx.SequenceParallel(ulysses=u, ring=r, ...)`: built over the default process group
  (`torch.distributed.init_process_group`, e.g. by `torchrun`); u·r·data_parallel must be the
  world size. The ranks form a (data_parallel, ring, ulysses) `DeviceMesh`: Ulysses groups are
  contiguous ranks, ring groups strided (USP's layout). Meshes are built once per degree triple
  and reused (creating process groups is collective: every rank must compile alike).
- a `torch.distributed.device_mesh.DeviceMesh` with dims named "ulysses" and/or "ring" (its
  groups are used as they are; options take their defaults);
- `(device_mesh, cfx.SequenceParallel(...))`: that mesh's groups with the spec's options (its
  degrees must match the mesh's).
Errors (ValueError / TypeError) name what was wrong and what is accepted, before any work.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from clusterfx.config.parallel import ResolvedMesh, SequenceParallel

MESH_DIMS = ("ulysses", "ring")
_BUILT: dict[tuple, Any] = {}


def _is_device_mesh(mesh: Any) -> bool:
    return hasattr(mesh, "mesh_dim_names") and hasattr(mesh, "mesh")


def _split(mesh: Any) -> tuple[Any, SequenceParallel | None]:
    if isinstance(mesh, tuple) and len(mesh) == 2 and isinstance(mesh[1], SequenceParallel):
        return mesh[0], mesh[1]
    if isinstance(mesh, SequenceParallel):
        return None, mesh
    return mesh, None


def _check_dims(device_mesh: Any) -> list[str]:
    if not _is_device_mesh(device_mesh):
        raise TypeError(f"mesh ({type(device_mesh).__name__}) must be a torch DeviceMesh with "
                        f"dims named {MESH_DIMS}, a cfx.SequenceParallel(...), or "
                        f"(DeviceMesh, SequenceParallel)")
    names = list(device_mesh.mesh_dim_names or ())
    unknown = [n for n in names if n not in MESH_DIMS]
    if unknown or not names:
        raise ValueError(f"mesh dims {names}: {unknown or 'none'} not understood; name them "
                         f"{MESH_DIMS}")
    return names


def mesh_key(mesh: Any) -> str | None:
    """A stable description of `mesh` (None without one); errors name what is accepted."""
    if mesh is None:
        return None
    device_mesh, spec = _split(mesh)
    spec_key = spec.cache_key() if spec is not None else "defaults"
    if device_mesh is None:
        return f"sp:{spec_key}"
    names = _check_dims(device_mesh)
    blob = json.dumps({"dims": names, "ranks": device_mesh.mesh.tolist(), "spec": spec_key})
    return "mesh:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence parallelism needs torch.distributed: call "
                         "torch.distributed.init_process_group(...) first (torchrun does the "
                         "rendezvous), then compile with mesh=...")
    return dist


def _device_type(dist) -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _build(spec: SequenceParallel, dist) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if spec.world_size != world:
        raise ValueError(
            f"SequenceParallel(ulysses={spec.ulysses}, ring={spec.ring}, data_parallel="
            f"{spec.data_parallel}) spans {spec.world_size} ranks but the world has {world}: "
            f"ulysses·ring·data_parallel must equal the world size")
    key = (spec.data_parallel, spec.ring, spec.ulysses, world)
    if key not in _BUILT:
        _BUILT[key] = init_device_mesh(_device_type(dist), key[:3],
                                       mesh_dim_names=("dp", "ring", "ulysses"))
    return _BUILT[key]


def _degree(device_mesh: Any, name: str) -> int:
    names = list(device_mesh.mesh_dim_names)
    return device_mesh.size(names.index(name)) if name in names else 1


def resolve(mesh: Any) -> ResolvedMesh | None:
    """The groups and options of `mesh` for this rank (None without a mesh)."""
    if mesh is None:
        return None
    device_mesh, spec = _split(mesh)
    dist = _dist()
    if device_mesh is None:
        device_mesh = _build(spec, dist)
    else:
        names = _check_dims(device_mesh)
        if spec is not None and (spec.ulysses, spec.ring) != (
                _degree(device_mesh, "ulysses"), _degree(device_mesh, "ring")):
            raise ValueError(f"SequenceParallel(ulysses={spec.ulysses}, ring={spec.ring}) does "
                             f"not match the mesh's dims {names} of sizes "
                             f"{list(device_mesh.mesh.shape)}")
        if device_mesh.get_coordinate() is None:
            raise ValueError(f"this rank ({dist.get_rank()}) is not in the mesh "
                             f"{device_mesh.mesh.tolist()}")
    spec = spec or SequenceParallel()
    u, r = _degree(device_mesh, "ulysses"), _degree(device_mesh, "ring")
    groups = {n: device_mesh.get_group(n).group_name if _degree(device_mesh, n) > 1 else ""
              for n in MESH_DIMS}
    ranks = _sequence_ranks(device_mesh, dist, u, r)
    return ResolvedMesh(u, r, groups["ulysses"], groups["ring"], spec.load_balance,
                        spec.gather_output, spec.sequence_inputs, spec.timeout, spec.impl,
                        ranks, dist.get_world_size(), spec.ring_clustering)


def _sequence_ranks(device_mesh: Any, dist, u: int, r: int) -> tuple[int, ...]:
    """Global ranks of this rank's sequence, by (ring rank, ulysses rank)."""
    def members(name: str) -> list[int]:
        if _degree(device_mesh, name) == 1:
            return [dist.get_rank()]
        return dist.get_process_group_ranks(device_mesh.get_group(name))

    ring = members("ring")
    if u == 1:
        return tuple(ring)
    out = []
    for peer in ring:  # each ring peer's Ulysses group, found from the mesh's coordinates
        grid = device_mesh.mesh
        where = (grid == peer).nonzero()[0].tolist()
        names = list(device_mesh.mesh_dim_names)
        index = [slice(None) if n == "ulysses" else where[i] for i, n in enumerate(names)]
        out += grid[tuple(index)].flatten().tolist()
    return tuple(out)
