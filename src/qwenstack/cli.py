"""The `qwenstack` command: a thin layer that turns flags into Settings and calls the parts."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import uvloop
from pydantic import ValidationError

from qwenstack import logs, stack
from qwenstack.errors import SetupError
from qwenstack.gateway import db
from qwenstack.gateway.exchange import Caller
from qwenstack.gateway.keys import KeyInfo, KeyStore, KeyStoreError
from qwenstack.settings import CONFIG_ENV, Settings, load_settings

app = typer.Typer(
    help="Self-hosted Qwen3 on vLLM behind an OpenAI-compatible gateway.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help=f"YAML or TOML settings file (or set {CONFIG_ENV}).", exists=True),
]
HomeOpt = Annotated[Path | None, typer.Option(help="Where venv, models, logs and state live.")]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    if config is not None:
        # Through the environment, so processes started from here read the same file.
        os.environ[CONFIG_ENV] = str(config.resolve())
    try:
        settings = load_settings(**overrides)
    except (ValidationError, ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    logs.configure(settings.log_level, settings.observability.log_format)
    return settings


def _first_admin_key(settings: Settings) -> str | None:
    """On the first start with an empty key store, an admin key, so a newcomer can call the API."""
    if not settings.auth.enabled:
        return None
    store = KeyStore.open(settings)
    try:
        return store.create_first_admin()
    finally:
        store.engine.dispose()


def _fail(exc: Exception) -> NoReturn:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1) from None


def _run(settings: Settings, *, engines: bool, gateway: bool) -> None:
    try:
        first_key = _first_admin_key(settings) if gateway else None
    except SetupError as exc:
        _fail(exc)
    auth_header = '-H "authorization: Bearer $QWENSTACK_KEY" ' if settings.auth.enabled else ""

    def on_ready(engine_urls: list[str]) -> None:
        lines = ["", "qwenstack is ready."]
        if gateway:
            url = f"http://{settings.gateway.host}:{settings.gateway.port}"
            lines.append(f"  gateway  {url}/v1   (OpenAI-compatible; /health, /ready)")
        where = "loopback only" if engines else "remote"
        lines += [f"  engine   {u}   ({where})" for u in engine_urls]
        if first_key:
            lines += [
                "", f"  admin key  {first_key}",
                "  (made on this first start, shown only now: keep it; `qwenstack keys` makes more)",
            ]
        if gateway:
            lines += [
                "", "Try:",
                f"  curl {url}/v1/chat/completions {auth_header}-H 'content-type: application/json' \\",
                "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}'",
            ]
        lines.append("Stop with Ctrl-C.")
        typer.echo("\n".join(lines))

    try:
        # uvloop: the gateway's per-chunk relay costs less CPU, which the engine can use instead.
        uvloop.run(stack.run(settings, engines=engines, gateway=gateway, on_ready=on_ready))
    except SetupError as exc:
        if first_key:  # created, but the banner will not show it
            typer.echo(f"An admin key was created: {first_key}")
        _fail(exc)


def _serve_command(*, engines: bool, gateway: bool, doc: str) -> Any:
    """One signature for `up` and `engine`: the same engine flags, with or without the gateway."""

    def command(
        ctx: typer.Context,
        config: ConfigOpt = None,
        home: HomeOpt = None,
        model: Annotated[str | None, typer.Option(help="Hub id or local folder.")] = None,
        served_model_name: Annotated[str | None, typer.Option()] = None,
        replicas: Annotated[int | None, typer.Option(help="Engine processes.")] = None,
        engine_base_port: Annotated[int | None, typer.Option(help="Replica i: port+i.")] = None,
        tensor_parallel_size: Annotated[int | None, typer.Option()] = None,
        max_model_len: Annotated[int | None, typer.Option(help="Context window.")] = None,
        max_num_seqs: Annotated[int | None, typer.Option()] = None,
        gpu_memory_utilization: Annotated[float | None, typer.Option()] = None,
        dtype: Annotated[str | None, typer.Option()] = None,
        enable_chunked_prefill: Annotated[bool | None, typer.Option()] = None,
        kv_cache_gib: Annotated[float | None, typer.Option(help="KV-cache size.")] = None,
        host: Annotated[str | None, typer.Option(help="Gateway address.")] = None,
        port: Annotated[int | None, typer.Option(help="Gateway port.")] = None,
    ) -> None:
        settings = _settings(
            config,
            home=home,
            **{
                "engine.model": model,
                "engine.served_model_name": served_model_name,
                "engine.replicas": replicas,
                "engine.base_port": engine_base_port,
                "engine.tensor_parallel_size": tensor_parallel_size,
                "engine.max_model_len": max_model_len,
                "engine.max_num_seqs": max_num_seqs,
                "engine.gpu_memory_utilization": gpu_memory_utilization,
                "engine.dtype": dtype,
                "engine.enable_chunked_prefill": enable_chunked_prefill,
                "engine.kv_cache_gib": kv_cache_gib,
                "engine.extra_args": ctx.args or None,
                "gateway.host": host,
                "gateway.port": port,
            },
        )
        _run(settings, engines=engines, gateway=gateway)

    command.__doc__ = doc
    return command


EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
app.command("up", context_settings=EXTRA_ARGS)(_serve_command(
    engines=True, gateway=True,
    doc="Start the engine(s) and the gateway; other flags go to vLLM unchanged.",
))
app.command("engine", context_settings=EXTRA_ARGS)(_serve_command(
    engines=True, gateway=False,
    doc="Start and supervise the vLLM engine(s) only; other flags go to vLLM unchanged.",
))


@app.command()
def gateway(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    engine_url: Annotated[
        list[str] | None, typer.Option(help="A vLLM server to route to (repeatable).")
    ] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Run the gateway alone, in front of engines started elsewhere."""
    settings = _settings(
        config, home=home,
        **{"engine.urls": engine_url, "gateway.host": host, "gateway.port": port},
    )
    _run(settings, engines=False, gateway=True)


@app.command()
def config(config: ConfigOpt = None) -> None:
    """Print the effective settings, secrets masked."""
    typer.echo(_settings(config).masked_json())


@app.command("test-model")
def test_model(
    out_dir: Annotated[Path | None, typer.Argument(help="Default: <home>/models/tiny-qwen3.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Build the tiny random-weight Qwen3 model (real Qwen3 tokenizer) used by the tests."""
    from qwenstack.engine import engine_venv, models

    settings = _settings(config)
    target = out_dir or settings.home / "models" / models.TINY_QWEN3
    try:
        folder = models.prepare("tiny_qwen3", target, engine_venv(settings).ensure())
    except SetupError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    typer.echo(folder)


keys_app = typer.Typer(help="API keys: create, list, revoke, rotate.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@contextlib.contextmanager
def _key_store(config: Path | None, home: Path | None) -> Iterator[KeyStore]:
    try:
        store = KeyStore.open(_settings(config, home=home))
    except SetupError as exc:
        _fail(exc)
    try:
        yield store
    except KeyStoreError as exc:
        _fail(exc)
    finally:
        store.engine.dispose()


def _show_secret(info: KeyInfo, secret: str) -> None:
    typer.echo(secret)
    typer.echo(f"(the secret of key {info.name!r}; it is shown only now and cannot be recovered)", err=True)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Key name: letters, digits, . _ -")],
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens (prompt + completion) per minute.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests at once.")] = None,
    models: Annotated[str | None, typer.Option(help="Allowed models, comma-separated. Default: all.")] = None,
    expires: Annotated[str | None, typer.Option(help="Lifetime, e.g. 30d, 12h. Default: none.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May call the admin API.")] = False,
    cache_all: Annotated[bool, typer.Option(
        "--cache-all", help="The answer cache may serve it sampled answers too, not only "
        "deterministic ones (temperature 0 or a seed).")] = False,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create a key and print its secret (sk-qs-...), once."""
    try:
        expires_in = db.parse_duration(expires) if expires else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from None
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
    with _key_store(config, home) as store:
        _show_secret(*store.create(
            name, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency, models=model_list,
            expires_in=expires_in, admin=admin, cache_all=cache_all,
        ))


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Every key with its limits and status; secrets are not stored, only their first characters."""
    with _key_store(config, home) as store:
        keys = store.list()

    def limit(value: object) -> str:
        return "-" if value is None else str(value)

    rows = [("NAME", "PREFIX", "STATUS", "ADMIN", "RPM", "TPM", "CONC", "CACHE_ALL", "MODELS",
             "EXPIRES")]
    rows += [
        (k.name, k.prefix + "...", k.status, "yes" if k.admin else "no", limit(k.rpm), limit(k.tpm),
         limit(k.max_concurrency), "yes" if k.cache_all else "no",
         ",".join(k.models) if k.models is not None else "*",
         k.expires_at.strftime("%Y-%m-%d %H:%M") if k.expires_at else "-")
        for k in keys
    ]
    _print_table(rows)


@keys_app.command("revoke")
def keys_revoke(name: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Revoke a key (running gateways stop accepting it within auth.key_cache_s)."""
    with _key_store(config, home) as store:
        store.revoke(name)
    typer.echo(f"revoked {name}")


@keys_app.command("rotate")
def keys_rotate(name: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Give a key a new secret, same name and limits; the old secret stops working."""
    with _key_store(config, home) as store:
        info, secret, _ = store.rotate(name)
    _show_secret(info, secret)


@app.command()
def usage(
    by: Annotated[str, typer.Option(help="key or model.")] = "key",
    since: Annotated[str, typer.Option(help="Window, e.g. 1d, 12h, 30m.")] = "1d",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Requests and tokens per key or model, from the usage records."""
    from qwenstack.gateway.usage import totals

    if by not in ("key", "model"):
        raise typer.BadParameter("use key or model", param_hint="--by")
    try:
        window = db.parse_duration(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    try:
        engine = db.connect(_settings(config, home=home).database)
    except SetupError as exc:
        _fail(exc)
    try:
        rows = totals(engine, by, window)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    _print_table([(by.upper(), "REQUESTS", "ERRORS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "CACHED",
                   "MEAN_MS")] + [
        (r[by], str(r["requests"]), str(r["errors"]), str(r["prompt_tokens"]),
         str(r["completion_tokens"]), str(r["cached"]), f"{r['mean_latency_ms']:.1f}")
        for r in rows
    ])


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


kb_app = typer.Typer(help="Knowledge bases (RAG over Milvus): create, ingest, query, evaluate.",
                     no_args_is_help=True)
app.add_typer(kb_app, name="kb")
# The CLI works on the database directly, as an administrator would.
KB_ADMIN = Caller("cli", admin=True)


@contextlib.contextmanager
def _knowledge(config: Path | None, home: Path | None) -> Iterator[Any]:
    from qwenstack.rag import RagError
    from qwenstack.rag.service import open_service
    from qwenstack.rag.store import MilvusException

    try:
        service = open_service(_settings(config, home=home), open_access=True)
    except (SetupError, OSError) as exc:
        _fail(exc)
    try:
        yield service
    except (RagError, MilvusException) as exc:
        _fail(exc)
    finally:
        service.close()


@kb_app.command("create")
def kb_create(
    name: str,
    owner: Annotated[str | None, typer.Option(help="Key name (or jwt:<sub>) that owns it. "
                                              "Default: admins only.")] = None,
    reader: Annotated[list[str] | None, typer.Option(help="Key that may read it (repeatable).")] = None,
    writer: Annotated[list[str] | None, typer.Option(help="Key that may read and ingest.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create an empty knowledge base."""
    with _knowledge(config, home) as service:
        info = service.create(name, owner, reader or [], writer or [])
    typer.echo(f"created {info['name']} (embeddings: {info['embedding_model']})")


@kb_app.command("list")
def kb_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Every knowledge base with its owner, grants, files and chunks."""
    with _knowledge(config, home) as service:
        rows = service.list(KB_ADMIN)
    _print_table([("NAME", "OWNER", "READERS", "WRITERS", "FILES", "CHUNKS", "EMBEDDINGS")] + [
        (str(r["name"]), str(r["owner"] or "-"), ",".join(r["readers"]) or "-",  # type: ignore[arg-type]
         ",".join(r["writers"]) or "-", str(r["files"]), str(r["chunks"]),  # type: ignore[arg-type]
         str(r["embedding_model"]))
        for r in rows
    ])


@kb_app.command("delete")
def kb_delete(name: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Delete a knowledge base and all its chunks."""
    with _knowledge(config, home) as service:
        service.delete(name, KB_ADMIN)
    typer.echo(f"deleted {name}")


@kb_app.command("grant")
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


@kb_app.command("ingest")
def kb_ingest(
    name: str,
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (txt, md, html, pdf, docx).",
                                                exists=True)],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add files; a changed file replaces its chunks, an unchanged one is skipped."""
    from qwenstack.rag.parsers import PARSERS

    files = [p for path in paths for p in (sorted(path.rglob("*")) if path.is_dir() else [path])
             if p.is_file() and (not path.is_dir() or p.suffix.lower() in PARSERS)]
    with _knowledge(config, home) as service:
        results = service.ingest(name, [(p.name, p.read_bytes()) for p in files], KB_ADMIN)
    for result in results:
        typer.echo(f"{result.status:<10} {result.name} ({result.chunks} chunks)")


@kb_app.command("query")
def kb_query(
    name: Annotated[list[str], typer.Argument(help="Knowledge base(s).")],
    query: Annotated[str, typer.Option("--query", "-q")],
    top_k: Annotated[int | None, typer.Option(help="Default: rag.top_k.")] = None,
    mode: Annotated[str | None, typer.Option(help="dense, bm25 or hybrid.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """The chunks a grounded chat would get, as JSON lines."""
    import json

    if mode not in (None, "dense", "bm25", "hybrid"):
        raise typer.BadParameter("use dense, bm25 or hybrid", param_hint="--mode")
    with _knowledge(config, home) as service:
        hits = service.search(name, query, KB_ADMIN, top_k, mode)  # type: ignore[arg-type]
    for item in hits:
        typer.echo(json.dumps({**item.citation(), "score": item.hit.score}, ensure_ascii=False))


@kb_app.command("eval")
def kb_eval(
    path: Annotated[Path, typer.Argument(help="SQuAD-style JSON, e.g. CMRC 2018.", exists=True)],
    paragraphs: Annotated[int | None, typer.Option(help="Use only the first N paragraphs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Recall@1, recall@5 and MRR@10 for dense, BM25 and hybrid retrieval; ingest chunks/s."""
    import json

    from qwenstack.rag.eval import evaluate

    report = evaluate(_settings(config), path, paragraphs)
    if as_json:
        typer.echo(json.dumps(report.as_json()))
        return
    typer.echo(f"{report.paragraphs} paragraphs, {report.questions} questions, {report.chunks} "
               f"chunks ingested in {report.ingest_s:.1f} s ({report.chunks_per_s:.1f} chunks/s)")
    _print_table([("MODE", "RECALL@1", "RECALL@5", "MRR@10")] + [
        (mode, f"{s.recall_at_1:.3f}", f"{s.recall_at_5:.3f}", f"{s.mrr_at_10:.3f}")
        for mode, s in report.scores.items()
    ])
