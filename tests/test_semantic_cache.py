"""The semantic answer cache, through a real gateway with the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from helpers import Gateway, start_gateway

from qwenstack.gateway.protocol import InferenceRequest
from qwenstack.gateway.semantic_cache import SemanticIndex, split_question

MODEL = "tiny-qwen3"


def chat(question: str, **extra: object) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": question}], **extra}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("semantic"), engine_url,
                            env={"QWENSTACK_CACHE__SEMANTIC": "true"})
    yield gateway
    gateway.stop()


def ask(gateway: Gateway, body: dict) -> httpx.Response:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def semantic_hits(gateway: Gateway) -> float:
    page = httpx.get(f"{gateway.url}/metrics", timeout=30).text
    [line] = [
        row for row in page.splitlines()
        if row.startswith("qwenstack_cache_semantic_hits_total ")
    ]
    return float(line.split()[1])


def test_a_reworded_question_is_served_the_cached_answer(gateway: Gateway):
    first = ask(gateway, chat("What is the capital of France?"))
    assert first.headers["x-qwenstack-cache"] == "miss"
    reworded = ask(gateway, chat("What's the capital city of France?"))
    assert reworded.headers["x-qwenstack-cache"] == "hit"
    assert float(reworded.headers["x-qwenstack-cache-similarity"]) >= 0.95
    assert reworded.json()["choices"] == first.json()["choices"]
    assert semantic_hits(gateway) == 1


def test_a_different_question_or_context_is_a_miss(gateway: Gateway):
    ask(gateway, chat("How do I reset my password?"))
    hits = semantic_hits(gateway)
    # Close in wording, another question: below the threshold.
    assert ask(gateway, chat("How do I reset my router?")).headers["x-qwenstack-cache"] == "miss"
    # The same question with other sampling parameters is another request.
    other = ask(gateway, chat("How do I reset my password?", max_tokens=9))
    assert other.headers["x-qwenstack-cache"] == "miss"
    # Sampled requests are not served from any cache.
    sampled = ask(gateway, chat("How do I reset my password?", temperature=0.8))
    assert sampled.headers["x-qwenstack-cache"] == "bypass"
    assert semantic_hits(gateway) == hits


def test_a_reworded_stream_is_replayed_as_a_stream(gateway: Gateway):
    ask(gateway, chat("Explain PagedAttention in vLLM", stream=True))
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", timeout=120,
                      json=chat("What is PagedAttention in vLLM?", stream=True)) as replay:
        assert replay.headers["x-qwenstack-cache"] == "hit"
        lines = [line for line in replay.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2


def test_split_question_takes_only_a_last_plain_user_message():
    question = split_question(InferenceRequest("/v1/chat/completions", chat("Hi?")))
    assert question and question.text == "Hi?"
    assert question.context["messages"][-1] == {"role": "user", "content": None}
    assert split_question(InferenceRequest("/v1/completions", {"prompt": "Hi?"})) is None
    tool_turn = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "tool", "content": "x"}]}
    assert split_question(InferenceRequest("/v1/chat/completions", tool_turn)) is None
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}]}
    assert split_question(InferenceRequest("/v1/chat/completions", parts)) is None


def test_index_drops_the_oldest_beyond_its_bound():
    index = SemanticIndex(embedder=None, threshold=0.9, max_entries=2)
    north, east = np.array([1, 0], np.float32), np.array([0, 1], np.float32)
    index.add("ctx", north, "a")
    index.add("ctx", east, "b")
    assert index.nearest("ctx", north).key == "a"
    assert index.nearest("other", north) is None
    index.add("ctx", north, "c")  # a goes
    assert index.nearest("ctx", north).key == "c"
    index.forget("c")
    assert index.nearest("ctx", north) is None and index.nearest("ctx", east).key == "b"
