"""The engines' prefix cache is scoped per tenant: the gateway salts each caller's requests.

Measured on the real engine's own counters (vLLM's prefix-cache hits and queries, in tokens):
the same long prompt sent by two callers, through a gateway that salts (the default) and one
that does not, and by two callers configured to share one prefix cache.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import create_key, start_gateway
from prometheus_client.parser import text_string_to_metric_families

# Other test processes' engine tests wait while these run: this module reads the engines'
# prefix-cache counters.
pytestmark = pytest.mark.engine_exclusive

MODEL = "tiny-qwen3"


def _prefix_cache_counters(engine_url: str) -> tuple[float, float]:
    """vLLM's (hits, queries) prefix-cache token counters, summed over its labels."""
    page = httpx.get(f"{engine_url}/metrics", timeout=10).text
    totals = {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["vllm:prefix_cache_hits_total"], totals["vllm:prefix_cache_queries_total"]


def _hits(gateway_url: str, engine_url: str, key: str, prompt: str) -> float:
    """Prefix-cache hits (tokens) of one request, read once the engine has counted it."""
    hits_before, queries_before = _prefix_cache_counters(engine_url)
    answer = httpx.post(f"{gateway_url}/v1/completions", timeout=120,
                        headers={"authorization": f"Bearer {key}"},
                        json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert answer.status_code == 200, answer.text
    prompt_tokens = answer.json()["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 10
    while True:
        hits, queries = _prefix_cache_counters(engine_url)
        if queries - queries_before >= prompt_tokens:
            return hits - hits_before
        assert time.monotonic() < deadline, "the engine never counted the request's prompt"
        time.sleep(0.1)


def _long_prompt() -> str:
    # Unique per call, so no earlier test's cache entry can answer it; about 400 tokens.
    return f"{uuid.uuid4()} " + " ".join(f"line {i} of a long shared system prompt."
                                         for i in range(50))


def test_prefix_cache_hits_only_within_a_tenant_unless_shared(tmp_path: Path, engine_url: str):
    salted = start_gateway(tmp_path / "salted", engine_url, auth=True, env={
        "QWENSTACK_VALIDATION__PREFIX_CACHE_GROUPS": '{"team-c": "support", "team-d": "support"}',
    })
    unsalted = start_gateway(tmp_path / "unsalted", engine_url, auth=True, env={
        "QWENSTACK_VALIDATION__PREFIX_CACHE_PER_CALLER": "false",
    })
    try:
        a, b, c, d = (create_key(salted.home, "--name", f"team-{n}") for n in "abcd")
        prompt = _long_prompt()
        first = _hits(salted.url, engine_url, a, prompt)
        other_tenant = _hits(salted.url, engine_url, b, prompt)
        same_tenant = _hits(salted.url, engine_url, a, prompt)
        shared = _long_prompt()
        _hits(salted.url, engine_url, c, shared)
        same_group = _hits(salted.url, engine_url, d, shared)

        a2, b2 = (create_key(unsalted.home, "--name", f"team-{n}") for n in "ab")
        open_prompt = _long_prompt()
        _hits(unsalted.url, engine_url, a2, open_prompt)
        unsalted_other_tenant = _hits(unsalted.url, engine_url, b2, open_prompt)
    finally:
        salted.stop()
        unsalted.stop()
    print(f"prefix-cache hit tokens: first {first}, other tenant {other_tenant}, same tenant "
          f"{same_tenant}, same group {same_group}; without salt, other tenant "
          f"{unsalted_other_tenant}")
    assert first == 0 and other_tenant == 0  # another tenant's prompt: nothing to time
    assert same_tenant > 0 and same_group > 0  # a tenant (or group) still gets its own hits
    assert unsalted_other_tenant > 0  # what the salt takes away
