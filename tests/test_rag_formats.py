"""The formats people keep their knowledge in besides documents: plain text in the encodings
Chinese Windows writes, CSV/TSV, XLSX and PPTX (files built here with csv, openpyxl and
python-pptx), each parsed in the bounded worker; hostile ones refused; and chunk sizes counted
in the served model's tokens when its tokenizer is local."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import pytest

from qwenstack.rag import RagError
from qwenstack.rag.chunking import EstimatedCounter, TokenizerCounter, chunk_sections, token_counter
from qwenstack.rag.parse_worker import ParseWorkers
from qwenstack.rag.parsers import parse
from qwenstack.settings import RagSettings

# Workers for files that parse: each XLSX's worker imports openpyxl (with numpy), most of a CPU
# second on a busy box. Hostile files get one CPU second (HOSTILE_WORKERS): each is refused by
# a check of its own first, before any such import.
WORKERS = ParseWorkers(RagSettings(parse_cpu_seconds=5))
HOSTILE_WORKERS = ParseWorkers(RagSettings(parse_cpu_seconds=1))


def xlsx(sheets: dict[str, list[list[object]]]) -> bytes:
    import openpyxl

    book = openpyxl.Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def pptx() -> bytes:
    """Two slides: a title with a bullet and notes; a table and a text box inside a group."""
    from pptx import Presentation
    from pptx.util import Inches

    deck = Presentation()
    first = deck.slides.add_slide(deck.slide_layouts[1])
    first.shapes.title.text = "年度总结"
    first.placeholders[1].text = "收入增长百分之二十。"
    first.notes_slide.notes_text_frame.text = "讲者备注：强调华东区。"
    second = deck.slides.add_slide(deck.slide_layouts[5])
    second.shapes.title.text = "Regions"
    table = second.shapes.add_table(2, 2, Inches(1), Inches(2), Inches(4), Inches(1)).table
    for (row, column), text in {(0, 0): "region", (0, 1): "growth",
                                (1, 0): "East", (1, 1): "20%"}.items():
        table.cell(row, column).text = text
    group = second.shapes.add_group_shape()
    group.shapes.add_textbox(Inches(1), Inches(4), Inches(3), Inches(1)).text_frame.text = \
        "Grouped remark."
    buffer = io.BytesIO()
    deck.save(buffer)
    return buffer.getvalue()


def test_xlsx_rows_read_as_header_value_lines_per_sheet() -> None:
    import datetime as dt

    data = xlsx({
        "员工": [["姓名", "部门", "入职"], ["张三", "销售", dt.datetime(2024, 3, 1)],
                 [None, None, None], ["李四", "研发\n二组", None], ["王五", None, 3.0]],
        "Q2": [["region", "revenue"], ["East", 1.5]],
    })
    sections = WORKERS.parse("staff.xlsx", data)
    assert [(s.heading, s.text) for s in sections] == [
        ("员工", "- 姓名: 张三 | 部门: 销售 | 入职: 2024-03-01\n"
                 "- 姓名: 李四 | 部门: 研发 二组\n"
                 "- 姓名: 王五 | 入职: 3"),
        ("Q2", "- region: East | revenue: 1.5"),
    ]
    # Chunks end between rows, keep their sheet as their heading, never span two sheets.
    chunks = chunk_sections(sections, EstimatedCounter(), size=30, overlap=0)  # rows: 25, 16, 13
    rows = sections[0].text.split("\n")
    assert [(c.heading, c.text) for c in chunks] == [
        ("员工", rows[0]), ("员工", "\n".join(rows[1:])), ("Q2", sections[1].text)]


def test_pptx_slides_are_pages_with_their_titles() -> None:
    sections = WORKERS.parse("review.pptx", pptx())
    assert [(s.page, s.heading, s.text) for s in sections] == [
        (1, "年度总结", "年度总结\n\n收入增长百分之二十。\n\n讲者备注：强调华东区。"),
        (2, "Regions", "Regions\n\nregion | growth\nEast | 20%\n\nGrouped remark."),
    ]
    chunks = chunk_sections(sections, EstimatedCounter(), size=100, overlap=0)
    assert [(c.page, c.heading) for c in chunks] == [(1, "年度总结"), (2, "Regions")]


def test_csv_tsv_and_text_in_the_encodings_chinese_windows_writes() -> None:
    table = "名字,城市\n王五,\"上海,浦东\"\n"
    cases = {
        ("utf8-bom.csv", b"\xef\xbb\xbf" + table.encode()): "- 名字: 王五 | 城市: 上海,浦东",
        ("gbk.csv", table.encode("gbk")): "- 名字: 王五 | 城市: 上海,浦东",
        ("excel-eu.csv", "名字;年龄\n王五;30\n".encode("gb18030")): "- 名字: 王五 | 年龄: 30",
        ("unicode.tsv", "名字\t年龄\n王五\t30\n".encode("utf-16")): "- 名字: 王五 | 年龄: 30",
        ("notes.txt", "年假有十五天。".encode("gbk")): "年假有十五天。",
        ("bom.txt", "\ufeff年假有十五天。".encode()): "年假有十五天。",
    }
    for (name, data), text in cases.items():
        assert [s.text for s in WORKERS.parse(name, data)] == [text], name


def test_hostile_tables_and_undecodable_text_are_refused_within_a_cpu_second() -> None:
    """Each refused with its 4xx by a worker limited to one CPU second: the refusal comes from
    the parser's own bound, not from the worker's limit (a 413 `parse_limit`)."""
    cases = [
        # Zip bombs: 20 MiB of sheet or slide XML compressed 1000:1, and over the inflated cap.
        ("bomb.xlsx", office_bomb("xl/worksheets/sheet1.xml", 20 * 2**20), 413,
         "archive_too_large"),
        ("bomb.pptx", office_bomb("ppt/slides/slide1.xml", 70 * 2**20), 413,
         "archive_too_large"),
        ("wide.csv", b"," * 1_000_000 + b"\nx\n", 413, "table_too_large"),  # a million columns
        ("line.csv", b"x" * 50 * 2**20, 413, "table_too_large"),  # one 50 MiB line
        ("quote.csv", b'a,"' + b"b" * 200_000, 413, "table_too_large"),  # a quote never closed
        # 3.8 MB whose every row repeats 2 MB of header names: gigabytes once rendered.
        ("headers.csv", header_bomb(), 413, "too_much_text"),
        ("latin1.txt", "café crème brûlée".encode("latin-1"), 400, "unreadable_file"),
        ("binary.txt", bytes(range(256)) * 64, 400, "unreadable_file"),
        ("broken.xlsx", b"PK not a zip", 400, "unreadable_file"),
        ("broken.pptx", zip_of({"hello.txt": b"hi"}), 400, "unreadable_file"),
    ]
    for name, data, status, code in cases:
        with pytest.raises(RagError) as caught:
            HOSTILE_WORKERS.parse(name, data)
        assert (caught.value.status, caught.value.code) == (status, code), (name, caught.value)
        assert name in str(caught.value)


def test_a_sheet_over_the_cell_cap_is_refused_naming_it() -> None:
    wide = xlsx({"a": [list(range(100))] * 30, "b": [list(range(100))] * 30})  # 6,000 cells
    # CPU time enough for the worker to import openpyxl (with numpy, most of a second on a busy
    # box, which once made a 1 s limit refuse first): the cap must be what refuses.
    limits = RagSettings(max_table_cells=5_000, parse_cpu_seconds=5)
    for name, data in [("wide.xlsx", wide), ("wide.csv", b"1,2,3,4,5\n" * 1_001)]:
        with pytest.raises(RagError) as caught:
            ParseWorkers(limits).parse(name, data)
        assert (caught.value.status, caught.value.code) == (413, "table_too_large")
        assert "rag.max_table_cells" in str(caught.value)
    # Rows of no cells count too: blank lines, and the rows a sheet's row numbers skip (a few
    # bytes saying row 1,000,000 make openpyxl yield 999,998 empty rows first).
    gap = row_gap(xlsx({"s": [["k", "v"], ["a", 1]]}), 1_000_000)
    for name, data in [("blank.csv", b"k,v\n" + b"\n" * 10_000), ("gap.xlsx", gap)]:
        with pytest.raises(RagError) as caught:
            ParseWorkers(limits).parse(name, data)
        assert (caught.value.status, caught.value.code) == (413, "table_too_large"), name
    # A sheet declaring itself A1:XFD1048576 is read as wide as its cells are.
    assert parse("declared.xlsx", lying_dimension(xlsx({"s": [["k", "v"], ["a", 1]]})),
                 limits)[0].text == "- k: a | v: 1"


def office_bomb(member: str, inflated_bytes: int) -> bytes:
    return zip_of({"[Content_Types].xml": b"<Types/>", member: b"<" + b"x" * inflated_bytes})


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def header_bomb() -> bytes:
    header = ",".join(f"{'h' * 2000}{column}" for column in range(1000))
    return (header + "\n" + ("1," * 1000 + "\n") * 900).encode()


def row_gap(data: bytes, row: int) -> bytes:
    """The XLSX with its first sheet's second row numbered `row`."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    sheet = "xl/worksheets/sheet1.xml"
    members[sheet] = (members[sheet].replace(b'<row r="2"', f'<row r="{row}"'.encode())
                      .replace(b'r="A2"', f'r="A{row}"'.encode())
                      .replace(b'r="B2"', f'r="B{row}"'.encode()))
    return zip_of(members)


def lying_dimension(data: bytes) -> bytes:
    """The XLSX with its first sheet's <dimension> claiming every cell a sheet can have."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    sheet = "xl/worksheets/sheet1.xml"
    head, _, rest = members[sheet].partition(b'<dimension ref="')
    members[sheet] = head + b'<dimension ref="A1:XFD1048576' + rest[rest.index(b'"'):]
    return zip_of(members)


def test_chunks_are_counted_in_the_served_models_tokens_when_they_are_local(
    tiny_qwen3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A model folder, and a hub id whose files the engine downloaded into the Hugging Face cache
    # (laid out here as huggingface_hub lays it out; nothing is fetched).
    from_folder = token_counter(None, str(tiny_qwen3))
    assert isinstance(from_folder, TokenizerCounter)
    snapshot = tmp_path / "models--Qwen--Tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_bytes((tiny_qwen3 / "tokenizer.json").read_bytes())
    (tmp_path / "models--Qwen--Tiny" / "refs").mkdir()
    (tmp_path / "models--Qwen--Tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    cached = token_counter(None, "Qwen/Tiny")
    assert isinstance(cached, TokenizerCounter)
    assert cached.count(["大熊猫吃竹子"]) == from_folder.count(["大熊猫吃竹子"])
    with caplog.at_level(logging.INFO, logger="qwenstack.rag.chunking"):
        assert isinstance(token_counter(None, "Qwen/Not-Downloaded"), EstimatedCounter)
        assert isinstance(token_counter(None, None), EstimatedCounter)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "no local tokenizer: chunk sizes are estimated"] * 2
    with pytest.raises(FileNotFoundError, match="rag.tokenizer"):
        token_counter(str(tmp_path / "nowhere"), str(tiny_qwen3))


def test_cli_ingests_a_folder_of_every_format_and_a_changed_file_replaces_its_chunks(
    tmp_path: Path,
) -> None:
    """`qwenstack kb ingest` twice over a folder: the changed spreadsheet replaces its chunks,
    the rest is skipped, and one set of its chunks answers (`kb query`, JSON lines)."""
    import json

    from typer.testing import CliRunner

    from qwenstack.cli import app

    home = ["--home", str(tmp_path / "home")]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "review.pptx").write_bytes(pptx())
    (docs / "notes.txt").write_bytes("年假有十五天。".encode("gbk"))
    (docs / "staff.csv").write_bytes("姓名,部门\n张三,销售\n".encode("gbk"))
    (docs / "prices.xlsx").write_bytes(xlsx({"价格表": [["产品", "价格"], ["茶叶", 30]]}))

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, ["kb", *args, *home])
        assert result.exit_code == 0, result.output[-3000:]
        return result.stdout

    def ingest() -> dict[str, str]:
        return {line.split()[1]: line.split()[0]
                for line in run("ingest", "docs", str(docs)).splitlines()}

    run("create", "docs")
    assert ingest() == {"notes.txt": "ingested", "prices.xlsx": "ingested",
                        "review.pptx": "ingested", "staff.csv": "ingested"}
    (docs / "prices.xlsx").write_bytes(xlsx({"价格表": [["产品", "价格"], ["茶叶", 45]]}))
    assert ingest() == {"notes.txt": "unchanged", "prices.xlsx": "replaced",
                        "review.pptx": "unchanged", "staff.csv": "unchanged"}
    hits = [json.loads(line) for line in run(
        "query", "docs", "-q", "茶叶 价格", "--mode", "bm25", "--top-k", "10").splitlines()]
    assert [(h["source"], h["heading"], h["text"]) for h in hits if h["source"] == "prices.xlsx"] \
        == [("prices.xlsx", "价格表", "- 产品: 茶叶 | 价格: 45")]
    # Two files of one name in the folders given: refused by name, nothing written.
    (docs / "more").mkdir()
    (docs / "more" / "notes.txt").write_bytes(b"other notes")
    refused = CliRunner().invoke(app, ["kb", "ingest", "docs", str(docs), *home])
    assert refused.exit_code != 0 and "notes.txt" in refused.output, refused.output
