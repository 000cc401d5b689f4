"""All of qwenstack's configuration, in one typed object.

Sources, highest priority first: command-line flags (passed as init arguments), environment
variables (`QWENSTACK_*`, nested with `__`, e.g. `QWENSTACK_ENGINE__REPLICAS=2`), a YAML or TOML
file named by `QWENSTACK_CONFIG`, then the defaults. Each part's section is in the module of
that name (engine.py, gateway.py, rag.py, ui.py); `Settings` gathers them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from qwenstack.settings.engine import ENGINE_HOST, QWEN3_MODEL, EngineSettings, LoraSettings
from qwenstack.settings.gateway import (
    AdmissionSettings,
    AuthSettings,
    CacheSettings,
    GatewaySettings,
    JWTClaimNames,
    JWTSettings,
    LimitSettings,
    ObservabilitySettings,
    RoutingSettings,
    ValidationSettings,
)
from qwenstack.settings.rag import RagSettings
from qwenstack.settings.ui import UiSettings

__all__ = [
    "AdmissionSettings", "AuthSettings", "CONFIG_ENV", "CacheSettings", "ENGINE_HOST",
    "EngineSettings", "GatewaySettings", "JWTClaimNames", "JWTSettings", "LimitSettings",
    "LoraSettings", "ObservabilitySettings", "QWEN3_MODEL", "RagSettings", "RoutingSettings",
    "Settings", "UiSettings", "ValidationSettings", "load_settings",
]

CONFIG_ENV = "QWENSTACK_CONFIG"


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
        description="SQLAlchemy URL for keys and usage records (masked: it may hold a password), "
        "e.g. postgresql+psycopg://user@host/db. Unset: SQLite at <home>/qwenstack.db.",
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
        """The effective settings for display: secrets show as '**********', and URLs (secret
        or not: a Milvus URI, an engine URL) with their user-info as `user:***@`."""
        return json.dumps(_masked(self.model_dump()), indent=2, default=str)


def mask_url(text: str) -> str:
    """`scheme://user:***@host/...` for a URL with user-info; other text as it is."""
    parts = urlsplit(text)
    if not parts.scheme or "@" not in parts.netloc:
        return text
    user, _, host = parts.netloc.rpartition("@")
    shown = f"{user.partition(':')[0]}:***@{host}"
    return urlunsplit(parts._replace(netloc=shown))


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        # A URL's host and database are no secret; its password is.
        return mask_url(secret) if "://" in secret else str(value)
    if isinstance(value, str):
        return mask_url(value)
    return value


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
