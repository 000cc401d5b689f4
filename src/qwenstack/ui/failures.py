"""What a failed chat turn tells the user: each error on the way to the gateway, as a text key
of texts.py and its values."""

from __future__ import annotations

import httpx
import openai

from qwenstack.ui.gateway_keys import KeyUnavailable
from qwenstack.ui.knowledge import UploadRefused

# The engine's "context too long" answer, when the estimate in conversation.py fell short.
CONTEXT_ERROR_HINTS = ("context_length_exceeded", "maximum context length", "context length")
DEFAULT_RETRY_S = 5


class MessageTooLong(Exception):
    """The newest message alone does not fit the model's context."""

    def __init__(self, context_len: int | None) -> None:
        super().__init__(context_len)
        self.context_len = context_len


def context_too_long(exc: openai.APIStatusError) -> bool:
    described = f"{exc.code or ''} {gateway_message(exc)}".lower()
    return any(hint in described for hint in CONTEXT_ERROR_HINTS)


def retry_after_s(exc: openai.APIStatusError) -> int:
    """The gateway's Retry-After (429 and 503 carry it), in whole seconds."""
    try:
        return max(1, round(float(exc.response.headers.get("retry-after") or DEFAULT_RETRY_S)))
    except ValueError:
        return DEFAULT_RETRY_S


def gateway_message(exc: openai.APIError) -> str:
    """The gateway's own words (its OpenAI-shaped error body), without the SDK's prefix."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return exc.message


def explain(
    exc: BaseException, *, model: str, gateway_url: str, timeout_s: float
) -> tuple[str, dict[str, object]] | None:
    """The text key and values for `exc`; None for an error nobody planned for."""
    if isinstance(exc, MessageTooLong):
        return "too_long", {"context": exc.context_len or "?"}
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", {"seconds": round(timeout_s)}
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
        return "gateway_down", {"url": gateway_url}
    if isinstance(exc, UploadRefused):
        return "upload_refused", {"status": exc.status, "message": exc.message}
    if isinstance(exc, KeyUnavailable):
        return "no_key", {"reason": str(exc)}
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited", {"retry": retry_after_s(exc)}
    if isinstance(exc, openai.APIStatusError) and exc.status_code in (502, 503, 504):
        return "engine_unavailable", {"retry": retry_after_s(exc)}
    if isinstance(exc, openai.PermissionDeniedError):
        return "model_not_allowed", {"model": model}
    if isinstance(exc, openai.AuthenticationError):
        return "key_rejected", {}
    if isinstance(exc, openai.APIStatusError):
        return "gateway_error", {"status": exc.status_code, "message": gateway_message(exc)}
    if isinstance(exc, openai.APIError):  # an error event in the middle of a stream
        return "gateway_error", {"status": "stream", "message": gateway_message(exc)}
    return None
