"""``elemta queue``: look into the spool and manage its messages, with or without a server.

``list``, ``show`` and ``stats`` only read the files. Messages move while the
server runs, so an envelope listed a moment ago may be gone when it is read:
such a message is skipped, not reported as an error.

``hold``, ``release``, ``retry``, ``delete`` and ``bounce`` change the spool.
With the server running they go through its control socket and are carried
out by its delivery runner, so they never race a delivery (elemta/control.py);
with no server, they change the files under the spool lock.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

import click
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

from .. import control
from ..cli import config_option
from ..config import DEFAULT_CONFIG, ConfigError, Settings, load_settings
from .envelope import PENDING, STATES
from .incoming import HEADER_CAP_BYTES
from .store import Spool, SpoolError

# Past this many rows a listing is printed as plain aligned text: a rich table
# costs about a millisecond a row, minutes for a big queue.
RICH_MAX_ROWS = 500
# A command may wait up to 30 s for a delivery in progress, then do its work.
REQUEST_TIMEOUT = 300.0
# A server that holds the spool lock but does not answer yet may be starting.
STARTING_GRACE = 5.0


@click.group("queue")
@config_option
def queue_group() -> None:
    """Inspect and manage the messages in the spool."""


def _settings() -> Settings:
    obj = click.get_current_context().obj
    settings = getattr(obj, "settings", None)
    if settings is None:
        try:
            settings = load_settings(getattr(obj, "config_path", None) or DEFAULT_CONFIG)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    return settings


def _spool_from_ctx() -> Spool:
    """The spool named by the configuration the top-level ``elemta`` command loaded."""
    settings = _settings()
    root = settings.resolve(settings.spool.path)
    if not root.is_dir():
        raise click.ClickException(f"no spool at {root} (check [spool] path in {settings.source})")
    return Spool(root)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"elemta: {message}", err=True)
    sys.exit(code)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(value: str) -> str:
    """Spool data for the terminal: no escape sequences or line breaks get through."""
    if value.isprintable():
        return value
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def _text(value: str) -> Text:
    """Spool data for a rich table: neither markup nor escape sequences get through."""
    return Text(_clean(value))


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


def _sender(sender: str) -> str:
    return sender or "<>"


def _timestamp(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    return f"{stamp} ({_age(t, now)} ago)" if t <= now else f"{stamp} (in {_age(now, t)})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ------------------------------------------------------------------ reading the spool


def scan(root: Path, states: Iterable[str] = STATES,
         needle: bytes | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(state, envelope as a dict)`` for every readable envelope, in no order.

    The envelopes are not turned into :class:`Envelope` objects: listing a big
    queue is mostly reading and parsing, and the dicts are what the output
    needs. With ``needle`` (lower-case ASCII), a file whose bytes do not
    contain it is not parsed at all.
    """
    loads = json.loads
    for state in states:
        directory = os.path.join(root, state)
        try:
            with os.scandir(directory) as it:
                names = [e.name for e in it if e.name.endswith(".json")]
        except FileNotFoundError:
            continue
        for name in names:
            raw = _read(f"{directory}/{name}")
            if raw is None:
                continue  # delivered or moved since the directory was read
            if needle is not None and needle not in raw.lower():
                continue
            try:
                env = loads(raw.decode("utf-8", "surrogateescape"))
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


@queue_group.command("list")
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
    spool = _spool_from_ctx()
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
            _write(json.dumps([item for _, item in shown], ensure_ascii=False, indent=1) + "\n")
            return
        where = f" in state {', '.join(states)}" if states else ""
        summary = (f"{len(shown)} of {_plural(total, 'message')}{where} (oldest first)"
                   if len(shown) < total else f"{_plural(total, 'message')}{where}")
        rows = [row for _, row in shown]
    if not rows:
        click.echo(summary)
        return
    console = _console()
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
    return received, (env["id"], state, _age(received, now), decimal(env.get("size") or 0),
                      str(env.get("attempts", 0)), _clean(env.get("sender") or "<>"),
                      _clean(first))


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
    _write("\n".join(out) + "\n")


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `elemta queue list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ------------------------------------------------------------------ show


@queue_group.command("show")
@config_option
@click.argument("queue_id")
@click.option("--json", "as_json", is_flag=True, help="Print the envelope as JSON.")
def show_message(queue_id: str, as_json: bool) -> None:
    """Show one message: envelope, recipients and header section."""
    spool = _spool_from_ctx()
    try:
        state, env = spool.load(queue_id)
    except KeyError:
        raise click.ClickException(f"no message {queue_id} in the spool at {spool.root}") from None
    except ValueError as e:
        raise click.ClickException(f"message {queue_id}: unreadable envelope: {e}") from None
    if as_json:
        _write(json.dumps({"state": state, "envelope": json.loads(env.to_json())},
                          ensure_ascii=False, indent=1) + "\n")
        return
    now = time.time()
    console = _console()

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    rows: list[tuple[str, str | None]] = [
        ("ID", env.id),
        ("State", state),
        ("Sender", _sender(env.sender)),
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
        address = r.address if r.original is None else f"{r.address} (for {r.original})"
        rcpts.add_row(_text(address), r.state, str(r.attempts), _text(r.last_error or ""))
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


# ------------------------------------------------------------------ stats


@queue_group.command("stats")
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
    spool = _spool_from_ctx()
    settings = _settings()
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
        _write(json.dumps({
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
    console = _console()
    table = Table(box=None, header_style="bold")
    table.add_column("State")
    table.add_column("Messages", justify="right")
    table.add_column("Size", justify="right")
    table.add_column("Oldest", justify="right")
    for s in STATES:
        table.add_row(s, str(counts[s]), decimal(sizes[s]),
                      "-" if oldest[s] is None else _age(oldest[s], now))
    table.add_row(Text("total", style="bold"), str(sum(counts.values())),
                  decimal(sum(sizes.values())), "-" if overall is None else _age(overall, now))
    console.print(table)
    console.print()
    if domains:
        console.print("[bold]Deferred mail by destination[/bold] (pending recipients)")
        dest = Table(box=None, header_style="bold")
        dest.add_column("Domain", overflow="fold")
        dest.add_column("Recipients", justify="right")
        dest.add_column("Messages", justify="right")
        for d, n in domains.most_common(top):
            dest.add_row(_text(d), str(n), str(domain_messages[d]))
        console.print(dest)
        if len(domains) > top:
            console.print(f"… and {_plural(len(domains) - top, 'more domain')}")
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
           ", next attempt now" if due <= now else f", next attempt in {_age(now, due)}")
    return (f"Server: running (pid {live.get('pid')}): {live.get('delivering', 0)} in "
            f"delivery, {live.get('scheduled', 0)} scheduled{nxt}")


# ------------------------------------------------------------------ changes


_DONE_WORDS = {"hold": "held", "release": "released", "retry": "scheduled for delivery now",
               "delete": "deleted", "bounce": "returned to the sender"}


def _change(cmd: str, ids: list[str] | None) -> None:
    """Run a changing command through the server, or on the files when none runs."""
    settings = _settings()
    spool = _spool_from_ctx()
    sock = control.socket_path(settings)
    payload: dict[str, Any] = {"cmd": cmd, "ids": ids} if ids is not None else {
        "cmd": cmd, "all": True}
    offline = False
    try:
        answer = control.request(sock, payload, timeout=REQUEST_TIMEOUT)
    except control.Unreachable:
        answer = None
    except control.ControlError as e:
        _fail(str(e))
    if answer is None:
        try:
            lock = control.lock_spool(spool.root)
        except control.SpoolLocked as e:
            answer = _wait_for_server(sock, payload, spool.root, e)
        except OSError as e:
            _fail(f"cannot lock the spool at {spool.root}: {e.strerror or e}")
        else:
            offline = True
            try:
                if cmd == "bounce":
                    _fail("bounce needs the running server: the notification to the sender "
                          "is built and queued by its delivery runner (and its bounce hook). "
                          "Start the server and try again, or use `elemta queue delete`.")
                click.echo(f"elemta: no server is running; changing the spool at "
                           f"{os.path.abspath(spool.root)} directly", err=True)
                try:
                    result = control.apply_offline(spool, cmd, ids)
                except (OSError, SpoolError) as e:
                    _fail(f"cannot change the spool at {spool.root}: {e}")
            finally:
                control.unlock_spool(lock)
    if answer is not None:
        if "error" in answer:
            _fail(f"the server refused: {answer['error']}")
        result = control.AdminResult.from_dict(answer)
    _report(cmd, result, every=ids is None, offline=offline)


def _wait_for_server(sock: Path, payload: dict[str, Any], root: Path,
                     locked: control.SpoolLocked) -> dict[str, Any]:
    deadline = time.monotonic() + STARTING_GRACE
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            return control.request(sock, payload, timeout=REQUEST_TIMEOUT)
        except control.Unreachable:
            continue
        except control.ControlError as e:
            _fail(str(e))
    who = f"process {locked.pid}" if locked.pid else "another process"
    _fail(f"{who} holds the spool lock on {root}, but no server answers on {sock}: a server "
          "still starting (try again in a moment), another `elemta queue` command changing "
          "the spool, or a server whose [server] state_dir differs from this configuration's")


def _report(cmd: str, result: control.AdminResult, *, every: bool, offline: bool) -> None:
    word = _DONE_WORDS[cmd]
    if cmd == "retry" and offline:
        word = "due now (delivered when the server starts)"
    if every:
        click.echo(f"{_plural(len(result.done), 'deferred message')} {word}")
    else:
        for queue_id in result.done:
            click.echo(f"{queue_id}: {word}")
    if result.message:
        click.echo(f"elemta: {result.message}", err=True)
    if result.missing:
        click.echo(f"elemta: no such message: {' '.join(result.missing)}", err=True)
    for queue_id, why in result.skipped.items():
        click.echo(f"elemta: {queue_id}: cannot {cmd}: {why}", err=True)
    if result.busy:
        click.echo(f"elemta: still in delivery after {control.ADMIN_WAIT_SECONDS:.0f}s, "
                   f"try again: {' '.join(result.busy)}", err=True)
    if not result.ok:
        sys.exit(1)


_IDS = click.argument("queue_ids", nargs=-1, required=True, metavar="ID...")


@queue_group.command("hold")
@config_option
@_IDS
def hold(queue_ids: tuple[str, ...]) -> None:
    """Keep messages from delivery until released."""
    _change("hold", list(queue_ids))


@queue_group.command("release")
@config_option
@_IDS
def release(queue_ids: tuple[str, ...]) -> None:
    """Put held messages back, to be delivered now."""
    _change("release", list(queue_ids))


@queue_group.command("retry")
@config_option
@click.argument("queue_ids", nargs=-1, metavar="[ID...]")
@click.option("--all", "every", is_flag=True, help="Every deferred message.")
def retry(queue_ids: tuple[str, ...], every: bool) -> None:
    """Deliver messages now, not at their next attempt.

    With no server running, their next attempt time is set to now: they are
    delivered as soon as it starts.
    """
    if every == bool(queue_ids):
        raise click.UsageError("give message IDs or --all (not both)")
    _change("retry", None if every else list(queue_ids))


@queue_group.command("delete")
@config_option
@_IDS
def delete(queue_ids: tuple[str, ...]) -> None:
    """Remove messages without delivering them.

    Envelope and content go, from any state; the sender is not told.
    """
    _change("delete", list(queue_ids))


@queue_group.command("bounce")
@config_option
@_IDS
def bounce(queue_ids: tuple[str, ...]) -> None:
    """Return messages to their sender, then remove them.

    Every recipient not yet delivered fails with "5.0.0 returned by the
    administrator", and the sender gets one delivery status notification
    (never the null sender). Needs the running server.
    """
    _change("bounce", list(queue_ids))
