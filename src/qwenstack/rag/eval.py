"""Retrieval quality on a SQuAD-style file (CMRC 2018): each paragraph is ingested as one
file; each question should retrieve the paragraph that holds its answer.

Reported per mode (dense, BM25, hybrid): recall@1 and recall@5 (the paragraph is among the
first 1 or 5 distinct paragraphs retrieved) and MRR@10; and ingest throughput in chunks per
second (parse + chunk + embed + insert). Runs in a temporary database and Milvus Lite file.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from qwenstack.callers import Caller
from qwenstack.console import NO_PROGRESS, Progress
from qwenstack.rag.store import Mode
from qwenstack.settings import Settings

log = logging.getLogger(__name__)

MODES: tuple[Mode, ...] = get_args(Mode)
# Chunks fetched per question: a paragraph spans a few chunks, and 10 distinct ones are scored.
CANDIDATE_CHUNKS = 50


@dataclass
class ModeScores:
    recall_at_1: float = 0.0
    recall_at_5: float = 0.0
    mrr_at_10: float = 0.0


@dataclass
class EvalReport:
    paragraphs: int
    questions: int
    chunks: int
    ingest_s: float
    scores: dict[str, ModeScores] = field(default_factory=dict)

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.ingest_s

    def as_json(self) -> dict[str, object]:
        return {"paragraphs": self.paragraphs, "questions": self.questions, "chunks": self.chunks,
                "ingest_s": round(self.ingest_s, 2), "chunks_per_s": round(self.chunks_per_s, 1),
                "modes": {mode: vars(score) for mode, score in self.scores.items()}}


def load_squad(
    path: Path, max_paragraphs: int | None
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Paragraphs by id, and (question, id of the paragraph answering it)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    paragraphs: dict[str, str] = {}
    questions: list[tuple[str, str]] = []
    for article in data["data"]:
        for number, paragraph in enumerate(article["paragraphs"]):
            if max_paragraphs is not None and len(paragraphs) >= max_paragraphs:
                return paragraphs, questions
            pid = str(paragraph.get("id") or f"{article.get('title', 'p')}-{number}")
            paragraphs[pid] = paragraph["context"]
            questions += [(qa["question"], pid) for qa in paragraph["qas"]]
    return paragraphs, questions


def evaluate(
    settings: Settings, path: Path, max_paragraphs: int | None = None,
    progress: Progress = NO_PROGRESS,
) -> EvalReport:
    """`progress` hears each stage: ingest's, embedding the questions, then each mode's."""
    from qwenstack.rag.service import open_service

    paragraphs, questions = load_squad(path, max_paragraphs)
    with tempfile.TemporaryDirectory(prefix="qwenstack-eval-") as workdir:
        scratch = settings.model_copy(update={
            "home": Path(workdir), "database_url": None,
            "rag": settings.rag.model_copy(update={"milvus_uri": str(Path(workdir) / "milvus.db")}),
        })
        service = open_service(scratch, open_access=True)
        try:
            caller = Caller("eval")
            progress.stage("loading the embedding model")
            service.create("eval", None, caller)
            service.embedder.embed(["warm-up"])  # loading the model is not ingest time
            started = time.perf_counter()
            results = service.ingest("eval", [(f"{pid}.txt", text.encode()) for pid, text in
                                               paragraphs.items()], caller, progress)
            ingest_s = time.perf_counter() - started
            report = EvalReport(len(paragraphs), len(questions), sum(r.chunks for r in results),
                                ingest_s)
            log.info("Ingested %d chunks in %.1f s; asking %d questions", report.chunks, ingest_s,
                     len(questions))
            progress.stage("embedding questions", len(questions))
            vectors = service.embed_all([question for question, _ in questions], progress)
            for mode in MODES:
                score = ModeScores()
                progress.stage(f"{mode} retrieval", len(questions))
                for (question, pid), vector in zip(questions, vectors, strict=True):
                    progress.advance()
                    hits = service.search(
                        ["eval"], question, caller, CANDIDATE_CHUNKS, mode, vector
                    )
                    ranked = list(dict.fromkeys(
                        item.hit.source.removesuffix(".txt") for item in hits))[:10]
                    if pid in ranked:
                        rank = ranked.index(pid) + 1
                        score.recall_at_1 += rank == 1
                        score.recall_at_5 += rank <= 5
                        score.mrr_at_10 += 1 / rank
                for name in vars(score):
                    setattr(score, name, round(getattr(score, name) / len(questions), 4))
                report.scores[mode] = score
                log.info("%s: recall@5 %.3f", mode, score.recall_at_5)
            return report
        finally:
            service.close()

