"""Printing spool data for people: no escape sequence or markup in it reaches the terminal."""

from __future__ import annotations

import datetime
import os
import re
import sys

from rich.console import Console
from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(value: str) -> str:
    """Spool data for the terminal: no escape sequences or line breaks get through."""
    if value.isprintable():
        return value
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def text(value: str) -> Text:
    """Spool data for a rich table: neither markup nor escape sequences get through."""
    return Text(clean(value))


def console() -> Console:
    out = Console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        # Piped into grep or a file: one line per message, whatever its width.
        out.width = 1000
    return out


def age(since: float, now: float) -> str:
    seconds = max(0, int(now - since))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


def sender(address: str) -> str:
    return address or "<>"


def timestamp(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    return f"{stamp} ({age(t, now)} ago)" if t <= now else f"{stamp} (in {age(now, t)})"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def write(out: str) -> None:
    try:
        sys.stdout.write(out)
        sys.stdout.flush()
    except BrokenPipeError:  # `elemta queue list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
