"""The load generator: one process, one event loop, requests to OpenAI-compatible endpoints.

Per streamed event it does one `readline` and takes one timestamp; it parses JSON only once per
request (the last event, which carries `usage` when `stream_options.include_usage` is set), so
token counts come from the server and small, fast models are not slowed by the client.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import orjson

from qwenstack.bench.datasets import Prompt
from qwenstack.console import NO_PROGRESS, Progress

Api = Literal["chat", "completions"]
ROUTES: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # without /v1
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestOptions:
    model: str
    api: Api = "chat"
    stream: bool = True
    ignore_eos: bool = True  # vLLM's extension: every request generates exactly max_tokens
    temperature: float | None = None  # unset: the model's default (and no answer-cache hits)

    def body(self, prompt: Prompt) -> bytes:
        body: dict[str, object] = {"model": self.model, "max_tokens": prompt.max_tokens}
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return orjson.dumps(body)


@dataclass(frozen=True)
class Load:
    """Fixed concurrency (closed loop), or a Poisson arrival rate (open loop, inf: all at once)."""

    concurrency: int | None = None
    rate: float | None = None  # requests/s
    max_concurrency: int | None = None  # caps an open loop's requests in flight

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        return f"rate={self.rate:g}/s"

    @property
    def value(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.rate or 0)


@dataclass
class RequestRecord:
    started: float
    finished: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each content event
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float:
        return (self.token_times[0] if self.token_times else self.finished) - self.started

    @property
    def latency(self) -> float:
        return self.finished - self.started

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a one-token answer."""
        if self.output_tokens < 2 or len(self.token_times) < 2:
            return None  # one token, or not streamed
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]


@dataclass
class RunRecord:
    target: str
    load: Load
    records: list[RequestRecord]
    duration: float  # first request sent to last answer finished


async def _send(
    session: aiohttp.ClientSession, url: str, body: bytes, target: Target, options: RequestOptions
) -> RequestRecord:
    record = RequestRecord(started=time.perf_counter())
    try:
        async with session.post(url, data=body, headers=target.headers) as response:
            if response.status != 200:
                text = (await response.text(errors="replace"))[:200]
                record.error = f"HTTP {response.status}: {text}"
            elif options.stream:
                await _read_stream(response, record, options.api)
            else:
                _take_usage(orjson.loads(await response.read()), record)
                record.token_times.append(time.perf_counter())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    record.finished = time.perf_counter()
    return record


async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord, api: Api) -> None:
    times = record.token_times
    first = last = b""
    # Read to the end, past [DONE]: leaving earlier would close the connection under the server
    # (a gateway logs the request as a client disconnect) instead of returning it to the pool.
    async for line in response.content:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            times.append(time.perf_counter())
            if not first:
                first = line
            last = line
    if api == "chat" and first and b'"role"' in first and b'"content":""' in first:
        times.pop(0)  # the chat opener carries the role only, no token
    if not last:
        record.error = "the stream ended without events"
        return
    event = orjson.loads(last[6:])
    if "error" in event:
        record.error = f"error event: {str(event['error'])[:180]}"
        return
    if event.get("usage") and not event.get("choices"):
        times.pop()  # the usage event follows the last token
    _take_usage(event, record)
    if not record.usage_reported:
        record.output_tokens = len(times)  # a server without include_usage: one token per event


def _take_usage(answer: dict, record: RequestRecord) -> None:
    usage = answer.get("usage")
    if isinstance(usage, dict):
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        record.usage_reported = True


async def run_load(
    session: aiohttp.ClientSession,
    target: Target,
    prompts: Sequence[Prompt],
    load: Load,
    options: RequestOptions,
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> RunRecord:
    url = target.base_url.rstrip("/") + ROUTES[options.api]
    bodies = [options.body(p) for p in prompts]  # serialised before the clock starts
    records: list[RequestRecord] = []
    started = time.perf_counter()
    if load.concurrency is not None:
        queue = iter(bodies)

        async def worker() -> None:
            for body in queue:
                records.append(await _send(session, url, body, target, options))
                progress.advance()

        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    else:
        limit = asyncio.Semaphore(load.max_concurrency or len(bodies) or 1)

        async def limited(body: bytes) -> None:
            async with limit:
                records.append(await _send(session, url, body, target, options))
                progress.advance()

        rng = random.Random(seed)
        rate = load.rate or math.inf
        due = started
        tasks = []
        for body in bodies:
            # Sleep to an absolute schedule, so timer slack does not lower the rate.
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(body)))
            if rate != math.inf:
                due += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return RunRecord(target.name, load, records, time.perf_counter() - started)


def session(timeout_s: float) -> aiohttp.ClientSession:
    """One connection pool without a cap: the load decides how many requests are in flight."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        read_bufsize=2**16,
        headers={"content-type": "application/json"},  # bodies are pre-serialised bytes
    )


def prompts_needed(
    targets: int, loads: int, rounds: int, requests_per_run: int, warmup: int
) -> int:
    return targets * (warmup + loads * rounds * requests_per_run)


async def run_interleaved(
    targets: Sequence[Target],
    prompts: Sequence[Prompt],
    loads: Sequence[Load],
    options: RequestOptions,
    *,
    requests_per_run: int,
    rounds: int = 1,
    warmup: int = 0,
    timeout_s: float = 600,
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> list[list[RunRecord]]:
    """Every load against every target, rounds alternating the order (A B, then B A, ...).

    Each (round, target) gets prompts of its own, taken in turn from `prompts`, so neither a
    prefix cache nor an answer cache favours whichever target goes second. Returns, per load,
    one merged RunRecord per target. `progress` counts requests done of all of them.
    """
    needed = prompts_needed(len(targets), len(loads), rounds, requests_per_run, warmup)
    if len(prompts) < needed:
        raise ValueError(f"{needed} prompts needed, {len(prompts)} given")
    taken = 0

    def take(count: int) -> Sequence[Prompt]:
        nonlocal taken
        taken += count
        return prompts[taken - count:taken]

    results = []
    progress.stage("requests", needed)
    async with session(timeout_s) as http:
        for target in targets:
            if warmup:
                progress.describe(f"warm-up, {target.name}")
                await run_load(http, target, take(warmup), Load(concurrency=warmup), options, seed,
                               progress)
        for load in loads:
            merged = {t.name: RunRecord(t.name, load, [], 0.0) for t in targets}
            for round_index in range(rounds):
                order = targets if round_index % 2 == 0 else list(reversed(targets))
                for target in order:
                    progress.describe(f"{load.label}, round {round_index + 1}/{rounds}, "
                                      f"{target.name}")
                    run = await run_load(
                        http, target, take(requests_per_run), load, options, seed + round_index,
                        progress,
                    )
                    merged[target.name].records += run.records
                    merged[target.name].duration += run.duration
            results.append([merged[t.name] for t in targets])
    return results
