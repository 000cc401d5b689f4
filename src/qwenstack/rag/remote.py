"""Models the knowledge bases use over HTTP: an embedding model and a reranker served by vLLM
(or any server of the same API), at a fixed URL or among the engines of this stack.

"The engines" are the gateway's own pool inside the gateway (the replicas serving the model, up
and least loaded first, read at each call), and elsewhere (the `kb` commands) the configured
engines whose /v1/models lists the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from qwenstack.rag import RagError

if TYPE_CHECKING:
    from qwenstack.rag.store import Hit

log = logging.getLogger(__name__)

# The base URLs of the engines serving a model, best first; [] when none can take a request now.
EngineUrls = Callable[[str], list[str]]
TIMEOUT_S = 120


def probed_engines(urls: Sequence[str]) -> EngineUrls:
    """The engines among `urls` that list the model in their /v1/models, asked when a model is
    first wanted (outside the gateway, which knows its engines)."""
    serving: dict[str, list[str]] = {}

    def lookup(model: str) -> list[str]:
        if model not in serving:
            serving[model] = [url for url in urls if model in _served(url)]
        return serving[model]

    return lookup


def _served(url: str) -> set[str]:
    try:
        answer = httpx.get(f"{url}/v1/models", timeout=5)
        answer.raise_for_status()
        return {card["id"] for card in answer.json()["data"]}
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        log.warning("Engine %s does not say what it serves: %r", url, exc)
        return set()


class Endpoint:
    """POSTs to a model's server: one base URL, or the engines serving it, tried in order while
    they refuse connections."""

    def __init__(
        self, base: str | EngineUrls, model: str, api_key: str | None, what: str
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=TIMEOUT_S)
        self.base = base
        self.model = model
        self.what = what  # "embedding" or "rerank", for errors

    def post(self, path: str, body: dict[str, Any]) -> Any:
        bases = [self.base.rstrip("/")] if isinstance(self.base, str) else self.base(self.model)
        if not bases:
            raise RagError(f"No engine serving the {self.what} model {self.model!r} is ready.",
                           status=503, code=f"{self.what}_unavailable", retry_after_s=5)
        for position, base in enumerate(bases):
            try:
                response = self.client.post(base + path, json={"model": self.model, **body})
                response.raise_for_status()
                return response.json()
            except httpx.ConnectError:
                if position < len(bases) - 1:
                    continue
                raise self.failure(f"{base} refused the connection") from None
            except httpx.HTTPStatusError as exc:
                raise self.failure(f"{base} answered {exc.response.status_code}: "
                                   f"{exc.response.text[:300]}") from None
            except (httpx.HTTPError, ValueError) as exc:
                raise self.failure(f"{base}: {exc}") from None
        raise AssertionError("unreachable")

    def failure(self, why: str) -> RagError:
        return RagError(f"The {self.what} model {self.model!r} failed: {why}", status=502,
                        code=f"{self.what}_error")


class RemoteEmbedder:
    """Batches to `/v1/embeddings`; the vectors are used as the endpoint returns them."""

    def __init__(
        self, base: str | EngineUrls, model: str, api_key: str | None, batch_size: int
    ) -> None:
        self.endpoint = Endpoint(base, model, api_key, "embedding")
        self.name = model
        self.batch_size = batch_size
        self.dimension = len(self.embed(["dimension probe"])[0])

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            # vLLM refuses an empty prompt (a local model embeds it): one space stands for it.
            batch = [text or " " for text in texts[start:start + self.batch_size]]
            answer = self.endpoint.post("/v1/embeddings", {"input": batch})
            try:
                data = sorted(answer["data"], key=lambda item: item["index"])
                vectors += [item["embedding"] for item in data]
            except (KeyError, TypeError) as exc:
                raise self.endpoint.failure(f"unreadable answer ({exc!r})") from None
        return vectors


class RemoteReranker:
    """Reorders retrieved chunks by a reranker's relevance to the query: one `/v1/rerank`
    request (vLLM's, Cohere's and Jina's shape) for all of them."""

    def __init__(self, base: str | EngineUrls, model: str, api_key: str | None) -> None:
        self.endpoint = Endpoint(base, model, api_key, "rerank")

    def __call__(self, query: str, hits: list[Hit]) -> list[Hit]:
        if not hits:
            return hits
        answer = self.endpoint.post(
            "/v1/rerank", {"query": query, "documents": [hit.text for hit in hits]})
        try:
            ranked = sorted(answer["results"], key=lambda r: -r["relevance_score"])
            order = [int(result["index"]) for result in ranked]
        except (KeyError, TypeError, ValueError) as exc:
            raise self.endpoint.failure(f"unreadable answer ({exc!r})") from None
        if sorted(order) != list(range(len(hits))):
            raise self.endpoint.failure("the answer does not rank every document once")
        return [dataclasses.replace(hits[i], score=float(r["relevance_score"]))
                for i, r in zip(order, ranked, strict=True)]
