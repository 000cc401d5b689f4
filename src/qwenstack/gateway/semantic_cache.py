"""The semantic side of the answer cache: a question asked again in other words.

A chat request is split in two: its last user message (the question) and everything else (the
context: model, earlier turns, system prompt, every sampling parameter, and the caller unless
the cache is shared). A cached answer is served when the context is exactly the same and the
question's embedding lies within `cache.semantic_threshold` cosine similarity of the cached
question's. Only what the exact cache would serve is considered (greedy or seeded requests, or
a `cache_all` caller), and a hit is an entry of the exact cache's store, replayed the same way.

Why it is off by default and its threshold high (0.95): a similarity cache serves one
question's answer to another, so a near miss must stay below the threshold while rewordings
reach it, and embeddings blur the two. With the default all-MiniLM-L6-v2, "2+2" / "2+3" is
0.89 and "open on Saturday" / "open on Sunday" 0.94, while rewordings span 0.80 to 0.98; the
model knows no Chinese, so "如何重置密码" / "如何重置路由器" is 0.996.
`benchmarks/semantic_cache_threshold.py` prints hit and false-hit rates per threshold for the
configured embedder: measure with your own questions (and a multilingual embedder for Chinese)
before turning it on.

The index lives in the gateway process: numpy rows grouped by context, at most
`semantic_max_entries`, the oldest dropped first. With the Redis store the answers are shared,
but each gateway matches only the questions it has seen itself.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter

from qwenstack.errors import SetupError
from qwenstack.gateway.protocol import InferenceRequest
from qwenstack.settings import CacheSettings, RagSettings

SEMANTIC_HITS = Counter(
    "qwenstack_cache_semantic_hits",
    "Answer-cache hits found by question similarity (also counted as hits in lookups).",
)


@dataclass(frozen=True)
class Question:
    context: dict[str, Any]  # the request with the question's text left out
    text: str


def split_question(request: InferenceRequest) -> Question | None:
    """The chat request's last message, when it is a plain-text user message, and the rest;
    None otherwise."""
    messages = request.messages
    if not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    text = last.get("content")
    if not isinstance(text, str) or not text.strip():
        return None
    rest = {**request.as_dict(), "messages": [*messages[:-1], {**last, "content": None}]}
    return Question(rest, text)


@dataclass(frozen=True)
class Match:
    key: str  # the exact cache's key of the matching entry
    similarity: float


class _Group:
    """The questions cached under one context: their vectors as the rows of one matrix."""

    def __init__(self, dimension: int) -> None:
        self.keys: list[str] = []
        self.vectors = np.empty((0, dimension), dtype=np.float32)

    def add(self, key: str, vector: np.ndarray) -> None:
        self.keys.append(key)
        self.vectors = np.vstack([self.vectors, vector[np.newaxis, :]])

    def remove(self, key: str) -> None:
        row = self.keys.index(key)
        del self.keys[row]
        self.vectors = np.delete(self.vectors, row, axis=0)


class SemanticIndex:
    def __init__(self, embedder: Any, threshold: float, max_entries: int) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.max_entries = max_entries
        self._groups: dict[str, _Group] = {}
        # Exact key -> its group's context key, oldest first: the order entries are dropped in.
        self._order: collections.OrderedDict[str, str] = collections.OrderedDict()

    @classmethod
    async def open(cls, cache: CacheSettings, rag: RagSettings) -> SemanticIndex:
        from qwenstack.rag.embeddings import make_embedder

        try:
            embedder = await asyncio.to_thread(make_embedder, rag)
        except ImportError as exc:
            raise SetupError(
                f"cache.semantic needs the embedding libraries ({exc.name} is missing): "
                "pip install 'qwenstack[rag]'."
            ) from None
        return cls(embedder, cache.semantic_threshold, cache.semantic_max_entries)

    async def embed(self, text: str) -> np.ndarray:
        """The question's unit vector, computed off the event loop (milliseconds of CPU)."""
        [vector] = await asyncio.to_thread(self.embedder.embed, [text])
        return np.asarray(vector, dtype=np.float32)

    def nearest(self, context_key: str, vector: np.ndarray) -> Match | None:
        group = self._groups.get(context_key)
        if group is None or not group.keys:
            return None
        similarities = group.vectors @ vector
        best = int(np.argmax(similarities))
        similarity = float(similarities[best])
        if similarity < self.threshold:
            return None
        return Match(group.keys[best], similarity)

    def add(self, context_key: str, vector: np.ndarray, key: str) -> None:
        if key in self._order:
            return
        group = self._groups.get(context_key)
        if group is None:
            group = self._groups[context_key] = _Group(vector.shape[0])
        group.add(key, vector)
        self._order[key] = context_key
        while len(self._order) > self.max_entries:
            self.forget(next(iter(self._order)))

    def clear(self) -> None:
        self._groups.clear()
        self._order.clear()

    def forget(self, key: str) -> None:
        """Drop an entry, e.g. one whose answer the store no longer has."""
        context_key = self._order.pop(key, None)
        if context_key is None:
            return
        group = self._groups[context_key]
        group.remove(key)
        if not group.keys:
            del self._groups[context_key]
