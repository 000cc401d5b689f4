"""The session stack's two real vLLM engines (tiny Qwen3, prefix caching on) behind gateways of
these tests' own: routing policies (through one gateway or two), an engine killed under load, a
gateway stopped under load.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import HTTP, Stack, refused, request_log, start_gateway, wait_for

from qwenstack.gateway.protocol import CHAT, InferenceRequest
from qwenstack.gateway.replicas import Replica
from qwenstack.gateway.routing import rendezvous
from qwenstack.settings import RoutingSettings

MODEL = "tiny-qwen3"
# Blocks of 256 prompt bytes, as the gateway hashes them; vLLM caches in blocks of tokens.
SYSTEM = "You answer questions about the weather of mountain villages, briefly and politely. " * 6


def gateway_for(tmp: Path, stack: Stack, **settings: str):
    first, *rest = stack.engines
    extra = [arg for url in rest for arg in ("--engine-url", url)]
    env = {f"QWENSTACK_{name.upper()}": value for name, value in settings.items()}
    gateway = start_gateway(tmp, first, *extra, env=env)
    wait_for(lambda: all(e["up"] for e in HTTP.get(f"{gateway.url}/ready").json()["engines"]),
             "both engines up", 60)
    return gateway


@dataclass
class Outcome:
    request_id: str
    started: float
    status: int
    ttft_s: float | None
    text: str
    error: dict | None  # the OpenAI-shaped error, as a body or a stream's error event


def stream_chat(client: httpx.Client, base_url: str, messages: list[dict], max_tokens: int = 8,
                on_answer: Callable[[], object] = lambda: None, **extra) -> Outcome:
    """A streamed chat completion, read to the end; never raises for the server's failures.
    `on_answer` is called once the gateway answers 200 (it has accepted the request)."""
    request_id = uuid.uuid4().hex
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, **extra}
    started = time.monotonic()
    ttft, parts, error = None, [], None
    try:
        with client.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                           headers={"x-request-id": request_id}) as response:
            if response.status_code != 200:
                return Outcome(request_id, started, response.status_code, None, "",
                               json.loads(response.read())["error"])
            on_answer()
            done = False
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                if ttft is None:
                    ttft = time.monotonic() - started
                parts.extend(c["delta"].get("content") or "" for c in event["choices"])
            status = 200 if done and error is None else 502
    except httpx.TransportError as exc:
        return Outcome(request_id, started, 0, ttft, "", {"message": repr(exc)})
    return Outcome(request_id, started, status, ttft, "".join(parts), error)


def prefix_cache_counts(stack: Stack) -> tuple[float, float]:
    """Summed vLLM prefix-cache (hits, queries) in tokens, over both engines."""
    hits = queries = 0.0
    for url in stack.engines:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total{"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total{"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def homes(stack: Stack, salt: str, conversations: int) -> list[int]:
    """The replica (index in the engines' order) each conversation's start hashes to."""
    replicas = [Replica(url) for url in stack.engines]
    return [stack.engines.index(rendezvous(start(system(salt, i), question(0, i)), replicas)[0].url)
            for i in range(conversations)]


def conversation_salt(stack: Stack, conversations: int) -> str:
    """A fresh salt (so no run hits what an earlier one left in the prefix caches) under which
    the conversations' starts hash to both replicas, so that where each goes says something."""
    while True:
        salt = uuid.uuid4().hex
        if len(set(homes(stack, salt, conversations))) == len(stack.engines):
            return salt


def system(salt: str, i: int) -> dict:
    return {"role": "system", "content": f"{salt} {i}. {SYSTEM}"}


def question(turn: int, i: int) -> dict:
    return {"role": "user", "content": f"Turn {turn}: and in village {i}?"}


def start(*messages: dict) -> bytes:
    """A conversation's start as the gateway hashes it (default settings)."""
    routing = RoutingSettings()
    return InferenceRequest(CHAT, {"messages": list(messages)}).conversation_start(
        routing.prefix_prompt_bytes, routing.prefix_max_bytes)


def conversations_workload(gateways: list, salt: str, conversations: int = 7, turns: int = 3):
    """Multi-turn chats, interleaved turn by turn (every conversation's first turn, then every
    second turn...), one request at a time, each turn to the next gateway in turn. An odd number
    of conversations, so that round robin does not send each one's turns to the same replica by
    coincidence. `salt` starts every prompt. Returns the replica indexes (the same for every
    gateway: all list the engines in one order) that served each conversation's turns."""
    chats = [[system(salt, i)] for i in range(conversations)]
    served: dict[int, list[int]] = {i: [] for i in range(conversations)}
    outcomes = []
    with httpx.Client(timeout=120) as client:
        for turn in range(turns):
            for i, chat in enumerate(chats):
                gateway = gateways[(turn + i) % len(gateways)]
                chat.append(question(turn, i))
                outcome = stream_chat(client, gateway.url, chat)
                assert outcome.status == 200, outcome
                chat.append({"role": "assistant", "content": outcome.text})
                served[i].append(request_log(gateway.log, outcome.request_id)["replica"])
                outcomes.append(outcome)
    return served, outcomes


@pytest.mark.engine_exclusive  # reads the replicas' prefix-cache counters
def test_prefix_aware_keeps_conversations_on_their_replica_across_gateways_and_hits_the_cache(
    tmp_path: Path, stack: Stack
):
    """Round robin, prefix-aware routing through one gateway, and through two gateways that
    take turns: a conversation's turns go to one replica however many gateways they pass, so
    two gateways hit the prefix cache as often as one."""
    figures = {}
    for name, policy, count in (("round_robin", "round_robin", 1),
                                ("prefix_aware", "prefix_aware", 1),
                                ("prefix_aware_two_gateways", "prefix_aware", 2)):
        # One pepper, as gateways in front of shared engines must have: the prefix-cache salt
        # of a caller (an HMAC under it) is then the same whichever gateway sends its turn.
        gateways = [gateway_for(tmp_path / f"{name}-{n}", stack, routing__policy=policy,
                                auth__pepper="one pepper for every gateway")
                    for n in range(count)]
        salt = conversation_salt(stack, 7)
        try:
            before = prefix_cache_counts(stack)
            served, outcomes = conversations_workload(gateways, salt)
            after = prefix_cache_counts(stack)
        finally:
            for gateway in gateways:
                gateway.stop()
        ttfts = sorted(o.ttft_s for o in outcomes)
        hits, queries = after[0] - before[0], after[1] - before[1]
        figures[name] = {
            "ttft_median_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p95_ms": round(statistics.quantiles(ttfts, n=20)[-1] * 1000, 1),
            "prefix_cache_hit_rate": round(hits / queries, 3),
            "ttfts_ms": [round(t * 1000) for t in ttfts],
            "served": served,
            "homes": homes(stack, salt, 7),
        }
    print("\nrouting figures:", json.dumps({p: {k: v for k, v in f.items()
                                                if k not in ("served", "homes")}
                                           for p, f in figures.items()}))
    # Every turn of a conversation went to the replica its start hashes to (through either
    # gateway), and both replicas took some.
    for name in ("prefix_aware", "prefix_aware_two_gateways"):
        served, home = figures[name]["served"], figures[name]["homes"]
        assert all(replicas == [home[i]] * 3 for i, replicas in served.items()), figures[name]
    round_robin_served = figures["round_robin"]["served"]
    assert any(len(set(replicas)) > 1 for replicas in round_robin_served.values())
    one, two = (figures[name]["prefix_cache_hit_rate"]
                for name in ("prefix_aware", "prefix_aware_two_gateways"))
    assert one > figures["round_robin"]["prefix_cache_hit_rate"], figures
    assert two >= 0.9 * one, figures


@pytest.mark.engine_exclusive  # spreads load over both replicas
def test_least_outstanding_spreads_concurrent_load(tmp_path: Path, stack: Stack):
    gateway = gateway_for(tmp_path, stack, routing__policy="least_outstanding")
    try:
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(
                lambda i: stream_chat(client, gateway.url, [{"role": "user", "content": f"{i}"}],
                                      max_tokens=64, ignore_eos=True),
                range(12),
            ))
        assert all(o.status == 200 for o in outcomes), outcomes
        replicas = Counter(request_log(gateway.log, o.request_id)["replica"] for o in outcomes)
        assert set(replicas) == {0, 1} and min(replicas.values()) >= 3, replicas
    finally:
        gateway.stop()


class SteadyLoad:
    """Clients sending short streamed chats back to back, each outcome kept, until stopped."""

    def __init__(self, base_url: str, clients: int = 3, max_tokens: int = 32) -> None:
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)

    def _run(self, client_index: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                messages = [{"role": "user", "content": f"client {client_index} request {n}"}]
                self.outcomes.append(stream_chat(client, self.base_url, messages,
                                                 max_tokens=self.max_tokens, ignore_eos=True))

    def wait_for_more(self, count: int, timeout_s: float = 300) -> None:
        target = len(self.outcomes) + count
        wait_for(lambda: len(self.outcomes) >= target, f"{count} more requests done", timeout_s)


@pytest.mark.disruptive
def test_killed_engine_is_ejected_then_restarted_and_taken_back(tmp_path: Path, stack: Stack):
    """SIGKILL one engine under load: only requests already at it may fail (with an OpenAI
    error); once the health check has taken it out, none does; a gateway with no other engine
    answers 503 at once; the supervisor restarts it and it takes load again.

    The suite's one engine restart: it runs last in its module (`disruptive`), with the shared
    stack's engines to itself."""
    victim = stack.engines[-1]
    killed_pid = stack.pid(victim)
    gateway = gateway_for(tmp_path / "both", stack, routing__policy="least_outstanding")
    alone = start_gateway(tmp_path / "alone", victim)  # no other engine to turn to
    ready = f"{gateway.url}/ready"
    try:
        with SteadyLoad(gateway.url) as load:
            load.wait_for_more(6)
            killed_at = time.monotonic()
            os.killpg(killed_pid, signal.SIGKILL)
            unavailable = _first_refusal(alone.url)
            refused_after_s = time.monotonic() - killed_at
            wait_for(lambda: not HTTP.get(ready).json()["engines"][-1]["up"], "ejected", 30)
            ejected_at = time.monotonic()
            load.wait_for_more(10)
        assert unavailable.status_code == 503, unavailable.text
        assert unavailable.json()["error"]["code"] == "engine_unavailable"
        assert unavailable.headers["retry-after"]
        # Seconds: the health check runs every second; a killed vLLM may leave its listening
        # socket to a dying child for a moment, and this machine may be busy.
        assert refused_after_s < 15
        assert ejected_at - killed_at < 15
        failed = [o for o in load.outcomes if o.status != 200]
        for outcome in failed:
            assert outcome.started < ejected_at, outcome  # after ejection, nothing fails
            assert outcome.error and outcome.error.get("message"), outcome  # a clear error
        # The supervisor restarts it; the health check takes it back, and it serves again.
        wait_for(lambda: HTTP.get(ready).json()["engines"][-1]["up"], "back in rotation", 600)
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(
                lambda i: stream_chat(client, gateway.url, [{"role": "user", "content": f"{i}"}],
                                      max_tokens=32, ignore_eos=True), range(8)))
        assert all(o.status == 200 for o in outcomes), outcomes
        replicas = {request_log(gateway.log, o.request_id)["replica"] for o in outcomes}
        assert replicas == {0, 1}
        [restarted] = [e for e in stack.engine_state() if e["url"] == victim]
        assert restarted["restarts"] == 1 and restarted["pid"] != killed_pid
        assert "exited with code" in stack.log.read_text()
    finally:
        alone.stop()
        gateway.stop()


def _first_refusal(gateway_url: str, timeout_s: float = 30) -> httpx.Response:
    """The first chat answer that is not a 200, from a gateway whose only engine was killed."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            response = client.post(f"{gateway_url}/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "still there?"}],
                "max_tokens": 4})
            if response.status_code != 200:
                return response
    raise AssertionError(f"the engine still answered {timeout_s} s after it was killed")


@pytest.mark.engine_exclusive  # holds four long streams at once
def test_sigterm_lets_accepted_requests_finish_and_refuses_new_ones(
    tmp_path: Path, stack: Stack
):
    # The tiny model can write a whole answer in a burst once it has the CPU, so a round whose
    # four streams all ended before the signal proves nothing and is tried again.
    for attempt in range(3):
        gateway = gateway_for(tmp_path / str(attempt), stack, gateway__drain_timeout_s="120")
        accepted = threading.Semaphore(0)
        try:
            with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:
                streams = [
                    pool.submit(stream_chat, client, gateway.url,
                                [{"role": "user", "content": f"{i}"}], max_tokens=960,
                                ignore_eos=True, on_answer=accepted.release)
                    for i in range(4)
                ]
                for _ in streams:
                    assert accepted.acquire(timeout=60), [s.result() for s in streams if s.done()]
                if all(stream.done() for stream in streams):
                    continue
                gateway.process.send_signal(signal.SIGTERM)
                wait_for(lambda url=gateway.url: refused(url), "new connections refused", 10)
                outcomes = [stream.result() for stream in streams]
            assert gateway.process.wait(120) == 0
            for outcome in outcomes:  # every accepted one ran to its last token
                assert outcome.status == 200, outcome
                assert outcome.error is None
            return
        finally:
            if gateway.process.poll() is None:
                gateway.stop()
    pytest.fail("in three rounds every stream ended before the signal could be sent")


class BreakingEngine(BaseHTTPRequestHandler):
    """A fake engine whose streams break after the first event (the connection drops mid-way
    through a chunked body, as when a real engine dies). Fake because no real engine can be made
    to die between two given events of a stream."""

    protocol_version = "HTTP/1.1"

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # the break itself, seen by the server
            super().handle()

    def do_GET(self) -> None:
        body = b'{"object":"list","data":[{"id":"tiny-qwen3","max_model_len":1024}]}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        event = (b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,'
                 b'"delta":{"content":"Hel"}}]}\n\n')
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.flush()
        time.sleep(0.5)  # the gateway relays the event before the break
        self.close_connection = True
        self.connection.shutdown(2)

    def log_message(self, *args: object) -> None:
        pass


def test_stream_broken_mid_way_ends_with_an_error_event(tmp_path: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), BreakingEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gateway = start_gateway(tmp_path, f"http://127.0.0.1:{server.server_port}")
    try:
        with httpx.Client(timeout=30) as client:
            outcome = stream_chat(client, gateway.url, [{"role": "user", "content": "hi"}])
        assert outcome.text == "Hel"  # what came before the break was relayed
        assert outcome.status == 502 and outcome.error["type"] == "server_error", outcome
        assert outcome.error["code"] == "engine_error"  # then the stream ended, no hang
    finally:
        gateway.stop()
        server.shutdown()
