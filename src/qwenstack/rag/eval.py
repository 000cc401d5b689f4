"""Retrieval quality on a SQuAD-style file (CMRC 2018): each paragraph is ingested as one
file; each question should retrieve the paragraph that holds its answer.

Reported per mode (dense, BM25, hybrid): recall@1 and recall@5 (the paragraph is among the
first 1 or 5 distinct paragraphs retrieved) and MRR@10; and ingest throughput in chunks per
second (parse + chunk + embed + insert). Runs in a temporary database and Milvus Lite file.

With `answers`, each question is then asked of a chat model with the passages a grounded chat
would get (rag.mode, rag.top_k), and its answer scored (answers.py).

Tuning (`kb tune`) scores hybrid search at each dense weight in WEIGHTS, fusing the dense and
BM25 legs already fetched for the modes exactly as a hybrid search would (fusion.py), and picks
the weight with the best MRR@10 (then recall@1; ties go to the smaller weight).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, get_args

from qwenstack.callers import Caller
from qwenstack.console import NO_PROGRESS, Progress
from qwenstack.rag import fusion
from qwenstack.rag.answers import AnswerOptions, AnswerReport, ask_all
from qwenstack.rag.store import Hit, Mode
from qwenstack.settings import Settings

log = logging.getLogger(__name__)

MODES: tuple[Mode, ...] = get_args(Mode)
# Chunks fetched per question: a paragraph spans a few chunks, and 10 distinct ones are scored.
CANDIDATE_CHUNKS = 50
WEIGHTS = tuple(step / 10 for step in range(11))


class Question(NamedTuple):
    text: str
    paragraph: str  # the id of the paragraph that answers it
    answers: list[str]  # the reference answers


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
    # Hybrid's scores by dense weight, when tuned.
    tuning: dict[float, ModeScores] = field(default_factory=dict)
    answers: AnswerReport | None = None

    @property
    def best_weight(self) -> float | None:
        return max(self.tuning, default=None, key=lambda weight: (
            self.tuning[weight].mrr_at_10, self.tuning[weight].recall_at_1, -weight))

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.ingest_s

    def as_json(self) -> dict[str, object]:
        return {"paragraphs": self.paragraphs, "questions": self.questions, "chunks": self.chunks,
                "ingest_s": round(self.ingest_s, 2), "chunks_per_s": round(self.chunks_per_s, 1),
                "modes": {mode: vars(score) for mode, score in self.scores.items()},
                **({"tuning": {str(weight): vars(score) for weight, score in self.tuning.items()},
                    "best_weight": self.best_weight} if self.tuning else {}),
                **({"answers": self.answers.summary()} if self.answers else {})}


def load_squad(
    path: Path, max_paragraphs: int | None
) -> tuple[dict[str, str], list[Question]]:
    """Paragraphs by id, and the questions on them."""
    data = json.loads(path.read_text(encoding="utf-8"))
    paragraphs: dict[str, str] = {}
    questions: list[Question] = []
    for article in data["data"]:
        for number, paragraph in enumerate(article["paragraphs"]):
            if max_paragraphs is not None and len(paragraphs) >= max_paragraphs:
                return paragraphs, questions
            pid = str(paragraph.get("id") or f"{article.get('title', 'p')}-{number}")
            paragraphs[pid] = paragraph["context"]
            questions += [Question(qa["question"], pid,
                                   [answer["text"] for answer in qa.get("answers", ())])
                          for qa in paragraph["qas"]]
    return paragraphs, questions


def evaluate(
    settings: Settings, path: Path, max_paragraphs: int | None = None,
    progress: Progress = NO_PROGRESS, tune: bool = False, answers: AnswerOptions | None = None,
) -> EvalReport:
    """`progress` hears each stage: ingest's, embedding the questions, then each mode's.
    `tune`: hybrid's scores at each of WEIGHTS too. `answers`: the answers' scores too."""
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
            vectors = service.embed_all([question.text for question in questions], progress)
            legs: dict[Mode, list[list[Hit]]] = {}
            for mode in MODES:
                progress.stage(f"{mode} retrieval", len(questions))
                legs[mode] = []
                for question, vector in zip(questions, vectors, strict=True):
                    progress.advance()
                    legs[mode].append([item.hit for item in service.search(
                        ["eval"], question.text, caller, CANDIDATE_CHUNKS, mode, vector)])
                report.scores[mode] = _scores(legs[mode], questions)
                log.info("%s: recall@5 %.3f", mode, report.scores[mode].recall_at_5)
            for weight in WEIGHTS if tune else ():
                report.tuning[weight] = _scores(
                    [fusion.relative_score_fusion(dense, sparse, weight)[:CANDIDATE_CHUNKS]
                     for dense, sparse in zip(legs["dense"], legs["bm25"], strict=True)],
                    questions)
            if answers is not None:
                progress.stage("retrieving passages", len(questions))
                asked = []
                for question, vector in zip(questions, vectors, strict=True):
                    asked.append((question.text, question.answers, service.search(
                        ["eval"], question.text, caller, query_vector=vector)))
                    progress.advance()
                report.answers = asyncio.run(ask_all(answers, asked, progress))
                log.info("answers: exact match %.3f, F1 %.3f", report.answers.exact_match,
                         report.answers.f1)
            return report
        finally:
            service.close()



def _scores(rankings: list[list[Hit]], questions: list[Question]) -> ModeScores:
    """Recall@1, recall@5 and MRR@10 of each question's paragraph among the distinct paragraphs
    of its ranking."""
    score = ModeScores()
    for hits, (_, pid, _) in zip(rankings, questions, strict=True):
        ranked = list(dict.fromkeys(hit.source.removesuffix(".txt") for hit in hits))[:10]
        if pid in ranked:
            rank = ranked.index(pid) + 1
            score.recall_at_1 += rank == 1
            score.recall_at_5 += rank <= 5
            score.mrr_at_10 += 1 / rank
    for name in vars(score):
        setattr(score, name, round(getattr(score, name) / len(questions), 4))
    return score
