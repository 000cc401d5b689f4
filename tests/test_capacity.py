"""KV-cache arithmetic on the real Qwen3-4B-Instruct-2507 shape (tests/data holds its config)."""

import dataclasses

import pytest

from qwenstack.engine import capacity, deployment_plan
from qwenstack.engine.hardware import GIB, Hardware

QWEN3_4B = capacity.ModelShape.from_file(
    deployment_plan.SHIPPED_CONFIGS / "Qwen" / "Qwen3-4B-Instruct-2507.json"
)
CPU = Hardware(gpu_memory_bytes=(), cpu_flags=frozenset({"avx2"}), ram_available_bytes=24 * GIB)
A10 = Hardware(gpu_memory_bytes=(24 * GIB,), cpu_flags=frozenset(), ram_available_bytes=64 * GIB)
A100 = Hardware(gpu_memory_bytes=(80 * GIB,), cpu_flags=frozenset(), ram_available_bytes=64 * GIB)


def test_qwen3_4b_kv_bytes_per_token():
    # 36 layers x 8 KV heads x 128 head dim x 2 (K, V) x 2 bytes (bfloat16)
    assert QWEN3_4B.kv_bytes_per_token(2) == 147_456
    assert QWEN3_4B.max_positions == 262_144
    assert 3.9e9 < QWEN3_4B.num_params < 4.1e9


def test_dtype_follows_cpu_features_and_checkpoint():
    float32_checkpoint = dataclasses.replace(QWEN3_4B, config_dtype="float32")
    bf16_cpu = Hardware((), frozenset({"avx512_bf16"}), 24 * GIB)
    assert capacity.resolve_dtype("auto", QWEN3_4B, CPU) == "float32"
    assert capacity.resolve_dtype("auto", QWEN3_4B, bf16_cpu) == "auto"
    assert capacity.resolve_dtype("auto", float32_checkpoint, bf16_cpu) == "float32"
    assert capacity.resolve_dtype("auto", float32_checkpoint, A10) == "auto"
    assert capacity.resolve_dtype("bfloat16", QWEN3_4B, CPU) == "bfloat16"
    assert capacity.dtype_bytes("auto", QWEN3_4B, A10) == 2
    assert capacity.dtype_bytes("float32", QWEN3_4B, CPU) == 4


def _budget(hw: Hardware, **kw):
    kw.setdefault("tensor_parallel_size", 1)
    kw.setdefault("gpu_memory_utilization", 0.9)
    kw.setdefault("kv_cache_gib", None)
    return capacity.kv_budget(QWEN3_4B, 2, hw, **kw)


def test_full_context_fits_on_a100():
    assert capacity.max_model_len_to_serve(QWEN3_4B, 262_144, 2, _budget(A100)) == 262_144
    assert capacity.max_model_len_to_serve(QWEN3_4B, None, 2, _budget(A100)) == 262_144


def test_full_context_refused_on_a10_with_what_fits():
    budget = _budget(A10)
    with pytest.raises(capacity.ContextDoesNotFit) as refused:
        capacity.max_model_len_to_serve(QWEN3_4B, 262_144, 2, budget)
    message = str(refused.value)
    fits = budget.bytes // 147_456 // 16 * 16
    assert f"--max-model-len {fits:,}" in message
    assert "36.0 GiB" in message  # 262,144 x 147,456 bytes
    assert "--gpu-memory-utilization" in message
    # Unasked, the default context shrinks to what fits instead of failing.
    assert capacity.max_model_len_to_serve(QWEN3_4B, None, 2, budget) == fits
    assert 60_000 < fits < 100_000


def test_two_gpus_double_the_budget():
    two = Hardware((24 * GIB, 24 * GIB), frozenset(), 64 * GIB)
    assert _budget(two, tensor_parallel_size=2).bytes > 2 * _budget(A10).bytes


def test_cpu_budget_is_the_configured_kv_cache():
    budget = _budget(CPU, kv_cache_gib=4)
    assert budget.bytes == 4 * GIB
    with pytest.raises(capacity.ContextDoesNotFit, match="--kv-cache-gib"):
        capacity.max_model_len_to_serve(QWEN3_4B, 262_144, 4, budget)
    assert capacity.max_model_len_to_serve(QWEN3_4B, 8192, 4, budget) == 8192


def test_context_beyond_model_positions_refused():
    with pytest.raises(capacity.ContextDoesNotFit, match="262,144 positions"):
        capacity.max_model_len_to_serve(QWEN3_4B, 300_000, 2, _budget(A100))
