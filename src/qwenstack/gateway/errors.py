"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import orjson
from starlette.responses import Response

TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """Raised anywhere in a request; becomes an OpenAI-shaped error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.headers = headers  # sent with the error, e.g. rate-limit state


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps({
        "error": {
            "message": message,
            "type": TYPE_BY_STATUS.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    })


def error_response(error: GatewayError) -> Response:
    headers = dict(error.headers or {})
    if error.retry_after_s is not None:
        headers["retry-after"] = str(error.retry_after_s)
    return Response(
        error_body(error.status, error.message, error.code, error.param),
        status_code=error.status,
        media_type="application/json",
        headers=headers,
    )
