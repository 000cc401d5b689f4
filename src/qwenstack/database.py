"""The gateway's database: API keys and usage records, through SQLAlchemy.

SQLite at <home>/qwenstack.db by default, PostgreSQL by URL. The schema is Alembic's
(migrations), brought to `head` whenever a gateway or a `qwenstack keys|usage` command
opens the database. Calls here block; the gateway makes them from worker threads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from qwenstack.errors import SetupError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
# Serialises migrations of gateway replicas starting together against one PostgreSQL database.
MIGRATION_LOCK_ID = 0x717765_6E737461  # "qwensta"
# Alembic's per-run notes ("Context impl SQLiteImpl") would precede every `qwenstack keys` output.
logging.getLogger("alembic").setLevel(logging.WARNING)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    # HMAC-SHA256(pepper, secret), hex: what a presented key is looked up by. The secret is not
    # stored.
    digest: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(
        sa.String(16)
    )  # the secret's start, to recognise it in lists
    admin: Mapped[bool] = mapped_column(default=False)
    # The answer cache may serve this key sampled answers too (not only deterministic ones).
    cache_all: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    # False: its chat requests go with enable_thinking false (gateway validation.hold_thinking).
    thinking: Mapped[bool] = mapped_column(default=True, server_default=sa.true())
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    max_concurrency: Mapped[int | None]
    models: Mapped[list[str] | None] = mapped_column(sa.JSON)  # None: every model
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    expires_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    rotated_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))


class UsageRecord(Base):
    """One inference request that got past authentication, however it ended."""

    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True
    )
    time: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), index=True)
    request_id: Mapped[str] = mapped_column(sa.String(128), index=True)
    caller: Mapped[str] = mapped_column(sa.String(256), index=True)  # key name or "jwt:" + subject
    route: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str] = mapped_column(sa.String(256))  # the model that served
    # The name the client sent, when it was another: an alias, or a model that fell back.
    requested_model: Mapped[str | None] = mapped_column(sa.String(256))
    status: Mapped[int]
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    latency_ms: Mapped[float]
    ttft_ms: Mapped[float | None]  # streams only: a whole answer has no first token to time
    # Answered from the answer cache: the caller got these tokens, the engines did no work.
    cached: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    tool_calls: Mapped[int] = mapped_column(default=0, server_default="0")  # in the answer


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(moment: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; everything stored here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


DURATION = re.compile(r"(\d+)\s*([smhdw])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """'30d', '12h', '90m', '45s', '2w' (key lifetimes, report windows)."""
    match = DURATION.fullmatch(text.strip().lower())
    if not match or int(match[1]) == 0:
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h, 90m or 45s")
    return dt.timedelta(seconds=int(match[1]) * UNIT_SECONDS[match[2]])


PRIVATE_UMASK = 0o077
SECRETS_FOLDER = "secrets"
# Folders of the home whose files hold what others must not read: key secrets, chat logs with
# prompts, request logs with key names. The home's own files are its databases (qwenstack.db,
# ui.db, milvus.db and their journals).
PRIVATE_FOLDERS = (SECRETS_FOLDER, "logs")


def make_private(home: Path) -> None:
    """The home 0700 and its databases, secrets and logs 0600, from this process on.

    The umask makes every file this process and its children (engines, the UI) create private
    to their user, whoever creates it (SQLite, Milvus Lite, Chainlit); the chmods bring files
    an older version made readable to others in line."""
    os.umask(PRIVATE_UMASK)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    for folder in (home, *(home / name for name in PRIVATE_FOLDERS)):
        if folder.is_dir():
            _restrict(folder, 0o700)
            for path in folder.iterdir():
                if path.is_file() and not path.is_symlink():
                    _restrict(path, 0o600)


def _restrict(path: Path, mode: int) -> None:
    try:
        path.chmod(mode)
    except PermissionError:  # not ours, e.g. a volume's root a container runtime made
        log.warning("Cannot make %s private (mode %o): it belongs to another user", path, mode)


def secret_file(home: Path, name: str, make: Callable[[], str]) -> str:
    """A secret kept in <home>/secrets/<name> (mode 0600), made by `make` on first use. Processes
    starting together agree on one: the first to link its draft into place wins."""
    folder = home / SECRETS_FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        draft = path.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}")
        write_secret(draft, make())
        try:
            os.link(draft, path)  # atomic, and fails when another process got there first
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


def write_secret(path: Path, value: str) -> None:
    """`value` into a new file only its owner may read, whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(value + "\n")


def _normalised(url: str) -> str:
    # Plain postgresql:// would pick psycopg2, which is not installed; psycopg 3 is.
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def connect(url: str) -> sa.Engine:
    """An engine for `url`, its schema migrated to the newest version."""
    url = _normalised(url)
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL: `qwenstack keys` can write while a gateway inserts usage rows.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA busy_timeout=30000")
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    try:
        migrate(engine)
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        shown = sa_url.render_as_string(hide_password=True)
        # The driver's own error says most, where there is one.
        detail = exc.orig if isinstance(exc, sa.exc.StatementError) and exc.orig else exc
        raise SetupError(f"The database {shown} cannot be used: {detail}") from None
    return engine


@contextlib.contextmanager
def _sqlite_migration_lock(engine: sa.Engine) -> Iterator[None]:
    """SQLite has no advisory lock, and its DDL runs outside a transaction: processes (or threads,
    as `up` opens the key store from the gateway and the UI at once) migrating a new file take
    turns on a lock file beside it, or the second fails with "table ... already exists"."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migration-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def migrate(engine: sa.Engine) -> None:
    # Alembic is imported here: most commands open no database, and it costs a tenth of a second.
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _sqlite_migration_lock(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
