"""Where per-caller budgets live: in this process, in a SQLite file the worker processes of
one gateway share, or in Redis shared by every gateway.

Requests and tokens are token buckets (capacity = the per-minute limit, refilled continuously at
limit/60 per second), as OpenAI's limits behave: O(1) state per caller, a level and a timestamp,
whatever the traffic. A step takes requests, tokens and a concurrency slot all-or-nothing, or
takes nothing and refuses. In Redis each step is one Lua script, one round trip, using Redis's
clock. No library fits here: the `limits` package has no reservation that is later corrected,
nor several limits taken all-or-nothing in one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
# Seconds a client is told to wait when all its concurrency slots are taken: slots free up when
# requests end, which no bucket arithmetic predicts.
CONCURRENCY_RETRY_S = 1


@dataclass(frozen=True)
class Quota:
    rpm: int | None
    tpm: int | None
    concurrency: int | None


@dataclass(frozen=True)
class Decision:
    refused: str | None  # None, "requests", "tokens" or "concurrency"
    requests_left: float  # bucket levels after this request
    tokens_left: float
    retry_after_ms: float = 0.0


class Store(Protocol):
    async def acquire(
        self, key: str, quota: Quota, cost: int, lease: str, requests: int = 1
    ) -> Decision:
        """Take `requests` (0 or 1) requests, `cost` tokens and, with a concurrency limit, a
        slot for `lease`, all or nothing."""

    async def settle(self, key: str, quota: Quota, refund: int, lease: str) -> None:
        """Give back `refund` tokens (negative: take more) and release the lease's slot."""

    async def close(self) -> None: ...


def _level(capacity: int, level: float | None, at_ms: float, now_ms: float) -> float:
    if level is None:
        return float(capacity)  # no state: a full bucket
    return min(capacity, level + (now_ms - at_ms) * capacity / MINUTE_MS)


def _decide(
    quota: Quota, requests: float, tokens: float, held: int, cost: int, taken: int
) -> Decision:
    """The one decision both stores make (the Lua script below mirrors it); `taken`: requests
    to take (0 or 1)."""
    if quota.rpm and requests < taken:
        return Decision("requests", requests, tokens, (1 - requests) * MINUTE_MS / quota.rpm)
    if quota.tpm and tokens < cost:
        return Decision("tokens", requests, tokens, (cost - tokens) * MINUTE_MS / quota.tpm)
    if quota.concurrency and held >= quota.concurrency:
        return Decision("concurrency", requests, tokens, CONCURRENCY_RETRY_S * 1000)
    return Decision(
        None, requests - taken if quota.rpm else requests, tokens - cost if quota.tpm else tokens
    )


class MemoryStore:
    """One gateway process's budgets. Steps never await, so they are atomic on the event loop."""

    def __init__(self, max_buckets: int) -> None:
        # key -> [request level, token level, last update ms]; only for callers with limits,
        # least recently used first. JWT subjects are unbounded: past `max_buckets` the least
        # recently used bucket goes (and would start full again).
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._max_buckets = max_buckets
        self._held: dict[str, int] = {}  # only callers with requests in flight

    def _refill(self, key: str, quota: Quota, now_ms: float) -> list[float]:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(quota.rpm or 0), float(quota.tpm or 0), now_ms]
            if len(self._buckets) > self._max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = _level(quota.rpm or 0, bucket[0], bucket[2], now_ms)
            bucket[1] = _level(quota.tpm or 0, bucket[1], bucket[2], now_ms)
            bucket[2] = now_ms
        return bucket

    async def acquire(
        self, key: str, quota: Quota, cost: int, lease: str, requests: int = 1
    ) -> Decision:
        bucket = self._refill(key, quota, time.monotonic() * 1000)
        decision = _decide(quota, bucket[0], bucket[1], self._held.get(key, 0), cost, requests)
        if decision.refused is None:
            bucket[0], bucket[1] = decision.requests_left, decision.tokens_left
            if quota.concurrency:
                self._held[key] = self._held.get(key, 0) + 1
        return decision

    async def settle(self, key: str, quota: Quota, refund: int, lease: str) -> None:
        if quota.tpm and refund:
            bucket = self._refill(key, quota, time.monotonic() * 1000)
            bucket[1] = min(quota.tpm, bucket[1] + refund)
        if quota.concurrency:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]

    async def close(self) -> None:
        pass


class SqliteStore:
    """Budgets shared by the worker processes of one gateway (workers.py) without Redis: a
    SQLite file in the run folder, each step one write transaction (BEGIN IMMEDIATE: one
    process at a time), so a caller's limits hold exactly across workers. The same decision as
    the other stores, on the wall clock every process reads alike.

    Steps run in one thread of this process's own, off the event loop: a step may wait a moment
    for another worker's. The file is made afresh with each start (budgets start full, as in a
    single process), and never synced to disk: nothing in it is worth an fsync per request.
    Buckets expire once full again and leases after `lease_s`, as in Redis."""

    def __init__(self, path: Path, lease_s: float) -> None:
        self._lease_ms = lease_s * 1000
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, "
                             "r REAL, t REAL, at REAL, full_at REAL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS buckets_full ON buckets (full_at)")
            self._db.execute("CREATE TABLE IF NOT EXISTS leases (key TEXT, lease TEXT, "
                             "expires REAL, PRIMARY KEY (key, lease))")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="limits")
        self._swept_ms = 0.0

    async def acquire(
        self, key: str, quota: Quota, cost: int, lease: str, requests: int = 1
    ) -> Decision:
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._acquire, key, quota, cost, lease, requests)

    async def settle(self, key: str, quota: Quota, refund: int, lease: str) -> None:
        if quota.tpm and refund or quota.concurrency:
            await asyncio.get_running_loop().run_in_executor(
                self._thread, self._settle, key, quota, refund, lease)

    async def close(self) -> None:
        self._thread.shutdown()
        self._db.close()

    def _levels(self, key: str, quota: Quota, now_ms: float) -> tuple[float, float]:
        row = self._db.execute("SELECT r, t, at FROM buckets WHERE key = ?", (key,)).fetchone()
        at = min(row[2], now_ms) if row else now_ms  # a clock set back refills nothing
        return (_level(quota.rpm or 0, row[0] if row else None, at, now_ms),
                _level(quota.tpm or 0, row[1] if row else None, at, now_ms))

    def _save(self, key: str, quota: Quota, levels: tuple[float, float], now_ms: float) -> None:
        full_ms = max([(cap - level) * MINUTE_MS / cap
                       for cap, level in zip((quota.rpm, quota.tpm), levels, strict=True)
                       if cap] or [0])
        self._db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?, ?)",
                         (key, *levels, now_ms, now_ms + full_ms))

    def _acquire(self, key: str, quota: Quota, cost: int, lease: str, requests: int) -> Decision:
        now_ms = time.time() * 1000
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if now_ms - self._swept_ms > MINUTE_MS:  # idle callers' full buckets cost nothing
                self._swept_ms = now_ms
                self._db.execute("DELETE FROM buckets WHERE full_at < ?", (now_ms,))
                self._db.execute("DELETE FROM leases WHERE expires < ?", (now_ms,))
            requests_level, tokens_level = self._levels(key, quota, now_ms)
            held = 0
            if quota.concurrency:
                held = self._db.execute(
                    "SELECT COUNT(*) FROM leases WHERE key = ? AND expires >= ?",
                    (key, now_ms)).fetchone()[0]
            decision = _decide(quota, requests_level, tokens_level, held, cost, requests)
            if decision.refused is None:
                self._save(key, quota, (decision.requests_left, decision.tokens_left), now_ms)
                if quota.concurrency:
                    self._db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)",
                                     (key, lease, now_ms + self._lease_ms))
        return decision

    def _settle(self, key: str, quota: Quota, refund: int, lease: str) -> None:
        now_ms = time.time() * 1000
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if quota.tpm and refund:
                requests_level, tokens_level = self._levels(key, quota, now_ms)
                self._save(key, quota, (requests_level, min(quota.tpm, tokens_level + refund)),
                           now_ms)
            if quota.concurrency:
                self._db.execute("DELETE FROM leases WHERE key = ? AND lease = ?", (key, lease))


# KEYS: bucket hash, concurrency lease set. ARGV: rpm, tpm, concurrency (0: none), cost,
# lease id, lease ms, requests to take (0 or 1). The hash holds r (requests), t (tokens), at
# (ms); it expires once both buckets would be full again, so an idle caller costs nothing.
# Leases are a sorted set scored by expiry, so slots of a crashed gateway free themselves.
_LEVELS = """
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'r', 't', 'at')
local function level(cap, l)
  if not l then return cap end
  return math.min(cap, tonumber(l) + (now - tonumber(s[3])) * cap / 60000)
end
local r, t = level(rpm, s[1]), level(tpm, s[2])
local function save()
  local full_ms = 0
  if rpm > 0 then full_ms = math.max(full_ms, (rpm - r) * 60000 / rpm) end
  if tpm > 0 then full_ms = math.max(full_ms, (tpm - t) * 60000 / tpm) end
  redis.call('HSET', KEYS[1], 'r', r, 't', t, 'at', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(full_ms) + 1000)
end
"""

ACQUIRE = _LEVELS + """
local conc, cost, taken = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[7])
local held = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  held = redis.call('ZCARD', KEYS[2])
end
local refused, wait = '', 0
if rpm > 0 and r < taken then refused = 'requests'; wait = (1 - r) * 60000 / rpm
elseif tpm > 0 and t < cost then refused = 'tokens'; wait = (cost - t) * 60000 / tpm
elseif conc > 0 and held >= conc then refused = 'concurrency'; wait = 1000
end
if refused == '' then
  if rpm > 0 then r = r - taken end
  if tpm > 0 then t = t - cost end
  save()
  if conc > 0 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
    redis.call('PEXPIRE', KEYS[2], ARGV[6])
  end
end
return {refused, tostring(r), tostring(t), tostring(wait)}
"""

# ARGV: rpm, tpm, refund (tokens, may be negative), lease id ('' when no concurrency limit).
SETTLE = _LEVELS + """
local refund = tonumber(ARGV[3])
if tpm > 0 and refund ~= 0 then
  t = math.min(tpm, t + refund)
  save()
end
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
return 1
"""


LIMITER_ERRORS = Counter(
    "qwenstack_limiter_errors_total",
    "Calls to the limiter's Redis that failed: each let its request through unlimited, or "
    "refused it with a 503 (limits.redis_fail_open).",
)
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


class RedisStore:
    """Budgets shared by every gateway using the same Redis and key prefix.

    That Redis must not evict: an evicted bucket comes back full, so cache pressure (or any
    other tenant of an evicting Redis) would reset limits. `warn_if_evicting` says so at start.
    """

    def __init__(self, url: str, prefix: str, timeout_s: float, lease_s: float) -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            # One retry, at once: it replaces a pooled connection Redis dropped (a restart),
            # while during an outage every request waits at most twice the timeout.
            retry=Retry(NoBackoff(), 1),
        )
        self._prefix = prefix
        self._lease_ms = int(lease_s * 1000)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._settle = self._redis.register_script(SETTLE)

    def _keys(self, key: str) -> list[str]:
        # The braces keep both keys of a caller in one Redis Cluster slot, as scripts need.
        return [f"{self._prefix}limits:{{{key}}}:buckets", f"{self._prefix}limits:{{{key}}}:leases"]

    async def warn_if_evicting(self) -> None:
        """Log a warning when this Redis may evict keys; CONFIG may be disabled or denied."""
        try:
            config = await self._redis.config_get("maxmemory-policy")
        except REDIS_FAILURES as exc:
            log.info("Could not read the limiter Redis's maxmemory-policy (%s); it must be "
                     "noeviction, or rate-limit buckets may be evicted and reset to full.", exc)
            return
        policy = next(iter(config.values()), b"")
        policy = policy.decode() if isinstance(policy, bytes) else policy
        if policy != "noeviction":
            log.warning("The limiter's Redis has maxmemory-policy %s: under memory pressure it "
                        "evicts rate-limit buckets, which then reset to full. Give the limiter a "
                        "Redis of its own with maxmemory-policy noeviction.", policy)

    async def acquire(
        self, key: str, quota: Quota, cost: int, lease: str, requests: int = 1
    ) -> Decision:
        try:
            refused, found, tokens, wait = await self._acquire(
                self._keys(key),
                [quota.rpm or 0, quota.tpm or 0, quota.concurrency or 0, cost, lease,
                 self._lease_ms, requests],
            )
        except REDIS_FAILURES:
            LIMITER_ERRORS.inc()
            raise
        return Decision(refused.decode() or None, float(found), float(tokens), float(wait))

    async def settle(self, key: str, quota: Quota, refund: int, lease: str) -> None:
        if not quota.tpm and not quota.concurrency:
            return  # requests alone: nothing to correct, so no second round trip
        try:
            await self._settle(
                self._keys(key),
                [quota.rpm or 0, quota.tpm or 0, refund if quota.tpm else 0,
                 lease if quota.concurrency else ""],
            )
        except REDIS_FAILURES:
            LIMITER_ERRORS.inc()
            raise

    async def close(self) -> None:
        await self._redis.aclose()
