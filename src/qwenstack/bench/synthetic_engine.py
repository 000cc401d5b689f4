"""A synthetic vLLM engine: vLLM's OpenAI wire format at a set pace, and no model behind it.

For measuring what stands in front of an engine (the gateway, a peer proxy, the load
generator) at token rates this machine's real engine cannot reach. It speaks vLLM 0.32's chat
completions byte for byte as `vllm serve` writes them (pydantic's compact JSON of its
`ChatCompletionStreamResponse` with `exclude_unset`: the role event, one event per
`stream_interval` tokens, the finish event, the usage event when asked, `[DONE]`), and answers
the other routes the gateway uses: /health, /v1/models, /tokenize and /metrics.

Like vLLM's engine it advances in steps: at each step (every 1 / `tokens_per_s` seconds, or
back to back when 0) every running stream gets its next event, written as vLLM's API server
writes it, one write per event. A stream's events are built once per request (its id and
time), so an event costs one transport write here, a few microseconds: the synthetic engine
is cheap enough never to be what limits a measurement.

    python -m qwenstack.bench.synthetic_engine --port 8100 --tokens-per-s 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import time
import uuid

import orjson
import uvloop
from aiohttp import web

MODEL = "synthetic"
# Where a benchmark changes the pace between its runs; no vLLM route has this path.
PACE_PATH = "/synthetic/pace"
# A stream whose client has this much unsent skips steps until it catches up, as a vLLM stream
# waits on its own client alone; awaiting its write would hold up every other stream's step.
BACKLOG_BYTES = 16 * 1024
TOKEN_TEXT = "x"  # each token's text: one byte, one tokenizer token in any vocabulary


@dataclasses.dataclass(frozen=True)
class Pace:
    """What the synthetic engine serves: its model name, tokens per second per request (0:
    as fast as it can write), tokens per event (vLLM's --stream-interval), and the answer's
    length when a request sets no max_tokens."""

    model: str = MODEL
    tokens_per_s: float = 0.0
    stream_interval: int = 1
    default_tokens: int = 64
    max_model_len: int = 32_768


class _Stream:
    """One streamed answer: its pre-built events, the tokens still to come, and a future set
    when the last byte is out (or the client is gone)."""

    def __init__(self, response: web.StreamResponse, events: StreamEvents,
                 transport: asyncio.BaseTransport | None) -> None:
        self.response = response
        self.transport = transport
        self.events = events
        self.tokens_left = events.tokens
        self.since_event = 0  # tokens generated since the last event written
        self.started = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def _chunk(request_id: str, created: int, model: str, choices: list[dict[str, object]],
           **extra: object) -> bytes:
    """One event as vLLM writes it: `data: ` and the chunk's compact JSON, fields in the order
    of vLLM's ChatCompletionStreamResponse."""
    chunk: dict[str, object] = {"id": request_id, "object": "chat.completion.chunk",
                                "created": created, "model": model, "choices": choices, **extra}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@dataclasses.dataclass(frozen=True)
class StreamEvents:
    """The events of one streamed answer, built once per request, as vLLM 0.32's serving_chat
    writes them (checked against its pydantic classes): the role event (with `prompt_token_ids`
    and `prompt_text`), the first token's event, events of `stream_interval` tokens each (with
    `token_ids`), the finish event with the last tokens (and `stop_reason`), then the usage
    event (its `None`s left out) when asked, and `[DONE]`."""

    tokens: int
    role: bytes
    first: bytes  # the first token, sent at once whatever the interval, as vLLM does
    content: bytes  # one event's worth of tokens, written again for each event
    finish: bytes
    tail: tuple[bytes, ...]  # after the finish event: the usage event, if asked, and [DONE]

    @classmethod
    def build(cls, pace: Pace, tokens: int, prompt_tokens: int, include_usage: bool
              ) -> StreamEvents:
        request_id, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())

        def choice(text: str, finish: str | None = None) -> dict[str, object]:
            fields: dict[str, object] = {"index": 0, "delta": {"content": text},
                                         "logprobs": None, "finish_reason": finish}
            if finish is not None:
                fields["stop_reason"] = None
            fields["token_ids"] = None
            return fields

        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}
        last = (tokens - 1) % pace.stream_interval or pace.stream_interval if tokens > 1 else 1
        tail: tuple[bytes, ...] = (b"data: [DONE]\n\n",)
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + tokens,
                     "completion_tokens": tokens}
            tail = (_chunk(request_id, created, pace.model, [], usage=usage), *tail)
        return cls(
            tokens=tokens,
            role=_chunk(request_id, created, pace.model, [role], prompt_token_ids=None,
                        prompt_text=None),
            first=_chunk(request_id, created, pace.model, [choice(TOKEN_TEXT)]),
            content=_chunk(request_id, created, pace.model,
                           [choice(TOKEN_TEXT * pace.stream_interval)]),
            finish=_chunk(request_id, created, pace.model, [choice(TOKEN_TEXT * last, "length")]),
            tail=tail,
        )


def whole_answer(pace: Pace, tokens: int, prompt_tokens: int) -> bytes:
    """A non-streamed chat answer as vLLM writes it."""
    return orjson.dumps({
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion",
        "created": int(time.time()), "model": pace.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": TOKEN_TEXT * tokens,
                                             "refusal": None, "annotations": None, "audio": None,
                                             "function_call": None, "tool_calls": [],
                                             "reasoning": None},
                     "logprobs": None, "finish_reason": "length", "stop_reason": None,
                     "token_ids": None}],
        "service_tier": None, "system_fingerprint": None,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + tokens,
                  "completion_tokens": tokens, "prompt_tokens_details": None},
        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
    })


def prompt_tokens(body: dict[str, object]) -> int:
    """A stand-in for the tokenizer: a prompt's words, plus the chat template's few tokens per
    message."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(5 + len(str(m.get("content", "")).split()) for m in messages
                   if isinstance(m, dict)) + 3
    return len(str(body.get("prompt", "")).split())


class SyntheticEngine:
    """The aiohttp app and its step loop."""

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self.running: list[_Stream] = []
        self.waiting: list[_Stream] = []
        self.served = 0  # requests answered
        self._wake = asyncio.Event()
        self._stepper: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post(PACE_PATH, self.set_pace)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        self._stepper = asyncio.create_task(self._step_forever())

    async def _stop(self, _: web.Application) -> None:
        if self._stepper:
            self._stepper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stepper

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        tokens = max(1, int(body.get("max_completion_tokens") or body.get("max_tokens")
                            or self.pace.default_tokens))
        prompt = prompt_tokens(body)
        if not body.get("stream"):
            if self.pace.tokens_per_s:
                await asyncio.sleep(tokens / self.pace.tokens_per_s)
            self.served += 1
            return web.Response(body=whole_answer(self.pace, tokens, prompt),
                                content_type="application/json")
        options = body.get("stream_options") or {}
        events = StreamEvents.build(self.pace, tokens, prompt,
                                    bool(options.get("include_usage")))
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        stream = _Stream(response, events, request.transport)
        self.waiting.append(stream)
        self._wake.set()
        await stream.done
        self.served += 1
        return response

    async def _step_forever(self) -> None:
        """Each step: every running stream writes its next event; the streams that arrived
        since join at the next step, as requests join vLLM's running batch."""
        due = time.perf_counter()
        while True:
            step_s = 1 / self.pace.tokens_per_s if self.pace.tokens_per_s else 0.0
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                due = time.perf_counter()
            self.running += self.waiting
            self.waiting = []
            for stream in self.running:
                await self._advance(stream)
            self.running = [s for s in self.running if not s.done.done()]
            due += step_s
            # Sleep to an absolute schedule, so timer slack does not lower the rate; at 0 the
            # loop still yields, so new requests are read between steps.
            await asyncio.sleep(max(0.0, due - time.perf_counter()))

    async def _advance(self, stream: _Stream) -> None:
        """One step of the stream: one token generated, and an event written when the token is
        the first (after the role event), completes a `stream_interval` or ends the answer
        (then the usage event and [DONE] follow), each event its own write, as vLLM's output
        processor and API server do."""
        events = stream.events
        if isinstance(stream.transport, asyncio.WriteTransport) and (
                stream.transport.get_write_buffer_size() > BACKLOG_BYTES):
            return  # its client is behind: this stream skips the step rather than stall them all
        try:
            stream.tokens_left -= 1
            stream.since_event += 1
            if not stream.started:
                stream.started = True
                await stream.response.write(events.role)
                if stream.tokens_left:
                    stream.since_event = 0
                    await stream.response.write(events.first)
            if stream.tokens_left == 0:
                await stream.response.write(events.finish)
                for event in events.tail:
                    await stream.response.write(event)
                await stream.response.write_eof()
                stream.done.set_result(None)
            elif stream.since_event == self.pace.stream_interval:
                stream.since_event = 0
                await stream.response.write(events.content)
        except (ConnectionError, RuntimeError):
            if not stream.done.done():
                stream.done.set_result(None)

    async def set_pace(self, request: web.Request) -> web.Response:
        """Change `tokens_per_s`, `stream_interval` or `default_tokens` for the requests that
        come next."""
        self.pace = dataclasses.replace(self.pace, **orjson.loads(await request.read()))
        return web.json_response(dataclasses.asdict(self.pace))

    async def models(self, _: web.Request) -> web.Response:
        card = {"id": self.pace.model, "object": "model", "created": int(time.time()),
                "owned_by": "vllm", "root": self.pace.model, "parent": None,
                "max_model_len": self.pace.max_model_len, "permission": []}
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, _: web.Request) -> web.Response:
        return web.Response()

    async def tokenize(self, request: web.Request) -> web.Response:
        count = prompt_tokens(orjson.loads(await request.read()))
        return web.json_response({"count": count, "max_model_len": self.pace.max_model_len,
                                  "tokens": [0] * count, "token_strs": None})

    async def metrics(self, _: web.Request) -> web.Response:
        labels = f'{{engine="0",model_name="{self.pace.model}"}}'
        page = (f"vllm:num_requests_running{labels} {len(self.running)}\n"
                f"vllm:num_requests_waiting{labels} {len(self.waiting)}\n"
                f"vllm:kv_cache_usage_perc{labels} 0.0\n")
        return web.Response(text=page, content_type="text/plain")


def serve(port: int, pace: Pace) -> None:
    """Serve on 127.0.0.1:`port` until the process is stopped."""
    uvloop.install()
    web.run_app(SyntheticEngine(pace).app(), host="127.0.0.1", port=port, print=None,
                access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--tokens-per-s", type=float, default=0.0,
                        help="per request; 0: as fast as it can write")
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per event")
    parser.add_argument("--default-tokens", type=int, default=64)
    args = parser.parse_args()
    serve(args.port, Pace(args.model, args.tokens_per_s, args.stream_interval,
                          args.default_tokens))


if __name__ == "__main__":
    main()
