"""The line under each answer: the turn's token counts (from its streams' usage chunks) and
what the user's key has left this minute (the gateway's GET /v1/quota, which answers each
caller about itself only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
from openai.types.chat import ChatCompletionChunk

from qwenstack.ui.gateway_keys import UserKey
from qwenstack.ui.texts import text

log = logging.getLogger(__name__)


@dataclass
class Usage:
    """Tokens of every request of a turn, from their usage chunks."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def add(self, chunk: ChatCompletionChunk) -> None:
        if chunk.usage:
            self.prompt_tokens += chunk.usage.prompt_tokens
            self.completion_tokens += chunk.usage.completion_tokens
            self.requests += 1


async def own_quota(gateway_url: str, key: UserKey, timeout_s: float) -> dict[str, Any] | None:
    """The key's limits and what is left of them; None when the gateway cannot say (an older
    gateway without the route, or one out of reach): the line then has the counts alone."""
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5)) as client:
            response = await client.get(f"{gateway_url}/v1/quota",
                                        headers={"authorization": f"Bearer {key.secret}"})
        response.raise_for_status()
        quota: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        log.info("No quota for this answer: %r", exc)
        return None
    return quota


def summary(usage: Usage, quota: dict[str, Any] | None, language: str) -> str:
    return text("usage", language, prompt=f"{usage.prompt_tokens:,}",
                completion=f"{usage.completion_tokens:,}", quota=_left(quota, language))


def _left(quota: dict[str, Any] | None, language: str) -> str:
    if not quota:
        return ""
    limits, remaining = quota.get("limits") or {}, quota.get("remaining") or {}
    parts = [
        text(f"quota_{kind}", language, left=f"{remaining[kind]:,}", limit=f"{limits[limit]:,}")
        for kind, limit in (("requests", "requests_per_minute"), ("tokens", "tokens_per_minute"))
        if isinstance(remaining.get(kind), int) and isinstance(limits.get(limit), int)
    ]
    if not parts:
        return text("quota_unlimited", language)
    return text("quota_left", language, left=text("quota_and", language).join(parts))
