"""``elemta users``: who may log in to submit mail, and what they may send.

A password is read from a prompt (twice, not echoed) or, with
``--password-stdin``, from the first line of standard input: never from the
command line, where other users see it in the process list and it stays in
the shell's history. It is stored as an argon2id hash together with
SCRAM-SHA-256 keys; the password itself is kept nowhere.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .cli import _checked, _with_backend, limit_changes
from .directory import User, normalize_grant, normalize_login
from .hashing import scheme_of


def _auth_settings() -> Any:
    from elemta import plugin_settings

    return plugin_settings("datasource").auth


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password.removesuffix("\r")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Again",
                                err=True)
    if not password:
        raise click.UsageError("the password is empty")
    if len(password) > 1024:
        raise click.UsageError("the password is longer than 1024 characters")
    if len(password) < 12:
        click.echo("warning: a password under 12 characters is easy to guess", err=True)
    return password


def _hashes(password: str) -> dict[str, str]:
    """The argon2id hash and the SCRAM-SHA-256 keys of ``password``."""
    from elemta import ScramKeys

    from .backends import make_hasher

    auth = _auth_settings()
    return {"password": make_hasher(auth).hash(password),
            "scram": ScramKeys.derive(password, iterations=auth.scram_iterations).to_string()}


def _needs_directory_source(action: str) -> None:
    source = _auth_settings().source
    if source != "directory":
        raise click.UsageError(
            f"passwords are checked by the {source!r} source ([plugins.datasource.auth] "
            f"source), not stored here, so there is no password to {action}; use "
            "--no-password to set only limits and send_as")


def _user_or_exit(login: str) -> None:
    click.echo(f"elemta: there is no user {login} (see `elemta users list`)", err=True)
    sys.exit(1)


@click.group()
def users() -> None:
    """Users who log in to submit mail (elemta-datasource)."""


@users.command("add")
@click.argument("login")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--no-password", is_flag=True,
              help="No password here (LDAP or Dovecot checks it): only limits and send_as.")
@click.option("--max-message-bytes", type=click.IntRange(min=1), default=None,
              help="The largest message this user may send (552 5.3.4).")
@click.option("--daily-quota", type=click.IntRange(min=1), default=None,
              help="Messages per day (UTC); over it, 450 4.7.1 until midnight.")
@click.option("--send-as", "send_as", multiple=True, metavar="ADDRESS|@DOMAIN|*",
              help="Another sender address this user may use; repeat for more.")
@click.option("--no-mailbox", is_flag=True,
              help="Do not create the mailbox LOGIN in its hosted domain.")
def users_add(login: str, password_stdin: bool, no_password: bool,
              max_message_bytes: int | None, daily_quota: int | None,
              send_as: tuple[str, ...], no_mailbox: bool) -> None:
    """Add the user LOGIN (an address, usually); asks for the password."""
    name = _checked(normalize_login, login)
    grants = tuple(dict.fromkeys(_checked(normalize_grant, g) for g in send_as))
    hashes: dict[str, str] = {}
    if not no_password:
        _needs_directory_source("store")
        hashes = _hashes(_read_password(password_stdin))
    user = User(name, hashes.get("password"), hashes.get("scram"), False, max_message_bytes,
                daily_quota, grants)

    async def add(backend: Any) -> bool:
        await backend.add_user(user)
        if no_mailbox or "@" not in name:
            return False
        if await backend.get_domain(name.rpartition("@")[2]) is None:
            return False
        if name in await backend.list_mailboxes(name.rpartition("@")[2]):
            return False
        await backend.add_mailbox(name)
        return True

    mailbox = _with_backend(add)
    click.echo(f"user {name} added" + (f" (and the mailbox {name})" if mailbox else ""))


@users.command("passwd")
@click.argument("login")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def users_passwd(login: str, password_stdin: bool) -> None:
    """Set a new password for LOGIN."""
    _needs_directory_source("change")
    name = _checked(normalize_login, login)
    hashes = _hashes(_read_password(password_stdin))
    if not _with_backend(lambda b: b.update_user(name, **hashes)):
        _user_or_exit(name)
    click.echo(f"password of {name} changed")


@users.command("list")
@click.option("--domain", default=None, help="Only this domain's users.")
def users_list(domain: str | None) -> None:
    """List users: status, password scheme, SCRAM keys, limits, send_as."""
    from .directory import normalize_domain

    d = _checked(normalize_domain, domain) if domain else None
    rows = _with_backend(lambda b: b.list_users(d))
    for u in rows:
        fields = ["disabled" if u.disabled else "enabled",
                  scheme_of(u.password) if u.password else "no-password",
                  "scram" if u.scram else "no-scram"]
        if u.max_message_bytes:
            fields.append(f"max-message-bytes={u.max_message_bytes}")
        if u.daily_quota is not None:
            fields.append(f"daily-quota={u.daily_quota}")
        if u.messages_per_hour is not None:
            fields.append(f"messages-per-hour={u.messages_per_hour}")
        if u.send_as:
            fields.append(f"send-as={','.join(u.send_as)}")
        click.echo(f"{u.address}\t{' '.join(fields)}")
    click.echo(f"{len(rows)} user{'s' if len(rows) != 1 else ''}", err=True)


def _set(login: str, **changes: object) -> str:
    name = _checked(normalize_login, login)
    if not _with_backend(lambda b: b.update_user(name, **changes)):
        _user_or_exit(name)
    return name


@users.command("disable")
@click.argument("login")
def users_disable(login: str) -> None:
    """Refuse LOGIN's logins; mail for its mailbox keeps arriving."""
    click.echo(f"user {_set(login, disabled=True)} disabled (logins refused; mail still "
               "delivered)")


@users.command("enable")
@click.argument("login")
def users_enable(login: str) -> None:
    """Let LOGIN log in again."""
    click.echo(f"user {_set(login, disabled=False)} enabled")


@users.command("set")
@click.argument("login")
@click.option("--max-message-bytes", default=None, metavar="N|none",
              help="The largest message; `none` removes the limit.")
@click.option("--daily-quota", "--messages-per-day", "daily_quota", default=None,
              metavar="N|0|none",
              help="Messages per day (UTC), for this plugin and for elemta-ratelimit; 0: no "
                   "limit; `none`: no limit here, the rate limiter's configuration decides.")
@click.option("--messages-per-hour", default=None, metavar="N|0|none",
              help="Messages per hour, for elemta-ratelimit; 0: no limit; `none`: its "
                   "configuration decides.")
def users_set(login: str, max_message_bytes: str | None, daily_quota: str | None,
              messages_per_hour: str | None) -> None:
    """Change LOGIN's limits."""
    changes: dict[str, object] = {}
    if max_message_bytes is not None:
        if max_message_bytes.lower() == "none":
            changes["max_message_bytes"] = None
        elif max_message_bytes.isdigit() and int(max_message_bytes) > 0:
            changes["max_message_bytes"] = int(max_message_bytes)
        else:
            raise click.BadParameter(f"{max_message_bytes!r}: a positive number, or none",
                                     param_hint="--max-message-bytes")
    changes.update(limit_changes(daily_quota=daily_quota, messages_per_hour=messages_per_hour))
    if not changes:
        raise click.UsageError("nothing to change: give --max-message-bytes, --daily-quota "
                               "(--messages-per-day) or --messages-per-hour")
    name = _set(login, **changes)
    shown = ", ".join(f"{k.replace('_', '-')}={'none' if v is None else v}"
                      for k, v in changes.items())
    click.echo(f"user {name}: {shown}")


@users.command("grant")
@click.argument("login")
@click.argument("pattern", metavar="ADDRESS|@DOMAIN|*")
def users_grant(login: str, pattern: str) -> None:
    """Let LOGIN send as ADDRESS, anyone at @DOMAIN, or anyone (*)."""
    name = _checked(normalize_login, login)
    p = _checked(normalize_grant, pattern)
    _with_backend(lambda b: b.grant(name, p))
    click.echo(f"user {name} may send as {p}")


@users.command("revoke")
@click.argument("login")
@click.argument("pattern", metavar="ADDRESS|@DOMAIN|*")
def users_revoke(login: str, pattern: str) -> None:
    """Take back a send_as grant."""
    name = _checked(normalize_login, login)
    p = _checked(normalize_grant, pattern)
    if not _with_backend(lambda b: b.revoke(name, p)):
        click.echo(f"elemta: {name} has no grant {p} (see `elemta users list`)", err=True)
        sys.exit(1)
    click.echo(f"user {name} may no longer send as {p}")


@users.command("remove")
@click.argument("login")
def users_remove(login: str) -> None:
    """Remove the user LOGIN (the mailbox and its mail stay: `elemta mailboxes remove`)."""
    name = _checked(normalize_login, login)
    if not _with_backend(lambda b: b.remove_user(name)):
        _user_or_exit(name)
    click.echo(f"user {name} removed (its mailbox, if any, is kept)")

