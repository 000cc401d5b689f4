"""qwenstack's own commands started by forking a process that has imported them already.

`python -m qwenstack gateway` spends 2.3-2.5 s of CPU on imports (FastAPI, SQLAlchemy, ...)
before any code a test is about runs, a fork 0.5 s, and the tests start well over a hundred
such processes on two cores. So the run keeps one fork host, which every test process uses: a
Python process that has imported qwenstack's commands and forks a child per command. The child
takes the command's arguments, environment, working directory and output files, runs
`qwenstack`'s command line, and exits as `python -m qwenstack` would (SystemExit through the
interpreter's own exit: threads joined, atexit run).

Only the imports came first. qwenstack reads its settings when a command runs, but a library
that reads the environment at import (huggingface_hub's HF_HUB_OFFLINE, say) has read the
host's, which is the run's first process's: a test whose subject is such a setting, or the
start of a process itself (the console's, the shared stack's `up`), runs `python -m qwenstack`.

Multiprocessing's fork server is the same idea, but one per process with one list of modules,
and the gateway's parse workers (rag/parse_worker.py) have it.

Run as a script, this file is the host: `python forkhost.py SOCKET` makes SOCKET once it has
imported, then serves one JSON request per connection and answers the child's pid, then, when
the child has ended, its exit code (negative: the signal that ended it, as subprocess says).
It ends when its standard input closes, as when the run's first process, which started it,
ends, or when that process stops it (`stop_host`) before removing the run's folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The commands, and what a gateway or `kb` command imports on its first knowledge-base request:
# the knowledge bases (Milvus's client, jieba) and the local embedder's library (14 s of CPU
# here, for torch and transformers). Imports only, no torch computation: the threads they start
# (jemalloc's in pyarrow, OpenBLAS's) are ones those libraries rebuild after a fork.
PRELOADED = ("qwenstack.cli", "qwenstack.gateway.app", "qwenstack.stack", "qwenstack.rag.service",
             "sentence_transformers")


class Forked:
    """A command forked by the host: the part of subprocess.Popen the tests use."""

    def __init__(self, args: list[str], connection: socket.socket) -> None:
        self.args = args
        self.returncode: int | None = None
        self._answers = connection.makefile("rb")
        connection.close()  # the file holds the socket open
        self.pid = self._read()

    def poll(self) -> int | None:
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int:
        if (code := self._collect(timeout)) is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, number: int) -> None:
        if self.poll() is None:  # not yet reaped: the pid is still the child's
            with contextlib.suppress(ProcessLookupError):  # reaped since, as Popen allows
                os.kill(self.pid, number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _collect(self, timeout: float | None) -> int | None:
        # The host sends the exit code and closes the connection: the socket is then readable
        # (at its end, if the code was read into the buffer with the pid).
        if self.returncode is None and select.select([self._answers], [], [], timeout)[0]:
            self.returncode = self._read()
            self._answers.close()
        return self.returncode

    def _read(self) -> int:
        line = self._answers.readline()
        if not line:
            raise RuntimeError(f"the fork host ended before {self.args} did (its error is in "
                               "the test run's output)")
        return int(line)


def start(
    args: list[str], *, stdout: Path, stderr: Path | None = None,
    env: dict[str, str] | None = None, cwd: Path | None = None,
) -> Forked:
    """`qwenstack ARGS`, its output written to `stdout` (and `stderr`, else the same file),
    which exist, empty, on return (as with Popen and files opened for it)."""
    for path in (stdout, stderr):
        if path:
            path.write_bytes(b"")
    request = json.dumps({
        "args": [os.fspath(arg) for arg in args], "env": dict(os.environ if env is None else env),
        "cwd": os.path.abspath(cwd or os.getcwd()),
        "stdout": os.path.abspath(stdout), "stderr": os.path.abspath(stderr or stdout),
    }).encode() + b"\n"
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(_host_socket())
    except ConnectionRefusedError:
        raise RuntimeError("the fork host has ended (its error is in the test run's "
                           "output)") from None
    connection.sendall(request)
    return Forked(["qwenstack", *args], connection)


def run(
    args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
    timeout: float | None = None, check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`qwenstack ARGS` to its end, its output captured as text: subprocess.run's result, and
    its CalledProcessError with `check`."""
    with tempfile.TemporaryDirectory(prefix="qwenstack-run-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = start(args, stdout=out, stderr=err, env=env, cwd=cwd)
        try:
            code = process.wait(timeout)
        except BaseException:  # a timeout, the test's time limit, ^C: the command ends too
            process.kill()
            process.wait()
            raise
        done = subprocess.CompletedProcess(process.args, code, out.read_text(), err.read_text())
    if check:
        done.check_returncode()
    return done


def start_host(folder: Path) -> None:
    """Starts the run's host, its socket in `folder`, from the run's first process (the one
    that starts the test processes, or runs the tests itself), in a thread: its imports then
    overlap the first tests. The test processes find it by the environment they inherit."""
    path = os.fspath(folder / "forkhost.socket")
    os.environ[HOST_VARIABLE] = path
    threading.Thread(target=_run_host, args=(path,), daemon=True).start()


# The host's socket, in every test process's environment.
HOST_VARIABLE = "QWENSTACK_TEST_FORK_HOST"
# Beside the socket when the host could not start (its error is in the run's output).
FAILED_SUFFIX = ".failed"
# Within a test's time limit (pytest-timeout's 300 s), so that a test says what it waited for.
HOST_START_TIMEOUT_S = 240


_host: subprocess.Popen[bytes] | None = None
_stopping = threading.Event()


def _run_host(path: str) -> None:
    global _host
    # Its standard input closes, and it ends, when this process does.
    _host = subprocess.Popen([sys.executable, __file__, path], stdin=subprocess.PIPE)
    _host.wait()
    if not _stopping.is_set():  # it failed, or was killed (the OOM killer, say)
        with contextlib.suppress(OSError):  # the run's folder gone: the run has ended
            Path(path + FAILED_SUFFIX).write_text(str(_host.returncode))


def stop_host() -> None:
    """Ends the host now, before the run's folder goes: a short run may end while it imports."""
    _stopping.set()
    if _host is not None:
        _host.kill()
        _host.wait()


def _host_socket() -> str:
    """The run's host, once it has imported (it makes its socket then)."""
    path = os.environ[HOST_VARIABLE]
    deadline = time.monotonic() + HOST_START_TIMEOUT_S
    while not os.path.exists(path):
        if os.path.exists(path + FAILED_SUFFIX) or time.monotonic() > deadline:
            raise RuntimeError("the fork host did not start (its error is in the test run's "
                               "output)")
        time.sleep(0.1)
    return path


def _serve(path: str) -> None:
    import gc
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)
    # The imported objects out of the garbage collector's reach: a child's collections would
    # otherwise write to every one of them, copying the host's memory page by page (a forked
    # `qwenstack config` took 2.0 s of CPU with them, 0.45 s without).
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path + ".binding")
    except FileNotFoundError:  # the run's folder is gone: the run ended while this imported
        return
    listener.listen(64)
    os.rename(path + ".binding", path)  # it exists, for the test processes, once it listens
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears it
    children: dict[int, socket.socket] = {}
    while True:
        readable = select.select([listener, wakeup_read, sys.stdin], [], [])[0]
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            return  # the run's first process has ended
        if wakeup_read in readable:
            os.read(wakeup_read, 4096)
            _report_ended(children)
        if listener in readable:
            connection = listener.accept()[0]
            try:
                with connection.makefile("rb") as lines:
                    request = json.loads(lines.readline())
                pid = os.fork()
            except (OSError, ValueError):  # a client gone before its request, no fork to be had
                connection.close()
                continue
            if pid == 0:
                signal.set_wakeup_fd(-1)
                for inherited in (listener, connection, *children.values()):
                    inherited.close()
                for fd in (wakeup_read, wakeup_write):
                    os.close(fd)
                _become(request)  # returns only by SystemExit, as `python -m qwenstack` does
            children[pid] = connection
            with contextlib.suppress(OSError):  # its client gone: the child runs on, reaped
                connection.sendall(b"%d\n" % pid)


def _report_ended(children: dict[int, socket.socket]) -> None:
    while children and (ended := os.waitpid(-1, os.WNOHANG))[0]:
        with children.pop(ended[0]) as connection, contextlib.suppress(OSError):
            # OSError: the test process no longer listens (it has ended, or dropped the child)
            connection.sendall(b"%d\n" % os.waitstatus_to_exitcode(ended[1]))


def _become(request: dict) -> None:
    # Named for its command ("qs gateway", "qs keys"): ps and a CPU profile of the run tell the
    # children apart, whose command lines are all the host's.
    command = request["args"][0] if request["args"] else ""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(f"qs {command}"[:15])
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _redirect(0, os.devnull, os.O_RDONLY)
    _redirect(1, request["stdout"], os.O_WRONLY)
    if request["stderr"] == request["stdout"]:
        os.dup2(1, 2)  # one open file: neither stream's writes overwrite the other's
    else:
        _redirect(2, request["stderr"], os.O_WRONLY)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["qwenstack", *request["args"]]
    from qwenstack.cli import app

    app(args=request["args"], prog_name="qwenstack")
    sys.exit(0)  # typer exits by itself; never back into the host's loop


def _redirect(fd: int, path: str, flags: int) -> None:
    opened = os.open(path, flags)
    os.dup2(opened, fd)
    os.close(opened)


if __name__ == "__main__":
    _serve(sys.argv[1])  # its folder is the run's, removed at the run's end
