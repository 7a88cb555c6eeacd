"""clusterfx: rewrite dense attention into clustered / top-k / patch-to-cluster attention with
torch.compile passes, per a per-layer policy."""

if __name__ != "clusterfx":  # pragma: no cover - pytest imports the checkout under its folder name
    # The package is always `clusterfx` (pyproject maps it to this folder). Alias any other name
    # to it, so that ops, configs and backends are registered exactly once.
    import importlib as _importlib
    import sys as _sys

    _sys.modules[__name__] = _importlib.import_module("clusterfx")
else:
    from clusterfx.apps.visualize import visualize_clusters
    from clusterfx.compiler.api import (
        CompiledFunction,
        CompiledModule,
        compile,
        explain,
        transform,
    )
    from clusterfx.compiler.equivalence import EquivalenceResult, check_equivalence
    from clusterfx.compiler.report import Report
    from clusterfx.config import (
        AttentionConfig,
        Auto,
        CausalClustered,
        CausalImprovedClustered,
        Clustered,
        Dense,
        ImprovedClustered,
        PatchToCluster,
        Policy,
        PolicyError,
        SequenceParallel,
        Status,
        TopK,
    )

    __all__ = [
        "compile", "transform", "explain", "Policy", "PolicyError", "Report", "Status",
        "AttentionConfig", "Dense", "Clustered", "ImprovedClustered", "CausalClustered",
        "CausalImprovedClustered", "TopK", "PatchToCluster",
        "Auto", "SequenceParallel", "CompiledModule", "CompiledFunction", "check_equivalence",
        "EquivalenceResult", "visualize_clusters",
    ]
    __version__ = "0.1.0"
