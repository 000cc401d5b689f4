"""UI users: password hashes and each user's own gateway API key, in the UI's database.

Every user gets a gateway key of their own (named `ui-<user>`), so the gateway's limits, usage
rows and metrics are per user. The UI makes it on the user's first chat through the gateway's
admin API, with an admin key of its own, and keeps the secret here: the gateway stores only
digests, so this table is the one place it can be read again. Guard the UI database like the
key secrets it holds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

# User names as `qwenstack users add` accepts them; SSO headers may carry more (e-mail addresses).
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
MIN_PASSWORD_CHARS = 8
# scrypt with OWASP's recommended minimum (N=2^17, r=8, p=1): 128 MiB and up to a second per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SCRYPT_MAXMEM = 256 * 2**20


class AccountError(ValueError):
    """A user operation that cannot be done as asked: bad name, short password, unknown user."""


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "qwenstack_ui_accounts"

    identifier: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    # None: the user signs in through an SSO proxy's header.
    password_hash: Mapped[str | None] = mapped_column(sa.String(256))
    gateway_key: Mapped[str | None] = mapped_column(sa.String(128))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))


@dataclass(frozen=True)
class AccountInfo:
    identifier: str
    has_password: bool
    has_gateway_key: bool
    created_at: dt.datetime


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        candidate = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
            maxmem=SCRYPT_MAXMEM,
        )
    except ValueError:
        return False
    return hmac.compare_digest(candidate.hex(), digest)


def gateway_key_name(identifier: str) -> str:
    """The gateway key name for a user: readable, within the gateway's name rules, unique.

    Names outside those rules (an e-mail address from an SSO proxy) get a hash suffix, so two
    users whose names differ only in such characters never share a key."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "_", identifier)
    if plain == identifier and len(identifier) <= 61:
        return f"ui-{identifier}"
    return f"ui-{plain[:50]}-{hashlib.sha256(identifier.encode()).hexdigest()[:10]}"


class Accounts:
    """Blocking calls: the UI makes them from worker threads."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def add(self, identifier: str, password: str) -> None:
        if not USER_NAME.fullmatch(identifier):
            raise AccountError(
                f"User name {identifier!r}: use 1-128 letters, digits, '.', '_', '@', '+' or '-', "
                "starting with a letter or digit."
            )
        if len(password) < MIN_PASSWORD_CHARS:
            raise AccountError(f"The password must have at least {MIN_PASSWORD_CHARS} characters.")
        with Session(self.engine) as session, session.begin():
            row = session.get(Account, identifier)
            if row is not None and row.password_hash is not None:
                raise AccountError(f"A user named {identifier!r} exists already.")
            if row is None:
                row = Account(identifier=identifier, created_at=dt.datetime.now(dt.UTC))
                session.add(row)
            row.password_hash = hash_password(password)

    def remove(self, identifier: str) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(Account, identifier)
            if row is None:
                raise AccountError(f"No user named {identifier!r}.")
            session.delete(row)

    def list(self) -> list[AccountInfo]:
        with Session(self.engine) as session:
            rows = session.scalars(sa.select(Account).order_by(Account.identifier))
            return [
                AccountInfo(r.identifier, r.password_hash is not None, r.gateway_key is not None,
                            r.created_at)
                for r in rows
            ]

    def check_password(self, identifier: str, password: str) -> bool:
        with Session(self.engine) as session:
            row = session.get(Account, identifier)
            stored = row.password_hash if row else None
        if stored is None:
            # Hash anyway: a reply as slow as a wrong password does not reveal who has an account.
            hash_password(password)
            return False
        return password_matches(password, stored)

    def ensure(self, identifier: str) -> None:
        """The account of a user signed in by an SSO header, made on first sign-in."""
        with Session(self.engine) as session, session.begin():
            if session.get(Account, identifier) is None:
                session.add(Account(identifier=identifier, created_at=dt.datetime.now(dt.UTC)))

    def gateway_key(self, identifier: str) -> str | None:
        with Session(self.engine) as session:
            row = session.get(Account, identifier)
            return row.gateway_key if row else None

    def set_gateway_key(self, identifier: str, key: str | None) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(Account, identifier)
            if row is None:
                raise AccountError(f"No user named {identifier!r}.")
            row.gateway_key = key
