"""The Chainlit app (`chainlit run` loads this file; `qwenstack ui` does that).

Each turn sends the whole conversation to the gateway's /v1/chat/completions with the user's own
key and streams the answer into the chat. Files sent with a message go into the user's own
knowledge base (knowledge.py); turns ask the gateway to ground the answer on the base picked in
the settings (documents.py: that one by default, once it holds documents, or a team base the
user's key may read), and its citations are shown as sources, each passage a click away.
Nothing here talks to an engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from pathlib import Path
from typing import Any, cast

import chainlit as cl
import httpx
import openai
from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
from chainlit.input_widget import NumberInput, Select, Slider, Switch, TextInput
from chainlit.session import WebsocketSession
from chainlit.types import ThreadDict
from openai.types.chat import ChatCompletionMessageParam

from qwenstack.settings import load_settings
from qwenstack.ui import documents, server, store, tools
from qwenstack.ui.conversation import Capabilities, Conversation, Sampling, chat_models
from qwenstack.ui.failures import MessageTooLong, context_too_long, explain
from qwenstack.ui.gateway_keys import KeyUnavailable, UserKeys
from qwenstack.ui.knowledge import KnowledgeBaseClient, Readable, ServiceKey, UploadRefused
from qwenstack.ui.quota import own_quota, summary
from qwenstack.ui.texts import language_of, starters, text
from qwenstack.ui.turn import Stream, Turn

log = logging.getLogger("qwenstack.ui")

settings = load_settings()
ui = settings.ui
gateway_url = server.gateway_url(settings)
accounts = store.accounts(settings)
user_keys = UserKeys(ui, gateway_url, accounts)
service_key = ServiceKey(settings.auth.ui_service_key, user_keys.admin_key)
MAX_FIT_ATTEMPTS = 8
ANSWER = "answer"  # metadata kind of the model's answers, the only assistant messages replayed
NO_MODEL = "-"  # the settings panel's model while the gateway lists none


@cl.data_layer
def data_layer() -> SQLAlchemyDataLayer:
    return SQLAlchemyDataLayer(conninfo=store.async_database_url(settings))


if ui.password_login:

    @cl.password_auth_callback
    async def password_sign_in(username: str, password: str) -> cl.User | None:
        if await asyncio.to_thread(accounts.check_password, username, password):
            return cl.User(identifier=username, metadata={"sign_in": "password"})
        return None


if ui.header_login and ui.header_login_secret:  # the settings refuse one without the other
    header = ui.header_login
    proxy_secret = ui.header_login_secret.get_secret_value().encode()

    @cl.header_auth_callback
    async def header_sign_in(headers: Any) -> cl.User | None:
        # Only requests the SSO proxy made carry its secret: a client that reached the UI
        # another way cannot name itself anyone. Compared in constant time.
        presented = (headers.get(ui.header_login_secret_header) or "").encode()
        if not hmac.compare_digest(presented, proxy_secret):
            return None
        identifier = (headers.get(header) or "").strip()
        if not identifier or len(identifier) > 256:
            return None
        # A password user signs in with the password: a header naming them is refused, should
        # the proxy's users and the UI's password users share a name.
        if await asyncio.to_thread(accounts.has_password, identifier):
            log.warning("Header sign-in refused for %r: that user has a password", identifier)
            return None
        await asyncio.to_thread(accounts.ensure, identifier)
        return cl.User(identifier=identifier, metadata={"sign_in": "header"})


def _language() -> str:
    session = cl.context.session
    # Chat handlers run in a websocket session, the one that knows the browser's language.
    return language_of(session.language if isinstance(session, WebsocketSession) else None)


def _say(key: str, **values: object) -> cl.Message:
    """A notice in the chat (an error, a trimmed history): kept, but never sent to the model."""
    return cl.Message(content=text(key, _language(), **values), metadata={"kind": "notice"})


@cl.set_starters
async def set_starters(user: cl.User | None, language: str | None = None) -> list[cl.Starter]:
    return [cl.Starter(label=label, message=message)
            for label, message in starters(language_of(language))]


async def _client(refused: str | None = None) -> openai.AsyncOpenAI:
    user: cl.User = cl.user_session.get("user")
    key = await user_keys.key(user.identifier, refused)
    cl.user_session.set("key", key)
    client = cl.user_session.get("client")
    if client is None or client.api_key != key.secret:
        client = openai.AsyncOpenAI(
            base_url=f"{gateway_url}/v1", api_key=key.secret,
            # Errors go straight to the user, who can try again: retrying here would only hide
            # a down gateway or a rate limit behind a long wait.
            max_retries=0,
            # The SDK's own Timeout class (httpx2's): an httpx one is converted to it anyway.
            timeout=openai.Timeout(ui.request_timeout_s, connect=5),
        )
        cl.user_session.set("client", client)
    return client


async def _knowledge_base(
    refused: str | None = None, base: str | None = None
) -> KnowledgeBaseClient:
    """The calls on `base`, by default the user's own uploads base."""
    await _client(refused)
    return KnowledgeBaseClient(gateway_url, cl.user_session.get("key"), service_key,
                               ui.request_timeout_s, base)


async def _readable() -> list[Readable]:
    """The bases the settings panel offers: the user's own alone when the gateway lists none
    (no knowledge bases there, or unreachable: the chat works without)."""
    own = await _knowledge_base()
    try:
        return await own.readable()
    except (UploadRefused, httpx.TransportError) as exc:
        log.info("No team knowledge bases for this chat: %r", exc)
        return [Readable(own.name, True, True)]


async def _document_count() -> int:
    """Files in the user's knowledge base; 0 when there is none, or the gateway keeps none."""
    try:
        return await (await _knowledge_base()).document_count()
    except (UploadRefused, KeyUnavailable, httpx.TransportError) as exc:
        # Uploading says why, should the user try; until then the chat works without documents.
        log.info("No knowledge base for this chat: %r", exc)
        return 0


async def _models() -> list[dict[str, Any]]:
    """The chat models the user's key may use, for the settings panel's list."""
    client = await _client()
    try:
        page = await client.models.list()
    except openai.AuthenticationError:
        client = await _client(refused=client.api_key)
        page = await client.models.list()
    return chat_models([model.model_dump() for model in page.data])


async def _start_session(conversation: Conversation) -> None:
    """Models, settings panel and history for a new or resumed chat."""
    cl.user_session.set("conversation", conversation)
    language = _language()
    models: list[dict[str, Any]] | None = None
    try:
        models = await _models()
    except Exception as exc:  # noqa: BLE001 - whatever it was, the user is told in the chat
        await _report(exc)
    cl.user_session.set("documents", await _document_count() if models else 0)
    readable = await _readable() if models else [Readable("", True, True)]
    cl.user_session.set("readable", readable)
    context_lens = {m["id"]: m.get("max_model_len") for m in models or ()}
    cl.user_session.set("context_lens", context_lens)
    capabilities = {m["id"]: Capabilities.of(m, ui.model_capabilities) for m in models or ()}
    cl.user_session.set("capabilities", capabilities)
    names = list(context_lens) or [NO_MODEL]
    # Shown when some model reasons; sent only for such a model (_apply_settings).
    reasoning = any(c.reasoning for c in capabilities.values())
    thinking = [Switch(id="thinking", label=text("setting_thinking", language),
                       initial=ui.thinking)] if reasoning else []
    values = await cl.ChatSettings([
        Select(id="model", label=text("setting_model", language), values=names, initial_index=0),
        TextInput(id="system_prompt", label=text("setting_system_prompt", language),
                  initial=ui.system_prompt, multiline=True),
        Slider(id="temperature", label=text("setting_temperature", language),
               initial=ui.temperature, min=0, max=2, step=0.05),
        Slider(id="top_p", label=text("setting_top_p", language),
               initial=ui.top_p, min=0.05, max=1, step=0.05),
        NumberInput(id="max_tokens", label=text("setting_max_tokens", language),
                    initial=ui.max_tokens),
        # On: grounded on the picked base (the user's own uploads: once there are some).
        Switch(id="use_documents", label=text("setting_use_documents", language), initial=True),
        documents.picker(readable, language),
        *thinking,
    ]).send()
    _apply_settings(values)
    if models == []:  # the gateway answered, but serves nothing (None: _report said why)
        await _say("no_model").send()


def _apply_settings(values: dict[str, Any]) -> None:
    try:
        max_tokens = max(1, int(values.get("max_tokens") or ui.max_tokens))
    except (TypeError, ValueError):
        max_tokens = ui.max_tokens
    model = values.get("model") or NO_MODEL
    reasons = _capabilities(model).reasoning
    cl.user_session.set("sampling", Sampling(
        model=model,
        system_prompt=values.get("system_prompt") or "",
        temperature=float(values.get("temperature", ui.temperature)),
        top_p=float(values.get("top_p", ui.top_p)),
        top_k=ui.top_k,
        min_p=ui.min_p,
        max_tokens=max_tokens,
        thinking=bool(values.get("thinking", ui.thinking)) if reasons else None,
    ))
    cl.user_session.set("use_documents", bool(values.get("use_documents", True)))
    cl.user_session.set("knowledge_base", documents.chosen(values, cl.user_session.get("readable")))


def _capabilities(model: str) -> Capabilities:
    return (cl.user_session.get("capabilities") or {}).get(model, Capabilities())


@cl.on_chat_start
async def on_chat_start() -> None:
    await _start_session(Conversation())
    sampling: Sampling = cl.user_session.get("sampling")
    if sampling.model != NO_MODEL:
        await cl.Message(content=text("welcome", _language(), model=sampling.model),
                         actions=[documents.files_button(_language())],
                         metadata={"kind": "notice"}).send()


@cl.on_chat_resume
async def on_chat_resume(thread: ThreadDict) -> None:
    conversation = Conversation()
    for step in sorted(thread["steps"], key=lambda s: s.get("createdAt") or ""):
        metadata = step.get("metadata") or {}
        if isinstance(metadata, str):
            metadata = json.loads(metadata or "{}")
        if step["type"] == "user_message":
            conversation.add("user", step.get("output") or "")
        elif step["type"] == "assistant_message" and metadata.get("kind") == ANSWER:
            conversation.add("assistant", step.get("output") or "")
    await _start_session(conversation)


@cl.on_settings_update
async def on_settings_update(values: dict[str, Any]) -> None:
    before: Readable = cl.user_session.get("knowledge_base")
    _apply_settings(values)
    after: Readable = cl.user_session.get("knowledge_base")
    if after != before:
        await documents.chosen_notice(after, _language()).send()


@cl.action_callback(documents.SHOW_FILES)
async def on_show_files(action: cl.Action) -> None:
    base: Readable = cl.user_session.get("knowledge_base")
    try:
        files = await (await _knowledge_base(base=base.name)).files()
    except Exception as exc:  # noqa: BLE001 - whatever it was, the user is told in the chat
        await _report(exc)
        return
    await documents.files_message(base, files, _language()).send()


@cl.action_callback(documents.DELETE_FILE)
async def on_delete_file(action: cl.Action) -> None:
    deletable = documents.deletable(action.payload, cl.user_session.get("readable") or [])
    if deletable is None:
        return
    base, file_name = deletable
    try:
        await (await _knowledge_base(base=base.name)).delete_file(file_name)
    except Exception as exc:  # noqa: BLE001 - whatever it was, the user is told in the chat
        await _report(exc)
        return
    await action.remove()
    if base.own:
        cl.user_session.set("documents", await _document_count())
    await documents.deleted_notice(base, file_name, _language()).send()


@cl.on_message
async def on_message(message: cl.Message) -> None:
    conversation: Conversation = cl.user_session.get("conversation")
    if cl.user_session.get("sampling").model == NO_MODEL:
        # The gateway had no model when this chat started (down, or engines loading): ask again.
        await _start_session(conversation)
    sampling: Sampling = cl.user_session.get("sampling")
    if sampling.model == NO_MODEL:
        return  # _start_session told the user why
    uploads = [element for element in message.elements or () if element.path]
    if uploads and not await _ingest(uploads):
        return  # refused: the user was told, and the question would miss its documents
    if not message.content.strip():
        return  # files alone: nothing to answer
    conversation.add("user", message.content)
    answer = cl.Message(content="", metadata={"kind": ANSWER})
    try:
        turn = await _answer(conversation, sampling, answer)
    except asyncio.CancelledError:
        # The stop button: leaving `async with stream` in _answer closed the gateway connection,
        # which makes the gateway abort the engine's request. What came so far stays in the chat.
        if answer.content:
            conversation.add("assistant", answer.content)
            await answer.send()
        raise
    except Exception as exc:  # noqa: BLE001 - whatever it was, the user is told in the chat
        conversation.turns.pop()  # unanswered: not part of what the model saw
        await _report(exc, model=sampling.model)
        return
    conversation.add("assistant", answer.content)
    # Only thought, or only called tools, until its tokens ran out: no empty bubble.
    await (answer if answer.content else _say("no_answer")).send()
    if turn.citations:
        # A notice, not part of the answer: the model never sees it in later turns.
        await documents.sources_notice(turn.citations, _language()).send()
    quota = await own_quota(gateway_url, cl.user_session.get("key"), ui.request_timeout_s)
    await cl.Message(content=summary(turn.usage, quota, _language()),
                     metadata={"kind": "notice"}).send()


async def _ingest(uploads: list[cl.Element]) -> bool:
    """Put the message's files into the user's knowledge base, saying in the chat how it went."""
    try:
        files = [(element.name, await asyncio.to_thread(Path(element.path).read_bytes))
                 for element in uploads]
        knowledge_base = await _knowledge_base()
        try:
            results = await knowledge_base.upload(files)
        except UploadRefused as exc:
            if exc.status != 401:
                raise
            # The key was rotated meanwhile (see _client): once more with the current one.
            refused = knowledge_base.key.secret
            results = await (await _knowledge_base(refused=refused)).upload(files)
    except Exception as exc:  # noqa: BLE001 - whatever it was, the user is told in the chat
        await _report(exc)
        return False
    for result in results:
        await _say(f"file_{result.status}", file=result.name, chunks=result.chunks).send()
    cl.user_session.set("documents", max(1, cl.user_session.get("documents") or 0))
    return True


async def _answer(conversation: Conversation, sampling: Sampling, answer: cl.Message) -> Turn:
    """Stream the answer to the newest message, fitting the history into the context window
    and running the tools the model calls (turn.py)."""
    context_len = cl.user_session.get("context_lens", {}).get(sampling.model)
    request = sampling.request(context_len)
    base: Readable = cl.user_session.get("knowledge_base")
    # The own base's files counted afresh each turn: counting checks the base is still the
    # user's own (knowledge.py). A team base is the gateway's to check: it answers 404 to a key
    # that lost its grant.
    grounded = bool(cl.user_session.get("use_documents") and (
        not base.own or (cl.user_session.get("documents") and await _document_count())))
    name = cl.user_session.get("key").name if base.own else base.name
    if grounded:
        # The gateway retrieves from it with the newest message and answers with citations.
        request["extra_body"]["knowledge_bases"] = [name]
    offered = tools.offered(ui.tools, _capabilities(sampling.model).tool_calling,
                            await _knowledge_base(base=name) if grounded else None)
    turn = Turn(answer, offered, ui.max_tool_rounds, text("thinking", _language()))
    budget = context_len - request["max_tokens"] if context_len else None
    client = await _client()

    async def open_round(messages: list[dict[str, Any]], offer_tools: bool) -> Stream:
        if offer_tools and offered:
            request["tools"] = [tool.spec() for tool in offered.values()]
            request["tool_choice"] = tools.tool_choice(ui.tool_choice, offered)
        else:
            request.pop("tools", None)
            request.pop("tool_choice", None)
        # The turns are role/content dicts, which is what the SDK's message TypedDicts are;
        # and stream=True gives a stream, which the SDK's overloads cannot tell past `**request`.
        created = await client.chat.completions.create(
            messages=cast(list[ChatCompletionMessageParam], messages), stream=True, **request
        )
        return cast(Stream, created)

    key_renewed = False
    skip = 0
    for _ in range(MAX_FIT_ATTEMPTS):
        messages, dropped = conversation.messages(sampling.system_prompt, budget, skip)
        try:
            stream = await open_round(messages, True)
        except openai.AuthenticationError:
            if key_renewed:
                raise
            # Rotated by another session of this user, or by an admin: get the current one.
            client = await _client(refused=client.api_key)
            key_renewed = True
            continue
        except openai.BadRequestError as exc:
            if not context_too_long(exc):
                raise
            if len(messages) <= 1 + bool(sampling.system_prompt.strip()):
                raise MessageTooLong(context_len) from None
            skip = dropped + 1
            continue
        if dropped:
            await _say("trimmed", context=context_len, turns=dropped).send()
        await turn.run(stream, messages, open_round)
        return turn
    raise MessageTooLong(context_len)


async def _report(exc: Exception, model: str = NO_MODEL) -> None:
    """Tell the user what went wrong, in their language; the log keeps the details."""
    log.info("Chat request failed: %r", exc)
    explained = explain(exc, model=model, gateway_url=gateway_url, timeout_s=ui.request_timeout_s)
    if explained is None:
        log.exception("Unexpected error in a chat turn", exc_info=exc)
        explained = ("gateway_error", {"status": "-", "message": type(exc).__name__})
    key, values = explained
    await _say(key, **values).send()
