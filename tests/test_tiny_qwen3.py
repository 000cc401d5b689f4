"""The test model carries the real Qwen3 tokenizer, rebuilt from dashscope's qwen.tiktoken."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_qwen3 / "tokenizer.json"))


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("你好", [108386]),
        ("Hello world", [9707, 1879]),
        ("<|im_start|>user\nhi<|im_end|>", [151644, 872, 198, 6023, 151645]),
        ("<think>\n\n</think>", [151667, 271, 151668]),
        ("<|endoftext|>", [151643]),
    ],
)
def test_encodes_like_the_real_qwen3_tokenizer(tokenizer: Tokenizer, text: str, ids: list[int]):
    assert tokenizer.encode(text, add_special_tokens=False).ids == ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_model_is_a_qwen3_vllm_can_serve_on_cpu(tiny_qwen3: Path):
    config = json.loads((tiny_qwen3 / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] >= 64  # vLLM's CPU attention rejects smaller heads
    assert config["vocab_size"] == 151936
    template = json.loads((tiny_qwen3 / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template and "add_generation_prompt" in template
