"""The fixtures: one shared engine stack, Redis and PostgreSQL; helpers.py has the rest.

vLLM boots at most ten times per run: the run's two-replica tiny Qwen3 stack (two boots),
the one restart its single disruptive test causes (tests marked `disruptive` run last and have
the engines to themselves), the bundled-model stack of test_up_default_model.py, the
several-model stack of test_models.py (three boots), the embedder and reranker of
test_pooling.py and the LoRA engine of test_lora.py. A test that
needs an engine takes `engine_url` or `stack` rather than starting its own.

scripts/test runs two test processes (pytest-xdist, a module per process at a time): they share
the one stack, and a test marked `engine_exclusive` has its engines to itself while it runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import redis
from helpers import (
    RUN_DIR_VARIABLE,
    RedisServer,
    SharedStack,
    Stack,
    engine_access,
    run_dir,
    start_stack,
    up_venv,
    vllm_boots,
)
from ui_browser import chromium

CONTROLLER = "PYTEST_XDIST_WORKER" not in os.environ  # xdist's controller, or the only process
STACK_STOP_FAILURE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    if CONTROLLER:
        os.environ[RUN_DIR_VARIABLE] = tempfile.mkdtemp(prefix="qwenstack-tests-")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The shared stack stops once every test process is done (before the summary)."""
    if CONTROLLER and (tail := SharedStack("stack").stop()) is not None:
        session.config.stash[STACK_STOP_FAILURE] = tail
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    if CONTROLLER:
        shutil.rmtree(run_dir(), ignore_errors=True)


def _needs_stack(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    return "stack" in names or ("engine_url" in names
                                and not os.environ.get("QWENSTACK_TEST_ENGINE_URL"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that need no engine first (they run while the shared stack boots: `stack_boot`),
    the disruptive test last."""
    engine_modules = {item.path for item in items if _needs_stack(item)}
    items.sort(key=lambda item: (item.get_closest_marker("disruptive") is not None,
                                 item.path in engine_modules))
    if any(item.path.name == "test_up_install.py" for item in items):
        up_venv.start()  # pip runs while the tests before test_up_install.py do


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CONTROLLER:
        return
    terminalreporter.write_line(f"vLLM boots in this run: {vllm_boots()}")
    if tail := terminalreporter.config.stash.get(STACK_STOP_FAILURE, None):
        terminalreporter.write_line(f"The shared stack did not stop within 60 s:\n{tail}")


@pytest.fixture(autouse=True)
def engine_use(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests that take the shared engines share them with the other test process, unless
    marked `engine_exclusive` (or `disruptive`): then they have them alone."""
    if not {"engine_url", "stack"} & set(request.fixturenames):
        yield
        return
    exclusive = any(request.node.get_closest_marker(name)
                    for name in ("engine_exclusive", "disruptive"))
    with engine_access(exclusive):
        yield


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
    out = subprocess.run(
        [sys.executable, "-m", "qwenstack", "test-model"],
        capture_output=True, text=True, check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session", autouse=True)
def stack_boot(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future[Stack] | None]:
    """The shared stack, booting from the session's start in a thread when some test will need
    it: the modules that need no engine, collected first, run meanwhile."""
    if not any(map(_needs_stack, request.session.items)):
        yield None
        return
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(SharedStack("stack").get, lambda: _start_shared_stack(tmp_path_factory))


@pytest.fixture(scope="session")
def stack(stack_boot: Future[Stack] | None) -> Stack:
    """`qwenstack up` with two replicas of the tiny Qwen3, shared by every test that needs an
    engine: single-engine tests use the first replica (`engine_url`), routing tests both.
    Started by the first test process to reach `stack_boot`; stopped at the end of the run.

    The stack's answer cache is off: tests through its gateway check the engine's answers, and a
    hit left by an earlier test would answer in its place (the cache's tests run their own
    gateways with it on).

    Its engines get the tool-call parser `up` picks for the tiny Qwen3 (hermes) and, as a
    thinking Qwen3 would, the qwen3 reasoning parser with thinking off unless a request turns it
    on (`enable_thinking`): answers stay `content`, but a test can have the random model's text
    come as `reasoning`. Guided decoding is set so random weights finish what they start
    (README, "The tests"): no free whitespace in guided JSON (which xgrammar reads from the
    engine's config only), and tool calls that must be made (tool_choice required or named)
    guided through vLLM's JSON-schema path, which honours that setting, rather than its
    structural tags, which leave whitespace free."""
    assert stack_boot is not None, "stack_boot saw no test that needs the stack"
    return stack_boot.result()


def _start_shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    return start_stack(
        tmp_path_factory.mktemp("tiny"), "--model", str(_tiny_qwen3()),
        "--served-model-name", "tiny-qwen3", "--replicas", "2", "--max-model-len", "1024",
        "--kv-cache-gib", "1", "--enable-prefix-caching",
        "--structured-outputs-config", GUIDED_JSON_WITHOUT_WHITESPACE,
        "--default-chat-template-kwargs", '{"enable_thinking": false}',
        env={"QWENSTACK_CACHE__ENABLED": "false", "QWENSTACK_ENGINE__REASONING_PARSER": "qwen3",
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
