"""Where to set `cache.semantic_threshold`: hit rate on rewordings, false hits on near misses.

Each pair below is a question a user might ask again and a second question. For rewordings
the cached answer is right; for near misses (same words, another question) serving it would be
wrong. Prints, per threshold, the share of rewordings served (hit rate) and of near misses
served (false-hit rate), using the embedder the gateway would use (`rag.embedding_*`).

    .venv/bin/python benchmarks/semantic_cache_threshold.py
"""

from __future__ import annotations

import numpy as np

from qwenstack.rag.embeddings import make_embedder
from qwenstack.settings import RagSettings

REWORDINGS = [
    ("What is the capital of France?", "What's the capital city of France?"),
    ("What is the capital of France?", "Which city is France's capital?"),
    ("How do I reset my password?", "How can I reset my password?"),
    ("How do I reset my password?", "I forgot my password, how do I reset it?"),
    ("Explain PagedAttention in vLLM", "What is PagedAttention in vLLM?"),
    ("Summarise the Q3 sales report", "Summarize the Q3 sales report"),
    ("How many vacation days do employees get?", "How many days of annual leave do employees get?"),
    ("What is the VPN address for remote work?", "Which VPN address do I use to work remotely?"),
    ("Translate 'good morning' into French", "How do you say 'good morning' in French?"),
    ("What are the office opening hours?", "When is the office open?"),
    ("法国的首都是哪里？", "法国首都是哪个城市？"),
    ("如何重置密码？", "怎么重置我的密码？"),
]
NEAR_MISSES = [
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("How do I reset my password?", "How do I reset my router?"),
    ("What is 2+2?", "What is 2+3?"),
    ("Write a poem about the sea", "Write a poem about the mountains"),
    ("Summarise the Q3 sales report", "Summarise the Q4 sales report"),
    ("How many vacation days do employees get?", "How many sick days do employees get?"),
    ("Is the office open on Saturday?", "Is the office open on Sunday?"),
    ("Translate 'good morning' into French", "Translate 'good morning' into German"),
    ("法国的首都是哪里？", "德国的首都是哪里？"),
    ("如何重置密码？", "如何重置路由器？"),
]
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.95)


def similarities(embedder, pairs: list[tuple[str, str]]) -> np.ndarray:
    vectors = np.asarray(embedder.embed([text for pair in pairs for text in pair]))
    return np.einsum("ij,ij->i", vectors[0::2], vectors[1::2])


def main() -> None:
    settings = RagSettings()
    embedder = make_embedder(settings)
    same, different = similarities(embedder, REWORDINGS), similarities(embedder, NEAR_MISSES)
    print(f"embedder {settings.embedding_model}: {len(same)} rewordings, "
          f"{len(different)} near misses")
    print("threshold  hit rate  false-hit rate")
    for threshold in THRESHOLDS:
        hit_rate, false_hit_rate = np.mean(same >= threshold), np.mean(different >= threshold)
        print(f"{threshold:9.2f}  {hit_rate:8.0%}  {false_hit_rate:14.0%}")
    for (a, b), value in zip(NEAR_MISSES, different, strict=True):
        print(f"  near miss {value:.3f}  {a} / {b}")


if __name__ == "__main__":
    main()
