"""What `scripts/up` installs is enough to run what it starts.

The tests' own venv holds more than `up`'s (Playwright, for one, brings greenlet, whose absence
from the `ui` extra once left the chat UI crash-looping after `scripts/up`). So a second venv
holds exactly the extras `scripts/up` installs (helpers.UpVenv: built while the other tests run,
reused while the dependency list is unchanged); this checks that pip finds its dependencies
consistent, that every qwenstack module imports, and that the chat UI process serves its page.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, up_venv

# Modules that need an extra `up` does not install: they say so when imported without it.
NEEDS_OTHER_EXTRAS = {"qwenstack.gateway.tracing": "otel"}
UI_START_TIMEOUT_S = 180
# The first run builds a venv of qwenstack with `up`'s extras: minutes of pip on a new machine.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def up_python() -> Path:
    return up_venv.wait()


def test_dependencies_are_consistent(up_python: Path) -> None:
    check = subprocess.run([str(up_python), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_module_imports(up_python: Path, tmp_path: Path) -> None:
    script = f"""
import importlib, pkgutil, sys
import qwenstack
skip = {sorted(NEEDS_OTHER_EXTRAS)!r}
failed = []
for module in pkgutil.walk_packages(qwenstack.__path__, "qwenstack."):
    name = module.name
    if name in skip or ".migrations.versions." in name or name.endswith((".ui.app", "__main__")):
        continue  # Alembic loads revisions; ui.app runs in Chainlit (below); __main__ runs the CLI
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    # In a folder of its own: importing Chainlit (ui.turn does) writes .chainlit/ where it runs.
    result = subprocess.run([str(up_python), "-c", script], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env=up_venv.env())
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def ui_process(up_python: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    log = (tmp_path / "ui.out").open("wb")
    process = subprocess.Popen(
        [str(up_python), "-m", "qwenstack", "ui", "--home", str(tmp_path / "home"),
         "--port", str(port), "--gateway-url", f"http://127.0.0.1:{free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=up_venv.env(),
    )
    yield process, f"http://127.0.0.1:{port}"
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_chat_ui_serves_its_page(ui_process: tuple[subprocess.Popen[bytes], str],
                                 tmp_path: Path) -> None:
    """The UI's own process (Chainlit, which imports the app module and with it the data
    layer) starts and answers."""
    process, url = ui_process
    output = tmp_path / "ui.out"
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while time.monotonic() < deadline:
        said = output.read_text()
        # The supervisor restarts a UI that fails at start (as a missing dependency made it).
        assert process.poll() is None and "exited with code" not in said, said
        try:
            page = httpx.get(url, timeout=5)
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        assert page.status_code == 200 and "<html" in page.text.lower()
        return
    pytest.fail(f"the UI did not serve {url} in {UI_START_TIMEOUT_S} s: {output.read_text()}")
