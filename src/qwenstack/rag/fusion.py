"""Fusing rankings: a knowledge base's two legs by score, several knowledge bases by rank.

The dense and BM25 legs of a hybrid search are fused by their scores (relative score fusion, as
Weaviate's hybrid search does it): each leg's scores are min-max normalised over its own
candidates, then weighted, `dense_weight` for the dense leg and the rest for BM25; a chunk only
one leg found gets nothing from the other. Rank fusion (RRF), used before, gives every leg the
same say whatever its scores: with the English MiniLM on Chinese documents, hybrid recall@1 on
CMRC 2018 fell from BM25's 0.964 to 0.583. Fused by score, a weak leg's near-uniform scores move
little: the same questions keep 0.962 up to a dense weight of 0.3 (benchmarks/RESULTS.md).

The weight is a knowledge base's own (`qwenstack kb tune` picks it from questions with known
answers), else `rag.dense_weight`, else what the embedder's languages call for: none for
documents in a script it was not trained on, an even mix otherwise.

Several knowledge bases are merged by rank: their scores come from separate collections.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal, TypeVar

from qwenstack.rag.store import Hit

EmbeddingLanguages = Literal["auto", "english", "multilingual"]
# Embedders trained on English text alone, by their names' telling parts.
ENGLISH_ONLY = re.compile(r"all-minilm|all-mpnet|all-distilroberta|(?:^|[-_/])en(?:[-_.]|$)",
                          re.IGNORECASE)
# Han, kana and hangul: scripts an English-only embedder has no vocabulary for.
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
WORD_CHARACTER = re.compile(r"\w")
EVEN_MIX = 0.5

T = TypeVar("T")


def relative_score_fusion(dense: Sequence[Hit], sparse: Sequence[Hit],
                          dense_weight: float) -> list[Hit]:
    """The legs' chunks, best first by weighted normalised score (ties: BM25's order)."""
    fused: dict[tuple[int, int], tuple[float, Hit]] = {}
    for hits, weight in ((sparse, 1 - dense_weight), (dense, dense_weight)):
        for key, hit, score in _normalised(hits):
            total, first = fused.get(key, (0.0, hit))
            fused[key] = (total + weight * score, first)
    return [hit for _, hit in sorted(fused.values(), key=lambda pair: -pair[0])]


def _normalised(hits: Sequence[Hit]) -> Iterable[tuple[tuple[int, int], Hit, float]]:
    if not hits:
        return
    high, low = max(hit.score for hit in hits), min(hit.score for hit in hits)
    for hit in hits:
        yield (hit.file_id, hit.chunk), hit, (hit.score - low) / (high - low) if high > low else 1.0


def reciprocal_rank_fusion(rankings: Sequence[Sequence[T]], k: int) -> list[T]:
    """Items of several rankings by the sum of 1 / (k + rank) (the same item: the same object)."""
    scores: dict[int, float] = {}
    items: dict[int, T] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[id(item)] = scores.get(id(item), 0.0) + 1 / (k + rank)
            items[id(item)] = item
    return [items[key] for key in sorted(scores, key=scores.__getitem__, reverse=True)]


def covers(languages: EmbeddingLanguages, model: str, texts: Iterable[str]) -> bool:
    """Whether an embedder of `languages` (`auto`: judged from the model's name) knows the
    script of `texts` (a query and the chunks BM25 found for it stand for the documents)."""
    if languages == "auto":
        languages = "english" if ENGLISH_ONLY.search(model) else "multilingual"
    if languages == "multilingual":
        return True
    text = "".join(texts)
    letters = len(WORD_CHARACTER.findall(text))
    return not letters or len(CJK.findall(text)) / letters < 0.3


def default_dense_weight(languages: EmbeddingLanguages, model: str, texts: Iterable[str]) -> float:
    return EVEN_MIX if covers(languages, model, texts) else 0.0
