"""The original message's header section, as much of it as a DSN returns."""

from __future__ import annotations

import os
import re

from .text import _MAX_LINE_OCTETS


# Enough for long DKIM/ARC chains; bounds the DSN when the original carried megabytes of headers.
MAX_RETURNED_HEADER_BYTES = 64 * 1024
_MSG_ID = re.compile(r"<[!-;=?-~]{1,900}>")  # no '<' or '>' inside, no space or control
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 5322 ftext, then the colon; within the first line once long lines are split
_FIELD_START = re.compile(rb"[!-9;-~]{1,997}:")


def _read_header_section(path: str | os.PathLike[str]) -> bytes:
    """The header section of the message in ``path``, cut like :func:`_header_section`.

    Reads line by line and stops at the blank line, so the body is never read.
    """
    lines: list[bytes] = []
    total = 0
    with open(path, "rb") as f:
        while total <= MAX_RETURNED_HEADER_BYTES:
            line = f.readline(MAX_RETURNED_HEADER_BYTES + 1 - total)
            if not line or line in (b"\r\n", b"\n"):
                break
            lines.append(line)
            total += len(line)
    return b"".join(lines)


def _header_section(message: bytes) -> bytes:
    """Everything before the first empty line; the whole input when there is none."""
    if message.startswith((b"\r\n", b"\n")):
        return b""
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    section = message[:min(ends)] if ends else message
    return section[:MAX_RETURNED_HEADER_BYTES + 1]


def _returnable_headers(section: bytes) -> tuple[bytes, bool]:
    """The header section made safe to embed: CRLF lines ≤ 998 octets, no controls.

    Returns ``(text, is_utf8)``; non-ASCII octets that are not UTF-8 become
    U+FFFD, since ``message/global-headers`` is UTF-8 by definition. A line
    that is neither a field nor a continuation ends the section, as it does
    for a parser reading the original, so what is returned always parses.
    """
    out: list[bytes] = []
    total = 0
    for line in re.split(rb"\r\n|\n", section):
        continuation = line[:1] in (b" ", b"\t")
        if continuation and not out:
            continue
        if not continuation and not _FIELD_START.match(line):
            break
        if not line.isascii():
            line = line.decode("utf-8", "replace").encode("utf-8")
        line = _CONTROL_BYTES.sub(b"?", line)
        pieces = _split_long_line(line)
        size = sum(len(p) + 2 for p in pieces)
        if total + size > MAX_RETURNED_HEADER_BYTES:
            if continuation:  # drop the whole field rather than return half of it
                while out and out[-1][:1] in (b" ", b"\t"):
                    out.pop()
                if out:
                    out.pop()
            break
        out += pieces
        total += size
    if not out:
        return b"", False
    text = b"\r\n".join(out) + b"\r\n"
    return text, not text.isascii()


def _split_long_line(line: bytes) -> list[bytes]:
    pieces = []
    while len(line) > _MAX_LINE_OCTETS:
        cut = _MAX_LINE_OCTETS
        while 0x80 <= line[cut] <= 0xBF:  # never cut a UTF-8 sequence in two
            cut -= 1
        pieces.append(line[:cut])
        # A leading space turns the rest into a continuation line of the same field.
        line = b" " + line[cut:]
    pieces.append(line)
    return pieces


def _message_id(section: bytes) -> str | None:
    text = section.decode("ascii", "replace")
    unfolded = _FOLDED.sub("", text.replace("\r\n", "\n"))
    for line in unfolded.split("\n"):
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "message-id":
            m = _MSG_ID.search(value)
            return m.group(0) if m and "@" in m.group(0) else None
    return None


_FOLDED = re.compile(r"\r?\n(?=[ \t])")
