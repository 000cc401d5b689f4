"""The admin HTTP API under /admin: only callers authenticated as admins reach it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from qwenstack.callers import ANONYMOUS, Caller
from qwenstack.database import parse_duration
from qwenstack.gateway import usage
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.resources import resources
from qwenstack.keys import KeyStoreError, UnknownKey


def require_admin(request: Request) -> Caller:
    caller: Caller = getattr(request.state, "caller", ANONYMOUS)
    if not caller.admin:
        raise GatewayError(403, "This route needs an admin key.", code="admin_only")
    return caller


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class NewKey(BaseModel):
    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    models: list[str] | None = None
    expires: str | None = Field(None, description="Lifetime such as 30d, 12h; unset: none.")
    admin: bool = False
    cache_all: bool = Field(False, description="The answer cache may serve sampled answers too.")
    thinking: bool = Field(True, description="false: its chat requests go without thinking.")


def _key_error(exc: KeyStoreError) -> GatewayError:
    unknown = isinstance(exc, UnknownKey)
    status, code = (404, "key_not_found") if unknown else (400, "invalid_key_request")
    return GatewayError(status, str(exc), code=code)


# Plain `def` routes: FastAPI runs them in its thread pool, so database calls do not block the loop.
@router.post("/keys", status_code=201)
def create_key(body: NewKey, request: Request) -> dict[str, Any]:
    """A new key; the response is the only place its secret (`key`) ever appears."""
    try:
        expires_in = parse_duration(body.expires) if body.expires else None
        info, secret = resources(request).keys.create(
            body.name, rpm=body.rpm, tpm=body.tpm, max_concurrency=body.max_concurrency,
            models=body.models, expires_in=expires_in, admin=body.admin,
            cache_all=body.cache_all, thinking=body.thinking,
        )
    except KeyStoreError as exc:
        raise _key_error(exc) from None
    except ValueError as exc:
        raise GatewayError(400, str(exc), code="invalid_key_request", param="expires") from None
    return {**info.as_json(), "key": secret}


@router.get("/keys")
def list_keys(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [info.as_json() for info in resources(request).keys.list()]}


@router.delete("/keys/{name}")
def revoke_key(name: str, request: Request) -> dict[str, Any]:
    try:
        info, digest = resources(request).keys.revoke(name)
    except KeyStoreError as exc:
        raise _key_error(exc) from None
    resources(request).authenticator.forget(digest)
    return info.as_json()


@router.post("/keys/{name}/rotate")
def rotate_key(name: str, request: Request) -> dict[str, Any]:
    try:
        info, secret, old_digest = resources(request).keys.rotate(name)
    except KeyStoreError as exc:
        raise _key_error(exc) from None
    resources(request).authenticator.forget(old_digest)
    return {**info.as_json(), "key": secret}


@router.get("/usage")
def usage_totals(request: Request, by: usage.GroupBy = "key", since: str = "1d") -> dict[str, Any]:
    try:
        window = parse_duration(since)
    except ValueError as exc:
        raise GatewayError(400, str(exc), code="invalid_request", param="since") from None
    return {"object": "list", "by": by, "since": since,
            "data": usage.totals(resources(request).keys.engine, by, window)}


@router.delete("/cache")
async def purge_cache(request: Request) -> dict[str, int]:
    """Drop every cached answer, of every caller (with Redis: every key under the prefix)."""
    return {"purged": await resources(request).cache.purge()}
