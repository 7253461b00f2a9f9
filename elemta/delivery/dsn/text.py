"""Text that goes into a DSN: made safe to show, folded, wrapped, dated.

The names here are private to the ``dsn`` package.
"""

from __future__ import annotations

import re
import secrets
import textwrap
import unicodedata
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime

from .outcome import RecipientOutcome


# A hostile server can send a reply of any length; this is plenty for a real one.
MAX_DIAGNOSTIC_CHARS = 2000
_MAX_LINE_OCTETS = 998  # RFC 5322 §2.1.1, without the CRLF
_FOLD_WIDTH = 78        # RFC 5322 §2.1.1 "SHOULD"
_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Za-z:.-]{1,253}\]")
_SMTP_REPLY = re.compile(r"[245][0-9][0-9](?:[ -]|$)")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Characters that must not reach a reader unchanged: controls (line breaks, ESC,
# NUL), format characters (bidi overrides, zero-width joiners), lone surrogates
# from surrogateescape decoding, and Unicode line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _visible(text: str, *, keep_breaks: bool = True) -> str:
    """``text`` with every control or format character replaced by ``?``.

    With ``keep_breaks`` line breaks survive (as ``\\n``) for the caller to split on.
    """
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif ch in "\r\n" and keep_breaks:
            out.append(ch)
        elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            out.append("?")
        elif unicodedata.category(ch) == "Zs":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _ascii_text(text: str) -> str:
    """One line of printable ASCII: line breaks become spaces, runs of spaces one space."""
    one_line = " ".join(_LINE_BREAK.split(text))
    printable = "".join(ch if " " <= ch <= "~" else "?" for ch in _visible(one_line))
    return " ".join(printable.split())


def _diagnostic_type(diagnostic: str) -> str:
    """RFC 3464 §2.3.6: ``smtp`` only for an SMTP reply; local errors get our own type."""
    return "smtp" if _SMTP_REPLY.match(diagnostic.lstrip()) else "X-Elemta"


# a host name, optionally with the address and port a transport reports after it
_DNS_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?:\[[0-9A-Fa-f.:]+\])?"
                       r"(?::\d+)?$")


def _mta_field(remote: str) -> str:
    """``dns; mx.example.net`` for a host (``mx.example.net[192.0.2.1]:25``); else another type.

    A local delivery agent is no DNS name (``lmtp:unix:/run/dovecot/lmtp``),
    and RFC 3464 §2.3.5 wants the name type to say what the name is.
    """
    m = _DNS_NAME.match(_host_text(remote))
    if m is not None:
        return f"dns; {m.group(1)}"
    return f"x-local; {_ascii_text(remote.strip())}"


def _host_text(name: str) -> str:
    """A remote host name for the ``dns`` name type, which is ASCII: U-labels become A-labels."""
    name = name.strip().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # not a valid IDN: _ascii_text marks the characters instead
    return _ascii_text(name)


def _truncated(text: str) -> str:
    if len(text) <= MAX_DIAGNOSTIC_CHARS:
        return text
    return text[:MAX_DIAGNOSTIC_CHARS] + " [...]"


def _fold(name: str, value: str) -> list[str]:
    """``name: value`` as RFC 5322 folded lines; ``value`` is one line of ASCII
    with single spaces, so no line is ever whitespace only."""
    words = value.split(" ") if value else []
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        # A word too long for any line is cut; each piece gets its own line.
        room = _FOLD_WIDTH - 1
        pieces = [word[i:i + room] for i in range(0, len(word), room)] or [""]
        for piece in pieces:
            if (piece and len(line) + 1 + len(piece) > _FOLD_WIDTH
                    and line.strip() != f"{name}:"):
                lines.append(line)
                line = ""
            line += " " + piece
    lines.append(line)
    return lines


def _wrap(paragraph: str) -> list[str]:
    return textwrap.wrap(paragraph, 72, break_on_hyphens=False)


def _subject(reported: list[RecipientOutcome]) -> str:
    actions = {o.action for o in reported}
    for action in ("failed", "delayed"):
        if action in actions:
            return _SUBJECTS[action]
    return _SUBJECTS["delivered"]


def _date(epoch_seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(epoch_seconds), tz=UTC))


def _safe_queue_id(queue_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", queue_id) or "_"


def _checked_host(name: str, what: str) -> str:
    name = name.rstrip(".") if not name.startswith("[") else name
    if not _HOST.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a host name")
    return name


def _boundary(bodies: Iterable[bytes]) -> str:
    contents = list(bodies)
    while True:
        # "=_" never occurs in quoted-printable text, and the random part in nothing else.
        boundary = f"=_elemta_{secrets.token_hex(12)}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in body for body in contents):
            return boundary
