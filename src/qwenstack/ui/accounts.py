"""UI users: password hashes and each user's own gateway API key, in the UI's database.

Every user gets a gateway key of their own, so the gateway's limits, usage rows and metrics are
per user. It is named `ui-<account id>` after a random id the account gets when it is made, not
after the sign-in name: two identities (an SSO header may carry any text) never share a key or
a knowledge base, a removed user's successor under the same name gets new ones, and the names in
metrics and logs say nothing of who the user is. The UI makes the key on the user's first chat
through the gateway's admin API, with an admin key of its own, and keeps the secret here,
encrypted (Fernet) with the UI's database key: the gateway stores only digests, so this table is
the one place it can be read again, and a copy of the database alone does not give it away.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

# User names as `qwenstack users add` accepts them; SSO headers may carry more (e-mail addresses).
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
MIN_PASSWORD_CHARS = 8
UI_NAME_PREFIX = "ui-"  # the gateway reserves knowledge-base names so made for the UI's key
ACCOUNT_ID_BYTES = 8  # 16 hex digits: unguessable, and the names stay short
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
    # Names the user's gateway key and knowledge base; None in rows made before it existed,
    # given one on first use.
    account_id: Mapped[str | None] = mapped_column(sa.String(32), unique=True)
    # None: the user signs in through an SSO proxy's header.
    password_hash: Mapped[str | None] = mapped_column(sa.String(256))
    # The key's secret, Fernet-encrypted.
    gateway_key: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))


@dataclass(frozen=True)
class AccountInfo:
    identifier: str
    has_password: bool
    gateway_key: str | None  # the name of the key the UI made the user, once it has
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


def new_account_id() -> str:
    return secrets.token_hex(ACCOUNT_ID_BYTES)


def gateway_key_name(account_id: str) -> str:
    """The gateway key, and knowledge base, of the account with this id."""
    return f"{UI_NAME_PREFIX}{account_id}"


class Accounts:
    """Blocking calls: the UI makes them from worker threads. `cipher` encrypts the users'
    gateway keys; commands that never read or write one (`qwenstack users`) go without."""

    def __init__(self, engine: sa.Engine, cipher: Fernet | None = None) -> None:
        self.engine = engine
        self.cipher = cipher

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
                row = _new_account(identifier)
                session.add(row)
            row.password_hash = hash_password(password)

    def remove(self, identifier: str) -> str | None:
        """Remove the account; the name of the gateway key the UI made it, to be revoked."""
        with Session(self.engine) as session, session.begin():
            row = session.get(Account, identifier)
            if row is None:
                raise AccountError(f"No user named {identifier!r}.")
            key = _made_key(row)
            session.delete(row)
            return key

    def list(self) -> list[AccountInfo]:
        with Session(self.engine) as session:
            rows = session.scalars(sa.select(Account).order_by(Account.identifier))
            return [
                AccountInfo(r.identifier, r.password_hash is not None, _made_key(r), r.created_at)
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

    def has_password(self, identifier: str) -> bool:
        with Session(self.engine) as session:
            row = session.get(Account, identifier)
            return row is not None and row.password_hash is not None

    def ensure(self, identifier: str) -> None:
        """The account of a user signed in by an SSO header, made on first sign-in."""
        with Session(self.engine) as session, session.begin():
            if session.get(Account, identifier) is None:
                session.add(_new_account(identifier))

    def gateway_key(self, identifier: str) -> tuple[str, str | None]:
        """The name of the user's gateway key, and its secret when the UI has one."""
        with Session(self.engine) as session, session.begin():
            row = self._row(session, identifier)
            if row.account_id is None:
                row.account_id = new_account_id()
            name, stored = gateway_key_name(row.account_id), row.gateway_key
        if stored is None:
            return name, None
        try:
            return name, self._cipher().decrypt(stored.encode()).decode()
        except InvalidToken:  # encrypted with another database key: as good as lost
            return name, None

    def set_gateway_key(self, identifier: str, key: str) -> None:
        encrypted = self._cipher().encrypt(key.encode()).decode()
        with Session(self.engine) as session, session.begin():
            self._row(session, identifier).gateway_key = encrypted

    def renew_account_id(self, identifier: str) -> None:
        """A new id, so new key and base names, for an account whose key name turned out to be
        held by a key this UI has no secret of: the UI never adopts a key it did not make."""
        with Session(self.engine) as session, session.begin():
            row = self._row(session, identifier)
            row.account_id, row.gateway_key = new_account_id(), None

    def _cipher(self) -> Fernet:
        if self.cipher is None:
            raise AccountError("The UI database key is needed for users' gateway keys.")
        return self.cipher

    @staticmethod
    def _row(session: Session, identifier: str) -> Account:
        row = session.get(Account, identifier)
        if row is None:
            raise AccountError(f"No user named {identifier!r}.")
        return row


def _made_key(row: Account) -> str | None:
    return gateway_key_name(row.account_id) if row.account_id and row.gateway_key else None


def _new_account(identifier: str) -> Account:
    return Account(identifier=identifier, account_id=new_account_id(),
                   created_at=dt.datetime.now(dt.UTC))
