"""A message being received: DATA content streamed in, kept in memory or spilled to tmp/.

The header section is what plugins parse, so it always stays in memory. The body
stays in memory while it is small and moves to ``tmp/<ID>.body`` once it grows
past ``memory_bytes``, so a 20 MiB message costs the server a few hundred KiB
of RAM, not 20 MiB (aiosmtpd alone would hold about four times the message).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ..models import Message

HEADER_CAP_BYTES = 262_144
"""The header section must end within this many bytes; after that, the rest is body."""

_BLANK_LINE = b"\r\n\r\n"


class MessageParts(NamedTuple):
    """What the spool commits: the received header section and the body, in memory or on disk."""

    header_block: bytes
    body: bytes | None
    body_path: Path | None


class IncomingMessage:
    """Receives the content of one DATA (dot-unstuffed, CRLF line endings), chunk by chunk.

    Chunks may split anywhere, including inside the ``CRLF CRLF`` that ends the
    header section. ``header_block`` is everything up to and including the first
    empty line; a message that starts with an empty line has the header block
    ``b"\\r\\n"``; with no empty line within ``header_cap_bytes`` the header block is
    the content up to the last line end before the cap (the whole content if it is
    shorter) and the rest is body. Either way ``header_block + body`` is exactly
    the bytes written.
    """

    def __init__(self, spool_tmp_dir: Path, queue_id: str, memory_bytes: int, *,
                 header_cap_bytes: int = HEADER_CAP_BYTES) -> None:
        self.queue_id = queue_id
        self.size = 0
        # Path(a Path) parses it again: 1-2 µs on every message
        self._tmp_dir = spool_tmp_dir if isinstance(spool_tmp_dir, Path) else Path(spool_tmp_dir)
        self._memory_bytes = memory_bytes
        self._header_cap = header_cap_bytes
        self._head = bytearray()
        self._scan_from = 0  # where the next search for the blank line starts
        self._header_block: bytes | None = None
        self._body = bytearray()
        self._body_path: Path | None = None
        self._body_file: BinaryIO | None = None
        self._parts: MessageParts | None = None
        self._message: Message | None = None
        self._discarded = False

    def write(self, chunk: bytes) -> None:
        if self._parts is not None or self._discarded:
            raise RuntimeError(f"message {self.queue_id} is complete; no more content")
        self.size += len(chunk)
        if self._header_block is not None:
            self._append_body(chunk)
            return
        self._head += chunk
        end = self._header_end()
        if end is None and len(self._head) >= self._header_cap:
            end = self._cut_at_cap()
        if end is not None:
            head = self._head
            self._header_block = bytes(head[:end])
            self._head = bytearray()
            if end < len(head):
                self._append_body(memoryview(head)[end:])

    def _header_end(self) -> int | None:
        head = self._head
        if head[:2] == b"\r\n":
            return 2
        i = head.find(_BLANK_LINE, self._scan_from, self._header_cap)
        if i >= 0:
            return i + len(_BLANK_LINE)
        # the blank line may straddle this chunk and the next: rescan the last 3 bytes
        self._scan_from = max(0, min(len(head), self._header_cap) - len(_BLANK_LINE) + 1)
        return None

    def _cut_at_cap(self) -> int:
        # End the pseudo header block on a line boundary so that no header field
        # is cut in two; a cap-long line without CRLF is cut at the cap.
        i = self._head.rfind(b"\r\n", 0, self._header_cap)
        return i + 2 if i >= 0 else self._header_cap

    def _append_body(self, data: bytes | memoryview) -> None:
        if self._body_file is not None:
            self._body_file.write(data)
            return
        self._body += data
        if len(self._body) > self._memory_bytes:
            path = self._tmp_dir / f"{self.queue_id}.body"
            # No fsync: the spool makes the committed copy durable, and tmp/ is
            # emptied at start-up, so a crash can only lose unacknowledged data.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._body_path = path
            self._body_file = os.fdopen(fd, "wb")
            self._body_file.write(self._body)
            self._body = bytearray()

    def parts(self) -> MessageParts:
        """End of content: the header block and body as the spool will commit them.

        No :meth:`write` is allowed afterwards. Calling it again returns the same parts.
        """
        if self._discarded:
            raise RuntimeError(f"message {self.queue_id} was discarded")
        if self._parts is None:
            if self._header_block is None:
                self._header_block = bytes(self._head)
                self._head = bytearray()
            if self._body_file is not None:
                self._body_file.close()
                self._body_file = None
                self._parts = MessageParts(self._header_block, None, self._body_path)
            else:
                self._parts = MessageParts(self._header_block, bytes(self._body), None)
                self._body = bytearray()
        return self._parts

    def message(self) -> Message:
        """The received message, for the data-stage hooks.

        A spilled body is read from ``tmp/``, so the object is usable until the
        message is committed or discarded.
        """
        if self._message is None:
            p = self.parts()
            self._message = Message(p.header_block, p.body,
                                    None if p.body_path is None else str(p.body_path), self.size,
                                    spill=(str(self._tmp_dir), self.queue_id, self._memory_bytes))
        return self._message

    def discard(self) -> None:
        """Drop the content and its tmp file (rejected, aborted or committed message)."""
        if self._discarded:
            return
        self._discarded = True
        if self._body_file is not None:
            self._body_file.close()
            self._body_file = None
        if self._body_path is not None:
            self._body_path.unlink(missing_ok=True)
        if self._message is not None:
            self._message.discard_temp_files()     # bodies a plugin replaced
        self._head = bytearray()
        self._body = bytearray()

    def __repr__(self) -> str:
        where = "spilled" if self._body_path is not None else "in memory"
        return f"<IncomingMessage {self.queue_id} {self.size} bytes {where}>"
