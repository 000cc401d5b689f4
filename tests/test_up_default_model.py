"""`qwenstack up` with no model on a CPU machine serves the bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from conftest import Stack, start_stack


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("default"), "--kv-cache-gib", "1")
    yield stack
    assert stack.stop() == 0


def test_bundled_model_knows_the_capital_of_france(default_stack: Stack):
    client = openai.OpenAI(base_url=f"{default_stack.gateway}/v1", api_key=default_stack.key)
    [model] = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct"
    answer = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in answer.choices[0].message.content
    assert "serving the bundled SmolLM2-135M-Instruct" in default_stack.log.read_text()
