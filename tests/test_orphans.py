"""`qwenstack up` leaves nothing behind however it dies (issue 12): SIGKILLed under load, as the
OOM killer would, its engine (vLLM's API server and the engine core it spawned) ends with it,
and neither its gateway port nor its engine port is left listening."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from conftest import start_stack

GONE_WITHIN_S = 5.0  # the bound the issue sets


def _session_members(session: int) -> set[int]:
    """Live processes (zombies are not: they hold no memory, port or socket) in a session."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # Fields after the command's closing parenthesis: state, ppid, pgrp, session.
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
            if int(sid) == session and state != "Z":
                members.add(int(stat.parent.name))
    return members


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on `port` (state 0A in /proc/net/tcp and tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].rsplit(":", 1)[1] == f"{port:04X}" and fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


@contextlib.contextmanager
def _load(base_url: str, headers: dict[str, str], clients: int = 4) -> Iterator[None]:
    """Completions sent back to back from a few threads, errors ignored (the stack dies)."""
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(timeout=30, headers=headers) as client:
            while not stop.is_set():
                try:
                    client.post(f"{base_url}/v1/completions", json={
                        "model": "tiny-qwen3", "prompt": "hello", "max_tokens": 200,
                        "ignore_eos": True})
                except httpx.HTTPError:
                    stop.wait(0.1)  # refused once the stack is gone: no busy loop

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def _wait_for_running_requests(engine_url: str, timeout_s: float = 60) -> None:
    """Until the engine is generating for some request (the stack is then under load)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in httpx.get(f"{engine_url}/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:num_requests_running{") and float(line.split()[-1]) > 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"no request running at {engine_url}")


def test_sigkilled_up_leaves_no_engine_and_no_listener(tiny_qwen3: Path, tmp_path: Path) -> None:
    # Its own stack: the session's is shared by the other tests, and this one is killed.
    stack = start_stack(
        tmp_path, "--model", str(tiny_qwen3), "--served-model-name", "tiny-qwen3",
        "--max-model-len", "1024", "--kv-cache-gib", "1", "--enforce-eager",
    )
    session = stack.engine_state()[0]["pid"]  # the engine runs in a session of its own
    ports = [int(url.rsplit(":", 1)[1]) for url in (stack.gateway, stack.engine)]
    try:
        engine_processes = _session_members(session)
        assert len(engine_processes) >= 2, engine_processes  # vLLM's server and engine core
        # No engine process holds the gateway's listening socket.
        gateway_listener = _listening_inodes(ports[0])
        assert gateway_listener
        for pid in engine_processes:
            assert not _socket_inodes(pid) & gateway_listener, pid

        with _load(stack.gateway, stack.auth):
            _wait_for_running_requests(stack.engine)
            stack.process.send_signal(signal.SIGKILL)
            deadline = time.monotonic() + GONE_WITHIN_S
            while True:
                listening = [port for port in ports if _listening_inodes(port)]
                remaining = _session_members(session)
                if not listening and not remaining:
                    break
                assert time.monotonic() < deadline, (listening, remaining)
                time.sleep(0.1)
    finally:
        if stack.process.poll() is None:
            stack.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)  # what the old code left running
