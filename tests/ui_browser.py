"""What the chat UI's browser tests share (test_ui.py, test_ui_agent.py): a `qwenstack ui`
process in front of a test gateway, and signed-in sessions in a real headless Chromium.

Chromium is Debian's (/usr/bin/chromium; scripts/test installs it), driven by Playwright.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import forkhost
import httpx
import pytest
from helpers import Gateway, create_key, free_port

from qwenstack.settings import load_settings
from qwenstack.ui import store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # Without these, Chromium's own background connections are refused on sandboxed hosts.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
T = TypeVar("T")
# Generous: a loaded 2-core machine runs the engine, the gateway, Chainlit and Chromium at once.
WAIT_MS = 90_000


@dataclass
class ChatUI:
    url: str
    gateway: Gateway
    process: forkhost.Forked
    log: Path
    service_key: str  # the UI's own admin key
    passwords: dict[str, str]  # its password users

    def user_key(self, user: str) -> tuple[str, str | None]:
        """A user's gateway key name (that of their knowledge base too), and its secret once
        the UI has made it."""
        accounts = store.accounts(load_settings(home=self.gateway.home))
        try:
            return accounts.gateway_key(user)
        finally:
            accounts.engine.dispose()

    def requests(self, key_name: str) -> list[dict]:
        """The gateway's log lines of chat requests made with one user's key, oldest first."""
        lines = [json.loads(line) for line in self.gateway.log.read_text().splitlines()
                 if line.startswith("{")]
        return [line for line in lines
                if line.get("path") == "/v1/chat/completions" and line.get("key") == key_name]


@contextlib.contextmanager
def running_chat_ui(
    gateway: Gateway, tmp: Path, passwords: dict[str, str], env: dict[str, str]
) -> Iterator[ChatUI]:
    """`qwenstack ui` in front of `gateway` (auth on), with these password users and
    QWENSTACK_* settings; stopped, and the gateway too, when the block ends."""
    try:
        # Named as auth.ui_service_key says by default: the one key that makes `ui-...` bases.
        admin_key = create_key(gateway.home, "--name", "ui", "--admin")
        accounts = store.accounts(load_settings(home=gateway.home))
        for user, password in passwords.items():
            accounts.add(user, password)
        accounts.engine.dispose()
        port = free_port()
        log = tmp / "ui.out"
        process = forkhost.start(
            ["ui", "--home", str(gateway.home), "--port", str(port), "--gateway-url", gateway.url],
            stdout=log, env={**os.environ, **env, "QWENSTACK_UI__GATEWAY_ADMIN_KEY": admin_key},
        )
    except BaseException:
        gateway.stop()
        raise
    ui = ChatUI(f"http://127.0.0.1:{port}", gateway, process, log, admin_key, passwords)
    try:
        deadline = time.monotonic() + 120
        while "chat UI is ready" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield ui
    finally:
        process.terminate()
        code = process.wait(60)
        gateway.stop()
    # SIGTERM stops the UI cleanly, Chainlit's process included: nothing answers on its port.
    assert code == 0, log.read_text()[-3000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(ui.url, timeout=5)


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Chat:
    """One signed-in browser session; counts the streamed tokens its websocket receives."""

    def __init__(self, browser: object, ui: ChatUI, user: str, locale: str = "en-US") -> None:
        self.context = browser.new_context(locale=locale)  # type: ignore[attr-defined]
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.stream_tokens = 0
        self.page.on("websocket", lambda ws: ws.on("framereceived", self._count))
        self.page.goto(f"{ui.url}/login")
        self.page.locator("input:not([type=password])").first.fill(user)
        self.page.locator("input[type=password]").fill(ui.passwords[user])
        self.page.locator("button[type=submit]").click()
        self.page.locator("#chat-input").wait_for()

    def _count(self, frame: str | bytes) -> None:
        if isinstance(frame, str) and frame.startswith('42["stream_token"'):
            self.stream_tokens += 1

    def send(self, text: str) -> None:
        """Once the previous turn has ended (its last notice sent): a message typed while a
        turn runs is not sent."""
        self.page.locator("#stop-button").wait_for(state="hidden")
        self.page.locator("#chat-input").fill(text)
        self.page.locator("#chat-input").press("Enter")

    def assistant_texts(self) -> list[str]:
        return self.page.locator("[data-step-type=assistant_message]").all_inner_texts()

    def wait_for_text(self, text: str) -> None:
        self.page.get_by_text(text).first.wait_for()

    def close(self) -> None:
        self.context.close()


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """A coroutine's result, from a test that drives the browser: in a thread of its own, since
    Playwright's sync API keeps an event loop running in the test's thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def wait_on_page(page: object, condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        # Not time.sleep: Playwright's sync API delivers events (websocket frames) only while
        # one of its calls runs.
        page.wait_for_timeout(200)  # type: ignore[attr-defined]
