"""`qwenstack keys` (API keys) and `qwenstack usage` (what they were used for)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from qwenstack import database as db
from qwenstack.cli.common import ConfigOpt, HomeOpt, fail, opened, print_table, settings_for
from qwenstack.errors import SetupError
from qwenstack.keys import KeyInfo, KeyStore, KeyStoreError

app = typer.Typer(help="API keys: create, list, revoke, rotate.", no_args_is_help=True)


def key_store(config: Path | None, home: Path | None) -> AbstractContextManager[KeyStore]:
    return opened(
        lambda: KeyStore.open(settings_for(config, home=home)),
        lambda store: store.engine.dispose(),
        (KeyStoreError,),
    )


def _show_secret(info: KeyInfo, secret: str) -> None:
    typer.echo(secret)
    typer.echo(
        f"(the secret of key {info.name!r}; it is shown only now and cannot be recovered)", err=True
    )


@app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Key name: letters, digits, . _ -")],
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(
        help="Tokens (prompt + completion) per minute.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests at once.")] = None,
    models: Annotated[str | None, typer.Option(
        help="Allowed models, comma-separated. Default: all.")] = None,
    expires: Annotated[str | None, typer.Option(
        help="Lifetime, e.g. 30d, 12h. Default: none.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May call the admin API.")] = False,
    cache_all: Annotated[bool, typer.Option(
        "--cache-all", help="The answer cache may serve it sampled answers too, not only "
        "deterministic ones (temperature 0 or a seed).")] = False,
    no_thinking: Annotated[bool, typer.Option(
        "--no-thinking", help="Its chat requests go with enable_thinking false, whatever they "
        "ask (thinking off where the model's chat template reads it).")] = False,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create a key and print its secret (sk-qs-...), once."""
    try:
        expires_in = db.parse_duration(expires) if expires else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from None
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
    with key_store(config, home) as store:
        _show_secret(*store.create(
            name, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency, models=model_list,
            expires_in=expires_in, admin=admin, cache_all=cache_all, thinking=not no_thinking,
        ))


@app.command("list")
def keys_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Every key with its limits and status; secrets are not stored, only their first characters."""
    with key_store(config, home) as store:
        keys = store.list()

    def limit(value: object) -> str:
        return "-" if value is None else str(value)

    rows = [("NAME", "PREFIX", "STATUS", "ADMIN", "RPM", "TPM", "CONC", "CACHE_ALL", "THINKING",
             "MODELS", "EXPIRES")]
    rows += [
        (k.name, k.prefix + "...", k.status, "yes" if k.admin else "no", limit(k.rpm), limit(k.tpm),
         limit(k.max_concurrency), "yes" if k.cache_all else "no",
         "yes" if k.thinking else "no", ",".join(k.models) if k.models is not None else "*",
         k.expires_at.strftime("%Y-%m-%d %H:%M") if k.expires_at else "-")
        for k in keys
    ]
    print_table(rows)


@app.command("revoke")
def keys_revoke(name: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Revoke a key (running gateways stop accepting it within auth.key_cache_s)."""
    with key_store(config, home) as store:
        store.revoke(name)
    typer.echo(f"revoked {name}")


@app.command("rotate")
def keys_rotate(name: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Give a key a new secret, same name and limits; the old secret stops working."""
    with key_store(config, home) as store:
        info, secret, _ = store.rotate(name)
    _show_secret(info, secret)


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
        engine = db.connect(settings_for(config, home=home).database)
    except SetupError as exc:
        fail(exc)
    try:
        rows = totals(engine, by, window)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    print_table([(by.upper(), "REQUESTS", "ERRORS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "CACHED",
                  "TOOL_CALLS", "MEAN_MS")] + [
        (r[by], str(r["requests"]), str(r["errors"]), str(r["prompt_tokens"]),
         str(r["completion_tokens"]), str(r["cached"]), str(r["tool_calls"]),
         f"{r['mean_latency_ms']:.1f}")
        for r in rows
    ])
