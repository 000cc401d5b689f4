"""Serving: `up`, `engine`, `gateway`, `ui`, and `config` and `test-model` beside them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import uvloop

from qwenstack.cli.common import (
    ConfigOpt,
    HomeOpt,
    LogFormatOpt,
    fail,
    settings_for,
    use_log_format,
)
from qwenstack.database import SECRETS_FOLDER, write_secret
from qwenstack.errors import SetupError
from qwenstack.keys import KeyStore
from qwenstack.settings import Settings

FIRST_ADMIN_KEY_FILE = "admin-key"


def _first_admin_key(settings: Settings) -> tuple[str, Path] | None:
    """On the first start with an empty key store, an admin key, so a newcomer can call the API;
    with the 0600 file it is saved in. Container logs and terminals' scrollback are read by
    more people than the key's owner: the banner shows the key itself only on a terminal."""
    if not settings.auth.enabled:
        return None
    store = KeyStore.open(settings)
    try:
        key = store.create_first_admin()
    finally:
        store.engine.dispose()
    if key is None:
        return None
    path = settings.home / SECRETS_FOLDER / FIRST_ADMIN_KEY_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a key store made afresh: its old key is void
    write_secret(path, key)
    return key, path


def _first_key_lines(key: str, path: Path) -> list[str]:
    lines = [""]
    if sys.stdout.isatty():
        lines.append(f"  admin key  {key}")
    return lines + [
        f"  admin key file  {path}",
        ("  (made on this first start, readable only by this user: keep it;"
         " `qwenstack keys` makes more)"),
    ]


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
        fail(exc)
    auth_header = '-H "authorization: Bearer $QWENSTACK_KEY" ' if settings.auth.enabled else ""

    def on_ready(engine_urls: list[str]) -> None:
        lines = ["", "qwenstack is ready."]
        if gateway:
            url = f"http://{settings.gateway.host}:{settings.gateway.port}"
            lines.append(f"  gateway  {url}/v1   (OpenAI-compatible; /health, /ready)")
        if ui:
            from qwenstack.ui.server import sign_in_hint, ui_url

            lines.append(f"  chat UI  {ui_url(settings)}   ({sign_in_hint(settings)})")
        where = "loopback only" if engines else "remote"
        lines += [f"  engine   {u}   ({where})" for u in engine_urls]
        if first_key:
            lines += _first_key_lines(*first_key)
        if gateway:
            lines += [
                "", "Try:",
                (f"  curl {url}/v1/chat/completions {auth_header}"
                 "-H 'content-type: application/json' \\"),
                ("    -d '{\"messages\": [{\"role\": \"user\","
                 " \"content\": \"What is the capital of France?\"}]}'"),
            ]
        lines.append("Stop with Ctrl-C.")
        typer.echo("\n".join(lines))

    # Here, not at the top: the gateway's imports (FastAPI, uvicorn, ...) take most of a second
    # that `qwenstack keys`, `plan` or `bench` do not need to spend.
    from qwenstack import stack

    try:
        # uvloop: the gateway's per-chunk relay costs less CPU, which the engine can use instead.
        uvloop.run(stack.run(
            settings, engines=engines, gateway=gateway, on_ready=on_ready,
            ui=ui,
        ))
    except SetupError as exc:
        if first_key:  # created, but the banner will not show it
            typer.echo(f"An admin key was created, in {first_key[1]}")
        fail(exc)


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
        stream_interval: Annotated[int | None, typer.Option(
            help="Tokens per streamed event (vLLM's --stream-interval).")] = None,
        gpu_memory_utilization: Annotated[float | None, typer.Option()] = None,
        dtype: Annotated[str | None, typer.Option()] = None,
        enable_chunked_prefill: Annotated[bool | None, typer.Option()] = None,
        kv_cache_gib: Annotated[float | None, typer.Option(help="KV-cache size.")] = None,
        host: Annotated[str | None, typer.Option(help="Gateway address.")] = None,
        port: Annotated[int | None, typer.Option(help="Gateway port.")] = None,
        log_format: LogFormatOpt = None,
    ) -> None:
        use_log_format(log_format)  # here too: `up` passes flags it does not know to vLLM
        settings = settings_for(
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
                "engine.stream_interval": stream_interval,
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


# `up` and `engine` pass the flags they do not know to vLLM.
PASS_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
up = _serve_command(
    engines=True, gateway=True,
    doc="Start the engine(s) and the gateway; other flags go to vLLM unchanged.",
)
engine = _serve_command(
    engines=True, gateway=False,
    doc="Start and supervise the vLLM engine(s) only; other flags go to vLLM unchanged.",
)


def gateway(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    engine_url: Annotated[
        list[str] | None, typer.Option(help="A vLLM server to route to (repeatable).")
    ] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the gateway alone, in front of engines started elsewhere."""
    use_log_format(log_format)
    settings = settings_for(
        config, home=home,
        **{"engine.urls": engine_url, "gateway.host": host, "gateway.port": port},
    )
    _run(settings, engines=False, gateway=True)


def config(
    config: ConfigOpt = None,
    parsers: Annotated[bool, typer.Option(
        "--parsers", help="Instead: each model's role and the tool-call and reasoning parsers "
        "its engines would run, chosen from the model as `up` chooses them (`auto`).")] = False,
) -> None:
    """Print the effective settings, secrets masked."""
    settings = settings_for(config)
    if not parsers:
        typer.echo(settings.masked_json())
        return
    from qwenstack.engine import chosen_parsers

    try:
        typer.echo(json.dumps(chosen_parsers(settings), indent=2))
    except SetupError as exc:
        fail(exc)


def test_model(
    out_dir: Annotated[Path | None, typer.Argument(
        help="Default: <home>/models/tiny-qwen3 (with --bundled: the folder `up` uses).")] = None,
    bundled: Annotated[bool, typer.Option(
        "--bundled", help="The bundled SmolLM2-135M-Instruct instead, as `up` prepares it "
        "on a CPU without --model.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Build the tiny random-weight Qwen3 model (real Qwen3 tokenizer) the tests serve, or the
    bundled SmolLM2 they serve beside it; print its folder."""
    from qwenstack.engine import engine_venv, models

    settings = settings_for(config)
    script, name = ("smollm2", models.BUNDLED_SMOLLM2) if bundled else (
        "tiny_qwen3", models.TINY_QWEN3)
    try:
        folder = models.prepare(script, out_dir or settings.home / "models" / name,
                                engine_venv(settings).ensure())
    except SetupError as exc:
        fail(exc)
    typer.echo(folder)


def ui(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    host: Annotated[str | None, typer.Option(help="UI address.")] = None,
    port: Annotated[int | None, typer.Option(help="UI port (default 8008).")] = None,
    gateway_url: Annotated[str | None, typer.Option(help="Gateway base URL, no /v1.")] = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the Chainlit chat UI alone, in front of a running gateway."""
    use_log_format(log_format)
    from qwenstack.ui import server

    settings = settings_for(
        config, home=home, **{"ui.host": host, "ui.port": port, "ui.gateway_url": gateway_url}
    )

    def on_up(url: str) -> None:
        typer.echo(f"\nqwenstack chat UI is ready: {url}   ({server.sign_in_hint(settings)})"
                   "\nStop with Ctrl-C.")

    try:
        uvloop.run(server.serve(settings, on_up))
    except SetupError as exc:
        fail(exc)
