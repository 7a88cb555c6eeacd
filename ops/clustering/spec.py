"""`ClusteringSpec`: how the queries of clustered attention are clustered, as one value.

It travels whole from the lowering to the op's kernel; only the custom-op schema needs the
primitives, and `to_args` / `from_args` are the one place that converts (the order of
`FIELDS` is the schema's order)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clusterfx.ops.clustering.checks import check_clustering, check_metric_name
from clusterfx.ops.common.checks import check_bits, check_int, check_positive_int, check_seed


@dataclass(frozen=True)
class ClusteringSpec:
    """``clusters`` C; ``iterations`` of Hamming (or Euclidean) k-means; ``bits`` of the LSH;
    ``seed`` (-1: torch's global RNG); ``clustering`` "hamming" | "kmeans"; ``refine`` Lloyd
    steps after it; ``metric`` "attention" (the keys' covariance) | "euclidean" (raw queries).
    """

    clusters: int
    iterations: int = 5
    bits: int = 63
    seed: int = -1
    clustering: str = "hamming"
    refine: int = 1
    metric: str = "attention"

    def __post_init__(self) -> None:
        check_positive_int("clusters", self.clusters)
        check_positive_int("iterations", self.iterations)
        check_bits(self.bits)
        check_seed(self.seed)
        check_clustering(self.clustering)
        check_int("refine", self.refine, 0)
        check_metric_name(self.metric)

    def to_args(self) -> tuple:
        """The primitives, in the custom ops' schema order."""
        return dataclasses.astuple(self)

    @classmethod
    def from_args(cls, *args) -> ClusteringSpec:
        return cls(*args)


FIELDS = tuple(f.name for f in dataclasses.fields(ClusteringSpec))
