"""GET /v1/quota: a caller's own limits and what is left of them now.

Any authenticated caller (key or JWT) reads its own figures and nobody else's: the route takes
no name, only the caller the credential makes. No body, no parameters: nothing to bound but the
one read of the caller's buckets, which takes nothing from them. The chat UI shows it under
each answer; programs can check it before a batch instead of probing with requests.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from redis.exceptions import RedisError

from qwenstack.callers import ANONYMOUS, Caller
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.resources import resources

router = APIRouter(prefix="/v1")


@router.get("/quota")
async def own_quota(request: Request) -> dict[str, Any]:
    caller: Caller = getattr(request.state, "caller", ANONYMOUS)
    limiter = resources(request).limiter
    quota = limiter.quota(caller)
    try:
        levels = await limiter.remaining(caller)
    except (RedisError, OSError, TimeoutError):
        raise GatewayError(503, "The rate limiter is unavailable; try again shortly.",
                           code="rate_limiter_unavailable", retry_after_s=1) from None
    return {
        "object": "quota",
        "caller": caller.name,
        "limits": {"requests_per_minute": quota.rpm, "tokens_per_minute": quota.tpm,
                   "max_concurrency": quota.concurrency},
        # Whole requests and tokens the caller may still send this minute; null: no limit.
        "remaining": {
            "requests": math.floor(levels.requests_left) if levels and quota.rpm else None,
            "tokens": math.floor(levels.tokens_left) if levels and quota.tpm else None,
        },
    }
