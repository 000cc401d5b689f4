"""Settings sources and the vLLM command lines built from them (no engine needed)."""

import ast
import json
from pathlib import Path

import forkhost
import pytest

from qwenstack.engine import deployment_plan, families, launch, models
from qwenstack.engine.hardware import GIB, Hardware
from qwenstack.engine.models import ResolvedModel
from qwenstack.errors import SetupError
from qwenstack.settings import load_settings

QWEN3_CONFIG = deployment_plan.read_model_config("Qwen/Qwen3-4B-Instruct-2507")  # shipped
CPU = Hardware((), frozenset({"avx2"}), 24 * GIB)
TWO_GPUS = Hardware((80 * GIB, 80 * GIB), frozenset(), 64 * GIB)
MODEL = ResolvedModel("Qwen/Qwen3-4B-Instruct-2507", "qwen3", QWEN3_CONFIG)
# The tiny test model's chat template, read from its script's source: the script runs in the
# engine venv, with torch, and cannot be imported here.
TINY_TEMPLATE = next(
    ast.literal_eval(node.value)
    for node in ast.parse((models.SCRIPTS / "tiny_qwen3.py").read_text()).body
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CHAT_TEMPLATE")


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
        settings.engine, [MODEL], hardware, Path("/venv/bin/python"), log_dir, list(media_domains)
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


# The shapes of chat templates that decide the parsers (engine/families.py), cut to what counts.
GENERATION_PROMPT = "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}"
QWEN3_INSTRUCT_2507 = (  # renders past turns' reasoning, never opens <think> itself
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- '<|im_start|>' + message.role + '\\n<think>\\n' }}"
    + GENERATION_PROMPT + "\n{%- endif %}")
QWEN3_HYBRID = ("{{- '<tool_call>\\n' }}" + GENERATION_PROMPT + "\n    {%- if enable_thinking is "
                "defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                "{%- endif %}\n{%- endif %}")
QWEN3_THINKING_2507 = ("{{- '<tool_call>\\n' }}{%- if add_generation_prompt %}{{- "
                       "'<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
QWEN3_CODER = "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}" + GENERATION_PROMPT
SMOLLM2 = "{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}" + GENERATION_PROMPT


@pytest.mark.parametrize(("model_type", "template", "tool_call", "reasoning"), [
    ("qwen3", QWEN3_INSTRUCT_2507, "hermes", None),
    ("qwen3", QWEN3_HYBRID, "hermes", "qwen3"),
    ("qwen3", QWEN3_THINKING_2507, "hermes", "qwen3"),
    ("qwen3_moe", QWEN3_CODER, "qwen3_coder", None),
    ("qwen2", QWEN3_INSTRUCT_2507, "hermes", None),  # Qwen2.5: tools, no thinking parser
    ("llama", SMOLLM2, None, None),
    ("llama", QWEN3_HYBRID, None, None),  # the markup alone is not the family
    ("qwen3", "", None, None),  # a base model: no chat template
], ids=["instruct-2507", "hybrid", "thinking-2507", "coder", "qwen2.5", "smollm2",
        "other-family", "no-template"])
def test_parsers_follow_the_family_and_the_chat_template(model_type, template, tool_call,
                                                         reasoning):
    parsers = families.choose(load_settings().engine, {"model_type": model_type}, template)
    assert (parsers.tool_call, parsers.reasoning) == (tool_call, reasoning)


def test_the_tiny_test_model_is_served_as_qwen3_instruct_2507():
    parsers = families.choose(load_settings().engine, {"model_type": "qwen3"}, TINY_TEMPLATE)
    assert (parsers.tool_call, parsers.reasoning) == ("hermes", None)


def test_parser_settings_override_and_reach_the_command_line(tmp_path):
    model = ResolvedModel("Qwen/Qwen3-4B", "qwen3", QWEN3_CONFIG, QWEN3_HYBRID)
    settings = load_settings(**{"engine.reasoning_parser": "none",
                                "engine.tool_call_parser": "qwen3_xml"})
    [engine] = launch.build_launches(settings.engine, [model], CPU, Path("/venv/bin/python"),
                                     tmp_path, [])
    argv = engine.argv
    assert argv[argv.index("--tool-call-parser") + 1] == "qwen3_xml"
    assert "--enable-auto-tool-choice" in argv and "--reasoning-parser" not in argv
    [auto] = launch.build_launches(load_settings().engine, [model], CPU, Path("/venv/bin/python"),
                                   tmp_path, [])
    assert auto.argv[auto.argv.index("--reasoning-parser") + 1] == "qwen3"
    for flag in ("--tool-call-parser=hermes", "--reasoning-parser", "--enable-auto-tool-choice"):
        with pytest.raises(SetupError, match="engine.(tool_call|reasoning)_parser"):
            _plan(CPU, tmp_path, extra_args=[flag])
    with pytest.raises(ValueError, match="tool_call_parser"):
        load_settings(**{"engine.tool_call_parser": "hermes --trust-remote-code"})


def test_config_prints_the_parser_settings():
    engine = json.loads(load_settings().masked_json())["engine"]
    assert (engine["tool_call_parser"], engine["reasoning_parser"]) == ("auto", "auto")


def test_config_prints_the_parsers_each_model_would_run(tmp_path):
    """`qwenstack config --parsers` chooses as `up` does, from each model's folder, without
    installing or starting anything; a setting overrides; remote engines are as described."""
    folders = {"hybrid": ("qwen3", QWEN3_HYBRID), "plain": ("llama", "{{ messages }}")}
    for name, (model_type, template) in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type}))
        (tmp_path / name / models.CHAT_TEMPLATE_FILE).write_text(template)
    entries = [{"model": str(tmp_path / "hybrid")},
               {"model": str(tmp_path / "hybrid"), "served_model_name": "no-thinking",
                "reasoning_parser": "none"},
               {"model": str(tmp_path / "plain")},
               {"model": str(tmp_path / "hybrid"), "served_model_name": "embedder",
                "role": "embed"}]
    env = {"QWENSTACK_ENGINE__MODELS": json.dumps(entries), "QWENSTACK_HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin"}

    def shown(**more: str) -> list[tuple[str, str, str, str]]:
        printed = forkhost.run(["config", "--parsers"], env={**env, **more}, check=True).stdout
        return [(m["served_model_name"], m["role"], m["tool_call_parser"], m["reasoning_parser"])
                for m in json.loads(printed)]

    assert shown() == [("hybrid", "chat", "hermes", "qwen3"),
                       ("no-thinking", "chat", "hermes", "none"),
                       ("plain", "chat", "none", "none"),
                       ("embedder", "embed", "none", "none")]
    remote = shown(QWENSTACK_ENGINE__URLS="http://engine:8000")
    assert (remote[1], remote[3]) == (("no-thinking", "chat", "auto", "none"),
                                      ("embedder", "embed", "none", "none"))


def test_chat_templates_are_read_as_transformers_reads_them(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": "plain"}, {"name": "tool_use", "template": "<tool_call>"}
    ]}))
    assert models.folder_chat_template(tmp_path) == "plain\n<tool_call>"
    (tmp_path / models.CHAT_TEMPLATE_FILE).write_text(QWEN3_HYBRID)  # preferred when present
    assert models.folder_chat_template(tmp_path) == QWEN3_HYBRID


def test_stream_interval_reaches_the_command_line_only_when_set(tmp_path):
    [default] = _plan(CPU, tmp_path)
    assert "--stream-interval" not in default.argv  # vLLM's own default, 1
    [four] = _plan(CPU, tmp_path, stream_interval=4)
    assert four.argv[four.argv.index("--stream-interval") + 1] == "4"
    with pytest.raises(SetupError, match="use qwenstack's --stream-interval"):
        _plan(CPU, tmp_path, extra_args=["--stream-interval=8"])
    with pytest.raises(ValueError, match="stream_interval"):
        load_settings(**{"engine.stream_interval": 0})
