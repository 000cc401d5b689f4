"""Chunks in Milvus: one collection per knowledge base, dense vectors plus BM25.

The same pymilvus `MilvusClient` code serves Milvus Lite (a local file, the default) and a
Milvus server (by URI). BM25 is Milvus's own function over the `text` field with the jieba
analyzer, so Chinese is cut into words on the server (Milvus Lite 3.x implements the same
analyzer in Python). A search here is one leg, dense or BM25; fusion.py fuses them.

Filters use integers only (file ids and versions from the metadata database): file names
never go into a filter expression, so no quoting or injection to get wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jieba
from pymilvus import (
    DataType,
    Function,
    FunctionType,
    MilvusClient,
    MilvusException,
)

# Milvus Lite serves pymilvus over an in-process gRPC server, which logs a traceback for each
# optional call it lacks (AllocTimestamp) although the client goes on without it.
logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
# jieba (Milvus Lite's Chinese analyzer) announces its dictionary load at debug level.
jieba.setLogLevel(logging.WARNING)

Mode = Literal["dense", "bm25", "hybrid"]
Leg = Literal["dense", "bm25"]
# Words in most chunks: jieba keeps punctuation as tokens, and each query term is a walk over its
# posting list (in Python, in Milvus Lite), so "，" or "的" cost a step per chunk while their IDF
# is near zero (benchmarks/RESULTS.md, "Knowledge-base query latency"). Lowercase first, as
# Milvus Lite's jieba does by itself and a server's does not; so not "it", which would drop "IT".
# A base keeps the analyzer it was made with (Milvus stores it in the collection's schema).
STOP_WORDS = [
    *"，。、；：？！“”‘’（）《》【】「」『』〈〉…—·～•＂＃＄％＆＇＊＋－．／＜＝＞＠［＼］＾＿｀｛｜｝",
    *",.;:?!'\"()[]{}<>-_/\\|*&^%$#@`~+=",
    "的", "了", "是", "在", "和", "有", "也", "就", "都", "而", "及", "与", "或", "这", "那",
    "之", "其", "对", "等", "被", "把", "从", "到", "为", "以", "于", "着", "又", "还", "并",
    "但", "个", "我", "你", "他", "她", "它", "们", "我们", "你们", "他们", "吗", "呢", "吧",
    "啊", "么", "一个",
    "a", "an", "the", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "is",
    "are", "was", "were", "be", "been", "and", "or", "but", "if", "than", "that", "this",
    "these", "those", "its", "into", "there", "their", "they", "them", "he", "she", "his",
    "her", "we", "our", "you", "your", "i", "me", "my",
]
ANALYZER = {"tokenizer": "jieba",
            "filter": ["lowercase", {"type": "stop", "stop_words": STOP_WORDS}]}
OUTPUT_FIELDS = ["file_id", "source", "chunk", "text", "page", "heading", "start", "end"]
MAX_TEXT_BYTES = 65535  # Milvus's VARCHAR limit
NO_PAGE = 0  # Milvus has no NULL for these fields here


@dataclass(frozen=True)
class StoredChunk:
    file_id: int
    version: int
    source: str  # the file name
    chunk: int  # index within the file
    text: str
    page: int | None
    heading: str | None
    start: int
    end: int
    vector: list[float]


@dataclass(frozen=True)
class Hit:
    file_id: int
    source: str
    chunk: int
    text: str
    page: int | None
    heading: str | None
    start: int
    end: int
    score: float  # higher is better: cosine, BM25 or fused; comparable only within one search

    def citation(self, knowledge_base: str) -> dict[str, Any]:
        return {"knowledge_base": knowledge_base, "source": self.source, "page": self.page,
                "heading": self.heading, "chunk": self.chunk, "start": self.start, "end": self.end,
                "text": self.text}


def collection_name(kb_id: int) -> str:
    return f"qwenstack_kb_{kb_id}"


class MilvusStore:
    def __init__(self, uri: str, token: str | None = None) -> None:
        self.uri = uri
        self.lite = uri.endswith(".db")  # pymilvus's own rule for a Milvus Lite file
        if self.lite:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = MilvusClient(uri=uri, token=token or "")
        # Milvus Lite runs in this process; one call at a time keeps its file consistent.
        self.lock = threading.Lock()
        self.loaded: set[str] = set()

    def _loaded(self, kb_id: int) -> str:
        """The collection's name, loaded for search, query and delete (a collection made in an
        earlier process is on disk only). Call with the lock held."""
        name = collection_name(kb_id)
        if name not in self.loaded:
            self.client.load_collection(name)
            self.loaded.add(name)
        return name

    def close(self) -> None:
        self.client.close()
        if self.lite:
            # Milvus Lite serves its file from this process until released: release it now, so
            # the file is free for another process (otherwise only at interpreter exit).
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)

    def create(self, kb_id: int, dimension: int) -> None:
        name = collection_name(kb_id)
        with self.lock:
            if self.client.has_collection(name):
                return
            schema = self.client.create_schema(auto_id=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("file_id", DataType.INT64)
            schema.add_field("version", DataType.INT64)
            schema.add_field("source", DataType.VARCHAR, max_length=1024)
            schema.add_field("chunk", DataType.INT64)
            schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES,
                             enable_analyzer=True, analyzer_params=ANALYZER)
            schema.add_field("page", DataType.INT64)
            schema.add_field("heading", DataType.VARCHAR, max_length=1024)
            schema.add_field("start", DataType.INT64)
            schema.add_field("end", DataType.INT64)
            schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dimension)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(
                name="bm25", function_type=FunctionType.BM25,
                input_field_names=["text"], output_field_names=["sparse"],
            ))
            index = self.client.prepare_index_params()
            index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            self.client.create_collection(name, schema=schema, index_params=index)
            self.client.load_collection(name)
            self.loaded.add(name)

    def drop(self, kb_id: int) -> None:
        with self.lock:
            self.client.drop_collection(collection_name(kb_id))
            self.loaded.discard(collection_name(kb_id))

    def insert(self, kb_id: int, chunks: Sequence[StoredChunk]) -> None:
        rows = [{
            "id": f"{c.file_id}-{c.version}-{c.chunk}",
            "file_id": c.file_id, "version": c.version, "source": _clip(c.source, 1024),
            "chunk": c.chunk, "text": _clip(c.text, MAX_TEXT_BYTES), "page": c.page or NO_PAGE,
            "heading": _clip(c.heading or "", 1024), "start": c.start, "end": c.end,
            "dense": c.vector,
        } for c in chunks]
        with self.lock:
            self.client.insert(collection_name(kb_id), rows)

    def seal(self, kb_id: int) -> None:
        """Make what was just inserted searchable through indexes. Milvus Lite keeps inserted
        rows in an in-memory table until 128 MiB of them, and a BM25 search there rebuilds an
        inverted index over every row of it, each query; flushing writes them to a segment
        whose indexes are built once. A Milvus server seals and indexes segments by itself
        (and rate-limits flush calls), so it is left alone."""
        if self.lite:
            with self.lock:
                self.client.flush(self._loaded(kb_id))

    def delete_version(self, kb_id: int, file_id: int, version: int) -> None:
        self._delete(kb_id, f"file_id == {int(file_id)} and version == {int(version)}")

    def delete_other_versions(self, kb_id: int, file_id: int, version: int) -> None:
        self._delete(kb_id, f"file_id == {int(file_id)} and version != {int(version)}")

    def delete_file(self, kb_id: int, file_id: int) -> None:
        self._delete(kb_id, f"file_id == {int(file_id)}")

    def _delete(self, kb_id: int, expression: str) -> None:
        with self.lock:
            self.client.delete(self._loaded(kb_id), filter=expression)

    def count(self, kb_id: int, file_id: int | None = None) -> int:
        expression = f"file_id == {int(file_id)}" if file_id is not None else "file_id >= 0"
        with self.lock:
            rows = self.client.query(self._loaded(kb_id), filter=expression, output_fields=["id"])
        return len(rows)

    def search(
        self, kb_id: int, leg: Leg, query: str, vector: list[float] | None, limit: int
    ) -> list[Hit]:
        """One leg's best chunks: by the query's vector (dense) or its words (BM25). Hybrid
        search fuses two legs (fusion.py); Milvus's own rankers weigh only by rank or by
        arctan-squashed scores."""
        with self.lock:
            results = self.client.search(
                self._loaded(kb_id), data=[vector if leg == "dense" else query],
                anns_field="dense" if leg == "dense" else "sparse",
                search_params={"metric_type": "COSINE" if leg == "dense" else "BM25"},
                limit=limit, output_fields=OUTPUT_FIELDS,
            )
        return [_hit(result) for result in results[0]]


def _hit(result: dict[str, Any]) -> Hit:
    entity = result["entity"]
    return Hit(
        file_id=entity["file_id"], source=entity["source"], chunk=entity["chunk"],
        text=entity["text"], page=entity["page"] or None, heading=entity["heading"] or None,
        start=entity["start"], end=entity["end"],
        # Milvus Lite gives BM25 as a negated distance, a Milvus server as the score itself.
        score=abs(float(result["distance"])),
    )


def _clip(text: str, max_bytes: int) -> str:
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode(errors="ignore")


__all__ = ["Hit", "Leg", "MilvusException", "MilvusStore", "Mode", "StoredChunk"]
