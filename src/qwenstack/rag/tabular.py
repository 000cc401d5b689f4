"""Spreadsheets (CSV, TSV, XLSX) as text a model can read: each row one line of
`header: value` pairs, so a chunk cut anywhere between rows still says what each value is.

Rows are read as a stream and counted as they come: a file past rag.max_table_cells, a row
wider than a spreadsheet can be, or text past rag.max_extracted_chars (each row repeats the
header's names, so a small file can render to gigabytes) is refused before it is all read or
rendered.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import zipfile
from collections.abc import Iterable, Sequence

from qwenstack.rag import RagError, too_much_text
from qwenstack.settings import RagSettings

# Excel's widest sheet; a wider "row" is no table (and a CSV line of a million commas is a
# million cells before any cap on cells could see a second row).
MAX_COLUMNS = 16_384
# A CSV field longer than this is refused: csv's own limit, named here so the error can say it.
MAX_FIELD_CHARS = 131_072
DELIMITERS = ",\t;|"


def delimited(text: str, name: str, limits: RagSettings, delimiter: str | None) -> str:
    """A CSV (or with `delimiter` "\\t", a TSV) file's rows as text. Without a delimiter, the
    one of `, tab ; |` its first line holds most of (European Excel writes `;`)."""
    if delimiter is None:
        first_line = text[:65_536].partition("\n")[0]
        delimiter = max(DELIMITERS, key=first_line.count)
    csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        return rows_as_text(rows, CellCount(name, limits))
    except csv.Error as exc:
        if "larger than field limit" in str(exc):  # also what an unclosed quote runs into
            raise RagError(f"{name}: a field over {MAX_FIELD_CHARS} characters (an unclosed "
                           "quote?).", status=413, code="table_too_large") from None
        raise RagError(f"{name}: the CSV cannot be read ({exc}).", code="unreadable_file") \
            from None


def workbook(data: bytes, name: str, limits: RagSettings) -> list[tuple[str, str]]:
    """(sheet name, rows as text) per worksheet of an XLSX, read-only: rows are parsed as
    they are iterated, not loaded into a workbook in memory. Cells are the values last saved
    (data_only), as formulas would mean nothing to a reader. The caller checks the zip first."""
    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = load_workbook(io.BytesIO(data), read_only=True, data_only=True, keep_links=False)
    except (InvalidFileException, KeyError, ValueError, TypeError, zipfile.BadZipFile,
            SyntaxError, OSError) as exc:  # SyntaxError: the XML parser's ParseError
        raise RagError(f"{name}: the XLSX cannot be read ({exc}).", code="unreadable_file") \
            from None
    cells = CellCount(name, limits)  # one count over all the sheets
    try:
        sheets = []
        for sheet in book.worksheets:
            # A sheet's declared dimension can be wrong (or hostile: A1:XFD1048576 would pad
            # each row to 16,384 cells): rows are taken as wide as their own cells.
            sheet.reset_dimensions()
            sheets.append((sheet.title, rows_as_text(sheet.iter_rows(values_only=True), cells)))
        return sheets
    except (KeyError, ValueError, TypeError, zipfile.BadZipFile, SyntaxError, OSError) as exc:
        raise RagError(f"{name}: the XLSX cannot be read ({exc}).", code="unreadable_file") \
            from None
    finally:
        book.close()


def rows_as_text(rows: Iterable[Sequence[object]], cells: CellCount) -> str:
    """The first row with any value is the header; each later row becomes a line
    `- header: value | header: value` of its non-empty cells (a line starting `- ` is a
    paragraph break to the chunker, so chunks end between rows)."""
    header: list[str] | None = None
    lines = []
    for row in rows:
        values = [_cell_text(value) for value in cells.counted(row)]
        if not any(values):
            continue
        if header is None:
            header = [value or f"column {number}" for number, value in enumerate(values, 1)]
            continue
        pairs = [f"{header[i] if i < len(header) else f'column {i + 1}'}: {value}"
                 for i, value in enumerate(values) if value]
        lines.append(cells.written("- " + " | ".join(pairs)))
    if header is not None and not lines:  # a header alone is still the file's text
        lines.append("- " + " | ".join(header))
    return "\n".join(lines)


class CellCount:
    """Cells read and characters written so far in one file. Empty cells count, and a row of
    none counts as one: they cost the reading as much (openpyxl yields every row a gap skips,
    and a CSV of blank lines is all rows)."""

    def __init__(self, name: str, limits: RagSettings) -> None:
        self.name, self.limit, self.seen = name, limits.max_table_cells, 0
        self.max_chars, self.chars = limits.max_extracted_chars, 0

    def written(self, line: str) -> str:
        self.chars += len(line) + 1
        if self.chars > self.max_chars:
            raise too_much_text(self.name, self.chars, self.max_chars)
        return line

    def counted(self, row: Sequence[object]) -> Sequence[object]:
        if len(row) > MAX_COLUMNS:
            raise RagError(f"{self.name}: a row of {len(row)} cells, wider than a spreadsheet "
                           f"can be ({MAX_COLUMNS} columns).", status=413,
                           code="table_too_large")
        self.seen += max(len(row), 1)
        if self.seen > self.limit:
            raise RagError(f"{self.name}: more than {self.limit} cells (rag.max_table_cells).",
                           status=413, code="table_too_large")
        return row


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 3.0 as 3: spreadsheets store every number as a float
    elif isinstance(value, dt.datetime) and value.time() == dt.time():
        value = value.date()
    text = value.isoformat() if isinstance(value, dt.date | dt.time) else str(value)
    # A cell's line breaks would split its row; `|` would end its cell.
    return " ".join(text.replace("|", "/").split())

