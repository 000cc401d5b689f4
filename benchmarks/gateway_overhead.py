"""What the gateway costs: streaming throughput and time to first token, gateway vs direct.

Both paths hit the same engine in one run, interleaved round by round (gateway first in odd
rounds, direct first in even ones), so drift in the machine's speed falls on both alike.
Prints gateway/direct ratios per concurrency.

    .venv/bin/python benchmarks/gateway_overhead.py                 # starts a tiny-Qwen3 stack
    .venv/bin/python benchmarks/gateway_overhead.py --gateway http://127.0.0.1:8000 \\
        --engine http://127.0.0.1:8100 --model NAME --api-key sk-qs-...   # a running stack

The gateway runs as deployed (API key checked, limits, metrics, usage records); the answer
cache is bypassed with `cache-control: no-cache`, so the relay itself is what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    ttfts: list[float] = field(default_factory=list)


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict, run: Run) -> None:
    started = time.perf_counter()
    first = None
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            if first is None:
                first = time.perf_counter()
            run.tokens += 1  # one event per token: vLLM streams each token as it is sampled
    run.ttfts.append((first or time.perf_counter()) - started)


async def measure(session: aiohttp.ClientSession, url: str, body: dict, concurrency: int, requests: int) -> Run:
    run = Run()
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            await one_stream(session, url, body, run)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - started
    return run


async def benchmark(args: argparse.Namespace) -> None:
    body = {
        "model": args.model, "prompt": "The history of the city of Paris begins",
        "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
    }
    targets = {"gateway": f"{args.gateway}/v1/completions", "direct": f"{args.engine}/v1/completions"}
    connector = aiohttp.TCPConnector(limit=0)
    # no-cache: the gateway relays the engine's answer (and stores it) instead of replaying it.
    headers = {"cache-control": "no-cache"}
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600), headers=headers
    ) as session:
        for name, url in targets.items():  # warm up connections and the engine
            await measure(session, url, body, 4, 8)
        print(f"{'conc':>4} {'gw tok/s':>9} {'direct tok/s':>12} {'tput ratio':>10} "
              f"{'gw TTFT ms':>10} {'direct TTFT ms':>14} {'TTFT +ms':>8}")
        for concurrency in args.concurrency:
            requests = max(args.min_requests, 2 * concurrency)
            runs: dict[str, list[Run]] = {name: [] for name in targets}
            for round_index in range(args.rounds):
                order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
                for name in order:
                    runs[name].append(await measure(session, targets[name], body, concurrency, requests))
            tput = {n: sum(r.tokens for r in rs) / sum(r.seconds for r in rs) for n, rs in runs.items()}
            ttft = {n: statistics.median(t for r in rs for t in r.ttfts) * 1000 for n, rs in runs.items()}
            print(f"{concurrency:>4} {tput['gateway']:>9.0f} {tput['direct']:>12.0f} "
                  f"{tput['gateway'] / tput['direct']:>10.3f} {ttft['gateway']:>10.1f} "
                  f"{ttft['direct']:>14.1f} {ttft['gateway'] - ttft['direct']:>+8.1f}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(gateway: str) -> bool:
    try:
        with urllib.request.urlopen(f"{gateway}/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def tiny_stack(args: argparse.Namespace) -> Iterator[None]:
    """`qwenstack up` on the tiny Qwen3 test model, with a home of its own, for the benchmark."""
    model = subprocess.run(
        [sys.executable, "-m", "qwenstack", "test-model"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    shared = Path(os.environ.get("QWENSTACK_HOME", Path.home() / ".cache" / "qwenstack"))
    with tempfile.TemporaryDirectory(prefix="qwenstack-bench-") as home:
        for name in ("engine-venv", "models"):  # reuse the installed engine and built models
            (Path(home) / name).symlink_to(shared / name)
        qwenstack = [sys.executable, "-m", "qwenstack"]
        args.api_key = subprocess.run(
            [*qwenstack, "keys", "create", "--name", "bench", "--home", home],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        gateway_port, engine_port = _free_port(), _free_port()
        args.gateway, args.engine, args.model = (
            f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{engine_port}", "tiny-qwen3"
        )
        process = subprocess.Popen(
            [*qwenstack, "up", "--home", home, "--model", model, "--served-model-name", "tiny-qwen3",
             "--port", str(gateway_port), "--engine-base-port", str(engine_port),
             "--max-model-len", "1024", "--kv-cache-gib", "1", "--enforce-eager"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "QWENSTACK_LOG_LEVEL": "warning"},
        )
        try:
            deadline = time.monotonic() + 900
            while not _ready(args.gateway):
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the stack did not come up")
                time.sleep(1)
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="gateway base URL; unset: start a tiny-Qwen3 stack")
    parser.add_argument("--engine", help="the engine's own base URL")
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=4, help="per path; the order alternates")
    parser.add_argument("--min-requests", type=int, default=16, help="per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--api-key", default=os.environ.get("QWENSTACK_API_KEY"),
                        help="for a running gateway with auth on (default: $QWENSTACK_API_KEY)")
    args = parser.parse_args()
    if bool(args.gateway) != bool(args.engine):
        parser.error("give both --gateway and --engine, or neither")
    with contextlib.ExitStack() as stack:
        if not args.gateway:
            stack.enter_context(tiny_stack(args))
        asyncio.run(benchmark(args))


if __name__ == "__main__":
    main()
