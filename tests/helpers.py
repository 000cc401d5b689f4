"""What the tests share: the stacks and gateways they start, the servers they stop, polling.

Everything here starts or talks to real parts: `qwenstack up` with a real vLLM engine, a
`qwenstack gateway` process (forked from one that has imported qwenstack: forkhost.py), a real
redis-server. The few fake servers live beside the one test
that needs them, each saying what no real part can be made to do on demand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import forkhost
import httpx
import redis
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from qwenstack.cli import app

STARTUP_TIMEOUT_S = 900
# The shared stack's models (conftest.py): the tiny Qwen3 (two replicas), the bundled SmolLM2
# with a LoRA adapter, and the tiny Qwen3 again as an embedding model and as a reranker.
TINY, SMOLLM2, ADAPTER = "tiny-qwen3", "SmolLM2-135M-Instruct", "smollm2-adapter"
EMBED, RERANK = "tiny-embed", "tiny-rerank"
LORA_RANK = 8
# Added to the niceness of the shared stack's engines (engine.nice): the test processes,
# gateways and browsers have the CPU before vLLM's spin-waiting (conftest.py).
ENGINE_NICE = 10
HOME = Path(os.environ.get("QWENSTACK_HOME", Path.home() / ".cache" / "qwenstack"))
ROOT = Path(__file__).resolve().parent.parent
# A folder of this run that every test process sees (pytest-xdist's workers inherit it from
# the controller, which makes it: conftest.py): the shared stack's record, the locks, the homes.
RUN_DIR_VARIABLE = "QWENSTACK_TEST_RUN_DIR"
# Ports kept for one stack's engines (base port + index): more than any test starts.
ENGINE_PORTS = 8


# The helpers' HTTP client. httpx.get makes a client, and with it a TLS context that loads the
# CA store, on every call: polling a booting stack ten times a second, that was 38 % of the
# test processes' CPU (py-spy). No kept-alive connections: a poll sees the server as it is now
# (refused, when nothing listens), not a connection from before it stopped.
HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def wait_for(condition: Callable[[], object], what: str, timeout_s: float,
             interval_s: float = 0.1) -> None:
    """Poll `condition` until it is true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout_s} s")
        time.sleep(interval_s)


# Ports the tests listen on come from below the kernel's ephemeral range (32768 and up on
# Linux), from which vLLM's own sockets and every outgoing connection draw theirs: an engine
# listens on base port + index, and a port that was free when a test chose it could be taken by
# another test process's engine before it binds. Each test process of a run has its own block,
# after the run's first port (conftest.py draws it, so that runs side by side rarely meet).
PORT_BASE_VARIABLE = "QWENSTACK_TEST_PORT_BASE"
PORT_BLOCK = 600
_ports = itertools.count(
    int(os.environ.get(PORT_BASE_VARIABLE, "20000"))
    + PORT_BLOCK * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
)


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive free ports of this test process's block."""
    while True:
        first = next(_ports)
        for _ in range(count - 1):
            next(_ports)
        if all(_bindable(first + offset) for offset in range(count)):
            return first


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def run_dir() -> Path:
    return Path(os.environ[RUN_DIR_VARIABLE])


@dataclass
class Stack:
    process: subprocess.Popen[bytes] | None  # None in the test processes that did not start it
    gateway: str  # base URL, no /v1
    engine: str
    home: Path
    log: Path
    key: str = ""  # the admin key `up` printed on its first start
    up_pid: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def engine_state(self) -> list[dict]:
        return json.loads((self.home / "run" / "engines.json").read_text())

    @property
    def engines(self) -> list[str]:
        """The URLs of the first model's replicas, in replica order (`engine` is the first);
        the shared stack's other models follow them (conftest.py)."""
        state = self.engine_state()
        return [engine["url"] for engine in state if engine["model"] == state[0]["model"]]

    def engine_of(self, model: str) -> str:
        """The URL of the (first) engine serving `model`."""
        return next(e["url"] for e in self.engine_state() if e["model"] == model)

    def pid(self, url: str) -> int:
        """The process (and process group) of the replica at `url`."""
        return next(e["pid"] for e in self.engine_state() if e["url"] == url)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        assert self.process is not None
        wait_until_answering(self.process, f"{self.gateway}/ready", self.log, timeout_s)

    def stop(self) -> int:
        assert self.process is not None
        return _stop(self.process)

    def record(self) -> str:
        return json.dumps({"gateway": self.gateway, "engine": self.engine, "home": str(self.home),
                           "log": str(self.log), "key": self.key, "up_pid": self.process.pid
                           if self.process else self.up_pid})

    @classmethod
    def from_record(cls, record: str) -> Stack:
        fields = json.loads(record)
        return cls(None, fields["gateway"], fields["engine"], Path(fields["home"]),
                   Path(fields["log"]), fields["key"], fields["up_pid"])


class SharedStack:
    """One `qwenstack up` for every test process of the run: the first to need it starts it
    (under a lock, the others wait) and records it in the run folder; the others attach. It
    outlives the test process that started it (xdist ends a worker when its queue is empty), so
    the controller stops it at the end of the run (`stop`), by the pid in the record."""

    def __init__(self, name: str) -> None:
        self.record = run_dir() / f"{name}.json"
        self.lock = run_dir() / f"{name}.lock"

    def get(self, start: Callable[[], Stack]) -> Stack:
        with open(self.lock, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.record.exists():
                return Stack.from_record(self.record.read_text())
            stack = start()
            self.record.write_text(stack.record())
            return stack

    def stop(self) -> str | None:
        """SIGTERM the stack, if one was started; its log's tail when it did not exit cleanly."""
        if not self.record.exists():
            return None
        stack = Stack.from_record(self.record.read_text())
        os.kill(stack.up_pid, signal.SIGTERM)
        try:
            wait_for(lambda: not _running(stack.up_pid), "the shared stack stopped", 60)
        except AssertionError:
            os.kill(stack.up_pid, signal.SIGKILL)
            return stack.log.read_text()[-5000:]
        return None


def _running(pid: int) -> bool:
    return (stat := process_stat(pid)) is not None and stat.state != "Z"


@contextlib.contextmanager
def engine_access(exclusive: bool) -> Iterator[None]:
    """Shared engine use (most tests), or the engines to this test alone (`engine_exclusive`):
    a readers-writer lock across the run's test processes. A test that waits for the engines
    alone holds the turnstile, which every test passes on its way in: later tests queue behind
    it, rather than keep the engines shared for ever (three processes' shared turns once
    overlapped for five minutes on end, and an exclusive test timed out waiting)."""
    with open(run_dir() / "engines.turnstile", "w") as turnstile, \
            open(run_dir() / "engines.lock", "w") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


@dataclass
class Gateway:
    """`qwenstack gateway` alone, in front of an engine that is already up."""

    process: forkhost.Forked
    url: str  # base URL, no /v1
    home: Path
    log: Path

    def stop(self) -> int:
        return _stop(self.process)


# A process a test started: a command forked by forkhost.py, or one started as users do.
Process = forkhost.Forked | subprocess.Popen[bytes]


def request_log(log: Path, request_id: str) -> dict:
    """The gateway's JSON log line for one request (written just after the answer went out)."""
    deadline = time.monotonic() + 5
    while True:
        for line in log.read_text().splitlines():
            if line.startswith("{") and f'"request_id":"{request_id}"' in line:
                return json.loads(line)
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line for request {request_id} in {log}")
        time.sleep(0.05)


def start_gateway(
    tmp: Path, engine_url: str, *args: str, env: dict[str, str] | None = None, auth: bool = False,
    until: str = "/ready",
) -> Gateway:
    """A gateway process on a free port with its own home; `env` adds QWENSTACK_* settings.
    Returns once `until` answers 200 (`/health`: without waiting for an engine).

    Auth is off unless asked for: tests of limits, cache or metrics then need no key store (the
    stack tests and tests/test_auth.py, test_usage.py run with it on)."""
    env = {**({} if auth else {"QWENSTACK_AUTH__ENABLED": "false"}), **(env or {})}
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp / f"gateway-{port}.log"
    process = forkhost.start(
        ["gateway", "--engine-url", engine_url, "--port", str(port), "--home", str(home), *args],
        stdout=log, env={**os.environ, **env},
    )
    gateway = Gateway(process, f"http://127.0.0.1:{port}", home, log)
    try:
        # A start is no test's subject here: 67 s once, two workers on a box short of memory.
        wait_until_answering(process, f"{gateway.url}{until}", log, timeout_s=120)
    except BaseException:
        gateway.stop()
        raise
    return gateway


def refused(base_url: str) -> bool:
    """Whether a connection to the server is refused (nothing listens), as after a drain."""
    try:
        HTTP.get(f"{base_url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        pass
    return False


def wait_until_answering(
    process: Process, url: str, log: Path, timeout_s: float
) -> None:
    """Until a GET of `url` answers 200; fails at once, with the end of `log`, if `process`
    exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args} exited {process.returncode}:\n{log.read_text()[-5000:]}"
            )
        try:
            if HTTP.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not 200 in {timeout_s} s:\n{log.read_text()[-5000:]}")


def _stop(process: Process) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def _stack_home(tmp: Path) -> Path:
    """A home in `tmp` sharing the engine venv and models, counted in the run's vLLM boots."""
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    for shared in ("engine-venv", "models"):
        (HOME / shared).mkdir(parents=True, exist_ok=True)
        (home / shared).symlink_to(HOME / shared)
    with open(run_dir() / "stack-homes", "a") as homes:  # for the boot count at the end
        homes.write(f"{home}\n")
    return home


@dataclass
class Engines:
    """`qwenstack engine`: vLLM replicas started and supervised, with no gateway."""

    process: forkhost.Forked
    url: str  # the first replica's
    home: Path
    log: Path

    def stop(self) -> int:
        return _stop(self.process)


@dataclass(frozen=True)
class ProcessStat:
    """What /proc/PID/stat says of a process, the fields the tests read."""

    pid: int
    state: str  # "Z": a zombie, which holds no memory, port or socket
    ppid: int
    session: int
    cpu_s: float  # user and system time used


def process_stat(pid: int) -> ProcessStat | None:
    """The process's stat, or None once it is gone."""
    try:
        # Fields after the command's closing parenthesis (the command may hold any character).
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return ProcessStat(pid, fields[0], int(fields[1]), int(fields[3]),
                       (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))


def process_stats() -> list[ProcessStat]:
    """Every process's stat."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [stat for pid in pids if (stat := process_stat(pid)) is not None]


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used (0 once it is gone)."""
    return stat.cpu_s if (stat := process_stat(pid)) is not None else 0.0


def session_members(session: int) -> set[int]:
    """Live processes (zombies are not) in a session: a supervised engine's or UI's is its
    first process's pid (processes.py)."""
    return {stat.pid for stat in process_stats()
            if stat.session == session and stat.state != "Z"}


def start_engines(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Engines:
    """`qwenstack engine ARGS` (vLLM flags among them) on a free port, with its own home;
    `env` adds QWENSTACK_* settings. Returns once the first replica lists its models."""
    home = _stack_home(tmp)
    port = free_port(ENGINE_PORTS)
    log = tmp / "engine.log"
    process = forkhost.start(
        ["engine", "--engine-base-port", str(port), "--home", str(home), *args],
        stdout=log, env={**os.environ, **(env or {})},
    )
    engines = Engines(process, f"http://127.0.0.1:{port}", home, log)
    try:
        wait_until_answering(process, f"{engines.url}/v1/models", log, STARTUP_TIMEOUT_S)
    except BaseException:
        engines.stop()
        raise
    return engines


def start_stack(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Stack:
    """`qwenstack up` on free ports, its home in `tmp` but sharing the engine venv and models;
    `env` adds QWENSTACK_* settings. Returns once every engine serves."""
    stack = launch_stack(tmp, *args, env=env)
    try:
        stack.wait_ready()
        stack.key = _printed_admin_key(stack.process, stack.log)
    except BaseException:
        stack.stop()
        raise
    return stack


def launch_stack(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Stack:
    """`start_stack`'s `qwenstack up`, returned as soon as it is started."""
    home = _stack_home(tmp)
    gateway_port, engine_port = free_port(), free_port(ENGINE_PORTS)
    log = tmp / "up.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "qwenstack", "up", "--port", str(gateway_port),
         "--engine-base-port", str(engine_port), "--home", str(home), *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
        # The chat UI has its own tests (test_ui.py); here it would only contend for port 8008.
        env={**os.environ, "QWENSTACK_UI__ENABLED": "false", **(env or {})},
    )
    return Stack(
        process, f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{engine_port}", home, log
    )


def _printed_admin_key(
    process: subprocess.Popen[bytes], log: Path, timeout_s: float = STARTUP_TIMEOUT_S
) -> str:
    """The admin key in the file the ready banner names, printed once every engine serves
    (/ready turns 200 with the first); not a terminal, `up` does not print the key itself."""
    deadline = time.monotonic() + timeout_s
    while not (match := re.search(r"admin key file +(\S+)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no admin key file in {log}:\n{log.read_text()[-5000:]}")
        time.sleep(0.2)
    return Path(match[1]).read_text().strip()


def usage_rows(
    database_url: str, request_ids: set[str], timeout_s: float = 10
) -> dict[str, sa.Row]:
    """The usage rows of these requests, waiting for the batched writes to land."""
    engine = sa.create_engine(database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with engine.connect() as connection:
                rows = connection.execute(
                    sa.text("SELECT * FROM usage_records WHERE request_id IN :ids").bindparams(
                        sa.bindparam("ids", expanding=True)
                    ),
                    {"ids": sorted(request_ids)},
                ).all()
            if len(rows) >= len(request_ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        engine.dispose()
    found = {row.request_id: row for row in rows}
    assert len(found) == len(rows), "a request has more than one row"
    return found


def metric(url: str, headers: dict[str, str], name: str, **labels: str) -> float:
    """A sample's value on a gateway's /metrics, summed over the series with these labels (0 when
    there is none)."""
    page = HTTP.get(f"{url}/metrics", headers=headers, timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(page)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def vllm_boots() -> int:
    """How many times vLLM came up to serve in this run's stacks (restarts included), from the
    line each vLLM server logs once it listens."""
    homes = run_dir() / "stack-homes"
    return sum(
        log.read_text(errors="replace").count("Starting vLLM server on")
        for home in (homes.read_text().split() if homes.exists() else [])
        for log in (Path(home) / "logs").glob("engine-*.log")
    )


def create_key(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """`qwenstack keys create --home HOME ARGS...`, run in this process (typer's CliRunner: the
    command's own code, without a Python start and its imports, 2.2 s against 0.27 s here): the
    new key's secret. `env` is QWENSTACK_* settings for the command."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        result = CliRunner().invoke(app, ["keys", "create", "--home", str(home), *args], env=env,
                                    catch_exceptions=False)
    finally:
        # The command pointed the root logger at the runner's stream, closed by now, and set
        # this process's umask to keep a home private: the processes tests start must make
        # their homes private by themselves, as they would alone.
        root.handlers[:] = handlers
        root.setLevel(level)
        os.umask(umask)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()[0]  # the secret, then (on stderr) what it is


class RedisServer:
    """A redis-server process of the test's own, which a test may stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextlib.contextmanager
def held_stream(
    base_url: str, model: str = "tiny-qwen3", headers: dict[str, str] | None = None
) -> Iterator[httpx.Response]:
    """A streamed completion that stays open until the block ends, then disconnects.

    It asks for about 15 MB of events (1000 tokens, 16 choices, 20 logprobs each; 2 choices
    made 1.9 MB) and reads only the first line. The socket's receive buffer is set small, which
    on Linux also turns off its autotuning (up to tcp_rmem's 32 MiB here). What the gateway can
    hand off is then its send buffer (at most tcp_wmem's 4 MiB) and uvicorn's 64 KiB: far
    less than the stream, so its sends wait for as long as the block lasts, however fast the
    engine generates.
    """
    body = {"model": model, "prompt": "hello there", "max_tokens": 1000, "ignore_eos": True,
            "stream": True, "logprobs": 20, "n": 16}
    small_buffer = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    with (
        httpx.Client(
            transport=httpx.HTTPTransport(socket_options=small_buffer), timeout=60
        ) as client,
        client.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()  # kept: a dropped iterator would close the response
        next(lines)
        yield response


class UpVenv:
    """A venv with qwenstack and exactly the extras `scripts/up` installs, the code run from this
    checkout (PYTHONPATH comes before the installed copy), so one venv serves every clone while
    the dependency list is unchanged. Built in a thread from the session's start (`start`): on a
    new machine pip takes minutes, which then pass while the other tests run."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @staticmethod
    def extras() -> str:
        """The extras scripts/up installs, read from the script itself: one source of truth."""
        match = re.search(r'venv\.sh"\s+([\w,]+)', (ROOT / "scripts" / "up").read_text())
        assert match, "scripts/up no longer names its extras as this test expects"
        return match[1]

    @property
    def path(self) -> Path:
        key = (ROOT / "pyproject.toml").read_bytes() + self.extras().encode()
        return HOME / f"up-venv-{hashlib.sha256(key).hexdigest()[:16]}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._build_or_record, daemon=True)
        self._thread.start()

    def wait(self) -> Path:
        if self._thread is None:
            self.start()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.path / "bin" / "python"

    def _build_or_record(self) -> None:
        try:
            self._build()
        except BaseException as exc:  # handed to the test that waits for the venv
            self._error = exc

    def _build(self) -> None:
        venv, stamp = self.path, self.path / ".installed"
        HOME.mkdir(parents=True, exist_ok=True)
        # One build at a time on this machine: two checkouts may test at once.
        with open(HOME / "up-venv.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if stamp.exists():
                return
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            pip = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                 "--disable-pip-version-check", "--no-compile", f"{ROOT}[{self.extras()}]"],
                timeout=1800, capture_output=True, text=True,
            )
            if pip.returncode != 0:
                raise RuntimeError(f"pip install failed in {venv}:\n{pip.stderr[-5000:]}")
            stamp.touch()


up_venv = UpVenv()


def make_adapter(model: Path, folder: Path, seed: int) -> Path:
    """A random LoRA adapter (rank LORA_RANK) for `model`, a Llama-like folder, in `folder`:
    PEFT's layout (adapter_config.json, adapter_model.safetensors) on the attention's q and v
    projections, with a B matrix that is not zero (PEFT starts it at zero, which would change
    nothing), so greedy text through it differs from the base model's."""
    import numpy as np
    from safetensors.numpy import save_file

    config = json.loads((model / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    outputs = {"q_proj": config["num_attention_heads"] * head_dim,
               "v_proj": config["num_key_value_heads"] * head_dim}
    random = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for projection, width in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = random.normal(
                0, 1 / np.sqrt(hidden), (LORA_RANK, hidden)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = random.normal(
                0, 1.0, (width, LORA_RANK)).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK,
        "lora_alpha": 2 * LORA_RANK, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(outputs), "base_model_name_or_path": str(model),
        "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
        "use_dora": False,
    }))
    return folder
