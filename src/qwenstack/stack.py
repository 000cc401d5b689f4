"""Bringing the parts up together and down again on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn

from qwenstack.engine import prepare_engines
from qwenstack.engine.hardware import detect
from qwenstack.engine.supervisor import Supervisor
from qwenstack.errors import SetupError
from qwenstack.gateway import workers
from qwenstack.gateway.app import create_app
from qwenstack.gateway.http_limits import BoundedHeadProtocol
from qwenstack.settings import Settings

log = logging.getLogger(__name__)


class _GatewayServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The stack installs its own handlers: a signal stops the engines too, not just uvicorn.
        yield


def gateway_server(settings: Settings, *, own_signals: bool = False) -> uvicorn.Server:
    """The gateway's server; `own_signals`: SIGTERM and SIGINT drain and stop it (a worker
    process), rather than the stack's handlers stopping everything."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.gateway.host,
        port=settings.gateway.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through qwenstack's handler and log format
        access_log=False,  # the gateway logs each request itself, with its request id
        # On stop: no new connections, requests in flight (streams too) finish within this.
        timeout_graceful_shutdown=math.ceil(settings.gateway.drain_timeout_s),
        # Header size, read deadlines and the connection cap (http_limits.py).
        http=BoundedHeadProtocol.configured(settings),
    )
    return uvicorn.Server(config) if own_signals else _GatewayServer(config)


def _listen(settings: Settings) -> socket.socket:
    """Bind here rather than in uvicorn, which exits the process when the port is taken.

    Not inheritable (socket's default): a child holding it would keep the port taken, and
    accept connections it never answers, after the gateway is gone."""
    host, port = settings.gateway.host, settings.gateway.port
    try:
        sock = socket.create_server((host, port), reuse_port=False)
        if (settings.gateway.workers or 1) > 1:  # free: held for the workers' own sockets
            sock.close()
            sock = workers.hold_port(host, port)
    except OSError as exc:
        raise SetupError(
            f"The gateway cannot listen on {host}:{port} ({exc.strerror}); set --port.") from None
    return sock


async def _start_engines(settings: Settings) -> tuple[Supervisor, Settings]:
    """The engines' supervisor, and the settings with the models as served: each with its
    served name and each "auto" parser resolved to the one its engines run (or "none"), what the
    gateway reports of the models' roles and capabilities."""
    served, launches = await asyncio.to_thread(prepare_engines, settings)
    supervisor = Supervisor(
        launches,
        settings.run_dir / "engines.json",
        startup_timeout_s=settings.engine.startup_timeout_s,
        backoff_initial_s=settings.engine.restart_backoff_initial_s,
        backoff_max_s=settings.engine.restart_backoff_max_s,
    )
    await supervisor.start()
    engine = settings.engine.model_copy(update={"models": served})
    return supervisor, settings.model_copy(update={"engine": engine})


async def _ready_before_stop(supervisor: Supervisor, stop: asyncio.Event) -> bool:
    """Wait for the engines to serve; False when a stop came first."""
    ready = asyncio.create_task(supervisor.wait_ready())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait((ready, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not ready.done():
        ready.cancel()
        return False
    ready.result()
    return True


async def run(
    settings: Settings,
    *,
    engines: bool,
    gateway: bool,
    on_ready: Callable[[list[str]], None],
    ui: bool = False,
) -> None:
    """Run engines, the gateway and/or the chat UI until a signal; `on_ready` gets the engine
    URLs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    supervisor: Supervisor | None = None
    server: uvicorn.Server | None = None
    server_task: asyncio.Task[None] | None = None
    if gateway:  # how many gateway processes, or refused before anything starts
        count = workers.worker_count(settings, detect().has_gpu)
        settings = settings.model_copy(update={
            "gateway": settings.gateway.model_copy(update={"workers": count})})
    # Bound first: a taken port should fail before minutes of engine loading, not after.
    listener = _listen(settings) if gateway else None
    ui_task: asyncio.Task[None] | None = None
    if ui:
        from qwenstack.ui import server as ui_server  # only with the `ui` extra installed

        ui_server.preflight(settings)
    try:
        if engines:
            supervisor, settings = await _start_engines(settings)
        if listener and settings.gateway.workers == 1:
            # Up before the engines are: /health answers and /ready says 503 while they load.
            server = gateway_server(settings)
            server_task = asyncio.create_task(server.serve(sockets=[listener]))
        elif listener:  # worker processes, each draining on the stop below
            log.info("Gateway: %d worker processes", settings.gateway.workers)
            server_task = asyncio.create_task(workers.run(settings, stop))
        if ui:
            # Up while the engines load too: it tells users the model is starting.
            ui_task = asyncio.create_task(ui_server.supervise(settings, stop))
        if supervisor and not await _ready_before_stop(supervisor, stop):
            return
        on_ready(settings.engine.replica_urls())
        waits: list[asyncio.Task[object]] = [asyncio.create_task(stop.wait())]
        if server_task:
            waits.append(server_task)
        if ui_task:
            waits.append(ui_task)  # ends early only when the UI cannot start at all
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        waits[0].cancel()
    finally:
        log.info("Stopping")
        stop.set()  # the UI stops its process on this, meanwhile the rest stops below
        if server:
            server.should_exit = True
        if server_task:
            await server_task
        if listener:
            listener.close()  # the workers' port, refused from now on
        if supervisor:
            await supervisor.stop()
        if ui_task:
            await ui_task  # raises the UI's SetupError, if it could not start, once all is down
