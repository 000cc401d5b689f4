"""The gateway's memory growth for a 200 MB body a non-admin key announces to /admin/keys.

    PYTHONPATH=src .venv/bin/python benchmarks/announced_body_memory.py

Starts a gateway (no engine needed: /admin answers without one), creates a non-admin key, sends
the head announcing 200 MB and then the body, 1 MB at a time, until the gateway answers; reports
the answer, how much of the body was sent, and the gateway's resident memory before and at its
peak (sampled after each megabyte). Run it against another checkout with its `src` on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ANNOUNCED = 200_000_000
CHUNK = b" " * 1_000_000


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1])  # type: ignore[index]


def admin_key(log: Path, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text()
        if "startup complete" in text and (match := re.search(r"sk-qs-[A-Za-z0-9_-]+", text)):
            return match[0]
        time.sleep(0.2)
    raise TimeoutError(log.read_text()[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=18780)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="announced-body-"))
    log = home / "gateway.log"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "qwenstack", "gateway", "--engine-url", "http://127.0.0.1:1",
         "--port", str(args.port), "--home", str(home)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=os.environ,
    )
    try:
        url = f"http://127.0.0.1:{args.port}"
        tenant = httpx.post(f"{url}/admin/keys", json={"name": "tenant"},
                            headers={"authorization": f"Bearer {admin_key(log)}"}).json()["key"]
        before = peak = rss_kib(gateway.pid)
        sent = 0
        with socket.create_connection(("127.0.0.1", args.port), timeout=60) as sock:
            sock.sendall(
                f"POST /admin/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tenant}\r\n"
                f"content-type: application/json\r\ncontent-length: {ANNOUNCED}\r\n\r\n".encode())
            try:
                while sent < ANNOUNCED and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(CHUNK)
                    sent += len(CHUNK)
                    peak = max(peak, rss_kib(gateway.pid))
            except OSError:
                pass  # closed by the gateway once it answered
            answer = sock.recv(4096).split(b"\r\n")[0].decode()
        peak = max(peak, rss_kib(gateway.pid))
        print(f"answer: {answer}; body sent: {sent / 1e6:.0f} MB of {ANNOUNCED / 1e6:.0f} MB; "
              f"RSS {before / 1024:.0f} MiB before, {peak / 1024:.0f} MiB at peak "
              f"(growth {(peak - before) / 1024:.0f} MiB)")
    finally:
        gateway.terminate()
        gateway.wait(30)


if __name__ == "__main__":
    main()
