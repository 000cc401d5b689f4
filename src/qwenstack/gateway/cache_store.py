"""Where cached answers live: in this process (an LRU bounded by bytes) or in Redis.

A store never fails a request: with Redis, every error or timeout is a miss (or a skipped
write), logged now and then, and Redis is left alone for a moment before it is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, cast

import redis.asyncio as aioredis
from prometheus_client import Gauge
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from qwenstack.gateway.errors import GatewayError
from qwenstack.settings import CacheSettings

log = logging.getLogger(__name__)

# Several worker processes share only a Redis store, and each recounts the same one.
CACHE_BYTES = Gauge("qwenstack_cache_bytes", "Bytes of cached answers.",
                    multiprocess_mode="livemax")
CACHE_ENTRIES = Gauge("qwenstack_cache_entries", "Cached answers.", multiprocess_mode="livemax")

# After a Redis failure, requests skip Redis this long instead of each paying for a timeout.
REDIS_PAUSE_S = 1.0
# Redis failures are logged at most this often (with the number left unlogged).
REDIS_LOG_INTERVAL_S = 60.0
# How often the gauges are recounted from Redis (a SCAN over the key prefix).
REDIS_COUNT_INTERVAL_S = 30.0


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes) -> None: ...
    async def purge(self) -> int: ...
    async def close(self) -> None: ...


class MemoryStore:
    """Least recently used entries go first once the values exceed `max_bytes`."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        # key -> (expiry on the monotonic clock, value); the least recently used first
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        CACHE_BYTES.set_function(lambda: self.bytes)
        CACHE_ENTRIES.set_function(lambda: len(self._entries))

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + self.ttl_s, value)
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def purge(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self.bytes = 0
        return count

    async def close(self) -> None:
        pass

    def _drop(self, key: str) -> None:
        self.bytes -= len(self._entries.pop(key)[1])


class RedisStore:
    """Entries as plain Redis strings under `prefix`, each with the TTL; shared by gateways."""

    def __init__(self, url: str, prefix: str, ttl_s: int, timeout_s: float) -> None:
        self.prefix = prefix
        self.ttl_s = ttl_s
        # No retries: a cache that is slow to answer is worth less than the engine's answer.
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )
        self._timeout_s = timeout_s
        self._paused_until = 0.0
        self._logged_at = -REDIS_LOG_INTERVAL_S
        self._unlogged = 0
        self._counter: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            maxmemory = (await self.client.config_get("maxmemory")).get("maxmemory", "0")
            if maxmemory == "0":
                log.warning("Redis has no maxmemory: bound it, with an LRU maxmemory-policy, "
                            "or the answer cache grows until TTLs expire entries.")
        self._counter = asyncio.create_task(self._count_forever())

    async def get(self, key: str) -> bytes | None:
        if self._paused():
            return None
        try:
            value = self.client.get(self.prefix + key)  # bytes: responses are not decoded
            return await asyncio.wait_for(cast(Awaitable[bytes | None], value), self._timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("read", exc)
            return None

    async def put(self, key: str, value: bytes) -> None:
        if self._paused():
            return
        try:
            await asyncio.wait_for(
                self.client.set(self.prefix + key, value, ex=self.ttl_s), self._timeout_s
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("write", exc)

    async def purge(self) -> int:
        """Delete every key under the prefix, which gateways sharing it share."""
        count = 0
        try:
            async for keys in self._batches():
                count += await self.client.unlink(*keys)
        except (RedisError, OSError, TimeoutError) as exc:
            raise GatewayError(
                503, f"The cache's Redis failed ({exc}); {count} entries purged so far.",
                code="cache_unavailable",
            ) from None
        return count

    async def close(self) -> None:
        if self._counter:
            self._counter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._counter
        await self.client.aclose()

    async def count(self) -> tuple[int, int]:
        """Entries and bytes under the prefix, by walking it (costs Redis O(entries))."""
        entries = size = 0
        async for keys in self._batches():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(key)
            sizes = await pipe.execute()
            entries += len(keys)
            size += sum(sizes)
        return entries, size

    async def _batches(self) -> AsyncIterator[list[bytes]]:
        pattern = _glob_escape(self.prefix) + "*"
        cursor = 0
        while True:
            cursor, keys = await self.client.scan(cursor, match=pattern, count=1000)
            if keys:
                yield cast(list[bytes], keys)
            if not cursor:
                return

    async def _count_forever(self) -> None:
        while True:
            try:
                entries, size = await self.count()
                CACHE_ENTRIES.set(entries)
                CACHE_BYTES.set(size)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed("count", exc)
            await asyncio.sleep(REDIS_COUNT_INTERVAL_S)

    def _paused(self) -> bool:
        return self._paused_until > time.monotonic()

    def _failed(self, action: str, exc: BaseException) -> None:
        now = time.monotonic()
        self._paused_until = now + REDIS_PAUSE_S
        if now - self._logged_at < REDIS_LOG_INTERVAL_S:
            self._unlogged += 1
            return
        log.warning(
            "Answer cache: Redis %s failed (%s: %s); serving without the cache for now "
            "(%d failures since the last report).",
            action, type(exc).__name__, exc, self._unlogged,
        )
        self._logged_at = now
        self._unlogged = 0


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def open_store(settings: CacheSettings) -> Store:
    if settings.backend == "redis":
        assert settings.redis_url  # checked by CacheSettings
        store = RedisStore(
            settings.redis_url.get_secret_value(), settings.key_prefix, settings.ttl_s,
            settings.redis_timeout_s,
        )
        await store.start()
        return store
    return MemoryStore(settings.max_bytes, settings.ttl_s)
