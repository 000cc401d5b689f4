"""Who is calling: `Authorization: Bearer <API key or JWT>` turned into a `Caller`.

Checked on every /v1/* and /admin/* request (and /metrics when `auth.protect_metrics`), before
routing; /health and /ready stay open. A key lookup is cached for `auth.key_cache_s`, so the
hot path does not query the database per request: a revocation takes effect at once on the
gateway that revoked it (admin API) and within that time on others (CLI, other replicas).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import jwt
from sqlalchemy.exc import SQLAlchemyError

from qwenstack.callers import ANONYMOUS, JWT_PREFIX, Caller
from qwenstack.gateway.errors import GatewayError
from qwenstack.keys import SECRET_PREFIX, KeyInfo, KeyStore
from qwenstack.settings import AuthSettings

log = logging.getLogger(__name__)

BEARER = b"bearer "
KEY_PREFIX = SECRET_PREFIX.encode()
# Unknown keys are cached too (so guessing does not reach the database), up to this many.
MAX_CACHED = 100_000
JWKS_LIFESPAN_S = 300


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


class Authenticator:
    def __init__(self, settings: AuthSettings, store: KeyStore) -> None:
        self.settings = settings
        self.store = store
        self._cache: dict[str, tuple[KeyInfo | None, float]] = {}  # digest -> (key, cached until)
        jwt_settings = settings.jwt
        self._jwks = (
            jwt.PyJWKClient(jwt_settings.jwks_url, lifespan=JWKS_LIFESPAN_S, timeout=5)
            if jwt_settings.jwks_url
            else None
        )

    async def authenticate(self, authorization: bytes | None) -> Caller:
        """The caller a header value stands for; a GatewayError(401) for anything else."""
        if not self.settings.enabled:
            return ANONYMOUS
        if authorization is None:
            raise _unauthorized("No API key: send `Authorization: Bearer sk-qs-...`.")
        if authorization[:7].lower() != BEARER:
            raise _unauthorized("The Authorization header must be `Bearer <key or token>`.")
        token = authorization[7:].strip()
        if token.startswith(KEY_PREFIX):
            return await self._key_caller(token)
        if self.settings.jwt.enabled and token.count(b".") == 2:
            return await self._jwt_caller(token)
        raise _unauthorized("Invalid API key.")

    def forget(self, digest: str) -> None:
        """Drop a revoked or rotated key from the cache."""
        self._cache.pop(digest, None)

    async def _key_caller(self, secret: bytes) -> Caller:
        digest = self.store.digest(secret)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached and cached[1] > now:
            key = cached[0]
        else:
            try:
                key = await asyncio.to_thread(self.store.find, digest)
            except SQLAlchemyError as exc:
                if cached is None:
                    log.warning("Cannot look up an API key: %s", exc)
                    raise GatewayError(
                        503, "API keys cannot be checked right now.", code="auth_unavailable",
                        retry_after_s=5,
                    ) from None
                key = cached[0]  # the database is away: what it said last still holds
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (key, now + self.settings.key_cache_s)
        if key is None or key.status != "active":
            raise _unauthorized(
                "Invalid API key." if key is None else f"The API key {key.name!r} has expired."
            )
        return key.caller

    async def _jwt_caller(self, token: bytes) -> Caller:
        try:
            text = token.decode("ascii")
            algorithm = jwt.get_unverified_header(text).get("alg")
            if algorithm not in self.settings.jwt.algorithms:
                raise jwt.InvalidAlgorithmError(f"The algorithm {algorithm!r} is not accepted.")
            if self._jwks and not algorithm.startswith("HS"):
                # The JWKS client fetches (blocking) when its cached key set lacks the `kid`.
                claims = await asyncio.to_thread(self._decode_jwks, text, algorithm)
            else:
                claims = self._decode(text, algorithm, self._static_key(algorithm))
            return self._caller(claims)
        except UnicodeDecodeError:
            raise _unauthorized("Invalid token.") from None
        except jwt.PyJWTError as exc:
            raise _unauthorized(f"Invalid token: {exc}") from None

    def _static_key(self, algorithm: str) -> str:
        jwt_settings = self.settings.jwt
        # Each algorithm family has its own key, so a public key can never serve as an HMAC secret.
        if algorithm.startswith("HS"):
            key = jwt_settings.secret.get_secret_value() if jwt_settings.secret else None
        else:
            key = jwt_settings.public_key
        if not key:
            raise jwt.InvalidKeyError(f"No key is configured for {algorithm}.")
        return key

    def _decode_jwks(self, token: str, algorithm: str) -> dict[str, Any]:
        assert self._jwks is not None
        return self._decode(token, algorithm, self._jwks.get_signing_key_from_jwt(token).key)

    def _decode(self, token: str, algorithm: str, key: Any) -> dict[str, Any]:
        jwt_settings = self.settings.jwt
        return jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=jwt_settings.audience,
            issuer=jwt_settings.issuer,
            leeway=jwt_settings.leeway_s,
            options={"require": ["exp", jwt_settings.claims.subject]},
        )

    def _caller(self, claims: dict[str, Any]) -> Caller:
        names = self.settings.jwt.claims
        subject = claims[names.subject]
        if not isinstance(subject, str) or not subject:
            raise jwt.InvalidTokenError(f"The `{names.subject}` claim must be a non-empty string.")
        limits = {}
        for field in ("rpm", "tpm", "max_concurrency"):
            value = claims.get(getattr(names, field))
            if value is not None and (type(value) is not int or value < 1):
                raise jwt.InvalidTokenError(
                    f"The `{getattr(names, field)}` claim must be a positive integer."
                )
            limits[field] = value
        models = claims.get(names.models)
        if isinstance(models, str):
            models = models.replace(",", " ").split()
        if models is not None and not (
            isinstance(models, list) and all(isinstance(m, str) for m in models)
        ):
            raise jwt.InvalidTokenError(
                f"The `{names.models}` claim must be a list of model names."
            )
        return Caller(
            f"{JWT_PREFIX}{subject}",
            **limits,
            models=frozenset(models) if models is not None else None,
            admin=names.admin is not None and claims.get(names.admin) is True,
            cache_all=claims.get(names.cache_all) is True,
            thinking=claims.get(names.thinking) is not False,
        )


def check_model(caller: Caller, model: str) -> None:
    """403 when the caller's key or token does not cover `model`."""
    if caller.models is not None and model not in caller.models:
        raise GatewayError(
            403,
            f"This API key may not use the model `{model}`.",
            code="model_not_allowed",
            param="model",
        )
