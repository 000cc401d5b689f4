"""What goes to the gateway each turn: the whole history, trimmed to fit the context window.

The UI has no tokenizer for the served model (it talks only to the gateway), so fitting is
done in two steps: an estimate that errs towards too many tokens drops the oldest turns first,
then, should the engine still answer "context too long", the turn loop drops one more turn and
asks again (see app.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Tokens a message costs beyond its text: role markers and separators of the chat template.
MESSAGE_OVERHEAD_TOKENS = 8
# Qwen3's tokenizer spends about one token per Chinese character (3 UTF-8 bytes) and about four
# English characters per token; a token per 3 bytes overestimates both, which is the safe side.
BYTES_PER_TOKEN = 3


def estimate_tokens(message: dict[str, Any]) -> int:
    return len(message["content"].encode()) // BYTES_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS


def chat_models(cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The models a chat can use, of the gateway's /v1/models list (already cut to the user's
    key): role chat (a card without one, from a gateway of before roles, counts as chat), and
    no alias, which would only list its model twice under two names."""
    return [card for card in cards
            if card.get("role", "chat") == "chat" and not card.get("alias_of")]


@dataclass(frozen=True)
class Capabilities:
    """What a served model can do beyond chat, as the gateway's /v1/models describes it."""

    tool_calling: bool = False
    reasoning: bool = False

    @classmethod
    def of(cls, card: dict[str, Any], overrides: dict[str, dict[str, bool]]) -> Capabilities:
        """A model card's capabilities (none said: none), with the UI's settings over them."""
        described = card.get("capabilities")
        said = {**(described if isinstance(described, dict) else {}),
                **overrides.get(str(card.get("id")), {})}
        return cls(bool(said.get("tool_calling")), bool(said.get("reasoning")))


@dataclass
class Sampling:
    """One user's sampling settings (the settings panel)."""

    model: str
    system_prompt: str
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    max_tokens: int
    thinking: bool | None = None  # None: the model does not reason, nothing is sent

    def request(self, context_len: int | None) -> dict[str, Any]:
        """Keyword arguments for `chat.completions.create`, besides messages, tools and stream.

        top_k and min_p are vLLM's extensions to the OpenAI API, so they go as extra_body, as
        does the thinking switch (Qwen3's chat template reads `enable_thinking`). Streams end
        with a usage chunk: the turn's token counts."""
        extra: dict[str, Any] = {"top_k": self.top_k, "min_p": self.min_p}
        if self.thinking is not None:
            extra["chat_template_kwargs"] = {"enable_thinking": self.thinking}
        return {
            "model": self.model,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.answer_tokens(context_len),
            "stream_options": {"include_usage": True},
            "extra_body": extra,
        }

    def answer_tokens(self, context_len: int | None) -> int:
        # The answer shares the window with the prompt: never ask for more than half of it, so
        # a conversation always has room to go on.
        return min(self.max_tokens, context_len // 2) if context_len else self.max_tokens


@dataclass
class Conversation:
    """The turns of one chat so far, as OpenAI chat messages (user and assistant, in order)."""

    turns: list[dict[str, Any]] = field(default_factory=list)

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})

    def messages(
        self, system_prompt: str, prompt_budget: int | None, skip_turns: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """The messages to send and how many of the oldest turns were left out to fit.

        `skip_turns` leaves out that many more of the oldest turns (after the engine refused the
        estimate). Turns are left out whole, user message and answer together, so the model never
        sees an answer without its question. The newest message is always sent."""
        system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        starts = [i for i, turn in enumerate(self.turns) if turn["role"] == "user"] or [0]
        for dropped, start in enumerate(starts):
            kept = system + self.turns[start:]
            if dropped >= skip_turns and (
                prompt_budget is None or sum(map(estimate_tokens, kept)) <= prompt_budget
            ):
                return kept, dropped
        return system + self.turns[starts[-1]:], len(starts) - 1
