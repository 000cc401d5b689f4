"""What an answer-cache hit saves: the same greedy request answered by the engine and by the cache.

For each form (plain JSON, stream) and answer length, one request at a time, interleaved round by
round (the order reversing every round): the engine directly, the gateway refreshing the cache
(`cache-control: no-cache`: engine answer relayed and stored, the miss path), and the gateway
answering from the cache (a hit). Prints median latency to the last byte, in ms, side by side.

    .venv/bin/python benchmarks/cache_hit.py                 # starts a tiny-Qwen3 stack
    .venv/bin/python benchmarks/cache_hit.py --gateway http://127.0.0.1:8000 \\
        --engine http://127.0.0.1:8100 --model NAME [--api-key sk-qs-...]   # a running stack
"""

from __future__ import annotations

import argparse
import contextlib
import os
import urllib.request
import uuid

from gateway_overhead import tiny_stack

from qwenstack import bench
from qwenstack.bench.datasets import Prompt


def cache_header(url: str, body: bytes, headers: dict[str, str]) -> str | None:
    request = urllib.request.Request(
        url, data=body, headers={**headers, "content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        return response.headers.get("x-qwenstack-cache")


def benchmark(args: argparse.Namespace) -> None:
    auth = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    targets = [
        bench.Target("engine", args.engine),
        bench.Target("miss", args.gateway, {**auth, "cache-control": "no-cache"}),
        bench.Target("hit", args.gateway, auth),
    ]
    print(f"{'form':>6} {'tokens':>6} {'engine ms':>10} {'gw miss ms':>10} {'gw hit ms':>10} "
          f"{'engine/hit':>10}")
    for stream in (False, True):
        for max_tokens in args.max_tokens:
            options = bench.RequestOptions(model=args.model, api="completions", stream=stream,
                                           temperature=0)
            prompt = Prompt(f"Benchmark {uuid.uuid4().hex}: the history of Paris", max_tokens)
            # Warm-up goes engine, miss (which stores the entry hits replay), hit.
            summaries, _ = bench.benchmark(
                targets, [prompt] * bench.prompts_needed(3, 1, args.rounds, 1, warmup=1),
                [bench.Load(concurrency=1)], options, requests_per_run=1, rounds=args.rounds,
                warmup=1,
            )
            if cache_header(f"{args.gateway}/v1/completions", options.body(prompt), auth) != "hit":
                raise SystemExit("the gateway did not answer from its cache: is cache.enabled on?")
            ms = {s["target"]: s["e2e_ms"]["median"] for s in summaries}
            print(f"{'stream' if stream else 'json':>6} {max_tokens:>6} {ms['engine']:>10.2f} "
                  f"{ms['miss']:>10.2f} {ms['hit']:>10.2f} {ms['engine'] / ms['hit']:>9.0f}x",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway", help="gateway base URL; unset: start a tiny-Qwen3 stack")
    parser.add_argument("--engine", help="the engine's own base URL")
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--rounds", type=int, default=30, help="requests per path and case")
    parser.add_argument("--api-key", default=os.environ.get("QWENSTACK_API_KEY"),
                        help="for a running gateway with auth on (default: $QWENSTACK_API_KEY)")
    args = parser.parse_args()
    if bool(args.gateway) != bool(args.engine):
        parser.error("give both --gateway and --engine, or neither")
    with contextlib.ExitStack() as stack:
        if not args.gateway:
            stack.enter_context(tiny_stack(args))
        benchmark(args)


if __name__ == "__main__":
    main()
