"""Each UI user's own gateway key, made through the gateway's admin API on first use."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from qwenstack.settings import UiSettings
from qwenstack.ui.accounts import Accounts

NO_AUTH = "no-key"  # the OpenAI SDK needs some key; a gateway with auth off ignores it


@dataclass(frozen=True)
class UserKey:
    name: str  # the key's name at the gateway: its knowledge base is named alike
    secret: str


class KeyUnavailable(Exception):
    """The gateway would not give the user a key (revoked by an admin, UI key refused, ...)."""


class UserKeys:
    def __init__(self, settings: UiSettings, gateway_url: str, accounts: Accounts) -> None:
        self.settings = settings
        self.gateway_url = gateway_url
        self.accounts = accounts
        admin_key = settings.gateway_admin_key
        self.admin_key = admin_key.get_secret_value() if admin_key else None

    async def key(self, identifier: str, refused: str | None = None) -> UserKey:
        """The user's key. `refused`: a key the gateway just rejected, to be replaced.

        Raises KeyUnavailable, or httpx.TransportError when the gateway cannot be reached."""
        name, stored = await asyncio.to_thread(self.accounts.gateway_key, identifier)
        if self.admin_key is None:
            return UserKey(name, NO_AUTH)
        if stored and stored != refused:
            return UserKey(name, stored)
        # Rotated by another session of the same user, or by an admin: a new secret for the
        # same key keeps its usage history and limits. The UI made this key: it had its secret.
        secret = await self._rotate(name) if stored else await self._create(name)
        if secret is None:
            # A key of that name exists and the UI has no secret of it: someone else's (or one
            # whose secret the UI lost). Never adopted: the user gets a new name.
            await asyncio.to_thread(self.accounts.renew_account_id, identifier)
            name, _ = await asyncio.to_thread(self.accounts.gateway_key, identifier)
            secret = await self._create(name)
            if secret is None:
                raise KeyUnavailable(f"the gateway has a key named {name!r} already.")
        await asyncio.to_thread(self.accounts.set_gateway_key, identifier, secret)
        return UserKey(name, secret)

    async def _admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.gateway_url, timeout=30) as client:
            response = await client.request(
                method, path, headers={"authorization": f"Bearer {self.admin_key}"}, **kwargs
            )
        if response.status_code in (401, 403):
            raise KeyUnavailable("the gateway refused the UI's admin key (ui.gateway_admin_key).")
        return response

    async def _create(self, name: str) -> str | None:
        """The new key's secret; None when a key of that name exists."""
        body = {"name": name, "rpm": self.settings.user_key_rpm, "tpm": self.settings.user_key_tpm}
        response = await self._admin("POST", "/admin/keys", json=body)
        if response.status_code == 201:
            return str(response.json()["key"])
        if response.status_code == 400 and "exists already" in _message(response):
            return None
        raise KeyUnavailable(_message(response))

    async def _rotate(self, name: str) -> str:
        response = await self._admin("POST", f"/admin/keys/{name}/rotate")
        if response.status_code == 200:
            return str(response.json()["key"])
        if response.status_code == 404:  # deleted by an admin: made again
            secret = await self._create(name)
            if secret is not None:
                return secret
        raise KeyUnavailable(_message(response))


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"
