"""The `qwenstack` command: a thin layer that turns flags into Settings and calls the parts."""

from __future__ import annotations

import contextlib
import importlib.util
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
from qwenstack import database as db
from qwenstack.callers import Caller
from qwenstack.keys import KeyInfo, KeyStore, KeyStoreError
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


def _with_ui(settings: Settings, *, engines: bool, gateway: bool) -> bool:
    """Whether `up` starts the chat UI: on by default, skipped (with a word) without Chainlit."""
    if not (engines and gateway and settings.ui.enabled):
        return False
    if importlib.util.find_spec("chainlit") is None:
        typer.secho(
            "The chat UI is not started: it needs the `ui` extra (pip install 'qwenstack[ui]'). "
            "QWENSTACK_UI__ENABLED=false silences this.", err=True, fg=typer.colors.YELLOW,
        )
        return False
    return True


def _run(settings: Settings, *, engines: bool, gateway: bool) -> None:
    ui = _with_ui(settings, engines=engines, gateway=gateway)
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
        if ui:
            from qwenstack.ui.server import ui_url

            lines.append(f"  chat UI  {ui_url(settings)}   (sign-in: `qwenstack users add NAME`)")
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
        uvloop.run(stack.run(
            settings, engines=engines, gateway=gateway, on_ready=on_ready,
            ui=ui,
        ))
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


def _numbers(text: str | None, flag: str, kind: type[int] | type[float]) -> list[Any]:
    """A comma-separated sweep, e.g. `1,8,32`; `inf` allowed for rates."""
    if text is None:
        return []
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give numbers separated by commas", param_hint=flag) from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter("give one or more numbers above 0", param_hint=flag)
    return values


def _target(url: str, name: str | None, headers: dict[str, str]) -> Any:
    from qwenstack.bench import Target

    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{url!r}: give a base URL such as http://127.0.0.1:8000")
    url = url.rstrip("/").removesuffix("/v1")
    return Target(name or url.split("://", 1)[1], url, headers)


@app.command()
def bench(
    url: Annotated[str, typer.Argument(help="Base URL of an OpenAI-compatible server (gateway or vLLM).")],
    compare: Annotated[str | None, typer.Option(
        help="A second base URL, run interleaved with the first; reports first/second ratios.")] = None,
    name: Annotated[str | None, typer.Option(help="Label of URL. Default: host:port.")] = None,
    compare_name: Annotated[str | None, typer.Option(help="Label of --compare.")] = None,
    model: Annotated[str | None, typer.Option(help="Default: the first the server lists.")] = None,
    api: Annotated[str, typer.Option(help="chat or completions.")] = "chat",
    dataset: Annotated[str, typer.Option(help="random, sharegpt or cmrc.")] = "random",
    dataset_path: Annotated[Path | None, typer.Option(
        help="sharegpt: a ShareGPT-style JSON file; cmrc: default ../shared/data/cmrc2018_trial.json.")] = None,
    num_prompts: Annotated[int, typer.Option(help="Requests per load level, target and round.")] = 32,
    input_len: Annotated[int, typer.Option(help="random: prompt words (about tokens).")] = 128,
    output_len: Annotated[int | None, typer.Option(
        help="Tokens to generate (max_tokens). Default 64; sharegpt: the recorded reply's length.")] = None,
    range_ratio: Annotated[float, typer.Option(help="random: lengths uniform in len x [1-r, 1+r].")] = 0.0,
    concurrency: Annotated[str | None, typer.Option(help="Fixed concurrency sweep, e.g. 1,8,32.")] = None,
    rate: Annotated[str | None, typer.Option(help="Poisson request rate sweep (req/s), e.g. 1,2,inf.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="With --rate: cap on requests in flight.")] = None,
    rounds: Annotated[int, typer.Option(help="Runs per load level and target; the order alternates.")] = 1,
    warmup: Annotated[int, typer.Option(help="Unmeasured requests per target first.")] = 2,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="Goodput: time to first token at most.")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="Goodput: time per output token at most.")] = None,
    slo_e2e_ms: Annotated[float | None, typer.Option(help="Goodput: whole request at most.")] = None,
    header: Annotated[list[str] | None, typer.Option(help="Extra header 'name: value' (repeatable).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="QWENSTACK_KEY", help="Bearer key.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Default: the model's.")] = None,
    stream: Annotated[bool, typer.Option(help="Streamed answers (TTFT, ITL need them).")] = True,
    ignore_eos: Annotated[bool, typer.Option(help="vLLM: always generate max_tokens.")] = True,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write latency/throughput against load as PNG.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 600.0,
) -> None:
    """Load-test an OpenAI-compatible endpoint: throughput, TTFT, TPOT, ITL, goodput, errors."""
    from qwenstack import bench as bench_
    from qwenstack.bench import datasets, report

    if api not in ("chat", "completions"):
        raise typer.BadParameter("use chat or completions", param_hint="--api")
    if concurrency and rate:
        raise typer.BadParameter("give --concurrency or --rate, not both")
    for flag, value in (("--num-prompts", num_prompts), ("--rounds", rounds), ("--timeout", timeout)):
        if value <= 0:
            raise typer.BadParameter("must be above 0", param_hint=flag)
    if warmup < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--warmup")
    headers = {}
    for item in header or []:
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r}: write it as 'name: value'", param_hint="--header")
        headers[key.strip()] = value.strip()
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    targets = [_target(url, name, headers)]
    if compare:
        targets.append(_target(compare, compare_name, headers))
    if len({t.name for t in targets}) < len(targets):
        raise typer.BadParameter("the two targets need different --name and --compare-name")
    if rate:
        loads = [bench_.Load(rate=r, max_concurrency=max_concurrency) for r in _numbers(rate, "--rate", float)]
    else:
        loads = [bench_.Load(concurrency=c) for c in _numbers(concurrency or "1", "--concurrency", int)]
    count = bench_.prompts_needed(len(targets), len(loads), rounds, num_prompts, warmup)
    try:
        prompts = datasets.load(
            dataset, count, path=dataset_path, input_len=input_len, output_len=output_len,
            range_ratio=range_ratio, seed=seed,
        )
        options = bench_.RequestOptions(
            model=model or bench_.served_model(targets[0]), api=api, stream=stream,  # type: ignore[arg-type]
            ignore_eos=ignore_eos, temperature=temperature,
        )
        slo = report.Slo(slo_ttft_ms, slo_tpot_ms, slo_e2e_ms)
        summaries, ratios = bench_.benchmark(
            targets, prompts, loads, options, requests_per_run=num_prompts, rounds=rounds,
            warmup=warmup, slo=slo, timeout_s=timeout, seed=seed,
        )
        typer.echo(report.table(summaries))
        if ratios:
            typer.echo("\n" + report.ratio_table(ratios))
        if json_out:
            meta = {"model": options.model, "api": api, "dataset": dataset, "num_prompts": num_prompts,
                    "rounds": rounds, "stream": stream, "slo": slo.__dict__,
                    "targets": {t.name: t.base_url for t in targets}}
            report.write_json(json_out, meta, summaries, ratios)
        if plot:
            report.plot(plot, summaries, "request rate (req/s)" if rate else "concurrency")
    except SetupError as exc:
        _fail(exc)


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="Hub id, local model folder, or a config.json file.")],
    gpu: Annotated[str, typer.Option(help="A GPU name (A10, L4, A100-80GB, H100 ...) or memory, e.g. 24GB.")],
    gpus: Annotated[int, typer.Option(help="GPUs (tensor parallel).")] = 1,
    context: Annotated[int | None, typer.Option(help="Tokens per sequence. Default: the model's maximum.")] = None,
    concurrency: Annotated[int, typer.Option(help="Sequences at once.")] = 1,
    dtype: Annotated[str, typer.Option(help="auto: bfloat16 where the GPU has it, else float16.")] = "auto",
    kv_cache_dtype: Annotated[str, typer.Option(help="auto (the weights' dtype) or fp8.")] = "auto",
    gpu_memory_utilization: Annotated[float, typer.Option()] = 0.9,
) -> None:
    """Size a deployment: weights, KV cache, context and concurrency that fit, decode bound, flags."""
    from qwenstack.engine import deployment_plan, gpu_catalog
    from qwenstack.engine.hardware import GIB

    # A bare config.json names no model vLLM could load: leave the flag for the user to fill.
    served = "MODEL_FOLDER_OR_HUB_ID" if Path(model).is_file() else model
    try:
        chosen = gpu_catalog.lookup(gpu)
        p = deployment_plan.plan_deployment(
            served, deployment_plan.read_model_config(model, os.environ.get("HF_TOKEN")), chosen,
            gpu_count=gpus, context=context, concurrency=concurrency, dtype=dtype,
            kv_cache_dtype=kv_cache_dtype, gpu_memory_utilization=gpu_memory_utilization,
        )
    except SetupError as exc:
        _fail(exc)
    bandwidth = f", {chosen.bandwidth_gb_s:,.0f} GB/s" if chosen.bandwidth_gb_s else ""
    single = "-" if p.decode_bound_single is None else f"{p.decode_bound_single:,.0f} tokens/s"
    total = "-" if p.decode_bound_total is None else f"{p.decode_bound_total:,.0f} tokens/s"
    running = min(p.concurrency, p.sequences_at_context)
    _print_table([
        ("model", p.model),
        ("GPUs", f"{p.gpu_count} x {chosen.name} ({chosen.memory_bytes / GIB:.1f} GiB{bandwidth})"),
        ("dtype", f"{p.dtype}: {p.dtype_advice}"),
        ("weights", f"{p.weights_bytes / GIB:.2f} GiB"),
        ("KV cache per token", p.kv_formula),
        ("KV cache", f"{p.kv_cache_bytes / GIB:.2f} GiB (x {p.gpu_memory_utilization} of memory,"
                     f" less weights and 1 GiB per GPU for activations)"),
        ("KV tokens that fit", f"{p.kv_tokens:,}"),
        ("longest context", f"{p.longest_context:,} tokens"),
        (f"sequences of {p.context:,} at once", f"{p.sequences_at_context:,}"
         + ("" if p.sequences_at_context >= p.concurrency else
            f" (fewer than {p.concurrency}: the rest wait or are preempted)")),
        ("decode bound, 1 sequence", single),
        (f"decode bound, {running} x {p.context:,}", total),
    ])
    if p.refusal:
        typer.secho(f"\nDoes not fit: {p.refusal}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    typer.echo("\nvLLM flags:  " + " ".join(p.vllm_flags()))
@app.command()
def ui(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    host: Annotated[str | None, typer.Option(help="UI address.")] = None,
    port: Annotated[int | None, typer.Option(help="UI port (default 8008).")] = None,
    gateway_url: Annotated[str | None, typer.Option(help="Gateway base URL, no /v1.")] = None,
) -> None:
    """Run the Chainlit chat UI alone, in front of a running gateway."""
    from qwenstack.ui import server

    settings = _settings(
        config, home=home, **{"ui.host": host, "ui.port": port, "ui.gateway_url": gateway_url}
    )

    def on_up(url: str) -> None:
        typer.echo(f"\nqwenstack chat UI is ready: {url}\nStop with Ctrl-C.")

    try:
        uvloop.run(server.serve(settings, on_up))
    except SetupError as exc:
        _fail(exc)


users_app = typer.Typer(help="Chat UI users who sign in with a password.", no_args_is_help=True)
app.add_typer(users_app, name="users")


@contextlib.contextmanager
def _accounts(config: Path | None, home: Path | None) -> Iterator[Any]:
    from qwenstack.ui import store
    from qwenstack.ui.accounts import AccountError

    try:
        accounts = store.accounts(_settings(config, home=home))
    except SetupError as exc:
        _fail(exc)
    try:
        yield accounts
    except AccountError as exc:
        _fail(exc)
    finally:
        accounts.engine.dispose()


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Sign-in name.")],
    password: Annotated[str, typer.Option(
        prompt=True, hide_input=True, confirmation_prompt=True,
        help="Asked for when not given (flags show up in the shell history).")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add a user (the password is stored as a scrypt hash)."""
    with _accounts(config, home) as accounts:
        accounts.add(name, password)
    typer.echo(f"added {name}")


@users_app.command("list")
def users_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Every UI user: how they sign in and whether they have a gateway key yet."""
    from qwenstack.ui.accounts import gateway_key_name

    with _accounts(config, home) as accounts:
        users = accounts.list()
    _print_table([("NAME", "SIGN_IN", "GATEWAY_KEY", "CREATED")] + [
        (u.identifier, "password" if u.has_password else "header",
         gateway_key_name(u.identifier) if u.has_gateway_key else "-",
         u.created_at.strftime("%Y-%m-%d %H:%M"))
        for u in users
    ])


@users_app.command("remove")
def users_remove(name: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Remove a user and revoke their gateway key (their chat history stays in the database)."""
    from qwenstack.ui.accounts import gateway_key_name

    with _accounts(config, home) as accounts:
        accounts.remove(name)
    settings = _settings(config, home=home)
    if settings.auth.enabled:
        with _key_store(config, home) as store, contextlib.suppress(KeyStoreError):
            store.revoke(gateway_key_name(name))
    typer.echo(f"removed {name}")
