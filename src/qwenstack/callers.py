"""Who sends a request: the identity and rights every part checks (gateway, knowledge bases, UI)."""

from __future__ import annotations

from dataclasses import dataclass

JWT_PREFIX = "jwt:"  # a JWT caller's name: jwt:<subject>
JWT_LABEL = "jwt"


@dataclass(frozen=True)
class Caller:
    """Who sent a request, and what they may do: from an API key or a JWT's claims."""

    name: str  # the key's name or the JWT subject; a metric label, so never a secret
    rpm: int | None = None  # requests per minute; None: unlimited
    tpm: int | None = None  # prompt + completion tokens per minute
    max_concurrency: int | None = None
    models: frozenset[str] | None = None  # None: every served model
    admin: bool = False
    cache_all: bool = False  # the answer cache may serve this caller sampled answers too
    thinking: bool = True  # false: its chat requests go with enable_thinking false

    @property
    def metric_label(self) -> str:
        """The caller in metric labels: a key's name, or `jwt` for every JWT caller. Subjects
        are unbounded (any the identity provider signs), and each label value is kept in
        memory for the life of the process."""
        return JWT_LABEL if self.name.startswith(JWT_PREFIX) else self.name


ANONYMOUS = Caller("anonymous")
