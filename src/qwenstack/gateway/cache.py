"""The answer cache: an exact-match cache of engine answers, in front of the engines.

What it serves. Only answers that the engine would give again: `temperature` 0 (greedy) or an
explicit `seed`. A request without `temperature` samples at the model's default (Qwen3's
generation_config says 0.7, vLLM's own default is 1.0), so it is not cached. A caller with
`cache_all` may also be served cached sampled answers.

Who sees an entry. The key is a sha256 over the canonical JSON of the route, the whole request
body except what does not change the answer (`user`, `request_id`, `priority`,
`stream_options.include_usage`), and the caller's name, so one caller never sees another's
answers unless `cache.shared_across_callers` is on.

How it is kept. As the engine's own bytes: the JSON answer of a plain request, the SSE events
of a streamed one (captured while relaying them, with the usage event the gateway always asks
for). `stream` is part of the key, so each form is replayed exactly as the engine sent it: a
streamed hit gets the engine's chunks (same token boundaries, the usage event only when
`stream_options.include_usage` asked for it); the cost is that a plain and a streamed request
for the same prompt are two entries. A hit gets a fresh `id` in vLLM's form (`chatcmpl-` or
`cmpl-` and the request id), and its token usage counts like an engine answer's.

Controls. `cache-control: no-cache` skips the lookup but stores the fresh answer (a refresh);
`cache-control: no-store` skips both. Answers carry `x-qwenstack-cache: hit|miss|bypass`.

With `cache.semantic` on, an exact miss of a chat request may still be served the answer of an
earlier question that means the same (see semantic_cache.py); such a hit also carries
`x-qwenstack-cache-similarity`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import numpy as np
import orjson
from prometheus_client import Counter
from starlette.responses import Response

from qwenstack.callers import Caller
from qwenstack.gateway import tool_calls
from qwenstack.gateway.cache_store import Store, open_store
from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.relay import SSE_HEADERS, take_usage
from qwenstack.gateway.semantic_cache import SEMANTIC_HITS, SemanticIndex, split_question
from qwenstack.settings import CacheSettings, RagSettings

log = logging.getLogger(__name__)

CACHE_HEADER = b"x-qwenstack-cache"
SIMILARITY_HEADER = b"x-qwenstack-cache-similarity"
_LOOKUPS = Counter(
    "qwenstack_cache_lookups", "Answer-cache lookups by result: hit, miss or bypass.", ["result"]
)
# Bound once: the series exist (at 0) from the start, and counting skips the label lookup.
LOOKUPS = {result: _LOOKUPS.labels(result) for result in ("hit", "miss", "bypass")}
# Request fields that leave the answer as it is: they are left out of the key.
NOT_IN_KEY = frozenset({"stream", "user", "request_id", "priority"})
# Bumped when what an entry holds changes, so old entries (in Redis) are never replayed.
ENTRY_FORMAT = 1
STREAM_END = b"data: [DONE]\n\n"


def cache_key(route: str, payload: dict[str, Any], caller: Caller | None) -> str:
    """The entry's name: the request as it bears on the answer, and whose it is (None: shared)."""
    request = {k: v for k, v in payload.items() if k not in NOT_IN_KEY}
    options = request.pop("stream_options", None)
    if isinstance(options, dict):
        # The usage event is always kept and dropped on replay as asked; other options
        # (continuous_usage_stats) change the events, so they stay in the key.
        options = {k: v for k, v in options.items() if k != "include_usage"}
    if options:
        request["stream_options"] = options
    canonical = orjson.dumps(
        [ENTRY_FORMAT, route, bool(payload.get("stream")), caller and caller.name, request],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def _directives(cache_control: str | None) -> set[str]:
    if not cache_control:
        return set()
    return {part.strip().lower() for part in cache_control.split(",")}


class AnswerCache:
    def __init__(
        self, settings: CacheSettings, store: Store | None, semantic: SemanticIndex | None = None
    ) -> None:
        self.settings = settings
        self.store = store  # None: the cache is off
        self.semantic = semantic  # None: exact matches only
        self._writes: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, settings: CacheSettings, rag: RagSettings) -> AnswerCache:
        if not settings.enabled:
            return cls(settings, None)
        semantic = await SemanticIndex.open(settings, rag) if settings.semantic else None
        return cls(settings, await open_store(settings), semantic)

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self.store:
            await self.store.close()

    async def purge(self) -> int:
        if self.semantic:
            self.semantic.clear()
        return await self.store.purge() if self.store else 0

    async def lookup(self, exchange: Exchange, cache_control: str | None) -> Response | None:
        """The cached answer, or None after arranging for the engine's answer to be stored."""
        if self.store is None:
            return None
        directives = _directives(cache_control)
        caller = exchange.caller
        request = exchange.request
        if "no-store" in directives or not (caller.cache_all or request.deterministic):
            self._count(exchange, "bypass")
            return None
        owner = None if self.settings.shared_across_callers else caller
        key = cache_key(request.route, request.as_dict(), owner)
        if "no-cache" not in directives:
            response = await self._serve(exchange, key)
            if response is not None:
                return response
        similar = None  # (context key, question vector), to index the answer under
        if self.semantic and (question := split_question(request)):
            context_key = cache_key(exchange.route, question.context, owner)
            similar = context_key, await self.semantic.embed(question.text)
            match = self.semantic.nearest(*similar) if "no-cache" not in directives else None
            if match and (response := await self._serve(exchange, match.key)):
                SEMANTIC_HITS.inc()
                response.raw_headers.append((SIMILARITY_HEADER, f"{match.similarity:.3f}".encode()))
                return response
            if match:  # the store dropped that answer (TTL, eviction)
                self.semantic.forget(match.key)
        self._count(exchange, "miss" if "no-cache" not in directives else "bypass")
        answer = bytearray()  # the engine's answer, as relayed
        exchange.answer.tap(answer.extend)
        exchange.on_finish(lambda finished: self._store_answer(key, finished, answer, similar))
        return None

    async def _serve(self, exchange: Exchange, key: str) -> Response | None:
        """The entry under `key` replayed as this exchange's answer, counted as a hit."""
        assert self.store is not None
        value = await self.store.get(key)
        if value is None:
            return None
        try:
            response = self._replay(exchange, value)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("Answer cache: entry %s is unreadable; asking the engine.", key)
            return None
        self._count(exchange, "hit")
        return response

    def _count(self, exchange: Exchange, result: str) -> None:
        exchange.cache = result
        LOOKUPS[result].inc()

    async def _store_answer(
        self, key: str, exchange: Exchange, answer: bytearray,
        similar: tuple[str, np.ndarray] | None,
    ) -> None:
        value = bytes(answer)
        if exchange.status != 200 or not value or len(value) > self.settings.max_entry_bytes:
            return
        # A stream that ended early or reported an error as an event (vLLM does, mid-stream).
        if exchange.stream and (not value.endswith(STREAM_END) or b'data: {"error"' in value):
            return
        # Written after the answer is out: the client never waits for the store.
        write = asyncio.create_task(self._put(key, value, similar))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _put(self, key: str, value: bytes, similar: tuple[str, np.ndarray] | None) -> None:
        assert self.store is not None
        await self.store.put(key, value)
        if similar and self.semantic:
            context_key, vector = similar
            self.semantic.add(context_key, vector, key)

    def _replay(self, exchange: Exchange, value: bytes) -> Response:
        exchange.tool_calls = tool_calls.count(value)
        if exchange.stream:
            first = orjson.loads(value[value.index(b"{"):value.index(b"\n")])
            exchange.model = first.get("model", exchange.model)
            old_id = first["id"].encode()
            new_id = _fresh_id(first["id"], exchange.request_id).encode()
            events = value.replace(b'"id":"' + old_id + b'"', b'"id":"' + new_id + b'"')
            events = take_usage(events, exchange)
            response = Response(events)
            response.raw_headers = [*SSE_HEADERS, *response.raw_headers]
        else:
            answer = orjson.loads(value)
            exchange.model = answer.get("model", exchange.model)
            exchange.record_usage(answer)
            answer["id"] = _fresh_id(answer["id"], exchange.request_id)
            answer["created"] = int(time.time())
            response = Response(orjson.dumps(answer), media_type="application/json")
        exchange.first_chunk_s = time.perf_counter() - exchange.started_s
        return response


def _fresh_id(old_id: str, request_id: str) -> str:
    """vLLM names an answer by its kind and the request id the gateway passed on."""
    return f"{old_id.split('-', 1)[0]}-{request_id}"


def label(response: Response, exchange: Exchange) -> None:
    """Tell the client how the cache took part in its answer."""
    if exchange.cache != "off":
        response.raw_headers.append((CACHE_HEADER, exchange.cache.encode()))
