"""What an answer-cache hit saves: the same greedy request answered by the engine and by the cache.

For each form (plain JSON, stream) and answer length, one request at a time, interleaved round by
round: the engine directly, the gateway refreshing the cache (`cache-control: no-cache`: engine
answer relayed and stored, the miss path), and the gateway answering from the cache (a hit).
Prints median latency to the last byte, in ms, side by side.

    .venv/bin/python benchmarks/cache_hit.py                 # starts a tiny-Qwen3 stack
    .venv/bin/python benchmarks/cache_hit.py --gateway http://127.0.0.1:8000 \\
        --engine http://127.0.0.1:8100 --model NAME        # an already running stack
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid

import aiohttp

from gateway_overhead import tiny_stack


async def latency(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> float:
    started = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as response:
        response.raise_for_status()
        await response.read()
        cache = response.headers.get("x-qwenstack-cache")
    if "cache-control" not in headers and cache not in (None, "hit"):
        raise RuntimeError(f"expected a cache hit, got {cache!r}")
    return time.perf_counter() - started


async def benchmark(args: argparse.Namespace) -> None:
    print(f"{'form':>6} {'tokens':>6} {'engine ms':>10} {'gw miss ms':>10} {'gw hit ms':>10} {'engine/hit':>10}")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for stream in (False, True):
            for max_tokens in args.max_tokens:
                body = {
                    "model": args.model, "prompt": f"Benchmark {uuid.uuid4().hex}: the history of Paris",
                    "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream,
                }
                paths = {
                    "engine": (f"{args.engine}/v1/completions", {}),
                    "miss": (f"{args.gateway}/v1/completions", {"cache-control": "no-cache"}),
                    "hit": (f"{args.gateway}/v1/completions", {}),
                }
                for name in ("engine", "miss"):  # warm up; the miss stores the entry hits replay
                    url, headers = paths[name]
                    await latency(session, url, body, headers)
                times: dict[str, list[float]] = {name: [] for name in paths}
                for round_index in range(args.rounds):
                    order = list(paths) if round_index % 2 == 0 else list(reversed(paths))
                    for name in order:
                        url, headers = paths[name]
                        times[name].append(await latency(session, url, body, headers))
                ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
                print(f"{'stream' if stream else 'json':>6} {max_tokens:>6} {ms['engine']:>10.2f} "
                      f"{ms['miss']:>10.2f} {ms['hit']:>10.2f} {ms['engine'] / ms['hit']:>9.0f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="gateway base URL; unset: start a tiny-Qwen3 stack")
    parser.add_argument("--engine", help="the engine's own base URL")
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--rounds", type=int, default=30, help="requests per path and case")
    args = parser.parse_args()
    if bool(args.gateway) != bool(args.engine):
        parser.error("give both --gateway and --engine, or neither")
    with contextlib.ExitStack() as stack:
        if not args.gateway:
            stack.enter_context(tiny_stack(args))
        asyncio.run(benchmark(args))


if __name__ == "__main__":
    main()
