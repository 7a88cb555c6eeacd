"""Per-site rewrite configs: frozen dataclasses that validate themselves and serialise to dicts.

A policy maps module paths to one of these; `None` in a policy means "leave dense".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

_CLUSTERINGS = ("hamming", "kmeans")
_METRICS = ("attention", "euclidean")


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} ({value!r}) must be a positive int")


SEED_LIMIT = 2**63  # seeds travel through int64 op arguments


def _optional_seed(owner: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value < SEED_LIMIT):
        raise ValueError(f"{owner}: seed ({value!r}) must be None or an int in [0, 2**63)")


CONFIG_TYPES: dict[str, type[AttentionConfig]] = {}  # name -> class, filled by subclassing


@dataclass(frozen=True)
class AttentionConfig:
    """Base of every rewrite config; `name` is what reports and serialised policies show.

    Subclasses register themselves by `name` (so `config_from_dict` knows them): a new rewrite
    is a new subclass, with no edit here."""

    name: ClassVar[str] = "base"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        known = CONFIG_TYPES.get(cls.name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise TypeError(f"config name {cls.name!r} of {cls.__qualname__} is already used by "
                            f"{known.__qualname__}")
        CONFIG_TYPES[cls.name] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Dense(AttentionConfig):
    """Keep exact attention: the canonical node becomes `F.scaled_dot_product_attention`."""

    name: ClassVar[str] = "dense"


@dataclass(frozen=True)
class Clustered(AttentionConfig):
    """Clustered attention (Vyas et al. 2020): LSH + Hamming K-means over queries, one
    attention row per centroid, broadcast back to the cluster's members.

    `metric`: the geometry the queries are clustered in. "attention" (default): distances
    `(x - y)ᵀ Cov(keys) (x - y)`, the spread over the keys of the logit gap between two queries,
    so queries that attend alike share a cluster; "euclidean": the raw queries, as the paper.
    `refine`: Lloyd steps in that geometry after the clustering (each costs one N·C·D matmul).
    `iterations`: Hamming (or Euclidean) k-means iterations before that.
    The defaults (attention metric, 5 iterations, one Lloyd step) are clusterfx's: on the
    pretrained MiniLM they lift i-clustered(25, 32) from 0.979 to 0.991 mean embedding cosine
    at about the paper's clustering cost; `metric="euclidean", iterations=10, refine=0` is the
    paper's method exactly. See the README's quality table.
    `min_length`: inputs with fewer keys than this run dense (the paper's `conditional-full`).
    """

    name: ClassVar[str] = "clustered"
    clusters: int = 100
    iterations: int = 5
    bits: int = 63
    seed: int | None = None
    clustering: str = "hamming"
    min_length: int = 0
    refine: int = 1
    metric: str = "attention"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _positive_int(owner, "clusters", self.clusters)
        _positive_int(owner, "iterations", self.iterations)
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 63:
            raise ValueError(f"{owner}: bits ({self.bits!r}) must be an int in 1..63")
        _optional_seed(owner, self.seed)
        if self.clustering not in _CLUSTERINGS:
            raise ValueError(
                f"{owner}: clustering ({self.clustering!r}) must be one of {_CLUSTERINGS}"
            )
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) or (
            self.min_length < 0
        ):
            raise ValueError(f"{owner}: min_length ({self.min_length!r}) must be an int >= 0")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"{owner}: refine ({self.refine!r}) must be an int >= 0")
        if self.metric not in _METRICS:
            raise ValueError(f"{owner}: metric ({self.metric!r}) must be one of {_METRICS}")


@dataclass(frozen=True)
class ImprovedClustered(Clustered):
    """i-clustered attention: clustered attention whose per-cluster top-k keys are
    recomputed exactly per query and scaled by the cluster's attention mass on them."""

    name: ClassVar[str] = "improved_clustered"
    clusters: int = 25
    topk: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(type(self).__name__, "topk", self.topk)


def _block(owner: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: block ({value!r}) must be a positive int")


@dataclass(frozen=True)
class CausalClustered(Clustered):
    """Causal clustered attention for decoders: queries are never pooled across positions.

    Each query attends exactly to the keys of its own block of `block` positions up to itself,
    and to `clusters` centroids of the keys of the *earlier* blocks (key-side clustering,
    updated in epochs from earlier positions only, so that no statistic comes from a later
    position). Causal sites given `Clustered` run this with the same clustering knobs and the
    default block. `iterations` defaults to 2 here: each epoch's update is warm-started.
    """

    name: ClassVar[str] = "causal_clustered"
    iterations: int = 2
    block: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        _block(type(self).__name__, self.block)


@dataclass(frozen=True)
class CausalImprovedClustered(ImprovedClustered):
    """Causal i-clustered attention: `CausalClustered` plus exact attention to `topk` earlier
    keys per query, chosen by the query's cluster (queries clustered causally: a query is
    assigned with centroids of earlier blocks only). Causal sites given `ImprovedClustered`
    run this."""

    name: ClassVar[str] = "causal_improved_clustered"
    iterations: int = 2
    block: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        _block(type(self).__name__, self.block)


@dataclass(frozen=True)
class TopK(AttentionConfig):
    """Exact top-k attention: each query attends to its k highest-scoring keys only."""

    name: ClassVar[str] = "topk"
    k: int = 32
    chunk_size: int = 256

    def __post_init__(self) -> None:
        _positive_int("TopK", "k", self.k)
        _positive_int("TopK", "chunk_size", self.chunk_size)


_PACA_CLUSTERINGS = ("conv", "mlp", "linear")
_PACA_INITS = ("pool", "random")


@dataclass(frozen=True)
class PatchToCluster(AttentionConfig):
    """Patch-to-cluster attention (PaCa-ViT, Grainger et al. 2023): the patch queries attend to
    M cluster tokens, each a learned softmax-weighted average of the patches; O(N·M) per head.

    Applies to dense self-attention over an H×W patch grid preceded by class/register tokens,
    in any vision transformer (the site's q, k and v must be linear projections of the same
    tokens). The rewrite adds one learnable clustering module per site to the compiled model,
    at `<attention module path>.paca_clustering` (see `ops/paca/clustering.py`).

    `clusters`: M >= 1. `clustering`: the module computing the cluster logits from the
    attention's input tokens: "conv" (depthwise 7x7 + 1x1 convs, the paper's default), "mlp"
    or "linear". `grid`: (H, W) of the patches; None reads it from the model (a submodule with
    `grid_size`, or `image_size` and `patch_size`). `prefix_tokens`: the class/register tokens
    before the patches (they attend and are attended exactly); None takes N - H·W, which must
    be between 0 and 16. `init`: "pool" (default: the module starts as M average-pooled
    regions of the grid, so a rewritten pretrained model starts close to its dense self) or
    "random" (the paper's initialisation).
    """

    name: ClassVar[str] = "patch_to_cluster"
    clusters: int = 49
    clustering: str = "conv"
    grid: tuple[int, int] | None = None
    prefix_tokens: int | None = None
    init: str = "pool"

    def __post_init__(self) -> None:
        _positive_int("PatchToCluster", "clusters", self.clusters)
        if self.clustering not in _PACA_CLUSTERINGS:
            raise ValueError(f"PatchToCluster: clustering ({self.clustering!r}) must be one of "
                             f"{_PACA_CLUSTERINGS}")
        if self.grid is not None:
            grid = self.grid
            if not isinstance(grid, (tuple, list)) or len(grid) != 2:
                raise ValueError(f"PatchToCluster: grid ({grid!r}) must be None or (H, W), "
                                 f"two positive ints")
            for value in grid:
                _positive_int("PatchToCluster", "grid", value)
            object.__setattr__(self, "grid", (int(grid[0]), int(grid[1])))  # JSON gives lists
        prefix = self.prefix_tokens
        if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int)
                                   or prefix < 0):
            raise ValueError(f"PatchToCluster: prefix_tokens ({prefix!r}) must be None or an "
                             f"int >= 0")
        if self.init not in _PACA_INITS:
            raise ValueError(f"PatchToCluster: init ({self.init!r}) must be one of "
                             f"{_PACA_INITS}")


@dataclass(frozen=True)
class Auto(AttentionConfig):
    """Let the cost model choose: dense below the crossover length, `candidate` above it."""

    name: ClassVar[str] = "auto"
    candidate: AttentionConfig = dataclasses.field(default_factory=lambda: ImprovedClustered())

    def __post_init__(self) -> None:
        if not isinstance(self.candidate, AttentionConfig) or isinstance(self.candidate, Auto):
            raise ValueError(
                f"Auto: candidate ({self.candidate!r}) must be a non-Auto attention config"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "candidate": self.candidate.to_dict()}


def config_from_dict(data: dict[str, Any] | None) -> AttentionConfig | None:
    """Inverse of `AttentionConfig.to_dict` (None stays None)."""
    if data is None:
        return None
    data = dict(data)
    kind = data.pop("type", None)
    if kind not in CONFIG_TYPES:
        raise ValueError(f"config type ({kind!r}) must be one of {sorted(CONFIG_TYPES)}")
    cls = CONFIG_TYPES[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are "
                         f"{sorted(fields)}")
    if kind == "auto" and "candidate" in data:
        data["candidate"] = config_from_dict(data["candidate"])
    return cls(**data)
