"""What the parse workers' fork server (parse_worker.py) imports once, so that no worker does:
the parsers and their libraries. Imported there only, never by the gateway.

Without numpy: openpyxl imports it when it can, only to know numpy's number types when writing
a workbook, and its ~100 MB of address space (OpenBLAS's buffers) would count against each
worker's rag.parse_memory_bytes. Workers fork from this process, so they go without it too.
"""

import sys

sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]  # None: "import numpy" fails

import bs4  # noqa: E402, F401
import openpyxl  # noqa: E402, F401
import pptx  # noqa: E402, F401
import pypdf  # noqa: E402, F401

import qwenstack.rag.parsers  # noqa: E402, F401
