"""One telemetry scheme for every op: what ran, per process and per compiled site.

- ``counters["<op>.<impl>"]``: forward calls of each op by implementation, process-wide (and
  other named events, e.g. ``"cluster_queries.clusters_clamped"``).
- Per compile: a compiled model owns a ``SiteCounts`` (``new_sink()``); the ops it runs carry a
  site tag ``"<sink token>/<site>"`` and ``record(..., site=tag, path=...)`` counts the path the
  site took in that sink only. The sink is held weakly here, so it lives exactly as long as its
  compiled model, and nothing accumulates in the process across compiles.
"""

from __future__ import annotations

import itertools
import weakref
from collections import Counter, defaultdict

counters: Counter[str] = Counter()
_tokens = itertools.count()
_sinks: weakref.WeakValueDictionary[str, SiteCounts] = weakref.WeakValueDictionary()


class SiteCounts:
    """Run-time path counts of the sites of one compile: ``counts[site][path]``."""

    def __init__(self) -> None:
        self.token = f"c{next(_tokens)}"
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def tag(self, site: str) -> str:
        """The string a site's op carries so that its calls are counted here."""
        return f"{self.token}/{site}"

    def paths(self, site: str) -> dict[str, int]:
        return dict(self.counts.get(site, {}))


def new_sink() -> SiteCounts:
    sink = SiteCounts()
    _sinks[sink.token] = sink
    return sink


def record(op: str, impl: str, site: str = "", path: str | None = None) -> None:
    """Count one forward call of ``op`` by ``impl``; with a site tag, count ``path`` (default:
    the impl) for that site in its compile's sink."""
    counters[f"{op}.{impl}"] += 1
    if site:
        token, _, name = site.partition("/")
        sink = _sinks.get(token)
        if sink is not None:
            sink.counts[name][path or impl] += 1


def event(name: str) -> None:
    """Count a named event (a warning given, a clamp applied) process-wide."""
    counters[name] += 1
