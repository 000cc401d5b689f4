"""Text out of txt, md, html, pdf, docx, csv, xlsx and pptx files, as sections that keep their
page (PDF page, PPTX slide) or heading (md, html and docx heading, XLSX sheet).

Offsets of chunks are character offsets in the concatenated text of a file's sections, so a
citation can point back into the document as it was extracted.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import IO, TYPE_CHECKING, Any

from lxml import etree

from qwenstack.rag import RagError, tabular, too_much_text
from qwenstack.settings import RagSettings

if TYPE_CHECKING:
    from bs4 import BeautifulSoup, Tag

# Parsers read their caps (the rag.max_* settings) from a RagSettings; these when none is given.
DEFAULT_LIMITS = RagSettings()


@dataclass(frozen=True)
class Section:
    text: str
    page: int | None = None  # 1-based: a PDF's page, a PPTX's slide
    # The nearest heading above (md, html, docx), a slide's title, a spreadsheet's sheet name.
    heading: str | None = None


def _decode(data: bytes, name: str) -> str:
    """UTF-8 (a BOM dropped), UTF-16 by its BOM (Excel's "Unicode text"), else GB18030, which
    covers GBK and GB2312, as Chinese Windows writes text and CSV files. Text holding NUL is
    binary that happened to decode."""
    encodings = ["utf-8-sig", "gb18030"]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encodings.insert(0, "utf-16")
    for encoding in encodings:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if "\0" not in text:
            return text
    raise RagError(f"{name}: not text in UTF-8, UTF-16 (with a BOM) or GB18030/GBK; save it "
                   "as UTF-8.", code="unreadable_file")


def _text(data: bytes, name: str, limits: RagSettings) -> list[Section]:
    return [Section(_decode(data, name))]


def _csv(data: bytes, name: str, limits: RagSettings) -> list[Section]:
    tsv = PurePath(name).suffix.lower() == ".tsv"
    return [Section(tabular.delimited(_decode(data, name), name, limits, "\t" if tsv else None))]


def _xlsx(data: bytes, name: str, limits: RagSettings) -> list[Section]:
    _archive(data, name, limits)  # before openpyxl inflates anything
    return [Section(text, heading=sheet) for sheet, text in tabular.workbook(data, name, limits)]


def _markdown(data: bytes, name: str, limits: RagSettings) -> list[Section]:
    """One section per ATX heading (`# Title`), split in one pass over the lines."""
    text = _decode(data, name)
    sections, heading, start, offset = [], None, 0, 0
    for line in text.split("\n"):
        title = _markdown_heading(line)
        if title is not None:
            sections.append(Section(text[start:offset], heading=heading))
            heading, start = title, offset
        offset += len(line) + 1
    sections.append(Section(text[start:], heading=heading))
    return [s for s in sections if s.text.strip()]


def _markdown_heading(line: str) -> str | None:
    """The title of a heading line, without its optional closing #s; None for other lines.

    String methods rather than a regular expression: the pattern this replaced backtracked
    cubically on a heading line with a long run of spaces (3 KB took seconds)."""
    level = len(line) - len(line.lstrip("#"))
    if not 1 <= level <= 6 or line[level:level + 1] not in (" ", "\t"):
        return None
    title = line[level:].strip()
    unclosed = title.rstrip("#")
    if unclosed != title and (not unclosed or unclosed[-1] in " \t"):
        title = unclosed.rstrip()
    return title or None


HTML_HEADINGS = frozenset(("h1", "h2", "h3", "h4", "h5", "h6"))
HTML_BLOCKS = HTML_HEADINGS | {"p", "li", "pre", "td", "th", "blockquote", "dd", "dt"}


def _html(data: bytes, name: str, limits: RagSettings) -> list[Section]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for hidden in soup(["script", "style", "noscript", "template"]):
        hidden.decompose()
    sections = _under_headings(
        (block.get_text(" ", strip=True), block.name in HTML_HEADINGS)
        for block in _outermost_blocks(soup)
    )
    if not sections:  # no block structure: the page's plain text
        text = soup.get_text("\n", strip=True)
        sections = [Section(text)] if text else []
    return sections


def _outermost_blocks(soup: BeautifulSoup) -> Iterator[Tag]:
    """Block elements in document order, those inside another block left out (their text is
    part of the enclosing block's). One depth-first pass that does not enter a block, so each
    element is visited once, by this walk or by its block's get_text: linear however deep the
    nesting (asking each block for its ancestors was quadratic), and without recursion."""
    from bs4 import Tag

    pending: list[Tag] = [soup]
    while pending:
        element = pending.pop()
        if element.name in HTML_BLOCKS:
            yield element
            continue
        pending.extend(child for child in reversed(element.contents) if isinstance(child, Tag))


def _pdf(data: bytes, name: str, limits: RagSettings) -> list[Section]:
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
        pages = len(reader.pages)
        if pages > limits.max_pdf_pages:
            raise RagError(f"{name}: {pages} pages, over the limit of {limits.max_pdf_pages} "
                           "(rag.max_pdf_pages).", status=413, code="too_many_pages")
        return [Section(page.extract_text() or "", page=number)
                for number, page in enumerate(reader.pages, 1)]
    except RagError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise RagError(f"{name}: the PDF cannot be read ({exc}).", code="unreadable_file") from None


# DOCX, XLSX and PPTX are zips of XML: their caps (rag.max_archive_members, max_inflated_bytes,
# max_compression_ratio) bound what one upload can make a parser inflate and hold.
WORD_NAMESPACE = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def _archive(data: bytes, name: str, limits: RagSettings) -> zipfile.ZipFile:
    """The zip in `data`, refused before anything is inflated when it would inflate too far.

    The limits hold because zipfile never inflates a member past the size the archive declares
    for it (a member that lies about its size fails its CRC check instead).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise RagError(
            f"{name}: the file cannot be read ({exc}).", code="unreadable_file"
        ) from None
    members = archive.infolist()
    if len(members) > limits.max_archive_members:
        raise RagError(f"{name}: the archive holds {len(members)} parts, over the limit of "
                       f"{limits.max_archive_members} (rag.max_archive_members).",
                       status=413, code="archive_too_large")
    inflated = sum(member.file_size for member in members)
    if inflated > limits.max_inflated_bytes:
        raise RagError(f"{name}: the archive inflates to {inflated} bytes, over the limit of "
                       f"{limits.max_inflated_bytes} (rag.max_inflated_bytes).",
                       status=413, code="archive_too_large")
    ratio = limits.max_compression_ratio
    for member in members:
        if member.file_size > 2**20 and member.file_size > ratio * max(member.compress_size, 1):
            raise RagError(f"{name}: part {member.filename} is compressed more than {ratio}:1 "
                           "(rag.max_compression_ratio), as only a zip bomb is.",
                           status=413, code="archive_too_large")
    return archive


def _docx(data: bytes, name: str, limits: RagSettings) -> list[Section]:
    """Paragraphs of the document body in order (tables included), in one streaming pass."""
    archive = _archive(data, name, limits)
    try:
        heading_styles = _docx_heading_styles(archive)
        with archive.open("word/document.xml") as xml:
            return _under_headings(_docx_paragraphs(xml, heading_styles))
    except (KeyError, zipfile.BadZipFile, etree.XMLSyntaxError, OSError) as exc:
        raise RagError(
            f"{name}: the DOCX cannot be read ({exc}).", code="unreadable_file"
        ) from None


def _docx_heading_styles(archive: zipfile.ZipFile) -> set[str]:
    """Ids of the paragraph styles named Heading N or Title (Word writes built-in names in
    lower case in some locales, hence the case-insensitive match)."""
    try:
        xml = archive.open("word/styles.xml")
    except KeyError:
        return set()
    with xml:
        tree = etree.parse(xml, _XML_PARSER)
    headings = set()
    for style in tree.iter(f"{WORD_NAMESPACE}style"):
        name = style.find(f"{WORD_NAMESPACE}name")
        label = (name.get(f"{WORD_NAMESPACE}val") or "") if name is not None else ""
        if label.lower().startswith(("heading", "title")):
            headings.add(style.get(f"{WORD_NAMESPACE}styleId") or "")
    return headings


def _docx_paragraphs(xml: IO[bytes], heading_styles: set[str]) -> Iterator[tuple[str, bool]]:
    paragraph, text, tab, breaks = (f"{WORD_NAMESPACE}{tag}" for tag in ("p", "t", "tab", "br"))
    for _, element in etree.iterparse(xml, events=("end",), tag=paragraph,
                                      resolve_entities=False, no_network=True):
        parts = []
        for node in element.iter(text, tab, breaks):
            parts.append(node.text or "" if node.tag == text else "\t" if node.tag == tab else "\n")
        style = element.find(f"{WORD_NAMESPACE}pPr/{WORD_NAMESPACE}pStyle")
        style_id = style.get(f"{WORD_NAMESPACE}val") if style is not None else None
        yield "".join(parts).strip(), style_id in heading_styles
        # Done with it: drop it and what came before, so memory stays flat however long.
        element.clear()
        while element.getprevious() is not None:
            del element.getparent()[0]


_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


def _pptx(data: bytes, name: str, limits: RagSettings) -> list[Section]:
    """One section per slide, its number as the page and its title as the heading: the text
    of its shapes (inside groups too) and tables in the slide's order, then its notes.
    python-pptx parses with entities unresolved; the zip is checked before it opens it."""
    from pptx import Presentation
    from pptx.exc import PackageNotFoundError

    _archive(data, name, limits)
    try:
        presentation = Presentation(io.BytesIO(data))
        sections = []
        for number, slide in enumerate(presentation.slides, 1):
            texts = list(_slide_texts(slide.shapes))
            if slide.has_notes_slide and slide.notes_slide.notes_text_frame is not None:
                texts.append(slide.notes_slide.notes_text_frame.text)
            title = slide.shapes.title.text_frame.text if slide.shapes.title else ""
            sections.append(Section("\n\n".join(t.strip() for t in texts if t.strip()),
                                    page=number, heading=" ".join(title.split()) or None))
        return sections
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile,
            etree.XMLSyntaxError, OSError) as exc:
        raise RagError(f"{name}: the PPTX cannot be read ({exc}).", code="unreadable_file") \
            from None


def _slide_texts(shapes: Iterable[Any]) -> Iterator[str]:
    """Text frames and tables, groups entered without recursion (a group can hold groups)."""
    from pptx.shapes.group import GroupShape

    pending = list(reversed(list(shapes)))
    while pending:
        shape = pending.pop()
        if isinstance(shape, GroupShape):
            pending.extend(reversed(list(shape.shapes)))
        elif shape.has_text_frame:
            yield shape.text_frame.text
        elif shape.has_table:
            yield "\n".join(" | ".join(cell.text for cell in row.cells)
                             for row in shape.table.rows)


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


PARSERS: dict[str, Callable[[bytes, str, RagSettings], list[Section]]] = {
    ".txt": _text,
    ".text": _text,
    ".md": _markdown,
    ".markdown": _markdown,
    ".html": _html,
    ".htm": _html,
    ".pdf": _pdf,
    ".docx": _docx,
    ".csv": _csv,
    ".tsv": _csv,
    ".xlsx": _xlsx,
    ".pptx": _pptx,
}


def parse(name: str, data: bytes, limits: RagSettings = DEFAULT_LIMITS) -> list[Section]:
    """The sections of file `name`; a RagError for an unsupported type, an unreadable file or
    one over a cap of `limits`. In this process: the knowledge service parses uploads through
    parse_worker.parse_isolated, which bounds CPU time and memory too."""
    suffix = PurePath(name).suffix.lower()
    parser = PARSERS.get(suffix)
    if parser is None:
        raise RagError(
            f"{name}: unsupported file type {suffix or '(none)'}; use one of "
            f"{', '.join(sorted(PARSERS))}.", code="unsupported_file_type",
        )
    sections = [s for s in parser(data, name, limits) if s.text.strip()]
    if not sections:
        raise RagError(f"{name}: no text could be extracted.", code="empty_file")
    extracted = sum(len(s.text) for s in sections)
    if extracted > limits.max_extracted_chars:
        raise too_much_text(name, extracted, limits.max_extracted_chars)
    return sections
