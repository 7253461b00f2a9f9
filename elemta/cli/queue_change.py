"""``elemta queue hold|release|retry|delete|bounce``: changing the spool.

With the server running the commands go through its control socket and are
carried out by its delivery runner, so they never race a delivery
(``elemta/control.py``); with no server, they change the files under the
spool lock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from .. import control
from ..delivery.admin import ADMIN_WAIT_SECONDS, AdminResult
from ..spool.lock import SpoolFormatError, SpoolLocked, lock_spool, unlock_spool
from ..spool.store import SpoolError
from . import output
from .context import config_option, config_spool, fail, queue_settings

# A command may wait up to 30 s for a delivery in progress, then do its work.
REQUEST_TIMEOUT = 300.0
# A server that holds the spool lock but does not answer yet may be starting.
STARTING_GRACE = 5.0

_DONE_WORDS = {"hold": "held", "release": "released", "retry": "scheduled for delivery now",
               "delete": "deleted", "bounce": "returned to the sender"}


def _change(cmd: str, ids: list[str] | None) -> None:
    """Run a changing command through the server, or on the files when none runs."""
    settings = queue_settings()
    spool = config_spool()
    sock = control.socket_path(settings)
    payload: dict[str, Any] = {"cmd": cmd, "ids": ids} if ids is not None else {
        "cmd": cmd, "all": True}
    offline = False
    try:
        answer = control.request(sock, payload, timeout=REQUEST_TIMEOUT)
    except control.Unreachable:
        answer = None
    except control.ControlError as e:
        fail(str(e), 1)
    if answer is None:
        try:
            lock = lock_spool(spool.root)
        except SpoolLocked as e:
            answer = _wait_for_server(sock, payload, spool.root, e)
        except SpoolFormatError as e:
            fail(str(e), 1)
        except OSError as e:
            fail(f"cannot lock the spool at {spool.root}: {e.strerror or e}", 1)
        else:
            offline = True
            try:
                if cmd == "bounce":
                    fail("bounce needs the running server: the notification to the sender "
                          "is built and queued by its delivery runner (and its bounce hook). "
                          "Start the server and try again, or use `elemta queue delete`.", 1)
                click.echo(f"elemta: no server is running; changing the spool at "
                           f"{os.path.abspath(spool.root)} directly", err=True)
                try:
                    result = control.apply_offline(spool, cmd, ids)
                except (OSError, SpoolError) as e:
                    fail(f"cannot change the spool at {spool.root}: {e}", 1)
            finally:
                unlock_spool(lock)
    if answer is not None:
        if "error" in answer:
            fail(f"the server refused: {answer['error']}", 1)
        result = AdminResult.from_dict(answer)
    _report(cmd, result, every=ids is None, offline=offline)


def _wait_for_server(sock: Path, payload: dict[str, Any], root: Path,
                     locked: SpoolLocked) -> dict[str, Any]:
    deadline = time.monotonic() + STARTING_GRACE
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            return control.request(sock, payload, timeout=REQUEST_TIMEOUT)
        except control.Unreachable:
            continue
        except control.ControlError as e:
            fail(str(e), 1)
    who = f"process {locked.pid}" if locked.pid else "another process"
    fail(f"{who} holds the spool lock on {root}, but no server answers on {sock}: a server "
          "still starting (try again in a moment), another `elemta queue` command changing "
          "the spool, or a server whose [server] state_dir differs from this configuration's", 1)


def _report(cmd: str, result: AdminResult, *, every: bool, offline: bool) -> None:
    word = _DONE_WORDS[cmd]
    if cmd == "retry" and offline:
        word = "due now (delivered when the server starts)"
    if every:
        click.echo(f"{output.plural(len(result.done), 'deferred message')} {word}")
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
        click.echo(f"elemta: still in delivery after {ADMIN_WAIT_SECONDS:.0f}s, "
                   f"try again: {' '.join(result.busy)}", err=True)
    if not result.ok:
        raise SystemExit(1)


_IDS = click.argument("queue_ids", nargs=-1, required=True, metavar="ID...")


@click.command("hold")
@config_option
@_IDS
def hold(queue_ids: tuple[str, ...]) -> None:
    """Keep messages from delivery until released."""
    _change("hold", list(queue_ids))


@click.command("release")
@config_option
@_IDS
def release(queue_ids: tuple[str, ...]) -> None:
    """Put held messages back, to be delivered now."""
    _change("release", list(queue_ids))


@click.command("retry")
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


@click.command("delete")
@config_option
@_IDS
def delete(queue_ids: tuple[str, ...]) -> None:
    """Remove messages without delivering them.

    Envelope and content go, from any state; the sender is not told.
    """
    _change("delete", list(queue_ids))


@click.command("bounce")
@config_option
@_IDS
def bounce(queue_ids: tuple[str, ...]) -> None:
    """Return messages to their sender, then remove them.

    Every recipient not yet delivered fails with "5.0.0 returned by the
    administrator", and the sender gets one delivery status notification
    (never the null sender). Needs the running server.
    """
    _change("bounce", list(queue_ids))
