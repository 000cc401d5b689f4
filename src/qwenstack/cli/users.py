"""`qwenstack users`: the chat UI's users who sign in with a password."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qwenstack.cli.common import ConfigOpt, HomeOpt, opened, print_table, settings_for
from qwenstack.cli.keys import key_store
from qwenstack.keys import KeyStoreError

if TYPE_CHECKING:
    from qwenstack.ui.accounts import Accounts

app = typer.Typer(help="Chat UI users who sign in with a password.", no_args_is_help=True)


def _accounts(config: Path | None, home: Path | None) -> AbstractContextManager[Accounts]:
    from qwenstack.ui import store
    from qwenstack.ui.accounts import AccountError

    return opened(
        lambda: store.accounts(settings_for(config, home=home)),
        lambda accounts: accounts.engine.dispose(),
        (AccountError,),
    )


@app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Sign-in name.")],
    password: Annotated[str, typer.Option(
        prompt=True, hide_input=True, confirmation_prompt=True,
        help="Asked for when not given (flags show up in the shell history).")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add a user (the password is stored as a scrypt hash)."""
    with _accounts(config, home) as accounts:
        accounts.add(name, password)
    typer.echo(f"added {name}")


@app.command("list")
def users_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Every UI user: how they sign in and whether they have a gateway key yet."""
    with _accounts(config, home) as accounts:
        users = accounts.list()
    print_table([("NAME", "SIGN_IN", "GATEWAY_KEY", "CREATED")] + [
        (u.identifier, "password" if u.has_password else "header",
         u.gateway_key or "-",
         u.created_at.strftime("%Y-%m-%d %H:%M"))
        for u in users
    ])


@app.command("remove")
def users_remove(name: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Remove a user and revoke their gateway key (their chat history stays in the database)."""
    with _accounts(config, home) as accounts:
        key = accounts.remove(name)
    settings = settings_for(config, home=home)
    if key and settings.auth.enabled:
        with key_store(config, home) as store, contextlib.suppress(KeyStoreError):
            store.revoke(key)
    typer.echo(f"removed {name}")
