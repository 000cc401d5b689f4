"""Runs vLLM server processes, waits until they serve, restarts the ones that crash.

Each engine runs in its own session (process group): vLLM forks an EngineCore process, and a
crash of the API server must not leave that child holding memory, so signals go to the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import aiohttp

from qwenstack.engine.launch import EngineLaunch
from qwenstack.errors import SetupError

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0
READY_POLL_S = 1.0
# An engine that stayed up this long is healthy again: its next crash restarts without delay.
STABLE_AFTER_S = 120.0


class EngineState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass
class Engine:
    launch: EngineLaunch
    state: EngineState = EngineState.STOPPED
    pid: int | None = None
    restarts: int = 0
    ever_ready: bool = False
    started_at: float = 0.0
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)

    def log_tail(self, lines: int = 1) -> str:
        try:
            with self.launch.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                tail = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(line[-300:] for line in tail[-lines:])


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Supervisor:
    def __init__(
        self,
        launches: list[EngineLaunch],
        state_file: Path,
        *,
        startup_timeout_s: float,
        backoff_initial_s: float,
        backoff_max_s: float,
    ) -> None:
        self.engines = [Engine(launch) for launch in launches]
        self.state_file = state_file
        self.startup_timeout_s = startup_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._stopping = asyncio.Event()
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for engine in self.engines:
            if _port_in_use(engine.launch.port):
                raise SetupError(
                    f"Port {engine.launch.port} for engine {engine.launch.index} is in use "
                    "(another engine still running?); stop it or set --engine-base-port."
                )
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self._tasks = [asyncio.create_task(self._keep_running(e)) for e in self.engines]

    async def wait_ready(self, on_progress: Callable[[Engine, float], None] | None = None) -> None:
        """Wait until every engine serves, reporting progress every few seconds."""
        deadline = time.monotonic() + self.startup_timeout_s
        for engine in self.engines:
            while not engine.ready_event.is_set():
                if engine.restarts and not engine.ever_ready:
                    # Usually a bad flag or model: restarting would fail the same way.
                    raise SetupError(
                        f"Engine {engine.launch.index} exited while starting; the end of "
                        f"{engine.launch.log_path}:\n{engine.log_tail(15)}"
                    )
                if time.monotonic() > deadline:
                    raise SetupError(
                        f"Engine {engine.launch.index} not ready after {self.startup_timeout_s:.0f}"
                        f" s; see {engine.launch.log_path}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(engine.ready_event.wait(), 5.0)
                if on_progress and not engine.ready_event.is_set():
                    on_progress(engine, time.monotonic() - engine.started_at)

    async def stop(self) -> None:
        self._stopping.set()
        for process in self._processes.values():
            _signal_group(process.pid, signal.SIGTERM)
        for process in list(self._processes.values()):
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("Engine pid %d ignored SIGTERM for %.0f s; killing", process.pid, STOP_GRACE_S)
            _signal_group(process.pid, signal.SIGKILL)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for engine in self.engines:
            engine.state = EngineState.STOPPED
        self._write_state()

    async def _keep_running(self, engine: Engine) -> None:
        backoff = self.backoff_initial_s
        launch = engine.launch
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        while not self._stopping.is_set():
            with launch.log_path.open("ab") as log_file:
                process = await asyncio.create_subprocess_exec(
                    *launch.argv,
                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    env={**os.environ, **launch.env}, start_new_session=True,
                )
            self._processes[launch.index] = process
            engine.pid, engine.state, engine.started_at = process.pid, EngineState.STARTING, time.monotonic()
            engine.ready_event.clear()
            self._write_state()
            log.info("Engine %d started (pid %d, %s, log %s)", launch.index, process.pid, launch.url, launch.log_path)

            probe = asyncio.create_task(self._mark_ready(engine))
            code = await process.wait()
            probe.cancel()
            # The API server is gone; its EngineCore child may not be.
            _signal_group(process.pid, signal.SIGKILL)
            del self._processes[launch.index]
            if self._stopping.is_set():
                return
            if time.monotonic() - engine.started_at > STABLE_AFTER_S:
                backoff = self.backoff_initial_s
            engine.state, engine.restarts = EngineState.BACKOFF, engine.restarts + 1
            engine.ready_event.clear()
            self._write_state()
            log.error(
                "Engine %d (pid %d) exited with code %s; restart %d in %.0f s (log %s)",
                launch.index, process.pid, code, engine.restarts, backoff, launch.log_path,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    async def _mark_ready(self, engine: Engine) -> None:
        """Ready means /health answers and /v1/models lists the model."""
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(engine.launch.url, timeout=timeout) as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get("/health") as health:
                        if health.status == 200:
                            async with http.get("/v1/models") as models:
                                if models.status == 200 and (await models.json()).get("data"):
                                    break
                await asyncio.sleep(READY_POLL_S)
        engine.state, engine.ever_ready = EngineState.READY, True
        engine.ready_event.set()
        self._write_state()
        log.info(
            "Engine %d ready after %.1f s at %s",
            engine.launch.index, time.monotonic() - engine.started_at, engine.launch.url,
        )

    def _write_state(self) -> None:
        """engines.json: what `qwenstack engine status` and operators read."""
        state = [
            {
                "index": e.launch.index, "url": e.launch.url, "pid": e.pid, "state": e.state.value,
                "restarts": e.restarts, "log": str(e.launch.log_path),
            }
            for e in self.engines
        ]
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)
