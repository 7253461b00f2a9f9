"""``elemta queue``: look into the spool, with or without a running server.

Everything here only reads. Messages move while the server runs, so an
envelope listed a moment ago may be gone when it is read: such a message is
skipped, not reported as an error.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from pathlib import Path

import click
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

from ..cli import config_option
from ..config import DEFAULT_CONFIG, ConfigError, load_settings
from .envelope import STATES, Envelope
from .incoming import HEADER_CAP_BYTES
from .store import Spool


@click.group("queue")
@config_option
def queue_group() -> None:
    """Inspect the messages in the spool."""


def _spool_from_ctx() -> Spool:
    """The spool named by the configuration the top-level ``elemta`` command loaded."""
    obj = click.get_current_context().obj
    settings = getattr(obj, "settings", None)
    if settings is None:
        try:
            settings = load_settings(getattr(obj, "config_path", None) or DEFAULT_CONFIG)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    root = settings.resolve(settings.spool.path)
    if not root.is_dir():
        raise click.ClickException(f"no spool at {root} (check [spool] path in {settings.source})")
    return Spool(root)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _text(value: str) -> Text:
    """Spool data for the terminal: neither rich markup nor escape sequences get through."""
    return Text(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value))


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped into grep or a file: one line per message, whatever its width.
        console.width = 1000
    return console


def _age(since: float, now: float) -> str:
    seconds = max(0, int(now - since))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


def _sender(env: Envelope) -> str:
    return env.sender or "<>"


def _timestamp(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    return f"{stamp} ({_age(t, now)} ago)" if t <= now else f"{stamp} (in {_age(now, t)})"


@queue_group.command("list")
@config_option
@click.option("--state", type=click.Choice(STATES), help="Only messages in this state.")
def list_messages(state: str | None) -> None:
    """List queued messages, oldest first."""
    spool = _spool_from_ctx()
    now = time.time()
    envelopes = sorted(spool.iter_envelopes(state), key=lambda item: item[1].received_at)
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=20)
    table.add_column("State", no_wrap=True)
    table.add_column("Age", justify="right", no_wrap=True)
    table.add_column("Size", justify="right", no_wrap=True)
    table.add_column("Sender", overflow="fold")
    table.add_column("Recipients", overflow="fold")
    table.add_column("Attempts", justify="right", no_wrap=True)
    for st, env in envelopes:
        first = env.recipients[0].address if env.recipients else "-"
        more = f" (+{len(env.recipients) - 1})" if len(env.recipients) > 1 else ""
        table.add_row(env.id, st, _age(env.received_at, now), decimal(env.size),
                      _text(_sender(env)), _text(first + more), str(env.attempts))
    console = _console()
    if envelopes:
        console.print(table)
    where = f" in state {state}" if state else ""
    console.print(f"{len(envelopes)} message{'s' if len(envelopes) != 1 else ''}{where}")


@queue_group.command("show")
@config_option
@click.argument("queue_id")
def show_message(queue_id: str) -> None:
    """Show one message: envelope, recipients and header section."""
    spool = _spool_from_ctx()
    try:
        state, env = spool.load(queue_id)
    except KeyError:
        raise click.ClickException(f"no message {queue_id} in the spool at {spool.root}") from None
    except ValueError as e:
        raise click.ClickException(f"message {queue_id}: unreadable envelope: {e}") from None
    now = time.time()
    console = _console()

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    rows: list[tuple[str, str | None]] = [
        ("ID", env.id),
        ("State", state),
        ("Sender", _sender(env)),
        ("Received", _timestamp(env.received_at, now)),
        ("Size", f"{decimal(env.size)} ({env.size} bytes)"),
        ("Attempts", str(env.attempts)),
        ("Next attempt", _timestamp(env.next_attempt_at, now) if env.next_attempt_at else None),
        ("Hold reason", env.hold_reason),
        ("Last error", env.last_error),
        ("Client", (f"{env.peer.get('ip')} port {env.peer.get('port')}" if env.peer else None)),
        ("HELO", env.helo),
        ("Listener", env.listener),
        ("TLS", " ".join(f"{k}={v}" for k, v in env.tls.items()) if env.tls else None),
        ("Authenticated", env.auth),
        ("MAIL parameters", " ".join(k if v is None else f"{k}={v}"
                                     for k, v in env.mail_params.items()) or None),
    ]
    for name, value in rows:
        if value is not None:
            facts.add_row(name, _text(value))
    console.print(facts)

    rcpts = Table(title="Recipients", title_justify="left", box=None, header_style="bold")
    for column in ("Address", "State", "Attempts", "Last error"):
        rcpts.add_column(column, overflow="fold")
    for r in env.recipients:
        rcpts.add_row(_text(r.address), r.state, str(r.attempts), _text(r.last_error or ""))
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
    console.print(_text(header.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n")),
                  soft_wrap=True)


def _read_header_section(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(HEADER_CAP_BYTES)
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end + 2]
