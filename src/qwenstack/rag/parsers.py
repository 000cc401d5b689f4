"""Text out of txt, md, html, pdf and docx files, as sections that keep their page or heading.

Offsets of chunks are character offsets in the concatenated text of a file's sections, so a
citation can point back into the document as it was extracted.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePath

from qwenstack.rag import RagError

MARKDOWN_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Section:
    text: str
    page: int | None = None  # 1-based, for PDFs
    heading: str | None = None  # the nearest heading above, for md, html and docx


def _decode(data: bytes, name: str) -> str:
    for encoding in ("utf-8-sig", "gb18030"):  # gb18030 covers GBK/GB2312, common for Chinese files
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise RagError(f"{name}: not UTF-8 or GB18030 text.", code="unreadable_file")


def _text(data: bytes, name: str) -> list[Section]:
    return [Section(_decode(data, name))]


def _markdown(data: bytes, name: str) -> list[Section]:
    text = _decode(data, name)
    sections, heading, start = [], None, 0
    for match in MARKDOWN_HEADING.finditer(text):
        sections.append(Section(text[start:match.start()], heading=heading))
        heading, start = match[2], match.start()
    sections.append(Section(text[start:], heading=heading))
    return [s for s in sections if s.text.strip()]


def _html(data: bytes, name: str) -> list[Section]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for hidden in soup(["script", "style", "noscript", "template"]):
        hidden.decompose()
    blocks = soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td", "th",
                            "blockquote", "dd", "dt"])
    sections = _under_headings(
        (block.get_text(" ", strip=True), block.name[0] == "h" and block.name[1:].isdigit())
        for block in blocks
        # A block inside another: its text is part of the enclosing block's.
        if not block.find_parent(["p", "li", "pre", "td", "th", "blockquote"])
    )
    if not sections:  # no block structure: the page's plain text
        text = soup.get_text("\n", strip=True)
        sections = [Section(text)] if text else []
    return sections


def _pdf(data: bytes, name: str) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password (permissions only).
            try:
                if not reader.decrypt(""):
                    raise FileNotDecryptedError
            except (FileNotDecryptedError, NotImplementedError):
                raise RagError(
                    f"{name}: the PDF is encrypted with a password; upload an unencrypted copy.",
                    code="encrypted_pdf",
                ) from None
        return [Section(page.extract_text() or "", page=number)
                for number, page in enumerate(reader.pages, 1)]
    except RagError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise RagError(f"{name}: the PDF cannot be read ({exc}).", code="unreadable_file") from None


def _docx(data: bytes, name: str) -> list[Section]:
    import zipfile

    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise RagError(f"{name}: the DOCX cannot be read ({exc}).", code="unreadable_file") from None
    return _under_headings(
        (paragraph.text.strip(),
         paragraph.style is not None and (paragraph.style.name or "").startswith(("Heading", "Title")))
        for paragraph in document.paragraphs
    )


def _under_headings(blocks: Iterable[tuple[str, bool]]) -> list[Section]:
    """(text, is a heading) blocks in document order, as one section per heading's body."""
    sections: list[Section] = []
    heading: str | None = None
    lines: list[str] = []
    for text, is_heading in blocks:
        if not text:
            continue
        if is_heading:
            if lines:
                sections.append(Section("\n\n".join(lines), heading=heading))
            heading, lines = text, []
        else:
            lines.append(text)
    if lines:
        sections.append(Section("\n\n".join(lines), heading=heading))
    return sections


PARSERS: dict[str, Callable[[bytes, str], list[Section]]] = {
    ".txt": _text,
    ".text": _text,
    ".md": _markdown,
    ".markdown": _markdown,
    ".html": _html,
    ".htm": _html,
    ".pdf": _pdf,
    ".docx": _docx,
}


def parse(name: str, data: bytes) -> list[Section]:
    """The sections of file `name`; a RagError for an unsupported type or an unreadable file."""
    suffix = PurePath(name).suffix.lower()
    parser = PARSERS.get(suffix)
    if parser is None:
        raise RagError(
            f"{name}: unsupported file type {suffix or '(none)'}; use one of "
            f"{', '.join(sorted(PARSERS))}.", code="unsupported_file_type",
        )
    sections = [s for s in parser(data, name) if s.text.strip()]
    if not sections:
        raise RagError(f"{name}: no text could be extracted.", code="empty_file")
    return sections
