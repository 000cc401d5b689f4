"""API keys: created, listed, revoked and rotated here; the secret itself is never stored.

A key is `sk-qs-` and 43 random URL-safe characters (256 bits), shown once. The database holds
HMAC-SHA256(pepper, secret): the pepper is a server-side secret outside the database, so a copy of
the database alone cannot even be used to test guesses. A presented key is found by its digest
(an indexed, parameterised query), so how long the lookup takes says nothing about the secret,
and the stored digest is compared again in constant time.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qwenstack import database as db
from qwenstack.callers import Caller
from qwenstack.database import ApiKey
from qwenstack.settings import Settings

SECRET_PREFIX = "sk-qs-"
SHOWN_CHARS = len(SECRET_PREFIX) + 6  # what `keys list` shows of a secret
# Names are metric labels and log fields: short and plain. (":" is kept for "jwt:<subject>".)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FIRST_ADMIN = "admin"


class KeyStoreError(ValueError):
    """A key operation that cannot be done as asked: name taken, bad field, revoked key."""


class UnknownKey(KeyStoreError):
    pass


@dataclass(frozen=True)
class KeyInfo:
    """A key as listings show it: everything but the secret."""

    name: str
    prefix: str
    admin: bool
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    models: list[str] | None
    cache_all: bool
    thinking: bool
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        return cls(
            row.name,
            row.prefix,
            row.admin,
            row.rpm,
            row.tpm,
            row.max_concurrency,
            row.models,
            row.cache_all,
            row.thinking,
            db.aware(row.created_at),
            db.aware(row.expires_at) if row.expires_at else None,
            db.aware(row.revoked_at) if row.revoked_at else None,
        )

    @property
    def status(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= db.now():
            return "expired"
        return "active"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prefix": self.prefix,
            "admin": self.admin,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrency": self.max_concurrency,
            "models": self.models,
            "cache_all": self.cache_all,
            "thinking": self.thinking,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "status": self.status,
        }

    @functools.cached_property
    def caller(self) -> Caller:
        return Caller(
            self.name,
            rpm=self.rpm,
            tpm=self.tpm,
            max_concurrency=self.max_concurrency,
            models=frozenset(self.models) if self.models is not None else None,
            admin=self.admin,
            cache_all=self.cache_all,
            thinking=self.thinking,
        )


def load_pepper(settings: Settings) -> bytes:
    """The configured pepper, or the one generated into <home>/secrets/pepper on first use."""
    if settings.auth.pepper:
        return settings.auth.pepper.get_secret_value().encode()
    return db.secret_file(settings.home, "pepper", lambda: secrets.token_hex(32)).encode()


class KeyStore:
    """Keys in the database. Blocking calls: the gateway makes them from worker threads."""

    def __init__(self, engine: sa.Engine, pepper: bytes) -> None:
        self.engine = engine
        self._pepper = pepper

    @classmethod
    def open(cls, settings: Settings) -> KeyStore:
        return cls(db.connect(settings.database), load_pepper(settings))

    def digest(self, secret: bytes) -> str:
        return hmac.new(self._pepper, secret, hashlib.sha256).hexdigest()

    def create(
        self,
        name: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrency: int | None = None,
        models: list[str] | None = None,
        expires_in: dt.timedelta | None = None,
        admin: bool = False,
        cache_all: bool = False,
        thinking: bool = True,
    ) -> tuple[KeyInfo, str]:
        """A new key and its secret, which only the caller ever sees."""
        if not NAME.fullmatch(name):
            raise KeyStoreError(
                f"Key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with "
                "a letter or digit."
            )
        for field, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrency", max_concurrency)):
            if value is not None and value < 1:
                raise KeyStoreError(f"{field} must be at least 1.")
        if models is not None and (not models or not all(isinstance(m, str) and m for m in models)):
            raise KeyStoreError("models must be a non-empty list of model names.")
        secret = _new_secret()
        created = db.now()
        row = ApiKey(
            name=name,
            digest=self.digest(secret.encode()),
            prefix=secret[:SHOWN_CHARS],
            admin=admin,
            rpm=rpm,
            tpm=tpm,
            max_concurrency=max_concurrency,
            models=models,
            cache_all=cache_all,
            thinking=thinking,
            created_at=created,
            expires_at=created + expires_in if expires_in else None,
        )
        try:
            with Session(self.engine) as session, session.begin():
                session.add(row)
                session.flush()
                info = KeyInfo.of(row)
        except IntegrityError:
            raise KeyStoreError(
                f"A key named {name!r} exists already (revoked keys keep their names)."
            ) from None
        return info, secret

    def list(self) -> list[KeyInfo]:
        with Session(self.engine) as session:
            return [
                KeyInfo.of(row) for row in session.scalars(sa.select(ApiKey).order_by(ApiKey.name))
            ]

    def revoke(self, name: str) -> tuple[KeyInfo, str]:
        """Revoke `name`; returns it and the digest it had, for caches to forget."""
        with Session(self.engine) as session, session.begin():
            row = self._active(session, name)
            row.revoked_at = db.now()
            return KeyInfo.of(row), row.digest

    def rotate(self, name: str) -> tuple[KeyInfo, str, str]:
        """A new secret for `name` (same limits); the old one stops working. Returns the key,
        the new secret and the old digest."""
        secret = _new_secret()
        with Session(self.engine) as session, session.begin():
            row = self._active(session, name)
            old_digest = row.digest
            row.digest, row.prefix, row.rotated_at = (
                self.digest(secret.encode()),
                secret[:SHOWN_CHARS],
                db.now(),
            )
            return KeyInfo.of(row), secret, old_digest

    def find(self, digest: str) -> KeyInfo | None:
        """The unrevoked key with this digest (expiry is for the caller to check: keys are
        cached)."""
        with Session(self.engine) as session:
            row = session.scalar(
                sa.select(ApiKey).where(ApiKey.digest == digest, ApiKey.revoked_at.is_(None))
            )
            if row is None or not hmac.compare_digest(row.digest, digest):
                return None
            return KeyInfo.of(row)

    def create_first_admin(self) -> str | None:
        """On a first start (no keys at all), an admin key; its secret, to print once."""
        with Session(self.engine) as session:
            if session.scalar(sa.select(ApiKey.id).limit(1)) is not None:
                return None
        try:
            return self.create(FIRST_ADMIN, admin=True)[1]
        except KeyStoreError:  # another gateway replica made it a moment ago
            return None

    def _active(self, session: Session, name: str) -> ApiKey:
        row = session.scalar(sa.select(ApiKey).where(ApiKey.name == name))
        if row is None:
            raise UnknownKey(f"No key named {name!r}.")
        if row.revoked_at is not None:
            raise KeyStoreError(f"The key {name!r} is revoked.")
        return row


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)
