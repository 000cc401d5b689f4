"""A child process kept running: restarted with a doubling backoff, stopped with its group.

Engines, the chat UI and gateway worker processes all run this way. Each child runs in its own
session (process group): vLLM forks an EngineCore process, and a crash of the API server must
not leave that child holding memory, so signals go to the group. Each is started through
lifeline.py, which kills its group when this process ends without stopping it (SIGKILL, the OOM
killer): no engine, UI or gateway worker outlives the process that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from qwenstack import lifeline as lifeline_script

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0  # after SIGTERM, before SIGKILL
LIFELINE_SCRIPT = Path(lifeline_script.__file__)
_lifeline_read_end: int | None = None


def _lifeline() -> int:
    """The read end of this process's lifeline pipe, which every child's lifeline.py watches.

    Nothing writes to it, and the write end is never closed nor inherited (os.pipe's ends are
    not inheritable and children are started with close_fds): it closes when this process ends.
    """
    global _lifeline_read_end
    if _lifeline_read_end is None:
        _lifeline_read_end, _ = os.pipe()
    return _lifeline_read_end


def log_tail(path: Path, lines: int, start: int = 0) -> str:
    """The last lines of a log file (each cut to 300 characters), read from its last 16 KiB
    and not before byte `start` (where one run's output began)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 16384))
            tail = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(line[-300:] for line in tail[-lines:])


def failure(code: int | None, tail: str) -> tuple[int | None, str]:
    """What a crash looks like, to tell a repeat from a new failure: the exit code and the
    output's last line with its numbers blanked (pids, times and ports change every run)."""
    last = tail.rsplit("\n", 1)[-1]
    return code, re.sub(r"\d+", "#", last)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class SupervisedProcess:
    """One command, run until a stop event; subclasses hook in at start, while up, and at exit."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        cpus: Sequence[int] = (),
        nice: int = 0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        stable_after_s: float = 60.0,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path  # None: the output goes where this process's goes
        self.env = dict(env) if env is not None else None  # None: this process's environment
        self.cwd = cwd
        self.cpus = tuple(cpus)  # empty: every CPU this process may use
        self.nice = nice  # added to its niceness, and its session's (lifeline.py)
        self.stop_grace_s = stop_grace_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        # A process that ran this long is healthy again: its next crash restarts without delay.
        self.stable_after_s = stable_after_s
        self.restarts = 0
        self.started_at = 0.0
        self.run_log_start = 0  # where the current run's output begins in the log file
        self._last_failure: tuple[int | None, str] | None = None

    def log_tail(self, lines: int = 1) -> str:
        return log_tail(self.log_path, lines) if self.log_path else ""

    def started(self, process: asyncio.subprocess.Process) -> None:
        """Called as each run starts."""

    async def serving(self, process: asyncio.subprocess.Process) -> None:
        """Runs beside each run (e.g. a readiness probe); cancelled when the process exits."""

    def exited(self, code: int | None, restart_in_s: float) -> None:
        """Called after a run ended on its own, before the backoff."""

    async def run(self, stop: asyncio.Event) -> None:
        """Start the process, restart it whenever it exits, until `stop` is set."""
        backoff = self.backoff_initial_s
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        while not stop.is_set():
            lifeline = _lifeline()
            with (self.log_path.open("ab") if self.log_path
                  else contextlib.nullcontext(None)) as log_file:
                self.run_log_start = log_file.tell() if log_file else 0
                # -I: the lifeline's Python ignores the command's PYTHON* variables.
                cpus = ",".join(map(str, self.cpus)) or lifeline_script.ALL_CPUS
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-I", str(LIFELINE_SCRIPT), str(lifeline), cpus,
                    str(self.nice), *self.argv,
                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT if log_file else None, env=self.env,
                    cwd=self.cwd, start_new_session=True, pass_fds=(lifeline,),
                )
            self.started_at = time.monotonic()
            log.info("%s started (pid %d, log %s)", self.name, process.pid,
                     self.log_path or "with this process's")
            self.started(process)
            watch = asyncio.create_task(self.serving(process))
            exited = asyncio.create_task(process.wait())
            stopping = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait((exited, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (watch, exited, stopping):
                    task.cancel()
                await self._stop(process)
            if stop.is_set():
                return
            if time.monotonic() - self.started_at > self.stable_after_s:
                backoff = self.backoff_initial_s
                self._last_failure = None  # a crash after a good run shows its log again
            self.restarts += 1
            self._report_exit(process, backoff)
            self.exited(process.returncode, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    def _report_exit(self, process: asyncio.subprocess.Process, backoff_s: float) -> None:
        """The end of the log once per failure: a crash loop repeating the same failure says
        one line per restart, not the same traceback every time."""
        tail = log_tail(self.log_path, 20, self.run_log_start) if self.log_path else ""
        seen, self._last_failure = self._last_failure, failure(process.returncode, tail)
        if seen == self._last_failure:
            log.error(
                "%s exited with code %s again: restart %d in %.0f s (same failure, see %s)",
                self.name, process.returncode, self.restarts, backoff_s, self.log_path,
            )
            return
        log.error(
            "%s (pid %d) exited with code %s; restart %d in %.0f s. Its log (%s) ends:\n%s",
            self.name, process.pid, process.returncode, self.restarts, backoff_s,
            self.log_path, tail,
        )

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM to the group, SIGKILL after a grace period; the group is killed even when the
        process itself has exited, since its children may not have."""
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_grace_s)
            except TimeoutError:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.0f s; killing",
                    self.name, process.pid, self.stop_grace_s,
                )
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()
