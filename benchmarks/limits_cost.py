"""What per-caller limits add to a request: gateways with limits off, on in-process, on in Redis,
each with and without a token limit (which counts prompt tokens with the engine's /tokenize).

Sequential 1-token chat completions (`qwenstack bench`'s load generator), configurations
interleaved round by round (the order reversing, so no configuration always goes first); prints
the median and p90 latency per configuration, of a bare /tokenize call, and of the limiter's
store operations alone.

    .venv/bin/python benchmarks/limits_cost.py --engine http://127.0.0.1:8199 --model tiny-qwen3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from qwenstack import bench
from qwenstack.bench.datasets import Prompt
from qwenstack.bench.report import distribution_ms
from qwenstack.gateway.limit_stores import MemoryStore, Quota, RedisStore

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
    # Auth off: every caller is anonymous and gets the default limits measured here.
    env = {**os.environ, "QWENSTACK_AUTH__ENABLED": "false",
           "QWENSTACK_LIMITS__KEY_PREFIX": f"bench-{port}:",
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default="http://127.0.0.1:8199")
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gateways = {name: start(args.engine, limits, Path(tmp)) for name, limits in CONFIGS.items()}
        try:
            # One request per configuration and round, the order reversing every round.
            prompts = [Prompt("Tell me about Paris.", 1)] * bench.prompts_needed(
                len(CONFIGS), 1, args.rounds, 1, warmup=5)
            summaries, _ = bench.benchmark(
                [bench.Target(name, url) for name, (_, url) in gateways.items()], prompts,
                [bench.Load(concurrency=1)], bench.RequestOptions(model=args.model, stream=False),
                requests_per_run=1, rounds=args.rounds, warmup=5,
            )
            tokenize = []
            with httpx.Client(timeout=60) as client:
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    client.post(f"{args.engine}/tokenize", json={
                        "model": args.model,
                        "messages": [{"role": "user", "content": "Tell me about Paris."}],
                    })
                    tokenize.append(time.perf_counter() - started)
        finally:
            for process, _ in gateways.values():
                process.terminate()
                process.wait(30)
    if any(s["errors"] for s in summaries):
        sys.exit(f"requests failed: {[s['error_kinds'] for s in summaries]}")
    base = summaries[0]["e2e_ms"]["median"]  # "off"
    for s in summaries:
        e2e = s["e2e_ms"]
        print(f"{s['target']:28s} median {e2e['median']:7.2f} ms  p90 {e2e['p90']:7.2f} ms"
              f"  (+{e2e['median'] - base:.2f} ms vs off)")
    bare = distribution_ms(tokenize)
    print(f"{'bare /tokenize':28s} median {bare['median']:7.2f} ms  p90 {bare['p90']:7.2f} ms")
    asyncio.run(store_costs())


async def store_costs(rounds: int = 2000) -> None:
    """acquire + settle of one request with all three limits, without HTTP around them."""
    quota = Quota(10**9, 10**9, 10**9)
    stores = {"memory": MemoryStore(max_buckets=10_000),
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
