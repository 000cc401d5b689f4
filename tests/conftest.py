"""The fixtures: one shared engine stack, Redis and PostgreSQL; helpers.py has the rest.

vLLM boots six times per run: the run's shared stack (five engines: two replicas of the tiny
Qwen3, the bundled SmolLM2 with a LoRA adapter, the tiny Qwen3 as an embedding model and as a
reranker) and the one restart its single disruptive test causes (tests marked `disruptive` run
last in their module and have the engines to themselves). A test that needs an engine takes
`engine_url` or `stack` rather than starting its own; one that needs a gateway set otherwise
starts one in front of the stack's engines (helpers.start_gateway).

scripts/test runs four test processes (pytest-xdist, a module per process at a time): they share
the one stack, and a test marked `engine_exclusive` has its engines to itself while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import forkhost
import psycopg
import pytest
import redis
from helpers import (
    ADAPTER,
    EMBED,
    ENGINE_NICE,
    LORA_RANK,
    PORT_BASE_VARIABLE,
    PORT_BLOCK,
    RERANK,
    RUN_DIR_VARIABLE,
    TINY,
    RedisServer,
    SharedStack,
    Stack,
    engine_access,
    make_adapter,
    run_dir,
    start_stack,
    up_venv,
    vllm_boots,
)
from ui_browser import chromium

CONTROLLER = "PYTEST_XDIST_WORKER" not in os.environ  # xdist's controller, or the only process
STACK_STOP_FAILURE = pytest.StashKey[str]()
STACK_BOOT = pytest.StashKey[Future[Stack]]()


def pytest_configure(config: pytest.Config) -> None:
    if CONTROLLER:  # what the test processes inherit
        os.environ[RUN_DIR_VARIABLE] = tempfile.mkdtemp(prefix="qwenstack-tests-")
        # Room for four test processes' blocks below 32768 (helpers.free_port).
        os.environ[PORT_BASE_VARIABLE] = str(random.randrange(20000, 32768 - 4 * PORT_BLOCK))
        forkhost.start_host(run_dir())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The shared stack stops once every test process is done (before the summary). A boot
    this process started is waited for first, so that its stack is on record to be stopped:
    a run that ended while it booted (every test it chose done, or -x) left it running."""
    if boot := session.config.stash.get(STACK_BOOT, None):
        wait([boot])
    if CONTROLLER and (tail := SharedStack("stack").stop()) is not None:
        session.config.stash[STACK_STOP_FAILURE] = tail
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    if CONTROLLER:
        forkhost.stop_host()
        shutil.rmtree(run_dir(), ignore_errors=True)


def _needs_stack(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    return "stack" in names or ("engine_url" in names
                                and not os.environ.get("QWENSTACK_TEST_ENGINE_URL"))


@pytest.hookimpl(trylast=True)  # after -k and -m: sizes count the tests that run
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that need no engine first (they run while the shared stack boots), each group's
    larger modules first (as xdist's loadscope orders them by itself, which scripts/test turns
    off: it would put engine modules first, and every test process would wait for the boot);
    the disruptive test last in its module."""
    engine_modules = {item.path for item in items if _needs_stack(item)}
    sizes = Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path in engine_modules, -sizes[item.path], item.path,
                                 item.get_closest_marker("disruptive") is not None))


def pytest_collection_finish(session: pytest.Session) -> None:
    """The shared stack's boot starts here, in a thread, once every deselection is made (-k,
    -m, and --lf's, which comes after every collection_modifyitems hook): no boot for tests
    not run."""
    if any(_needs_stack(item) for item in session.items):
        factory = session.config._tmp_path_factory  # type: ignore[attr-defined]
        pool = ThreadPoolExecutor(1)
        session.config.stash[STACK_BOOT] = pool.submit(
            SharedStack("stack").get, lambda: _start_shared_stack(factory))
        pool.shutdown(wait=False)  # the boot goes on; a test waits for it (below)
    if any(item.path.name == "test_up_install.py" for item in session.items):
        up_venv.start()  # pip runs while the tests before test_up_install.py do


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """The shared stack's boot and a turn at its engines are no test's time: a test waits for
    them here, out of pytest-timeout's clock (its hook runs inside this one). The boot has its
    own deadline (helpers.STARTUP_TIMEOUT_S), after which `stack` has its error. Tests that take
    the engines share them with the other test processes' unless marked `engine_exclusive` (or
    `disruptive`): then they have them alone, for the test's own setup and teardown too."""
    if _needs_stack(item) and (boot := item.config.stash.get(STACK_BOOT, None)):
        wait([boot])
    if {"engine_url", "stack"} & set(getattr(item, "fixturenames", ())):
        exclusive = any(item.get_closest_marker(name)
                        for name in ("engine_exclusive", "disruptive"))
        with engine_access(exclusive):
            yield
    else:
        yield


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CONTROLLER:
        return
    terminalreporter.write_line(f"vLLM boots in this run: {vllm_boots()}")
    if tail := terminalreporter.config.stash.get(STACK_STOP_FAILURE, None):
        terminalreporter.write_line(f"The shared stack did not stop within 60 s:\n{tail}")


@pytest.fixture(autouse=True)
def root_logging() -> Iterator[None]:
    """A CLI command run in-process (typer's CliRunner) routes the root logger to the runner's
    stream, closed when it returns: later log calls would each print a "Logging error"."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# Random weights, guided to JSON, would most often pick whitespace, which JSON allows without end.
GUIDED_JSON_WITHOUT_WHITESPACE = '{"backend": "xgrammar", "disable_any_whitespace": true}'


@pytest.fixture(scope="session")
def tiny_qwen3() -> Path:
    return _tiny_qwen3()


def _tiny_qwen3() -> Path:
    return _prepared()


@pytest.fixture(scope="session")
def bundled_smollm2() -> Path:
    return _prepared("--bundled")


def _prepared(*args: str) -> Path:
    """`qwenstack test-model ARGS`' folder (scripts/test has built it: this only reads it)."""
    out = forkhost.run(["test-model", *args], check=True)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Stack:
    """`qwenstack up` with every model the tests serve, shared by every test that needs an
    engine: two replicas of the tiny Qwen3 (single-engine tests use the first, `engine_url`,
    routing tests both, `Stack.engines`), the bundled SmolLM2 with a LoRA adapter, and the tiny
    Qwen3 as an embedder and as a reranker (helpers.py names them). Started by the first test
    process to collect its tests (`pytest_collection_finish`); stopped at the end of the
    run.

    The stack's answer cache is off: tests through its gateway check the engine's answers, and a
    hit left by an earlier test would answer in its place (the cache's tests run their own
    gateways with it on).

    On a CPU its engines run confined to their cores (`engine.cpu_confine`) and niced
    (`engine.nice`): the test processes, gateways and browsers want the CPU that vLLM's
    spin-waiting schedulers would take (README, "The tests").

    The tiny Qwen3's engines sample without top-p or top-k unless a request asks
    (`SAMPLING_WITHOUT_SORT`), and get the tool-call parser `up` picks for it (hermes) and, as a
    thinking Qwen3 would, the qwen3 reasoning parser with thinking off unless a request turns it
    on (`enable_thinking`): answers stay `content`, but a test can have the random model's text
    come as `reasoning`. Guided decoding is set so random weights finish what they start
    (README, "The tests"): no free whitespace in guided JSON (which xgrammar reads from the
    engine's config only), and tool calls that must be made (tool_choice required or named)
    guided through vLLM's JSON-schema path, which honours that setting, rather than its
    structural tags, which leave whitespace free."""
    return request.config.stash[STACK_BOOT].result()


# The tiny Qwen3 ships Qwen3's sampling defaults (top_p 0.8, top_k 20), and for them vLLM's
# PyTorch sampler sorts all 151,936 logits at every step: on a CPU, 56 % of this engine's time
# per token (py-spy). Requests that leave them unset skip that here; temperature stays 0.7.
SAMPLING_WITHOUT_SORT = json.dumps({"top_p": 1.0, "top_k": 0})


def _start_shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    tmp = tmp_path_factory.mktemp("shared")
    tiny = str(_tiny_qwen3())
    adapter = make_adapter(_prepared("--bundled"), tmp / "adapter", seed=1)
    models = [
        {"model": tiny, "served_model_name": TINY, "replicas": 2, "kv_cache_gib": 1,
         "reasoning_parser": "qwen3", "extra_args": [
             "--enable-prefix-caching",
             "--structured-outputs-config", GUIDED_JSON_WITHOUT_WHITESPACE,
             "--default-chat-template-kwargs", '{"enable_thinking": false}',
             "--override-generation-config", SAMPLING_WITHOUT_SORT]},
        # No model: on a CPU, the bundled SmolLM2, as `up` serves it by default.
        {"kv_cache_gib": 0.5, "lora": {"adapters": {ADAPTER: str(adapter)},
                                       "max_lora_rank": LORA_RANK, "runtime_loading": True}},
        {"model": tiny, "served_model_name": EMBED, "role": "embed", "kv_cache_gib": 0.25},
        {"model": tiny, "served_model_name": RERANK, "role": "rerank", "kv_cache_gib": 0.25},
    ]
    return start_stack(
        tmp, "--max-model-len", "1024",
        env={"QWENSTACK_ENGINE__MODELS": json.dumps(models), "QWENSTACK_CACHE__ENABLED": "false",
             "QWENSTACK_ENGINE__CPU_CONFINE": "true", "QWENSTACK_ENGINE__NICE": str(ENGINE_NICE),
             "VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"},
    )


@pytest.fixture(scope="session")
def engine_url(request: pytest.FixtureRequest) -> str:
    """A vLLM engine serving tiny-qwen3: the test stack's, or QWENSTACK_TEST_ENGINE_URL's when
    set (one engine kept running while developing, instead of one per pytest run)."""
    return os.environ.get("QWENSTACK_TEST_ENGINE_URL") or request.getfixturevalue("stack").engine


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis (the redis-server binary must be installed), for tests that stop it."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis on 127.0.0.1:6379 (database 0), or one started here where none runs.

    Tests share it, so each uses key prefixes of its own (see `unique_prefix`)."""
    url = "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        yield url
        return
    except redis.ConnectionError:
        pass
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def unique_prefix() -> str:
    return f"qwenstack-test-{os.getpid()}-{time.monotonic_ns()}:"


POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def _ensure_postgres_runs() -> None:
    try:
        psycopg.connect(POSTGRES_ADMIN, connect_timeout=2).close()
        return
    except psycopg.OperationalError:
        pass
    # Debian's cluster, as the CI machine image has it; started here when it is not running.
    versions = sorted(Path("/etc/postgresql").glob("*"))
    if not versions:
        pytest.fail("PostgreSQL is neither running on 127.0.0.1:5432 nor installed")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "start"],
        check=True,
    )
    psycopg.connect(POSTGRES_ADMIN, connect_timeout=10).close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session, as a SQLAlchemy URL."""
    _ensure_postgres_runs()
    name = f"qwenstack_test_{os.getpid()}_{time.time_ns()}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A headless Chromium for the chat UI's tests (ui_browser.py). Per module: Playwright's
    sync API keeps an event loop running in this thread while it is open, and a later module's
    `asyncio.run` (the bench's, the UI store's) would then refuse to start."""
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="session")
def screenshots(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Where the UI tests leave screenshots: $QWENSTACK_TEST_ARTIFACTS/ui-screenshots, else a
    temporary folder, printed at the end of the session."""
    base = os.environ.get("QWENSTACK_TEST_ARTIFACTS")
    folder = (Path(base) if base else tmp_path_factory.mktemp("artifacts")) / "ui-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(f"UI screenshots: {folder}")
