"""Policy resolution: which rewrite config applies to an attention site's module path.

Keys are tried in order; the first that matches the site's path or one of its ancestors wins:
- an exact module path (`"encoder.layer.0"` matches `"encoder.layer.0.attention.self"`),
- a glob (`"encoder.layer.*"`, shell-style via `fnmatch`),
- `"re:<regex>"` (full match),
- `"_default"` (matches everything; wherever it stands it is tried last).
Values are `AttentionConfig`s or `None` (leave dense).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .configs import AttentionConfig, Dense, config_from_dict

DEFAULT_KEY = "_default"
_GLOB_CHARS = set("*?[")


def ancestors(path: str) -> list[str]:
    """`"a.b.c"` -> `["a.b.c", "a.b", "a", ""]` (the root module is the empty path)."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


@dataclass(frozen=True)
class Rule:
    key: str
    config: AttentionConfig | None
    kind: str  # "exact" | "glob" | "regex" | "default"
    regex: re.Pattern | None = None

    def matches(self, path: str) -> bool:
        if self.kind == "default":
            return True
        for p in ancestors(path):
            if self.kind == "exact" and p == self.key:
                return True
            if self.kind == "glob" and fnmatch.fnmatchcase(p, self.key):
                return True
            if self.kind == "regex" and self.regex.fullmatch(p):
                return True
        return False


def _make_rule(key: Any, value: Any) -> Rule:
    if not isinstance(key, str):
        raise TypeError(f"policy key ({key!r}) must be a str: a module path, a glob, "
                        f"'re:<regex>' or '_default'")
    if value is not None and not isinstance(value, AttentionConfig):
        raise TypeError(
            f"policy value for {key!r} ({value!r}) must be a config such as cfx.Dense(), "
            f"cfx.Clustered(clusters=...), cfx.ImprovedClustered(...), cfx.TopK(k=...), "
            f"cfx.PatchToCluster(...), cfx.Auto(), or None to leave the site dense"
        )
    if key == DEFAULT_KEY:
        return Rule(key, value, "default")
    if key.startswith("re:"):
        try:
            compiled = re.compile(key[3:])
        except re.error as exc:
            raise ValueError(f"policy key {key!r} is not a valid regex: {exc}") from None
        return Rule(key, value, "regex", compiled)
    if _GLOB_CHARS & set(key):
        return Rule(key, value, "glob")
    return Rule(key, value, "exact")


@dataclass(frozen=True)
class Resolution:
    """What the policy says about one site: the config (None = dense) and the key that chose it."""

    config: AttentionConfig | None
    key: str | None


@dataclass(frozen=True)
class Policy:
    """An ordered, validated policy. Build with `Policy.make(mapping_or_policy_or_None)`."""

    rules: tuple[Rule, ...] = ()
    strict: bool = False

    @classmethod
    def make(cls, policy: Policy | Mapping[str, Any] | AttentionConfig | None,
             strict: bool = False) -> Policy:
        if isinstance(policy, Policy):
            return cls(policy.rules, strict or policy.strict)
        if policy is None:
            return cls((), strict)
        if isinstance(policy, AttentionConfig):
            return cls((_make_rule(DEFAULT_KEY, policy),), strict)
        if not isinstance(policy, Mapping):
            raise TypeError(f"policy ({policy!r}) must be a dict of module path -> config, "
                            f"a single config, or None")
        rules = [_make_rule(k, v) for k, v in policy.items()]
        # `_default` is a fallback wherever it was written.
        rules.sort(key=lambda r: r.kind == "default")
        return cls(tuple(rules), strict)

    def resolve(self, path: str) -> Resolution:
        for rule in self.rules:
            if rule.matches(path):
                return Resolution(rule.config, rule.key)
        return Resolution(Dense(), None)

    def unmatched_keys(self, paths: list[str]) -> list[str]:
        """Keys (other than `_default`) that match none of `paths`."""
        return [r.key for r in self.rules
                if r.kind != "default" and not any(r.matches(p) for p in paths)]

    def to_dict(self) -> dict[str, Any]:
        return {r.key: (None if r.config is None else r.config.to_dict()) for r in self.rules}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], strict: bool = False) -> Policy:
        """Inverse of `to_dict`: {key: {"type": name, **fields} or None}."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a serialised policy must be a dict of key -> config dict, got "
                             f"{type(data).__name__} {data!r}")
        configs = {}
        for key, value in data.items():
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"policy value for {key!r} ({value!r}) must be a config dict "
                                 f"such as {{'type': 'clustered', 'clusters': 100}}, or None")
            configs[key] = config_from_dict(value)
        return cls.make(configs, strict)

    def cache_key(self) -> str:
        """A stable hash of the policy; it enters the compile cache key."""
        blob = json.dumps({"rules": self.to_dict(), "strict": self.strict}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
