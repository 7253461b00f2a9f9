"""Message content as it goes on the wire after DATA: CRLF, dot-stuffing, long lines wrapped.

The same without dot-stuffing or final dot (``dots=False``) is text content in BDAT chunks.
"""

from __future__ import annotations

import re

LINE_LIMIT_OCTETS = 998
# A line with no line break at all (a base64 blob someone forgot to wrap) is
# wrapped as it arrives instead of being collected whole.
_PARTIAL_LINE_MAX_OCTETS = 65_536
# A line starting with a dot, after the first: the regular expression engine
# finds it in a 4 KiB message in half the time ``b"\n." in lines`` takes.
_DOT_LINE = re.compile(rb"\n\.").search


class DataEncoder:
    """Message content as it goes on the wire after DATA.

    ``feed`` any number of chunks, then ``finish``; together the outputs are the
    content with CRLF line ends, dot-stuffed, no line longer than 998 octets,
    ending in CRLF and the final dot. Chunks may split a line, or a CRLF, anywhere.
    With ``dots=False`` (content for BDAT) nothing is dot-stuffed and there is no final dot.
    """

    __slots__ = ("_cr", "_dots", "_partial")

    def __init__(self, dots: bool = True) -> None:
        self._partial = b""  # an unfinished line, already dot-stuffed
        self._cr = False     # the last chunk ended in CR: the line end depends on what follows
        self._dots = dots

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk[-1:] == b"\r"
        if self._cr:
            chunk = chunk[:-1]
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        out = b""
        if self._partial:
            end = chunk.find(b"\r\n")
            if end < 0:
                return self._grow_partial(chunk)
            out = _wrap(self._partial + chunk[:end]) + b"\r\n"
            self._partial = b""
            chunk = chunk[end + 2:]
        cut = chunk.rfind(b"\r\n") + 2
        if cut < 2:
            return out + self._grow_partial(chunk) if chunk else out
        lines, rest = chunk[:cut], chunk[cut:]
        if ((self._dots and (lines[:1] == b"." or _DOT_LINE(lines)))
                or (cut > LINE_LIMIT_OCTETS and _has_long_line(lines))):
            lines = _transparent(lines, self._dots)
        if rest:
            out += lines
            return out + self._grow_partial(rest)
        return out + lines if out else lines

    def finish(self) -> bytes:
        dot = b".\r\n" if self._dots else b""
        if self._partial or self._cr:
            tail = _wrap(self._partial) + b"\r\n" + dot
        else:
            tail = dot
        self._partial = b""
        self._cr = False
        return tail

    def _grow_partial(self, more: bytes) -> bytes:
        """Add to the unfinished line; emit what can already be wrapped of a long one."""
        partial = (self._partial + more if self._partial
                   else (b"." + more if self._dots and more[:1] == b"." else more))
        if len(partial) <= _PARTIAL_LINE_MAX_OCTETS:
            self._partial = partial
            return b""
        wrapped = _wrap(partial)
        split = wrapped.rfind(b"\r\n")
        # The last piece stays: more of its line may follow. It starts with a
        # space or tab, so it is never dot-stuffed again.
        self._partial = wrapped[split + 2:]
        return wrapped[:split + 2]


def _has_long_line(lines: bytes) -> bool:
    """Whether a line of ``lines`` (complete CRLF-terminated lines) is over 998 octets.

    Jumps from the last line end within reach to the next, a few steps per
    4 KiB, instead of splitting the content into its lines.
    """
    pos, end = 0, len(lines)
    reach = LINE_LIMIT_OCTETS + 2
    while end - pos > reach:
        last = lines.rfind(b"\r\n", pos, pos + reach)
        if last < 0:
            return True
        pos = last + 2
    return False


def _transparent(lines: bytes, dots: bool = True) -> bytes:
    """Dot-stuff and wrap complete CRLF-terminated lines (the slow path)."""
    out = []
    for line in lines.split(b"\r\n")[:-1]:
        if dots and line[:1] == b".":
            line = b"." + line
        if len(line) > LINE_LIMIT_OCTETS:
            line = _wrap(line)
        out.append(line)
    out.append(b"")
    return b"\r\n".join(out)


def _wrap(line: bytes) -> bytes:
    if len(line) <= LINE_LIMIT_OCTETS:
        return line
    pieces = []
    limit = LINE_LIMIT_OCTETS
    while len(line) > limit:
        blank = max(line.rfind(b" ", limit // 2, limit + 1), line.rfind(b"\t", limit // 2, limit + 1))
        if blank > 0:
            pieces.append(line[:blank])
            line = line[blank:]
            continue
        cut = limit
        while cut > limit - 3 and 0x80 <= line[cut] < 0xC0:
            cut -= 1
        pieces.append(line[:cut])
        line = b" " + line[cut:]
    pieces.append(line)
    return b"\r\n".join(pieces)
