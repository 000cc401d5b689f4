"""What a person at a terminal sees (issue 16): human log lines and progress bars on a terminal,
JSON and no bars through a pipe; engine phases read from vLLM's real log; a crash loop that
says what failed once.

The terminal is a real pseudo-terminal (Python's pty): the command cannot tell it from a person's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import forkhost
import pytest
from helpers import Stack, free_port

from qwenstack.engine.phases import LOADING, ORDER, READY, PhaseWatch, phases_in
from qwenstack.processes import SupervisedProcess

HUMAN_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO |WARN |ERROR) \S")
COLOUR = re.compile(r"\x1b\[[0-9;]*3[0-9](;[0-9;]*)?m")  # a foreground colour, any style
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = "━"  # rich's bar character


def run_in_terminal(
    args: list[str], env: dict[str, str], timeout_s: float = 300, stop_on: str | None = None
) -> str:
    """Everything the command writes to its terminal (stdout and stderr both) until it exits;
    sent SIGTERM once it has written `stop_on`."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        args, stdin=terminal, stdout=terminal, stderr=terminal, env=env, start_new_session=True
    )
    os.close(terminal)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the command closed its terminal
                    break
                if not chunk:
                    break
                out += chunk
                if stop_on and stop_on.encode() in out:
                    process.terminate()
                    stop_on = None
        else:
            raise TimeoutError(f"{args} still running after {timeout_s} s:\n{out[-3000:]!r}")
        assert process.wait(30) == 0, out.decode(errors="replace")[-3000:]
    finally:
        process.kill()
        os.close(controller)
    return out.decode(errors="replace")


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQuAD-style file of three paragraphs, for `kb eval`: long work with log lines."""
    paragraphs = [
        ("Paris is the capital of France. It lies on the Seine.", "What is France's capital?"),
        ("Berlin is the capital of Germany. It lies on the Spree.", "What is Germany's capital?"),
        ("Madrid is the capital of Spain. It lies on the Manzanares.", "Which city is Spain's?"),
    ]
    data = {"data": [{"title": "capitals", "paragraphs": [
        {"id": f"p{number}", "context": context,
         "qas": [{"question": question, "answers": [{"text": context.split()[0]}]}]}
        for number, (context, question) in enumerate(paragraphs)
    ]}]}
    path = tmp_path_factory.mktemp("squad") / "capitals.json"
    path.write_text(json.dumps(data))
    return path


def screen_lines(screen: str) -> list[str]:
    """The lines as they stay on the screen: escapes dropped, a redrawn line's last state."""
    return [ANSI.sub("", line).split("\r")[-1] for line in screen.replace("\r\n", "\n").split("\n")]


def _kb_eval(squad_file: Path, home: Path) -> tuple[list[str], dict[str, str]]:
    """`qwenstack kb eval`'s arguments, and an environment that would colour a terminal."""
    env = {**os.environ, "QWENSTACK_HOME": str(home), "COLUMNS": "120", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    env.pop("QWENSTACK_OBSERVABILITY__LOG_FORMAT", None)
    return ["kb", "eval", str(squad_file)], env


def test_a_terminal_gets_short_coloured_lines_and_progress_bars(
    squad_file: Path, tmp_path: Path
) -> None:
    args, env = _kb_eval(squad_file, tmp_path)
    screen = run_in_terminal([sys.executable, "-m", "qwenstack", *args], env)
    assert COLOUR.search(screen), screen[-2000:]  # xterm-256color has colour
    assert BAR in screen and "embedding chunks" in screen, screen[-2000:]
    lines = screen_lines(screen)
    logged = [line for line in lines if HUMAN_LINE.match(line)]
    assert any("Ingested 3 chunks" in line for line in logged), lines
    assert not any(line.lstrip().startswith('{"ts"') for line in lines)
    assert any(line.startswith("MODE") for line in lines)  # the result table, after the bars


def test_a_pipe_or_file_gets_json_lines_and_no_bars(squad_file: Path, tmp_path: Path) -> None:
    """Forked (forkhost.py), with its output to files: no terminal, as through a pipe."""
    args, env = _kb_eval(squad_file, tmp_path)
    result = forkhost.run(args, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(entry["message"].startswith("Ingested 3 chunks") for entry in logged)
    for stream in (result.stdout, result.stderr):
        assert BAR not in stream and "\r" not in stream and "\x1b[" not in stream


def test_no_color_is_honoured(tmp_path: Path) -> None:
    """The gateway alone, in front of an engine that is not there, stopped once it is up."""
    env = {**os.environ, "QWENSTACK_HOME": str(tmp_path), "TERM": "xterm-256color",
           "NO_COLOR": "1", "QWENSTACK_AUTH__ENABLED": "false"}
    screen = run_in_terminal(
        [sys.executable, "-m", "qwenstack", "gateway", "--engine-url", "http://127.0.0.1:9",
         "--port", str(free_port())], env, timeout_s=120, stop_on="Stop with Ctrl-C.",
    )
    lines = screen_lines(screen)
    assert any(HUMAN_LINE.match(line) and line.endswith("Stopping") for line in lines), screen
    assert not COLOUR.search(screen), screen


def test_engine_phases_from_vllms_real_log(stack: Stack) -> None:
    """The phase table against the log of the engine the test stack booted, and `up`'s own
    output (JSON here, no terminal): one line per phase, in order, ending in ready."""
    log = (stack.home / "logs" / "engine-0.log").read_bytes()
    found = phases_in(log.decode(errors="replace").splitlines())
    assert found == [phase for phase in ORDER if phase in found], found
    assert found[0] == LOADING and found[-1] == READY, found

    # Read in pieces that cut lines anywhere, as a log still being written is: the same phases.
    copy = stack.home / "engine-copy.log"
    copy.write_bytes(b"")
    watch, seen = PhaseWatch(copy, 0), []
    for start in range(0, len(log), 997):
        with copy.open("ab") as f:
            f.write(log[start:start + 997])
        seen += watch.poll()
    assert seen == found

    said = [entry for line in stack.log.read_text().splitlines() if line.startswith("{")
            if "phase" in (entry := json.loads(line)) and entry.get("engine") == 0]
    # The engine's last boot: the disruptive test, in another test process, may have
    # restarted it before this test ran.
    phases = [entry["phase"] for entry in said]
    last_boot = phases[len(phases) - 1 - phases[::-1].index(LOADING):]
    assert last_boot == [p for p in ORDER if p in found], said
    assert all(entry["elapsed_s"] >= 0 for entry in said)
    assert "Waiting for engine" not in stack.log.read_text()


CRASHER = """
import pathlib, sys
count = pathlib.Path(sys.argv[1])
run = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(run))
print(f"run {run}: a long traceback", flush=True)
raise SystemExit("disk full" if run <= 3 else "port taken")
"""


def test_a_crash_loop_shows_each_failure_once(tmp_path: Path, caplog) -> None:
    """Runs 1-3 fail one way, 4-5 another: the log's end is shown at runs 1 and 4 only."""
    process = SupervisedProcess(
        "crasher", [sys.executable, "-c", CRASHER, str(tmp_path / "count")],
        tmp_path / "crasher.log", backoff_initial_s=0.01, backoff_max_s=0.01,
    )

    async def crash_five_times() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(process.run(stop))
        deadline = time.monotonic() + 60
        while process.restarts < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stop.set()
        await task

    caplog.set_level(logging.INFO, logger="qwenstack.processes")
    asyncio.run(crash_five_times())
    exits = [r.getMessage() for r in caplog.records if "exited with code" in r.getMessage()]
    assert len(exits) >= 5, exits
    shown = [message for message in exits[:5] if "ends:" in message]
    assert len(shown) == 2, exits
    assert "run 1: a long traceback" in shown[0] and "disk full" in shown[0]
    # Only that run's output: the earlier runs' lines are not repeated.
    assert "run 4: a long traceback" in shown[1] and "disk full" not in shown[1]
    for number in (2, 3, 5):
        assert exits[number - 1].count("\n") == 0, exits[number - 1]
        assert f"restart {number} in" in exits[number - 1]
        assert f"same failure, see {tmp_path / 'crasher.log'}" in exits[number - 1]
