"""`qwenstack kb`: knowledge bases, worked on directly in the database, as an administrator."""

from __future__ import annotations

import dataclasses
import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qwenstack import console
from qwenstack.callers import Caller
from qwenstack.cli.common import ConfigOpt, HomeOpt, opened, print_table, settings_for
from qwenstack.errors import SetupError

if TYPE_CHECKING:
    from qwenstack.rag.answers import AnswerOptions
    from qwenstack.rag.service import KnowledgeService

app = typer.Typer(help="Knowledge bases (RAG over Milvus): create, ingest, query, evaluate.",
                  no_args_is_help=True)
# The CLI works on the database directly, as an administrator would.
KB_ADMIN = Caller("cli", admin=True)


def _knowledge(config: Path | None, home: Path | None) -> AbstractContextManager[KnowledgeService]:
    # Imported here: the `rag` extra (torch, Milvus) is needed by these commands only.
    from qwenstack.rag import RagError
    from qwenstack.rag.service import open_service
    from qwenstack.rag.store import MilvusException

    return opened(
        lambda: open_service(settings_for(config, home=home), open_access=True),
        lambda service: service.close(),
        (RagError, MilvusException),
        open_errors=(SetupError, OSError),
    )


@app.command("create")
def kb_create(
    name: str,
    owner: Annotated[str | None, typer.Option(help="Key name (or jwt:<sub>) that owns it. "
                                              "Default: admins only.")] = None,
    reader: Annotated[list[str] | None, typer.Option(
        help="Key that may read it (repeatable).")] = None,
    writer: Annotated[list[str] | None, typer.Option(help="Key that may read and ingest.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create an empty knowledge base."""
    with _knowledge(config, home) as service:
        info = service.create(name, owner, KB_ADMIN, reader or [], writer or [])
    typer.echo(f"created {info['name']} (embeddings: {info['embedding_model']})")


@app.command("list")
def kb_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Every knowledge base with its owner, grants, files and chunks."""
    with _knowledge(config, home) as service:
        rows = service.list(KB_ADMIN)
    print_table([("NAME", "OWNER", "READERS", "WRITERS", "FILES", "CHUNKS", "EMBEDDINGS",
                  "DENSE WEIGHT")] + [
        (str(r["name"]), str(r["owner"] or "-"),
         ",".join(r["readers"]) or "-",  # type: ignore[arg-type]
         ",".join(r["writers"]) or "-", str(r["files"]), str(r["chunks"]),  # type: ignore[arg-type]
         str(r["embedding_model"]),
         "default" if r["dense_weight"] is None else str(r["dense_weight"]))
        for r in rows
    ])


@app.command("delete")
def kb_delete(name: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Delete a knowledge base and all its chunks."""
    with _knowledge(config, home) as service:
        service.delete(name, KB_ADMIN)
    typer.echo(f"deleted {name}")


@app.command("grant")
def kb_grant(
    name: str,
    key: Annotated[str, typer.Argument(help="Key name (or jwt:<sub>).")],
    write: Annotated[bool, typer.Option("--write", help="May ingest too.")] = False,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Let a key read (or, with --write, also ingest into) a knowledge base."""
    with _knowledge(config, home) as service:
        service.grant(name, key, write, KB_ADMIN)
    typer.echo(f"granted {'write' if write else 'read'} on {name} to {key}")


@app.command("ingest")
def kb_ingest(
    name: str,
    paths: Annotated[list[Path], typer.Argument(
        help="Files or folders (txt, md, html, pdf, docx, csv, tsv, xlsx, pptx).", exists=True)],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add files; a file is known by its name (without folders): a changed one replaces its
    chunks, an unchanged one is skipped."""
    from qwenstack.rag.parsers import PARSERS

    files = [p for path in paths for p in (sorted(path.rglob("*")) if path.is_dir() else [path])
             if p.is_file() and (not path.is_dir() or p.suffix.lower() in PARSERS)]
    with _knowledge(config, home) as service, console.progress("loading") as shown:
        results = service.ingest(
            name, [(p.name, p.read_bytes()) for p in files], KB_ADMIN, shown
        )
    for result in results:
        typer.echo(f"{result.status:<10} {result.name} ({result.chunks} chunks)")


@app.command("query")
def kb_query(
    name: Annotated[list[str], typer.Argument(help="Knowledge base(s).")],
    query: Annotated[str, typer.Option("--query", "-q")],
    top_k: Annotated[int | None, typer.Option(help="Default: rag.top_k.")] = None,
    mode: Annotated[str | None, typer.Option(help="dense, bm25 or hybrid.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """The chunks a grounded chat would get, as JSON lines."""
    if mode not in (None, "dense", "bm25", "hybrid"):
        raise typer.BadParameter("use dense, bm25 or hybrid", param_hint="--mode")
    with _knowledge(config, home) as service:
        hits = service.search(name, query, KB_ADMIN, top_k, mode)  # type: ignore[arg-type]
    for item in hits:
        typer.echo(json.dumps({**item.citation(), "score": item.hit.score}, ensure_ascii=False))


@app.command("eval")
def kb_eval(
    path: Annotated[Path, typer.Argument(help="SQuAD-style JSON, e.g. CMRC 2018.", exists=True)],
    paragraphs: Annotated[int | None, typer.Option(help="Use only the first N paragraphs.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object instead of a table.")] = False,
    answers: Annotated[bool, typer.Option(
        "--answers", help="Also ask a chat model each question with the passages a grounded "
        "chat gets, and score its answers (exact match, F1).")] = False,
    base_url: Annotated[str | None, typer.Option(
        help="--answers: an OpenAI-compatible API (with /v1). Default: this machine's "
        "gateway.")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="QWENSTACK_KEY", help="--answers: its bearer key.")] = None,
    model: Annotated[str | None, typer.Option(
        help="--answers: the chat model. Default: the first the API lists.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="--answers: longest answer.")] = 128,
    concurrency: Annotated[int, typer.Option(
        min=1, max=64, help="--answers: requests at a time.")] = 4,
    report: Annotated[Path | None, typer.Option(
        help="Write the whole report as JSON here (with --answers, every answer).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Recall@1, recall@5 and MRR@10 for dense, BM25 and hybrid retrieval; ingest chunks/s;
    with --answers, answer exact match and F1 (CMRC 2018's, character-level for Chinese)."""
    from qwenstack.rag.answers import AnswerOptions

    settings = settings_for(config)
    asked = AnswerOptions(
        base_url or f"http://127.0.0.1:{settings.gateway.port}/v1", api_key, model, max_tokens,
        concurrency) if answers else None
    _evaluate(path, paragraphs, as_json, config, tune=False, answers=asked, report_path=report)


@app.command("tune")
def kb_tune(
    path: Annotated[Path, typer.Argument(
        help="SQuAD-style JSON of questions on the base's documents (CMRC 2018's trial file "
        "is one).", exists=True)],
    apply: Annotated[str | None, typer.Option(
        help="Store the best weight on this knowledge base.")] = None,
    paragraphs: Annotated[int | None, typer.Option(help="Use only the first N paragraphs.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object instead of tables.")] = False,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Hybrid search's dense weight: each of 0, 0.1 ... 1 scored on the questions, the best
    reported (and stored on a base with --apply)."""
    weight = _evaluate(path, paragraphs, as_json, config, tune=True)
    if apply:
        with _knowledge(config, home) as service:
            service.set_dense_weight(apply, weight, KB_ADMIN)
        if not as_json:
            typer.echo(f"{apply}: dense weight {weight}")


def _evaluate(
    path: Path, paragraphs: int | None, as_json: bool, config: Path | None, tune: bool,
    answers: AnswerOptions | None = None, report_path: Path | None = None,
) -> float | None:
    """Runs the evaluation, shows its report; the best weight when tuned."""
    from qwenstack.rag.eval import evaluate

    settings = settings_for(config)
    with console.progress() as shown:
        report = evaluate(settings, path, paragraphs, shown, tune=tune, answers=answers)
    if report_path is not None:
        whole = report.as_json()
        if report.answers:
            whole["answers"] = dataclasses.asdict(report.answers)
        report_path.write_text(json.dumps(whole, ensure_ascii=False, indent=1), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(report.as_json()))
        return report.best_weight
    typer.echo(f"{report.paragraphs} paragraphs, {report.questions} questions, {report.chunks} "
               f"chunks ingested in {report.ingest_s:.1f} s ({report.chunks_per_s:.1f} chunks/s)")
    rows = [*report.scores.items(),
            *((f"hybrid, dense weight {weight}", score) for weight, score in report.tuning.items())]
    print_table([("MODE", "RECALL@1", "RECALL@5", "MRR@10")] + [
        (mode, f"{s.recall_at_1:.3f}", f"{s.recall_at_5:.3f}", f"{s.mrr_at_10:.3f}")
        for mode, s in rows
    ])
    if tune:
        typer.echo(f"best dense weight: {report.best_weight}")
    if scored := report.answers:
        typer.echo(f"answers of {scored.model} ({scored.questions} questions, {scored.failed} "
                   f"failed): exact match {scored.exact_match:.3f}, F1 {scored.f1:.3f}; the "
                   f"top passage holds the answer {scored.top_holds_answer:.3f}, a cited one "
                   f"{scored.cited_holds_answer:.3f} (answers citing {scored.citing:.3f})")
    return report.best_weight
