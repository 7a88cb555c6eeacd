"""clusterfx: rewrite dense attention into clustered / top-k / patch-to-cluster attention with
torch.compile passes, per a per-layer policy."""

from .compiler.api import CompiledFunction, CompiledModule, compile, explain, transform
from .compiler.configs import (
    AttentionConfig,
    Auto,
    Clustered,
    Dense,
    ImprovedClustered,
    PatchToCluster,
    TopK,
)
from .compiler.policy import Policy
from .compiler.report import Report

__all__ = [
    "compile", "transform", "explain", "Policy", "Report", "AttentionConfig", "Dense",
    "Clustered", "ImprovedClustered", "TopK", "PatchToCluster", "Auto", "CompiledModule",
    "CompiledFunction",
]
__version__ = "0.1.0"
