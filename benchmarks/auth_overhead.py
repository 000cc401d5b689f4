"""What authentication costs per request: two gateways, auth on and off, before one engine.

Starts two `qwenstack gateway` processes in front of the same engine, one checking an API key
(QWENSTACK_AUTH__ENABLED=true, a key made with `qwenstack keys create`) and one with auth off,
then sends small non-streaming requests one at a time (`qwenstack bench`'s load generator),
interleaving direct / auth off / auth on so drift in the machine's speed falls on all three
alike. Prints the median latency of each, the gateway's added latency (gateway - direct) with
auth off and on, and the difference.

    .venv/bin/python benchmarks/auth_overhead.py --engine http://127.0.0.1:8199 --model tiny-qwen3
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from qwenstack import bench
from qwenstack.bench.datasets import Prompt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(
    home: Path, engine: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwenstack",
            "gateway",
            "--engine-url",
            engine,
            "--port",
            str(port),
            "--home",
            str(home),
        ],
        stdout=(home / "gateway.log").open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "QWENSTACK_LOG_LEVEL": "warning", **env},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise TimeoutError(
        f"gateway in {home} not ready:\n{(home / 'gateway.log').read_text()[-3000:]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engine", default=os.environ.get("QWENSTACK_TEST_ENGINE_URL", "http://127.0.0.1:8100")
    )
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--requests", type=int, default=300, help="per target")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        on_home, off_home = Path(tmp, "on"), Path(tmp, "off")
        key = subprocess.run(
            [sys.executable, "-m", "qwenstack", "keys", "create", "--name", "bench",
             "--home", str(on_home)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        auth = {"authorization": f"Bearer {key}"}
        processes: list[subprocess.Popen[bytes]] = []
        targets = [bench.Target("direct", args.engine)]
        try:
            for name, home, enabled in (
                ("auth off", off_home, "false"), ("auth on", on_home, "true")
            ):
                process, url = start_gateway(
                    home, args.engine, {"QWENSTACK_AUTH__ENABLED": enabled}
                )
                processes.append(process)
                targets.append(bench.Target(name, url, auth))
            # Runs of 10 requests per target, the order reversing every round; the warm-up
            # requests warm connections, caches and the engine.
            rounds = max(1, args.requests // 10)
            prompts = [Prompt("Hello", 1)] * bench.prompts_needed(3, 1, rounds, 10, warmup=20)
            summaries, _ = bench.benchmark(
                targets, prompts, [bench.Load(concurrency=1)],
                bench.RequestOptions(model=args.model, api="completions", stream=False),
                requests_per_run=10, rounds=rounds, warmup=20,
            )
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
                process.wait(30)

    if any(s["errors"] for s in summaries):
        sys.exit(f"requests failed: {[s['error_kinds'] for s in summaries]}")
    median = {s["target"]: s["e2e_ms"]["median"] for s in summaries}
    print(f"{rounds * 10} non-streaming requests each (max_tokens 1), interleaved; median ms")
    for name, value in median.items():
        added = "" if name == "direct" else f"   gateway adds {value - median['direct']:+.2f} ms"
        print(f"  {name:<9} {value:7.2f}{added}")
    print(f"  auth on - auth off: {median['auth on'] - median['auth off']:+.2f} ms per request")


if __name__ == "__main__":
    main()
