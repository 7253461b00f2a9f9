"""Reading the message for a milter: its header fields as written, then its body in chunks.

The message is streamed from ``message.open()``: the header section is held (as the
core holds it), the body never is. A large message is read in a worker thread, one
chunk at a time, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import BinaryIO

from elemta import Message

from .protocol import CHUNK_SIZE

# above this size the message is read in a worker thread (it may be on disk)
THREAD_ABOVE = 256 * 1024


class MessageSource:
    """``async with MessageSource(message) as src``: ``src.fields``, then ``src.body()``."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.threaded = message.size > THREAD_ABOVE
        self.file: BinaryIO | None = None
        self.fields: list[tuple[str, str]] = []   # (name, raw value: folding kept)
        self._rest = b""                          # body bytes read with the header

    async def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        if self.threaded:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def __aenter__(self) -> "MessageSource":
        self.file = await self._call(self.message.open)
        await self._read_header()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.file is not None:
            await self._call(self.file.close)
            self.file = None

    async def _read_header(self) -> None:
        assert self.file is not None
        buf = b""
        while True:
            end = _header_end(buf)
            if end is not None:
                break
            chunk = await self._call(self.file.read, CHUNK_SIZE)
            if not chunk:
                end = (len(buf), len(buf))       # no body: every line is a header line
                break
            buf += chunk
        head, self._rest = buf[:end[0]], buf[end[1]:]
        self.fields = split_fields(head)

    async def body(self) -> AsyncIterator[bytes]:
        """The body in chunks of at most 65535 bytes (CRLF line ends, as received)."""
        assert self.file is not None
        pending = self._rest
        self._rest = b""
        while True:
            while len(pending) >= CHUNK_SIZE:
                yield pending[:CHUNK_SIZE]
                pending = pending[CHUNK_SIZE:]
            chunk = await self._call(self.file.read, CHUNK_SIZE)
            if not chunk:
                break
            pending += chunk
        if pending:
            yield pending


def _header_end(buf: bytes) -> tuple[int, int] | None:
    """(end of the header section, start of the body) once the empty line is in ``buf``."""
    if buf.startswith(b"\r\n"):
        return 0, 2
    if buf.startswith(b"\n"):
        return 0, 1
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf + 1 <= lf):
        return crlf + 2, crlf + 4
    if lf >= 0:
        return lf + 1, lf + 2
    return None


def split_fields(head: bytes) -> list[tuple[str, str]]:
    """Header fields as (name, value): the value is everything after the colon, folding
    (CRLF + white space) kept and the final line end dropped, as Sendmail hands it over."""
    fields: list[list[bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    out = []
    for parts in fields:
        raw = b"".join(parts)
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        elif raw.endswith(b"\n"):
            raw = raw[:-1]
        name, sep, value = raw.partition(b":")
        if not sep:
            continue      # not a header field (the core refuses such messages anyway)
        out.append((name.decode("ascii", "replace").strip(),
                    value.decode("utf-8", "surrogateescape")))
    return out
