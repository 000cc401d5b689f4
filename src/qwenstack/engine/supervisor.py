"""Runs vLLM server processes, waits until they serve, restarts the ones that crash.

The restart loop and the stopping of each engine's process group are processes.py's; this adds
what is particular to engines: the readiness probe and engines.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import aiohttp

from qwenstack.engine.launch import EngineLaunch
from qwenstack.engine.phases import READY, PhaseWatch, log_phase
from qwenstack.errors import SetupError
from qwenstack.processes import SupervisedProcess

log = logging.getLogger(__name__)

READY_POLL_S = 1.0
# An engine that stayed up this long is healthy again: its next crash restarts without delay.
STABLE_AFTER_S = 120.0


def _inherited(unset: tuple[str, ...]) -> dict[str, str]:
    """This process's environment without the variables a launch leaves out."""
    return {name: value for name, value in os.environ.items() if name not in unset}


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class Engine(SupervisedProcess):
    def __init__(
        self,
        launch: EngineLaunch,
        on_change: Callable[[], None],
        *,
        backoff_initial_s: float,
        backoff_max_s: float,
    ) -> None:
        super().__init__(
            f"Engine {launch.index} {launch.model} ({launch.url})", launch.argv, launch.log_path,
            env={**_inherited(launch.unset), **launch.env}, cpus=launch.cpus,
            nice=launch.nice,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s, stable_after_s=STABLE_AFTER_S,
        )
        self.launch = launch
        self.state = EngineState.STOPPED
        self.pid: int | None = None
        self.ever_ready = False
        self.ready_event = asyncio.Event()
        self._on_change = on_change

    def started(self, process: asyncio.subprocess.Process) -> None:
        self.pid, self.state = process.pid, EngineState.STARTING
        self.ready_event.clear()
        self._on_change()

    def exited(self, code: int | None, restart_in_s: float) -> None:
        self.state = EngineState.BACKOFF
        self.ready_event.clear()
        self._on_change()

    async def serving(self, process: asyncio.subprocess.Process) -> None:
        """Ready means /health answers and /v1/models lists the model. Until then, each phase
        vLLM's log shows (loading weights, compiling, ...) is one log line."""
        phases = PhaseWatch(self.launch.log_path, self.run_log_start)
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(self.launch.url, timeout=timeout) as http:
            while True:
                for phase in phases.poll():
                    if phase != READY:  # said below, once the probe agrees
                        self._log_phase(phase)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get("/health") as health:
                        if health.status == 200:
                            async with http.get("/v1/models") as models:
                                if models.status == 200 and (await models.json()).get("data"):
                                    break
                await asyncio.sleep(READY_POLL_S)
        self.state, self.ever_ready = EngineState.READY, True
        self.ready_event.set()
        self._on_change()
        self._log_phase(READY, f"at {self.launch.url}")

    def _log_phase(self, phase: str, detail: str = "") -> None:
        log_phase(
            f"Engine {self.launch.index} {self.launch.model}", phase,
            time.monotonic() - self.started_at, detail, engine=self.launch.index,
            model=self.launch.model,
        )


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
        self.engines = [
            Engine(launch, self._write_state, backoff_initial_s=backoff_initial_s,
                   backoff_max_s=backoff_max_s)
            for launch in launches
        ]
        self.state_file = state_file
        self.startup_timeout_s = startup_timeout_s
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for engine in self.engines:
            if _port_in_use(engine.launch.port):
                raise SetupError(
                    f"Port {engine.launch.port} for engine {engine.launch.index} "
                    f"({engine.launch.model}) is in use "
                    "(another engine still running?); stop it or set --engine-base-port."
                )
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self._tasks = [asyncio.create_task(e.run(self._stopping)) for e in self.engines]

    async def wait_ready(self) -> None:
        """Wait until every engine serves (each engine logs its phases meanwhile)."""
        deadline = time.monotonic() + self.startup_timeout_s
        for engine in self.engines:
            while not engine.ready_event.is_set():
                if engine.restarts and not engine.ever_ready:
                    # Usually a bad flag or model: restarting would fail the same way.
                    # The end of its log was just logged (processes.py): only where it is.
                    raise SetupError(
                        f"Engine {engine.launch.index} ({engine.launch.model}) exited while "
                        f"starting; the end of its log is above, all of it in "
                        f"{engine.launch.log_path}"
                    )
                if time.monotonic() > deadline:
                    raise SetupError(
                        f"Engine {engine.launch.index} ({engine.launch.model}) not ready after "
                        f"{self.startup_timeout_s:.0f} s; see {engine.launch.log_path}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(engine.ready_event.wait(), 1.0)

    async def stop(self) -> None:
        """Every engine gets SIGTERM at once; each loop stops its own process group."""
        self._stopping.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for engine in self.engines:
            engine.state = EngineState.STOPPED
        self._write_state()

    def _write_state(self) -> None:
        """engines.json: what `qwenstack engine status` and operators read."""
        state = [
            {
                "index": e.launch.index, "model": e.launch.model, "url": e.launch.url,
                "pid": e.pid, "state": e.state.value, "restarts": e.restarts,
                "log": str(e.launch.log_path),
            }
            for e in self.engines
        ]
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)
