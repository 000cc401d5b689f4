"""The chat UI's agent features: reasoning and tool calls as steps, token counts and the key's
quota under each answer, the thinking switch; and the tools themselves (time, calculator).

The browser test runs the real engine (the session stack's tiny random-weight Qwen3, started
with vLLM's qwen3 reasoning parser, the hermes tool parser and thinking off unless a request
turns it on: conftest.py). Random weights neither reason nor call tools of their own accord;
what makes each step appear here is the engine, not a fake:
- reasoning: with `enable_thinking: true` (the switch on), vLLM's qwen3 parser starts in its
  reasoning state and reads every token until a `</think>` as reasoning; the random model never
  writes one, so the whole answer streams as `reasoning` deltas and shows in a Thinking step.
- tools: the UI is set to name a tool (`ui.tool_choice: current_time`, a documented setting),
  which vLLM enforces by constrained decoding, so the first round is a call of that tool; with
  `ui.max_tool_rounds: 1` the next round offers none and the model answers. Its arguments are
  the random model's, so the tool's result may be an error, which is shown as the step's output
  and sent back to the model like any result.
The UI learns what the model can do from the gateway's /v1/models `capabilities`: this gateway
is told the engine's parsers (`engine.tool_call_parser`, `engine.reasoning_parser`), as an
operator tells a gateway in front of remote engines.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import start_gateway
from ui_browser import Chat, ChatUI, run_async, running_chat_ui, wait_on_page

from qwenstack.settings import load_settings
from qwenstack.ui import tools
from qwenstack.ui.calculator import CalculationError, calculate, formatted
from qwenstack.ui.conversation import Capabilities, Sampling
from qwenstack.ui.quota import Usage, summary

MODEL = "tiny-qwen3"
PASSWORDS = {"ada": "ada-password-1"}
ANSWER_TOKENS = 48  # room for a whole tool call of the tiny model
USAGE_LINE = re.compile(r"Tokens: ([\d,]+) prompt, ([\d,]+) completion\. Your key has (\d+) of "
                        r"100 requests and ([\d,]+) of 100,000 tokens left this minute\.")


# ---- the tools, without a browser -------------------------------------------------------


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("-7 % 3", "2"),
    ("2 ** 10", "1024"), ("2 ** -1", "0.5"), ("2 ** 0.5", "1.4142135623731"), ("-(-3)", "3"),
    ("10 ** 100", "1" + "0" * 100), ("0.1 + 0.2", "0.3"), (" 42 ", "42"),
    ("(" * 99 + "1" + ")" * 99, "1"),  # as deep as 200 characters go: no recursion trouble
])
def test_calculator_computes_arithmetic(expression: str, value: str) -> None:
    assert formatted(calculate(expression)) == value


@pytest.mark.parametrize("expression, says", [
    ("9**9**9", "Exponents are limited"),  # refused before 9**387420489 is attempted
    ("2 ** 1001", "Exponents are limited"),
    ("10 ** 101", "more than 100 digits"),
    ("1.5 ** 1000", "more than 100 digits"),
    ("(10 ** 60) * (10 ** 60)", "limited to 10**100"),
    ("1" * 101, "limited to 10**100"),
    ("1e999", "not a finite number"),
    ("1 " + "+ 1 " * 100, "longer than 200 characters"),
    ("1 / 0", "Division by zero"), ("1 // 0", "Division by zero"), ("1 % 0", "Division by zero"),
    ("0 ** -1", "Zero cannot be raised"),
    ("(-8) ** (1 / 3)", "not a real number"),
    ("__import__('os').system('id')", "not Call"),
    ("x + 1", "not Name"),
    ("(1).__class__", "not Attribute"),
    ("'a' * 3", "Only numbers"),
    ("True + 1", "Only numbers"),
    ("1j * 2", "Only numbers"),
    ("[1, 2]", "not List"),
    ("1 if 1 else 2", "not IfExp"),
    ("lambda: 1", "not Lambda"),
    ("1 < 2", "not Compare"),
    ("~1", "not UnaryOp"),
    ("1 << 100", "not BinOp"),
    ("1; 2", "Not an arithmetic expression"),
    ("", "Not an arithmetic expression"),
])
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression: str, says: str) -> None:
    with pytest.raises(CalculationError, match=re.escape(says)):
        calculate(expression)


def test_time_tool_names_zones_from_the_tz_database_only() -> None:
    noon = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    assert tools.current_time(None, noon) == "2026-11-29T12:00:00+00:00 (Sunday, UTC)"
    assert tools.current_time("Asia/Shanghai", noon) == (
        "2026-11-29T20:00:00+08:00 (Sunday, Asia/Shanghai)")
    assert tools.current_time("America/New_York", noon).startswith("2026-11-29T07:00:00-05:00")
    for name in ("Mars/Olympus", "../../../../etc/passwd", "/etc/localtime", "Europe/Paris\0",
                 "Europe/../Asia/Tokyo", "A" * 65, "", "UTC\n"):
        if name:
            with pytest.raises(tools.ToolError, match="Unknown time zone"):
                tools.current_time(name, noon)
    assert tools.current_time("", noon).endswith("(Sunday, UTC)")  # empty: as none given


def test_a_tool_failure_is_the_call_s_result_never_an_exception() -> None:
    offered = tools.offered(True, True, None)
    assert sorted(offered) == ["calculator", "current_time"]  # no documents: no search

    def run(name: str, arguments: str) -> tuple[str, bool]:
        return run_async(tools.run(offered, name, arguments))

    assert run("calculator", '{"expression": "6 * 7"}') == ("42", False)
    result, failed = run("current_time", '{"timezone": "Asia/Tokyo"}')
    assert not failed and "+09:00" in result
    for name, arguments, says in [
        ("calculator", '{"expression": "9**9**9"}', "Exponents are limited"),
        ("calculator", '{"expression": 42}', "must be a string"),
        ("calculator", "{}", "must be a string"),
        ("current_time", '{"timezone": ["UTC"]}', "must be a string"),
        ("current_time", '"-"', "must be a JSON object"),  # what the tiny model writes
        ("current_time", '{"timezone": "Asia/Shanghai"', "not valid JSON"),  # cut off
        ("current_time", "{" + " " * 2000 + "}", "longer than 2000 characters"),
        ("rm_rf", "{}", "no tool named 'rm_rf'"),
        ("search_documents", '{"query": "x"}', "no tool named"),  # not offered
    ]:
        result, failed = run(name, arguments)
        assert failed and result.startswith("Error: ") and says in result, result


def test_tools_follow_capabilities_and_the_tool_choice_setting() -> None:
    assert tools.offered(True, False, None) == {}  # the model does not call tools
    assert tools.offered(False, True, None) == {}  # ui.tools off
    offered = tools.offered(True, True, None)
    assert tools.tool_choice("auto", offered) == "auto"
    assert tools.tool_choice("required", offered) == "required"
    assert tools.tool_choice("current_time", offered) == {
        "type": "function", "function": {"name": "current_time"}}
    assert tools.tool_choice("search_documents", offered) == "auto"  # not offered this turn
    spec = offered["calculator"].spec()
    assert spec["type"] == "function" and spec["function"]["parameters"]["required"] == [
        "expression"]

    card = {"id": MODEL, "capabilities": {"tool_calling": True, "reasoning": False}}
    assert Capabilities.of(card, {}) == Capabilities(tool_calling=True, reasoning=False)
    assert Capabilities.of({"id": MODEL}, {}) == Capabilities()  # not described: none
    assert Capabilities.of(card, {MODEL: {"reasoning": True}}) == Capabilities(True, True)


def test_requests_ask_for_usage_and_carry_the_thinking_switch_only_where_it_applies() -> None:
    ui = load_settings().ui
    plain = Sampling(MODEL, "", ui.temperature, ui.top_p, ui.top_k, ui.min_p, 64)
    assert plain.request(1024)["stream_options"] == {"include_usage": True}
    assert "chat_template_kwargs" not in plain.request(1024)["extra_body"]
    for thinking in (True, False):
        sampling = Sampling(MODEL, "", ui.temperature, ui.top_p, ui.top_k, ui.min_p, 64, thinking)
        assert sampling.request(1024)["extra_body"]["chat_template_kwargs"] == {
            "enable_thinking": thinking}


def test_the_usage_line_says_counts_and_what_the_key_has_left() -> None:
    usage = Usage(prompt_tokens=1234, completion_tokens=56, requests=2)
    limited = {"limits": {"requests_per_minute": 100, "tokens_per_minute": 100000},
               "remaining": {"requests": 97, "tokens": 98710}}
    assert summary(usage, limited, "en") == (
        "*Tokens: 1,234 prompt, 56 completion. Your key has 97 of 100 requests and 98,710 of "
        "100,000 tokens left this minute.*")
    only_tokens = {"limits": {"requests_per_minute": None, "tokens_per_minute": 500},
                   "remaining": {"requests": None, "tokens": 12}}
    assert "还可用 12/500 个 token" in summary(usage, only_tokens, "zh")
    unlimited = {"limits": {}, "remaining": {"requests": None, "tokens": None}}
    assert summary(usage, unlimited, "en").endswith("Your key has no rate limits.*")
    assert summary(usage, None, "en") == "*Tokens: 1,234 prompt, 56 completion. *"


# ---- in the browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_ui(engine_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatUI]:
    tmp = tmp_path_factory.mktemp("ui-agent")
    gateway = start_gateway(tmp, engine_url, auth=True, env={
        "QWENSTACK_ENGINE__TOOL_CALL_PARSER": "hermes",
        "QWENSTACK_ENGINE__REASONING_PARSER": "qwen3",
    })
    with running_chat_ui(gateway, tmp, PASSWORDS, {
        "QWENSTACK_UI__MAX_TOKENS": str(ANSWER_TOKENS),
        "QWENSTACK_UI__TOOL_CHOICE": "current_time",
        "QWENSTACK_UI__MAX_TOOL_ROUNDS": "1",
        "QWENSTACK_UI__USER_KEY_RPM": "100",
        "QWENSTACK_UI__USER_KEY_TPM": "100000",
    }) as ui:
        yield ui


def _usage_lines(chat: Chat) -> list[re.Match[str]]:
    body = chat.page.locator("body").inner_text()
    return list(USAGE_LINE.finditer(body))


def test_reasoning_and_tool_calls_show_as_steps_with_token_counts_and_quota(
    agent_ui: ChatUI, browser: object, screenshots: Path
) -> None:
    ada = Chat(browser, agent_ui, "ada")
    ada.wait_for_text("Welcome to the")
    key = agent_ui.user_key("ada")[0]

    # Thinking on (the switch's default): the answer streams into a Thinking step.
    ada.send("What time is it in Shanghai?")
    thinking = ada.page.locator("[data-step-type=llm]").first
    thinking.wait_for()
    wait_on_page(ada.page, lambda: len(_usage_lines(ada)) == 1, "the first usage line")
    ada.page.locator("#step-Thinking").first.click()  # collapsed: opened to read it
    wait_on_page(ada.page, lambda: len(thinking.inner_text()) > len("Used Thinking") + 5,
                 "the reasoning text")
    ada.wait_for_text("The model gave no answer")  # it never left its reasoning
    (first,) = agent_ui.requests(key)
    counts = _usage_lines(ada)[0]
    # The counts are the gateway's; the key's quota is its own (its buckets refill as time
    # passes: what is left is checked exactly in test_per_key.py).
    assert (counts[1], counts[2]) == (str(first["prompt_tokens"]), str(first["completion_tokens"]))
    assert first["completion_tokens"] == ANSWER_TOKENS
    assert int(counts[3]) <= 100 and int(counts[4].replace(",", "")) <= 100_000
    ada.page.screenshot(path=str(screenshots / "ada-thinking.png"))

    # Thinking off: the first round is a call of the named tool, run as a step; the next
    # round, without tools, is the answer.
    ada.page.locator("#chat-settings-open-modal").click()
    ada.page.locator("#thinking").click()
    ada.page.locator("#confirm").click()
    ada.page.locator("#confirm").wait_for(state="hidden")
    ada.send("And in Paris?")
    tool_step = ada.page.locator("#step-current_time").first
    tool_step.wait_for()
    wait_on_page(ada.page, lambda: len(_usage_lines(ada)) == 2, "the second usage line")
    tool_step.click()
    shown = ada.page.locator("[data-step-type=tool]").first.inner_text()
    # The tool's result, or its error (the random model's arguments), is the step's output.
    assert "Error: " in shown or re.search(r"\d{4}-\d\d-\d\dT", shown), shown
    wait_on_page(ada.page, lambda: ada.assistant_texts()[-2:][0].strip() != "",
                 "the answer after the tool call")
    calls, answer = agent_ui.requests(key)[1:]
    assert calls["status"] == answer["status"] == 200
    counts = _usage_lines(ada)[1]
    # One line for the turn: both requests' tokens.
    assert int(counts[1].replace(",", "")) == calls["prompt_tokens"] + answer["prompt_tokens"]
    assert int(counts[2]) == calls["completion_tokens"] + answer["completion_tokens"]
    ada.page.screenshot(path=str(screenshots / "ada-tool-step.png"))
    ada.close()
