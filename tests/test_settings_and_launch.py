"""Settings sources and the vLLM command lines built from them (no engine needed)."""

import json
from pathlib import Path

import pytest

from qwenstack.engine import launch
from qwenstack.engine.hardware import GIB, Hardware
from qwenstack.engine.models import ResolvedModel
from qwenstack.errors import SetupError
from qwenstack.settings import load_settings

QWEN3_CONFIG = json.loads(
    (Path(__file__).parent / "data" / "qwen3-4b-instruct-2507.config.json").read_text()
)
CPU = Hardware((), frozenset({"avx2"}), 24 * GIB)
TWO_GPUS = Hardware((80 * GIB, 80 * GIB), frozenset(), 64 * GIB)
MODEL = ResolvedModel("Qwen/Qwen3-4B-Instruct-2507", "qwen3", QWEN3_CONFIG)


def test_sources_in_priority_order(tmp_path, monkeypatch):
    config = tmp_path / "qwenstack.yaml"
    config.write_text("engine:\n  replicas: 3\n  max_num_seqs: 8\ngateway:\n  port: 9000\n")
    monkeypatch.setenv("QWENSTACK_CONFIG", str(config))
    monkeypatch.setenv("QWENSTACK_ENGINE__REPLICAS", "2")
    monkeypatch.setenv("QWENSTACK_ENGINE__EXTRA_ARGS", "--enforce-eager --seed 7")
    settings = load_settings(**{"gateway.port": 9100, "engine.model": None})
    assert settings.engine.replicas == 2  # environment over file
    assert settings.engine.max_num_seqs == 8  # file over default
    assert settings.gateway.port == 9100  # flag over everything
    assert settings.engine.extra_args == ["--enforce-eager", "--seed", "7"]


def test_secrets_masked(monkeypatch):
    monkeypatch.setenv("QWENSTACK_ENGINE__HF_TOKEN", "hf_secret_value")
    shown = load_settings().masked_json()
    assert "hf_secret_value" not in shown
    assert '"hf_token": "**********"' in shown


def _plan(hardware, log_dir, media_domains=(), **engine):
    settings = load_settings(**{f"engine.{k}": v for k, v in engine.items()})
    return launch.build_launches(
        settings.engine, MODEL, hardware, Path("/venv/bin/python"), log_dir, list(media_domains)
    )


def test_engines_fetch_media_only_from_the_gateways_allowed_domains(tmp_path):
    [closed] = _plan(CPU, tmp_path)
    [open_to_two] = _plan(CPU, tmp_path, media_domains=["img.example.com", "cdn.example.org"])
    # With no domain allowed the engine gets one that never resolves (vLLM: empty = any host).
    assert closed.argv[closed.argv.index("--allowed-media-domains") + 1:][:1] == [
        launch.NO_MEDIA_DOMAIN]
    at = open_to_two.argv.index("--allowed-media-domains")
    assert open_to_two.argv[at + 1:at + 3] == ["img.example.com", "cdn.example.org"]


def test_cpu_launch_is_float32_on_loopback_with_sized_kv_cache(tmp_path):
    [engine] = _plan(CPU, tmp_path, max_model_len=8192, extra_args=["--enforce-eager"])
    argv = engine.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(4 * GIB)
    assert "--enable-chunked-prefill" in argv
    assert argv[-1] == "--enforce-eager"
    assert engine.log_path == tmp_path / "engine-0.log"


def test_gpu_replicas_get_their_own_devices_and_ports(tmp_path):
    engines = _plan(TWO_GPUS, tmp_path, replicas=2, base_port=8200)
    assert [e.port for e in engines] == [8200, 8201]
    assert [e.env["CUDA_VISIBLE_DEVICES"] for e in engines] == ["0", "1"]
    assert engines[0].argv[engines[0].argv.index("--max-model-len") + 1] == "262144"
    assert engines[0].argv[engines[0].argv.index("--dtype") + 1] == "auto"


def test_refusals_name_the_flag_to_change(tmp_path):
    with pytest.raises(SetupError, match="--max-model-len"):
        _plan(CPU, tmp_path, max_model_len=262144)
    with pytest.raises(SetupError, match="use qwenstack's --max-model-len"):
        _plan(CPU, tmp_path, extra_args=["--max-model-len=100"])
    with pytest.raises(SetupError, match="needs 4 GPUs"):
        _plan(TWO_GPUS, tmp_path, replicas=2, tensor_parallel_size=2)
