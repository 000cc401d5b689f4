"""Each UI user's own knowledge base, and the team bases their key may read: files uploaded in
the chat go into their own, through the gateway's knowledge-base API with the user's own key, so
the gateway's access rules keep it theirs; a chat may be grounded on either.

The base is named after the user's gateway key (`ui-<account id>`) and made on the first upload
by the UI's own service key, the only one the gateway lets make `ui-...` bases, with the user's key
as its one writer. Before uploading to it or grounding on it the UI checks it is so: owned by the
service key, shared with nobody else. Answers grounded on it carry citations, shown as sources.

A team base (any other the gateway lists for the user's key) is used as the gateway says: it
scopes what each key may read and write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from qwenstack.rag.catalog import UI_PREFIX
from qwenstack.ui.gateway_keys import UserKey
from qwenstack.ui.markdown import literal_block

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
MAX_OFFERED_BASES = 100  # the settings panel's list; a key granted more sees the first by name


class UploadRefused(Exception):
    """The gateway refused an upload or a knowledge-base call; its own words, for the chat."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def max_upload_mb(max_upload_bytes: int) -> int:
    """Chainlit's per-file limit is in whole MiB; the gateway enforces the exact byte limit."""
    return max(1, math.ceil(max_upload_bytes / 2**20))


@dataclass(frozen=True)
class Ingested:
    name: str
    status: str  # "ingested", "replaced" or "unchanged"
    chunks: int


@dataclass(frozen=True)
class ServiceKey:
    """The UI's own admin key, which makes users' bases; None secret: the gateway has auth off."""

    name: str
    secret: str | None


@dataclass(frozen=True)
class Readable:
    """A knowledge base the user's key may read, as the settings panel offers it."""

    name: str
    own: bool  # the user's own uploads base
    writable: bool  # the key may delete (and ingest) files


class KnowledgeBaseClient:
    """One user's calls to the gateway's /v1/knowledge_bases routes, on one base: by default
    the one named after their key (their uploads), else a team base the key may read."""

    def __init__(self, gateway_url: str, key: UserKey, service: ServiceKey,
                 timeout_s: float, base: str | None = None) -> None:
        self.name = base or key.name
        self.own = self.name == key.name
        self.key = key
        self.service = service
        self._base_url = f"{gateway_url}/v1"
        self._timeout = httpx.Timeout(timeout_s, connect=5)

    async def _request(
        self, method: str, path: str, secret: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {"authorization": f"Bearer {secret or self.key.secret}"}
        async with httpx.AsyncClient(
            base_url=self._base_url, timeout=self._timeout, headers=headers
        ) as client:
            return await client.request(method, path, **kwargs)

    async def document_count(self) -> int:
        """Files in the user's base; 0 when it does not exist yet. Raises UploadRefused when
        the gateway has no knowledge bases (no `rag` extra), refuses the key, or the base is not
        the one the UI made for this user."""
        base = await self._base()
        return int(base.get("files") or 0) if base else 0

    async def readable(self) -> list[Readable]:
        """The bases the user's key may read, as the gateway lists them for it: their own
        uploads base (whether or not it exists yet) first, then team bases by name. Other
        users' `ui-` bases are never offered, whatever grants they carry."""
        response = await self._request("GET", "/knowledge_bases")
        _check(response)
        team = [Readable(str(base["name"]), False, self.key.name == base.get("owner")
                         or self.key.name in base.get("writers", ()))
                for base in response.json()["data"]
                if not str(base["name"]).startswith(UI_PREFIX)]
        return [Readable(self.key.name, True, True), *team[:MAX_OFFERED_BASES]]

    async def files(self) -> list[dict[str, Any]]:
        """The base's files (name, bytes, chunks, ...) by name; [] while it does not exist."""
        if await self._base() is None:
            return []
        response = await self._request("GET", f"/knowledge_bases/{self.name}/files")
        _check(response)
        return list(response.json()["data"])

    async def delete_file(self, file_name: str) -> None:
        """Take one file and its chunks out of the base; the gateway refuses a key that may
        not write it."""
        if await self._base() is None:
            raise UploadRefused(404, f"No knowledge base {self.name!r}.")
        response = await self._request(
            "DELETE", f"/knowledge_bases/{self.name}/files/{quote(file_name, safe='')}")
        _check(response)

    async def upload(self, files: list[tuple[str, bytes]]) -> list[Ingested]:
        """Ingest the files into the user's own base, making it on the first upload."""
        assert self.own, "uploads go to the user's own base"
        if await self._base() is None:
            created = await self._request(
                "POST", "/knowledge_bases", self.service.secret,
                json={"name": self.name, "writers": [self.name] if self.service.secret else []})
            # 409: another session of this user made it meanwhile; checked below as any.
            if created.status_code != 409:
                _check(created)
            await self._base()
        response = await self._request("POST", f"/knowledge_bases/{self.name}/files",
                                       files=[("file", (name, data)) for name, data in files])
        _check(response)
        return [Ingested(item["name"], item["status"], int(item["chunks"]))
                for item in response.json()["data"]]

    async def search(self, query: str, top_k: int) -> list[dict[str, Any]]:
        """The passages of the user's base nearest `query`, best first; [] while they have no
        base. Checked first to be the UI's own for this user, as uploads and grounding are."""
        if await self._base() is None:
            return []
        response = await self._request("POST", f"/knowledge_bases/{self.name}/query",
                                       json={"query": query, "top_k": top_k})
        _check(response)
        return list(response.json()["data"])

    async def _base(self) -> dict[str, Any] | None:
        """The base as the gateway describes it, None when there is none (or the key may not
        read it); for the user's own, UploadRefused when it is not the UI's own for this user
        (made by another key before the gateway reserved `ui-` names, or shared since), so the
        user's files never go to, and their answers never come from, a base anyone else can
        write or read."""
        response = await self._request("GET", f"/knowledge_bases/{self.name}")
        if response.status_code == 404 and _code(response) == "knowledge_base_not_found":
            return None
        _check(response)
        base: dict[str, Any] = response.json()
        # A team base is shared by design; auth off: every caller may use every base anyway.
        if not self.own or self.service.secret is None:
            return base
        grantees = {*base.get("readers", ()), *base.get("writers", ())}
        if base.get("owner") != self.service.name or grantees != {self.name}:
            raise UploadRefused(409, f"The knowledge base {self.name!r} was not made by this "
                                     "chat UI for you; it is not used. Tell an administrator.")
        return base


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


def sources(citations: list[dict[str, Any]]) -> str:
    """The citations as a literal block, one line each: number, file, page or section, and a
    snippet. Literal: file names, headings and snippets come from whoever wrote the documents,
    and must not become links or images in the chat."""
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
        lines.append(" ".join(f"{number}. {where}: {snippet}".split()))
    return literal_block(lines)
