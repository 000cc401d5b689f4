"""Grounded chat: a chat request answered from knowledge bases, with citations.

A chat request names knowledge bases by `"knowledge_bases": [...]` or a model alias
`<model>+kb:NAME[,NAME...]`; both are taken out of the request (the engine sees neither). The
chunks retrieved for the newest user message go into a delimited user message before it, and the
answer carries them as `citations` (a stream: one `qwenstack.citations` event before
`data: [DONE]`), added through the exchange's answer hooks.
"""

from __future__ import annotations

from typing import Any

from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.knowledge_bases import Knowledge, call
from qwenstack.gateway.protocol import CHAT, InferenceRequest
from qwenstack.rag.prompt import document_tag, documents_message, grounding_instructions

KB_ALIAS = "+kb:"
CITATIONS_EVENT = "qwenstack.citations"


def take_knowledge_bases(request: InferenceRequest) -> list[str]:
    """The knowledge bases a request names, taken out of it; [] for an ordinary request.
    Cheap: it runs before validation."""
    model = request.model
    aliased = isinstance(model, str) and KB_ALIAS in model
    if "knowledge_bases" not in request and not aliased:
        return []
    names: list[str] = []
    if aliased:
        assert model is not None
        served, _, alias = model.partition(KB_ALIAS)
        request.set("model", served)
        names += [name.strip() for name in alias.split(",") if name.strip()]
    field = request.pop("knowledge_bases")
    if field is not None:
        if not (isinstance(field, list) and all(isinstance(n, str) and n for n in field)):
            raise GatewayError(400, "`knowledge_bases` must be a list of names.",
                               param="knowledge_bases", code="invalid_type")
        names += field
    if names and request.route != CHAT:
        raise GatewayError(400, "Knowledge bases apply to /v1/chat/completions only.",
                           param="knowledge_bases", code="invalid_request")
    return list(dict.fromkeys(names))


async def ground(exchange: Exchange, names: list[str], knowledge: Knowledge) -> None:
    """Put the chunks retrieved from `names` into the chat request and have the answer carry
    them as citations.

    The passages go in a user message just before the question, not in the system message:
    they are data from whoever could upload, and the system role is for the operator's and the
    gateway's own instructions (which say where the documents are). A user message and not a
    `tool` one, because Qwen3's chat template renders `tool` messages as tool responses, which
    only make sense after an assistant's tool call."""
    request = exchange.request
    question = request.question
    if not question.strip():
        raise GatewayError(400, "A grounded chat needs a user message to search with.",
                           param="messages", code="invalid_request")
    service = await knowledge.open()
    retrieved = await call(service.search, names, question, exchange.caller)
    tag = document_tag()
    messages = list(request.messages or [])
    asked = max(i for i, message in enumerate(messages)
                if isinstance(message, dict) and message.get("role") == "user")
    messages.insert(asked, {"role": "user", "content": documents_message(retrieved, tag)})
    instructions = grounding_instructions(tag)
    first = messages[0]
    if isinstance(first, dict) and first.get("role") == "system" \
            and isinstance(first.get("content"), str):
        # One system message: chat templates such as Qwen3's expect it first and only once.
        messages[0] = {**first, "content": first["content"] + "\n\n" + instructions}
    else:
        messages.insert(0, {"role": "system", "content": instructions})
    request.set("messages", messages)
    citations = [item.citation() for item in retrieved]

    def cite(answer: dict[str, Any]) -> None:
        answer["citations"] = citations

    exchange.answer.amend(cite)
    exchange.answer.add_trailer_event({"object": CITATIONS_EVENT, "citations": citations})
