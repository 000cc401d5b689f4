"""What the gateway costs: streaming throughput and time to first token, gateway vs direct.

Both paths hit the same engine in one run, interleaved round by round (gateway first in odd
rounds, direct first in even ones), so drift in the machine's speed falls on both alike.
Prints gateway/direct ratios per concurrency.

    .venv/bin/python benchmarks/gateway_overhead.py                 # starts a tiny-Qwen3 stack
    .venv/bin/python benchmarks/gateway_overhead.py --gateway http://127.0.0.1:8000 \\
        --engine http://127.0.0.1:8100 --model NAME --api-key sk-qs-...   # a running stack

The gateway runs as deployed (API key checked, limits, metrics, usage records); the answer
cache is bypassed with `cache-control: no-cache`, so the relay itself is what is measured.
The measuring is `qwenstack bench --compare` (src/qwenstack/bench); this script sizes each level
(16 requests per round and path, 2 x the concurrency above 8). One level by hand:

    qwenstack bench http://127.0.0.1:8000 --compare http://127.0.0.1:8100 --name gateway \\
        --compare-name direct --api completions --input-len 16 --output-len 64 \\
        --concurrency 32 --num-prompts 64 --rounds 4 --warmup 32 \\
        --header 'cache-control: no-cache' --api-key sk-qs-...
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from qwenstack import bench
from qwenstack.bench import datasets, report


def benchmark(args: argparse.Namespace) -> None:
    # no-cache: the gateway relays the engine's answer (and stores it) instead of replaying it.
    gateway_headers = {"cache-control": "no-cache"}
    if args.api_key:
        gateway_headers["authorization"] = f"Bearer {args.api_key}"
    targets = [
        bench.Target("gateway", args.gateway, gateway_headers),
        bench.Target("direct", args.engine),
    ]
    all_summaries, all_ratios = [], []
    for concurrency in args.concurrency:  # each level interleaved on its own, sized to its load
        requests = max(args.min_requests, 2 * concurrency)
        count = bench.prompts_needed(len(targets), 1, args.rounds, requests, warmup=concurrency)
        summaries, ratios = bench.benchmark(
            targets,
            datasets.random_prompts(count, args.input_len, args.max_tokens, seed=concurrency),
            [bench.Load(concurrency=concurrency)],
            bench.RequestOptions(model=args.model, api="completions"),
            requests_per_run=requests, rounds=args.rounds, warmup=concurrency,
        )
        all_summaries += summaries
        all_ratios += ratios
    print(report.table(all_summaries))
    print()
    print(report.ratio_table(all_ratios))
    if args.json:
        report.write_json(args.json, {"model": args.model, "rounds": args.rounds,
                                      "targets": {t.name: t.base_url for t in targets}},
                          all_summaries, all_ratios)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(gateway: str) -> bool:
    try:
        with urllib.request.urlopen(f"{gateway}/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def tiny_stack(args: argparse.Namespace) -> Iterator[None]:
    """`qwenstack up` on the tiny Qwen3 test model, with a home of its own, for the benchmark."""
    model = subprocess.run(
        [sys.executable, "-m", "qwenstack", "test-model"],
        capture_output=True, text=True, check=True,
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
        gateway_port, engine_port = free_port(), free_port()
        args.gateway, args.engine, args.model = (
            f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{engine_port}", "tiny-qwen3"
        )
        process = subprocess.Popen(
            [*qwenstack, "up", "--home", home, "--model", model,
             "--served-model-name", "tiny-qwen3",
             "--port", str(gateway_port), "--engine-base-port", str(engine_port),
             "--max-model-len", "1024", "--kv-cache-gib", "1", "--enforce-eager"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "QWENSTACK_LOG_LEVEL": "warning"},
        )
        try:
            deadline = time.monotonic() + 900
            while not ready(args.gateway):
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the stack did not come up")
                time.sleep(1)
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway", help="gateway base URL; unset: start a tiny-Qwen3 stack")
    parser.add_argument("--engine", help="the engine's own base URL")
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=4, help="per path; the order alternates")
    parser.add_argument("--min-requests", type=int, default=16,
                        help="per round and path; at least 2 x the concurrency")
    parser.add_argument("--input-len", type=int, default=16, help="prompt words (about tokens)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--api-key", default=os.environ.get("QWENSTACK_API_KEY"),
                        help="for a running gateway with auth on (default: $QWENSTACK_API_KEY)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    if bool(args.gateway) != bool(args.engine):
        parser.error("give both --gateway and --engine, or neither")
    with contextlib.ExitStack() as stack:
        if not args.gateway:
            stack.enter_context(tiny_stack(args))
        benchmark(args)


if __name__ == "__main__":
    main()
