"""Usage records: one row per inference request, written in batches off the request path.

A finished exchange only appends a row to a list in memory; a background task inserts what has
gathered every FLUSH_INTERVAL_S, and the gateway's shutdown inserts the rest, so a clean stop
(SIGTERM included) loses none. Prompts and completions are not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any, Literal

import sqlalchemy as sa

from qwenstack import database as db
from qwenstack.database import UsageRecord
from qwenstack.gateway.exchange import Exchange

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5
BATCH_ROWS = 1000
# While the database is unreachable rows wait in memory, up to this many; then the oldest go.
MAX_PENDING = 200_000

GroupBy = Literal["key", "model"]


class UsageRecorder:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever())

    async def stop(self) -> None:
        """Stop the background task and write everything still pending."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._pending:
            log.error(
                "%d usage records could not be written: %s", len(self._pending), self._pending[:3]
            )

    async def finisher(self, exchange: Exchange) -> None:
        """An Exchange finisher: queues the request's row."""
        finished_s = exchange.finished_s or 0.0
        self._pending.append(
            {
                "time": db.now() - dt.timedelta(seconds=finished_s),
                "request_id": exchange.request_id,
                "caller": exchange.caller.name,
                "route": exchange.route,
                "model": exchange.model,
                "requested_model": exchange.requested_model,
                "status": exchange.status,
                "error_code": exchange.error_code,
                "prompt_tokens": exchange.prompt_tokens,
                "completion_tokens": exchange.completion_tokens,
                "cached": exchange.cache == "hit",
                "tool_calls": exchange.tool_calls,
                "latency_ms": finished_s * 1000,
                "ttft_ms": exchange.first_chunk_s * 1000
                if exchange.first_chunk_s is not None
                else None,
            }
        )
        if len(self._pending) > MAX_PENDING:
            del self._pending[: len(self._pending) - MAX_PENDING]
            log.error("Usage records are piling up (database unreachable?); dropping the oldest")

    async def flush(self) -> None:
        """Insert pending rows in batches; on a database error they stay pending for the next
        try."""
        async with self._flushing:
            while self._pending:
                batch = self._pending[:BATCH_ROWS]
                try:
                    await asyncio.to_thread(self._insert, batch)
                except sa.exc.SQLAlchemyError as exc:
                    log.warning("Writing %d usage records failed, will retry: %s", len(batch), exc)
                    return
                del self._pending[: len(batch)]

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.insert(UsageRecord), rows)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()


def totals(engine: sa.Engine, by: GroupBy, since: dt.timedelta) -> list[dict[str, Any]]:
    """Requests, errors, tokens and tool calls per key (or model) over the last `since`;
    `cached`: how many of the requests the answer cache served (their tokens are in the sums
    too)."""
    group = UsageRecord.caller if by == "key" else UsageRecord.model
    query = (
        sa.select(
            group.label(by),
            sa.func.count().label("requests"),
            sa.func.count().filter(UsageRecord.status >= 400).label("errors"),
            sa.func.coalesce(sa.func.sum(UsageRecord.prompt_tokens), 0).label("prompt_tokens"),
            sa.func.coalesce(sa.func.sum(UsageRecord.completion_tokens), 0).label(
                "completion_tokens"
            ),
            sa.func.count().filter(UsageRecord.cached).label("cached"),
            sa.func.coalesce(sa.func.sum(UsageRecord.tool_calls), 0).label("tool_calls"),
            sa.func.avg(UsageRecord.latency_ms).label("mean_latency_ms"),
        )
        .where(UsageRecord.time >= db.now() - since)
        .group_by(group)
        .order_by(group)
    )
    with engine.connect() as connection:
        return [
            {**row._asdict(), "mean_latency_ms": round(float(row.mean_latency_ms), 1)}
            for row in connection.execute(query)
        ]
