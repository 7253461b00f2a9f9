"""``elemta greylist``: look at and change the greylist of a running (or stopped) server.

The commands open the same state store as the server (``[state]``): the
embedded SQLite file, which the server's own writes share safely, or Redis.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, Awaitable, Callable

import click

from .policy import PREFIX, Greylist


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


@click.group()
def greylist() -> None:
    """Greylisting state (elemta-greylist)."""


@greylist.command("list")
@click.option("--what", type=click.Choice(["pending", "passed", "allowed", "all"]),
              default="all", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
def greylist_list(what: str, limit: int) -> None:
    """Triplets waiting for a retry, triplets passed, and allowed networks."""
    kinds = {"pending": "t:", "passed": "p:", "allowed": "a:"}
    wanted = list(kinds.items()) if what == "all" else [(what, kinds[what])]

    async def collect(store: Any) -> list[tuple[str, Any]]:
        return [(name, e) for name, prefix in wanted
                for e in await store.scan(PREFIX + prefix, limit)]

    rows = _with_store(collect)
    now = time.time()
    for name, e in rows:
        item = e.key[len(PREFIX) + 2:]
        if name == "pending":
            detail = f"first try {now - float(e.value):.0f} s ago"
        elif name == "allowed":
            detail = e.value
        else:
            detail = f"last used {now - float(e.value):.0f} s ago"
        left = f"{e.expires_in / 86_400:.1f} days left" if e.expires_in else ""
        click.echo(f"{name}\t{item}\t{detail}\t{left}".rstrip())
    click.echo(f"{len(rows)} entr{'ies' if len(rows) != 1 else 'y'}", err=True)


@greylist.command("allow")
@click.argument("network")
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=36.0,
              show_default=True, help="How long the network stays allowed.")
def greylist_allow(network: str, days: float) -> None:
    """Let NETWORK (an address, or 192.0.2.0/24) pass without greylisting."""
    import ipaddress

    from elemta import plugin_settings

    try:
        ipaddress.ip_network(network, strict=False)
    except ValueError:
        raise click.BadParameter(f"{network!r} is not an address or a network "
                                 "(192.0.2.7, 192.0.2.0/24, 2001:db8::/48)") from None
    settings = plugin_settings("greylist")
    net = _with_store(lambda store: Greylist(store, settings).allow(network, days))
    click.echo(f"{net} allowed for {days:g} days")


@greylist.command("clear")
@click.argument("network", required=False)
@click.option("--all", "everything", is_flag=True, help="Forget all greylisting state.")
def greylist_clear(network: str | None, everything: bool) -> None:
    """Forget NETWORK's triplets, passes and allowance (or, with --all, everything)."""
    if everything == (network is not None):
        raise click.UsageError("give a NETWORK, or --all")
    if everything:
        n = _with_store(lambda store: store.clear(PREFIX))
    else:
        import ipaddress

        from elemta import plugin_settings

        from .policy import network_of

        try:
            net = (str(ipaddress.ip_network(network, strict=False)) if "/" in network
                   else network_of(network, plugin_settings("greylist")))
        except ValueError:
            raise click.BadParameter(f"{network!r} is not an address or a network") from None

        async def forget(store: Any) -> int:
            return sum([await store.clear(f"{PREFIX}{kind}:{net}") for kind in "tpna"])

        n = _with_store(forget)
    click.echo(f"{n} entr{'ies' if n != 1 else 'y'} removed")
