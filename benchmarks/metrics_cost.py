"""What metrics cost the gateway: per request (the finisher) and per scrape (the /metrics page).

    .venv/bin/python benchmarks/metrics_cost.py --engine http://127.0.0.1:8100

Per request: the metrics finisher on a finished streamed exchange, the only work metrics add to
a request. Per scrape: merging N copies of the engine's real /metrics page under `replica`
labels (done off the event loop), and rendering the gateway's own registry (on it).
"""

from __future__ import annotations

import argparse
import time
import urllib.request
from collections.abc import Coroutine

from prometheus_client import REGISTRY
from prometheus_client.exposition import generate_latest

from qwenstack.callers import Caller
from qwenstack.gateway import metrics
from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.protocol import InferenceRequest


def per_request_us(requests: int) -> float:
    callers = [Caller(f"key-{i}") for i in range(20)]
    exchanges = []
    for i in range(requests):
        exchange = Exchange(str(i), InferenceRequest("/v1/chat/completions", {"stream": True}))
        exchange.model, exchange.caller = "tiny-qwen3", callers[i % len(callers)]
        exchange.status, exchange.finished_s, exchange.first_chunk_s = 200, 1.5, 0.05
        exchange.prompt_tokens, exchange.completion_tokens = 120, 240
        metrics.track(exchange)
        exchanges.append(exchange)
    started = time.perf_counter()
    for exchange in exchanges:
        for finisher in exchange._finishers:
            _drive(finisher(exchange))
    return (time.perf_counter() - started) / requests * 1e6


def _drive(coroutine: Coroutine[object, object, None]) -> None:
    """Run a coroutine that never awaits, without an event loop's overhead in the timing."""
    try:
        coroutine.send(None)
    except StopIteration:
        pass


def per_scrape_ms(page: str, replicas: int, rounds: int) -> tuple[float, float]:
    pages = [(str(i), page) for i in range(replicas)]
    started = time.perf_counter()
    for _ in range(rounds):
        metrics.relabel_engine_metrics(pages)
    engines = (time.perf_counter() - started) / rounds * 1000
    started = time.perf_counter()
    for _ in range(rounds):
        generate_latest(REGISTRY)
    own = (time.perf_counter() - started) / rounds * 1000
    return engines, own


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", required=True, help="a vLLM engine's base URL")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print(f"per request: {per_request_us(args.requests):.1f} us (metrics finisher)")
    with urllib.request.urlopen(f"{args.engine}/metrics", timeout=10) as response:
        page = response.read().decode()
    for replicas in args.replicas:
        engines, own = per_scrape_ms(page, replicas, rounds=20)
        print(
            f"per scrape, {replicas} engine(s): {engines:.1f} ms merging vLLM pages "
            f"(off the loop), {own:.1f} ms rendering the gateway registry ({len(page)} B/engine)"
        )


if __name__ == "__main__":
    main()
