"""Several gateway processes on one port: how many, what they must share, and running them.

One gateway process relays every token of every stream on one core: at 50-100 µs of CPU per
relayed token (issue 15's measurement) it saturates at 10,000-20,000 tokens/s, what one modern
GPU streams. So `up` and `gateway` can run `gateway.workers` processes, each a whole gateway
listening on the port with SO_REUSEPORT: the kernel spreads new connections evenly over their
sockets (one shared socket would let whichever worker is idle first take them all), and a
worker that drains closes only its own. They are started and restarted like engines
(processes.py: killed with `up` however it ends); `up` holds the port meanwhile (`hold_port`).

What the workers must agree on is kept outside any one of them, or a start is refused:
- per-caller limits: Redis (`limits.redis_url`), else one SQLite file in the run folder that
  every worker takes its steps in (limit_stores.SqliteStore): exact, not per-worker shares;
- the answer cache: Redis (`cache.backend`), or off; a per-process memory cache is refused;
- knowledge bases: a Milvus server; a Milvus Lite file opens in one process only, so refused;
- usage rows and keys: the database, which every worker writes (SQLite in WAL mode, or
  PostgreSQL);
- metrics: prometheus_client's multiprocess mode (a folder of per-process files that /metrics,
  served by any worker, sums);
- routing: `prefix_aware` hashes each conversation's start, so every worker sends its turns to
  the same engine.
Admission control is per worker: each admits its share of `admission.max_in_flight` and
`max_queue` (rounded up).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import pickle
import shutil
import socket
import sys
from pathlib import Path

from qwenstack.errors import SetupError
from qwenstack.processes import SupervisedProcess
from qwenstack.settings import Settings

log = logging.getLogger(__name__)

# Tokens per second one worker is sized for: half of what 50 µs of CPU per relayed token allows
# a core, leaving the rest to each request's own work (parsing, limits, usage, metrics).
WORKER_TOKENS_PER_S = 10_000
# What one modern GPU streams serving Qwen3-4B at high concurrency (issue 15: 10,000-20,000).
GPU_ENGINE_TOKENS_PER_S = 15_000
# The settings, pickled, from `up` to its workers: exact (secrets and the parsers `up` chose
# included), and never on disk. Not QWENSTACK_*: that is the settings' own namespace.
SETTINGS_ENV = "_QWENSTACK_GATEWAY_WORKER_SETTINGS"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode


def per_process_state(settings: Settings) -> list[str]:
    """What workers could not share as configured, each with the setting that shares it."""
    unshared = []
    if settings.cache.enabled and settings.cache.backend == "memory":
        unshared.append("the answer cache (set cache.backend=redis and cache.redis_url, or "
                        "cache.enabled=false)")
    if settings.milvus_uri.endswith(".db"):
        unshared.append("knowledge bases (set rag.milvus_uri to a Milvus server)")
    return unshared


def worker_count(settings: Settings, has_gpu: bool) -> int:
    """`gateway.workers`, or what the engines' expected token rate and the cores call for; a
    count above 1 where state would be per process is refused, naming the settings to add."""
    unshared = per_process_state(settings)
    asked = settings.gateway.workers
    if asked is not None:
        if asked > 1 and unshared:
            raise SetupError(f"gateway.workers={asked} needs what the workers share outside "
                             f"any one of them: {'; '.join(unshared)}.")
        return asked
    rate = settings.gateway.expected_tokens_per_s
    if rate is None:
        rate = GPU_ENGINE_TOKENS_PER_S * len(settings.engine.replica_urls()) if has_gpu else 0
    cores = len(os.sched_getaffinity(0))  # the cores this process may run on, not the host's
    wanted = min(max(1, math.ceil(rate / WORKER_TOKENS_PER_S)), cores)
    if wanted > 1 and unshared:
        log.warning("One gateway worker, where %d would relay the %.0f tokens/s expected: "
                    "these are kept per process: %s.", wanted, rate, "; ".join(unshared))
        return 1
    return wanted


def hold_port(host: str, port: int) -> socket.socket:
    """The port, bound with SO_REUSEPORT but not listening, so that only the workers' sockets
    take connections, and a gateway started again on the port fails (its plain bind is
    refused) rather than splitting them. Call once the port was found free."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class GatewayWorker(SupervisedProcess):
    """One worker process; its output goes with this process's (request log lines included)."""

    def __init__(self, index: int, env: dict[str, str], settings: Settings) -> None:
        self.metrics_dir = env[METRICS_ENV]
        super().__init__(
            f"Gateway worker {index}", [sys.executable, "-m", "qwenstack.gateway.workers"],
            None, env=env,
            # SIGTERM drains it (uvicorn's graceful shutdown); only past that, SIGKILL.
            stop_grace_s=settings.gateway.drain_timeout_s + 5,
        )
        self.pid: int | None = None

    def started(self, process: asyncio.subprocess.Process) -> None:
        self.pid = process.pid

    def exited(self, code: int | None, restart_in_s: float) -> None:
        # Its live gauges (requests in flight, queued) leave the sums on /metrics.
        if self.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(self.pid, self.metrics_dir)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """`settings.gateway.workers` worker processes, each restarted when it exits, until `stop`;
    then each drains (SIGTERM) and they are awaited."""
    metrics_dir = settings.run_dir / "gateway-metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # a past run's counts are not this one's
    metrics_dir.mkdir(parents=True)
    for stale in settings.run_dir.glob("limits.db*"):
        stale.unlink()  # budgets start full, as they do in one process
    env = {**os.environ, METRICS_ENV: str(metrics_dir),
           SETTINGS_ENV: base64.b64encode(pickle.dumps(settings)).decode()}
    assert settings.gateway.workers
    workers = [GatewayWorker(i, env, settings) for i in range(settings.gateway.workers)]
    await asyncio.gather(*(worker.run(stop) for worker in workers))


def shared_limits_file(settings: Settings) -> Path | None:
    """Where workers keep per-caller budgets without Redis: None in a single process."""
    if (settings.gateway.workers or 1) > 1 and not settings.limits.redis_url:
        return settings.run_dir / "limits.db"
    return None


def main() -> None:
    """A worker: the gateway on a listening socket of its own, until SIGTERM (then drained)."""
    import uvloop

    from qwenstack import logs
    from qwenstack.stack import gateway_server

    settings: Settings = pickle.loads(base64.b64decode(os.environ.pop(SETTINGS_ENV)))
    logs.configure(settings.log_level, settings.observability.log_format)
    listener = socket.create_server((settings.gateway.host, settings.gateway.port),
                                    reuse_port=True, backlog=2048)
    server = gateway_server(settings, own_signals=True)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(server.serve(sockets=[listener]))


if __name__ == "__main__":
    main()
