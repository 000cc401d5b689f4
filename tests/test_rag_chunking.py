"""Parsing and Chinese-aware chunking, measured with the real Qwen3 tokenizer."""

from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import re
import signal
import threading
import zipfile
from pathlib import Path

import pytest
from helpers import cpu_seconds, wait_for

from qwenstack.rag import RagError
from qwenstack.rag.chunking import EstimatedCounter, TokenizerCounter, chunk_sections
from qwenstack.rag.parse_worker import ParseWorkers
from qwenstack.rag.parsers import Section, parse
from qwenstack.settings import RagSettings

# No spaces anywhere: sentence ends are the only places to cut.
CHINESE = (
    "大熊猫是中国特有的哺乳动物，主要生活在四川、陕西和甘肃的山区。它们几乎只吃竹子，每天要花十多个小时进食！"
    "大熊猫的繁殖率很低，幼崽出生时只有一百多克重。为什么大熊猫被称为活化石？因为它们在地球上已经生存了至少八百万年；"
    "科学家认为它们的祖先是食肉动物。目前野生大熊猫的数量约为一千八百多只，保护区的建立使数量逐渐回升。"
) * 3
ENDS = "。！？；"


@pytest.fixture(scope="module")
def qwen3_tokens(tiny_qwen3: Path) -> TokenizerCounter:
    return TokenizerCounter(tiny_qwen3 / "tokenizer.json")


def test_chinese_without_spaces_splits_at_sentence_ends(qwen3_tokens: TokenizerCounter) -> None:
    chunks = chunk_sections([Section(CHINESE)], qwen3_tokens, size=60, overlap=30)
    assert len(chunks) > 3
    for chunk in chunks:
        assert qwen3_tokens.count([chunk.text])[0] <= 60
        assert chunk.text[-1] in ENDS, chunk.text  # never cut inside a sentence
        assert CHINESE[chunk.start:chunk.end] == chunk.text
    # Consecutive chunks overlap by whole sentences (those that fit the overlap budget), and
    # together cover the text.
    pairs = list(itertools.pairwise(chunks))
    for before, after in pairs:
        assert after.start <= before.end
        assert CHINESE[after.start - 1] in ENDS
    assert sum(after.start < before.end for before, after in pairs) >= len(pairs) // 2
    assert chunks[0].start == 0 and chunks[-1].end == len(CHINESE)


def test_an_overlong_sentence_is_cut_by_tokens(qwen3_tokens: TokenizerCounter) -> None:
    sentence = "这是一个没有任何标点符号而且非常非常长的句子" * 20 + "。"
    chunks = chunk_sections([Section(sentence)], qwen3_tokens, size=40, overlap=0)
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == sentence
    assert all(qwen3_tokens.count([c.text])[0] <= 48 for c in chunks)  # proportional cut: near 40


def test_paragraphs_and_ascii_sentence_ends() -> None:
    text = "First sentence. Pi is 3.14 here! Third?\n\n第二段第一句。第二句；"
    chunks = chunk_sections([Section(text)], EstimatedCounter(), size=12, overlap=0)
    # "3.14" is no sentence end; short paragraphs share a chunk rather than make tiny ones.
    assert [c.text for c in chunks] == [
        "First sentence.", "Pi is 3.14 here!", "Third?\n\n第二段第一句。", "第二句；"]


def test_chunks_keep_page_and_heading() -> None:
    markdown = "intro text。\n\n# 安装\n\n先安装依赖。\n\n## 运行\n\n再运行。"
    sections = parse("guide.md", markdown.encode())
    chunks = chunk_sections(sections, EstimatedCounter(), size=100, overlap=0)
    assert [(c.heading, c.text) for c in chunks] == [
        (None, "intro text。"), ("安装", "# 安装\n\n先安装依赖。"), ("运行", "## 运行\n\n再运行。")]


def test_html_and_docx() -> None:
    import docx

    html = (b"<html><script>x()</script><h1>Title</h1><p>Para <b>one</b>.</p>"
            b"<h2>Sub</h2><p>Two.</p></html>")
    assert [(s.heading, s.text) for s in parse("a.html", html)] == [
        ("Title", "Para one ."), ("Sub", "Two.")]
    document = docx.Document()
    document.add_heading("章节一", level=1)
    document.add_paragraph("第一段。")
    buffer = io.BytesIO()
    document.save(buffer)
    sections = parse("a.docx", buffer.getvalue())
    assert [(s.heading, s.text) for s in sections] == [("章节一", "第一段。")]


def text_pdf(pages: list[str]) -> bytes:
    """A minimal PDF with one line of (ASCII) text per page, written by hand."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents "
                       f"{len(objects)} 0 R /Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)


def test_pdf_chunks_keep_their_page() -> None:
    sections = parse("manual.pdf", text_pdf(["Install it first.", "Then run it."]))
    chunks = chunk_sections(sections, EstimatedCounter(), size=100, overlap=0)
    assert [(c.page, c.text) for c in chunks] == [(1, "Install it first."), (2, "Then run it.")]


def docx_bomb(inflated_bytes: int, members: int = 1) -> bytes:
    """A small zip that declares `inflated_bytes` of document XML, as a DOCX zip bomb does."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("word/document.xml", b"<" + b"w" * (inflated_bytes - 1))
        for number in range(1, members):
            archive.writestr(f"word/media/{number}.xml", b"")
    return buffer.getvalue()


def test_docx_zip_bombs_are_refused_before_inflating() -> None:
    for data, what in [(docx_bomb(70 * 2**20), "inflates to"),  # over the size cap
                       (docx_bomb(20 * 2**20), "compressed more than"),  # ratio ~1000:1
                       (docx_bomb(100, members=3000), "parts, over the limit")]:
        assert len(data) < 400_000  # a small upload
        with pytest.raises(RagError) as caught:
            parse("bomb.docx", data)
        assert caught.value.status == 413 and caught.value.code == "archive_too_large"
        assert what in str(caught.value) and "bomb.docx" in str(caught.value)


def test_docx_headings_by_style_name_tables_and_breaks() -> None:
    import docx

    document = docx.Document()
    document.add_heading("Overview", level=1)
    paragraph = document.add_paragraph("line one")
    paragraph.add_run().add_break()
    paragraph.add_run("line two")
    document.add_paragraph("Plans", style="Title")
    document.add_table(rows=1, cols=1).cell(0, 0).text = "in a table"
    buffer = io.BytesIO()
    document.save(buffer)
    assert [(s.heading, s.text) for s in parse("a.docx", buffer.getvalue())] == [
        ("Overview", "line one\nline two"), ("Plans", "in a table")]


def test_bad_files_are_refused_clearly(tmp_path: Path) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(100, 100)
    writer.encrypt("secret")
    encrypted = io.BytesIO()
    writer.write(encrypted)
    cases = {
        ("locked.pdf", encrypted.getvalue()): "encrypted_pdf",
        ("broken.pdf", b"%PDF-1.4 not really"): "unreadable_file",
        ("broken.docx", b"PK not a zip"): "unreadable_file",
        ("image.png", b"\x89PNG"): "unsupported_file_type",
        ("empty.txt", b"  \n"): "empty_file",
    }
    for (name, data), code in cases.items():
        with pytest.raises(RagError) as caught:
            parse(name, data)
        assert caught.value.code == code, name
        assert name in str(caught.value)


# Files that made the old parsers work for seconds to minutes (issue 12): a Markdown heading
# line with a long run of spaces (the heading regex backtracked cubically) and deeply nested
# HTML blocks (each block's ancestors were searched: quadratic).
HOSTILE_MARKDOWN = ("# x" + " " * 3_000 + "y\n\nbody\n").encode()
HOSTILE_HTML = ("<div><dd>" * 8_888 + "x").encode()  # 80 KB, 17,776 elements deep


def test_hostile_files_parse_within_a_cpu_second() -> None:
    """In a worker limited to one CPU second (the old parsers took 5 s to minutes), with the
    structure they hold."""
    workers = ParseWorkers(RagSettings(parse_cpu_seconds=2))  # stopped well within it
    markdown = workers.parse("hostile.md", HOSTILE_MARKDOWN)
    assert [s.heading for s in markdown] == ["x" + " " * 3_000 + "y"]
    html = workers.parse("hostile.html", HOSTILE_HTML)
    assert [s.text for s in html] == ["x"]  # one block: the outermost <dd>


def test_markdown_headings() -> None:
    text = "# One #\n#NotAHeading\n## C# ##\n####### seven\n### Three\r\nbody"
    # "#NotAHeading" and seven #s are text; a closing run of #s is not part of the title.
    assert [s.heading for s in parse("h.md", text.encode())] == ["One", "C#", "Three"]


def test_caps_are_refused_naming_their_setting() -> None:
    cases = [
        ("two.pdf", text_pdf(["one", "two"]), RagSettings(max_pdf_pages=1), "too_many_pages",
         "rag.max_pdf_pages"),
        ("long.txt", b"x" * 11, RagSettings(max_extracted_chars=10), "too_much_text",
         "rag.max_extracted_chars"),
        ("bomb.docx", docx_bomb(2 * 2**20), RagSettings(max_inflated_bytes=2**20),
         "archive_too_large", "rag.max_inflated_bytes"),
    ]
    for name, data, limits, code, setting in cases:
        with pytest.raises(RagError) as caught:
            parse(name, data, limits)
        assert (caught.value.status, caught.value.code) == (413, code)
        assert setting in str(caught.value) and name in str(caught.value)


def test_worker_limits_refuse_the_file_not_the_service() -> None:
    """A parse past the worker's CPU time or memory ends the worker, and the upload is refused
    with a 413 naming the limit; the next file parses as before."""
    busy = b"<p>" + b"<b>x</b>" * 1_000_000  # a few seconds of bs4's CPU time, 1 GB of objects
    # The memory case gets CPU time to spare, so that on a busy machine the wall-clock backstop
    # (twice the CPU time, and 10 s) cannot end it before the memory limit does.
    for limits, setting in [(RagSettings(parse_cpu_seconds=1), "rag.parse_cpu_seconds"),
                            (RagSettings(parse_memory_bytes=256 * 2**20, parse_cpu_seconds=600),
                             "rag.parse_memory_bytes")]:
        workers = ParseWorkers(limits)
        with pytest.raises(RagError) as caught:
            workers.parse("busy.html", busy)
        assert (caught.value.status, caught.value.code) == (413, "parse_limit")
        assert setting in str(caught.value) and "busy.html" in str(caught.value)
        assert workers.parse("fine.md", b"# ok\n\nfine")[0].heading == "ok"


@pytest.mark.parametrize("stopped", ["reading the file", "parsing"])
def test_a_worker_starved_of_cpu_is_ended_by_the_wall_clock_and_the_upload_may_be_retried(
    stopped: str,
) -> None:
    """A worker that has used less than its CPU time when the wall-clock backstop (twice that
    and 10 s) runs out, because other processes had the cores, is killed and the upload
    refused with a 503 (try again), not blamed on the file as a CPU limit: stopped while it
    parses, or while it still reads the file, whose handing over waits on it within the same
    backstop. Stopping the worker (SIGSTOP) is how a test starves it of CPU on demand."""
    workers = ParseWorkers(RagSettings(parse_cpu_seconds=2))  # stopped well within it
    # 8 MB of HTML is seconds of parsing; 200 MB takes the worker long enough to read that it
    # is stopped midway.
    repeats = 25_000_000 if stopped == "reading the file" else 1_000_000
    data = b"<p>" + b"<b>x</b>" * repeats
    outcome: list[BaseException] = []

    def upload() -> None:
        try:
            workers.parse("slow.html", data)
        except RagError as exc:
            outcome.append(exc)

    uploading = threading.Thread(target=upload)
    uploading.start()
    def parse_worker() -> multiprocessing.Process | None:
        return next((child for child in multiprocessing.active_children()
                     if child.name == "qwenstack-parse"), None)

    wait_for(parse_worker, "the parse worker started", timeout_s=30, interval_s=0.001)
    worker = parse_worker().pid
    if stopped == "parsing":
        wait_for(lambda: cpu_seconds(worker) >= 0.3, "the worker parsing", 30, 0.02)
    os.kill(worker, signal.SIGSTOP)
    if stopped == "reading the file":
        read = int(re.search(r"rchar: (\d+)", Path(f"/proc/{worker}/io").read_text())[1])
        assert read < len(data), "the worker had read the whole file before it was stopped"
    uploading.join(timeout=60)
    assert not uploading.is_alive() and len(outcome) == 1
    error = outcome[0]
    assert isinstance(error, RagError)
    assert (error.status, error.code, error.retry_after_s) == (503, "parse_timeout", 10)
    assert "14 s" in str(error) and "slow.html" in str(error)
    assert workers.parse("fine.md", b"# ok\n\nfine")[0].heading == "ok"
