"""One chat turn after its first request is open: the model's reasoning streams into a
"Thinking" step, its answer into the chat, and the tools it calls run as steps of their own,
their results sent back for another round, until it answers without calling any.

Rounds are bounded (`ui.max_tool_rounds`): the last one offers no tools, so the model has to
answer. Every round's usage chunk (stream_options.include_usage) adds to the turn's token
counts, shown under the answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import chainlit as cl
import openai
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from qwenstack.ui import tools
from qwenstack.ui.markdown import ImageGuard, literal_block
from qwenstack.ui.quota import Usage

CITATIONS_EVENT = "qwenstack.citations"  # the gateway sends it (its grounding.py)
# The delta fields a reasoning parser fills: vLLM 0.32 writes `reasoning`, earlier vLLM and other
# OpenAI-compatible servers `reasoning_content`.
REASONING_FIELDS = ("reasoning_content", "reasoning")
MAX_CALLS_PER_ROUND = 4

Stream = openai.AsyncStream[ChatCompletionChunk]
# Opens the next round's stream: the messages so far, and whether tools are offered.
OpenRound = Callable[[list[dict[str, Any]], bool], Awaitable[Stream]]


@dataclass
class ToolCall:
    """One call as its deltas arrive: id and name first, the arguments in pieces."""

    id: str = ""
    name: str = ""
    arguments: str = ""

    def as_message_part(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def reasoning_of(delta: ChoiceDelta) -> str:
    extra = delta.model_extra or {}
    return next((extra[name] for name in REASONING_FIELDS
                 if isinstance(extra.get(name), str)), "")


class ThinkingStep:
    """The "Thinking" step of one round, opened by its first piece of reasoning and closed
    before the answer (or a tool call) shows, so it sits above what it led to."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._step: cl.Step | None = None
        self._shown = ImageGuard()  # reasoning is model output: its images stay inert too

    async def add(self, piece: str) -> None:
        if self._step is None:
            # Entered by hand, not with `async with`: it opens and closes mid-stream. Entering
            # makes it a child of the current step (the message's run), as `async with` does.
            self._step = cl.Step(name=self.name, type="llm")
            await self._step.__aenter__()
        await self._step.stream_token(self._shown.feed(piece))

    async def close(self) -> None:
        if self._step is not None:
            await self._step.stream_token(self._shown.flush())
            await self._step.__aexit__(None, None, None)
            self._step = None


@dataclass
class Turn:
    """A turn's answer message, its offered tools and what it has used so far."""

    answer: cl.Message
    offered: dict[str, tools.Tool]
    max_rounds: int
    thinking_name: str
    usage: Usage = field(default_factory=Usage)
    citations: list[dict[str, Any]] = field(default_factory=list)
    _shown: ImageGuard = field(default_factory=ImageGuard)

    async def run(
        self, stream: Stream, messages: list[dict[str, Any]], open_round: OpenRound
    ) -> None:
        """Relay `stream` (round 0), then each further round the model's tool calls need."""
        rounds = 0
        while True:
            content, calls = await self._relay(stream)
            # The last round offers no tools: calls from it (a server that made some anyway)
            # are not run.
            if not calls or rounds >= self.max_rounds:
                break
            messages = [*messages, {"role": "assistant", "content": content or None,
                                    "tool_calls": [call.as_message_part() for call in calls]}]
            for number, call in enumerate(calls):
                result = await self._call(call, number)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
            rounds += 1
            stream = await open_round(messages, rounds < self.max_rounds)
        await self.answer.stream_token(self._shown.flush())  # a held `!`; "" is ignored

    async def _relay(self, stream: Stream) -> tuple[str, list[ToolCall]]:
        """One round's stream into the chat: its text and the tool calls it made."""
        thinking = ThinkingStep(self.thinking_name)
        content = ""
        calls: dict[int, ToolCall] = {}
        async with stream:
            async for chunk in stream:
                self.usage.add(chunk)
                if chunk.object == CITATIONS_EVENT:
                    # The gateway's last event of a grounded stream: the SDK parses it as a
                    # chunk without choices, its extra field kept in model_extra.
                    self.citations = (chunk.model_extra or {}).get("citations") or []
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if reasoning := reasoning_of(delta):
                    await thinking.add(reasoning)
                if delta.content:
                    await thinking.close()
                    content += delta.content
                    await self.answer.stream_token(self._shown.feed(delta.content))
                for piece in delta.tool_calls or ():
                    call = calls.setdefault(piece.index, ToolCall())
                    call.id = piece.id or call.id
                    if piece.function:
                        call.name = piece.function.name or call.name
                        call.arguments += piece.function.arguments or ""
        await thinking.close()
        for call in calls.values():
            call.id = call.id or f"call-{uuid.uuid4().hex[:12]}"
        return content, list(calls.values())

    async def _call(self, call: ToolCall, number: int) -> str:
        """Run one call in a step of its own; its result (or error) for the model."""
        async with cl.Step(name=call.name or "?", type="tool", show_input=True) as step:
            # Written by the model: shown verbatim, never as Markdown.
            step.input = literal_block(call.arguments.splitlines() or ["{}"])
            if number >= MAX_CALLS_PER_ROUND:
                result, failed = (f"Error: at most {MAX_CALLS_PER_ROUND} tool calls are run "
                                  "per answer round."), True
            else:
                result, failed = await tools.run(self.offered, call.name, call.arguments)
            step.output = literal_block(result.splitlines() or [""])
            step.is_error = failed
        return result
