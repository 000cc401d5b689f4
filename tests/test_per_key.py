"""Limits, answer cache and metrics per API key, through real gateway processes.

Two gateways share one PostgreSQL key store (and pepper) and one Redis for their limits; keys
are made with `qwenstack keys create`, as an operator would. Every test makes keys of its own,
so their budgets, cache entries and metric series start empty.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import forkhost
import httpx
import jwt
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from helpers import Gateway, create_key, held_stream, metric, start_gateway

from qwenstack import database as db
from qwenstack.callers import Caller
from qwenstack.gateway import usage
from qwenstack.gateway.limit_stores import MemoryStore, Quota
from qwenstack.gateway.limits import Limiter
from qwenstack.keys import KeyStore
from qwenstack.settings import LimitSettings

MODEL = "tiny-qwen3"
CACHE_HEADER = "x-qwenstack-cache"
JWT_SECRET = "per-key-test-secret-of-at-least-32-bytes"
JWT_ISSUER, JWT_AUDIENCE = "https://id.example.test", "qwenstack"
CACHE_ALL_CLAIM = "qs_cache_all"  # a mapped claim name, as an identity provider might use


def completion(max_tokens: int, **extra: object) -> dict:
    # "hello there" is 2 tokens for the Qwen3 tokenizer; with ignore_eos the completion is
    # exactly max_tokens long.
    return {"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, **extra}


def chat(content: str, **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, "temperature": 0, **extra}


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


@dataclass
class KeyedGateways:
    gateways: list[Gateway]  # two, sharing the key store and the limits' Redis
    env: dict[str, str]
    home: Path

    def key(self, name: str, *options: str) -> str:
        """`qwenstack keys create --name NAME OPTIONS...` against the shared key store."""
        return create_key(self.home, "--name", name, *options, env=self.env)

    def post(self, gateway: int, secret: str, body: dict,
             path: str = "/v1/completions") -> httpx.Response:
        return httpx.post(self.gateways[gateway].url + path, json=body, headers=bearer(secret),
                          timeout=120)

    @functools.cached_property
    def metrics_key(self) -> str:
        """A key of its own, as Prometheus has one: /metrics needs a key (auth.protect_metrics)."""
        return self.key("prometheus")

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value summed over both gateways' /metrics (0 when there is none)."""
        return sum(metric(gateway.url, bearer(self.metrics_key), name, **labels)
                   for gateway in self.gateways)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, engine_url: str, postgres_url: str,
          redis_url: str) -> Iterator[KeyedGateways]:
    tmp = tmp_path_factory.mktemp("per-key")
    env = {
        "QWENSTACK_DATABASE_URL": postgres_url,
        "QWENSTACK_AUTH__PEPPER": "per-key-test-pepper",
        "QWENSTACK_LIMITS__REDIS_URL": redis_url,
        "QWENSTACK_LIMITS__KEY_PREFIX": f"qwenstack-test-{os.getpid()}-{time.monotonic_ns()}:",
        "QWENSTACK_AUTH__JWT__SECRET": JWT_SECRET,
        "QWENSTACK_AUTH__JWT__ISSUER": JWT_ISSUER,
        "QWENSTACK_AUTH__JWT__AUDIENCE": JWT_AUDIENCE,
        "QWENSTACK_AUTH__JWT__CLAIMS__CACHE_ALL": CACHE_ALL_CLAIM,
    }
    gateways: list[Gateway] = []
    try:
        for name in ("a", "b"):
            gateways.append(start_gateway(tmp / name, engine_url, env=env, auth=True))
        yield KeyedGateways(gateways, env, tmp / "keys")
    finally:
        for gateway in gateways:
            gateway.stop()


async def _post_all(calls: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    """(gateway URL, key, body) each, all at once."""
    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*(
            client.post(f"{url}/v1/completions", json=body, headers=bearer(secret))
            for url, secret, body in calls
        ))


def _assert_rate_limited(response: httpx.Response, what: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert what in error["message"]
    assert int(response.headers["retry-after"]) >= 1


def test_rpm_of_a_key_holds_across_two_gateways(keyed: KeyedGateways):
    limited = keyed.key("rpm-five", "--rpm", "5")
    other = keyed.key("rpm-other", "--rpm", "5")
    urls = [g.url for g in keyed.gateways] * 10
    responses = asyncio.run(_post_all([(url, limited, completion(1)) for url in urls]))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 5 and len(refused) == 15, [r.status_code for r in responses]
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3, 4]
    for response in refused:
        _assert_rate_limited(response, "requests per minute")
        headers = response.headers
        assert headers["x-ratelimit-limit-requests"] == "5"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert int(headers["retry-after"]) <= 12  # one request comes back every 12 s
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        assert int(headers["retry-after-ms"]) <= 12_000
        assert "x-ratelimit-limit-tokens" not in headers
    # Another key in the same minute has its whole budget, on either gateway.
    for gateway, remaining in ((0, "4"), (1, "3")):
        response = keyed.post(gateway, other, completion(1))
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-remaining-requests"] == remaining
    assert keyed.metric("qwenstack_rate_limited_total", key="rpm-five", limit="requests") == 15
    assert keyed.metric("qwenstack_rate_limited_total", key="rpm-other") == 0
    assert keyed.metric("qwenstack_requests_total", key="rpm-five", status="429") == 15
    assert keyed.metric("qwenstack_requests_total", key="rpm-five", status="200") == 5


def test_tpm_of_a_key_counts_prompt_and_completion_tokens(keyed: KeyedGateways):
    # 2 prompt + 15 completion tokens a request: two fit in 40, the third does not (the bucket
    # refills by 40/60 a second, so it would need ~16 s more).
    limited = keyed.key("tpm-forty", "--tpm", "40")
    other = keyed.key("tpm-other", "--tpm", "40")
    for gateway in (0, 1):
        response = keyed.post(gateway, limited, completion(15))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["total_tokens"] == 17
        assert response.headers["x-ratelimit-limit-tokens"] == "40"
    refused = keyed.post(0, limited, completion(15))
    _assert_rate_limited(refused, "tokens per minute")
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 17
    # Chat prompts are counted with the chat template applied, and by the other gateway too.
    refused_chat = keyed.post(1, limited, chat("hello there"), "/v1/chat/completions")
    _assert_rate_limited(refused_chat, "tokens per minute")
    assert keyed.post(1, other, completion(15)).status_code == 200
    assert keyed.metric("qwenstack_rate_limited_total", key="tpm-forty", limit="tokens") == 2
    assert keyed.metric("qwenstack_rate_limited_total", key="tpm-other") == 0


def test_tpm_of_a_key_counts_streamed_tokens(keyed: KeyedGateways):
    # A stream's tokens are known only from its last event: were they missed, the reservation
    # would be refunded whole and the third stream let through.
    limited = keyed.key("tpm-streams", "--tpm", "40")
    for gateway in (0, 1):
        with httpx.stream("POST", f"{keyed.gateways[gateway].url}/v1/completions",
                          json=completion(15, stream=True), headers=bearer(limited),
                          timeout=120) as response:
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-tokens"] == "40"
            assert list(response.iter_lines())[-2] == "data: [DONE]"
    _assert_rate_limited(keyed.post(0, limited, completion(15, stream=True)), "tokens per minute")


def test_max_concurrency_of_a_key_across_two_gateways(keyed: KeyedGateways):
    limited = keyed.key("one-at-a-time", "--max-concurrency", "1")
    other = keyed.key("one-at-a-time-too", "--max-concurrency", "1")
    a, b = (g.url for g in keyed.gateways)
    with held_stream(a, headers=bearer(limited)):
        second = keyed.post(1, limited, {**completion(4), "stream": True})
        _assert_rate_limited(second, "concurrent requests")
        with held_stream(b, headers=bearer(other)):  # asserts its 200
            pass
    # The first stream's client left: its slot is free again (released as the gateway notices).
    for _ in range(50):
        again = keyed.post(1, limited, completion(1))
        if again.status_code != 429:
            break
        time.sleep(0.1)
    assert again.status_code == 200, again.text
    assert keyed.metric(
        "qwenstack_rate_limited_total", key="one-at-a-time", limit="concurrency") >= 1
    assert keyed.metric("qwenstack_rate_limited_total", key="one-at-a-time-too") == 0


def test_each_key_has_its_own_answer_cache(keyed: KeyedGateways):
    first, second = keyed.key("cache-tenant-a"), keyed.key("cache-tenant-b")
    body = chat("Which key asked this first?")

    def cached(secret: str) -> str:
        response = keyed.post(0, secret, body, "/v1/chat/completions")
        assert response.status_code == 200, response.text
        return response.headers[CACHE_HEADER]

    assert cached(first) == "miss"
    assert cached(second) == "miss"  # A's answer is not B's to see
    assert cached(first) == "hit"
    assert cached(second) == "hit"


def test_shared_cache_serves_one_keys_answer_to_another(
    keyed: KeyedGateways, tmp_path: Path, engine_url: str
):
    shared = start_gateway(tmp_path, engine_url, auth=True,
                           env={**keyed.env, "QWENSTACK_CACHE__SHARED_ACROSS_CALLERS": "true"})
    try:
        first, second = keyed.key("shared-tenant-a"), keyed.key("shared-tenant-b")
        body = chat("Is this cache shared?")
        answers = []
        for secret, expected in ((first, "miss"), (second, "hit")):
            response = httpx.post(f"{shared.url}/v1/chat/completions", json=body,
                                  headers=bearer(secret), timeout=60)
            assert response.status_code == 200, response.text
            assert response.headers[CACHE_HEADER] == expected
            answers.append(response.json()["choices"])
        assert answers[0] == answers[1]
    finally:
        shared.stop()


def _sampled_twice(post, body: dict) -> tuple[list[str], list[dict]]:
    responses = [post(body) for _ in range(2)]
    for response in responses:
        assert response.status_code == 200, response.text
    return [r.headers[CACHE_HEADER] for r in responses], [r.json()["choices"] for r in responses]


def test_cache_all_key_is_served_sampled_answers_from_the_cache(keyed: KeyedGateways):
    sampler, plain = keyed.key("cache-all-cli", "--cache-all"), keyed.key("no-cache-all-cli")
    body = chat("Tell me something random.", temperature=0.8)

    def post_as(secret: str):
        return lambda b: keyed.post(0, secret, b, "/v1/chat/completions")

    results, choices = _sampled_twice(post_as(sampler), body)
    assert results == ["miss", "hit"] and choices[0] == choices[1]
    assert _sampled_twice(post_as(plain), body)[0] == ["bypass", "bypass"]

    listing = forkhost.run(["keys", "list", "--home", str(keyed.home)],
                           env={**os.environ, **keyed.env}, check=True).stdout.splitlines()
    column = listing[0].split().index("CACHE_ALL")
    rows = {line.split()[0]: line.split()[column] for line in listing[1:]}
    assert rows["cache-all-cli"] == "yes" and rows["no-cache-all-cli"] == "no"


def test_cache_all_through_the_admin_api_and_a_jwt_claim(keyed: KeyedGateways):
    admin = bearer(keyed.key("per-key-admin", "--admin"))
    url = keyed.gateways[1].url
    made = httpx.post(f"{url}/admin/keys", headers=admin, timeout=30,
                      json={"name": "cache-all-api", "cache_all": True})
    assert made.status_code == 201, made.text
    assert made.json()["cache_all"] is True
    listed = httpx.get(f"{url}/admin/keys", headers=admin, timeout=30).json()["data"]
    flags = {key["name"]: key["cache_all"] for key in listed}
    assert flags["cache-all-api"] is True and flags["per-key-admin"] is False
    bad = httpx.post(f"{url}/admin/keys", headers=admin, timeout=30,
                     json={"name": "cache-all-bad", "cache_all": "sometimes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_all"

    body = chat("Sample this, admin-made key.", temperature=0.8)
    results, _ = _sampled_twice(
        lambda b: keyed.post(1, made.json()["key"], b, "/v1/chat/completions"), body)
    assert results == ["miss", "hit"]

    def token(**claims: object) -> str:
        return jwt_token(sub="sampler", **claims)

    body = chat("Sample this, token holder.", temperature=0.8)
    for claims, expected in (({CACHE_ALL_CLAIM: True}, ["miss", "hit"]),
                             ({CACHE_ALL_CLAIM: "yes"}, ["bypass", "bypass"]),  # not `true`
                             ({"cache_all": True}, ["bypass", "bypass"])):  # not the mapped name
        results, _ = _sampled_twice(
            # `claims` bound now, not looked up when the lambda runs
            lambda b, claims=claims: keyed.post(1, token(**claims), b, "/v1/chat/completions"),
            body)
        assert results == expected, claims
        body = {**body, "messages": [{"role": "user", "content": f"Again, {claims}"}]}


def test_thinking_off_by_key_admin_api_and_jwt_claim(keyed: KeyedGateways):
    """A key made --no-thinking (or `thinking: false` by the admin API, or a JWT with the claim
    false) has its chat requests sent with enable_thinking false, whatever they ask. The tiny
    model's template reads no such switch, so the answer cache tells: asking to think gets the
    answer stored for not thinking."""
    admin = bearer(keyed.key("thinking-admin", "--admin"))
    made = httpx.post(f"{keyed.gateways[0].url}/admin/keys", headers=admin, timeout=30,
                      json={"name": "no-thinking-api", "thinking": False})
    assert made.status_code == 201 and made.json()["thinking"] is False, made.text
    callers = {
        "cli": (keyed.key("no-thinking-cli", "--no-thinking"), ["miss", "hit"]),
        "api": (made.json()["key"], ["miss", "hit"]),
        "jwt": (jwt_token(sub="no-thinker", thinking=False), ["miss", "hit"]),
        "plain key": (keyed.key("thinking-allowed"), ["miss", "miss"]),
        "plain jwt": (jwt_token(sub="thinker"), ["miss", "miss"]),
    }
    for name, (secret, expected) in callers.items():
        results = [keyed.post(0, secret, chat(f"Think about it, {name}.",
                                              chat_template_kwargs={"enable_thinking": enable}),
                              "/v1/chat/completions").headers[CACHE_HEADER]
                   for enable in (False, True)]
        assert results == expected, name


def test_migrations_keep_old_keys_and_usage_rows(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")  # the schema before cache_all
        connection.execute(sa.text(
            "INSERT INTO api_keys (name, digest, prefix, admin, created_at) "
            "VALUES ('old-key', 'd1', 'sk-qs-abcdef', false, '2026-01-01 00:00:00')"
        ))
        connection.execute(sa.insert(sa.table(
            "usage_records", *(sa.column(c) for c in (
                "time", "request_id", "caller", "route", "model", "status", "prompt_tokens",
                "completion_tokens", "latency_ms")),
        )), {"time": db.now(), "request_id": "r1", "caller": "old-key", "route": "/v1/completions",
             "model": MODEL, "status": 200, "prompt_tokens": 2, "completion_tokens": 3,
             "latency_ms": 9.0})
    engine.dispose()
    store = KeyStore(db.connect(url), b"pepper")  # connect migrates to head
    try:
        (old,) = store.list()
        assert old.name == "old-key" and old.cache_all is False and old.thinking is True
        assert store.create("new-key", cache_all=True)[0].caller.cache_all is True
        assert store.create("quiet-key", thinking=False)[0].caller.thinking is False
        (row,) = usage.totals(store.engine, "key", dt.timedelta(days=1))
        assert (row["key"], row["requests"], row["cached"], row["tool_calls"]) == (
            "old-key", 1, 0, 0)
        with store.engine.connect() as connection:  # asked for as served, as far as it knew
            assert connection.execute(sa.text(
                "SELECT requested_model FROM usage_records")).scalar_one() is None
    finally:
        store.engine.dispose()


def test_requests_and_tokens_are_counted_per_key(keyed: KeyedGateways):
    metered = keyed.key("metered", "--rpm", "2")
    assert keyed.post(0, metered, completion(3)).status_code == 200
    streamed = keyed.post(1, metered, completion(3, stream=True))  # no usage event asked for
    assert streamed.status_code == 200 and '"usage"' not in streamed.text
    _assert_rate_limited(keyed.post(0, metered, completion(3)), "requests per minute")
    route = "/v1/completions"
    assert keyed.metric("qwenstack_requests_total", key="metered", route=route, model=MODEL,
                        status="200") == 2
    assert keyed.metric("qwenstack_requests_total", key="metered", status="429") == 1
    assert keyed.metric("qwenstack_prompt_tokens_total", key="metered", model=MODEL) == 4
    assert keyed.metric("qwenstack_completion_tokens_total", key="metered", model=MODEL) == 6
    assert keyed.metric("qwenstack_rate_limited_total", key="metered", limit="requests") == 1


def jwt_token(**claims: object) -> str:
    return jwt.encode({"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": int(time.time()) + 300,
                       **claims}, JWT_SECRET, algorithm="HS256")


def test_limits_and_metrics_of_a_jwt_caller(keyed: KeyedGateways):
    token = jwt_token(sub="svc-batch", rpm=2)
    assert [keyed.post(g, token, completion(1)).status_code for g in (0, 1)] == [200, 200]
    _assert_rate_limited(keyed.post(0, token, completion(1)), "requests per minute")
    # Metrics name every JWT caller `jwt`: subjects are unbounded, label values are kept for
    # the life of the process.
    assert keyed.metric("qwenstack_requests_total", key="jwt", status="200") >= 2
    assert keyed.metric("qwenstack_rate_limited_total", key="jwt", limit="requests") >= 1
    for gateway in keyed.gateways:
        assert "svc-batch" not in httpx.get(f"{gateway.url}/metrics", timeout=30).text


def test_rate_limit_buckets_are_bounded_for_jwt_subjects():
    """One gateway process keeps at most `auth.jwt.max_subjects` buckets, least recently used
    dropped; a bucket in use is kept. (The store alone: a million signed subjects through
    HTTP would only measure the machine.)"""
    store = MemoryStore(max_buckets=100)
    one_a_minute, one_at_a_time = Quota(rpm=1, tpm=None, concurrency=None), Quota(1, None, 1)

    async def scenario() -> None:
        assert (await store.acquire("jwt:busy", one_a_minute, 0, "lease")).refused is None
        for i in range(1000):
            await store.acquire(f"jwt:{i}", one_at_a_time, 0, "lease")
            await store.settle(f"jwt:{i}", one_at_a_time, 0, "lease")
            if i % 50 == 0:  # the busy subject keeps using its bucket: never dropped, so spent
                assert (await store.acquire("jwt:busy", one_a_minute, 0, "l")).refused
        assert len(store._buckets) == 100 and "jwt:busy" in store._buckets
        assert not store._held  # nothing in flight: nothing held

    asyncio.run(scenario())


def test_usage_report_counts_cache_hits_of_a_key(keyed: KeyedGateways):
    admin = bearer(keyed.key("usage-reader", "--admin"))
    caller = keyed.key("cache-usage")
    responses = [keyed.post(0, caller, chat("Count me once at the engine."),
                            "/v1/chat/completions") for _ in range(2)]
    assert [r.headers[CACHE_HEADER] for r in responses] == ["miss", "hit"]
    tokens = responses[0].json()["usage"]["completion_tokens"]
    deadline = time.monotonic() + 10
    while True:  # rows are written every 0.5 s
        report = httpx.get(f"{keyed.gateways[1].url}/admin/usage?by=key&since=1h",
                           headers=admin, timeout=30).json()["data"]
        mine = next((entry for entry in report if entry["key"] == "cache-usage"), None)
        if (mine and mine["requests"] == 2) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # The caller got both answers; the engine made one.
    assert mine and mine["cached"] == 1 and mine["completion_tokens"] == 2 * tokens
    assert keyed.metric("qwenstack_requests_total", key="cache-usage", status="200") == 2
    assert keyed.metric("qwenstack_completion_tokens_total", key="cache-usage") == tokens


def test_a_caller_reads_its_own_quota_and_nobody_else_s(keyed: KeyedGateways):
    """GET /v1/quota: the caller's limits and what its buckets hold, shared by both gateways
    (Redis), read without taking anything; no way to name another caller."""
    limited = keyed.key("quota-limited", "--rpm", "2", "--tpm", "100000", "--max-concurrency", "3")
    other = keyed.key("quota-other", "--rpm", "5")
    unlimited = keyed.key("quota-unlimited")

    def quota(secret: str, gateway: int = 0, **params: str) -> dict:
        response = httpx.get(f"{keyed.gateways[gateway].url}/v1/quota", params=params,
                             headers=bearer(secret), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    assert quota(limited) == {
        "object": "quota", "caller": "quota-limited",
        "limits": {"requests_per_minute": 2, "tokens_per_minute": 100000, "max_concurrency": 3},
        "remaining": {"requests": 2, "tokens": 100000},
    }
    for _ in range(3):  # reading takes nothing
        assert quota(limited, gateway=1)["remaining"]["requests"] == 2
    assert keyed.post(1, limited, completion(4)).status_code == 200
    # The request, taken on the other gateway; 2 a minute come back one per 30 s.
    left = quota(limited)["remaining"]
    assert left["requests"] == 1 and left["tokens"] <= 100000
    # Another caller's figures are its own: a parameter naming someone is not read.
    mine = quota(other, caller="quota-limited", key="quota-limited", name="quota-limited")
    assert mine["caller"] == "quota-other" and mine["remaining"] == {"requests": 5, "tokens": None}
    assert quota(unlimited) == {
        "object": "quota", "caller": "quota-unlimited",
        "limits": {"requests_per_minute": None, "tokens_per_minute": None,
                   "max_concurrency": None},
        "remaining": {"requests": None, "tokens": None},
    }
    # A JWT's limits come from its claims; its caller is its subject.
    token = jwt_token(sub="quota-holder", rpm=7)
    assert quota(token)["caller"] == "jwt:quota-holder"
    assert quota(token)["limits"]["requests_per_minute"] == 7

    url = f"{keyed.gateways[0].url}/v1/quota"
    for headers in ({}, bearer("sk-qs-not-a-key"), bearer(limited + "x"),
                    {"authorization": limited}):
        refused = httpx.get(url, headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
    wrong_method = httpx.post(url, headers=bearer(limited), json={"caller": "quota-other"},
                              timeout=30)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_reading_what_is_left_takes_nothing_from_a_memory_bucket():
    async def scenario() -> None:
        limiter = Limiter(LimitSettings(), max_buckets=10)
        caller = Caller("memory-quota", rpm=3, tpm=1000)
        assert await limiter.remaining(Caller("free")) is None  # no limits: nothing to read
        for _ in range(3):
            levels = await limiter.remaining(caller)
            assert levels and (levels.requests_left, levels.tokens_left) == (3, 1000)
        await limiter.store.acquire(caller.name, limiter.quota(caller), 100, "lease")
        levels = await limiter.remaining(caller)
        assert levels and levels.requests_left < 2.1 and levels.tokens_left < 901

    asyncio.run(scenario())
