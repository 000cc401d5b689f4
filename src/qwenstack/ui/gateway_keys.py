"""Each UI user's own gateway key, made through the gateway's admin API on first use."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from qwenstack.settings import UiSettings
from qwenstack.ui.accounts import Accounts, gateway_key_name

NO_AUTH = "no-key"  # the OpenAI SDK needs some key; a gateway with auth off ignores it


class KeyUnavailable(Exception):
    """The gateway would not give the user a key (revoked by an admin, UI key refused, ...)."""


class UserKeys:
    def __init__(self, settings: UiSettings, gateway_url: str, accounts: Accounts) -> None:
        self.settings = settings
        self.gateway_url = gateway_url
        self.accounts = accounts
        admin_key = settings.gateway_admin_key
        self.admin_key = admin_key.get_secret_value() if admin_key else None

    async def key(self, identifier: str, refused: str | None = None) -> str:
        """The user's key. `refused`: a key the gateway just rejected, to be replaced.

        Raises KeyUnavailable, or httpx.TransportError when the gateway cannot be reached."""
        if self.admin_key is None:
            return NO_AUTH
        stored = await asyncio.to_thread(self.accounts.gateway_key, identifier)
        if stored and stored != refused:
            return stored
        name = gateway_key_name(identifier)
        # A rejected key was rotated (by another session of the same user, or an admin), or the
        # UI database lost it: a new secret for the same key keeps its usage history and limits.
        key = await self._rotate(name) if stored else await self._create(name)
        await asyncio.to_thread(self.accounts.set_gateway_key, identifier, key)
        return key

    async def _admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.gateway_url, timeout=30) as client:
            response = await client.request(
                method, path, headers={"authorization": f"Bearer {self.admin_key}"}, **kwargs
            )
        if response.status_code in (401, 403):
            raise KeyUnavailable("the gateway refused the UI's admin key (ui.gateway_admin_key).")
        return response

    async def _create(self, name: str) -> str:
        body = {"name": name, "rpm": self.settings.user_key_rpm, "tpm": self.settings.user_key_tpm}
        response = await self._admin("POST", "/admin/keys", json=body)
        if response.status_code == 201:
            return response.json()["key"]
        if response.status_code == 400 and "exists already" in _message(response):
            return await self._rotate(name)
        raise KeyUnavailable(_message(response))

    async def _rotate(self, name: str) -> str:
        response = await self._admin("POST", f"/admin/keys/{name}/rotate")
        if response.status_code == 200:
            return response.json()["key"]
        if response.status_code == 404:
            return await self._create(name)
        raise KeyUnavailable(_message(response))


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"
