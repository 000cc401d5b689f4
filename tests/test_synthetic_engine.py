"""The relay-ceiling benchmark's synthetic engine speaks what the gateway relays: the OpenAI SDK
reads its answers directly and through a gateway with auth, limits and usage rows on.

The synthetic engine (qwenstack.bench.synthetic_engine) is a stand-in for vLLM by design: it
answers at token rates this machine's real engine cannot reach, so that the benchmark measures
what is in front of it. Its bytes were checked against vLLM 0.32's own pydantic classes; these
tests keep it a faithful client-side double. No timing is asserted here (benchmarks/).
"""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from helpers import create_key, free_port, start_gateway, usage_rows, wait_until_answering

from qwenstack.bench.synthetic_engine import MODEL, PACE_PATH


@pytest.fixture(scope="module")
def synthetic_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("synthetic") / "engine.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "qwenstack.bench.synthetic_engine", "--port", str(port),
         "--tokens-per-s", "500"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(process, f"{url}/health", log, timeout_s=60)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def set_stream_interval(engine: str, tokens: int) -> None:
    httpx.post(engine + PACE_PATH, json={"stream_interval": tokens}, timeout=10).raise_for_status()


def read_stream(client: openai.OpenAI, max_tokens: int) -> tuple[list, str]:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "one two three"}],
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, text


@pytest.mark.parametrize("interval", [1, 4])
def test_the_sdk_reads_its_stream_directly(synthetic_engine: str, interval: int):
    set_stream_interval(synthetic_engine, interval)
    client = openai.OpenAI(base_url=f"{synthetic_engine}/v1", api_key="none")
    chunks, text = read_stream(client, 10)
    assert text == "x" * 10
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # The first token at once, then `interval` tokens per event: 1 + 9 at 1, 1 + 3 at 4.
    content_events = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_events) == 1 + -(-9 // interval)


def test_the_gateway_relays_it_with_auth_limits_and_usage_on(synthetic_engine: str,
                                                            tmp_path: Path):
    set_stream_interval(synthetic_engine, 1)
    key = create_key(tmp_path / "home", "--name", "bench", "--rpm", "1000", "--tpm", "1000000")
    gateway = start_gateway(tmp_path, synthetic_engine, auth=True)
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key)
        chunks, text = read_stream(client, 12)
        assert text == "x" * 12 and chunks[-1].usage.completion_tokens == 12
        whole = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        answer = whole.parse()
        assert answer.choices[0].message.content == "xxxxx"
        assert answer.usage.completion_tokens == 5
        # Without include_usage the client gets no usage event, and the gateway still counts.
        plain = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
        assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason
        request_id = whole.headers["x-request-id"]
        rows = usage_rows(f"sqlite:///{gateway.home / 'qwenstack.db'}", {request_id})
        assert rows[request_id].completion_tokens == 5 and rows[request_id].status == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-qs-wrong").models.list()
    finally:
        gateway.stop()
