"""The Responses API (`POST /v1/responses`) behind a gateway that tenants share.

vLLM 0.32 serves it (`vllm/entrypoints/openai/responses/`): for a model that is not gpt-oss it
makes chat messages of `instructions` and the `input` items (`utils.construct_input_messages`)
and generates as chat does. What in it is unsafe behind a multi-tenant gateway, and how the
gateway closes it:

- Stored responses. With `store` (true unless a client says otherwise) on an engine started
  with VLLM_ENABLE_RESPONSES_API_STORE, vLLM keeps every response, its input messages and, for
  `background` ones, their events, in dicts in that one engine's memory, never evicted; anyone
  who knows an id reads it (GET /v1/responses/{id}), cancels it, or continues from it
  (`previous_response_id`), and only on the replica that kept it. Tenant-bound ids would need
  the gateway to keep id -> caller and replica itself, and the memory would still grow without
  bound. So the gateway refuses `store: true`, `background: true` and `previous_response_id`
  (400) and always sends `store: false`, so no engine keeps anything whatever its environment,
  and it routes none of the GET/DELETE/cancel routes (app.py answers them 404). A conversation
  goes back as `input` items, as a chat's goes back as messages.
- Built-in tools (web_search, file_search, code_interpreter, computer use, mcp, image
  generation, shell, ...) make an engine with a tool server reach out or run code: only
  `function` tools pass; their calls come back to the client, which runs them.
- Internal fields (request_id, priority, cache_salt, kv_transfer_params, vllm_xargs,
  previous_input_messages, ...): the route's allowlist (protocol.ALLOWED_FIELDS).
- Input: vLLM passes a message item on to its chat parser as it is, so its content parts go
  through the same check as chat's (protocol.media_urls: text and images, whose URLs must be
  data: or of an allowed domain; `input_file` and `file_id` are refused); only the item types
  vLLM renders for a chat model pass (item_reference and built-in tool calls would need stored
  state or tools); at most `validation.max_messages` of them; their bytes are bounded by the
  body limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qwenstack.gateway.errors import GatewayError

if TYPE_CHECKING:
    from qwenstack.gateway.protocol import InferenceRequest

# Input item types vLLM makes chat messages of; an item with a `role` and no type is a message.
ITEM_TYPES = frozenset({"message", "function_call", "function_call_output", "reasoning"})
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
ASSISTANT_PARTS = ("output_text", "input_text")
TOOL_CHOICES = frozenset({"auto", "none", "required"})
# Text parts of Responses content, and the key of their text.
TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
# Values that would keep state at the engine (see above): what a client may send instead.
STATELESS = {"store": False, "background": False, "previous_response_id": None}
NO_STATE = ("This server keeps no responses: `store`, `background` and `previous_response_id` "
            "are not supported; send the conversation as `input` items.")


def check(request: InferenceRequest) -> None:
    """Refuse what would keep state at the engine, built-in tools and input items vLLM would
    not render as chat; then make sure the engine keeps nothing (`store: false`)."""
    for field, allowed in STATELESS.items():
        if request.get(field) not in (allowed, None):
            raise GatewayError(400, NO_STATE, code="invalid_request", param=field)
    instructions = request.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise GatewayError(400, "`instructions` must be a string.", code="invalid_type",
                           param="instructions")
    _check_tools(request.get("tools"), request.get("tool_choice"))
    for item in request.input_items or []:
        _check_item(item)
    request.set("store", False)


def function_calls(answer: dict[str, Any]) -> int:
    """The function calls in a Responses answer: whole, or the `response.completed` event that
    carries the whole response. Its output items are counted, not byte marks as for chat
    (tool_calls.py): the response echoes the request's `tools`, each `"type":"function"`."""
    response = answer.get("response", answer)
    output = response.get("output") if isinstance(response, dict) else None
    if not isinstance(output, list):
        return 0
    return sum(isinstance(item, dict) and item.get("type") == "function_call" for item in output)


def _check_tools(tools: Any, tool_choice: Any) -> None:
    if tools is not None and not isinstance(tools, list):
        raise GatewayError(400, "`tools` must be a list.", code="invalid_type", param="tools")
    for tool in tools or []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool.get("name"), str):
            raise GatewayError(
                400, f"Only tools of type `function` (with a `name`) are supported, not {kind!r}:"
                " built-in tools would have the engine reach out or run code.",
                code="invalid_request", param="tools",
            )
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
    if tool_choice is not None and not named and not (
            isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES):
        raise GatewayError(400, "`tool_choice` must be auto, none, required or a function.",
                           code="invalid_request", param="tool_choice")


def _check_item(item: Any) -> None:
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if not (isinstance(kind, str) and kind in ITEM_TYPES):
        raise GatewayError(
            400, f"Input items of type {kind!r} are not supported; items may be "
            f"{', '.join(sorted(ITEM_TYPES))}.", code="invalid_request", param="input",
        )
    if kind != "message":
        return
    role, content = item.get("role"), item.get("content")
    if not (isinstance(role, str) and role in MESSAGE_ROLES
            and (isinstance(content, str) or isinstance(content, list) and content)):
        raise GatewayError(400, "A message item needs a `role` (user, assistant, system or "
                           "developer) and a `content`, text or a non-empty list of parts.",
                           code="invalid_type", param="input")
    # vLLM reads an assistant message's first part as text (an IndexError or AttributeError
    # there is its 500, which would also count against the engine's circuit breaker).
    if role == "assistant" and isinstance(content, list) and not all(
            isinstance(part, dict) and part.get("type") in ASSISTANT_PARTS for part in content):
        raise GatewayError(400, "An assistant message's parts must be text (`output_text`).",
                           code="invalid_request", param="input")


def content_lists(items: list[Any]) -> Iterator[Any]:
    """The content of every item that may hold content parts: messages' `content`, function
    call outputs' `output`."""
    for item in items:
        if isinstance(item, dict):
            yield item.get("output") if item.get("type") == "function_call_output" \
                else item.get("content")


def chat_messages(instructions: Any, input_: Any) -> list[dict[str, Any]]:
    """The chat messages vLLM makes of a Responses request (for a model other than gpt-oss):
    the instructions as the system message, then a text input as the user's message, or each
    input item as a message. vLLM merges a function call into the assistant message before
    it; kept apart here, the prompt counts a few template tokens more."""
    messages = [{"role": "system", "content": instructions}] \
        if isinstance(instructions, str) and instructions else []
    if isinstance(input_, str):
        return [*messages, {"role": "user", "content": input_}]
    return messages + [_chat_message(item) for item in input_ or [] if isinstance(item, dict)]


def _chat_message(item: dict[str, Any]) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind == "function_call":
        call = {"name": item.get("name"), "arguments": item.get("arguments")}
        return {"role": "assistant",
                "tool_calls": [{"id": item.get("call_id"), "type": "function", "function": call}]}
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": item.get("call_id"),
                "content": _chat_content(item.get("output"))}
    if kind == "reasoning":
        texts = item.get("content") or item.get("summary") or [{}]
        text = texts[0].get("text") if isinstance(texts, list) and isinstance(texts[0], dict) \
            else None
        return {"role": "assistant", "reasoning": text or ""}
    return {"role": item.get("role"), "content": _chat_content(item.get("content"))}


def _chat_content(content: Any) -> Any:
    """Responses content parts in chat's form (what vLLM's /tokenize validates against)."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": part.get("image_url")}})
        elif isinstance(kind, str) and kind in TEXT_PARTS:
            parts.append({"type": "text", "text": part.get(TEXT_PARTS[kind])})
    return parts


def tokenize_fields(request: InferenceRequest) -> dict[str, Any]:
    """What vLLM's /tokenize needs to count a Responses request's prompt as the engine renders
    it: its chat messages, its tools in chat's form and the chat template's arguments."""
    fields: dict[str, Any] = {"messages": request.conversation}
    tools = request.get("tools")
    if tools:
        fields["tools"] = [
            {"type": "function", "function": {key: tool[key] for key in
                                              ("name", "description", "parameters")
                                              if tool.get(key) is not None}}
            for tool in tools
        ]
    if "chat_template_kwargs" in request:
        fields["chat_template_kwargs"] = request.get("chat_template_kwargs")
    return fields
