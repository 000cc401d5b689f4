"""Which knowledge base grounds a chat, its files, and the passages an answer cites.

The settings panel offers the user's own uploads base (the default) and the team bases their
gateway key may read, as the gateway lists them for that key (knowledge.py). A "Files" button
lists the chosen base's files, with a delete button each where the key may write the base.
Whatever the browser sends back (a pick, a button's payload) is checked against what this
session offered: the gateway refuses anything else anyway, but the UI never even asks.
"""

from __future__ import annotations

from typing import Any

import chainlit as cl
from chainlit.input_widget import Select

from qwenstack.ui.knowledge import Readable, sources
from qwenstack.ui.markdown import literal_block
from qwenstack.ui.texts import text

SETTING = "knowledge_base"  # the settings panel's select
# Action names, with their callbacks in app.py. Chainlit names a chat after its first
# interaction, which may be a click: these read as a chat's name.
SHOW_FILES = "Files"
DELETE_FILE = "Delete a file"
MAX_LISTED_FILES = 50  # delete buttons per list: a base of thousands of files is not a chat's job
PASSAGE_CHARS = 4000  # a chunk is far smaller; bounds what a citation can put in the page


def picker(readable: list[Readable], language: str) -> Select:
    """The settings panel's select: the user's own uploads first (the default), then team
    bases by name. Labels are unique: a base name cannot hold the own label's space."""
    items = {(text("own_documents", language) if base.own else base.name): base.name
             for base in readable}
    return Select(id=SETTING, label=text("setting_knowledge_base", language), items=items,
                  initial_value=readable[0].name)


def chosen(values: dict[str, Any], readable: list[Readable]) -> Readable:
    """The base the settings pick, if this session offered it; else the user's own."""
    picked = values.get(SETTING)
    return next((base for base in readable if base.name == picked), readable[0])


def label(base: Readable, language: str) -> str:
    return text("own_documents", language) if base.own else base.name


def _notice(content: str, **kwargs: Any) -> cl.Message:
    """Kept in the chat, never sent to the model (app.py replays answers only)."""
    return cl.Message(content=content, metadata={"kind": "notice"}, **kwargs)


def chosen_notice(base: Readable, language: str) -> cl.Message:
    return _notice(text("documents_chosen", language, base=label(base, language)),
                   actions=[files_button(language)])


def deletable(payload: Any, readable: list[Readable]) -> tuple[Readable, str] | None:
    """The base and file a delete button names, if this session offered that base as
    writable: the payload comes back from the browser."""
    payload = payload if isinstance(payload, dict) else {}
    base = next((b for b in readable if b.name == payload.get("base") and b.writable), None)
    file_name = payload.get("file")
    return (base, file_name) if base is not None and isinstance(file_name, str) else None


def deleted_notice(base: Readable, file_name: str, language: str) -> cl.Message:
    return _notice(text("file_deleted", language, base=label(base, language)) + "\n\n"
                   + literal_block([file_name]))


def files_button(language: str) -> cl.Action:
    return cl.Action(name=SHOW_FILES, payload={}, label=text("files_button", language),
                     icon="folder")


def files_message(base: Readable, files: list[dict[str, Any]], language: str) -> cl.Message:
    """The base's files as literal lines (names come from whoever uploaded them), with a
    delete button each when the key may write the base."""
    if not files:
        return _notice(text("no_files", language, base=label(base, language)))
    shown = files[:MAX_LISTED_FILES]
    lines = [f"{item['name']} ({item.get('chunks', '?')} chunks, {item.get('bytes', '?')} bytes)"
             for item in shown]
    more = len(files) - len(shown)
    content = text("files", language, base=label(base, language), count=len(files)) + "\n\n" + \
        literal_block(lines) + (f"\n\n(+{more})" if more else "")
    actions = [cl.Action(name=DELETE_FILE, payload={"base": base.name, "file": item["name"]},
                         label=text("delete_button", language, file=item["name"]),
                         icon="trash-2") for item in shown] if base.writable else []
    return _notice(content, actions=actions)


def sources_notice(citations: list[dict[str, Any]], language: str) -> cl.Message:
    """The citations, one line each (knowledge.sources), and each cited passage whole, as a
    side panel the notice links to by name (its number and page); shown as code, so nothing in
    a document becomes a link or image."""
    elements = []
    for number, citation in enumerate(citations, 1):
        name = text("passage", language, number=number)
        if citation.get("page"):
            name += text("passage_page", language, page=citation["page"])
        elements.append(cl.Text(name=name, display="side", language="text",
                                content=str(citation.get("text") or "")[:PASSAGE_CHARS]))
    links = text("passages", language, passages=" · ".join(e.name for e in elements))
    return _notice(text("sources", language, sources=sources(citations)) + f"\n\n{links}",
                   elements=list(elements))
