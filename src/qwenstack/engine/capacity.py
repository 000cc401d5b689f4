"""KV-cache arithmetic: how long a context fits, decided before vLLM spends a minute loading.

vLLM refuses to start when one sequence of `max_model_len` tokens does not fit in the KV cache,
but only after loading the weights and profiling memory. The same answer follows from the model's
config: every token keeps a key and a value vector per layer and KV head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenstack.engine.hardware import GIB, Hardware
from qwenstack.errors import SetupError

# vLLM allocates the KV cache in blocks of 16 tokens.
BLOCK_TOKENS = 16
# What a GPU needs beside weights and KV cache (activations, CUDA graphs), kept back from the
# budget.
GPU_ACTIVATION_RESERVE_BYTES = 1 * GIB
# On a CPU the KV-cache size is always given to vLLM, so that this check and vLLM agree.
DEFAULT_CPU_KV_CACHE_GIB = 4.0

DTYPE_BYTES = {
    "float32": 4, "float": 4,
    "float16": 2, "half": 2, "bfloat16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1,
}


class ContextDoesNotFit(SetupError):
    """The requested context window cannot be served with the memory available."""


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    num_params: int
    config_dtype: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        # Multimodal configs nest the language model's shape.
        config = config.get("text_config", config)
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        kv_heads = config.get("num_key_value_heads") or heads
        layers = config["num_hidden_layers"]
        vocab = config["vocab_size"]
        intermediate = config.get("intermediate_size", 4 * hidden)
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o, k, v projections
        mlp = 3 * hidden * intermediate  # gate, up, down
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
        return cls(
            num_layers=layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_positions=config.get("max_position_embeddings", 2048),
            num_params=embeddings + layers * (attention + mlp),
            config_dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
        )

    @classmethod
    def from_file(cls, path: Path) -> ModelShape:
        return cls.from_config(json.loads(path.read_text()))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * dtype_bytes

    def kv_formula(self, dtype_bytes: int) -> str:
        return (
            f"{self.num_layers} layers x {self.num_kv_heads} KV heads x {self.head_dim} head dim"
            f" x 2 (K and V) x {dtype_bytes} bytes = {self.kv_bytes_per_token(dtype_bytes):,} bytes"
        )


def resolve_dtype(requested: str, shape: ModelShape, hardware: Hardware) -> str:
    """The dtype to pass to vLLM: `auto`, except where vLLM's `auto` gives wrong answers on a CPU.

    On a CPU without AVX512-BF16, bfloat16 computes garbage. And vLLM's `auto` serves a float32
    checkpoint in bfloat16 on a CPU: the bundled SmolLM2 (dequantised to float32) then answered
    nonsense where float32 answers right, even on an AVX512-BF16 CPU.
    """
    if requested != "auto" or hardware.has_gpu:
        return requested
    config_dtype = shape.config_dtype.removeprefix("torch.")
    if not hardware.cpu_has_bf16 or config_dtype in ("float32", "float"):
        return "float32"
    return requested


def dtype_bytes(dtype: str, shape: ModelShape, hardware: Hardware) -> int:
    """Bytes per element vLLM will use for weights and KV cache under `dtype`."""
    if dtype == "auto":
        dtype = shape.config_dtype
        # vLLM's `auto` serves float32 checkpoints in half precision on GPUs.
        if dtype in ("float32", "float") and hardware.has_gpu:
            dtype = "float16"
    return DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)


@dataclass(frozen=True)
class KvBudget:
    bytes: int
    how_to_raise: str  # the flag that gives the KV cache more memory


def kv_budget(
    shape: ModelShape,
    weight_dtype_bytes: int,
    hardware: Hardware,
    *,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    kv_cache_gib: float | None,
) -> KvBudget:
    if kv_cache_gib is not None:
        return KvBudget(int(kv_cache_gib * GIB), "--kv-cache-gib")
    if hardware.has_gpu:
        gpus = hardware.gpu_memory_bytes[:tensor_parallel_size]
        usable = int(min(gpus) * len(gpus) * gpu_memory_utilization)
        weights = shape.num_params * weight_dtype_bytes
        return KvBudget(
            max(0, usable - weights - GPU_ACTIVATION_RESERVE_BYTES * len(gpus)),
            "--gpu-memory-utilization or --tensor-parallel-size",
        )
    return KvBudget(int(DEFAULT_CPU_KV_CACHE_GIB * GIB), "--kv-cache-gib")


def max_model_len_to_serve(
    shape: ModelShape,
    requested: int | None,
    kv_dtype_bytes: int,
    budget: KvBudget,
) -> int:
    """The context window to serve: `requested`, or the model's maximum lowered to what fits.

    Raises ContextDoesNotFit with what fits and which flag to change.
    """
    per_token = shape.kv_bytes_per_token(kv_dtype_bytes)
    fits = budget.bytes // per_token // BLOCK_TOKENS * BLOCK_TOKENS
    if requested is not None and requested > shape.max_positions:
        raise ContextDoesNotFit(
            f"--max-model-len {requested:,} exceeds the model's {shape.max_positions:,} positions;"
            f" pass --max-model-len {min(shape.max_positions, fits):,} or lower."
        )
    wanted = requested if requested is not None else shape.max_positions
    if wanted <= fits:
        return wanted
    if requested is None and fits >= BLOCK_TOKENS:
        return fits
    raise ContextDoesNotFit(
        f"A context of {wanted:,} tokens needs {wanted * per_token / GIB:.1f} GiB of KV cache"
        f" ({shape.kv_formula(kv_dtype_bytes)} per token), but {budget.bytes / GIB:.1f} GiB is"
        f" available, which holds {fits:,} tokens. Pass --max-model-len {fits:,} or lower,"
        f" or give the KV cache more memory with {budget.how_to_raise}."
    )
