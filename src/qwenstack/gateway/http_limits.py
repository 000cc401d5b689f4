"""Bounds on what one client connection may hold, enforced in uvicorn's HTTP protocol, before
any request reaches the app: request heads over `validation.max_header_bytes` get a 431 while
they arrive; a head not complete within `gateway.header_timeout_s` of the connection (or of the
request's first byte, on a kept-alive connection), or a body not complete within
`gateway.body_timeout_s` of its head, gets a 408 and the connection closed, so a client
trickling a byte a second cannot hold a connection; connections beyond
`gateway.max_connections` get a 503 at once. Each answer is in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qwenstack.gateway.errors import error_body
from qwenstack.settings import Settings

log = logging.getLogger("qwenstack.gateway")

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large",
           503: b"Service Unavailable"}


class _HeadTooLarge(Exception):
    pass


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit, read deadlines and a connection cap.

    httptools sets no limit of its own: it would buffer megabytes of header and pass them on.
    Bytes are counted as they arrive (so at most one read beyond the limit is buffered), and the
    complete head is measured exactly. uvicorn's own `limit_concurrency` is not used: it answers
    in plain text, and only once a client has sent a whole head.
    """

    max_header_bytes = 32 * 1024
    header_timeout_s = 10.0
    body_timeout_s = 15.0
    max_connections = 2048

    @classmethod
    def configured(cls, settings: Settings) -> type[BoundedHeadProtocol]:
        return type(cls.__name__, (cls,), {
            "max_header_bytes": settings.validation.max_header_bytes,
            "header_timeout_s": settings.gateway.header_timeout_s,
            "body_timeout_s": settings.gateway.body_timeout_s,
            "max_connections": settings.gateway.max_connections,
        })

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_too_large = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("Refused a connection: %d are open already", self.max_connections)
            self._answer_and_close(
                503, f"The server holds {self.max_connections} connections already; retry "
                "shortly.", "too_many_connections")
            return
        self._arm(self.header_timeout_s, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes and not self._head_too_large:
            self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            # Raised in a parser callback, it ends parsing; data_received then calls
            # send_400_response, which answers 431 instead.
            self._head_too_large = True
            raise _HeadTooLarge
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()
        self._arm(self.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True  # the next request on this connection starts with its head
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._head_too_large = True
        self._answer_and_close(
            431, f"The request headers are over {self.max_header_bytes} bytes.",
            "request_header_fields_too_large")

    def _arm(self, timeout_s: float, part: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(timeout_s, self._too_slow, timeout_s, part)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, timeout_s: float, part: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.info("Dropped client %s: its request %s took over %g s", self.client, part, timeout_s)
        cycle = self.cycle
        # While waiting for a head, `cycle` is the previous request's (or None); answer only
        # where no response of the connection's is under way.
        answering = self._in_head and (cycle is None or cycle.response_complete) or (
            not self._in_head and cycle is not None and not cycle.response_started)
        if answering:
            self._answer_and_close(
                408, f"The request {part} did not arrive within {timeout_s:g} s.",
                "request_timeout")
        else:
            self.transport.close()

    def _answer_and_close(self, status: int, message: str, code: str) -> None:
        body = error_body(status, message, code)
        self.transport.write(
            b"HTTP/1.1 " + str(status).encode() + b" " + REASONS[status] + b"\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()
