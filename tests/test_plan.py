"""`qwenstack plan` for Qwen3-4B-Instruct-2507 against figures worked out by hand.

The model (tests/data/qwen3-4b-instruct-2507.config.json): hidden 2,560, 36 layers, 32 query and
8 KV heads of 128 dims, MLP 9,728, vocab 151,936, tied embeddings.

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

import subprocess
import sys
from pathlib import Path

import pytest

from qwenstack.engine import deployment_plan, gpu_catalog
from qwenstack.errors import SetupError

CONFIG_FILE = Path(__file__).parent / "data" / "qwen3-4b-instruct-2507.config.json"
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
    return subprocess.run(
        [sys.executable, "-m", "qwenstack", *args], capture_output=True, text=True
    )


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
