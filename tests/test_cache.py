"""The answer cache: gateways in front of the real engine, with the memory store and real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from helpers import Gateway, RedisServer, free_port, request_log, start_gateway, wait_for
from prometheus_client import REGISTRY

from qwenstack.callers import Caller
from qwenstack.gateway.cache import AnswerCache, cache_key
from qwenstack.gateway.cache_store import MemoryStore, RedisStore
from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.protocol import InferenceRequest
from qwenstack.settings import CacheSettings

MODEL = "tiny-qwen3"
CHAT_PATH = "/v1/chat/completions"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is an answer cache?"}],
    "temperature": 0,
    "max_tokens": 16,
}
COMPLETION = {"model": MODEL, "prompt": "A cache keeps", "temperature": 0, "max_tokens": 16}
HEADER = "x-qwenstack-cache"


def _without_ids(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


def _post(gateway: Gateway, body: dict, path: str = CHAT_PATH, **headers: str) -> httpx.Response:
    response = httpx.post(gateway.url + path, json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


def _stream(gateway: Gateway, body: dict, path: str = CHAT_PATH) -> tuple[str, list[dict]]:
    """The cache header and the stream's events, parsed, with [DONE] checked and left off."""
    with httpx.stream(
        "POST", gateway.url + path, json={**body, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            line.removeprefix("data: ")
            for line in response.iter_lines() if line.startswith("data: ")
        ]
        header = response.headers[HEADER]
    assert events[-1] == "[DONE]"
    return header, [orjson.loads(event) for event in events[:-1]]


@pytest.fixture(scope="module")
def gateway(engine_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with the default cache: on, in memory."""
    gateway = start_gateway(tmp_path_factory.mktemp("cache"), engine_url)
    yield gateway
    gateway.stop()


def _redis_gateway(tmp: Path, engine_url: str, url: str, prefix: str) -> Gateway:
    return start_gateway(tmp, engine_url, env={
        "QWENSTACK_CACHE__BACKEND": "redis", "QWENSTACK_CACHE__REDIS_URL": url,
        "QWENSTACK_CACHE__KEY_PREFIX": prefix,
    })


# --- which requests are cached, under which key ------------------------------------------------

def test_only_deterministic_requests_are_cacheable():
    assert InferenceRequest(CHAT_PATH, {"temperature": 0}).deterministic
    assert InferenceRequest(CHAT_PATH, {"temperature": 0.0, "n": 3}).deterministic
    assert InferenceRequest(CHAT_PATH, {"temperature": 0.8, "seed": 7}).deterministic
    # Without temperature vLLM samples at the model's default (0.7 for Qwen3, else 1.0).
    assert not InferenceRequest(CHAT_PATH, {}).deterministic
    assert not InferenceRequest(CHAT_PATH, {"temperature": 0.8}).deterministic
    assert not InferenceRequest(CHAT_PATH, {"temperature": False, "seed": None}).deterministic


def test_key_separates_callers_and_everything_that_changes_the_answer():
    alice, bob = Caller("alice"), Caller("bob")
    key = cache_key(CHAT_PATH, CHAT, alice)
    assert key != cache_key(CHAT_PATH, CHAT, bob)
    assert cache_key(CHAT_PATH, CHAT, None) != key  # a shared entry is nobody's own
    assert cache_key(CHAT_PATH, {**CHAT, "max_tokens": 17}, alice) != key
    assert cache_key(CHAT_PATH, {**CHAT, "stop": ["."]}, alice) != key
    assert cache_key("/v1/completions", CHAT, alice) != key
    assert cache_key(CHAT_PATH, {**CHAT, "stream": True}, alice) != key  # replayed in its own form
    # Neither the order of fields nor fields that leave the answer alone change the key.
    assert cache_key(CHAT_PATH, dict(reversed(list(CHAT.items()))), alice) == key
    assert cache_key(CHAT_PATH, {**CHAT, "user": "u1", "stream": False}, alice) == key
    streamed = {**CHAT, "stream": True}
    assert cache_key(CHAT_PATH, {**streamed, "stream_options": {"include_usage": True}}, alice) == \
        cache_key(CHAT_PATH, streamed, alice)
    per_chunk_usage = {"include_usage": True, "continuous_usage_stats": True}
    assert cache_key(CHAT_PATH, {**streamed, "stream_options": per_chunk_usage}, alice) != \
        cache_key(CHAT_PATH, streamed, alice)


def test_callers_do_not_share_entries_unless_configured():
    """Until API keys land, tenants are told apart here, with the cache's own lookup path."""

    async def lookups(shared: bool) -> list[str]:
        cache = AnswerCache(CacheSettings(shared_across_callers=shared), MemoryStore(2**20, 60))
        results = []
        for name in ("alice", "alice", "bob"):
            exchange = Exchange("r", InferenceRequest(CHAT_PATH, dict(CHAT)), caller=Caller(name))
            await cache.lookup(exchange, None)
            for see in exchange.answer.taps:  # a miss: the engine's answer, as the relay keeps it
                see(orjson.dumps({"id": "chatcmpl-1", "model": MODEL, "usage": {}}))
            await exchange.finish(200)
            await asyncio.sleep(0)  # the write runs after the answer is out
            results.append(exchange.cache)
        return results

    hits_before = REGISTRY.get_sample_value("qwenstack_cache_lookups_total", {"result": "hit"}) or 0
    assert asyncio.run(lookups(shared=False)) == ["miss", "hit", "miss"]
    hits = REGISTRY.get_sample_value("qwenstack_cache_lookups_total", {"result": "hit"})
    assert hits == hits_before + 1
    assert asyncio.run(lookups(shared=True)) == ["miss", "hit", "hit"]


def test_unreadable_entry_is_a_miss():
    async def lookup() -> str:
        store = MemoryStore(2**20, 60)
        cache = AnswerCache(CacheSettings(), store)
        exchange = Exchange("r", InferenceRequest(CHAT_PATH, dict(CHAT)))
        await store.put(cache_key(CHAT_PATH, CHAT, exchange.caller), b"not json")
        assert await cache.lookup(exchange, None) is None
        return exchange.cache

    assert asyncio.run(lookup()) == "miss"


def test_redis_backend_needs_a_url():
    with pytest.raises(ValueError, match="redis_url"):
        CacheSettings(backend="redis")


# --- stores ------------------------------------------------------------------------------------

def test_memory_store_evicts_least_recently_used_beyond_its_bytes():
    async def run() -> None:
        store = MemoryStore(max_bytes=30, ttl_s=60)
        await store.put("a", b"x" * 10)
        await store.put("b", b"x" * 10)
        await store.put("c", b"x" * 10)
        assert await store.get("a")  # a is now the most recently used
        await store.put("d", b"x" * 10)
        assert await store.get("b") is None
        assert store.bytes == 30 and {k for k in "acd" if await store.get(k)} == set("acd")
        await store.put("huge", b"x" * 31)  # larger than the whole store: not kept
        assert await store.get("huge") is None and store.bytes == 30
        assert REGISTRY.get_sample_value("qwenstack_cache_bytes") == 30
        assert REGISTRY.get_sample_value("qwenstack_cache_entries") == 3
        assert await store.purge() == 3 and store.bytes == 0

    asyncio.run(run())


def test_memory_store_entries_expire():
    async def run() -> None:
        store = MemoryStore(max_bytes=100, ttl_s=0.05)
        await store.put("a", b"answer")
        assert await store.get("a") == b"answer"
        await asyncio.sleep(0.1)
        assert await store.get("a") is None and store.bytes == 0

    asyncio.run(run())


def test_redis_store_keeps_entries_with_ttl_and_purges_its_prefix(
    redis_url: str, unique_prefix: str
):
    async def run() -> None:
        store = RedisStore(redis_url, unique_prefix, ttl_s=100, timeout_s=1)
        other = RedisStore(redis_url, unique_prefix + "other:", ttl_s=100, timeout_s=1)
        try:
            await store.put("k1", b"one")
            await store.put("k2", b"two!")
            await other.put("k1", b"not mine")
            assert await store.get("k1") == b"one"
            assert 0 < await store.client.ttl(unique_prefix + "k1") <= 100
            # The prefix is matched literally: "other:" keys are under it, so count them in.
            assert await store.count() == (3, 15)
            assert await other.purge() == 1
            assert await store.purge() == 2
            assert await store.get("k1") is None
        finally:
            await store.close()
            await other.close()

    asyncio.run(run())


def test_redis_store_that_cannot_connect_is_a_fast_miss():
    async def run() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "p:", ttl_s=10, timeout_s=0.25)
        started = time.perf_counter()
        assert await store.get("k") is None
        await store.put("k", b"v")
        assert await store.get("k") is None
        await store.close()
        return time.perf_counter() - started

    assert asyncio.run(run()) < 1


# --- through a gateway -------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [(CHAT_PATH, CHAT), ("/v1/completions", COMPLETION)])
def test_repeated_greedy_request_is_served_from_the_cache(gateway: Gateway, path: str, body: dict):
    first = _post(gateway, body, path)
    second = _post(gateway, body, path, **{"x-request-id": "again-1"})
    assert (first.headers[HEADER], second.headers[HEADER]) == ("miss", "hit")
    assert _without_ids(second.json()) == _without_ids(first.json())
    assert second.json()["id"].endswith("-again-1")  # named as vLLM names answers: kind-request id
    assert second.json()["usage"]["completion_tokens"] == 16
    entry = request_log(gateway.log, "again-1")
    assert (entry["status"], entry["completion_tokens"], entry["model"]) == (200, 16, MODEL)


def test_repeated_greedy_stream_is_replayed_as_the_engine_streamed_it(
    gateway: Gateway, engine_url: str
):
    body = {**CHAT, "messages": [{"role": "user", "content": "Stream it twice."}]}
    header, live = _stream(gateway, body)
    assert header == "miss"
    header, replayed = _stream(gateway, body)
    assert header == "hit"
    assert [_without_ids(e) for e in replayed] == [_without_ids(e) for e in live]
    assert len({e["id"] for e in replayed}) == 1 and replayed[0]["id"] != live[0]["id"]
    assert all(e["choices"] for e in replayed)  # no usage event: the client did not ask for it
    # Asking for usage is the same entry, with the usage event kept.
    header, with_usage = _stream(gateway, {**body, "stream_options": {"include_usage": True}})
    assert header == "hit"
    assert [_without_ids(e) for e in with_usage[:-1]] == [_without_ids(e) for e in replayed]
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 16
    # The engine's own text for this request, in events as the engine sent them, not one
    # block (how many tokens an event carries depends on the engine's load: a busy vLLM API
    # server merges them, so the count is compared with the live stream only, above).
    with httpx.stream(
        "POST", engine_url + CHAT_PATH, json={**body, "stream": True}, timeout=60
    ) as direct:
        events = [orjson.loads(line[6:]) for line in direct.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert _content(replayed) == _content(events) and len(replayed) > 2


def _content(events: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])


def test_sampled_request_is_not_cached(gateway: Gateway):
    body = {**CHAT, "temperature": 0.8}
    assert [_post(gateway, body).headers[HEADER] for _ in range(2)] == ["bypass", "bypass"]


def test_cache_control_refreshes_or_skips_the_cache(gateway: Gateway):
    body = {**COMPLETION, "prompt": "Refresh me"}

    def cache(control: str | None = None) -> str:
        headers = {"cache-control": control} if control else {}
        return _post(gateway, body, "/v1/completions", **headers).headers[HEADER]

    assert cache("no-store") == "bypass"
    assert cache() == "miss"  # no-store kept nothing
    assert cache("no-cache") == "bypass"  # the engine answers, and its answer is stored
    assert cache() == "hit"


def test_purging_needs_an_admin(gateway: Gateway):
    # Admins authenticate once the API keys land; until then every caller is anonymous.
    response = httpx.delete(f"{gateway.url}/admin/cache")
    assert response.status_code == 403 and response.json()["error"]["code"] == "admin_only"


def test_redis_cache_serves_hits_to_another_gateway(
    engine_url: str, redis_url: str, unique_prefix: str, tmp_path: Path
):
    first = _redis_gateway(tmp_path / "a", engine_url, redis_url, unique_prefix)
    second = _redis_gateway(tmp_path / "b", engine_url, redis_url, unique_prefix)
    try:
        answer = _post(first, CHAT)
        assert answer.headers[HEADER] == "miss"
        from_redis = _post(second, CHAT)
        assert from_redis.headers[HEADER] == "hit"
        assert _without_ids(from_redis.json()) == _without_ids(answer.json())
        assert _stream(first, CHAT)[0] == "miss"
        header, events = _stream(second, CHAT)
        assert header == "hit"
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == \
            answer.json()["choices"][0]["message"]["content"]
    finally:
        first.stop()
        second.stop()
        asyncio.run(_purge(redis_url, unique_prefix))


async def _purge(url: str, prefix: str) -> None:
    store = RedisStore(url, prefix, ttl_s=1, timeout_s=1)
    await store.purge()
    await store.close()


def test_requests_succeed_while_redis_is_down(
    engine_url: str, own_redis: RedisServer, tmp_path: Path
):
    gateway = _redis_gateway(tmp_path, engine_url, own_redis.url, "qwenstack:cache:")
    try:
        assert _post(gateway, CHAT).headers[HEADER] == "miss"
        assert _post(gateway, CHAT).headers[HEADER] == "hit"
        own_redis.stop()
        for _ in range(3):
            assert _post(gateway, CHAT).headers[HEADER] == "miss"
            assert _stream(gateway, CHAT)[0] == "miss"
        assert "Redis read failed" in gateway.log.read_text()
        own_redis.start()  # the same port, empty: the cache fills again
        # once the store tries Redis again (it leaves it alone for a second after a failure)
        wait_for(lambda: _post(gateway, CHAT).headers[HEADER] == "hit", "a hit from Redis", 10,
                 interval_s=0.2)
    finally:
        gateway.stop()
