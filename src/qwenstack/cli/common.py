"""What every command group shares: the --config/--home options, settings, errors, tables."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError

from qwenstack import logs
from qwenstack.errors import SetupError
from qwenstack.settings import CONFIG_ENV, Settings, load_settings

T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help=f"YAML or TOML settings file (or set {CONFIG_ENV}).", exists=True
    ),
]
HomeOpt = Annotated[Path | None, typer.Option(help="Where venv, models, logs and state live.")]
LOG_FORMAT_ENV = "QWENSTACK_OBSERVABILITY__LOG_FORMAT"
LogFormatOpt = Annotated[
    logs.LogFormat | None,
    typer.Option(help="auto: short lines on a terminal, JSON otherwise; json; or key=value "
                 "text. Default: observability.log_format (auto)."),
]


def use_log_format(log_format: logs.LogFormat | None) -> None:
    """A --log-format flag: through the environment, like --config, so the settings of this
    command and of the processes it starts read it (a flag wins over the variable)."""
    if log_format is not None:
        os.environ[LOG_FORMAT_ENV] = log_format


def settings_for(config: Path | None, **overrides: Any) -> Settings:
    """The settings from the file, the environment and the flags given as `section.field`."""
    if config is not None:
        # Through the environment, so processes started from here read the same file.
        os.environ[CONFIG_ENV] = str(config.resolve())
    try:
        settings = load_settings(**overrides)
    except (ValidationError, ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    logs.configure(settings.log_level, settings.observability.log_format)
    from qwenstack.database import make_private  # SQLAlchemy: not for `plan` or `bench --help`

    make_private(settings.home)
    return settings


def fail(exc: Exception) -> NoReturn:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1) from None


@contextlib.contextmanager
def opened(
    open_: Callable[[], T],
    close: Callable[[T], None],
    errors: tuple[type[Exception], ...],
    open_errors: tuple[type[Exception], ...] = (SetupError,),
) -> Iterator[T]:
    """A store open for one command: its errors end the command with a clean message."""
    try:
        store = open_()
    except open_errors as exc:
        fail(exc)
    try:
        yield store
    except errors as exc:
        fail(exc)
    finally:
        close(store)


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        typer.echo("  ".join(cells).rstrip())
