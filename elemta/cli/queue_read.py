"""``elemta queue list|show|stats``: reading the spool's files.

Messages move while the server runs, so an envelope listed a moment ago may be
gone when it is read: such a message is skipped, not reported as an error.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

from .. import control
from ..config import Settings
from ..spool.envelope import PENDING, STATES, envelope_json
from ..spool.incoming import HEADER_CAP_BYTES
from ..spool.layout import Layout
from . import output
from .context import config_option, config_spool, queue_settings

# Past this many rows a listing is printed as plain aligned text: a rich table
# costs about a millisecond a row, minutes for a big queue.
RICH_MAX_ROWS = 500


# ------------------------------------------------------------------ reading the spool


def scan(root: Path, states: Iterable[str] = STATES,
         needle: bytes | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(state, envelope as a dict)`` for every readable envelope, in no order.

    The envelopes are not turned into :class:`Envelope` objects: listing a big
    queue is mostly reading and parsing, and the dicts are what the output
    needs. With ``needle`` (lower-case ASCII), a file whose bytes do not
    contain it is not parsed at all.
    """
    layout = Layout(root)
    for state in states:
        for queue_id in layout.ids_in(state):
            raw = _read(layout.envelope(state, queue_id))
            if raw is None:
                continue  # delivered or moved since the directory was read
            if needle is not None and needle not in raw.lower():
                continue
            try:
                env = envelope_json(raw)
                if not (type(env) is dict and "id" in env and "recipients" in env
                        and "received_at" in env):
                    continue
            except (ValueError, TypeError):
                continue  # the server moves unreadable envelopes aside at start-up
            yield state, env


def _read(path: str) -> bytes | None:
    # Unbuffered, into a small buffer: a third less time than open().read()
    # for the typical envelope of a few hundred bytes, over a big queue.
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read(8192)
            if len(data) == 8192:
                data += f.read()
    except FileNotFoundError:
        return None
    return data


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Parsed envelopes hold no reference cycles, and collecting while a hundred
    thousand of them are alive costs a third of the parse time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Filter:
    """The ``--to``, ``--from`` and ``--domain`` options of ``queue list``."""

    def __init__(self, to: str | None, sender: str | None, domain: str | None) -> None:
        self.to = to.lower() if to else None
        self.sender = sender.lower() if sender is not None else None
        self.domain = domain.lower().lstrip("@").rstrip(".") if domain else None

    def needle(self) -> bytes | None:
        """Bytes every matching envelope file contains, to skip the others unparsed."""
        for value in (self.domain and "@" + self.domain, self.to,
                      self.sender if self.sender not in ("", "<>") else None):
            # JSON escapes quotes and backslashes; non-ASCII lower() differs on bytes
            if value and value.isascii() and not any(c in value for c in '"\\'):
                return value.encode("ascii")
        return None

    def __call__(self, env: dict[str, Any]) -> bool:
        if self.sender is not None:
            sender = env.get("sender") or ""
            if self.sender in ("", "<>"):
                if sender:
                    return False
            elif self.sender not in sender.lower():
                return False
        if self.to is None and self.domain is None:
            return True
        for r in env["recipients"]:
            address = r.get("address", "").lower()
            if self.to is not None and self.to not in address:
                continue
            if self.domain is not None and address.rpartition("@")[2] != self.domain:
                continue
            return True
        return False


# ------------------------------------------------------------------ list


@click.command("list")
@config_option
@click.option("--state", "states", type=click.Choice(STATES), multiple=True,
              help="Only messages in this state (repeat for several).")
@click.option("--to", "to", metavar="TEXT",
              help="Only messages with a recipient address containing TEXT (e.g. a domain).")
@click.option("--from", "sender", metavar="TEXT",
              help="Only messages whose sender contains TEXT ('<>' for bounces).")
@click.option("--domain", metavar="DOMAIN", help="Only messages with a recipient at DOMAIN.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Show the N oldest matching messages (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, for scripts.")
def list_messages(states: tuple[str, ...], to: str | None, sender: str | None,
                  domain: str | None, limit: int | None, as_json: bool) -> None:
    """List queued messages, oldest first."""
    spool = config_spool()
    now = time.time()
    match = Filter(to, sender, domain)
    with _no_gc():
        # Only what the output needs is kept: the dicts of a big queue take
        # gigabytes.
        pick = _json_item if as_json else _list_item
        found = [pick(state, env, now)
                 for state, env in scan(spool.root, states or STATES, match.needle())
                 if match(env)]
        found.sort(key=_first)
        total = len(found)
        shown = found[:limit] if limit else found
        if as_json:
            output.write(json.dumps([item for _, item in shown], ensure_ascii=False, indent=1)
                         + "\n")
            return
        where = f" in state {', '.join(states)}" if states else ""
        summary = (f"{len(shown)} of {output.plural(total, 'message')}{where} (oldest first)"
                   if len(shown) < total else f"{output.plural(total, 'message')}{where}")
        rows = [row for _, row in shown]
    if not rows:
        click.echo(summary)
        return
    console = output.console()
    if console.is_terminal and len(rows) <= RICH_MAX_ROWS:
        _print_rich_list(console, rows)
        console.print(summary)
    else:
        _print_plain_list(rows, summary)


def _first(item: tuple[float, Any]) -> float:
    return item[0]


_LIST_HEADER = ("ID", "STATE", "AGE", "SIZE", "TRIES", "SENDER", "RECIPIENTS")


def _list_item(state: str, env: dict[str, Any], now: float) -> tuple[float, tuple[str, ...]]:
    """``(received_at, the row of the listing)``: the cells, cleaned for the terminal."""
    rcpts = env["recipients"]
    first = rcpts[0].get("address", "-") if rcpts else "-"
    if len(rcpts) > 1:
        first = f"{first} (+{len(rcpts) - 1})"
    received = env["received_at"]
    return received, (env["id"], state, output.age(received, now), decimal(env.get("size") or 0),
                      str(env.get("attempts", 0)), output.clean(env.get("sender") or "<>"),
                      output.clean(first))


def _json_item(state: str, env: dict[str, Any], now: float) -> tuple[float, dict[str, Any]]:
    rcpts = env["recipients"]
    received = env["received_at"]
    return received, {
        "id": env["id"], "state": state, "received_at": received,
        "age_seconds": round(max(0.0, now - received), 3),
        "size": env.get("size"), "sender": env.get("sender"),
        "recipients": [r.get("address") for r in rcpts],
        "pending": sum(1 for r in rcpts if r.get("state") == PENDING),
        "attempts": env.get("attempts", 0), "next_attempt_at": env.get("next_attempt_at"),
        "hold_reason": env.get("hold_reason"), "last_error": env.get("last_error"),
    }


def _print_rich_list(console: Console, rows: list[tuple[str, ...]]) -> None:
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=20)
    table.add_column("State", no_wrap=True)
    table.add_column("Age", justify="right", no_wrap=True)
    table.add_column("Size", justify="right", no_wrap=True)
    table.add_column("Tries", justify="right", no_wrap=True)
    table.add_column("Sender", overflow="fold")
    table.add_column("Recipients", overflow="fold")
    for row in rows:
        table.add_row(*map(Text, row))  # Text: spool data is no rich markup
    console.print(table)


def _print_plain_list(rows: list[tuple[str, ...]], summary: str) -> None:
    """Aligned columns, one line per message, whatever its width (for grep and huge queues)."""
    widths = [max(len(h), *map(len, column)) for h, column in zip(_LIST_HEADER, zip(*rows))]
    align = ("<", "<", ">", ">", ">", "<", "")
    fmt = "  ".join(f"{{:{a}{w}}}" if a else "{}" for a, w in zip(align, widths))
    out = [fmt.format(*_LIST_HEADER)]
    out += [fmt.format(*row) for row in rows]
    out.append(summary)
    output.write("\n".join(out) + "\n")


# ------------------------------------------------------------------ show


@click.command("show")
@config_option
@click.argument("queue_id")
@click.option("--json", "as_json", is_flag=True, help="Print the envelope as JSON.")
def show_message(queue_id: str, as_json: bool) -> None:
    """Show one message: envelope, recipients and header section."""
    spool = config_spool()
    try:
        state, env = spool.load(queue_id)
    except KeyError:
        raise click.ClickException(f"no message {queue_id} in the spool at {spool.root}") from None
    except ValueError as e:
        raise click.ClickException(f"message {queue_id}: unreadable envelope: {e}") from None
    if as_json:
        output.write(json.dumps({"state": state, "envelope": envelope_json(env.to_json())},
                          ensure_ascii=False, indent=1) + "\n")
        return
    now = time.time()
    console = output.console()

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    rows: list[tuple[str, str | None]] = [
        ("ID", env.id),
        ("State", state),
        ("Sender", output.sender(env.sender)),
        ("Received", output.timestamp(env.received_at, now)),
        ("Size", f"{decimal(env.size)} ({env.size} bytes)"),
        ("Attempts", str(env.attempts)),
        ("Next attempt",
         output.timestamp(env.next_attempt_at, now) if env.next_attempt_at else None),
        ("Hold reason", env.hold_reason),
        ("Last error", env.last_error),
        ("Client", (f"{env.peer.get('ip')} port {env.peer.get('port')}" if env.peer else None)),
        ("HELO", env.helo),
        ("Listener", env.listener),
        ("TLS", " ".join(f"{k}={v}" for k, v in env.tls.items()) if env.tls else None),
        ("Authenticated", env.auth),
        ("MAIL parameters", " ".join(k if v is None else f"{k}={v}"
                                     for k, v in env.mail_params.items()) or None),
        ("DSN envelope ID", _xtext_decoded(env.mail_params.get("ENVID"))),
        ("DSN returns", {"FULL": "the full message", "HDRS": "headers only"}.get(
            env.mail_params.get("RET") or "")),
    ]
    for name, value in rows:
        if value is not None:
            facts.add_row(name, output.text(value))
    console.print(facts)

    rcpts = Table(title="Recipients", title_justify="left", box=None, header_style="bold")
    dsn = any(r.params.get("NOTIFY") or r.params.get("ORCPT") for r in env.recipients)
    for column in ("Address", "State", "Attempts", *(("DSN",) if dsn else ()), "Last error"):
        rcpts.add_column(column, overflow="fold")
    for r in env.recipients:
        address = r.address if r.original is None else f"{r.address} (for {r.original})"
        notify = ([" ".join(f"{k}={r.params[k]}" for k in ("NOTIFY", "ORCPT")
                            if r.params.get(k))] if dsn else [])
        rcpts.add_row(output.text(address), r.state, str(r.attempts),
                      *(output.text(n) for n in notify), output.text(r.last_error or ""))
    console.print()
    console.print(rcpts)

    console.print()
    console.print("[bold]Headers[/bold]")
    try:
        header = _read_header_section(spool.message_path(env.id))
    except FileNotFoundError:
        # delivered and removed since the envelope was read, or damaged
        console.print("(message content is no longer in the spool)")
        return
    section = header.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n")
    console.print(output.text(section), soft_wrap=True)


def _xtext_decoded(value: str | None) -> str | None:
    """An RFC 3461 xtext value as text (``+2B`` is ``+``)."""
    if not value:
        return None
    octets = bytearray()
    pos = 0
    for m in re.finditer(r"\+([0-9A-F]{2})", value):
        octets += value[pos:m.start()].encode("utf-8", "surrogateescape")
        octets.append(int(m.group(1), 16))
        pos = m.end()
    octets += value[pos:].encode("utf-8", "surrogateescape")
    return octets.decode("utf-8", "replace")


def _read_header_section(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(HEADER_CAP_BYTES)
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end + 2]


# ------------------------------------------------------------------ stats


@click.command("stats")
@config_option
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many destination domains to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
def stats(top: int, as_json: bool) -> None:
    """Counts per state and where deferred mail goes.

    Messages, size and the oldest message per state, the destination domains
    with the most pending recipients in deferred/, and what the running server
    is doing.
    """
    spool = config_spool()
    settings = queue_settings()
    now = time.time()
    counts = dict.fromkeys(STATES, 0)
    sizes = dict.fromkeys(STATES, 0)
    oldest: dict[str, float | None] = dict.fromkeys(STATES, None)
    domains: Counter[str] = Counter()
    domain_messages: Counter[str] = Counter()
    for state, env in scan(spool.root):
        counts[state] += 1
        sizes[state] += env.get("size") or 0
        received = env["received_at"]
        first = oldest[state]
        if first is None or received < first:
            oldest[state] = received
        if state == "deferred":
            seen = set()
            for r in env["recipients"]:
                if r.get("state") == PENDING:
                    domain = r.get("address", "").rpartition("@")[2].lower() or "-"
                    domains[domain] += 1
                    seen.add(domain)
            domain_messages.update(seen)
    live = _live_stats(settings)
    overall = min((t for t in oldest.values() if t is not None), default=None)
    if as_json:
        output.write(json.dumps({
            "states": {s: {"messages": counts[s], "bytes": sizes[s],
                           "oldest_received_at": oldest[s]} for s in STATES},
            "total": sum(counts.values()), "oldest_received_at": overall,
            "oldest_age_seconds": None if overall is None else round(now - overall, 3),
            "deferred_domains": [{"domain": d, "recipients": n,
                                  "messages": domain_messages[d]}
                                 for d, n in domains.most_common(top)],
            "server": live,
        }, ensure_ascii=False, indent=1) + "\n")
        return
    console = output.console()
    table = Table(box=None, header_style="bold")
    table.add_column("State")
    table.add_column("Messages", justify="right")
    table.add_column("Size", justify="right")
    table.add_column("Oldest", justify="right")
    for s in STATES:
        table.add_row(s, str(counts[s]), decimal(sizes[s]),
                      "-" if oldest[s] is None else output.age(oldest[s], now))
    table.add_row(Text("total", style="bold"), str(sum(counts.values())),
                  decimal(sum(sizes.values())),
                  "-" if overall is None else output.age(overall, now))
    console.print(table)
    console.print()
    if domains:
        console.print("[bold]Deferred mail by destination[/bold] (pending recipients)")
        dest = Table(box=None, header_style="bold")
        dest.add_column("Domain", overflow="fold")
        dest.add_column("Recipients", justify="right")
        dest.add_column("Messages", justify="right")
        for d, n in domains.most_common(top):
            dest.add_row(output.text(d), str(n), str(domain_messages[d]))
        console.print(dest)
        if len(domains) > top:
            console.print(f"… and {output.plural(len(domains) - top, 'more domain')}")
        console.print()
    console.print(_describe_live(live, now))


def _live_stats(settings: Settings) -> dict[str, Any] | None:
    try:
        answer = control.request(control.socket_path(settings), {"cmd": "stats"}, timeout=5)
    except control.ControlError:
        return None
    return answer if answer.get("ok") else None


def _describe_live(live: dict[str, Any] | None, now: float) -> str:
    if live is None:
        return "Server: not answering on its control socket (not running?)"
    if not live.get("delivery_enabled"):
        return f"Server: running (pid {live.get('pid')}), delivery disabled"
    due = live.get("next_due")
    nxt = ("" if due is None else
           ", next attempt now" if due <= now else f", next attempt in {output.age(now, due)}")
    return (f"Server: running (pid {live.get('pid')}): {live.get('delivering', 0)} in "
            f"delivery, {live.get('scheduled', 0)} scheduled{nxt}")


