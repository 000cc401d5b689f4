"""Several models from one settings list: how their engines are launched (no engine needed)."""

import json
from pathlib import Path

import forkhost
import pytest

from qwenstack.engine import deployment_plan, launch, roles
from qwenstack.engine.hardware import GIB, Hardware
from qwenstack.engine.models import ResolvedModel
from qwenstack.errors import SetupError
from qwenstack.settings import load_settings

QWEN3_CONFIG = deployment_plan.read_model_config("Qwen/Qwen3-4B-Instruct-2507")  # shipped
CPU = Hardware((), frozenset({"avx2"}), 24 * GIB)
FOUR_GPUS = Hardware((80 * GIB,) * 4, frozenset(), 256 * GIB)
CHAT_TEMPLATE = "{{- '<tool_call>\\n' }}{%- if add_generation_prompt %}{%- endif %}"
CHAT = ResolvedModel("Qwen/Qwen3-4B-Instruct-2507", "qwen3", QWEN3_CONFIG, CHAT_TEMPLATE)
EMBED = ResolvedModel("Qwen/Qwen3-Embedding-0.6B", "embedder", QWEN3_CONFIG)
RERANK = ResolvedModel("Qwen/Qwen3-Reranker-0.6B", "reranker", QWEN3_CONFIG)
THREE_MODELS = [
    {"model": CHAT.source, "replicas": 2},
    {"model": EMBED.source, "served_model_name": "embedder", "role": "embed",
     "max_model_len": 8192},
    {"model": RERANK.source, "served_model_name": "reranker", "role": "rerank",
     "extra_args": ["--seed", "3"]},
]


def _launches(hardware, log_dir, models=THREE_MODELS, resolved=(CHAT, EMBED, RERANK), **engine):
    settings = load_settings(**{"engine.models": models, "engine.max_model_len": 4096,
                                **{f"engine.{k}": v for k, v in engine.items()}})
    return launch.build_launches(settings.engine, list(resolved), hardware,
                                 Path("/venv/bin/python"), log_dir, [])


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_entries_take_the_sections_values_but_the_served_name():
    settings = load_settings(**{
        "engine.models": [{"model": "a/chat"}, {"model": "b/embed", "role": "embed",
                                                 "max_model_len": 512}],
        "engine.max_model_len": 2048, "engine.served_model_name": "one-name",
        "engine.extra_args": ["--seed", "1"],
    })
    chat, embed = settings.engine.served()
    assert (chat.max_model_len, embed.max_model_len) == (2048, 512)
    assert chat.extra_args == embed.extra_args == ["--seed", "1"]
    assert chat.served_model_name is None and embed.role == "embed"
    # Without a list, the section is the one model, as before.
    [single] = load_settings(**{"engine.served_model_name": "one-name"}).engine.served()
    assert single.served_model_name == "one-name" and single.role == "chat"


def test_every_engine_gets_its_own_port_gpus_and_log(tmp_path):
    engines = _launches(FOUR_GPUS, tmp_path, base_port=8300)
    assert [(e.model, e.port) for e in engines] == [
        ("qwen3", 8300), ("qwen3", 8301), ("embedder", 8302), ("reranker", 8303)]
    assert [e.env["CUDA_VISIBLE_DEVICES"] for e in engines] == ["0", "1", "2", "3"]
    assert [e.log_path.name for e in engines] == [f"engine-{i}.log" for i in range(4)]
    assert [_value(e.argv, "--served-model-name") for e in engines] == [
        "qwen3", "qwen3", "embedder", "reranker"]
    assert [_value(e.argv, "--max-model-len") for e in engines] == [
        "4096", "4096", "8192", "4096"]
    settings = load_settings(**{"engine.models": THREE_MODELS, "engine.base_port": 8300})
    assert settings.engine.replica_urls() == [f"http://127.0.0.1:{p}" for p in range(8300, 8304)]


def test_roles_become_vllms_flags(tmp_path):
    chat, _, embed, rerank = (e.argv for e in _launches(FOUR_GPUS, tmp_path))
    assert "--runner" not in chat and _value(chat, "--tool-call-parser") == "hermes"
    assert "--enable-chunked-prefill" in chat
    assert (_value(embed, "--runner"), _value(embed, "--convert")) == ("pooling", "embed")
    assert (_value(rerank, "--runner"), _value(rerank, "--convert")) == ("pooling", "classify")
    for pooling in (embed, rerank):  # no chat parsers on a pooling model
        assert "--tool-call-parser" not in pooling and "--enable-chunked-prefill" not in pooling
    # The original Qwen3 reranker (a causal LM) is read as vLLM's docs say; a converted one not.
    assert json.loads(_value(rerank, "--hf-overrides")) == roles.QWEN3_RERANKER_OVERRIDES
    classifier = {**QWEN3_CONFIG, "architectures": ["Qwen3ForSequenceClassification"]}
    assert "--hf-overrides" not in roles.flags("rerank", classifier)
    assert rerank[-2:] == ["--seed", "3"]  # its own extra flags, last


def test_cpu_engines_of_every_model_split_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(launch.cpu_tuning, "allowed_cores", lambda: list(range(9)))
    big = Hardware((), frozenset({"avx2"}), 512 * GIB)
    engines = _launches(big, tmp_path)
    assert [e.env["VLLM_CPU_OMP_THREADS_BIND"] for e in engines] == ["0-1", "2-3", "4-5", "6-7"]
    assert all(_value(e.argv, "--kv-cache-memory-bytes") == str(4 * GIB) for e in engines)
    # Four Qwen3-4B engines in float32 (16 GB of weights each) do not fit in 24 GiB: refused
    # before any starts, each model's share named.
    with pytest.raises(SetupError, match=r"qwen3: 2 x \(15.0 GiB weights \+ 4.0 GiB KV cache\)"
                       r".*but this machine has 24.0 GiB available; give the engines less KV"):
        _launches(CPU, tmp_path)


def test_what_cannot_run_is_refused_saying_what_would(tmp_path):
    two_gpus = Hardware((80 * GIB,) * 2, frozenset(), 64 * GIB)
    with pytest.raises(SetupError, match=r"qwen3: 2 replicas x tensor-parallel-size 1.*needs 4 "
                       r"GPUs; there are 2 \(even one replica of each needs 3"):
        _launches(two_gpus, tmp_path)
    three_gpus = Hardware((80 * GIB,) * 3, frozenset(), 64 * GIB)
    with pytest.raises(SetupError, match="each fits at most: qwen3 1, embedder 1, reranker 1"):
        _launches(three_gpus, tmp_path)
    with pytest.raises(SetupError, match="Two models are served as qwen3"):
        _launches(FOUR_GPUS, tmp_path, resolved=(CHAT, CHAT, RERANK))
    wrong_flag = [THREE_MODELS[0], {**THREE_MODELS[1], "extra_args": ["--runner", "generate"]},
                  THREE_MODELS[2]]
    with pytest.raises(SetupError, match="--runner in the extra vLLM flags of embedder: set its"
                       " role"):
        _launches(FOUR_GPUS, tmp_path, models=wrong_flag)


def test_models_from_the_environment_and_printed_by_config(tmp_path):
    env = {"QWENSTACK_ENGINE__MODELS": json.dumps(THREE_MODELS[1:]),
           "QWENSTACK_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    shown = forkhost.run(["config"], env=env, check=True).stdout
    models = json.loads(shown)["engine"]["models"]
    assert [(m["served_model_name"], m["role"]) for m in models] == [
        ("embedder", "embed"), ("reranker", "rerank")]


def test_an_alias_names_a_served_model_not_another_alias():
    with pytest.raises(ValueError, match="model_aliases: b name another alias"):
        load_settings(**{"gateway.model_aliases": {"a": "served", "b": "a"}})
    settings = load_settings(**{"gateway.model_fallbacks": {"big": ["small", "tiny"]}})
    assert settings.gateway.model_fallbacks == {"big": ["small", "tiny"]}
