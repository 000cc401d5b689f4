"""Bounds on the tools and JSON schemas a chat or Responses request sends, checked before any
engine sees them.

Tools go into the prompt (the chat template writes each one out) and, with `tool_choice`
required or named or a `strict` tool, become a grammar the engine compiles, as do a JSON
`response_format` and vLLM's `structured_outputs`. Both costs grow with what a client sends, so
one request may carry at most `validation.max_tools` tools, and its tools, response format and
structured outputs together at most `max_schema_bytes` of JSON, nested at most
`max_schema_depth` deep, with at most `max_schema_enum_values` enum (and `choice`) values. The
checks are linear in the body, which middleware.BodyLimit has bounded already.
"""

from __future__ import annotations

from typing import Any

import orjson

from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.protocol import InferenceRequest
from qwenstack.settings import ValidationSettings

# `text` is the Responses API's place for an output format (`text.format`).
SCHEMA_FIELDS = ("tools", "response_format", "structured_outputs", "text")
# OpenAI's formats; vLLM's `structural_tag` (its own grammar language) is not offered.
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
# vLLM's StructuredOutputsParams, but `structural_tag`.
STRUCTURED_OUTPUT_KEYS = frozenset({
    "json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace",
    "disable_additional_properties", "whitespace_pattern",
})


def check(request: InferenceRequest, settings: ValidationSettings) -> None:
    tools = request.get("tools")
    if isinstance(tools, list) and len(tools) > settings.max_tools:
        raise _refusal(f"`tools` may hold at most {settings.max_tools} tools; it has "
                       f"{len(tools)}.", "tools", "array_above_max_length")
    _check_kinds(request)
    present = [(name, request.get(name)) for name in SCHEMA_FIELDS
               if request.get(name) is not None]
    size = sum(len(orjson.dumps(value)) for _, value in present)
    if size > settings.max_schema_bytes:
        names = " and ".join(f"`{name}`" for name, _ in present)
        raise _refusal(f"{names}: {size} bytes of JSON; at most {settings.max_schema_bytes} "
                       "are accepted.", present[-1][0], "schema_too_large")
    enum_values = 0
    for name, value in present:
        enum_values += _walk(value, name, settings.max_schema_depth)
        if enum_values > settings.max_schema_enum_values:
            raise _refusal(
                f"The request's schemas list {enum_values} enum values or more; at most "
                f"{settings.max_schema_enum_values} are accepted.", name, "enum_above_max_length")


def _check_kinds(request: InferenceRequest) -> None:
    response_format = request.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in RESPONSE_FORMATS:
        raise _refusal(f"`response_format.type` must be one of {sorted(RESPONSE_FORMATS)}.",
                       "response_format", "invalid_value")
    structured = request.get("structured_outputs")
    unknown = sorted(set(structured) - STRUCTURED_OUTPUT_KEYS) if isinstance(structured, dict) \
        else []
    if unknown:
        raise _refusal(f"`structured_outputs.{unknown[0][:64]}` is not accepted; only "
                       f"{', '.join(sorted(STRUCTURED_OUTPUT_KEYS))}.",
                       "structured_outputs", "unsupported_parameter")


def _walk(value: Any, name: str, max_depth: int) -> int:
    """The enum and `choice` values in `value`, or a 400 where it nests deeper than
    `max_depth`. A loop over a stack, not recursion: no nesting can overflow it."""
    enum_values = 0
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > max_depth:
            raise _refusal(f"`{name}` nests deeper than {max_depth} levels.", name,
                           "schema_too_deep")
        if isinstance(node, dict):
            for key in ("enum", "choice"):
                if isinstance(node.get(key), list):
                    enum_values += len(node[key])
            pending.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            pending.extend((child, depth + 1) for child in node)
    return enum_values


def _refusal(message: str, param: str, code: str) -> GatewayError:
    return GatewayError(400, message, code=code, param=param)
