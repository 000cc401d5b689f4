"""Per-caller limits through real gateway processes, with the budgets in-process or in real Redis.

Authentication is not in these gateways yet, so every request is the anonymous caller, limited
by the `limits.default_*` settings.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from helpers import Gateway, RedisServer, free_port, held_stream, start_gateway

MODEL = "tiny-qwen3"


# "hello there" is 2 tokens for the Qwen3 tokenizer; with ignore_eos the completion is exactly
# max_tokens long.
def completion(max_tokens: int, **extra: object) -> dict:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, **extra}


async def _post_all(urls: list[str], bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*(
            client.post(f"{url}/v1/completions", json=body)
            for url, body in zip(urls, bodies, strict=True)
        ))


def _assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]


def test_rpm_shared_by_two_gateways_through_redis(tmp_path: Path, engine_url: str, redis_url: str,
                                                  unique_prefix: str):
    env = {"QWENSTACK_LIMITS__REDIS_URL": redis_url, "QWENSTACK_LIMITS__KEY_PREFIX": unique_prefix,
           "QWENSTACK_LIMITS__DEFAULT_RPM": "10"}
    gateways = [start_gateway(tmp_path / name, engine_url, env=env) for name in ("a", "b")]
    try:
        urls = [g.url for g in gateways] * 20
        responses = asyncio.run(_post_all(urls, [completion(1)] * len(urls)))
    finally:
        for gateway in gateways:
            gateway.stop()
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 10 and len(refused) == 30
    for response in refused:
        _assert_openai_error(response, 429, "rate_limit_exceeded")
        assert response.json()["error"]["type"] == "rate_limit_error"
        headers = response.headers
        assert headers["x-ratelimit-limit-requests"] == "10"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        # One request comes back every 6 s at 10 per minute.
        assert 1 <= int(headers["retry-after"]) <= 6
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in headers  # no token limit set
    # Successful answers carry the same headers, as OpenAI's do.
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining == list(range(10))


@pytest.fixture(params=["memory", "redis", "workers"])
def tpm_30(
    request: pytest.FixtureRequest, tmp_path: Path, engine_url: str
) -> Iterator[list[Gateway]]:
    """Gateways sharing a budget of 30 tokens per minute: one in-process, two through Redis, or
    one of two worker processes (sharing it through their SQLite file)."""
    env = {"QWENSTACK_LIMITS__DEFAULT_TPM": "30"}
    names = ["a"]
    if request.param == "workers":
        env |= {"QWENSTACK_GATEWAY__WORKERS": "2", "QWENSTACK_CACHE__ENABLED": "false",
                "QWENSTACK_RAG__MILVUS_URI": "http://127.0.0.1:9"}
    if request.param == "redis":
        env |= {"QWENSTACK_LIMITS__REDIS_URL": request.getfixturevalue("redis_url"),
                "QWENSTACK_LIMITS__KEY_PREFIX": request.getfixturevalue("unique_prefix")}
        names.append("b")
    gateways = [start_gateway(tmp_path / name, engine_url, env=env) for name in names]
    yield gateways
    for gateway in gateways:
        gateway.stop()


def test_token_reservations_stop_concurrent_overshoot(tpm_30: list[Gateway]):
    # Each request reserves 2 prompt + 10 completion tokens: two fit in 30, a third cannot,
    # although none has finished (and been counted) when the others arrive.
    urls = [g.url for g in tpm_30] * 3
    responses = asyncio.run(_post_all(urls, [completion(10)] * len(urls)))
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == 2
    for response in ok:
        assert response.json()["usage"]["total_tokens"] == 12
        assert response.headers["x-ratelimit-limit-tokens"] == "30"
    for response in (r for r in responses if r.status_code != 200):
        _assert_openai_error(response, 429, "rate_limit_exceeded")
        assert "tokens per minute" in response.json()["error"]["message"]
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 12
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["x-ratelimit-reset-tokens"]
    # More than the whole budget can never pass: refused at once, saying so. A batch of three
    # prompts may generate three completions: 3 x (2 + 10) tokens.
    for body in (completion(40), completion(10, prompt=["hello there"] * 3)):
        too_large = httpx.post(f"{urls[0]}/v1/completions", json=body, timeout=60)
        _assert_openai_error(too_large, 429, "rate_limit_exceeded")
        assert "Request too large" in too_large.json()["error"]["message"]


def test_failed_request_releases_its_token_reservation(tpm_30: list[Gateway]):
    first, last = tpm_30[0], tpm_30[-1]
    # The engine refuses a negative temperature: nothing was used, so nothing is charged.
    bad = httpx.post(f"{first.url}/v1/completions", json=completion(20, temperature=-1),
                     timeout=60)
    assert bad.status_code == 400
    # Had the 22 reserved tokens stayed taken, 8 would be left and this would be refused.
    good = httpx.post(f"{last.url}/v1/completions", json=completion(20), timeout=120)
    assert good.status_code == 200, good.text
    assert int(good.headers["x-ratelimit-remaining-tokens"]) >= 8


def test_stream_holds_a_concurrency_slot_until_the_client_leaves(tmp_path: Path, engine_url: str):
    gateway = start_gateway(
        tmp_path, engine_url,
        env={
            "QWENSTACK_LIMITS__DEFAULT_MAX_CONCURRENCY": "1",
            "QWENSTACK_LIMITS__DEFAULT_TPM": "50000",
        },
    )
    url = f"{gateway.url}/v1/completions"
    try:
        with held_stream(gateway.url) as stream:
            assert stream.headers["x-ratelimit-limit-tokens"] == "50000"
            second = httpx.post(url, json=completion(1), timeout=60)
            _assert_openai_error(second, 429, "rate_limit_exceeded")
            assert "concurrent requests" in second.json()["error"]["message"]
        # The client left mid-stream: the slot is free again.
        for _ in range(50):
            third = httpx.post(url, json=completion(1), timeout=60)
            if third.status_code != 429:
                break
        assert third.status_code == 200, third.text
    finally:
        gateway.stop()


def test_redis_outage_fails_open_or_closed_as_configured(
    tmp_path: Path, engine_url: str, own_redis: RedisServer, unique_prefix: str
):
    env = {
        "QWENSTACK_LIMITS__REDIS_URL": own_redis.url,
        "QWENSTACK_LIMITS__KEY_PREFIX": unique_prefix,
        "QWENSTACK_LIMITS__DEFAULT_RPM": "100",
    }
    fail_open = start_gateway(tmp_path / "open", engine_url, env=env)
    fail_closed = start_gateway(tmp_path / "closed", engine_url,
                                env={**env, "QWENSTACK_LIMITS__REDIS_FAIL_OPEN": "false"})
    try:
        before = httpx.post(f"{fail_closed.url}/v1/completions", json=completion(1), timeout=60)
        assert before.status_code == 200
        own_redis.stop()
        opened = httpx.post(f"{fail_open.url}/v1/completions", json=completion(1), timeout=60)
        assert opened.status_code == 200
        assert "x-ratelimit-limit-requests" not in opened.headers
        closed = httpx.post(f"{fail_closed.url}/v1/completions", json=completion(1), timeout=60)
        _assert_openai_error(closed, 503, "rate_limiter_unavailable")
        assert closed.headers["retry-after"] == "1"
        own_redis.start()  # back: limits apply again without a restart
        again = httpx.post(f"{fail_closed.url}/v1/completions", json=completion(1), timeout=60)
        assert again.status_code == 200 and again.headers["x-ratelimit-limit-requests"] == "100"
    finally:
        fail_open.stop()
        fail_closed.stop()


class EngineTap:
    """A pass-through proxy in front of the real engine that counts the calls to each path.

    Not a fake (every call reaches the engine and its answer comes back as it is): the engine
    itself keeps no count of /tokenize calls that a test could read."""

    def __init__(self, engine_url: str) -> None:
        self.engine_url = engine_url
        self.calls: Counter[str] = Counter()
        self.url = f"http://127.0.0.1:{free_port()}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _relay(self, request: web.Request) -> web.Response:
        self.calls[request.path] += 1
        async with aiohttp.ClientSession() as session, session.request(
            request.method, self.engine_url + request.path_qs, data=await request.read(),
            headers={"content-type": request.content_type},
        ) as answer:
            return web.Response(body=await answer.read(), status=answer.status,
                                content_type=answer.content_type)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._relay)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", int(self.url.rsplit(":", 1)[1])).start()

    def __enter__(self) -> EngineTap:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def engine_tap(engine_url: str) -> Iterator[EngineTap]:
    with EngineTap(engine_url) as tap:
        yield tap


def test_a_caller_over_its_request_rate_is_refused_before_any_token_counting(
    tmp_path: Path, engine_tap: EngineTap
):
    gateway = start_gateway(tmp_path, engine_tap.url, env={
        "QWENSTACK_LIMITS__DEFAULT_RPM": "1", "QWENSTACK_LIMITS__DEFAULT_TPM": "100000",
    })
    url = f"{gateway.url}/v1/completions"
    try:
        assert httpx.post(url, json=completion(1), timeout=60).status_code == 200
        assert engine_tap.calls["/tokenize"] == 1
        for _ in range(3):
            refused = httpx.post(url, json=completion(1, prompt=["hello"] * 50), timeout=60)
            _assert_openai_error(refused, 429, "rate_limit_exceeded")
            assert "requests per minute" in refused.json()["error"]["message"]
        assert engine_tap.calls["/tokenize"] == 1  # no counting for a refused caller
    finally:
        gateway.stop()


def test_batches_are_capped_and_counted_in_one_tokenize_call(
    tmp_path: Path, engine_tap: EngineTap
):
    gateway = start_gateway(tmp_path, engine_tap.url, env={
        "QWENSTACK_LIMITS__DEFAULT_TPM": "2000", "QWENSTACK_VALIDATION__MAX_PROMPTS": "3000",
        "QWENSTACK_VALIDATION__MAX_MESSAGES": "8",
    })
    url = f"{gateway.url}/v1/completions"
    try:
        # The attack: 3,000 prompts from a 2,000-TPM key made 3,000 /tokenize calls.
        # Counted in one call (and one more, once per model, for its per-prompt special
        # tokens), then refused as larger than the whole budget.
        attack = httpx.post(url, json=completion(1, prompt=["hello there"] * 3000), timeout=60)
        _assert_openai_error(attack, 429, "rate_limit_exceeded")
        assert "Request too large" in attack.json()["error"]["message"]
        assert engine_tap.calls["/tokenize"] <= 2
        over_cap = httpx.post(url, json=completion(1, prompt=["hello there"] * 3001), timeout=60)
        _assert_openai_error(over_cap, 400, "array_above_max_length")
        assert over_cap.json()["error"]["param"] == "prompt" and "3000" in over_cap.text
        chat = {"model": MODEL, "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}] * 9}
        too_long = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat, timeout=60)
        _assert_openai_error(too_long, 400, "array_above_max_length")
        assert too_long.json()["error"]["param"] == "messages" and "8" in too_long.text
        counted_before = engine_tap.calls["/tokenize"]
        # A batch that fits: one /tokenize call, and the reservation close to the engine's
        # own count of the prompts (within a token per prompt, where joined texts meet).
        prompts = [f"hello there {i}" for i in range(20)]
        answer = httpx.post(url, json=completion(1, prompt=prompts), timeout=120)
        assert answer.status_code == 200, answer.text
        assert engine_tap.calls["/tokenize"] == counted_before + 1
        reserved = 2000 - int(answer.headers["x-ratelimit-remaining-tokens"])
        reserved_prompt = reserved - len(prompts)  # one completion token per prompt
        assert abs(reserved_prompt - answer.json()["usage"]["prompt_tokens"]) <= len(prompts)
    finally:
        gateway.stop()
