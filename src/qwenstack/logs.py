"""Log lines as JSON objects (for log shippers) or plain text (for a terminal), by setting.

A log call carries its structured fields in `extra={"fields": {...}}`; both formats render
them, the JSON one as keys of the object, the text one as `key=value` after the message. So
the per-request line is written once and reads well either way. What goes into fields is the
caller's choice: the gateway never puts secrets, prompts or completions there.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

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


def configure(level: str, log_format: Literal["json", "text"]) -> None:
    """Route every logger (uvicorn's too) through one stderr handler in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
