"""`qwenstack up` with no model on a CPU machine serves the bundled SmolLM2-135M-Instruct; and,
SIGKILLed, it leaves no engine and no listener behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import openai
from helpers import SMOLLM2, Stack, launch_stack, session_members, wait_for

GONE_WITHIN_S = 5.0  # the bound issue 12 sets


def test_bundled_model_knows_the_capital_of_france(stack: Stack):
    """The shared stack's SmolLM2 entry names no model, as `up` with no --model does."""
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.key)
    assert SMOLLM2 in [model.id for model in client.models.list().data]
    answer = client.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in answer.choices[0].message.content
    assert "serving the bundled SmolLM2-135M-Instruct" in stack.log.read_text()


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


def test_sigkilled_up_leaves_no_engine_and_no_listener(tmp_path: Path, tiny_qwen3: Path):
    """`up` leaves nothing behind however it dies (issue 12): SIGKILLed, as the OOM killer would,
    while its engine loads the model (vLLM's API server holding its port, the engine core it
    spawned working), the engine ends with it, and neither its gateway port nor its engine port
    is left listening. Killed before vLLM serves, the engine costs the run no boot."""
    stack = launch_stack(tmp_path, "--model", str(tiny_qwen3), "--max-model-len", "1024",
                         "--kv-cache-gib", "0.25")
    ports = [int(url.rsplit(":", 1)[1]) for url in (stack.gateway, stack.engine)]
    session = 0
    try:
        def loading() -> bool:
            nonlocal session
            with contextlib.suppress(OSError, ValueError, IndexError):
                session = stack.engine_state()[0]["pid"] or 0
            # vLLM's server and the engine core it spawned; the gateway listening.
            return bool(session) and len(session_members(session)) >= 2 and bool(
                _listening_inodes(ports[0]))

        wait_for(loading, "the engine loading, the gateway listening", 300, interval_s=0.2)
        # No engine process holds the gateway's listening socket.
        gateway_listener = _listening_inodes(ports[0])
        for pid in session_members(session):
            assert not _socket_inodes(pid) & gateway_listener, pid

        stack.process.send_signal(signal.SIGKILL)
        wait_for(
            lambda: not any(_listening_inodes(port) for port in ports)
            and not session_members(session),
            "no listener and no engine process left", GONE_WITHIN_S,
        )
    finally:
        if stack.process.poll() is None:
            stack.stop()
        if session:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session, signal.SIGKILL)  # what the old code left running
