"""Knowledge bases through the library, on Milvus Lite and the packaged MiniLM: ingest and
query, re-ingest dedup, rollback of a failed ingest, access rules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenstack.callers import Caller
from qwenstack.keys import KeyStore, KeyStoreError
from qwenstack.rag import RagError
from qwenstack.rag.service import KnowledgeService, open_service
from qwenstack.settings import load_settings

OWNER = Caller("team-a")
READER = Caller("team-b")
STRANGER = Caller("team-c")
PANDAS = "大熊猫主要吃竹子，每天进食十多个小时。大熊猫生活在四川的山区。".encode()
WALL = "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关。".encode()


def _open(home: Path) -> KnowledgeService:
    settings = load_settings(home=home, **{"rag.chunk_tokens": 32, "rag.chunk_overlap_tokens": 4})
    # Grants name existing keys: the callers here have theirs.
    keys = KeyStore.open(settings)
    for caller in (OWNER, READER, STRANGER):
        with contextlib.suppress(KeyStoreError):  # made by an earlier _open of this home
            keys.create(caller.name)
    keys.engine.dispose()
    return open_service(settings, open_access=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rag")


@pytest.fixture(scope="module")
def service(home: Path) -> Iterator[KnowledgeService]:
    service = _open(home)
    yield service
    service.close()


def test_ingest_query_and_dedup(service: KnowledgeService) -> None:
    service.create("docs", OWNER.name, OWNER, readers=[READER.name])
    results = service.ingest("docs", [("pandas.txt", PANDAS), ("wall.txt", WALL)], OWNER)
    assert [(r.name, r.status) for r in results] == [
        ("pandas.txt", "ingested"), ("wall.txt", "ingested")
    ]
    chunks = service.get("docs", OWNER)["chunks"]
    for mode in ("dense", "bm25", "hybrid"):
        hits = service.search(["docs"], "大熊猫吃什么？", READER, top_k=1, mode=mode)
        assert hits[0].hit.source == "pandas.txt", mode

    # The same bytes again: skipped. A changed file: its chunks replaced, none left over.
    again = service.ingest("docs", [("pandas.txt", PANDAS)], OWNER)
    assert [(r.name, r.status) for r in again] == [("pandas.txt", "unchanged")]
    changed = "大熊猫也吃竹笋和水果。".encode()
    assert service.ingest("docs", [("pandas.txt", changed)], OWNER)[0].status == "replaced"
    hits = service.search(["docs"], "大熊猫", OWNER, top_k=20, mode="bm25")
    texts = [item.hit.text for item in hits]
    assert "大熊猫也吃竹笋和水果。" in texts and not any("四川" in text for text in texts)
    info = service.get("docs", OWNER)
    assert info["files"] == 2 and info["chunks"] < chunks + 1


def test_ingest_seals_its_chunks(service: KnowledgeService) -> None:
    """Milvus Lite keeps inserted rows in an in-memory table, which a BM25 search walks row by
    row; an ingest hands them to a segment on disk, whose indexes are built once."""
    service.create("sealed", OWNER.name, OWNER)
    service.ingest("sealed", [("pandas.txt", PANDAS), ("wall.txt", WALL)], OWNER)
    collection = Path(service.store.uri, "collections", f"qwenstack_kb_{_kb_id(service, 'sealed')}")
    assert list(collection.glob("partitions/*/data/*.parquet"))
    assert service.search(["sealed"], "长城", OWNER, mode="bm25")[0].hit.source == "wall.txt"



def test_bm25_skips_words_in_every_chunk(service: KnowledgeService) -> None:
    """Punctuation and function words are stop words (rag/store.py): no BM25 match on them
    alone, no error for a question made only of them, the content words still match."""
    river = b"The Yangtze is the longest river of China, and it flows to the sea."
    service.create("stops", OWNER.name, OWNER)
    service.ingest("stops", [("pandas.txt", PANDAS), ("wall.txt", WALL), ("river.txt", river)],
                   OWNER)
    for question in ("的，。", "是在和？", "The of and"):
        assert service.search(["stops"], question, OWNER, mode="bm25") == [], question
    for question, source in (("长城的东边是什么？", "wall.txt"), ("Which IT river?", "river.txt")):
        hits = service.search(["stops"], question, OWNER, mode="bm25")
        assert [item.hit.source for item in hits] == [source], question


def test_failed_ingest_leaves_the_previous_version(
    service: KnowledgeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.create("rollback", OWNER.name, OWNER)
    service.ingest("rollback", [("a.txt", PANDAS)], OWNER)
    before = service.store.count(_kb_id(service, "rollback"))

    insert = service.store.insert

    def insert_then_fail(kb_id: int, chunks: list) -> None:
        insert(kb_id, chunks)  # the chunks are in Milvus when the failure comes
        raise RuntimeError("disk full")

    monkeypatch.setattr(service.store, "insert", insert_then_fail)
    with pytest.raises(RuntimeError):
        service.ingest("rollback", [("a.txt", WALL), ("b.txt", WALL)], OWNER)
    monkeypatch.undo()
    assert service.store.count(_kb_id(service, "rollback")) == before
    assert [f["name"] for f in service.files("rollback", OWNER)] == ["a.txt"]
    assert service.search(["rollback"], "长城", OWNER, mode="bm25") == []
    # A bad file in a batch refuses the batch before anything is written.
    with pytest.raises(RagError, match="unsupported file type"):
        service.ingest("rollback", [("b.txt", WALL), ("c.exe", b"MZ")], OWNER)
    assert [f["name"] for f in service.files("rollback", OWNER)] == ["a.txt"]


def test_access_rules(service: KnowledgeService) -> None:
    service.create("private", OWNER.name, OWNER, readers=[READER.name])
    service.ingest("private", [("pandas.txt", PANDAS)], OWNER)
    assert service.search(["private"], "竹子", READER, mode="bm25")
    for attempt in (lambda: service.search(["private"], "竹子", STRANGER),
                    lambda: service.files("private", STRANGER),
                    lambda: service.get("private", STRANGER)):
        with pytest.raises(RagError) as caught:
            attempt()
        assert caught.value.status == 404  # the same as a missing one: nothing leaks
    assert "private" not in [kb["name"] for kb in service.list(STRANGER)]
    with pytest.raises(RagError) as caught:
        service.ingest("private", [("x.txt", WALL)], READER)
    assert caught.value.status == 403
    with pytest.raises(RagError) as caught:
        service.delete("private", READER)
    assert caught.value.status == 403
    assert service.search(["private"], "竹子", Caller("root", admin=True), mode="bm25")


def _kb_id(service: KnowledgeService, name: str) -> int:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from qwenstack.rag.catalog import KnowledgeBase

    with Session(service.engine) as session:
        return session.scalar(sa.select(KnowledgeBase.id).where(KnowledgeBase.name == name))


def test_a_reopened_store_serves_and_replaces(home: Path) -> None:
    """Another process's view: collections on disk must be loaded before use."""
    service = _open(home / "reopened")
    service.create("kept", OWNER.name, OWNER)
    service.ingest("kept", [("a.txt", PANDAS)], OWNER)
    service.close()
    service = _open(home / "reopened")
    try:
        assert service.search(["kept"], "竹子", OWNER, mode="hybrid")[0].hit.source == "a.txt"
        assert service.ingest("kept", [("a.txt", WALL)], OWNER)[0].status == "replaced"
        hits = service.search(["kept"], "长城", OWNER, mode="bm25")
        assert [i.hit.text for i in hits] == [WALL.decode()]
        assert service.search(["kept"], "竹子", OWNER, mode="bm25") == []
    finally:
        service.close()


def reverse(query: str, hits: list) -> list:
    return list(reversed(hits))


def test_reranker_hook(service: KnowledgeService) -> None:
    from qwenstack.rag.service import load_reranker

    service.create("reranked", OWNER.name, OWNER)
    service.ingest("reranked", [("pandas.txt", PANDAS), ("wall.txt", WALL)], OWNER)
    plain = [i.hit.source for i in service.search(["reranked"], "大熊猫", OWNER, 2, "hybrid")]
    service.reranker = load_reranker("test_rag_library:reverse")
    try:
        hits = service.search(["reranked"], "大熊猫", OWNER, 2, "hybrid")
        reranked = [i.hit.source for i in hits]
    finally:
        service.reranker = None
    assert reranked == plain[::-1]


def test_ui_names_are_reserved_and_grants_name_existing_keys(service: KnowledgeService) -> None:
    ui_service = Caller(service.ui_service_key, admin=True)
    refusals = [
        (lambda: service.create("ui-alice", OWNER.name, OWNER), "reserved_knowledge_base_name"),
        # Not even an admin other than the UI's own key.
        (lambda: service.create("ui-bob", None, Caller("ops", admin=True)),
         "reserved_knowledge_base_name"),
        (lambda: service.create("shared", OWNER.name, OWNER, writers=["ui-alice"]),
         "unknown_grantee"),
        (lambda: service.grant("docs", "nobody-yet", True, OWNER), "unknown_grantee"),
    ]
    for attempt, code in refusals:
        with pytest.raises(RagError) as caught:
            attempt()
        assert (caught.value.status, caught.value.code) == (400, code)
    assert "shared" not in [kb["name"] for kb in service.list(ui_service)]
    made = service.create("ui-carol", ui_service.name, ui_service, writers=[OWNER.name,
                                                                             "jwt:carol"])
    assert made["owner"] == ui_service.name and made["writers"] == ["jwt:carol", OWNER.name]


def test_reingest_leaves_one_set_of_chunks_after_an_attempt_that_died(
    service: KnowledgeService,
) -> None:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from qwenstack.rag.catalog import KnowledgeBaseFile
    from qwenstack.rag.store import StoredChunk

    service.create("replaced", OWNER.name, OWNER)
    service.ingest("replaced", [("a.txt", PANDAS)], OWNER)
    kb_id = _kb_id(service, "replaced")
    with Session(service.engine) as session:
        file_id = session.scalar(sa.select(KnowledgeBaseFile.id).where(
            KnowledgeBaseFile.name == "a.txt", KnowledgeBaseFile.knowledge_base_id == kb_id))
    # A process that died after writing version 2's chunks, before committing it: the chunk is
    # in Milvus and the row still says version 1. Written directly: no real part dies on demand
    # at that point.
    vector = service.embedder.embed(["半途而废。"])[0]
    service.store.insert(kb_id, [StoredChunk(file_id, 2, "a.txt", 0, "半途而废。", None, None,
                                             0, 5, vector)])
    assert service.ingest("replaced", [("a.txt", WALL)], OWNER)[0].status == "replaced"
    hits = service.search(["replaced"], "半途而废 长城 大熊猫", OWNER, top_k=20, mode="bm25")
    assert [item.hit.text for item in hits] == [WALL.decode()]
    assert service.store.count(kb_id) == 1
    # Two files of one name in one ingest: refused, as one would silently replace the other.
    with pytest.raises(RagError) as caught:
        service.ingest("replaced", [("docs/a/readme.md", PANDAS), ("docs\\b\\readme.md", WALL)],
                       OWNER)
    assert (caught.value.status, caught.value.code) == (400, "duplicate_file_name")
    assert [f["name"] for f in service.files("replaced", OWNER)] == ["a.txt"]
