"""Starting the Chainlit app: its folder, secrets and database, then its process, supervised."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from qwenstack.database import SECRETS_FOLDER, secret_file, write_secret
from qwenstack.errors import SetupError
from qwenstack.keys import KeyStore, KeyStoreError
from qwenstack.processes import SupervisedProcess
from qwenstack.settings import Settings
from qwenstack.ui import knowledge, store

log = logging.getLogger(__name__)
# The readiness polls below would log a line each at info level.
logging.getLogger("httpx").setLevel(logging.WARNING)

APP_MODULE = Path(__file__).with_name("app.py")
UI_ADMIN_KEY = "ui"  # the admin key the UI makes for itself when none is configured
FIRST_USER = "admin"  # the account made on a first start, so the UI can be used at once
FIRST_USER_PASSWORD_FILE = "ui-admin-password"
STARTUP_TIMEOUT_S = 120
STEADY_RUN_S = 60  # a process that ran this long starts its restart backoff afresh

# Chainlit reads its configuration from <app root>/.chainlit/config.toml and writes a default
# there when none exists; this one is written on every start so an upgrade changes it too.
CONFIG_TOML = """\
[project]
session_timeout = 3600
user_session_timeout = 1296000

[features]
unsafe_allow_html = false
latex = false
user_message_markdown = true
# The history sent to the model is the one the user saw; editing past messages would fork it.
edit_message = false

[features.spontaneous_file_upload]
# Files sent with a message go into the user's knowledge base (knowledge.py).
enabled = true
accept = {accept}
max_files = {max_files}
max_size_mb = {max_size_mb}

[UI]
name = "Qwen"
# Reasoning ("Thinking") and tool calls show as steps of the answer (ui/turn.py).
cot = "full"
confirm_new_chat = false

[meta]
generated_by = "{version}"
"""

README = """\
# qwenstack chat

Answers come from the model the gateway serves. The settings button next to the message box
changes the model, the system prompt and the sampling values.
"""


def app_root(settings: Settings) -> Path:
    return settings.home / "ui"


def gateway_url(settings: Settings) -> str:
    if settings.ui.gateway_url:
        return settings.ui.gateway_url.rstrip("/")
    return f"http://127.0.0.1:{settings.gateway.port}"


def ui_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.ui.host in ("0.0.0.0", "::") else settings.ui.host
    return f"http://{host}:{settings.ui.port}"


def auth_secret(settings: Settings) -> str:
    if settings.ui.auth_secret:
        return settings.ui.auth_secret.get_secret_value()
    return secret_file(settings.home, "ui-auth-secret", lambda: secrets.token_urlsafe(48))


def gateway_admin_key(settings: Settings) -> str | None:
    """The admin key the UI makes users' keys with; None when the gateway has auth off."""
    if not settings.auth.enabled:
        return None
    if settings.ui.gateway_admin_key:
        return settings.ui.gateway_admin_key.get_secret_value()

    def make() -> str:
        keys = KeyStore.open(settings)
        try:
            try:
                return keys.create(UI_ADMIN_KEY, admin=True)[1]
            except KeyStoreError:  # made before, its secret file lost since: a new secret
                return keys.rotate(UI_ADMIN_KEY)[1]
        except KeyStoreError as exc:
            raise SetupError(
                f"The UI cannot make its admin key {UI_ADMIN_KEY!r}: {exc} "
                "Set ui.gateway_admin_key."
            ) from None
        finally:
            keys.engine.dispose()

    return secret_file(settings.home, "ui-admin-key", make)


def first_user_password_file(settings: Settings) -> Path:
    return settings.home / SECRETS_FOLDER / FIRST_USER_PASSWORD_FILE


def ensure_first_user(settings: Settings) -> None:
    """On a first start with password sign-in and no account yet, the account `admin` with a
    random password, saved in a 0600 file, so the UI can be used at once (its file's path is
    shown by `up` and `qwenstack ui`; `qwenstack users` manages accounts from then on)."""
    if not settings.ui.password_login:
        return
    accounts = store.accounts(settings)
    try:
        if accounts.list():
            return
        path = first_user_password_file(settings)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a UI database made afresh: its old password is void
        password = secrets.token_urlsafe(12)
        accounts.add(FIRST_USER, password)
        write_secret(path, password)
    finally:
        accounts.engine.dispose()


def sign_in_hint(settings: Settings) -> str:
    """How to sign in, for the ready banner."""
    path = first_user_password_file(settings)
    if settings.ui.password_login and path.exists():
        return f"sign in as {FIRST_USER}, password in {path}"
    return "sign-in: `qwenstack users add NAME`"


def prepare(settings: Settings) -> dict[str, str]:
    """Database, config files and secrets in place; the environment of the Chainlit process."""
    store.connect(settings).dispose()
    ensure_first_user(settings)
    root = app_root(settings)
    (root / ".chainlit").mkdir(parents=True, exist_ok=True)
    version = importlib.metadata.version("chainlit")
    accept = ", ".join(f"{json.dumps(mime)} = {json.dumps(extensions)}"
                       for mime, extensions in knowledge.ACCEPTED_UPLOADS.items())
    (root / ".chainlit" / "config.toml").write_text(CONFIG_TOML.format(
        version=version, accept=f"{{ {accept} }}", max_files=knowledge.MAX_FILES_PER_MESSAGE,
        max_size_mb=knowledge.max_upload_mb(settings.rag.max_upload_bytes)))
    (root / "chainlit.md").write_text(README)
    env = {
        **os.environ,
        "CHAINLIT_APP_ROOT": str(root),
        "CHAINLIT_AUTH_SECRET": auth_secret(settings),
        # The app reads its settings as this process does, plus what flags set here.
        "QWENSTACK_HOME": str(settings.home),
        "QWENSTACK_UI__GATEWAY_URL": gateway_url(settings),
    }
    admin_key = gateway_admin_key(settings)
    if admin_key:
        env["QWENSTACK_UI__GATEWAY_ADMIN_KEY"] = admin_key
    return env


def preflight(settings: Settings) -> None:
    """Fail at once, with what to change, when the UI could not start: Chainlit not installed
    or the port taken."""
    if importlib.util.find_spec("chainlit") is None:
        raise SetupError(
            "The chat UI needs the `ui` extra: pip install 'qwenstack[ui]' (or set "
            "QWENSTACK_UI__ENABLED=false)."
        )
    host, port = settings.ui.host, settings.ui.port
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise SetupError(
            f"The UI cannot listen on {host}:{port} ({exc.strerror}); set ui.port."
        ) from None


def command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "chainlit", "run", str(APP_MODULE), "--headless",
        "--host", settings.ui.host, "--port", str(settings.ui.port),
    ]


async def _wait_until_up(url: str, process: asyncio.subprocess.Process) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline and process.returncode is None:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return True
            await asyncio.sleep(0.5)
    return False


class _ChatUi(SupervisedProcess):
    """The Chainlit process; `on_up` hears once, the first time it answers."""

    def __init__(
        self, settings: Settings, env: dict[str, str], on_up: Callable[[str], None] | None
    ) -> None:
        super().__init__(
            "The chat UI", command(settings), settings.log_dir / "ui.log", env=env,
            cwd=app_root(settings), stable_after_s=STEADY_RUN_S,
        )
        self.url = ui_url(settings)
        self._on_up = on_up

    async def serving(self, process: asyncio.subprocess.Process) -> None:
        if await _wait_until_up(self.url, process):
            log.info("UI up at %s", self.url)
            if self._on_up:
                self._on_up(self.url)
                self._on_up = None


async def supervise(
    settings: Settings, stop: asyncio.Event, on_up: Callable[[str], None] | None = None
) -> None:
    """Run the UI until `stop` is set, restarting it with backoff when it exits."""
    preflight(settings)
    env = await asyncio.to_thread(prepare, settings)
    await _ChatUi(settings, env, on_up).run(stop)


async def serve(settings: Settings, on_up: Callable[[str], None]) -> None:
    """`qwenstack ui`: the UI alone until Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await supervise(settings, stop, on_up)
