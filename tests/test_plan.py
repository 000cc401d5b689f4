"""`qwenstack plan` for Qwen3-4B-Instruct-2507 against figures worked out by hand.

The model (its config.json as qwenstack ships it, engine/model_configs): hidden 2,560, 36
layers, 32 query and 8 KV heads of 128 dims, MLP 9,728, vocab 151,936, tied embeddings.

  parameters  = embeddings 151,936 x 2,560                         =   388,956,160
              + 36 layers x (attention 2,560 x 128 x (2x32 + 2x8)  =    26,214,400
                             + MLP 3 x 2,560 x 9,728              =    74,711,040)
                                                                   = 4,022,272,000
  weights     = 4,022,272,000 x 2 bytes (bfloat16)                 = 8,044,544,000 bytes
  KV / token  = 36 x 8 x 128 x 2 (K, V) x 2 bytes                  =       147,456 bytes
  KV cache    = memory x 0.9 - weights - 1 GiB (1,073,741,824) for activations
  KV tokens   = KV cache // 147,456, down to whole 16-token blocks
  decode      = sequences x bandwidth / (weights + sequences x context x 147,456)
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import forkhost
import pytest

from qwenstack.engine import deployment_plan, gpu_catalog, serving_simulation
from qwenstack.errors import SetupError

CONFIG_FILE = deployment_plan.SHIPPED_CONFIGS / "Qwen" / "Qwen3-4B-Instruct-2507.json"
CONFIG = deployment_plan.read_model_config(str(CONFIG_FILE))
MODEL = "Qwen/Qwen3-4B-Instruct-2507"


def _plan(gpu: str, **kw):
    kw.setdefault("context", 32_768)
    kw.setdefault("concurrency", 8)
    return deployment_plan.plan_deployment(MODEL, CONFIG, gpu_catalog.lookup(gpu), **kw)


def test_qwen3_4b_on_a10():
    p = _plan("A10")
    assert p.weights_bytes == 8_044_544_000
    assert p.kv_bytes_per_token == 147_456
    # 23,028 MiB = 24,146,608,128 bytes; x 0.9 = 21,731,947,315
    # 21,731,947,315 - 8,044,544,000 - 1,073,741,824 = 12,613,661,491
    assert p.kv_cache_bytes == 12_613_661_491
    # 12,613,661,491 // 147,456 = 85,541 -> 85,536 in 16-token blocks
    assert p.kv_tokens == 85_536
    assert p.longest_context == 85_536  # below the model's 262,144 positions
    assert p.sequences_at_context == 2  # 85,536 // 32,768
    # 600 GB/s / 8,044,544,000 bytes = 74.58 tokens/s for one sequence
    assert p.decode_bound_single == pytest.approx(74.585, abs=0.01)
    # only 2 of the 8 sequences fit: 2 x 600e9 / (8,044,544,000 + 2 x 32,768 x 147,456
    # = 9,663,676,416) = 1.2e12 / 17,708,220,416 = 67.77 tokens/s
    assert p.decode_bound_total == pytest.approx(67.765, abs=0.01)
    assert p.dtype == "bfloat16" and p.refusal is None
    assert p.vllm_flags() == [
        "--model", MODEL, "--dtype", "bfloat16", "--max-model-len", "32768",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9", "--max-num-seqs", "2",
    ]


def test_qwen3_4b_full_context_refused_on_a10():
    p = _plan("A10", context=262_144, concurrency=1)
    # 262,144 x 147,456 bytes = 36.0 GiB > 11.7 GiB of KV cache
    assert p.refusal is not None
    assert "36.0 GiB" in p.refusal and "--max-model-len 85,536" in p.refusal
    assert p.sequences_at_context == 0


def test_qwen3_4b_on_a100_80gb():
    p = _plan("A100-80GB")
    # 81,920 MiB = 85,899,345,920 bytes; x 0.9 = 77,309,411,328
    # 77,309,411,328 - 8,044,544,000 - 1,073,741,824 = 68,191,125,504
    assert p.kv_cache_bytes == 68_191_125_504
    # 68,191,125,504 // 147,456 = 462,450 -> 462,448 in 16-token blocks
    assert p.kv_tokens == 462_448
    assert p.longest_context == 262_144  # the model's own maximum fits
    assert p.sequences_at_context == 14  # 462,448 // 32,768
    # 2,039 GB/s / 8,044,544,000 = 253.46 tokens/s
    assert p.decode_bound_single == pytest.approx(253.464, abs=0.01)
    # 8 x 2,039e9 / (8,044,544,000 + 8 x 32,768 x 147,456 = 38,654,705,664) = 349.30 tokens/s
    assert p.decode_bound_total == pytest.approx(349.299, abs=0.01)
    assert "--max-num-seqs" in p.vllm_flags() and p.vllm_flags()[-1] == "8"


def test_qwen3_4b_on_h100_80gb():
    p = _plan("H100", context=262_144, concurrency=1)
    # 81,559 MiB = 85,520,809,984 bytes; x 0.9 = 76,968,728,985
    # 76,968,728,985 - 8,044,544,000 - 1,073,741,824 = 67,850,443,161
    assert p.kv_cache_bytes == 67_850_443_161
    # 67,850,443,161 // 147,456 = 460,140 -> 460,128 in 16-token blocks
    assert p.kv_tokens == 460_128
    assert p.refusal is None and p.sequences_at_context == 1  # one full-length sequence
    p = _plan("H100")
    assert p.sequences_at_context == 14  # 460,128 // 32,768
    # 3,350 GB/s / 8,044,544,000 = 416.43 tokens/s; 8 x 3,350e9 / 46,699,249,664 = 573.89
    assert p.decode_bound_single == pytest.approx(416.431, abs=0.01)
    assert p.decode_bound_total == pytest.approx(573.885, abs=0.01)


def test_two_gpus_share_the_weights():
    one, two = _plan("A10"), _plan("A10", gpu_count=2)
    # 2 x 24,146,608,128 x 0.9 = 43,463,894,630; - 8,044,544,000 - 2 x 1,073,741,824
    # = 33,271,866,982 bytes: the weights are counted once, split over both GPUs
    assert two.kv_cache_bytes == 33_271_866_982
    assert two.decode_bound_single == pytest.approx(2 * one.decode_bound_single)


def test_dtype_advice_follows_bf16_support():
    for name in ("V100", "T4"):
        p = _plan(name, context=4096, concurrency=1)
        assert p.dtype == "float16" and "no bfloat16" in p.dtype_advice
    with pytest.raises(SetupError, match="float16"):
        _plan("T4", dtype="bfloat16")
    assert _plan("L4").dtype == "bfloat16"
    # fp8 KV cache halves the bytes per token: 73,728
    assert _plan("A10", kv_cache_dtype="fp8").kv_bytes_per_token == 73_728


def test_gpu_by_memory_size_and_unknown_names():
    p = _plan("48GB")
    assert p.gpu.memory_bytes == 48 * 2**30 and p.decode_bound_single is None
    assert gpu_catalog.lookup("a100 80gb").name == "A100-80GB"
    with pytest.raises(SetupError, match="not a GPU in the table"):
        gpu_catalog.lookup("Z9")
    weights_only = _plan("8GB")
    assert weights_only.kv_tokens == 0 and "leave no room" in weights_only.refusal


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return forkhost.run(list(args))


def test_plan_command_prints_figures_and_refuses_clearly(tmp_path: Path):
    ok = _cli("plan", str(CONFIG_FILE), "--gpu", "A100-80GB", "--context", "32768",
              "--concurrency", "8")
    assert ok.returncode == 0, ok.stderr
    assert "462,448" in ok.stdout and "147,456 bytes" in ok.stdout
    assert "--max-model-len 32768" in ok.stdout
    refused = _cli("plan", str(CONFIG_FILE), "--gpu", "A10")
    assert refused.returncode == 1 and "Does not fit" in refused.stderr
    (tmp_path / "config.json").write_text("{not json")
    for bad in (["plan", str(CONFIG_FILE), "--gpu", "Z9"], ["plan", str(tmp_path), "--gpu", "A10"],
                ["plan", "no-such-folder", "--gpu", "A10"],
                ["plan", str(CONFIG_FILE), "--gpu", "A10", "--gpus", "0"]):
        out = _cli(*bad)
        assert out.returncode != 0 and "error" in out.stderr.lower(), bad
        assert "Traceback" not in out.stderr, out.stderr


# --- configs shipped with qwenstack, and the capacity simulation (`plan --rate`) -------------

# Total parameters as the Qwen3 model cards give them.
PUBLISHED_PARAMS = {"Qwen3-0.6B": 0.6e9, "Qwen3-1.7B": 1.7e9, "Qwen3-4B": 4.0e9,
                    "Qwen3-8B": 8.2e9, "Qwen3-14B": 14.8e9, "Qwen3-32B": 32.8e9,
                    "Qwen3-4B-Instruct-2507": 4.0e9, "Qwen3-4B-Thinking-2507": 4.0e9}


def test_qwen3_configs_ship_with_qwenstack(monkeypatch):
    from qwenstack.engine import capacity, models

    def no_hub(*args):
        raise AssertionError("fetched from the hub")

    monkeypatch.setattr(models, "hub_config", no_hub)
    assert deployment_plan.read_model_config(MODEL) == CONFIG
    for name, params in PUBLISHED_PARAMS.items():
        shape = capacity.ModelShape.from_config(deployment_plan.read_model_config(f"Qwen/{name}"))
        assert shape.num_params == pytest.approx(params, rel=0.03), name
    assert deployment_plan.shipped_config("Qwen/../Qwen/Qwen3-8B") is None
    assert deployment_plan.shipped_config("Qwen/Qwen3-Nonexistent") is None


def test_plan_by_hub_id_works_offline():
    # No network here and no hub cache for it: HF_HUB_OFFLINE makes any hub access fail at once.
    # A process of its own: huggingface_hub reads HF_HUB_OFFLINE at import (forkhost.py).
    out = subprocess.run(
        [sys.executable, "-m", "qwenstack", "plan", MODEL, "--gpu", "A10", "--context", "32768",
         "--concurrency", "8"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "85,536" in out.stdout  # KV tokens, as test_qwen3_4b_on_a10 works out


def _workload(rate, prompt="1000", output="300", ttft_ms=2000, itl_ms=50):
    return serving_simulation.Workload(
        rate, serving_simulation.Lengths.parse(prompt, "prompt-tokens"),
        serving_simulation.Lengths.parse(output, "output-tokens"), ttft_ms / 1000, itl_ms / 1000)


def test_one_request_alone_takes_what_the_roofline_says():
    plan = _plan("H100", concurrency=256)
    engine = serving_simulation.Engine.of(plan, 256)
    # Prefill of 1,000 tokens is compute-bound: 2 x 4,022,272,000 x 1,000 FLOP at 989e12 x 0.5
    # = 16.27 ms (reading the 8,044,544,000 bytes of weights at 3,350e9 x 0.7 takes 3.43 ms),
    # plus the 2 ms step overhead.
    alone = serving_simulation.simulate_replica(engine, _workload(1, output="1"), 1e-6,
                                                requests=5)
    assert alone.ttft_p50_s == pytest.approx(0.01827, abs=0.0001)
    # Decoding alone is memory-bound: the weights and about 1,050 tokens of KV cache
    # (1,050 x 147,456 = 154,828,800 bytes) per step: 8,199,372,800 / 2.345e12 + 2 ms = 5.50 ms.
    alone = serving_simulation.simulate_replica(engine, _workload(1, output="101"), 1e-6,
                                                requests=5)
    assert alone.itl_p90_s == pytest.approx(0.0055, abs=0.0001)


def test_more_requests_need_more_replicas_and_gateway_workers():
    plan = _plan("H100", concurrency=256)
    few = serving_simulation.plan_capacity(plan, _workload(5), 256)
    many = serving_simulation.plan_capacity(plan, _workload(200), 256)
    assert few.replicas == 1 and many.replicas is not None and many.replicas > 2
    assert many.replica.ttft_p90_s <= 2 and many.replica.itl_p90_s <= 0.05
    # One replica fewer would miss a target at its share of the rate.
    fewer = serving_simulation.simulate_replica(serving_simulation.Engine.of(plan, 256),
                                                _workload(200), 200 / (many.replicas - 1))
    assert not fewer.meets(_workload(200))
    # 200 requests/s x (600 µs + (3 + 299) events x 22 µs) = 1.45 cores: 3 workers at 70 %.
    assert many.gateway_cores == pytest.approx(1.4488, abs=0.001) and many.gateway_workers == 3
    interval4 = dataclasses.replace(_workload(200), stream_interval=4)
    assert serving_simulation.gateway_cores(interval4) < many.gateway_cores / 2.5


def test_plan_rate_on_the_command_line():
    ok = _cli("plan", MODEL, "--gpu", "H100", "--context", "32768", "--rate", "50",
              "--prompt-tokens", "500-1500", "--output-tokens", "100-500")
    assert ok.returncode == 0, ok.stderr
    assert "engine replicas" in ok.stdout and "gateway workers" in ok.stdout
    unreachable = _cli("plan", MODEL, "--gpu", "A10", "--context", "32768", "--rate", "1",
                       "--itl-ms", "1")
    assert unreachable.returncode == 1 and "none meets the targets" in unreachable.stdout
    for bad in (["--prompt-tokens", "9-3"], ["--output-tokens", "lots"], ["--rate", "0"],
                ["--prompt-tokens", "300000"]):
        out = _cli("plan", MODEL, "--gpu", "H100", "--context", "32768", "--rate", "5", *bad)
        assert out.returncode != 0 and "error" in out.stderr.lower(), bad
        assert "Traceback" not in out.stderr, out.stderr


def test_plan_sizes_the_settings_models_on_a_set_of_gpus(tmp_path: Path):
    settings = tmp_path / "qwenstack.yaml"
    settings.write_text(
        "engine:\n  max_model_len: 32768\n  models:\n"
        f"    - {{model: {CONFIG_FILE}, served_model_name: chat, replicas: 2}}\n"
        f"    - {{model: {CONFIG_FILE}, served_model_name: wide, tensor_parallel_size: 2,"
        " role: embed}\n")
    fits = _cli("plan", "--gpu", "A10", "--gpu-count", "4", "--config", str(settings))
    assert fits.returncode == 0, fits.stderr
    assert "chat (chat): 2 replicas, each on 1 GPU(s)" in fits.stdout
    assert "wide (embed): 1 replicas, each on 2 GPU(s)" in fits.stdout
    assert "Fits: 4 of 4 GPUs." in fits.stdout
    refused = _cli("plan", "--gpu", "A10", "--gpu-count", "3", "--config", str(settings))
    assert refused.returncode == 1
    assert ("needs 4 GPUs; there are 3 (with the others at one replica, each fits at most: "
            "chat 1, wide 1)") in refused.stderr.replace("\n", " ")
    # A context one model's GPUs cannot hold: that model is named with what fits.
    settings.write_text(settings.read_text().replace("32768", "262144"))
    too_long = _cli("plan", "--gpu", "A10", "--gpu-count", "4", "--config", str(settings))
    assert too_long.returncode == 1 and "chat: A context of 262,144 tokens" in too_long.stderr
