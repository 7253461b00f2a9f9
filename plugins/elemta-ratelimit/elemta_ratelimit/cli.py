"""``elemta ratelimit``: what the limits have counted, and starting a count over.

The commands open the same state store as the server (``[state]``), so they
work while it runs, and with Redis they see every node's counts.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from typing import Any, Awaitable, Callable

import click

from .limits import PREFIX
from .settings import RatelimitSettings

KINDS = ("ip", "sender", "domain", "user", "recipient")


def _with_store(op: Callable[[Any], Awaitable[Any]]) -> Any:
    from elemta import StateUnavailable, current_settings, state_store

    store = state_store(current_settings())

    async def run() -> Any:
        try:
            return await op(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StateUnavailable as e:
        click.echo(f"elemta: {e}", err=True)
        sys.exit(1)


def _limit_of(settings: RatelimitSettings, kind: str, window: str, value: str) -> int | None:
    if kind == "domain":
        w = settings.domains.get(value, settings.domain)
    elif kind == "user":
        w = settings.users.get(value, settings.user)
    else:
        w = getattr(settings, kind, None)
    if w is None:
        return None
    return w.per_hour if window == "hour" else w.per_day if window == "day" else None


def describe(settings: RatelimitSettings, key: str, value: str, now: float,
             own: dict[tuple[str, str, str], int] | None = None) -> str | None:
    """One line for a key of the store: what it counts, how much of it is used. ``own``:
    the limits of a domain's or user's own the server noted (``ratelimit:limit:…``)."""
    parts = key[len(PREFIX):].split(":", 2)
    if parts[0] == "conn":
        return f"connections\t{parts[1]}\tnow\t{value} open"
    if parts[0] == "connrate":
        limit, period, what = settings.connections_per_minute, 60.0, "minute"
        subject = parts[1]
    elif len(parts) == 3 and parts[0] in KINDS:
        kind, what, subject = parts
        limit = _limit_of(settings, kind, what, subject)
        if own and (kind, what, subject) in own:
            limit = own[kind, what, subject] or None      # 0: no limit for this one
        period = 3600.0 if what == "hour" else 86_400.0
    else:
        return None
    label = "connections" if parts[0] == "connrate" else parts[0]
    if limit is None or not value:
        return f"{label}\t{subject}\t{what}\t(no limit set now)"
    used = min(limit, math.ceil((float(value) - now) / (period / limit) - 1e-9))
    return f"{label}\t{subject}\t{what}\t{used} of {limit} used"


@click.group()
def ratelimit() -> None:
    """Rate limits (elemta-ratelimit)."""


@ratelimit.command("status")
@click.argument("kind", required=False, type=click.Choice([*KINDS, "connections"]))
@click.argument("value", required=False)
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
def ratelimit_status(kind: str | None, value: str | None, limit: int) -> None:
    """What is counted now: connections, and messages per KIND (and VALUE)."""
    from elemta import plugin_settings

    settings = plugin_settings("ratelimit")
    if kind is None:
        prefixes = [PREFIX]
    elif kind == "connections":
        prefixes = [f"{PREFIX}conn:{value or ''}", f"{PREFIX}connrate:{value or ''}"]
    else:
        prefixes = [f"{PREFIX}{kind}:{w}:{(value or '').lower()}" for w in ("hour", "day")]
        if kind in ("domain", "user"):
            prefixes.append(f"{PREFIX}limit:{kind}:")

    async def collect(store: Any) -> list[Any]:
        return [e for p in prefixes for e in await store.scan(p, limit)]

    entries = _with_store(collect)
    own: dict[tuple[str, str, str], int] = {}
    for e in entries:
        parts = e.key[len(PREFIX):].split(":", 3)
        if parts[0] == "limit" and len(parts) == 4 and e.value and e.value.isdigit():
            own[parts[1], parts[2], parts[3]] = int(e.value)
    now = time.time()
    lines = [line for e in entries if (line := describe(settings, PREFIX + e.key[len(PREFIX):],
                                                        e.value, now, own))]
    for line in lines:
        click.echo(line)
    click.echo(f"{len(lines)} count{'s' if len(lines) != 1 else ''}", err=True)


@ratelimit.command("reset")
@click.argument("kind", required=False, type=click.Choice([*KINDS, "connections"]))
@click.argument("value", required=False)
@click.option("--all", "everything", is_flag=True, help="Start every count over.")
def ratelimit_reset(kind: str | None, value: str | None, everything: bool) -> None:
    """Start the counts of KIND VALUE over (or, with --all, every count)."""
    if everything == (kind is not None) or (kind is not None and value is None):
        raise click.UsageError("give KIND and VALUE (ratelimit reset sender a@example.org), "
                               "or --all")
    if everything:
        prefixes = [PREFIX]
    elif kind == "connections":
        prefixes = [f"{PREFIX}conn:{value}", f"{PREFIX}connrate:{value}"]
    else:
        prefixes = [f"{PREFIX}{kind}:{w}:{(value or '').lower()}" for w in ("hour", "day")]

    async def clear(store: Any) -> int:
        return sum([await store.clear(p) for p in prefixes])

    n = _with_store(clear)
    click.echo(f"{n} count{'s' if n != 1 else ''} started over")
