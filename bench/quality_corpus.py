"""The texts of `clusterfx bench quality` (data in `quality_corpus.json`, shipped with the
package): 48 passages written for this benchmark (16 of about 130-250 tokens, 16 of 250-380 and
16 of 380-500 after WordPiece tokenisation), and 24 short queries, each a paraphrase of one
passage, for a retrieval check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple


class Passage(NamedTuple):
    topic: str
    title: str
    text: str


class Query(NamedTuple):
    text: str
    passage: int  # index into PASSAGES of the passage it paraphrases


_DATA = json.loads((Path(__file__).with_name("quality_corpus.json")).read_text())
PASSAGES: tuple[Passage, ...] = tuple(Passage(**p) for p in _DATA["passages"])
_INDEX = {p.title: i for i, p in enumerate(PASSAGES)}
QUERIES: tuple[Query, ...] = tuple(Query(q["text"], _INDEX[q["passage"]])
                                   for q in _DATA["queries"])

__all__ = ["PASSAGES", "QUERIES", "Passage", "Query"]
