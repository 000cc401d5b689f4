"""Chunks that respect Chinese: paragraphs, then sentences, packed up to a token budget.

Chinese has no spaces between words, so splitting on whitespace would make one giant "word" of
a paragraph. Sentences end at 。！？； (and ! ? ; and a `.` followed by a space); a sentence
longer than a chunk is cut by tokens. Sizes are counted with the chat model's tokenizer, as
that is the budget the chunks must fit into; without one, an estimate is used.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qwenstack.rag.parsers import Section

log = logging.getLogger(__name__)

# A sentence end, with any closing quotes or brackets that belong to the sentence.
SENTENCE_END = re.compile(r"[。！？；!?;…]+[”’」』）)\"']*|\.(?=\s)[”’\"')]*")
PARAGRAPH_BREAK = re.compile(r"\n\s*\n|\n(?=\s*[-*•·]|\s*\d+[.)、])")
CJK_RANGES = r"\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef"
CJK = re.compile(rf"[{CJK_RANGES}]")
WORD = re.compile(rf"[A-Za-z0-9]+|[^\sA-Za-z0-9{CJK_RANGES}]")


class TokenCounter(Protocol):
    def count(self, texts: Sequence[str]) -> list[int]: ...


class TokenizerCounter:
    """Exact counts with a Hugging Face `tokenizers` tokenizer (tokenizer.json)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    def count(self, texts: Sequence[str]) -> list[int]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(encoding.ids) for encoding in encodings]


class EstimatedCounter:
    """No tokenizer at hand: one token per CJK character, 4/3 per Latin word or symbol
    (close to Qwen3's BPE on Chinese and English prose)."""

    def count(self, texts: Sequence[str]) -> list[int]:
        return [
            len(CJK.findall(text)) + math.ceil(len(WORD.findall(text)) * 4 / 3) for text in texts
        ]


def token_counter(tokenizer: str | None, model: str | None) -> TokenCounter:
    """The tokenizer at `tokenizer` (a folder or tokenizer.json), else the served chat model's
    when it is local: its folder's, or a hub model's in the Hugging Face cache (where the
    engine downloaded it; never fetched from here). Else an estimate, said once in the log."""
    if tokenizer:
        path = Path(tokenizer).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"rag.tokenizer {tokenizer}: no tokenizer.json there")
        return TokenizerCounter(path)
    found = _local_tokenizer(model) if model else None
    if found is not None:
        log.info("Chunk sizes are counted in the tokens of %s", model)
        return TokenizerCounter(found)
    log.info("no local tokenizer: chunk sizes are estimated (set rag.tokenizer to the chat "
             "model's folder to count them)")
    return EstimatedCounter()


def _local_tokenizer(model: str) -> Path | None:
    folder = Path(model).expanduser()
    if folder.is_dir():
        path = folder / "tokenizer.json"
        return path if path.is_file() else None
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        return None  # a folder not there (yet), not a hub id
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "tokenizer.json")
    return Path(cached) if isinstance(cached, str) else None


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offsets in the file's extracted text
    end: int
    page: int | None
    heading: str | None


def _spans(text: str, pattern: re.Pattern[str], base: int) -> list[tuple[int, int]]:
    """`text` cut after each match of `pattern`, as (start, end) offsets from `base`,
    whitespace trimmed, empty pieces dropped."""
    spans, start = [], 0
    for match in pattern.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    trimmed = []
    for begin, end in spans:
        piece = text[begin:end]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            trimmed.append((base + begin + lead, base + begin + lead + len(stripped)))
    return trimmed


def chunk_sections(
    sections: Sequence[Section], counter: TokenCounter, size: int, overlap: int
) -> list[Chunk]:
    """Chunks of at most `size` tokens (a lone over-long sentence is cut), each starting with
    up to `overlap` tokens of whole sentences from the one before; none crosses a section."""
    chunks: list[Chunk] = []
    offset = 0
    for section in sections:
        text = section.text
        sentences: list[tuple[int, int]] = []
        for para_start, para_end in _spans(text, PARAGRAPH_BREAK, 0):
            sentences += _spans(text[para_start:para_end], SENTENCE_END, para_start)
        counts = counter.count([text[s:e] for s, e in sentences]) if sentences else []
        pieces: list[tuple[int, int, int]] = []  # (start, end, tokens)
        for (start, end), tokens in zip(sentences, counts, strict=True):
            if tokens <= size:
                pieces.append((start, end, tokens))
                continue
            # Cut by characters in proportion, so each part holds about `size` tokens.
            parts = math.ceil(tokens / size)
            step = math.ceil((end - start) / parts)
            for cut in range(start, end, step):
                part_end = min(cut + step, end)
                pieces.append((cut, part_end, math.ceil(tokens * (part_end - cut) / (end - start))))
        current: list[tuple[int, int, int]] = []
        total = 0
        for piece in pieces:
            if current and total + piece[2] > size:
                chunks.append(_chunk(section, current, offset))
                carried: list[tuple[int, int, int]] = []
                carried_tokens = 0
                for previous in reversed(current):
                    with_previous = carried_tokens + previous[2]
                    if with_previous > overlap or with_previous + piece[2] > size:
                        break
                    carried.insert(0, previous)
                    carried_tokens += previous[2]
                current, total = carried, carried_tokens
            current.append(piece)
            total += piece[2]
        if current:
            chunks.append(_chunk(section, current, offset))
        offset += len(text) + 2  # sections are joined by a blank line in the extracted text
    return chunks


def _chunk(section: Section, pieces: list[tuple[int, int, int]], offset: int) -> Chunk:
    start, end = pieces[0][0], pieces[-1][1]
    return Chunk(
        section.text[start:end], offset + start, offset + end, section.page, section.heading
    )
