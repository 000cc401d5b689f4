"""The UI's database: its accounts and the tables of Chainlit's SQLAlchemy data layer.

Chainlit's data layer only reads and writes; creating its tables is left to the application.
They follow Chainlit's documented schema (docs.chainlit.io/data-layers/sqlalchemy) plus the step
fields Chainlit 2.12 writes (`modes`, `autoCollapse`, `icon`): on PostgreSQL with its types, on
SQLite with plain ones (Chainlit sends ids as text and JSON already serialised).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy.dialects import postgresql

from qwenstack.database import secret_file
from qwenstack.errors import SetupError
from qwenstack.settings import Settings
from qwenstack.ui.accounts import Account, Accounts
from qwenstack.ui.accounts import Base as AccountTables

ID = sa.Uuid(as_uuid=False)
JSON = sa.Text().with_variant(postgresql.JSONB(), "postgresql")
TAGS = sa.Text().with_variant(postgresql.ARRAY(sa.Text()), "postgresql")

chainlit_tables = sa.MetaData()
sa.Table(
    "users", chainlit_tables,
    sa.Column("id", ID, primary_key=True),
    sa.Column("identifier", sa.Text, nullable=False, unique=True),
    sa.Column("metadata", JSON, nullable=False),
    sa.Column("createdAt", sa.Text),
)
sa.Table(
    "threads", chainlit_tables,
    sa.Column("id", ID, primary_key=True),
    sa.Column("createdAt", sa.Text),
    sa.Column("name", sa.Text),
    sa.Column("userId", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), index=True),
    sa.Column("userIdentifier", sa.Text),
    sa.Column("tags", TAGS),
    sa.Column("metadata", JSON),
)
sa.Table(
    "steps", chainlit_tables,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("threadId", ID, sa.ForeignKey("threads.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("parentId", ID),
    sa.Column("streaming", sa.Boolean, nullable=False),
    sa.Column("waitForAnswer", sa.Boolean),
    sa.Column("isError", sa.Boolean),
    sa.Column("metadata", JSON),
    sa.Column("tags", TAGS),
    sa.Column("input", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("createdAt", sa.Text),
    sa.Column("command", sa.Text),
    sa.Column("modes", JSON),
    sa.Column("start", sa.Text),
    sa.Column("end", sa.Text),
    sa.Column("generation", JSON),
    sa.Column("showInput", sa.Text),
    sa.Column("language", sa.Text),
    sa.Column("indent", sa.Integer),
    sa.Column("defaultOpen", sa.Boolean),
    sa.Column("autoCollapse", sa.Boolean),
    sa.Column("icon", sa.Text),
)
sa.Table(
    "elements", chainlit_tables,
    sa.Column("id", ID, primary_key=True),
    sa.Column("threadId", ID, sa.ForeignKey("threads.id", ondelete="CASCADE")),
    sa.Column("type", sa.Text),
    sa.Column("url", sa.Text),
    sa.Column("chainlitKey", sa.Text),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("display", sa.Text),
    sa.Column("objectKey", sa.Text),
    sa.Column("size", sa.Text),
    sa.Column("page", sa.Integer),
    sa.Column("language", sa.Text),
    sa.Column("forId", ID),
    sa.Column("mime", sa.Text),
    sa.Column("props", JSON),
    sa.Column("autoPlay", sa.Boolean),
    sa.Column("playerConfig", JSON),
)
sa.Table(
    "feedbacks", chainlit_tables,
    sa.Column("id", ID, primary_key=True),
    sa.Column("forId", ID, nullable=False),
    sa.Column("threadId", ID, sa.ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    sa.Column("value", sa.Integer, nullable=False),
    sa.Column("comment", sa.Text),
)


def database_url(settings: Settings) -> str:
    """The UI database's URL for blocking use (accounts, schema)."""
    if settings.ui.database_url:
        url = settings.ui.database_url.get_secret_value()
        # Plain postgresql:// would pick psycopg2, which is not installed; psycopg 3 is.
        for scheme in ("postgresql://", "postgres://"):
            if url.startswith(scheme):
                return "postgresql+psycopg://" + url.removeprefix(scheme)
        return url
    return f"sqlite:///{settings.home / 'ui.db'}"


def async_database_url(settings: Settings) -> str:
    """The same database for Chainlit's data layer, which needs an asyncio driver."""
    url = sa.make_url(database_url(settings))
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if url.drivername == "postgresql+psycopg":  # psycopg 3 serves asyncio too
        return url.render_as_string(hide_password=False)
    raise SetupError(
        "ui.database_url: use SQLite or PostgreSQL (postgresql+psycopg://...), "
        f"not {url.drivername}"
    )


def connect(settings: Settings) -> sa.Engine:
    """An engine for the UI database, with Chainlit's tables and the accounts table created."""
    url = sa.make_url(database_url(settings))
    if url.get_backend_name() == "sqlite" and url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
        chainlit_tables.create_all(engine)
        AccountTables.metadata.create_all(engine)
        _upgrade_accounts(engine)
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        shown = url.render_as_string(hide_password=True)
        raise SetupError(f"The UI database {shown} cannot be used: {exc}") from None
    return engine


def _upgrade_accounts(engine: sa.Engine) -> None:
    """An accounts table of an earlier version: no account ids, gateway keys in plain text."""
    table = Account.__tablename__
    if "account_id" in {c["name"] for c in sa.inspect(engine).get_columns(table)}:
        return
    with engine.begin() as connection:
        connection.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN account_id VARCHAR(32)"))
        if engine.dialect.name == "postgresql":  # room for an encrypted key
            connection.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN gateway_key TYPE TEXT"))
        # The plain-text secrets go; each user gets a new key, named by a new account id, on
        # their next chat (an admin may revoke the old `ui-<name>` keys).
        connection.execute(sa.text(f"UPDATE {table} SET gateway_key = NULL"))


def cipher(settings: Settings) -> Fernet:
    """What encrypts users' gateway keys in the UI database: ui.database_key, or a key made
    once into <home>/secrets/ui-database-key."""
    if settings.ui.database_key:
        return Fernet(settings.ui.database_key.get_secret_value())
    return Fernet(secret_file(settings.home, "ui-database-key",
                              lambda: Fernet.generate_key().decode()))


def accounts(settings: Settings) -> Accounts:
    return Accounts(connect(settings), cipher(settings))
