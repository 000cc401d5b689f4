"""`qwenstack up` with no model on a CPU machine serves the bundled SmolLM2-135M-Instruct; then,
SIGKILLed under load, it leaves no engine and no listener behind.

This module's stack is the suite's only boot of the bundled model; its last test kills it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from helpers import Stack, start_stack, wait_for

MODEL = "SmolLM2-135M-Instruct"
GONE_WITHIN_S = 5.0  # the bound issue 12 sets
# The first test's fixture prepares the bundled model and boots vLLM on it: minutes on a CPU.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("default"), "--kv-cache-gib", "1")
    yield stack
    if stack.process.poll() is None:  # the module's last test kills it
        assert stack.stop() == 0, stack.log.read_text()[-5000:]


def test_bundled_model_knows_the_capital_of_france(default_stack: Stack):
    client = openai.OpenAI(base_url=f"{default_stack.gateway}/v1", api_key=default_stack.key)
    [model] = client.models.list().data
    assert model.id == MODEL
    answer = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in answer.choices[0].message.content
    assert "serving the bundled SmolLM2-135M-Instruct" in default_stack.log.read_text()


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
                        "model": MODEL, "prompt": "hello", "max_tokens": 200,
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


def _requests_running(engine_url: str) -> bool:
    """Whether the engine is generating for some request (the stack is then under load)."""
    return any(
        line.startswith("vllm:num_requests_running{") and float(line.split()[-1]) > 0
        for line in httpx.get(f"{engine_url}/metrics", timeout=10).text.splitlines()
    )


def test_sigkilled_up_leaves_no_engine_and_no_listener(default_stack: Stack) -> None:
    """`up` leaves nothing behind however it dies (issue 12): SIGKILLed under load, as the OOM
    killer would, its engine (vLLM's API server and the engine core it spawned) ends with it, and
    neither its gateway port nor its engine port is left listening. Last in this module: it
    ends the module's stack."""
    stack = default_stack
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
            wait_for(lambda: _requests_running(stack.engine), "a request running", 60)
            stack.process.send_signal(signal.SIGKILL)
            wait_for(
                lambda: not any(_listening_inodes(port) for port in ports)
                and not _session_members(session),
                "no listener and no engine process left", GONE_WITHIN_S,
            )
    finally:
        if stack.process.poll() is None:
            stack.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)  # what the old code left running
