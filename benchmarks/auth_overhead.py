"""What authentication costs per request: two gateways, auth on and off, before one engine.

Starts two `qwenstack gateway` processes in front of the same engine, one checking an API key
(QWENSTACK_AUTH__ENABLED=true, a key made with `qwenstack keys create`) and one with auth off,
then sends small non-streaming requests one at a time, rotating over direct / auth off / auth on
so drift in the machine's speed falls on all three alike. Prints the median latency of each, the
gateway's added latency (gateway - direct) with auth off and on, and the difference.

    .venv/bin/python benchmarks/auth_overhead.py --engine http://127.0.0.1:8199 --model tiny-qwen3
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


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

    body = {"model": args.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    with tempfile.TemporaryDirectory() as tmp:
        on_home, off_home = Path(tmp, "on"), Path(tmp, "off")
        key = subprocess.run(
            [
                sys.executable,
                "-m",
                "qwenstack",
                "keys",
                "create",
                "--name",
                "bench",
                "--home",
                str(on_home),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        processes: list[subprocess.Popen[bytes]] = []
        clients = {"direct": httpx.Client(base_url=args.engine, timeout=60)}
        latencies: dict[str, list[float]] = {"direct": [], "auth off": [], "auth on": []}
        try:
            for name, home, enabled in (
                ("auth off", off_home, "false"),
                ("auth on", on_home, "true"),
            ):
                process, url = start_gateway(
                    home, args.engine, {"QWENSTACK_AUTH__ENABLED": enabled}
                )
                processes.append(process)
                clients[name] = httpx.Client(
                    base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=60
                )
            names = list(clients)
            for i in range(args.requests + 20):
                order = names[i % 3 :] + names[: i % 3]
                for name in order:
                    started = time.perf_counter()
                    response = clients[name].post("/v1/completions", json=body)
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    if i >= 20:  # the first rounds warm connections, caches and the engine
                        latencies[name].append(elapsed * 1000)
        finally:
            for client in clients.values():
                client.close()
            for process in processes:
                process.send_signal(signal.SIGTERM)
                process.wait(30)

    median = {name: statistics.median(values) for name, values in latencies.items()}
    print(f"{args.requests} non-streaming requests each (max_tokens 1), interleaved; median ms")
    for name, value in median.items():
        added = "" if name == "direct" else f"   gateway adds {value - median['direct']:+.2f} ms"
        print(f"  {name:<9} {value:7.2f}{added}")
    print(f"  auth on - auth off: {median['auth on'] - median['auth off']:+.2f} ms per request")


if __name__ == "__main__":
    main()
