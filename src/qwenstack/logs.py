"""Log lines: short human ones on a terminal, JSON objects for log shippers, or `key=value`
text, by the setting `observability.log_format` (`auto`, the default, picks the first when
stderr is a terminal and JSON otherwise).

A log call carries its structured fields in `extra={"fields": {...}}`; every format renders
them, JSON as keys of the object, text as `key=value` after the message, the console as a few
shortened `key=value`. So the per-request line is written once and reads well each way. What
goes into fields is the caller's choice: the gateway never puts secrets, prompts or completions
there.
"""

from __future__ import annotations

import atexit
import logging
import re
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Literal

import orjson

from qwenstack import console

if TYPE_CHECKING:
    from rich.text import Text

LogFormat = Literal["auto", "json", "text"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "fields", None) or {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the record's fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


# Line breaks and other control characters (C0, DEL, C1, Unicode's line and paragraph
# separators) a client can put in a path or header.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(text: str) -> str:
    """Control characters as \\n, \\x1b, ...: a `%0A` in a request path cannot start a line
    of its own that reads as the gateway's."""
    return CONTROL.sub(lambda match: repr(match[0])[1:-1], text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        # The record's own line; a traceback, added after this by format(), keeps its lines.
        return _escaped(line)


# The console's look: the level's word and colour, fields cut to this many characters.
LEVELS = {
    logging.DEBUG: ("DEBUG", "dim"), logging.INFO: ("INFO ", "green"),
    logging.WARNING: ("WARN ", "yellow"), logging.ERROR: ("ERROR", "bold red"),
    logging.CRITICAL: ("CRIT ", "bold red"),
}
FIELD_CHARS = 40
# Fields the per-request line's own words already say ("POST /v1/models 200 3.1 ms").
REQUEST_WORDS = ("method", "path", "status", "latency_ms")


def _short(value: object) -> str:
    text = _escaped(str(value))
    return text if len(text) <= FIELD_CHARS else text[:FIELD_CHARS - 1] + "…"


class ConsoleHandler(logging.Handler):
    """Short lines for a person at a terminal, on the Console the progress bars share:
    `12:03:07 INFO  message key=value`, the level in colour where the terminal has it.

    Chosen over rich's RichHandler, which lays each record out as a table (time, level and
    source-path columns, the message wrapped in the column left over): one plain line a record
    is shorter, and copies and greps like the other formats. A message's own line breaks stay
    (a log tail reads as lines), its continuation lines indented and its other control
    characters escaped, so no text a client sends can pass for a line of ours."""

    def render(self, record: logging.LogRecord) -> Text:
        from rich.text import Text

        word, style = LEVELS.get(record.levelno, (record.levelname[:5].ljust(5), ""))
        line = Text()
        line.append(datetime.fromtimestamp(record.created).strftime("%H:%M:%S "), style="dim")
        line.append(f"{word} ", style=style)
        if not record.name.startswith("qwenstack"):  # a library's: say which, in one word
            line.append(f"{record.name.partition('.')[0]}: ", style="dim")
        # A record whose message already says it all keeps its fields for JSON only.
        fields = dict(_fields(record)) if getattr(record, "console_fields", True) else {}
        message = record.getMessage()
        if message == "request" and all(name in fields for name in REQUEST_WORDS):
            method, path, status, latency = (fields.pop(name) for name in REQUEST_WORDS)
            message = f"{method} {path} {status} {latency} ms"
        indent = "\n" + " " * 15
        text = indent.join(_escaped(part) for part in message.split("\n"))
        line.append(text, style="bold" if record.levelno >= logging.WARNING else "")
        if fields:
            line.append(
                " " + " ".join(f"{key}={_short(value)}" for key, value in fields.items()),
                style="dim",
            )
        if record.exc_info:
            trace = logging.Formatter().formatException(record.exc_info)
            line.append(indent + indent.join(trace.splitlines()), style="dim")
        return line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.console().print(self.render(record))
        except Exception:
            self.handleError(record)


def resolve(log_format: LogFormat) -> Literal["console", "json", "text"]:
    """`auto` is the console on a terminal, JSON otherwise (a pipe, a file, a log collector)."""
    if log_format == "auto":
        return "console" if console.is_terminal() else "json"
    return log_format


class Enqueue(QueueHandler):
    """Hands records to the writing thread. The queue is in-process, so a record travels as it
    is (its exception for the formatters to render); only its message is fixed now, as the
    arguments may change once the call returns."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        return record


_writer: QueueListener | None = None


@atexit.register
def _drain() -> None:
    """Writes what is still queued."""
    if _writer is not None:
        _writer.stop()


def configure(level: str, log_format: LogFormat) -> None:
    """Route every logger (uvicorn's too) through one stderr handler in the chosen format.

    The handler writes from a thread of its own: a write to stderr can block for seconds (a
    file when the kernel throttles writers of dirty pages, a pipe a log collector reads slowly),
    and in the gateway's event loop that would stall every request. Seen in CI: /health took
    8.7 s while pip wrote a venv beside the gateway."""
    global _writer
    chosen = resolve(log_format)
    handler: logging.Handler
    if chosen == "console":
        handler = ConsoleHandler()
        if level.upper() != "DEBUG":
            # A person reads qwenstack's lines and libraries' warnings; a library's info (faiss
            # trying its builds, Milvus Lite's port, uvicorn's startup) goes to JSON and debug.
            handler.addFilter(
                lambda record: record.name.startswith("qwenstack")
                or record.levelno >= logging.WARNING
            )
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    _drain()
    queue: SimpleQueue[logging.LogRecord] = SimpleQueue()
    _writer = QueueListener(queue, handler, respect_handler_level=True)
    _writer.start()
    logging.basicConfig(level=level.upper(), handlers=[Enqueue(queue)], force=True)
