"""Admission control: a bounded queue in front of the engines.

At most `max_in_flight` requests are at the engines at once (a stream holds its slot until its
last byte); others wait in arrival order. Past `max_queue` waiting requests, or `max_wait_s` of
waiting, a request gets 503 with Retry-After at once, instead of piling up in memory and in
the engines' queues while the client times out anyway.

With several worker processes (workers.py), each admits its share of both bounds, rounded up:
a request waits in its own worker's line even when another worker has a free slot.
"""

from __future__ import annotations

import asyncio
import collections
import math

from prometheus_client import Counter, Gauge

from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.exchange import Exchange
from qwenstack.settings import AdmissionSettings

QUEUED = Gauge("qwenstack_requests_queued", "Requests waiting for a slot at the engines.",
               multiprocess_mode="livesum")
REJECTED = Counter(
    "qwenstack_admission_rejected_total", "Requests refused by admission control.", ["reason"]
)
# A short hint: the queue drains as requests end, which nothing here can predict.
RETRY_AFTER_S = 1


class Admission:
    def __init__(self, settings: AdmissionSettings, workers: int = 1) -> None:
        self.max_in_flight = (math.ceil(settings.max_in_flight / workers)
                              if settings.max_in_flight is not None else None)
        self.max_queue = math.ceil(settings.max_queue / workers)
        self.max_wait_s = settings.max_wait_s
        self.in_flight = 0
        # Each waiter's future is resolved by `_release` handing it a slot.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def admit_now(self, exchange: Exchange) -> bool:
        """Take a free slot if there is one (or admission control is off), without waiting;
        the slot is released when the exchange finishes."""
        if self.max_in_flight is None:
            return True
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            exchange.on_finish(self._release)
            return True
        return False

    async def wait(self, exchange: Exchange) -> None:
        """Wait in line for a slot, or refuse with 503 when the line is full or too slow."""
        if len(self._waiters) >= self.max_queue:
            raise self._refuse("queue_full", f"{len(self._waiters)} requests are already waiting")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        QUEUED.inc()
        try:
            await asyncio.wait_for(waiter, self.max_wait_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                await self._release()  # handed a slot just as we gave up: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                why = f"no slot came free in {self.max_wait_s:g} s"
                raise self._refuse("wait_timeout", why) from None
            raise
        finally:
            QUEUED.dec()
        exchange.on_finish(self._release)

    async def _release(self, exchange: Exchange | None = None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self.in_flight -= 1

    def _refuse(self, reason: str, why: str) -> GatewayError:
        REJECTED.labels(reason).inc()
        return GatewayError(
            503, f"The server is at capacity ({why}); retry shortly.",
            code="server_overloaded", retry_after_s=RETRY_AFTER_S,
        )
