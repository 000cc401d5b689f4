"""Build a tiny random-weight Qwen3 with the real Qwen3 tokenizer: `python tiny_qwen3.py OUT_DIR`.

Runs with the engine venv's python (torch, transformers, tokenizers) plus the PyPI package
`dashscope` installed with --no-deps, whose qwen.tiktoken holds the Qwen BPE ranks. The hub is not
reachable here, so the tokenizer is rebuilt from those ranks instead of downloaded.

The model has Qwen3's architecture and full vocabulary, so vLLM serves it exactly like the real
Qwen3-4B-Instruct-2507 (same tokenizer, chat template, stop tokens), but it is small enough to
start on a CPU in about a minute. Its answers are noise; tests check plumbing, not wording.

Idempotent and crash-safe: see model_folder.build_once.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from model_folder import package_file, run, step
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE
from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM
from transformers.convert_slow_tokenizer import TikTokenConverter

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
SEED = 0  # fixed so that every build yields the same weights (and so the same greedy output)
VOCAB_SIZE = 151936  # Qwen3's embedding rows: the 151669 real tokens padded for alignment

# Qwen2/Qwen3's pre-tokenizer split: like cl100k but digits are split one by one (\p{N}).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's added tokens in id order from 151643, with their "special" flag as in the real
# tokenizer_config.json. The ones marked False (tool calls, FIM, <think>) stay in decoded text
# even with skip_special_tokens, which vLLM's tool and reasoning parsers rely on.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
FIRST_ADDED_ID = 151643
EOS, PAD = "<|im_end|>", "<|endoftext|>"

# ChatML as Qwen3-Instruct-2507 renders it (non-thinking: the generation prompt opens no <think>
# block). Tools are listed in the system turn, the assistant's calls become <tool_call> JSON
# blocks (what vLLM's hermes tool parser reads back) and tool results go back in a user turn.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and ' }}
    {{- 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' + content }}
        {%- for call in message.tool_calls or [] %}
            {%- set fn = call.function if call.function is defined else call %}
            {%- if content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# Ids of the real Qwen3 tokenizer; the build fails if the rebuilt one disagrees.
KNOWN_ENCODINGS: dict[str, list[int]] = {
    "你好": [108386],
    "Hello world": [9707, 1879],
    "<|im_start|>user\nhi<|im_end|>": [151644, 872, 198, 6023, 151645],
}


class QwenTikTokenConverter(TikTokenConverter):
    """transformers' tiktoken -> BPE converter, reading the ranks file directly.

    tiktoken's own loader would also copy the file into a cache under /tmp keyed by its path.
    """

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        ranks: dict[bytes, int] = {}
        for line in Path(tiktoken_url).read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        return ranks


def build_tokenizer() -> Tokenizer:
    ranks_file = str(package_file("dashscope", "resources/qwen.tiktoken"))
    # Derives the merges from the ranks: a token's merge is its split into two ranked halves.
    vocab, merges = QwenTikTokenConverter(ranks_file).extract_vocab_merges_from_model(ranks_file)
    if len(vocab) != FIRST_ADDED_ID:
        raise SystemExit(f"{ranks_file}: {len(vocab)} ranks, expected {FIRST_ADDED_ID}")
    # The same pipeline as the real Qwen3 tokenizer.json: NFC, regex split, byte-level BPE.
    tokenizer = Tokenizer(
        BPE(
            vocab,
            merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Added one by one so that each gets the next id, in Qwen3's order. Only add_special_tokens
    # makes decode(skip_special_tokens=True) drop a token.
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    for index, (content, _) in enumerate(ADDED_TOKENS):
        if tokenizer.token_to_id(content) != FIRST_ADDED_ID + index:
            raise SystemExit(f"{content} got id {tokenizer.token_to_id(content)}")
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json as Qwen3-4B-Instruct-2507 has it (vLLM loads it with AutoTokenizer)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(FIRST_ADDED_ID + index): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for index, (content, special) in enumerate(ADDED_TOKENS)
        },
        "additional_special_tokens": [content for content, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": PAD,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_model(out: Path) -> None:
    """Qwen3-4B's config scaled down; head_dim 64 because vLLM's CPU attention rejects 16."""
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=2,
        bos_token_id=FIRST_ADDED_ID,
        eos_token_id=FIRST_ADDED_ID + 2,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(SEED)
    # float32: on a CPU without AVX512-BF16, vLLM computes garbage in bfloat16.
    model = Qwen3ForCausalLM(config).float()
    model.save_pretrained(out, safe_serialization=True)
    # Sampling defaults as the real Instruct-2507 ships them; vLLM applies them to requests that
    # leave temperature/top_p/top_k unset. Stop on <|im_end|> or <|endoftext|>.
    GenerationConfig(
        bos_token_id=FIRST_ADDED_ID,
        eos_token_id=[FIRST_ADDED_ID + 2, FIRST_ADDED_ID],
        pad_token_id=FIRST_ADDED_ID,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    ).save_pretrained(out)


def verify(folder: Path) -> None:
    """Load the folder the way vLLM does and check it against the real Qwen3 tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text, ids in KNOWN_ENCODINGS.items():
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != ids:
            raise SystemExit(f"tokenizer encodes {text!r} to {got}, the real Qwen3 to {ids}")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if prompt != "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n":
        raise SystemExit(f"chat template renders {prompt!r}")
    if tokenizer.eos_token_id != FIRST_ADDED_ID + 2 or tokenizer.pad_token_id != FIRST_ADDED_ID:
        raise SystemExit("eos/pad tokens are wrong")


def build(out: Path) -> None:
    step("building the Qwen3 tokenizer")
    build_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    )
    step("writing random weights")
    build_model(out)
    step("checking the tokenizer")
    verify(out)


if __name__ == "__main__":
    run(REQUIRED_FILES, build)
