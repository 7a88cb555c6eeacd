"""The data layer: rewrite configs, the policy, the sequence-parallel spec, and the words for
what happened to a site. Plain frozen dataclasses; nothing here imports the rest of clusterfx
(a test enforces it), so every other layer may import this one."""

from .configs import (
    CONFIG_TYPES,
    AttentionConfig,
    Auto,
    CausalClustered,
    CausalImprovedClustered,
    Clustered,
    Dense,
    ImprovedClustered,
    PatchToCluster,
    TopK,
    config_from_dict,
)
from .parallel import SequenceParallel
from .policy import DEFAULT_KEY, Policy, Resolution, Rule, ancestors
from .vocabulary import Decline, PolicyError, Status

__all__ = [
    "CONFIG_TYPES", "DEFAULT_KEY", "AttentionConfig", "Auto", "CausalClustered",
    "CausalImprovedClustered", "Clustered", "Decline", "Dense",
    "ImprovedClustered", "PatchToCluster", "Policy", "PolicyError", "Resolution", "Rule",
    "SequenceParallel", "Status", "TopK", "ancestors", "config_from_dict",
]
