"""One inference request on its way through the gateway, and how it ended.

The request itself is the `InferenceRequest` view (protocol.py), the one truth of what goes to
the engine. The `Exchange` around it holds what the gateway learns on the way: the caller, the
served model, the replica, timings and token counts. The steps that account for a request
afterwards (limit reconciliation, usage records, metrics, the answer cache) register a
finisher, and `finish` runs them once, whether the request was answered, refused or dropped.
Concerns that add to the engine's answer (the cache's copy, grounded chat's citations) register
`AnswerHooks`, so the relay does not know them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from qwenstack.callers import ANONYMOUS, Caller
from qwenstack.gateway import responses
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.protocol import RESPONSES, InferenceRequest

log = logging.getLogger(__name__)

Finisher = Callable[["Exchange"], Awaitable[None]]

# Status for a request whose client went away before the answer was complete (nginx's code).
CLIENT_CLOSED = 499



@dataclass
class AnswerHooks:
    """What other concerns add to the relay of an engine's answer, without the relay knowing
    them: the answer cache keeps a copy of the bytes, grounded chat adds its citations."""

    taps: list[Callable[[bytes], None]] = field(default_factory=list)  # see the bytes relayed
    trailer: bytes = b""  # SSE events a stream sends just before `data: [DONE]`
    amendments: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)

    def tap(self, see: Callable[[bytes], None]) -> None:
        """`see` gets the engine's answer as it is relayed: a stream's bytes chunk by chunk, a
        whole answer at once (answers from the cache are not relayed)."""
        self.taps.append(see)

    def add_trailer_event(self, event: dict[str, Any]) -> None:
        self.trailer += b"data: " + orjson.dumps(event) + b"\n\n"

    def amend(self, change: Callable[[dict[str, Any]], None]) -> None:
        """`change` edits a whole (not streamed) successful JSON answer before it goes out."""
        self.amendments.append(change)


@dataclass(eq=False)
class Exchange:
    request_id: str
    request: InferenceRequest
    caller: Caller = ANONYMOUS
    started_s: float = field(default_factory=time.perf_counter)
    model: str = "-"  # the served model, once resolved
    # The name the client sent when another model serves it (an alias, a fallback): else None.
    requested_model: str | None = None
    status: int = 0  # 0 until finished
    error_code: str | None = None  # the OpenAI error `code` of a refused or failed request
    first_chunk_s: float | None = None  # seconds from start to the first streamed bytes
    finished_s: float | None = None  # seconds from start to the end of the answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: int = 0  # in the answer (tool_calls.py)
    cache: str = "off"  # "hit", "miss", "bypass" or "off"
    session: str | None = None  # the client's x-session-id header, for session affinity
    replica: int | None = None  # index of the engine replica that answered
    answer: AnswerHooks = field(default_factory=AnswerHooks)
    _finishers: list[Finisher] = field(default_factory=list, repr=False)

    @property
    def route(self) -> str:
        return self.request.route

    @property
    def stream(self) -> bool:
        return self.request.stream

    def record_usage(self, answer: dict[str, Any]) -> None:
        """Keep the token counts an engine's answer (whole, or a streamed event) reports."""
        usage = self.request.token_usage(answer)
        if usage is not None:
            self.prompt_tokens, self.completion_tokens = usage
            if self.route == RESPONSES:  # the answer that reports usage lists every output item
                self.tool_calls = responses.function_calls(answer)

    def on_finish(self, finisher: Finisher) -> None:
        self._finishers.append(finisher)

    async def finish(self, status: int, error_code: str | None = None) -> None:
        """Record the outcome and run the finishers, once; a failing finisher is only logged."""
        if self.status:
            return
        self.status = status
        self.error_code = error_code
        self.finished_s = time.perf_counter() - self.started_s
        for finisher in self._finishers:
            try:
                await finisher(self)
            except Exception:
                log.exception("Finishing request %s failed in %r", self.request_id, finisher)


@contextlib.asynccontextmanager
async def finished_on_error(exchange: Exchange) -> AsyncIterator[Exchange]:
    """Finish the exchange with the status of an error that leaves the block (a refusal's,
    else 500), and let the error go on; a block that succeeds finishes it itself."""
    try:
        yield exchange
    except GatewayError as exc:
        await exchange.finish(exc.status, exc.code)
        raise
    except BaseException:
        await exchange.finish(500, "internal_error")
        raise
