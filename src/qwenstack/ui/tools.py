"""The tools the chat offers the model: the current time, a calculator, and a search of the
user's own documents. Each is safe to run on whatever arguments the model writes (a prompt
injection may write them): bounded in size, validated, and run with no more rights than the
user has (the search goes through the gateway with the user's own key).

A tool's failure (bad arguments, an unknown time zone, a refused search) is its result, which
the model reads and may act on; it never ends the turn.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import re
import zoneinfo
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from qwenstack.ui.calculator import MAX_EXPRESSION_CHARS, CalculationError, calculate, formatted
from qwenstack.ui.knowledge import KnowledgeBaseClient, UploadRefused

log = logging.getLogger(__name__)

MAX_ARGUMENT_CHARS = 2000  # a tool call's JSON arguments, as the model wrote them
MAX_RESULT_CHARS = 4000  # what goes back to the model (and into the step shown)
MAX_ZONE_CHARS = 64
ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-/]+")
SEARCH_HITS = 3


class ToolError(Exception):
    """A tool could not do what was asked; its message is the tool's result."""


Runner = Callable[[dict[str, Any]], Awaitable[str]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Runner

    def spec(self) -> dict[str, Any]:
        """The tool as the chat completions API's `tools` lists it."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}


@functools.cache
def time_zones() -> frozenset[str]:
    """IANA names this machine knows (the system's tz database, else the tzdata package)."""
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


def current_time(zone_name: str | None, now: dt.datetime | None = None) -> str:
    """The time now in the named IANA time zone (UTC when none is named), ISO 8601 with its
    weekday. Only names in the tz database are looked up, never a path."""
    name = zone_name or "UTC"
    if len(name) > MAX_ZONE_CHARS or not ZONE_NAME.fullmatch(name) or name not in time_zones():
        raise ToolError(f"Unknown time zone {name[:MAX_ZONE_CHARS]!r}; use an IANA name such "
                        "as Europe/Paris or Asia/Shanghai.")
    zone = dt.UTC if name == "UTC" else zoneinfo.ZoneInfo(name)
    local = (now or dt.datetime.now(dt.UTC)).astimezone(zone)
    return f"{local.isoformat(timespec='seconds')} ({local:%A}, {name})"


async def _time(arguments: dict[str, Any]) -> str:
    zone = arguments.get("timezone")
    if zone is not None and not isinstance(zone, str):
        raise ToolError("`timezone` must be a string.")
    return current_time(zone)


async def _calculate(arguments: dict[str, Any]) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        raise ToolError("`expression` must be a string.")
    try:
        return formatted(calculate(expression))
    except CalculationError as exc:
        raise ToolError(str(exc)) from None


TIME = Tool(
    "current_time", "The current date and time, in a time zone.",
    {"type": "object", "properties": {"timezone": {
        "type": "string", "maxLength": MAX_ZONE_CHARS,
        "description": "IANA time zone such as Asia/Shanghai; UTC when left out."}}},
    _time,
)
CALCULATOR = Tool(
    "calculator", "Evaluate an arithmetic expression: numbers, parentheses, + - * / // % **.",
    {"type": "object", "required": ["expression"], "properties": {"expression": {
        "type": "string", "maxLength": MAX_EXPRESSION_CHARS, "description": "e.g. (2+3)*4**2"}}},
    _calculate,
)


def document_search(knowledge_base: KnowledgeBaseClient) -> Tool:
    """A search of the knowledge base the chat draws on (the user's own uploads, or a team base
    picked in the settings), through the gateway with their key."""

    async def search(arguments: dict[str, Any]) -> str:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ToolError("`query` must be a non-empty string.")
        try:
            hits = await knowledge_base.search(query, SEARCH_HITS)
        except UploadRefused as exc:
            raise ToolError(f"The search was refused ({exc.status}): {exc.message}") from None
        except httpx.TransportError as exc:
            raise ToolError(f"The gateway could not be reached: {exc!r}") from None
        if not hits:
            return "Nothing in the user's documents matches."
        # The snippets are data from documents, not instructions: labelled as such.
        return json.dumps({"documents": [
            {"source": hit.get("source"), "page": hit.get("page"), "text": hit.get("text")}
            for hit in hits]}, ensure_ascii=False)

    return Tool(
        "search_documents", "Search the documents this chat draws on.",
        {"type": "object", "required": ["query"], "properties": {"query": {
            "type": "string", "maxLength": 500, "description": "What to look for."}}},
        search,
    )


def offered(
    enabled: bool, tool_calling: bool, knowledge_base: KnowledgeBaseClient | None
) -> dict[str, Tool]:
    """The tools a turn offers, by name: none unless the model calls tools; the document
    search only for a user who has documents."""
    if not (enabled and tool_calling):
        return {}
    chosen = [TIME, CALCULATOR, *([document_search(knowledge_base)] if knowledge_base else [])]
    return {tool.name: tool for tool in chosen}


def tool_choice(setting: str, tools: dict[str, Tool]) -> str | dict[str, Any]:
    """The request's `tool_choice` for the `ui.tool_choice` setting: a named tool that is not
    offered this turn (search without documents) leaves the choice to the model."""
    if setting in ("auto", "required"):
        return setting
    if setting in tools:
        return {"type": "function", "function": {"name": setting}}
    return "auto"


async def run(tools: dict[str, Tool], name: str, arguments: str) -> tuple[str, bool]:
    """The result of one tool call, and whether it failed; never raises for the model's
    mistakes or the tool's refusals."""
    tool = tools.get(name)
    if tool is None:
        return f"Error: there is no tool named {name[:64]!r}.", True
    if len(arguments) > MAX_ARGUMENT_CHARS:
        return f"Error: the arguments are longer than {MAX_ARGUMENT_CHARS} characters.", True
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return "Error: the arguments are not valid JSON.", True
    if not isinstance(parsed, dict):
        return "Error: the arguments must be a JSON object.", True
    try:
        result = await tool.run(parsed)
    except ToolError as exc:
        return f"Error: {exc}", True
    except Exception:  # noqa: BLE001 - a tool's bug is the model's failed call, not the turn's
        log.exception("Tool %s failed", name)
        return "Error: the tool failed unexpectedly.", True
    return result[:MAX_RESULT_CHARS], False
