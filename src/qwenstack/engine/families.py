"""vLLM's tool-call and reasoning parsers for a model, chosen from its config and chat template.

vLLM turns a model's own markup for tool calls and thinking into OpenAI's `tool_calls` and
`reasoning` fields only when it is started with the parser for that markup; without a tool
parser it refuses every request whose `tool_choice` is not "none" (`tools` alone means "auto").

With `engine.tool_call_parser` / `engine.reasoning_parser` left at "auto":
- Qwen2.5 and Qwen3 models (config.json `model_type` qwen2..., qwen3...) whose chat template
  writes tool calls get `--enable-auto-tool-choice --tool-call-parser`: `hermes` for the
  `<tool_call>` JSON blocks of Qwen2.5, Qwen3 and Qwen3-2507 (vLLM's `qwen3_json` is an alias of
  it), `qwen3_coder` for Qwen3-Coder's XML (`<function=...><parameter=...>`, which vLLM's
  `qwen3_xml` also reads).
- Qwen3 models whose chat template can think get `--reasoning-parser qwen3`: its generation
  prompt reads `enable_thinking` (Qwen3's hybrid models) or opens a `<think>` block
  (Qwen3-Thinking-2507). Qwen3-Instruct-2507 does neither, and must not get it: vLLM's qwen3
  parser would take each of its answers for reasoning until a `</think>` that never comes, and
  hold guided decoding (tool_choice required, response_format) back until then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwenstack.settings.engine import ServedModelSettings

AUTO, NONE = "auto", "none"
QWEN_FAMILIES = ("qwen2", "qwen3")
# What a chat template writes for a tool call, by the parser that reads it back.
TOOL_CALL_MARKUP = (("<function=", "qwen3_coder"), ("<tool_call>", "hermes"))
THINKING_MARKUP = ("enable_thinking", "<think>")


@dataclass(frozen=True)
class Parsers:
    """The parsers an engine runs with; None: none (vLLM's default)."""

    tool_call: str | None
    reasoning: str | None

    def flags(self) -> list[str]:
        flags = []
        if self.tool_call:
            flags += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call]
        if self.reasoning:
            flags += ["--reasoning-parser", self.reasoning]
        return flags


def choose(engine: ServedModelSettings, config: dict[str, Any], chat_template: str) -> Parsers:
    """The settings' parsers, each "auto" one found from the model (see the module's doc)."""
    return Parsers(
        _setting(engine.tool_call_parser, lambda: tool_call_parser(config, chat_template)),
        _setting(engine.reasoning_parser, lambda: reasoning_parser(config, chat_template)),
    )


def _setting(value: str, detect: Callable[[], str | None]) -> str | None:
    if value == AUTO:
        return detect()
    return None if value == NONE else value


def model_type(config: dict[str, Any]) -> str:
    return str(config.get("model_type") or "").lower()


def tool_call_parser(config: dict[str, Any], chat_template: str) -> str | None:
    if not model_type(config).startswith(QWEN_FAMILIES):
        return None
    for markup, parser in TOOL_CALL_MARKUP:
        if markup in chat_template:
            return parser
    return None


def reasoning_parser(config: dict[str, Any], chat_template: str) -> str | None:
    if not model_type(config).startswith("qwen3"):
        return None
    return "qwen3" if thinks(chat_template) else None


def thinks(chat_template: str) -> bool:
    """The template's generation prompt (what follows its last `add_generation_prompt`) reads
    `enable_thinking` or opens a `<think>` block. Earlier `<think>` text only renders the
    reasoning of past turns, as Qwen3-Instruct-2507's template does."""
    _, found, prompt = chat_template.rpartition("add_generation_prompt")
    return bool(found) and any(markup in prompt for markup in THINKING_MARKUP)


def chat_template_text(tokenizer_config: dict[str, Any], template_file: str | None) -> str:
    """The chat template(s) as text: a `chat_template.jinja` file (which transformers prefers),
    else tokenizer_config.json's `chat_template`, a string or a list of named templates (all of
    them joined: a model's `tool_use` template is where its tool markup is)."""
    if template_file is not None:
        return template_file
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        return "\n".join(str(item.get("template", "")) for item in template
                         if isinstance(item, dict))
    return template if isinstance(template, str) else ""
