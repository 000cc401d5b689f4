"""Each uploaded file parsed in a worker process of its own, under CPU-time and memory limits.

A hostile file (a zip bomb, input that keeps a parser busy for minutes) then costs that worker,
not the gateway: the gateway's event loop keeps answering (a parser holds the GIL, so a thread
is not enough) and its memory stays its own. A worker killed by a limit refuses the upload with
a 413 naming the limit; one that outlives the wall-clock backstop without reaching a limit (its
CPU taken by other processes) with a 503.

Workers fork from multiprocessing's fork server, a small process that has the parsers imported
already and none of the gateway's threads or memory: a worker starts in milliseconds. The fork
server ends by itself when the process that started it does.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import threading
from multiprocessing.connection import Connection

from qwenstack.rag import RagError
from qwenstack.rag.parsers import Section, parse
from qwenstack.settings import RagSettings

_CONTEXT = multiprocessing.get_context("forkserver")
# "__main__" too: imported once in the fork server, rather than by every worker. Not openpyxl:
# it imports numpy, whose ~100 MB of address space (OpenBLAS's buffers) would then count against
# every worker's rag.parse_memory_bytes; an XLSX's worker imports it (0.3 s of CPU time).
_CONTEXT.set_forkserver_preload(["__main__", "qwenstack.rag.parsers", "bs4", "pypdf", "pptx"])

# A worker's outcome: its sections, or a RagError's (message, status, code).
_Outcome = list[Section] | tuple[str, int, str]


class ParseWorkers:
    """Parses files in worker processes, at most `limits.parse_workers` at once."""

    def __init__(self, limits: RagSettings) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.parse_workers)

    def parse(self, name: str, data: bytes) -> list[Section]:
        """parsers.parse in a worker; blocks, so the gateway calls it from a thread."""
        with self._slots:
            return _parse_in_worker(name, data, self.limits)


def _parse_in_worker(name: str, data: bytes, limits: RagSettings) -> list[Section]:
    ours, theirs = _CONTEXT.Pipe()
    worker = _CONTEXT.Process(target=_work, args=(theirs, limits), name="qwenstack-parse",
                              daemon=True)
    # Wall time as a backstop (CPU time is what the limit counts): room for a busy machine,
    # whose other processes share the cores. It covers handing the file over too, which waits
    # on the worker reading it: a worker that never does is killed, and the send ends.
    wall_s = 2 * limits.parse_cpu_seconds + 10
    expired = threading.Event()

    def backstop() -> None:
        expired.set()
        worker.kill()

    outcome: _Outcome | None = None
    with ours:
        with theirs:
            worker.start()
        # `theirs` closed once started: the worker's copy is then the only one, and its death
        # reads as end of file here.
        timer = threading.Timer(wall_s, backstop)
        timer.start()
        try:
            ours.send(name)
            ours.send_bytes(data)  # not pickled: no second copy of the file in the gateway
            outcome = ours.recv()
        except (OSError, EOFError):  # a broken pipe, or end of file even mid-answer
            pass  # the worker ended without an answer: killed by a limit or the backstop
        finally:
            timer.cancel()
            timer.join()  # a kill under way is done before the worker is reaped
            if worker.is_alive():
                worker.kill()
            worker.join()
    if isinstance(outcome, list):
        return outcome
    if outcome is not None:
        message, status, code = outcome
        raise RagError(message, status=status, code=code)
    if expired.is_set():  # our own kill, within the CPU limit: the machine is short of CPU
        raise RagError(
            f"{name}: parsing did not finish within {wall_s} s while the server was busy "
            f"(it used less than rag.parse_cpu_seconds, {limits.parse_cpu_seconds} s of CPU "
            "time); try again later.", status=503, code="parse_timeout", retry_after_s=10,
        )
    if worker.exitcode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise RagError(
            f"{name}: parsing took more than {limits.parse_cpu_seconds} s of CPU time "
            "(rag.parse_cpu_seconds).", status=413, code="parse_limit",
        )
    # Out of memory, a worker may not even manage to report it: Python exits with 1 when it
    # cannot handle a MemoryError, a C library (lxml, zlib) may abort on a signal.
    raise _memory_limit(name, limits)


def _memory_limit(name: str, limits: RagSettings) -> RagError:
    return RagError(f"{name}: parsing needs more than {limits.parse_memory_bytes} bytes of "
                    "memory (rag.parse_memory_bytes).", status=413, code="parse_limit")


def _work(conn: Connection, limits: RagSettings) -> None:
    """In the worker: the file, then limits, then the parse; the outcome goes back on `conn`."""
    name, data = conn.recv(), conn.recv_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (limits.parse_memory_bytes, limits.parse_memory_bytes))
    # SIGXCPU at the soft limit ends the process; the hard limit's SIGKILL, a second later,
    # ends it should anything catch SIGXCPU.
    cpu_s = limits.parse_cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    outcome: _Outcome | None = None
    try:
        outcome = parse(name, data, limits)
    except RagError as exc:
        outcome = (str(exc), exc.status, exc.code)
    except MemoryError:
        pass  # answered below, once the traceback and the parser's memory are let go
    except Exception as exc:  # a parser library failing on a malformed file
        outcome = (f"{name}: the file cannot be read ({type(exc).__name__}: {exc}).", 400,
                   "unreadable_file")
    if outcome is None:
        error = _memory_limit(name, limits)
        outcome = (str(error), error.status, error.code)
    conn.send(outcome)
    conn.close()
