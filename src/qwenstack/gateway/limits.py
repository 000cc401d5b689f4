"""Per-caller limits: requests per minute, tokens per minute and concurrent requests.

Requests and tokens are token buckets, as OpenAI's limits behave. Before a request does any
work, the limiter takes its share, each step all-or-nothing: the request (and for a caller with
a token limit, one token) first, so a caller over its rate is refused before its prompt is even
counted; then its token reservation (prompt tokens + the most it may generate) and a
concurrency slot. Concurrent requests cannot overshoot the token budget, as counting after the
answer would. When the request ends, the real usage replaces the reservation and the slot is
released.

The budgets live in one of three stores behind one interface (limit_stores.py): in-process (one
gateway process), a SQLite file (a gateway's worker processes share budgets), or Redis (gateway
replicas share budgets).
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import Counter
from redis.exceptions import RedisError

from qwenstack.callers import Caller
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.exchange import CLIENT_CLOSED, Exchange
from qwenstack.gateway.limit_stores import (
    MINUTE_MS,
    Decision,
    MemoryStore,
    Quota,
    RedisStore,
    SqliteStore,
    Store,
)
from qwenstack.gateway.protocol import InferenceRequest
from qwenstack.settings import LimitSettings

log = logging.getLogger(__name__)

RATE_LIMITED = Counter(
    "qwenstack_rate_limited_total", "Requests refused by a per-caller limit.", ["key", "limit"]
)


def format_duration(ms: float) -> str:
    """A reset time as OpenAI writes it: `20ms`, `1.5s`, `6m0s`."""
    if ms < 1000:
        return f"{math.ceil(ms)}ms"
    seconds = math.ceil(ms / 10) / 100
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:g}s"


def rate_headers(quota: Quota, decision: Decision) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers for the limits that apply to this caller."""
    headers = []
    for name, limit, left in (("requests", quota.rpm, decision.requests_left),
                              ("tokens", quota.tpm, decision.tokens_left)):
        if limit:
            remaining = max(0, math.floor(left))
            headers += [
                (f"x-ratelimit-limit-{name}".encode(), str(limit).encode()),
                (f"x-ratelimit-remaining-{name}".encode(), str(remaining).encode()),
                (f"x-ratelimit-reset-{name}".encode(),
                 format_duration((limit - left) * MINUTE_MS / limit).encode()),
            ]
    return headers


REFUSALS = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrency": "concurrent requests",
}


class Limiter:
    def __init__(
        self, settings: LimitSettings, max_buckets: int, shared_file: Path | None = None
    ) -> None:
        """`shared_file`: where worker processes share budgets when there is no Redis."""
        self.settings = settings
        if settings.redis_url:
            self.store: Store = RedisStore(
                settings.redis_url.get_secret_value(), settings.key_prefix,
                settings.redis_timeout_s, settings.concurrency_lease_s,
            )
        elif shared_file:
            self.store = SqliteStore(shared_file, settings.concurrency_lease_s)
        else:
            self.store = MemoryStore(max_buckets)

    def quota(self, caller: Caller) -> Quota:
        """The caller's own limits; the configured defaults where it has none."""
        s = self.settings
        concurrency = caller.max_concurrency
        return Quota(
            caller.rpm if caller.rpm is not None else s.default_rpm,
            caller.tpm if caller.tpm is not None else s.default_tpm,
            concurrency if concurrency is not None else s.default_max_concurrency,
        )

    async def reserve(
        self, exchange: Exchange, count_prompt_tokens: Callable[[], Awaitable[int]],
        max_model_len: int | None,
    ) -> list[tuple[bytes, bytes]]:
        """Take the request's share of the caller's budgets, or refuse with a 429.

        Limits come before work: for a caller with a token limit, a first step takes the
        request and one token (every request costs at least one), and only then is
        `count_prompt_tokens` called; so a caller over its request rate or out of tokens is
        refused without any counting, and every request counted costs its caller a request.
        A second step takes the rest of the reservation and the concurrency slot. Returns the
        rate-limit headers for the response; registers the reconciliation."""
        quota = self.quota(exchange.caller)
        if not (quota.rpm or quota.tpm or quota.concurrency):
            return []
        key = exchange.caller.name
        cost = 0
        if quota.tpm:
            first = Quota(quota.rpm, quota.tpm, None)  # no slot held while counting
            if await self._take(exchange, first, quota, cost=1, requests=1) is None:
                return []
            prompt = await count_prompt_tokens()
            cost = max(1, prompt + completion_budget(exchange.request, prompt, max_model_len))
            if cost > quota.tpm:
                RATE_LIMITED.labels(exchange.caller.metric_label, "tokens").inc()
                raise GatewayError(
                    429, f"Request too large: it may use {cost} tokens (prompt + max_tokens), "
                    f"over the limit of {quota.tpm} tokens per minute. Lower max_tokens.",
                    code="rate_limit_exceeded",
                )
            decision = await self._take(exchange, quota, quota, cost=cost - 1, requests=0)
        else:
            decision = await self._take(exchange, quota, quota, cost=0, requests=1)
        if decision is None:
            return []
        headers = rate_headers(quota, decision)

        async def reconcile(exchange: Exchange) -> None:
            used = exchange.prompt_tokens + exchange.completion_tokens
            if not used and exchange.status == CLIENT_CLOSED:
                used = cost  # the engine worked until the client left; its usage never came
            try:
                refund = cost - used if quota.tpm else 0
                await self.store.settle(key, quota, refund, exchange.request_id)
            except (RedisError, OSError, TimeoutError, sqlite3.Error) as exc:
                log.warning("Could not settle limits of request %s: %r", exchange.request_id, exc)

        exchange.on_finish(reconcile)
        return headers

    async def _take(
        self, exchange: Exchange, step: Quota, quota: Quota, *, cost: int, requests: int
    ) -> Decision | None:
        """One step of `reserve` on the store: its decision, or a 429; None when the store is
        unreachable and the limiter fails open."""
        key = exchange.caller.name
        try:
            decision = await self.store.acquire(key, step, cost, exchange.request_id, requests)
        except (RedisError, OSError, TimeoutError, sqlite3.Error) as exc:
            if self.settings.redis_fail_open:
                log.warning("Rate limiter unavailable, letting request %s through: %r",
                            exchange.request_id, exc)
                return None
            raise GatewayError(
                503, "The rate limiter is unavailable; try again shortly.",
                code="rate_limiter_unavailable", retry_after_s=1,
            ) from None
        if decision.refused:
            RATE_LIMITED.labels(exchange.caller.metric_label, decision.refused).inc()
            headers = rate_headers(quota, decision)
            headers.append((b"retry-after-ms", str(math.ceil(decision.retry_after_ms)).encode()))
            raise GatewayError(
                429, f"Rate limit reached for {REFUSALS[decision.refused]}; "
                f"retry in {format_duration(decision.retry_after_ms)}.",
                code="rate_limit_exceeded",
                retry_after_s=max(1, math.ceil(decision.retry_after_ms / 1000)),
                headers={name.decode(): value.decode() for name, value in headers},
            )
        return decision

    async def remaining(self, caller: Caller) -> Decision | None:
        """What the caller's request and token buckets hold now, taking nothing; None when it
        has neither limit. Raises the store's error (Redis unreachable)."""
        quota = self.quota(caller)
        if not (quota.rpm or quota.tpm):
            return None
        # A step that takes no request, no token and no slot: the decision is the levels.
        peek = Quota(quota.rpm, quota.tpm, None)
        return await self.store.acquire(caller.name, peek, 0, "", requests=0)

    async def close(self) -> None:
        await self.store.close()


def completion_budget(
    request: InferenceRequest, prompt_tokens: int, max_model_len: int | None
) -> int:
    """The most tokens the request may generate: `n` answers of the output limit for each
    prompt, or the rest of the context window when it sets no limit."""
    _, max_tokens = request.output_limit
    if max_tokens is None:
        max_tokens = request.default_output_limit
    if max_tokens is None:
        max_tokens = max(0, (max_model_len or 0) - prompt_tokens)
    return max_tokens * request.choices * max(1, len(request.prompts))
