"""Knowledge-base metadata in the gateway's SQL database: names, owners, grants, files.

The chunks themselves live in Milvus (store.py); this is what says who may read a knowledge
base and which version of each file its chunks belong to. Schema: migrations 0004 and 0007.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from qwenstack.callers import JWT_PREFIX, Caller
from qwenstack.database import ApiKey, Base, aware
from qwenstack.rag import RagError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The chat UI's per-user bases: only the UI's own service key may make one (auth.ui_service_key).
UI_PREFIX = "ui-"


class KnowledgeBase(Base):
    __tablename__ = "knowledge_bases"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    # A key name or jwt:<sub>; None: admins.
    owner: Mapped[str | None] = mapped_column(sa.String(256))
    # Queries must be embedded by the model the chunks were embedded by.
    embedding_model: Mapped[str] = mapped_column(sa.String(512))
    dimension: Mapped[int]
    # The dense leg's weight in hybrid search, from `kb tune`; None: rag.dense_weight's rule.
    dense_weight: Mapped[float | None]
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))


class KnowledgeBaseGrant(Base):
    __tablename__ = "knowledge_base_grants"
    __table_args__ = (sa.UniqueConstraint("knowledge_base_id", "caller"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    knowledge_base_id: Mapped[int] = mapped_column(
        sa.ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    caller: Mapped[str] = mapped_column(sa.String(256))
    write: Mapped[bool]


class KnowledgeBaseFile(Base):
    __tablename__ = "knowledge_base_files"
    __table_args__ = (sa.UniqueConstraint("knowledge_base_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    knowledge_base_id: Mapped[int] = mapped_column(
        sa.ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(1024))
    sha256: Mapped[str] = mapped_column(sa.String(64))
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    chunks: Mapped[int]
    # Bumped on each re-ingest; chunk ids carry it, so new chunks go in before old ones go.
    version: Mapped[int]
    ingested_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise RagError(
            f"Invalid knowledge base name {name!r}: 1-64 letters, digits, . _ - "
            "(starting with a letter or digit).", code="invalid_knowledge_base_name",
        )
    return name


def check_creator(name: str, creator: Caller, ui_service_key: str) -> None:
    """400 unless `creator` may make a base of this name: `ui-...` is the UI's alone, so no key
    can make a base the UI would later take for one of its users'."""
    if name.startswith(UI_PREFIX) and creator.name != ui_service_key:
        raise RagError(
            f"Knowledge base names starting {UI_PREFIX!r} are reserved for the chat UI.",
            code="reserved_knowledge_base_name", param="name",
        )


def check_grantees(session: sa.orm.Session, callers: Iterable[str], param: str) -> None:
    """400 unless each key named exists: a grant to a name nobody holds yet would pass the base
    to whoever is later given that name."""
    # JWT callers (jwt:<subject>) have no key row to check.
    keys = {name for name in callers if not name.startswith(JWT_PREFIX)}
    known = set(session.scalars(sa.select(ApiKey.name).where(ApiKey.name.in_(keys))))
    if unknown := sorted(keys - known):
        raise RagError(f"No API key named {', '.join(map(repr, unknown))}: grant existing keys "
                       f"(or {JWT_PREFIX}<subject> for a JWT caller).",
                       code="unknown_grantee", param=param)


def may_read(session: sa.orm.Session, kb: KnowledgeBase, caller: Caller, open_access: bool) -> bool:
    return _allowed(session, kb, caller, open_access, write=False)


def may_write(
    session: sa.orm.Session, kb: KnowledgeBase, caller: Caller, open_access: bool
) -> bool:
    return _allowed(session, kb, caller, open_access, write=True)


def _allowed(
    session: sa.orm.Session, kb: KnowledgeBase, caller: Caller, open_access: bool, write: bool
) -> bool:
    if open_access or caller.admin or (kb.owner is not None and caller.name == kb.owner):
        return True
    grant = session.scalar(sa.select(KnowledgeBaseGrant).where(
        KnowledgeBaseGrant.knowledge_base_id == kb.id, KnowledgeBaseGrant.caller == caller.name))
    return grant is not None and (grant.write or not write)


def describe(session: sa.orm.Session, kb: KnowledgeBase) -> dict[str, object]:
    grants = session.scalars(sa.select(KnowledgeBaseGrant).where(
        KnowledgeBaseGrant.knowledge_base_id == kb.id)).all()
    files = session.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(
        KnowledgeBaseFile.chunks), 0)).where(KnowledgeBaseFile.knowledge_base_id == kb.id)).one()
    return {
        "object": "knowledge_base", "name": kb.name, "owner": kb.owner,
        "readers": sorted(g.caller for g in grants if not g.write),
        "writers": sorted(g.caller for g in grants if g.write),
        "embedding_model": kb.embedding_model, "dense_weight": kb.dense_weight,
        "files": files[0], "chunks": int(files[1]), "created_at": aware(kb.created_at).isoformat(),
    }


