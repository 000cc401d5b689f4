"""One inference request on its way through the gateway, and how it ended.

Every step (auth, limits, cache, forwarding) reads and fills the same `Exchange`; the steps
that account for a request afterwards (limit reconciliation, usage records, metrics) register
a finisher, and `finish` runs them once, whether the request was answered, refused or dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qwenstack.callers import ANONYMOUS, Caller

log = logging.getLogger(__name__)

Finisher = Callable[["Exchange"], Awaitable[None]]

# Status for a request whose client went away before the answer was complete (nginx's code).
CLIENT_CLOSED = 499




@dataclass(eq=False)
class Exchange:
    request_id: str
    route: str  # "/v1/chat/completions" or "/v1/completions"
    body: bytes  # as the client sent it
    payload: dict[str, Any]  # the body, parsed
    started_s: float = field(default_factory=time.perf_counter)
    model: str = "-"
    caller: Caller = ANONYMOUS
    status: int = 0  # 0 until finished
    error_code: str | None = None  # the OpenAI error `code` of a refused or failed request
    first_chunk_s: float | None = None  # seconds from start to the first streamed bytes
    finished_s: float | None = None  # seconds from start to the end of the answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache: str = "off"  # "hit", "miss", "bypass" or "off"
    capture: bytearray | None = None  # the engine's answer as relayed, when the cache keeps it
    citations: list[dict[str, Any]] | None = None  # a grounded chat's retrieved chunks
    final_event: bytes = b""  # an SSE event a stream sends just before `data: [DONE]`
    session: str | None = None  # the client's x-session-id header, for session affinity
    replica: int | None = None  # index of the engine replica that answered
    prefix_hashes: list[bytes] = field(default_factory=list)  # set by prefix-aware routing
    _finishers: list[Finisher] = field(default_factory=list, repr=False)

    @property
    def stream(self) -> bool:
        return bool(self.payload.get("stream"))

    @property
    def client_wants_usage(self) -> bool:
        """A streaming client that asked for the final usage chunk (otherwise we strip it)."""
        options = self.payload.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    def record_usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)

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
