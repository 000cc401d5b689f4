"""Checks on an inference request at the gateway, before any engine sees it.

Each refusal is an OpenAI-shaped error: 400 for a malformed body, a field the route does not
take (protocol.ALLOWED_FIELDS), a field of the wrong type, a value over a configured cap or
beyond the context window, too many messages, prompts or input items, tools and schemas beyond
their bounds (schemas.py), a media URL outside the allowed domains, a client-supplied chat
template or template arguments other than the thinking switch (CVE-2025-61620: templates run
inside the engine), or what the Responses API must not do here (responses.py); 413 for an
oversized body comes from middleware.BodyLimit as it arrives; http_limits.py bounds request
heads and slow clients. An unknown model is ReplicaPool.resolve's 404. `hold_thinking` applies
a caller's thinking policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from qwenstack.callers import Caller
from qwenstack.gateway import responses, schemas
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.protocol import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    POOLING,
    RERANK,
    RERANK_UNVERSIONED,
    RESPONSES,
    SAFE_CHAT_TEMPLATE_KWARGS,
    SCORE,
    InferenceRequest,
    token_ids,
)
from qwenstack.gateway.replicas import ServedModel
from qwenstack.settings import RagSettings, ValidationSettings


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Routes whose prompt may be one list of token ids (a list of many, not of prompts).
TOKEN_ID_ROUTES = (COMPLETIONS, EMBEDDINGS)
# Each route's lists bounded by their length (_check_counts), and the setting that bounds them:
# validation's, or rag.max_embedding_inputs for a pooling request's texts.
COUNTED_LISTS: dict[str, tuple[tuple[str, str], ...]] = {
    CHAT: (("messages", "max_messages"),),
    RESPONSES: (("input", "max_messages"),),
    COMPLETIONS: (("prompt", "max_prompts"),),
    EMBEDDINGS: (("input", "max_embedding_inputs"),),
    RERANK: (("documents", "max_embedding_inputs"),),
    RERANK_UNVERSIONED: (("documents", "max_embedding_inputs"),),
    SCORE: tuple((name, "max_embedding_inputs")
                 for name in ("queries", "documents", "text_1", "text_2")),
}


def _positive_int(value: Any) -> bool:
    return _int(value) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _object(value: Any) -> bool:
    return isinstance(value, dict)


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value))


def _prompt(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    return (all(isinstance(p, str) for p in value) or token_ids(value)
            or all(isinstance(p, list) and p and token_ids(p) for p in value))


def _input(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value))


def _texts(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(t, str) for t in value))


def _stop(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(s, str) for s in value)
    return isinstance(value, str)


# field -> (accepts, what it must be); null is accepted for every optional field, as OpenAI does.
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (_positive_int, "a positive integer"),
    "max_completion_tokens": (_positive_int, "a positive integer"),
    "max_output_tokens": (_positive_int, "a positive integer"),
    "n": (_positive_int, "a positive integer"),
    "best_of": (_positive_int, "a positive integer"),
    "seed": (_int, "an integer"),
    "temperature": (_number, "a number"),
    "top_p": (_number, "a number"),
    "presence_penalty": (_number, "a number"),
    "frequency_penalty": (_number, "a number"),
    "stop": (_stop, "a string or a list of strings"),
    "stream_options": (_object, "an object"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "tools": (lambda v: isinstance(v, list), "a list of tools"),
    "parallel_tool_calls": (_bool, "true or false"),
    "response_format": (_object, "an object"),
    "structured_outputs": (_object, "an object"),
    "chat_template_kwargs": (_object, "an object"),
    "include_reasoning": (_bool, "true or false"),
    "top_n": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "dimensions": (_positive_int, "a positive integer"),
    "truncate_prompt_tokens": (lambda v: _int(v) and v >= -1, "an integer, -1 or more"),
    # Not vLLM's "bytes": a binary answer carries no usage to account its tokens by.
    "encoding_format": (lambda v: v in ("float", "base64"), "`float` or `base64`"),
}
PROMPT = (_prompt, "a string, a list of strings or a list of token ids")
RERANKED = (("query", lambda v: isinstance(v, str), "a string"),
            ("documents", lambda v: _texts(v) and isinstance(v, list), "a non-empty list of "
             "strings"))
# The input each route needs.
REQUIRED: dict[str, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    CHAT: (("messages", _messages, "a non-empty list of messages with a `role`"),),
    COMPLETIONS: (("prompt", *PROMPT),),
    RESPONSES: (("input", _input, "a string or a non-empty list of input items"),),
    EMBEDDINGS: (("input", *PROMPT),),
    RERANK: RERANKED,
    RERANK_UNVERSIONED: RERANKED,
    SCORE: (),  # `queries` and `documents`, or `text_1` and `text_2`: check_pooling
}


def check(request: InferenceRequest, settings: ValidationSettings, rag: RagSettings) -> None:
    """Refuse what the engine should never see (`fits` checks against the model's window)."""
    unknown = request.unknown_fields
    if unknown:
        raise GatewayError(400, f"`{unknown[0]}` is not accepted on {request.route}.",
                           code="unsupported_parameter", param=unknown[0])
    _check_counts(request, settings, rag)
    for name, accepts, expected in REQUIRED[request.route]:
        if not accepts(request.get(name)):
            raise GatewayError(400, f"`{name}` must be {expected}.", code="invalid_type",
                               param=name)
    for field, (accepts, expected) in FIELDS.items():
        value = request.get(field)
        if value is not None and not accepts(value):
            raise GatewayError(
                400, f"`{field}` must be {expected}.", code="invalid_type", param=field
            )
    _check_chat_template(request, settings.allow_chat_template)
    schemas.check(request, settings)
    if request.route == RESPONSES:
        responses.check(request)
    _check_media(request, settings.allowed_media_domains)
    for field in ("n", "best_of"):
        if (request.get(field) or 1) > settings.max_n:
            raise GatewayError(
                400, f"`{field}` may be at most {settings.max_n}.", code="integer_above_max_value",
                param=field,
            )
    cap = settings.max_tokens_cap
    for field, limit in request.output_limits:  # each field set, whichever the engine reads
        if cap is not None and limit > cap:
            raise GatewayError(400, f"`{field}` may be at most {cap}.",
                               code="integer_above_max_value", param=field)
    field, max_tokens = request.output_limit
    default = request.default_output_limit
    if cap is not None and max_tokens is None and (default is None or default > cap):
        # Without it, the engine would generate up to its default (on chat: the end of the
        # context window).
        request.set(field, cap)


def _check_counts(request: InferenceRequest, settings: ValidationSettings,
                  rag: RagSettings) -> None:
    """Bound the work one request may ask for by its lists' lengths alone, before any check
    looks at their items (a 16 MiB body holds millions): messages, input items, a batch of
    prompts, a pooling request's texts. A list of token ids is one prompt, whatever its length
    (the context window bounds it)."""
    for name, bound in COUNTED_LISTS.get(request.route, ()):
        cap = getattr(rag if bound == "max_embedding_inputs" else settings, bound)
        items = request.get(name)
        if not isinstance(items, list) or len(items) <= cap:
            continue
        if request.route in TOKEN_ID_ROUTES and _int(items[0]):
            # One prompt of token ids: an embedding's ids count as its characters.
            if request.route == EMBEDDINGS and len(items) > rag.max_embedding_chars:
                _bound_texts(1, len(items), rag, name)
            continue
        raise GatewayError(400, f"`{name}` may hold at most {cap} items; it has {len(items)}.",
                           code="array_above_max_length", param=name)


def check_pooling(request: InferenceRequest, settings: RagSettings) -> None:
    """Bound what a pooling request has the engine encode (no-op on other routes): an embedding
    request's inputs, a rerank's documents or a score's pairs, by count and by characters
    (each document with its query; a token list by its ids), as the gateway's own embedder is
    bounded; measured before any text is built of them. A score's two lists of unequal
    lengths (neither of one text) pair nothing."""
    if request.route not in POOLING:
        return
    count, characters = request.pooled_size
    if not count:  # the routes' own fields are checked first: only a score's can be amiss
        raise GatewayError(400, "Give `queries` and `documents` (or `text_1` and `text_2`): "
                           "each a string or a non-empty list of strings, one of them a single "
                           "text or both of one length.", code="invalid_request",
                           param="documents")
    _bound_texts(count, characters, settings, request.input_field)


def check_texts(texts: Sequence[str], settings: RagSettings, param: str) -> None:
    """Bound one request's embedding work: how many texts, how many characters in all."""
    _bound_texts(len(texts), sum(map(len, texts)), settings, param)


def _bound_texts(count: int, characters: int, settings: RagSettings, param: str) -> None:
    if count > settings.max_embedding_inputs:
        raise GatewayError(400, f"`{param}` may hold at most {settings.max_embedding_inputs} "
                           f"texts; it has {count}.", param=param,
                           code="array_above_max_length")
    if characters > settings.max_embedding_chars:
        raise GatewayError(400, f"`{param}` may hold at most {settings.max_embedding_chars} "
                           f"characters in all; it has {characters}.", param=param,
                           code="string_above_max_length")


def _check_chat_template(request: InferenceRequest, allow_chat_template: bool) -> None:
    """A client's chat template and its arguments only with `allow_chat_template`, but for the
    keys of SAFE_CHAT_TEMPLATE_KWARGS, whose values must be of their type."""
    kwargs = request.get("chat_template_kwargs")
    param = "chat_template_kwargs"
    for key, kind in SAFE_CHAT_TEMPLATE_KWARGS.items():
        if isinstance(kwargs, dict) and key in kwargs and not isinstance(kwargs[key], kind):
            raise GatewayError(400, f"`{param}.{key}` must be true or false.",
                               code="invalid_type", param=f"{param}.{key}")
    if allow_chat_template:
        return
    if "chat_template" in request:
        raise GatewayError(400, "`chat_template` is not allowed on this server.",
                           code="invalid_request", param="chat_template")
    unsafe = sorted(set(kwargs) - set(SAFE_CHAT_TEMPLATE_KWARGS)) if isinstance(kwargs, dict) \
        else []
    if unsafe:
        allowed = ", ".join(f"`{key}`" for key in SAFE_CHAT_TEMPLATE_KWARGS)
        raise GatewayError(
            400, f"`{param}` key `{unsafe[0][:64]}` is not allowed on this server; only "
            f"{allowed}.", code="invalid_request", param=param,
        )


def hold_thinking(request: InferenceRequest, caller: Caller, settings: ValidationSettings) -> None:
    """Thinking off for a caller (`keys create --no-thinking`) or a server
    (`validation.allow_thinking: false`) that allows none: a chat or Responses request (both
    render the chat template) goes with `enable_thinking` false, whatever it asked."""
    if request.route not in (CHAT, RESPONSES) or (settings.allow_thinking and caller.thinking):
        return
    kwargs = request.get("chat_template_kwargs")
    request.set("chat_template_kwargs",
                {**(kwargs if isinstance(kwargs, dict) else {}), "enable_thinking": False})


def _check_media(request: InferenceRequest, allowed_domains: list[str]) -> None:
    """Refuse media the engine would fetch from elsewhere (SSRF), unless its host is allowed
    (the engines are started with the same --allowed-media-domains). Inline data: URLs pass."""
    for kind, url in request.media_urls():
        address = urlsplit(url)
        if address.scheme == "data":
            continue
        if address.scheme not in ("http", "https") or address.hostname not in allowed_domains:
            raise GatewayError(
                400, f"`{kind}` URL {url[:100]!r}: only data: URLs and http(s) URLs of the "
                "allowed media domains are accepted.", code="invalid_request",
                param=request.input_field,
            )


def check_fits(request: InferenceRequest, model: ServedModel) -> None:
    """Refuse an output limit, or a completion's prompt of token ids, that the model's context
    window cannot hold (before anything counts or sends the ids)."""
    window = model.max_model_len
    prompt = request.get("prompt") if request.route == COMPLETIONS else None
    if window is not None and isinstance(prompt, list) and len(prompt) > window \
            and _int(prompt[0]):
        raise GatewayError(400, f"`prompt` holds {len(prompt)} token ids, but this model's "
                           f"context window is {window} tokens.",
                           code="context_length_exceeded", param="prompt")
    for field, max_tokens in request.output_limits:
        if window is not None and max_tokens >= window:
            raise GatewayError(
                400,
                f"`{field}` is {max_tokens}, but this model's context window is {window} "
                "tokens, prompt included.",
                code="context_length_exceeded", param=field,
            )

