"""Each UI user's own knowledge base: files uploaded in the chat go there, through the gateway's
knowledge-base API with the user's own key, so the gateway's access rules keep it theirs.

The base is named after the user's gateway key (`ui-<user>`) and made on the first upload; the
user's key creates it and so owns it. Answers grounded on it carry citations, shown as sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx

from qwenstack.ui.accounts import gateway_key_name

# The types the gateway's parsers read, by the MIME type a browser may give each: Chainlit
# checks both. Browsers take Markdown's type from the system's MIME table, which varies.
ACCEPTED_UPLOADS: dict[str, list[str]] = {
    "text/plain": [".txt", ".md"],
    "text/markdown": [".md"],
    "text/x-markdown": [".md"],
    "text/html": [".html", ".htm"],
    "application/pdf": [".pdf"],
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": [".docx"],
}
MAX_FILES_PER_MESSAGE = 10
SNIPPET_CHARS = 160


class UploadRefused(Exception):
    """The gateway refused an upload or a knowledge-base call; its own words, for the chat."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def knowledge_base_name(identifier: str) -> str:
    return gateway_key_name(identifier)


def max_upload_mb(max_upload_bytes: int) -> int:
    """Chainlit's per-file limit is in whole MiB; the gateway enforces the exact byte limit."""
    return max(1, math.ceil(max_upload_bytes / 2**20))


@dataclass(frozen=True)
class Ingested:
    name: str
    status: str  # "ingested", "replaced" or "unchanged"
    chunks: int


class KnowledgeBaseClient:
    """One user's calls to the gateway's /v1/knowledge_bases routes."""

    def __init__(self, gateway_url: str, key: str, name: str, timeout_s: float) -> None:
        self.name = name
        self.key = key
        self._base_url = f"{gateway_url}/v1"
        self._timeout = httpx.Timeout(timeout_s, connect=5)
        self._headers = {"authorization": f"Bearer {key}"}

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=self._base_url, timeout=self._timeout, headers=self._headers
        ) as client:
            return await client.request(method, path, **kwargs)

    async def document_count(self) -> int:
        """Files in the user's base; 0 when it does not exist yet. Raises UploadRefused when
        the gateway has no knowledge bases (no `rag` extra) or refuses the key."""
        response = await self._request("GET", f"/knowledge_bases/{self.name}")
        if response.status_code == 404 and _code(response) == "knowledge_base_not_found":
            return 0
        _check(response)
        return int(response.json().get("files") or 0)

    async def upload(self, files: list[tuple[str, bytes]]) -> list[Ingested]:
        """Ingest the files into the user's base, making it on the first upload."""
        response = await self._post_files(files)
        if response.status_code == 404 and _code(response) == "knowledge_base_not_found":
            created = await self._request("POST", "/knowledge_bases", json={"name": self.name})
            # 409: another session of this user made it meanwhile. Should someone else hold the
            # name, the upload below is refused with 404 and the user is told.
            if created.status_code != 409:
                _check(created)
            response = await self._post_files(files)
        _check(response)
        return [Ingested(item["name"], item["status"], int(item["chunks"]))
                for item in response.json()["data"]]

    async def _post_files(self, files: list[tuple[str, bytes]]) -> httpx.Response:
        return await self._request("POST", f"/knowledge_bases/{self.name}/files",
                                   files=[("file", (name, data)) for name, data in files])


def _error(response: httpx.Response) -> dict[str, Any]:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return {}
    return error if isinstance(error, dict) else {}


def _code(response: httpx.Response) -> str | None:
    return _error(response).get("code")


def _check(response: httpx.Response) -> None:
    if response.is_success:
        return
    message = _error(response).get("message")
    raise UploadRefused(response.status_code,
                        message if isinstance(message, str) else f"HTTP {response.status_code}")


def sources(citations: list[dict[str, Any]]) -> list[str]:
    """One Markdown line per citation: number, file, page or section, and a snippet."""
    lines = []
    for number, citation in enumerate(citations, 1):
        where = str(citation.get("source") or "?")
        if citation.get("page"):
            where += f", p. {citation['page']}"
        if citation.get("heading"):
            where += f", {citation['heading']}"
        snippet = " ".join(str(citation.get("text") or "").split())
        if len(snippet) > SNIPPET_CHARS:
            snippet = snippet[:SNIPPET_CHARS] + "…"
        lines.append(f"{number}. **{where}**: {snippet}")
    return lines
