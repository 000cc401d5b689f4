"""What per-caller limits add to a request: gateways with limits off, on in-process, on in Redis,
each with and without a token limit (which counts prompt tokens with the engine's /tokenize).

Sequential 1-token chat completions, configurations interleaved round by round (the order
rotating, so no configuration always goes first); prints the median and p90 latency per
configuration, of a bare /tokenize call, and of the limiter's store operations alone.

    .venv/bin/python benchmarks/limits_cost.py --engine http://127.0.0.1:8199 --model tiny-qwen3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from qwenstack.gateway.limits import MemoryStore, Quota, RedisStore

HIGH = "1000000000"  # limits that never refuse: the cost of checking them, not of refusals
CONFIGS = {
    "off": {},
    "memory rpm+concurrency": {"DEFAULT_RPM": HIGH, "DEFAULT_MAX_CONCURRENCY": HIGH},
    "memory rpm+tpm+concurrency": {"DEFAULT_RPM": HIGH, "DEFAULT_TPM": HIGH,
                                   "DEFAULT_MAX_CONCURRENCY": HIGH},
    "redis rpm": {"DEFAULT_RPM": HIGH, "REDIS_URL": "redis://127.0.0.1:6379/0"},
    "redis rpm+tpm+concurrency": {"DEFAULT_RPM": HIGH, "DEFAULT_TPM": HIGH,
                                  "DEFAULT_MAX_CONCURRENCY": HIGH,
                                  "REDIS_URL": "redis://127.0.0.1:6379/0"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(engine: str, limits: dict[str, str], home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "QWENSTACK_LIMITS__KEY_PREFIX": f"bench-{port}:",
           **{f"QWENSTACK_LIMITS__{k}": v for k, v in limits.items()}}
    process = subprocess.Popen(
        [sys.executable, "-m", "qwenstack", "gateway", "--engine-url", engine, "--port", str(port),
         "--home", str(home)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.3)


def p(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default="http://127.0.0.1:8199")
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    body = {"model": args.model, "messages": [{"role": "user", "content": "Tell me about Paris."}],
            "max_tokens": 1}
    with tempfile.TemporaryDirectory() as tmp:
        gateways = {name: start(args.engine, limits, Path(tmp)) for name, limits in CONFIGS.items()}
        times: dict[str, list[float]] = {name: [] for name in [*CONFIGS, "bare /tokenize"]}
        try:
            with httpx.Client(timeout=60) as client:
                order = list(gateways.items())
                for round_ in range(args.rounds):
                    shift = round_ % len(order)
                    for name, (_, url) in order[shift:] + order[:shift]:
                        started = time.perf_counter()
                        client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
                        times[name].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    client.post(f"{args.engine}/tokenize",
                                json={"model": args.model, "messages": body["messages"]})
                    times["bare /tokenize"].append(time.perf_counter() - started)
        finally:
            for process, _ in gateways.values():
                process.terminate()
                process.wait(30)
    base = statistics.median(times["off"]) * 1000
    for name, values in times.items():
        median = statistics.median(values) * 1000
        extra = f"  (+{median - base:.2f} ms vs off)" if name != "bare /tokenize" else ""
        print(f"{name:28s} median {median:7.2f} ms  p90 {p(values, 0.9):7.2f} ms{extra}")
    asyncio.run(store_costs())


async def store_costs(rounds: int = 2000) -> None:
    """acquire + settle of one request with all three limits, without HTTP around them."""
    quota = Quota(10**9, 10**9, 10**9)
    stores = {"memory": MemoryStore(),
              "redis": RedisStore("redis://127.0.0.1:6379/0", f"bench-{os.getpid()}:", 1, 60)}
    for name, store in stores.items():
        started = time.perf_counter()
        for i in range(rounds):
            await store.acquire("bench", quota, 100, str(i))
            await store.settle("bench", quota, 10, str(i))
        per_request_us = (time.perf_counter() - started) / rounds * 1e6
        print(f"store {name:22s} acquire+settle {per_request_us:8.1f} us")
        await store.close()


if __name__ == "__main__":
    main()
