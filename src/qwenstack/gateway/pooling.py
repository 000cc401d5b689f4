"""Pooling routes: embeddings, rerank and score, answered by engines started with vLLM's
`--runner pooling` (`--convert embed` for an embedding model, `classify` for a reranker).

They take an inference request's path (inference.serve): authentication and the key's model
scope, bounds on what the engine encodes (validation.check_pooling: texts or documents per
request, characters in all), the token reservation (the engine's /tokenize counts the texts),
admission, routing among the replicas serving the model, a usage row with the tokens vLLM
reports, metrics by route. An embedding request naming a model no engine serves (or none) is
answered by the gateway's own embedder (rag.embedding_*), as before engines could embed.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from qwenstack.gateway import inference, knowledge_bases
from qwenstack.gateway.protocol import EMBEDDINGS, RERANK, RERANK_UNVERSIONED, SCORE
from qwenstack.gateway.resources import resources

router = APIRouter()


@router.post(EMBEDDINGS, response_model=None)
async def embeddings(request: Request, response: Response) -> Response | dict[str, Any]:
    raw = await request.body()  # bounded as it arrives, by middleware.BodyLimit
    held, body = resources(request), _json_object(raw)
    named = body.get("model") if body is not None else None
    named = named if isinstance(named, str) else None
    # An alias of a served embedding model is that model (catalogue.py).
    if held.catalogue.aliases.get(named or "", named) in {c["id"] for c in held.pool.model_cards()}:
        return await inference.serve(request, EMBEDDINGS)
    return await knowledge_bases.embed_in_process(raw, body, request, response)


@router.post(RERANK)
async def rerank(request: Request) -> Response:
    """Cohere's and Jina's shape, as vLLM serves it: `query`, `documents`, `top_n`."""
    return await inference.serve(request, RERANK)


@router.post(RERANK_UNVERSIONED)
async def rerank_unversioned(request: Request) -> Response:
    return await inference.serve(request, RERANK_UNVERSIONED)


@router.post(SCORE)
async def score(request: Request) -> Response:
    """vLLM's scores of `queries` against `documents` (one query against each, or pairwise;
    also as `text_1` and `text_2`)."""
    return await inference.serve(request, SCORE)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """The body, if it is a JSON object (anything else is for the parser that answers it to
    judge)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None
