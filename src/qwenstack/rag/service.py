"""Knowledge bases as one service, shared by the CLI and the gateway: create, grant, ingest,
search, delete, with the access rules applied. Calls block; the gateway makes them from
worker threads.

A file is known by its name within its base (the name without folders: an upload's file name,
the CLI's file's own name). Ingesting a name again replaces the file: identical bytes (by
sha256) are skipped, changed ones replace its chunks. An ingest is all or nothing per file: the
file is parsed (in a worker process with CPU and memory limits, parse_worker.py), chunked and
embedded before anything is written; its new chunks go into Milvus under a new version, then its
metadata row is committed, and only then are the old version's chunks deleted. A failure at any
step removes what the new version wrote and leaves the previous version as it was.

What holds if the process dies midway: the committed version's chunks are never deleted before
another version is committed, so a file never has zero copies. It can have two: dying after the
new chunks went in (before the commit, or after it but before the old ones were deleted) leaves
both versions searchable until the file is next ingested changed (which deletes every version
but the one it commits, the uncommitted one's chunks included, as they carry the number it
reuses) or removed. Not covered: dying between a new file's first chunks and its row's commit
leaves chunks that no row names (on SQLite, whose ids can be reused, under the next new
file's id, until that file is replaced or removed).
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from qwenstack.callers import Caller
from qwenstack.console import NO_PROGRESS, Progress
from qwenstack.database import now
from qwenstack.errors import SetupError
from qwenstack.rag import RagError, fusion
from qwenstack.rag.catalog import (
    KnowledgeBase,
    KnowledgeBaseFile,
    KnowledgeBaseGrant,
    check_creator,
    check_grantees,
    check_name,
    describe,
    may_read,
    may_write,
)
from qwenstack.rag.chunking import Chunk, TokenCounter, chunk_sections
from qwenstack.rag.embeddings import Embedder
from qwenstack.rag.parse_worker import ParseWorkers
from qwenstack.rag.remote import EngineUrls, RemoteReranker, probed_engines
from qwenstack.rag.store import Hit, MilvusException, MilvusStore, Mode, StoredChunk
from qwenstack.settings import RagSettings, Settings

log = logging.getLogger(__name__)

# Texts per embedding call: a multiple of every usual batch size (rag.embedding_batch_size, 32),
# so batches stay full, and small enough that a progress bar moves every few seconds.
EMBED_SLICE = 256
Reranker = Callable[[str, list[Hit]], list[Hit]]


@dataclass(frozen=True)
class FileResult:
    name: str
    status: str  # "ingested", "replaced" or "unchanged"
    chunks: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "chunks": self.chunks}


@dataclass(frozen=True)
class PreparedFile:
    """A file parsed and chunked, not yet written anywhere."""

    name: str
    size: int
    sha256: str
    chunks: list[Chunk]


@dataclass(frozen=True)
class SearchedBase:
    name: str
    id: int
    embedding_model: str
    dimension: int
    dense_weight: float | None


@dataclass(frozen=True)
class Retrieved:
    knowledge_base: str
    hit: Hit

    def citation(self) -> dict[str, Any]:
        return self.hit.citation(self.knowledge_base)


def load_reranker(spec: str | None) -> Reranker | None:
    """`module:callable` from settings: (query, hits) -> hits, best first."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def make_reranker(settings: RagSettings, engines: EngineUrls) -> Reranker | None:
    """The configured reranker: a served model (rag.rerank_model) at rag.rerank_url or among
    `engines`, a `module:callable` (rag.reranker), or none."""
    if settings.rerank_model:
        key = settings.rerank_api_key.get_secret_value() if settings.rerank_api_key else None
        return RemoteReranker(settings.rerank_url or engines, settings.rerank_model, key)
    return load_reranker(settings.reranker)


class KnowledgeService:
    def close(self) -> None:
        self.store.close()
        self.engine.dispose()

    def __init__(
        self,
        engine: sa.Engine,
        store: MilvusStore,
        embedder_factory: Callable[[], Embedder],
        reranker: Reranker | None,
        counter: TokenCounter,
        settings: RagSettings,
        open_access: bool,
        ui_service_key: str,
    ) -> None:
        self.engine = engine
        self.store = store
        self.counter = counter
        self.settings = settings
        self.open_access = open_access  # auth off: every caller may do everything
        self.ui_service_key = ui_service_key  # the only caller that makes `ui-...` bases
        self.reranker = reranker
        self.parse_workers = ParseWorkers(settings)
        self._embedder_factory = embedder_factory
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        # Loaded on first use: a sentence-transformers model takes seconds and most requests
        # never need it.
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = self._embedder_factory()
            return self._embedder

    # --- knowledge bases -------------------------------------------------------------------

    def create(
        self, name: str, owner: str | None, creator: Caller, readers: Sequence[str] = (),
        writers: Sequence[str] = (),
    ) -> dict[str, object]:
        check_name(name)
        if not self.open_access:
            check_creator(name, creator, self.ui_service_key)
        embedder = self.embedder
        with Session(self.engine) as session, session.begin():
            check_grantees(session, readers, "readers")
            check_grantees(session, writers, "writers")
            if session.scalar(sa.select(KnowledgeBase).where(KnowledgeBase.name == name)):
                raise RagError(f"The knowledge base {name!r} exists already.", status=409,
                               code="knowledge_base_exists")
            kb = KnowledgeBase(name=name, owner=owner, embedding_model=embedder.name,
                               dimension=embedder.dimension, created_at=now())
            session.add(kb)
            session.flush()
            for caller in dict.fromkeys([*readers, *writers]):
                session.add(KnowledgeBaseGrant(knowledge_base_id=kb.id, caller=caller,
                                               write=caller in writers))
            session.flush()
            # The collection first: a failure here rolls the metadata back with it.
            self.store.create(kb.id, embedder.dimension)
            return describe(session, kb)

    # Named `list`, this method hides the builtin in the rest of the class body: the annotations
    # below say `builtins.list`.
    def list(self, caller: Caller) -> list[dict[str, object]]:
        with Session(self.engine) as session:
            kbs = session.scalars(sa.select(KnowledgeBase).order_by(KnowledgeBase.name)).all()
            return [describe(session, kb) for kb in kbs
                    if may_read(session, kb, caller, self.open_access)]

    def get(self, name: str, caller: Caller) -> dict[str, object]:
        with Session(self.engine) as session:
            return describe(session, self._readable(session, name, caller))

    def set_dense_weight(self, name: str, weight: float | None, caller: Caller) -> None:
        """The base's own dense weight in hybrid search (`kb tune`); None: the setting's rule."""
        with Session(self.engine) as session, session.begin():
            self._writable(session, name, caller).dense_weight = weight

    def delete(self, name: str, caller: Caller) -> None:
        with Session(self.engine) as session, session.begin():
            kb = self._writable(session, name, caller, owner_only=True)
            self.store.drop(kb.id)
            session.delete(kb)

    def grant(self, name: str, caller_name: str, write: bool, caller: Caller) -> dict[str, object]:
        with Session(self.engine) as session, session.begin():
            kb = self._writable(session, name, caller, owner_only=True)
            check_grantees(session, [caller_name], "caller")
            grant = session.scalar(sa.select(KnowledgeBaseGrant).where(
                KnowledgeBaseGrant.knowledge_base_id == kb.id,
                KnowledgeBaseGrant.caller == caller_name))
            if grant is None:
                session.add(KnowledgeBaseGrant(knowledge_base_id=kb.id, caller=caller_name,
                                               write=write))
            else:
                grant.write = write
            session.flush()
            return describe(session, kb)

    def files(self, name: str, caller: Caller) -> builtins.list[dict[str, object]]:
        with Session(self.engine) as session:
            kb = self._readable(session, name, caller)
            rows = session.scalars(
                sa.select(KnowledgeBaseFile)
                .where(KnowledgeBaseFile.knowledge_base_id == kb.id)
                .order_by(KnowledgeBaseFile.name)
            ).all()
            return [{"name": f.name, "sha256": f.sha256, "bytes": f.bytes, "chunks": f.chunks,
                     "ingested_at": f.ingested_at.isoformat()} for f in rows]

    # --- ingest ----------------------------------------------------------------------------

    def ingest(
        self, name: str, files: Sequence[tuple[str, bytes]], caller: Caller,
        progress: Progress = NO_PROGRESS,
    ) -> builtins.list[FileResult]:
        """Each (file name, content) in turn; every file is parsed before any is written, so
        a bad file refuses the whole request. Per file, all or nothing. `progress` hears each
        stage (parse, embed, write) and each file or chunk done."""
        names = [_file_name(file_name) for file_name, _ in files]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            # One name is one file of the base: the second would silently replace the first.
            raise RagError(f"Several files named {', '.join(map(repr, duplicates))} in one "
                           "ingest; a base knows a file by its name (without folders).",
                           code="duplicate_file_name")
        with Session(self.engine) as session:
            kb = self._writable(session, name, caller)
            kb_id, kb_model, kb_dimension = kb.id, kb.embedding_model, kb.dimension
            known = dict(session.execute(
                sa.select(KnowledgeBaseFile.name, KnowledgeBaseFile.sha256)
                .where(KnowledgeBaseFile.knowledge_base_id == kb_id)
            ).all())
        self._check_model(name, kb_model, kb_dimension)
        progress.stage("parsing files", len(files))
        prepared = []
        for file_name, (_, data) in zip(names, files, strict=True):
            prepared.append(self._prepare(file_name, data))
            progress.advance()
        changed = [item for item in prepared if known.get(item.name) != item.sha256]
        # All changed files' chunks together: batches fill up, which small files alone do not.
        texts = [c.text for item in changed for c in item.chunks]
        progress.stage("embedding chunks", len(texts))
        vectors = iter(self.embed_all(texts, progress))
        embedded = {id(item): [next(vectors) for _ in item.chunks] for item in changed}
        progress.stage("writing files", len(prepared))
        results = []
        try:
            for item in prepared:
                results.append(self._ingest_one(kb_id, item, embedded.get(id(item))))
                progress.advance()
        finally:
            # Once per request, as each seal writes a segment. A failed seal costs speed, not
            # chunks: they are written, and searched, unsealed.
            if changed:
                try:
                    self.store.seal(kb_id)
                except Exception:
                    log.exception("Chunks of %s stay unsealed until its next ingest", name)
        return results

    def embed_all(
        self, texts: Sequence[str], progress: Progress = NO_PROGRESS
    ) -> builtins.list[builtins.list[float]]:
        """The texts' vectors, EMBED_SLICE at a time, so a bar can move between slices."""
        vectors: builtins.list[builtins.list[float]] = []
        for start in range(0, len(texts), EMBED_SLICE):
            vectors += self.embedder.embed(texts[start:start + EMBED_SLICE])
            progress.advance(len(texts[start:start + EMBED_SLICE]))
        return vectors

    def _prepare(self, name: str, data: bytes) -> PreparedFile:
        if len(data) > self.settings.max_upload_bytes:
            raise RagError(f"{name}: {len(data)} bytes, over the limit of "
                           f"{self.settings.max_upload_bytes}.", status=413, code="file_too_large")
        sections = self.parse_workers.parse(name, data)
        chunks = chunk_sections(sections, self.counter, self.settings.chunk_tokens,
                                self.settings.chunk_overlap_tokens)
        return PreparedFile(name, len(data), hashlib.sha256(data).hexdigest(), chunks)

    def _ingest_one(
        self, kb_id: int, item: PreparedFile, vectors: builtins.list[builtins.list[float]] | None
    ) -> FileResult:
        with Session(self.engine) as session, session.begin():
            # Locked (on PostgreSQL): two ingests of one file take turns, rather than both
            # writing the same next version.
            row = session.scalar(sa.select(KnowledgeBaseFile).where(
                KnowledgeBaseFile.knowledge_base_id == kb_id, KnowledgeBaseFile.name == item.name
            ).with_for_update())
            if row is not None and row.sha256 == item.sha256:
                return FileResult(item.name, "unchanged", row.chunks)
            status = "ingested" if row is None else "replaced"
            if vectors is None:  # changed since ingest() looked
                vectors = self.embedder.embed([c.text for c in item.chunks])
            if row is None:
                row = KnowledgeBaseFile(knowledge_base_id=kb_id, name=item.name, version=0)
                session.add(row)
            row.sha256, row.bytes, row.chunks = item.sha256, item.size, len(item.chunks)
            row.version += 1
            row.ingested_at = now()
            session.flush()
            file_id, version = row.id, row.version
            try:
                if status == "replaced":
                    # Left by a process that died before committing this version, if any.
                    self.store.delete_version(kb_id, file_id, version)
                self.store.insert(kb_id, [
                    StoredChunk(file_id, version, item.name, index, c.text, c.page, c.heading,
                                c.start, c.end, vector)
                    for index, (c, vector) in enumerate(zip(item.chunks, vectors, strict=True))
                ])
                session.commit()
            except BaseException:
                session.rollback()
                self.store.delete_version(kb_id, file_id, version)
                raise
        # Committed: the new version is the file's; the old one's chunks can go. A new file has
        # none: no delete, which on Milvus Lite reads the whole collection (0.5 s at 30k chunks).
        if status == "replaced":
            try:
                self.store.delete_other_versions(kb_id, file_id, version)
            except Exception:
                log.exception("Old chunks of %s stay until its next ingest", item.name)
        return FileResult(item.name, status, len(item.chunks))

    def remove_file(self, name: str, file_name: str, caller: Caller) -> None:
        with Session(self.engine) as session, session.begin():
            kb = self._writable(session, name, caller)
            row = session.scalar(sa.select(KnowledgeBaseFile).where(
                KnowledgeBaseFile.knowledge_base_id == kb.id, KnowledgeBaseFile.name == file_name))
            if row is None:
                raise RagError(f"No file {file_name!r} in {name!r}.", status=404,
                               code="file_not_found")
            self.store.delete_file(kb.id, row.id)
            session.delete(row)

    # --- retrieval -------------------------------------------------------------------------

    def search(
        self, names: Sequence[str], query: str, caller: Caller, top_k: int | None = None,
        mode: Mode | None = None, query_vector: builtins.list[float] | None = None,
        dense_weight: float | None = None,
    ) -> builtins.list[Retrieved]:
        """The `top_k` best chunks of the named knowledge bases for `query` (embedded here, when
        a dense leg runs, unless its `query_vector` is given, as batch evaluations do).
        `dense_weight` overrides the bases' own in hybrid mode (`kb tune` tries several)."""
        top_k = top_k or self.settings.top_k
        mode = mode or self.settings.mode
        with Session(self.engine) as session:
            kbs = [SearchedBase(kb.name, kb.id, kb.embedding_model, kb.dimension, kb.dense_weight)
                   for kb in (self._readable(session, name, caller) for name in names)]
        vector = query_vector

        def embedded(kb: SearchedBase) -> builtins.list[float]:
            nonlocal vector
            self._check_model(kb.name, kb.embedding_model, kb.dimension)
            if vector is None:
                vector = self.embedder.embed([query])[0]
            return vector

        # A reranker reorders more candidates than are kept: what it promotes may have ranked
        # below top_k.
        fetched = max(top_k, self.settings.rerank_candidates) if self.reranker else top_k
        # Each knowledge base ranks its own chunks; several are merged by rank (RRF), as their
        # scores are not comparable across collections.
        rankings = [[Retrieved(kb.name, hit)
                     for hit in self._rank(kb, query, mode, fetched, embedded, dense_weight)]
                    for kb in kbs]
        merged = rankings[0] if len(rankings) == 1 else fusion.reciprocal_rank_fusion(
            rankings, self.settings.rrf_k)
        if self.reranker:
            # The fused list of several bases is as long as all of theirs: the reranker takes
            # as many as one base gives it (rag.rerank_candidates), not bases times that.
            merged = merged[:fetched]
            hits = self.reranker(query, [item.hit for item in merged])
            # A reranker may hand back new hits (with its own scores): matched by position in
            # the store's order, not by identity.
            by_hit = {(hit.file_id, hit.chunk): item.knowledge_base
                      for item, hit in ((item, item.hit) for item in merged)}
            merged = [Retrieved(by_hit[hit.file_id, hit.chunk], hit) for hit in hits]
        return merged[:top_k]

    def _rank(
        self, kb: SearchedBase, query: str, mode: Mode, limit: int,
        embedded: Callable[[SearchedBase], builtins.list[float]], dense_weight: float | None,
    ) -> builtins.list[Hit]:
        """One base's chunks. Hybrid fuses the legs by score with the first weight set: the
        call's, the base's (`kb tune`), `rag.dense_weight`, else what the embedder's languages
        call for (none at all skips the dense leg and the query's embedding)."""
        if mode == "dense":
            return self.store.search(kb.id, "dense", query, embedded(kb), limit)
        sparse = self.store.search(kb.id, "bm25", query, None, limit)
        if mode == "bm25":
            return sparse
        weight = next((weight for weight in (dense_weight, kb.dense_weight,
                                             self.settings.dense_weight) if weight is not None),
                      None)
        if weight is None:
            weight = fusion.default_dense_weight(self.settings.embedding_languages,
                                                 kb.embedding_model,
                                                 [query, *(hit.text for hit in sparse)])
        if weight == 0:
            return sparse
        dense = self.store.search(kb.id, "dense", query, embedded(kb), limit)
        return fusion.relative_score_fusion(dense, sparse, weight)[:limit]

    # --- access ----------------------------------------------------------------------------

    def _find(self, session: Session, name: str) -> KnowledgeBase:
        kb = session.scalar(sa.select(KnowledgeBase).where(KnowledgeBase.name == name))
        if kb is None:
            raise RagError(f"No knowledge base {name!r}.", status=404,
                           code="knowledge_base_not_found")
        return kb

    def _readable(self, session: Session, name: str, caller: Caller) -> KnowledgeBase:
        kb = self._find(session, name)
        if not may_read(session, kb, caller, self.open_access):
            # The same answer as for a missing one: a caller learns nothing of others' bases.
            raise RagError(f"No knowledge base {name!r}.", status=404,
                           code="knowledge_base_not_found")
        return kb

    def _writable(
        self, session: Session, name: str, caller: Caller, owner_only: bool = False
    ) -> KnowledgeBase:
        kb = self._readable(session, name, caller)
        allowed = (self.open_access or caller.admin or caller.name == kb.owner) if owner_only \
            else may_write(session, kb, caller, self.open_access)
        if not allowed:
            what = "the owner" if owner_only else "a writer"
            raise RagError(f"Only {what} of knowledge base {name!r} may do this.", status=403,
                           code="knowledge_base_forbidden")
        return kb

    def _check_model(self, name: str, model: str, dimension: int) -> None:
        """Vectors of one base come from one model: a base embedded with another (by name, or
        by the size of its vectors where a server's model changed under one name) is refused,
        never searched or filled with vectors of another space."""
        embedder = self.embedder
        if (model, dimension) != (embedder.name, embedder.dimension):
            raise RagError(
                f"The knowledge base {name!r} was embedded with {model!r} ({dimension} "
                f"dimensions), but the embedder is {embedder.name!r} ({embedder.dimension}); "
                "re-create the base (and ingest its files again) or configure that model.",
                status=409, code="embedding_model_mismatch",
            )


def _chat_model(settings: Settings) -> str | None:
    """The default chat model's folder or hub id, whose tokens chunks are sized in: the
    configured one, or what `up` serves when none is (engine/models.py)."""
    chat = settings.engine.chat_models()
    if not chat:
        return None
    if chat[0].model is not None or settings.engine.urls or settings.engine.discovery_dns:
        return chat[0].model  # named, or engines elsewhere whose model is unknown here
    from qwenstack.engine.hardware import detect
    from qwenstack.engine.models import default_source

    return default_source(settings, detect())


def _file_name(name: str) -> str:
    """The name a base knows an uploaded file by: its own, without folders."""
    name = PurePath(name.replace("\\", "/")).name
    if not name or len(name) > 255:
        raise RagError(f"Invalid file name {name!r}.", code="invalid_file_name")
    return name


def open_service(
    settings: Settings, *, open_access: bool | None = None, engines: EngineUrls | None = None
) -> KnowledgeService:
    """The service over the settings' database and Milvus, embedder loaded on first use.
    `engines`: where this stack's engines serve a model (the gateway's pool); unset, the
    configured engines are asked (rag.embedding_engines, rag.rerank_model)."""
    from qwenstack import database as db
    from qwenstack.rag.chunking import token_counter
    from qwenstack.rag.embeddings import make_embedder

    rag = settings.rag
    engine = db.connect(settings.database)
    try:
        store = MilvusStore(settings.milvus_uri,
                            rag.milvus_token.get_secret_value() if rag.milvus_token else None)
        counter = token_counter(rag.tokenizer, _chat_model(settings))
    except MilvusException as exc:
        engine.dispose()
        # Milvus Lite lets one process at a time open its file.
        raise SetupError(
            f"Milvus at {settings.milvus_uri} cannot be opened ({exc.message}); a Milvus Lite file "
            "is held by one process at a time: while a gateway runs on it, use its HTTP API."
        ) from None
    except BaseException:
        engine.dispose()
        raise
    if engines is None:
        engines = probed_engines(settings.engine.replica_urls())
    served = engines
    return KnowledgeService(
        engine, store, lambda: make_embedder(rag, served), make_reranker(rag, served), counter,
        rag,
        open_access=not settings.auth.enabled if open_access is None else open_access,
        ui_service_key=settings.auth.ui_service_key,
    )
