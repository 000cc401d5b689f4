"""Tool calls in answers, counted for the usage records and metrics without parsing a stream.

vLLM writes each tool call's `"type":"function"` once: in the first delta of a streamed call,
in each call of a whole answer. Inside any JSON string (content, reasoning, a call's arguments,
logprobs' tokens) quotes are escaped, so those bytes occur only as that field, and counting
them is a byte search per chunk, as the relay's search for the usage event is.
"""

from __future__ import annotations

from qwenstack.gateway.exchange import Exchange

MARK = b'"type":"function"'


def count(answer: bytes) -> int:
    """Tool calls in an answer: a whole JSON answer, or a stream's events."""
    return answer.count(MARK)


def count_relayed(exchange: Exchange) -> None:
    """Count the tool calls of the engine's answer into `exchange.tool_calls` as it is relayed."""
    tail = b""  # a chunk boundary may cut a mark: the bytes after the last one it could start

    def see(chunk: bytes) -> None:
        nonlocal tail
        seen = tail + chunk
        # A mark found here ends in `chunk` (`tail` is shorter than one): none was counted yet.
        exchange.tool_calls += seen.count(MARK)
        tail = seen[-(len(MARK) - 1):]

    exchange.answer.tap(see)
