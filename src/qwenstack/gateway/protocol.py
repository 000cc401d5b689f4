"""The OpenAI inference request as the gateway reads it: one typed view over the JSON body.

In the spirit of vLLM's `entrypoints/openai/protocol.py`, without its full parse: the gateway
reads a handful of fields (to validate, limit, route, cache and ground a request), knows which
fields each route takes from a client (ALLOWED_FIELDS; validation refuses the others) and
forwards those as the client sent them. Every module that needs something of a request asks this
view, so each rule is decided once: which field bounds the answer's length on each route, what
the prompts are, what makes an answer deterministic. The body is serialised at most once, on the
way out, and only when the gateway changed it (parse tries once that it can be, see there).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Final, Literal, cast

import orjson

from qwenstack.gateway import responses
from qwenstack.gateway.errors import GatewayError

Route = Literal[
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
    "/v1/rerank", "/rerank", "/v1/score",
    "/v1/knowledge_bases/{name}/query", "/v1/knowledge_bases/{name}/files",
]
CHAT: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
RESPONSES: Final = "/v1/responses"
# Pooling routes, answered by engines started with `--runner pooling` (an embedding model, or a
# classifier for rerank and score); /v1/embeddings falls back to the gateway's own embedder
# (rag.embedding_*) for a model no engine serves (pooling.py). /rerank is the same as /v1/rerank
# (vLLM serves both, for Cohere's and Jina's clients).
EMBEDDINGS: Final = "/v1/embeddings"
RERANK: Final = "/v1/rerank"
RERANK_UNVERSIONED: Final = "/rerank"
SCORE: Final = "/v1/score"
POOLING: Final = frozenset({EMBEDDINGS, RERANK, RERANK_UNVERSIONED, SCORE})
# Accounted like inference (limits, usage, metrics) but answered by the gateway itself.
KNOWLEDGE_QUERY: Final = "/v1/knowledge_bases/{name}/query"
KNOWLEDGE_UPLOAD: Final = "/v1/knowledge_bases/{name}/files"

# What a client may send, per route: OpenAI's fields that vLLM reads, then vLLM's sampling
# extras (its SamplingParams; README "Request fields"). Everything else is refused with a 400
# naming the field, so nothing reaches the engine unseen: not vLLM's internal or dangerous
# fields (kv_transfer_params, priority, prompt_embeds, logits_processors, vllm_xargs,
# mm_processor_kwargs, media_io_kwargs, request_id), nor `cache_salt`, which the gateway sets.
# The gateway's own `knowledge_bases` is taken out before this check.
OPENAI_FIELDS: Final[dict[str, frozenset[str]]] = {
    CHAT: frozenset({
        "model", "messages", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
        "max_tokens", "max_completion_tokens", "n", "presence_penalty", "response_format",
        "seed", "stop", "stream", "stream_options", "temperature", "top_p", "tools",
        "tool_choice", "parallel_tool_calls", "user", "reasoning_effort",
        "include_reasoning",  # vLLM's: false leaves `reasoning` out of the answer
    }),
    COMPLETIONS: frozenset({
        "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
        "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
        "suffix", "temperature", "top_p", "user",
    }),
    # `store`, `background` and `previous_response_id` are taken to refuse them by value
    # (responses.py says why); `prompt` (stored prompt templates), `conversation` and
    # `prompt_cache_key` are not: vLLM refuses the first and ignores the others.
    RESPONSES: frozenset({
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
        "top_logprobs", "stream", "tools", "tool_choice", "parallel_tool_calls",
        "max_tool_calls", "user", "metadata", "text", "reasoning", "include", "truncation",
        "store", "background", "previous_response_id",
    }),
}
VLLM_SAMPLING_EXTRAS: Final = frozenset({
    "top_k", "min_p", "repetition_penalty", "length_penalty", "use_beam_search",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "prompt_logprobs", "allowed_token_ids", "bad_words", "structured_outputs",
})
# What vLLM's Responses request reads beyond OpenAI's fields (its ResponsesRequest), minus its
# internal ones (request_id, session_id, priority, cache_salt, kv_transfer_params,
# ec_transfer_params, vllm_xargs, mm_processor_kwargs, media_io_kwargs,
# previous_input_messages, enable_response_messages, ...).
RESPONSES_EXTRAS: Final = frozenset({
    "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
    "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
    "logit_bias", "structured_outputs", "include_reasoning",
})
# What vLLM's pooling requests read that a client may send: not their internal fields
# (request_id, priority, cache_salt, mm_processor_kwargs, ...), nor multimodal documents (media
# URLs the engine would fetch) or `add_special_tokens`-like tokenizer switches.
RERANK_FIELDS: Final = frozenset({"model", "query", "documents", "top_n", "user",
                                  "truncate_prompt_tokens"})
POOLING_FIELDS: Final[dict[str, frozenset[str]]] = {
    EMBEDDINGS: frozenset({"model", "input", "encoding_format", "dimensions", "user",
                           "truncate_prompt_tokens"}),
    RERANK: RERANK_FIELDS, RERANK_UNVERSIONED: RERANK_FIELDS,
    # vLLM's current shape, and the one it had before (`data_1`/`data_2` and `items` too, but
    # two are enough).
    SCORE: frozenset({"model", "queries", "documents", "text_1", "text_2", "user",
                      "truncate_prompt_tokens"}),
}
# Fields that feed the chat template (which runs inside the engine: CVE-2025-61620), allowed
# only with `validation.allow_chat_template`.
CHAT_TEMPLATE_FIELDS: Final = ("chat_template", "chat_template_kwargs")
# Keys of `chat_template_kwargs` any client may set (with or without allow_chat_template), each
# with the type its value must have: Qwen3's switch between thinking and answering at once.
SAFE_CHAT_TEMPLATE_KWARGS: Final[dict[str, type]] = {"enable_thinking": bool}
ALLOWED_FIELDS: Final[dict[str, frozenset[str]]] = {
    CHAT: OPENAI_FIELDS[CHAT] | VLLM_SAMPLING_EXTRAS | set(CHAT_TEMPLATE_FIELDS),
    COMPLETIONS: OPENAI_FIELDS[COMPLETIONS] | VLLM_SAMPLING_EXTRAS,
    RESPONSES: OPENAI_FIELDS[RESPONSES] | RESPONSES_EXTRAS | {"chat_template_kwargs"},
    **POOLING_FIELDS,
}
# Content parts a client may send, per route; the rest (image_embeds, audio_embeds: tensors
# the engine deserialises, like prompt_embeds; a Responses `input_file`) are refused. Media
# parts carry a URL, under the key named here.
MEDIA_PARTS: Final[dict[str, str]] = {
    "image_url": "image_url", "audio_url": "audio_url", "video_url": "video_url",
    "input_image": "image_url",
}
CONTENT_PARTS: Final[dict[str, frozenset[str]]] = {
    CHAT: frozenset({"text", "refusal", "input_audio", "image_url", "audio_url", "video_url"}),
    RESPONSES: frozenset({"input_text", "output_text", "refusal", "input_image"}),
}

# The fields that bound the answer's length, in the order the engine reads them, and the bound
# when none is given. vLLM's chat request takes `max_completion_tokens` and falls back to the
# deprecated `max_tokens`, else generates to the end of the context window (None here); its
# completion request has only `max_tokens` (a `max_completion_tokens` there is ignored),
# 16 by default, as OpenAI's; its Responses request has `max_output_tokens`, else the rest of
# the window.
OUTPUT_LIMIT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    CHAT: ("max_completion_tokens", "max_tokens"),
    COMPLETIONS: ("max_tokens",),
    RESPONSES: ("max_output_tokens",),
    **dict.fromkeys(POOLING, ()),
    KNOWLEDGE_QUERY: (),
    KNOWLEDGE_UPLOAD: (),
}
DEFAULT_OUTPUT_LIMIT: Final[dict[str, int | None]] = {
    CHAT: None, COMPLETIONS: 16, RESPONSES: None, **dict.fromkeys(POOLING, 0),
    KNOWLEDGE_QUERY: 0, KNOWLEDGE_UPLOAD: 0,
}

Prompt = str | list[int]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def token_ids(values: list[Any]) -> bool:
    """A list of token ids. `type(...) is int` leaves bools out and is the fast test: a prompt
    of token ids may run to the context window's length."""
    return all(type(value) is int for value in values)


def _sides(first: Any, second: Any) -> tuple[list[str], list[str]] | None:
    """A rerank's or score's two sides as lists of one length, a single text on one side
    standing beside each of the other's (None when malformed). Not joined: the texts are
    bounded before anything is built of them (validation.check_pooling)."""
    firsts = [first] if isinstance(first, str) else first
    seconds = [second] if isinstance(second, str) else second
    if not (isinstance(firsts, list) and isinstance(seconds, list) and firsts and seconds
            and all(isinstance(text, str) for text in itertools.chain(firsts, seconds))):
        return None
    if len(firsts) == 1:
        firsts = firsts * len(seconds)  # references to one string
    return (firsts, seconds) if len(firsts) == len(seconds) else None


def _strict(tool: Any) -> bool:
    """A tool whose arguments the engine guides: chat nests its fields under `function`."""
    if not isinstance(tool, dict):
        return False
    function = tool.get("function")
    return (function if isinstance(function, dict) else tool).get("strict") is True


class InferenceRequest:
    """A chat or completion request: its route and JSON body, read through typed properties."""

    __slots__ = ("route", "_body", "_raw")

    def __init__(self, route: Route, body: dict[str, Any], raw: bytes | None = None) -> None:
        self.route = route
        self._body = body
        self._raw = raw  # the client's bytes, while the body is as they say

    @classmethod
    def parse(cls, route: Route, raw: bytes) -> InferenceRequest:
        """The body as a JSON object, with the fields the gateway itself relies on checked."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, f"The request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "The request body must be a JSON object.")
        try:
            # orjson reads 1024 levels of nesting but writes only 254: a body the gateway could
            # not write back (to the engine, into a cache key) is refused now, not with a 500
            # later. About 70 µs per megabyte.
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise GatewayError(400, "The request body nests too deep.") from None
        if not isinstance(body.get("model", ""), str):
            raise GatewayError(400, "`model` must be a string.", param="model")
        if not isinstance(body.get("stream", False), bool):
            raise GatewayError(400, "`stream` must be true or false.", param="stream")
        return cls(route, body, raw)

    # --- reading ---------------------------------------------------------------------------

    def get(self, field: str, default: Any = None) -> Any:
        return self._body.get(field, default)

    def __contains__(self, field: str) -> bool:
        return field in self._body

    @property
    def fields(self) -> frozenset[str]:
        """The fields present, null or not."""
        return frozenset(self._body)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._body.items())

    @property
    def model(self) -> str | None:
        return cast(str | None, self._body.get("model"))

    @property
    def stream(self) -> bool:
        return bool(self._body.get("stream"))

    @property
    def wants_usage(self) -> bool:
        """A streaming client that asked for the final usage chunk (the relay strips it else).
        A Responses stream always carries its usage, in its `response.completed` event."""
        if self.route == RESPONSES:
            return True
        options = self._body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    def token_usage(self, answer: Any) -> tuple[int, int] | None:
        """(prompt, completion) tokens that an engine's answer reports, whole or one streamed
        event of it; None when it reports none. A Responses answer names them `input_tokens`
        and `output_tokens`, and a stream reports them in its `response.completed` event,
        inside the response."""
        names = ("prompt_tokens", "completion_tokens")
        if self.route == RESPONSES and isinstance(answer, dict):
            answer = answer.get("response", answer)
            names = ("input_tokens", "output_tokens")
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if not isinstance(usage, dict):
            return None
        if self.route in POOLING:  # all input; a rerank may report only its total
            return int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0), 0
        return int(usage.get(names[0]) or 0), int(usage.get(names[1]) or 0)

    @property
    def output_limit(self) -> tuple[str, int | None]:
        """The field that bounds the answer's length on this route as the engine reads it, and
        the value the request gives it (None: not given; `default_output_limit` applies)."""
        names = OUTPUT_LIMIT_FIELDS[self.route]
        for name in names:
            value = self._body.get(name)
            if value is not None:
                return name, value
        return (names[-1] if names else ""), None

    @property
    def output_limits(self) -> list[tuple[str, int]]:
        """Every output-limit field the request sets: a cap holds for each, whichever the
        engine reads."""
        return [(name, self._body[name]) for name in OUTPUT_LIMIT_FIELDS[self.route]
                if self._body.get(name) is not None]

    @property
    def unknown_fields(self) -> list[str]:
        """The fields this route does not take from a client (ALLOWED_FIELDS)."""
        allowed = ALLOWED_FIELDS[self.route]
        return [name for name in self._body if name not in allowed]

    @property
    def input_field(self) -> str:
        """The field that holds the prompt on this route (for errors that name it)."""
        return {CHAT: "messages", COMPLETIONS: "prompt", RESPONSES: "input", EMBEDDINGS: "input",
                RERANK: "documents", RERANK_UNVERSIONED: "documents", SCORE: "documents",
                }.get(self.route, "")

    def media_urls(self) -> Iterator[tuple[str, str]]:
        """(part type, URL) of each media part of the request's messages or input items; a part
        of a type outside the route's CONTENT_PARTS raises a 400 naming it, and so does one
        with a `uuid`, which makes vLLM read a part by its keys (`image_embeds` too) rather
        than by its type."""
        allowed = CONTENT_PARTS.get(self.route, frozenset())
        for part in self._content_parts():
            kind = part.get("type") if isinstance(part, dict) else None
            known = isinstance(kind, str) and kind in allowed
            if not known or "uuid" in part:
                what = "with a `uuid`" if known else f"of type {str(kind)[:40]!r}"
                raise GatewayError(400, f"Content parts {what} are not allowed.",
                                   code="invalid_request", param=self.input_field)
            if kind in MEDIA_PARTS:
                media = part.get(MEDIA_PARTS[kind])
                url = media.get("url") if isinstance(media, dict) else media
                yield kind, url if isinstance(url, str) else ""

    def _content_parts(self) -> Iterator[Any]:
        """Every content part: of chat messages, of Responses message items and of function
        call outputs (which may hold parts too)."""
        if self.route == RESPONSES:
            lists = responses.content_lists(self.input_items or [])
        else:
            lists = (message.get("content") for message in self.messages or []
                     if isinstance(message, dict))
        for parts in lists:
            yield from parts if isinstance(parts, list) else ()

    @property
    def default_output_limit(self) -> int | None:
        """The engine's bound when the request gives none (None: the rest of the context)."""
        return DEFAULT_OUTPUT_LIMIT[self.route]

    @property
    def choices(self) -> int:
        """Answers asked for per prompt (`n`)."""
        n = self._body.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    @property
    def messages(self) -> list[Any] | None:
        """A chat request's messages (None on other routes, or when malformed)."""
        messages = self._body.get("messages")
        return messages if self.route == CHAT and isinstance(messages, list) else None

    @property
    def input_items(self) -> list[Any] | None:
        """A Responses request's input items (None for a text input, on other routes, or when
        malformed)."""
        items = self._body.get("input")
        return items if self.route == RESPONSES and isinstance(items, list) else None

    @property
    def conversation(self) -> list[Any] | None:
        """The prompt as chat messages: a chat request's own, a Responses request's
        instructions and input as vLLM renders them (None on other routes)."""
        if self.route == RESPONSES:
            return responses.chat_messages(self._body.get("instructions"),
                                           self._body.get("input"))
        return self.messages

    @property
    def prompts(self) -> list[Prompt]:
        """A completion request's prompts, one per answer set: a batch of strings or of token
        lists, or a single prompt. On a pooling route, what the engine encodes: an embedding
        request's inputs (the same shapes), a rerank's query joined to each document, a score's
        pairs of texts ([] on other routes, or when malformed). Joined texts are built here:
        read `pooled_size` first (validation does)."""
        sides = self._pooled_sides()
        if sides is not None:
            return [f"{a}\n{b}" for a, b in zip(*sides, strict=True)]
        if self.route not in (COMPLETIONS, EMBEDDINGS):
            return []
        prompt = self._body.get(self.input_field)
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, list) or not prompt:
            return []
        if token_ids(prompt):
            return [prompt]  # one prompt of token ids
        return list(prompt)

    @property
    def pooled_size(self) -> tuple[int, int]:
        """How many texts a pooling request has the engine encode, and their characters (a
        query counted with each document; a token list by its ids), without building them."""
        sides = self._pooled_sides()
        texts: list[Prompt] = [*sides[0], *sides[1]] if sides is not None else self.prompts
        return (len(sides[1]) if sides is not None else len(texts)), sum(map(len, texts))

    def _pooled_sides(self) -> tuple[list[str], list[str]] | None:
        """A rerank's query and documents, a score's two sides; None on other routes."""
        if self.route in (RERANK, RERANK_UNVERSIONED):
            return _sides(self._body.get("query"), self._body.get("documents"))
        if self.route != SCORE:
            return None
        if "queries" in self._body or "documents" in self._body:
            return _sides(self._body.get("queries"), self._body.get("documents"))
        return _sides(self._body.get("text_1"), self._body.get("text_2"))

    @property
    def question(self) -> str:
        """The newest user message's text (text parts joined), or ''."""
        for message in reversed(self.messages or []):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(part.get("text", "") for part in content
                                    if isinstance(part, dict) and part.get("type") == "text")
        return ""

    @property
    def guided(self) -> bool:
        """The engine decodes under a grammar: a JSON response_format (the Responses API's
        `text.format`), structured_outputs, or tools that must be called (tool_choice required
        or named) or are `strict` (chat nests a tool's fields under `function`, Responses not)."""
        text = self._body.get("text")
        for output_format in (self._body.get("response_format"),
                              text.get("format") if isinstance(text, dict) else None):
            if isinstance(output_format, dict) and output_format.get("type") != "text":
                return True
        if self._body.get("structured_outputs") is not None:
            return True
        tools = self._body.get("tools")
        if not isinstance(tools, list) or not tools:
            return False
        choice = self._body.get("tool_choice")
        return choice == "required" or isinstance(choice, dict) or any(map(_strict, tools))

    @property
    def deterministic(self) -> bool:
        """The engine gives the same answer again: greedy decoding, or sampling from a seed."""
        temperature = self._body.get("temperature")
        greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) \
            and temperature == 0
        return greedy or _is_int(self._body.get("seed"))

    def conversation_start(self, prompt_bytes: int, max_bytes: int) -> bytes:
        """What every turn of this request's conversation starts with, to send them all to the
        same engine: the chat messages up to and including the first user message, joined in
        order (role, then content; a Responses request's as the chat messages vLLM makes of
        it, so a conversation is routed alike through either route), or a raw prompt's first
        `prompt_bytes` (a later turn extends the prompt); at most `max_bytes` either way.

        A shared system prompt alone does not name a conversation, its first question does:
        conversations that share one still spread over the engines."""
        messages = self.conversation
        if messages is not None:
            parts, size = [], 0
            for message in messages:
                if not isinstance(message, dict):
                    continue
                content = message.get("content")
                text = content if isinstance(content, str) else orjson.dumps(content).decode()
                parts.append(f"{message.get('role')}\x1f{text}\x1e")
                size += len(parts[-1])
                if message.get("role") == "user" or size >= max_bytes:
                    break
            return "".join(parts).encode()[:max_bytes]
        prompt = self._body.get("prompt")
        if isinstance(prompt, str):
            return prompt.encode()[:min(prompt_bytes, max_bytes)]
        start = orjson.dumps(prompt) if prompt is not None else b""
        return start[:min(prompt_bytes, max_bytes)]

    # --- changing (the gateway's own additions; every change is seen by every later reader) -

    def set(self, field: str, value: Any) -> None:
        self._body[field] = value
        self._raw = None

    def pop(self, field: str) -> Any:
        if field not in self._body:
            return None
        self._raw = None
        return self._body.pop(field)

    def to_bytes(self, *, include_usage: bool = False) -> bytes:
        """The body for the engine: the client's bytes while unchanged. `include_usage` asks a
        stream for its final usage chunk (the gateway accounts tokens for every request)."""
        if include_usage and self.stream and not self.wants_usage:
            options = self._body.get("stream_options")
            options = {**options} if isinstance(options, dict) else {}
            return orjson.dumps({**self._body, "stream_options": {**options,
                                                                  "include_usage": True}})
        if self._raw is None:
            self._raw = orjson.dumps(self._body)
        return self._raw

    def as_dict(self) -> dict[str, Any]:
        """A shallow copy of the body (for keys and digests; changing it changes nothing)."""
        return dict(self._body)
