"""Settings of the gateway: listening, routing, observability, cache, limits, admission,
input checks and authentication."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    NoDecode,
)


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
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request head must arrive within this of the connection (or "
        "of its first byte, on a kept-alive connection); else 408 and the connection closed.",
    )
    body_timeout_s: float = Field(
        15.0, gt=0, description="A request body must arrive within this of its head; else 408 "
        "and the connection closed. Raise it for large uploads over slow links.",
    )
    max_connections: int = Field(
        2048, ge=1, description="Client connections held at once; more are answered 503.",
    )
    workers: int | None = Field(
        None, ge=1, le=256,
        description="Gateway processes sharing the port. None: one per 10,000 output tokens/s "
        "the engines are expected to stream (expected_tokens_per_s), at most one per core, "
        "and 1 while the answer cache or knowledge bases are kept per process (cache.backend "
        "memory, rag.milvus_uri a Milvus Lite file); more than 1 is refused then.",
    )
    expected_tokens_per_s: float | None = Field(
        None, ge=0,
        description="Output tokens per second all engines behind the gateway stream at full "
        "load, to size `workers`. None: 15,000 per engine where this host has a GPU (Qwen3-4B "
        "on one modern GPU), else 0.",
    )
    model_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Other names clients may send as `model` (alias -> served name), so "
        "applications that hard-code a model name work unchanged. Resolved before scopes, "
        "limits and the answer cache, which all see the served name; /v1/models lists each "
        "alias whose model it lists, with `alias_of` naming that model.",
    )
    model_fallbacks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Model -> models to serve a request instead, in order, while no engine of "
        "it is ready (decided before anything is sent to an engine). Only models the caller's "
        "key may use are tried. The usage row names the model that served (`model`) and the "
        "one asked for (`requested_model`); qwenstack_model_fallbacks_total counts them.",
    )

    @model_validator(mode="after")
    def _aliases_name_models(self) -> GatewaySettings:
        # One step from a name to a model: an alias of an alias would depend on the order.
        chained = sorted(alias for alias, model in self.model_aliases.items()
                         if model in self.model_aliases)
        if chained:
            raise ValueError(f"model_aliases: {', '.join(chained)} name another alias; name the "
                             "served model")
        return self


class RoutingSettings(BaseModel):
    """Which engine replica takes a request (see gateway/routing.py)."""

    policy: Literal["round_robin", "least_outstanding", "session_affinity", "prefix_aware"] = Field(
        "prefix_aware",
        description="prefix_aware: a conversation's turns go to one replica, where its earlier "
        "turns' KV is cached (a hash of its start, the same on every gateway), unless that "
        "replica is more than prefix_load_slack busier than the least busy one.",
    )
    prefix_prompt_bytes: int = Field(
        256, ge=16, description="prefix_aware, raw prompts (/v1/completions): the leading "
        "bytes that name a conversation (about 64 tokens of English).",
    )
    prefix_max_bytes: int = Field(
        16_384, ge=16, description="prefix_aware: most bytes of a conversation's start (its "
        "messages up to the first user message) that are hashed.",
    )
    prefix_load_slack: int = Field(
        4, ge=0, description="Outstanding requests a conversation's replica may have beyond the "
        "least busy one before its request goes to the next replica in the conversation's order.",
    )


class ObservabilitySettings(BaseModel):
    """Logs, metrics and traces."""

    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: short human lines when stderr is a terminal, JSON otherwise; "
        "json: one JSON object per line; text: plain `key=value` lines.",
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
    metrics_readers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["prometheus"],
        description="Key names (JWT subjects) that may read /metrics, besides admin keys, when "
        "auth.protect_metrics: its labels name every caller, which other tenants must not see.",
    )

    @field_validator("metrics_readers", mode="before")
    @classmethod
    def _split_readers(cls, value: Any) -> Any:
        return value.replace(",", " ").split() if isinstance(value, str) else value


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
        None,
        description="Shared budgets for several gateway replicas (redis://...). None: in-process.",
    )
    key_prefix: str = Field("qwenstack:", description="Prefix of every Redis key the limiter uses.")
    redis_timeout_s: float = Field(0.5, gt=0)
    redis_fail_open: bool = Field(
        True,
        description="When Redis cannot be reached: True lets requests through unlimited "
        "(and logs), False refuses them with 503.",
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
        False,
        description="Let clients send `chat_template`/`chat_template_kwargs` (CVE-2025-61620).",
    )
    max_messages: int = Field(
        256, ge=1, description="Most messages in one chat request; more: 400."
    )
    max_prompts: int = Field(
        64, ge=1, description="Most prompts in one /v1/completions batch; more: 400."
    )
    max_tools: int = Field(128, ge=1, description="Most `tools` in one chat request; more: 400.")
    max_schema_bytes: int = Field(
        256 * 1024, ge=1024,
        description="Most JSON bytes of a request's tools, response_format and "
        "structured_outputs together (written into the prompt, compiled into grammars).",
    )
    max_schema_depth: int = Field(
        32, ge=4, description="Deepest nesting of objects and lists in any of them."
    )
    max_schema_enum_values: int = Field(
        1000, ge=1, description="Most enum values (and structured_outputs choices) in all of them.",
    )
    allow_thinking: bool = Field(
        True,
        description="false: every chat request is sent with chat_template_kwargs.enable_thinking "
        "false, whatever it asks (thinking off where the model's chat template reads it, as "
        "Qwen3's hybrid models' does). A key can be held to that alone (keys create "
        "--no-thinking).",
    )
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts whose http(s) image/audio/video URLs chat messages may name (the "
        "engines fetch them; they are started with the same --allowed-media-domains). Empty: "
        "remote media refused, only inline data: URLs.",
    )
    prefix_cache_per_caller: bool = Field(
        True,
        description="Each caller's requests carry a cache_salt of their own (HMAC of its name), "
        "so the engines' prefix cache hits only within a caller and no tenant can time "
        "another's prompts. False: one prefix cache for all.",
    )
    prefix_cache_groups: dict[str, str] = Field(
        default_factory=dict,
        description="Caller name -> group name: callers of one group share a prefix cache "
        "(e.g. teams with one long system prompt), salted by the group's name.",
    )

    @field_validator("allowed_media_domains", mode="before")
    @classmethod
    def _split_domains(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return value.replace(",", " ").split()
        return json.loads(value) if isinstance(value, str) else value


class JWTClaimNames(BaseModel):
    """Which claims of a JWT carry the caller's name, limits and model scope."""

    subject: str = "sub"
    rpm: str = "rpm"
    tpm: str = "tpm"
    max_concurrency: str = "max_concurrency"
    models: str = Field(
        "models", description="A list, or a string of names split on spaces/commas."
    )
    admin: str | None = Field(
        None, description="Claim that, when it is `true`, makes the caller an admin (e.g. "
        "`qwenstack_admin`, set by your identity provider for admins only). Unset: no JWT "
        "caller is an admin.",
    )
    cache_all: str = Field("cache_all", description="true: sampled answers may be cached too.")
    thinking: str = Field(
        "thinking", description="false: the caller's chat requests go without thinking."
    )


class JWTSettings(BaseModel):
    """Bearer JWTs accepted beside API keys; off until a secret, public key or JWKS URL is set."""

    algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["HS256", "RS256", "ES256"],
        description="Accepted `alg` values; HS* use `secret`, "
        "the others `public_key` or `jwks_url`.",
    )
    secret: SecretStr | None = Field(None, description="Shared secret for HS256.")
    public_key: str | None = Field(None, description="PEM public key for RS256/ES256.")
    jwks_url: str | None = Field(None, description="JWKS endpoint, for RS256/ES256 by `kid`.")
    issuer: str | None = Field(
        None, description="Required `iss`; must be set when JWTs are on, so a token your "
        "identity provider issued for another service (or another provider's) is refused.",
    )
    audience: str | None = Field(
        None, description="Required `aud`; must be set when JWTs are on.",
    )
    leeway_s: float = Field(30, ge=0, description="Clock skew allowed on `exp` and `nbf`.")
    claims: JWTClaimNames = JWTClaimNames()

    @field_validator("algorithms", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return value.replace(",", " ").split()
        return value

    max_subjects: int = Field(
        10_000, ge=1, description="Distinct JWT subjects one gateway process keeps rate-limit "
        "state for in memory; the least recently seen is dropped beyond it (its budget starts "
        "full again). Metrics label every JWT caller `jwt`; usage rows keep the subject.",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.public_key or self.jwks_url)

    @model_validator(mode="after")
    def _needs_issuer_and_audience(self) -> JWTSettings:
        missing = [name for name in ("issuer", "audience") if not getattr(self, name)]
        if self.enabled and missing:
            raise ValueError(
                f"auth.jwt: set {' and '.join('auth.jwt.' + m for m in missing)} (e.g. "
                "QWENSTACK_AUTH__JWT__ISSUER, QWENSTACK_AUTH__JWT__AUDIENCE): without them any "
                "token the key signs, for whatever service, would be accepted"
            )
        return self


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
    protect_metrics: bool = Field(
        True, description="/metrics needs an admin key or one named in "
        "observability.metrics_readers (its labels name callers); false: open to anyone.",
    )
    jwt: JWTSettings = JWTSettings()
    ui_service_key: str = Field(
        "ui", description="Name of the chat UI's own admin key (the one it makes, or the one "
        "ui.gateway_admin_key holds): the only caller that may create knowledge bases named "
        "`ui-...`, which the UI makes for its users.",
    )
