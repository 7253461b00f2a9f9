"""The client's side of one TCP (or unix socket) connection: bytes out, replies in.

A :class:`Wire` knows nothing of SMTP commands; it writes, drains under a
timeout, reads replies (bounded in line length and count), and remembers two
facts the session needs: the connection is *broken* (lost, timed out, garbage:
it is never used again) or *closing* (the server said 421: every later reply
is that one, RFC 5321 §3.8).
"""

from __future__ import annotations

import asyncio
import ssl
import weakref

from ...hookcall import Deadlines
from .results import Lost, Reply, SMTPError, Stage, parse_reply

READ_BYTES = 65_536
_MAX_REPLY_LINE_OCTETS = 8_192
_MAX_REPLY_LINES = 200
# The time limit of every read, on one timer for all connections of an event
# loop: a read under ``asyncio.timeout`` schedules and cancels a timer of its
# own (3.4 µs against 0.7), two or three times a message.
_READS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = \
    weakref.WeakKeyDictionary()

# One-line replies already parsed, by their bytes ("250 2.1.5 Ok" for every RCPT);
# a Reply is never changed once made, so connections share them.
_SEEN: dict[bytes, Reply] = {}


def _reads() -> Deadlines:
    """The read deadlines of the running loop (programs may run several, in threads)."""
    loop = asyncio.get_running_loop()
    reads = _READS.get(loop)
    if reads is None:
        reads = _READS[loop] = Deadlines()
    return reads


# When the server hung up: what it had been sent last
_AFTER = {
    "greeting": "before its greeting",
    "ehlo": "after EHLO",
    "lhlo": "after LHLO",
    "starttls": "after STARTTLS",
    "auth": "during AUTH",
    "rset": "after RSET",
    "mail": "after MAIL FROM",
    "rcpt": "after RCPT TO",
    "data": "after the DATA command",
    "end_of_data": "after the end of DATA",
}


class Wire:
    """One connection's streams and the state of the conversation on them."""

    def __init__(self, remote: str) -> None:
        self.remote = remote
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buffer = bytearray()
        self.closing: Reply | None = None   # a 421 received: every later reply is this one
        self.broken = False

    async def connect(self, *, ip: str, port: int, path: str | None,
                      local_address: str | None, timeout: float) -> None:
        """Open the connection; raises ``TimeoutError`` or ``OSError``."""
        self.broken = False
        self.closing = None
        self.buffer.clear()
        async with asyncio.timeout(timeout):
            if path is not None:
                self.reader, self.writer = await asyncio.open_unix_connection(
                    path, limit=READ_BYTES)
            else:
                self.reader, self.writer = await asyncio.open_connection(
                    ip, port, limit=READ_BYTES,
                    local_addr=(local_address, 0) if local_address else None)

    @property
    def usable(self) -> bool:
        return self.writer is not None and not self.broken and self.closing is None

    def write(self, data: bytes) -> None:
        writer = self.writer
        if writer is None or self.broken or writer.transport.is_closing():
            self.broken = True
            raise Lost("the connection was already closed")
        writer.write(data)

    async def drain(self, timeout: float) -> None:
        writer = self.writer
        assert writer is not None
        if writer.transport.get_write_buffer_size():
            try:
                async with asyncio.timeout(timeout):
                    await writer.drain()
            except TimeoutError:
                self.abort()
                raise Lost("sending message content", timed_out=True) from None
            except (OSError, EOFError):
                self.abort()
                raise Lost("sending message content") from None

    async def read_reply(self, timeout: float, what: str) -> Reply:
        if self.closing is not None:
            return self.closing
        raw: list[bytes] = []
        buffer = self.buffer
        while True:
            end = buffer.find(b"\n")
            while end < 0:
                if len(buffer) > _MAX_REPLY_LINE_OCTETS:
                    self.abort()
                    raise Lost(what + ": reply line too long")
                await self._fill(timeout, what)
                end = buffer.find(b"\n")
            line = bytes(buffer[:end + 1])
            del buffer[:end + 1]
            raw.append(line)
            if line[3:4] != b"-":
                break
            if len(raw) > _MAX_REPLY_LINES:
                self.abort()
                raise Lost(what + ": reply too long")
        try:
            if len(raw) == 1:  # most replies: one line, and the same text again and again
                reply = _SEEN.get(raw[0])
                if reply is None:
                    if len(_SEEN) >= 1024:
                        _SEEN.clear()
                    reply = _SEEN[raw[0]] = parse_reply(raw)
            else:
                reply = parse_reply(raw)
        except Lost:
            self.abort()
            raise Lost(what + ": malformed reply") from None
        if reply.code == 421:
            self.closing = reply
        return reply

    async def _fill(self, timeout: float, what: str) -> None:
        reader = self.reader
        if reader is None or self.broken:
            raise Lost(what)
        reads = _reads()
        limit = reads.start(timeout)
        try:
            data = await reader.read(READ_BYTES)
        except asyncio.CancelledError:
            if not reads.expired(limit):
                raise
            self.abort()
            raise Lost(what, timed_out=True) from None
        except (OSError, EOFError):
            self.abort()
            raise Lost(what) from None
        finally:
            reads.end(limit)
        if not data:
            self.abort()
            raise Lost(what, closed=True)
        self.buffer += data

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str,
                        timeout: float) -> ssl.SSLObject:
        """The TLS handshake, after the server's 220 to STARTTLS; raises what it meets."""
        if self.buffer:
            # Anything after the 220 was sent before the handshake and would
            # be read as if it came over TLS (CVE-2011-0411 in reverse).
            raise ConnectionError("the server sent data after its STARTTLS reply")
        assert self.writer is not None
        async with asyncio.timeout(timeout):
            await self.writer.start_tls(context, server_hostname=server_hostname)
        return self.writer.get_extra_info("ssl_object")

    def abort(self) -> None:
        self.broken = True
        writer = self.writer
        if writer is not None:
            writer.transport.abort()

    def lost_error(self, lost: Lost, stage: Stage) -> SMTPError:
        """What a lost conversation means for the caller (the 421, if that was it)."""
        if self.closing is not None:
            return self.closing.error(stage)
        if lost.timed_out:
            text = f"conversation with {self.remote} timed out while {lost.what}"
        elif lost.closed:
            text = f"connection closed by {self.remote} {_AFTER.get(stage, 'while ' + lost.what)}"
        else:
            text = f"lost connection with {self.remote} while {lost.what}"
        return SMTPError(451, "4.4.2", text + lost.note, stage=stage, local=True)

    async def quit(self, timeout: float) -> None:
        """QUIT (when the conversation is still in a state to say it) and close; never raises."""
        writer = self.writer
        if writer is None:
            return
        if not self.broken and self.closing is None:
            try:
                self.write(b"QUIT\r\n")
                await self.read_reply(timeout, "sending QUIT")
            except Lost:
                pass
        self.writer = None
        self.broken = True
        writer.close()
        try:
            async with asyncio.timeout(timeout):
                await writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            writer.transport.abort()
