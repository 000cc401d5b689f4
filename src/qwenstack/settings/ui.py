"""Settings of the Chainlit chat UI."""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr, model_validator


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
        "X-Forwarded-User); unset: off. Needs header_login_secret. Never signs in a user who "
        "has a password.",
    )
    system_prompt: str = Field("", description="Default system prompt; users may change theirs.")
    temperature: float = Field(0.7, ge=0, le=2, description="Qwen3-4B-Instruct-2507's model card.")
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(20, ge=-1, description="Sent as extra_body; -1: off.")
    min_p: float = Field(0.0, ge=0, le=1)
    max_tokens: int = Field(1024, ge=1, description="Longest answer.")
    request_timeout_s: float = Field(600, gt=0, description="Longest wait for the gateway.")
    tools: bool = Field(
        True, description="Offer the model the chat's tools (current time, calculator, search "
        "of the user's documents) where its capabilities say tool_calling.",
    )
    tool_choice: str = Field(
        "auto", pattern=r"^(auto|required|current_time|calculator|search_documents)$",
        description="auto: the model decides; required, or a tool's name: every round but the "
        "last must call one (vLLM enforces it by constrained decoding; demos and tests).",
    )
    max_tool_rounds: int = Field(
        4, ge=1, le=16, description="Rounds of tool calls per answer; the next round offers no "
        "tools, so the model answers.",
    )
    thinking: bool = Field(
        True, description="The thinking switch's initial state, for models whose capabilities "
        "say reasoning.",
    )
    model_capabilities: dict[str, dict[str, bool]] = Field(
        default_factory=dict,
        description="Capabilities per model name, over what the gateway's /v1/models says, e.g. "
        '{"my-model": {"tool_calling": true, "reasoning": false}}: for a gateway that does not '
        "describe them, or an engine started with its own parser flags.",
    )
    database_key: SecretStr | None = Field(
        None, description="Fernet key (32 url-safe base64 bytes) that encrypts users' gateway "
        "keys in the UI database. Unset: generated once into <home>/secrets/ui-database-key; "
        "UI replicas must share it.",
    )
    header_login_secret: SecretStr | None = Field(
        None, description="With header_login: the secret the SSO proxy sends in "
        "header_login_secret_header on every request; a header sign-in without it (a client "
        "that reached the UI past the proxy) is refused. Required with header_login.",
    )
    header_login_secret_header: str = Field(
        "X-Proxy-Secret", description="Header that carries header_login_secret.",
    )

    @model_validator(mode="after")
    def _needs_a_sign_in(self) -> UiSettings:
        if not self.password_login and not self.header_login:
            raise ValueError(
                "ui: turn on password_login or set header_login, or nobody can sign in"
            )
        if self.header_login and not self.header_login_secret:
            raise ValueError(
                "ui.header_login needs ui.header_login_secret, a secret your SSO proxy sends in "
                f"the {self.header_login_secret_header} header (ui.header_login_secret_header): "
                "without it, any client that reaches the UI could sign in as anyone"
            )
        return self
