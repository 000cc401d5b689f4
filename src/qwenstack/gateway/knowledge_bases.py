"""Knowledge bases over HTTP, and the gateway's own embedder behind /v1/embeddings.

Routes: /v1/knowledge_bases (list, create), /v1/knowledge_bases/{name} (get, delete),
.../{name}/files (list; multipart upload), .../{name}/files/{file} (delete), .../{name}/query;
and /v1/embeddings for a model no engine serves (pooling.py routes it here). They need the
`rag` extra; without it they answer 501. Grounded chat, which retrieves from them for a chat
request, is grounding.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from qwenstack.callers import ANONYMOUS, Caller
from qwenstack.errors import SetupError
from qwenstack.gateway import metrics
from qwenstack.gateway.auth import check_model
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.exchange import Exchange, finished_on_error
from qwenstack.gateway.protocol import (
    EMBEDDINGS,
    KNOWLEDGE_QUERY,
    KNOWLEDGE_UPLOAD,
    InferenceRequest,
    Route,
)
from qwenstack.gateway.validation import check_texts
from qwenstack.settings import Settings
from qwenstack.settings.rag import MAX_EMBEDDING_INPUTS

if TYPE_CHECKING:
    from qwenstack.gateway.resources import Resources
    from qwenstack.rag.remote import EngineUrls
    from qwenstack.rag.service import KnowledgeService

log = logging.getLogger(__name__)

MAX_UPLOAD_FILES = 64

router = APIRouter(prefix="/v1")


class Knowledge:
    """The knowledge service, opened on first use: gateways that serve no knowledge base never
    import torch or hold the Milvus Lite file (which one process at a time may open)."""

    def __init__(self, settings: Settings, engines: EngineUrls) -> None:
        self.settings = settings
        self.engines = engines  # the replicas serving a model (the gateway's pool)
        self._service: KnowledgeService | None = None
        self._lock = threading.Lock()

    def service(self) -> KnowledgeService:
        """Blocks (call from a worker thread); a failure is retried on the next request."""
        with self._lock:
            if self._service is None:
                try:
                    from qwenstack.rag.service import open_service
                except ImportError as exc:
                    raise GatewayError(
                        501, f"Knowledge bases need the `rag` extra (pip install "
                        f"'qwenstack[rag]'): {exc}", code="knowledge_bases_unavailable",
                    ) from None
                try:
                    self._service = open_service(self.settings, engines=self.engines)
                except SetupError as exc:
                    log.error("Knowledge bases are unavailable: %s", exc)
                    raise GatewayError(503, f"Knowledge bases are unavailable: {exc}",
                                       code="knowledge_bases_unavailable",
                                       retry_after_s=5) from None
            return self._service

    def close(self) -> None:
        if self._service is not None:
            self._service.close()

    async def open(self) -> KnowledgeService:
        """The service, opened in a worker thread on first use."""
        return await asyncio.to_thread(self.service)


async def _service(request: Request) -> KnowledgeService:
    knowledge: Knowledge = request.app.state.resources.knowledge
    return await knowledge.open()


def _caller(request: Request) -> Caller:
    return getattr(request.state, "caller", ANONYMOUS)


async def call(function: Any, *args: Any) -> Any:
    """A blocking service call in a worker thread, its RagError turned into an OpenAI error."""
    from qwenstack.rag import RagError
    from qwenstack.rag.store import MilvusException

    try:
        return await asyncio.to_thread(function, *args)
    except RagError as exc:
        raise GatewayError(exc.status, str(exc), code=exc.code, param=exc.param,
                           retry_after_s=exc.retry_after_s) from None
    except MilvusException as exc:
        log.error("Milvus failed: %s", exc)
        raise GatewayError(503, f"The vector store failed: {exc.message}",
                           code="vector_store_unavailable", retry_after_s=5) from None


class NewKnowledgeBase(BaseModel):
    name: str
    readers: list[str] = Field(default_factory=list, description="Key names that may read it.")
    writers: list[str] = Field(default_factory=list, description="Key names that may also ingest.")


class Query(BaseModel):
    query: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, le=100)
    mode: Literal["dense", "bm25", "hybrid"] | None = None


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float"] = "float"

    @field_validator("input", mode="before")
    @classmethod
    def _one_error_for_a_list(cls, value: Any) -> Any:
        """A list is judged whole before pydantic reads its items: three million wrong ones
        would be three million errors built, a minute of the event loop. (How many it may hold,
        rag.max_embedding_inputs, is checked once the request is accounted.)"""
        if isinstance(value, list) and (len(value) > MAX_EMBEDDING_INPUTS or not all(
                isinstance(item, str) for item in value)):
            raise ValueError(f"must be a string or a list of at most {MAX_EMBEDDING_INPUTS} "
                             "strings")
        return value


@router.get("/knowledge_bases")
async def list_knowledge_bases(request: Request) -> dict[str, Any]:
    service = await _service(request)
    return {"object": "list", "data": await call(service.list, _caller(request))}


@router.post("/knowledge_bases", status_code=201)
async def create_knowledge_base(body: NewKnowledgeBase, request: Request) -> dict[str, Any]:
    service = await _service(request)
    caller = _caller(request)
    owner = None if caller is ANONYMOUS else caller.name
    return await call(service.create, body.name, owner, caller, body.readers, body.writers)


@router.get("/knowledge_bases/{name}")
async def get_knowledge_base(name: str, request: Request) -> dict[str, Any]:
    service = await _service(request)
    return await call(service.get, name, _caller(request))


@router.delete("/knowledge_bases/{name}")
async def delete_knowledge_base(name: str, request: Request) -> dict[str, Any]:
    service = await _service(request)
    await call(service.delete, name, _caller(request))
    return {"object": "knowledge_base.deleted", "name": name, "deleted": True}


@router.get("/knowledge_bases/{name}/files")
async def list_files(name: str, request: Request) -> dict[str, Any]:
    service = await _service(request)
    return {"object": "list", "data": await call(service.files, name, _caller(request))}


@router.post("/knowledge_bases/{name}/files")
async def upload_files(name: str, request: Request, response: Response) -> dict[str, Any]:
    """multipart/form-data with one or more `file` parts, rag.max_upload_bytes in all (the
    whole request: middleware.BodyLimit refuses more as it arrives). Accounted as a request
    (usage row, metrics), and its budgets taken before a byte of the files is read."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise GatewayError(400, "Upload files as multipart/form-data, in `file` parts.",
                           code="invalid_upload")
    async with accounted(request, KNOWLEDGE_UPLOAD, {}) as (exchange, held):
        await reserve(exchange, held, response, count_tokens=None)
        try:
            form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=MAX_UPLOAD_FILES)
        except (HTTPException, MultiPartException) as exc:  # malformed, or too many parts
            detail = exc.detail if isinstance(exc, HTTPException) else exc.message
            raise GatewayError(400, f"The upload cannot be read: {detail}",
                               code="invalid_upload") from None
        try:
            uploads = [part for part in form.getlist("file") if isinstance(part, UploadFile)]
            if not uploads:
                raise GatewayError(400, "No `file` part in the upload.", code="invalid_upload",
                                   param="file")
            files = [(upload.filename or "", await upload.read()) for upload in uploads]
        finally:
            await form.close()
        # Opened after the body is read: a first use can take longer than
        # gateway.body_timeout_s.
        service = await _service(request)
        results = await call(service.ingest, name, files, exchange.caller)
    return {"object": "list", "data": [result.as_json() for result in results]}


@router.delete("/knowledge_bases/{name}/files/{file_name}")
async def delete_file(name: str, file_name: str, request: Request) -> dict[str, Any]:
    service = await _service(request)
    await call(service.remove_file, name, file_name, _caller(request))
    return {"object": "file.deleted", "name": file_name, "deleted": True}


@contextlib.asynccontextmanager
async def accounted(
    request: Request, route: Route, body: dict[str, Any]
) -> AsyncIterator[tuple[Exchange, Resources]]:
    """A request the gateway answers itself, accounted as inference is: an Exchange whose
    finishers write its usage row and metrics (and settle its limits) once, however it ends."""
    held: Resources = request.app.state.resources
    exchange = Exchange(request.state.request_id, InferenceRequest(route, body),
                        caller=_caller(request))
    request.state.exchange = exchange  # the request's log line names its model and tokens
    metrics.track(exchange)
    exchange.on_finish(held.usage.finisher)
    async with finished_on_error(exchange):
        yield exchange, held
    await exchange.finish(200)


async def reserve_texts(
    exchange: Exchange, held: Resources, service: KnowledgeService, texts: Sequence[str],
    response: Response,
) -> None:
    """Take the caller's budgets for embedding `texts` (429 past them), counting their tokens
    only once the request rate allows; the count is the exchange's prompt tokens."""
    tokens: list[int] = []  # counted at most once, by the limiter or after it

    async def count() -> int:
        if not tokens:
            # The chat model's tokens: one measure for every route a budget covers.
            tokens.append(sum(await asyncio.to_thread(service.counter.count, texts)))
        return tokens[0]

    await reserve(exchange, held, response, count)
    exchange.prompt_tokens = await count()


async def reserve(
    exchange: Exchange, held: Resources, response: Response,
    count_tokens: Callable[[], Awaitable[int]] | None,
) -> None:
    """Take the caller's budgets (429 past them); without `count_tokens`, the request and the
    one token every request costs."""
    headers = await held.limiter.reserve(exchange, count_tokens or _no_tokens, None)
    response.headers.update({name.decode(): value.decode() for name, value in headers})


async def _no_tokens() -> int:
    return 0


@router.post("/knowledge_bases/{name}/query")
async def query(name: str, body: Query, request: Request, response: Response) -> dict[str, Any]:
    async with accounted(request, KNOWLEDGE_QUERY, body.model_dump()) as (exchange, held):
        check_texts([body.query], held.settings.rag, "query")
        service = await _service(request)
        await reserve_texts(exchange, held, service, [body.query], response)
        hits = await call(service.search, [name], body.query, exchange.caller,
                          body.top_k, body.mode)
    data = [{**item.citation(), "score": item.hit.score} for item in hits]
    return {"object": "list", "data": data}


async def embed_in_process(
    raw: bytes, parsed: dict[str, Any] | None, request: Request, response: Response
) -> dict[str, Any]:
    """/v1/embeddings answered by the gateway's own embedder (rag.embedding_*), for a request
    that names no model some engine serves (pooling.embeddings decides, and passes the body
    `parsed` when it is a JSON object)."""
    try:
        body = (EmbeddingRequest.model_validate(parsed) if parsed is not None
                else EmbeddingRequest.model_validate_json(raw))
    except ValidationError as exc:
        # As FastAPI reports a body's errors, located under `body` (app.invalid_fields).
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]) from None
    texts = [body.input] if isinstance(body.input, str) else body.input
    async with accounted(request, EMBEDDINGS, {"model": body.model, "input": texts}) as (
        exchange, held
    ):
        if not texts or not all(texts):
            raise GatewayError(400, "`input` must be a non-empty string or list of them.",
                               param="input", code="invalid_input")
        check_texts(texts, held.settings.rag, "input")
        # Named before anything loads: an unknown name costs no model load.
        name = held.settings.rag.embedding_model
        if body.model not in (None, name):
            # Not the engines' models: this key may not be allowed to know them (/v1/models
            # lists the ones it may use).
            raise GatewayError(404, f"No engine serves {body.model!r} and the gateway's own "
                               f"embedding model is {name!r}.", param="model",
                               code="model_not_found")
        service = await _service(request)
        model = await call(lambda: service.embedder)
        exchange.model = model.name
        check_model(exchange.caller, model.name)
        await reserve_texts(exchange, held, service, texts, response)
        vectors = await call(model.embed, texts)
    tokens = exchange.prompt_tokens
    return {
        "object": "list", "model": model.name,
        "data": [{"object": "embedding", "index": i, "embedding": v}
                 for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
