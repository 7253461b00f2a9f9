"""One connection to one milter: open, negotiate, send commands, read replies.

Every wait is bounded: connecting and negotiating by ``connect_timeout_seconds``,
each reply (and each write the milter does not drain) by
``command_timeout_seconds``, and a reply that the milter extends with
SMFIR_PROGRESS by ``end_timeout_seconds`` in total. Whatever goes wrong raises
:class:`MilterFailure` with a reason (``connect``, ``timeout``, ``closed``,
``protocol``) and a sentence for the log; the connection is then closed and never
used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass

from . import protocol as p
from .settings import MilterSettings, SocketAddress


# Linux's TCP_QUICKACK (None elsewhere)
QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class MilterFailure(Exception):
    """The milter could not be used: ``reason`` is one of connect, timeout, closed, protocol."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Reply:
    code: bytes
    data: bytes

    @property
    def name(self) -> str:
        return p.REPLY_NAMES.get(self.code, f"unknown reply {self.code!r}")


class MilterConnection:
    """An open, negotiated connection to one milter (:meth:`open` makes one)."""

    def __init__(self, settings: MilterSettings, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.settings = settings
        self.name = settings.name
        self.reader = reader
        self.writer = writer
        self.negotiated = p.Negotiated(p.VERSION, 0, 0)
        self.closed = False
        self.idle_since = 0.0      # when it went back to the pool
        self.sessions = 0          # SMTP sessions it has served
        sock = writer.get_extra_info("socket")
        # a TCP socket, for ack_now (a unix socket has no delayed ACKs)
        self._tcp = sock if sock is not None and sock.family in (
            socket.AF_INET, socket.AF_INET6) else None

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(cls, settings: MilterSettings) -> "MilterConnection":
        """Connect and negotiate, within ``connect_timeout_seconds``."""
        address = settings.socket
        try:
            async with asyncio.timeout(settings.connect_timeout_seconds):
                reader, writer = await _connect(address)
        except TimeoutError:
            raise MilterFailure("connect", f"milter {settings.name}: no connection to "
                                f"{address} within {settings.connect_timeout_seconds:g}s") \
                from None
        except OSError as e:
            raise MilterFailure("connect", f"milter {settings.name}: cannot connect to "
                                f"{address}: {e.strerror or e}; is the milter running and "
                                "listening there?") from None
        conn = cls(settings, reader, writer)
        try:
            await conn.negotiate()
        except BaseException:
            conn.close()
            raise
        return conn

    async def negotiate(self) -> None:
        """SMFIC_OPTNEG: offer version 6, every action and every protocol step."""
        await self.send(p.optneg())
        deadline = time.monotonic() + self.settings.connect_timeout_seconds
        reply = await self.read(deadline, "option negotiation")
        if reply.code != p.OPTNEG:
            raise MilterFailure("protocol", f"milter {self.name}: answered the option "
                                f"negotiation with {reply.name}, not with its options; "
                                f"is {self.settings.address} a milter?")
        try:
            self.negotiated = p.parse_optneg(reply.data)
        except p.ProtocolError as e:
            raise MilterFailure("protocol", f"milter {self.name}: {e}") from None

    # ------------------------------------------------------------ I/O

    async def send(self, *packets: bytes) -> None:
        """Write packets; the milter must read them within ``command_timeout_seconds``."""
        if self.closed:
            raise MilterFailure("closed", f"milter {self.name}: the connection is closed")
        try:
            # one write, one segment: a command and its macros go out together
            self.writer.write(packets[0] if len(packets) == 1 else b"".join(packets))
            if self.writer.transport.get_write_buffer_size():
                # the milter has not read everything yet: wait for it, within the limit
                async with asyncio.timeout(self.settings.command_timeout_seconds):
                    await self.writer.drain()
        except TimeoutError:
            self.close()
            raise MilterFailure("timeout", f"milter {self.name}: did not read what was sent "
                                f"within {self.settings.command_timeout_seconds:g}s") from None
        except (ConnectionError, OSError) as e:
            self.close()
            raise MilterFailure("closed", f"milter {self.name}: the connection broke while "
                                f"writing: {e}") from None

    async def read(self, deadline: float, what: str) -> Reply:
        """One reply, within ``command_timeout_seconds`` and before ``deadline``."""
        if self.closed:
            raise MilterFailure("closed", f"milter {self.name}: the connection is closed")
        timeout = min(self.settings.command_timeout_seconds, deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                head = await self.reader.readexactly(4)
                (length,) = struct.unpack("!I", head)
                if length == 0 or length > p.MAX_REPLY_SIZE + 1:
                    self.close()
                    raise MilterFailure("protocol", f"milter {self.name}: sent a packet of "
                                        f"length {length} in reply to {what}; that is not the "
                                        "milter protocol")
                data = await self.reader.readexactly(length)
        except TimeoutError:
            self.close()
            raise MilterFailure("timeout", f"milter {self.name}: no reply to {what} within "
                                f"{max(timeout, 0.0):.3g}s") from None
        except asyncio.IncompleteReadError:
            self.close()
            raise MilterFailure("closed", f"milter {self.name}: closed the connection "
                                f"instead of answering {what}") from None
        except (ConnectionError, OSError) as e:
            self.close()
            raise MilterFailure("closed", f"milter {self.name}: the connection broke while "
                                f"waiting for the reply to {what}: {e}") from None
        return Reply(data[:1], data[1:])

    async def reply(self, what: str, total_seconds: float | None = None) -> Reply:
        """The answer to a command, skipping SMFIR_PROGRESS (which restarts the per-reply
        wait) within ``total_seconds`` (``end_timeout_seconds`` by default)."""
        total = self.settings.end_timeout_seconds if total_seconds is None else total_seconds
        deadline = time.monotonic() + total
        while True:
            reply = await self.read(deadline, what)
            if reply.code != p.PROGRESS:
                return reply
            self.ack_now()

    def ack_now(self) -> None:
        """Acknowledge what was received at once (TCP_QUICKACK), when more replies are due.

        A milter writes each modification, and then its final answer, as a packet of its
        own. With Nagle's algorithm on the milter's side (libmilter leaves it on) the next
        small packet waits until the last one is acknowledged, and the kernel here delays
        that acknowledgement (40 ms on Linux) when it has nothing to send back: without
        this, every message that a milter modifies costs 40 ms."""
        if self._tcp is not None and QUICKACK is not None:
            with contextlib.suppress(OSError):
                self._tcp.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)

    # ------------------------------------------------------------ state

    @property
    def usable(self) -> bool:
        """Open, and the milter has not closed its end (checked before reuse)."""
        return not self.closed and not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.close()

    async def quit(self, command: bytes = p.QUIT) -> None:
        """SMFIC_QUIT (and close), or SMFIC_QUIT_NC (the connection stays open); never raises."""
        if self.closed:
            return
        try:
            await self.send(p.packet(command))
        except MilterFailure:
            return
        if command == p.QUIT:
            self.close()


async def _connect(address: SocketAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.kind == "unix":
        return await asyncio.open_unix_connection(address.host)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer
