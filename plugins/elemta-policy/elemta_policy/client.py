"""A client for one policy service: a small pool of kept-open connections.

Each connection carries one request at a time (the protocol has no request ids),
so up to ``max_connections`` requests run at once and the others wait for a free
connection. An idle connection is reused, most recently used first (or the one a
transaction used before, so that the requests about one message travel together
as Postfix sends them), and closed after ``max_idle_seconds`` unused or
``max_ttl_seconds`` after it was opened.

Every request has one deadline (``request_timeout_seconds``) that covers waiting
for a connection, connecting and the exchange. A connection on which anything
went wrong is closed, never reused: a late answer to a timed-out request must not
be read as the answer to the next one. A reused connection the service had
closed in the meantime (it found it idle too long) is noticed and the request is
sent again once, on a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping

from .protocol import MAX_REPLY_BYTES, MAX_REPLY_LINES, ProtocolError, encode_request, parse_reply
from .settings import ServiceSettings

log = logging.getLogger("elemta.policy")

#: the longest reply line read; StreamReader refuses longer ones
MAX_LINE_BYTES = 8192


class PolicyError(Exception):
    """A request got no usable answer. ``reason`` is ``"connect"``, ``"timeout"``,
    ``"closed"`` or ``"protocol"``; ``str()`` says what happened."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Stale(Exception):
    """The connection was closed or reset before any byte of the reply came."""


class Connection:
    """One open connection to the service."""

    __slots__ = ("reader", "writer", "opened", "idle_timer", "requests")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 now: float) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = now
        self.idle_timer: asyncio.TimerHandle | None = None
        self.requests = 0

    def alive(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if not self.writer.is_closing():
            self.writer.close()

    async def exchange(self, payload: bytes) -> dict[str, str]:
        """Send one request and read its reply (the caller bounds the time).

        :raises _Stale: closed before any reply byte came.
        :raises PolicyError: closed in the middle of the reply, or not a reply.
        """
        self.requests += 1
        try:
            self.writer.write(payload)
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise _Stale(str(e) or type(e).__name__) from None
        lines: list[bytes] = []
        size = 0
        while True:  # bounded: MAX_REPLY_LINES, MAX_REPLY_BYTES and the caller's deadline
            try:
                line = await self.reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                if not lines and not e.partial:
                    raise _Stale("closed by the service") from None
                raise PolicyError("closed", "the service closed the connection in the middle "
                                  "of its reply") from None
            except asyncio.LimitOverrunError:
                raise PolicyError("protocol", f"a reply line is longer than {MAX_LINE_BYTES} "
                                  "bytes: this is not a policy service") from None
            except (ConnectionError, OSError) as e:
                if not lines:
                    raise _Stale(str(e) or type(e).__name__) from None
                raise PolicyError("closed", f"the connection broke in the middle of the "
                                  f"reply: {e}") from None
            size += len(line)
            stripped = line.rstrip(b"\r\n")
            if not stripped:
                if not lines:
                    raise PolicyError("protocol", "the reply is empty (no action= line)")
                break
            lines.append(stripped)
            if size > MAX_REPLY_BYTES or len(lines) > MAX_REPLY_LINES:
                raise PolicyError("protocol", f"the reply is longer than {MAX_REPLY_LINES} "
                                  f"lines or {MAX_REPLY_BYTES} bytes: this is not a policy "
                                  "service")
        try:
            return parse_reply(lines)
        except ProtocolError as e:
            raise PolicyError("protocol", f"not a policy reply: {e}") from None


class ServiceClient:
    """Requests to one configured service. Create it on the event loop (``startup``)."""

    def __init__(self, settings: ServiceSettings, *,
                 on_connect: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.endpoint = settings.endpoint
        self._on_connect = on_connect
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._idle: list[Connection] = []
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def ask(self, attributes: Mapping[str, object], *,
                  prefer: Connection | None = None) -> tuple[dict[str, str], Connection]:
        """Send a request; the reply's attributes and the connection that carried it.

        :raises PolicyError: no answer within the deadline, or not a usable one.
        """
        loop = asyncio.get_running_loop()
        timeout = self.settings.request_timeout_seconds
        deadline = loop.time() + timeout
        payload = encode_request(attributes)
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise PolicyError("timeout", f"no connection became free within {timeout:g} s "
                              f"(max_connections = {self.settings.max_connections} all "
                              "busy)") from None
        try:
            for attempt in (1, 2):  # a second time only after a stale reused connection
                conn = self._take_idle(prefer, loop.time())
                reused = conn is not None
                if conn is None:
                    conn = await self._open(deadline)
                try:
                    async with asyncio.timeout_at(deadline):
                        reply = await conn.exchange(payload)
                except _Stale as e:
                    conn.close()
                    if reused and attempt == 1:
                        log.debug("policy %s: a kept connection was closed by the service "
                                  "(%s); sending again on a new one", self.settings.name, e)
                        continue
                    raise PolicyError("closed", "the service closed the connection without "
                                      "answering") from None
                except TimeoutError:
                    conn.close()
                    raise PolicyError("timeout", f"no answer within {timeout:g} s "
                                      "(request_timeout_seconds)") from None
                except BaseException:
                    conn.close()
                    raise
                self._give_back(conn, loop)
                return reply, conn
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._slots.release()

    async def _open(self, deadline: float) -> Connection:
        loop = asyncio.get_running_loop()
        timeout = min(self.settings.connect_timeout_seconds, max(0.0, deadline - loop.time()))
        where = str(self.endpoint)
        try:
            async with asyncio.timeout(timeout):
                if self.endpoint.unix:
                    reader, writer = await asyncio.open_unix_connection(
                        self.endpoint.path, limit=MAX_LINE_BYTES)
                else:
                    reader, writer = await asyncio.open_connection(
                        self.endpoint.host, self.endpoint.port, limit=MAX_LINE_BYTES)
        except TimeoutError:
            raise PolicyError("connect", f"cannot connect to {where} within {timeout:g} s "
                              "(connect_timeout_seconds)") from None
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            raise PolicyError("connect", f"cannot connect to {where}: {why} (is the service "
                              "running, and is this its address?)") from None
        if self._on_connect is not None:
            self._on_connect()
        return Connection(reader, writer, loop.time())

    def _take_idle(self, prefer: Connection | None, now: float) -> Connection | None:
        """An idle connection that is still usable: ``prefer`` if it is idle, else the most
        recently used. Unusable ones (closed by the service, too old) are closed."""
        keep = []
        for conn in self._idle:
            if conn.alive() and now - conn.opened < self.settings.max_ttl_seconds:
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep
        if not keep:
            return None
        conn = prefer if prefer is not None and any(c is prefer for c in keep) else keep[-1]
        self._idle = [c for c in keep if c is not conn]
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        return conn

    def _give_back(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        if self._closed or not conn.alive() \
                or loop.time() - conn.opened >= self.settings.max_ttl_seconds:
            conn.close()
            return
        conn.idle_timer = loop.call_later(self.settings.max_idle_seconds, self._expire, conn)
        self._idle.append(conn)

    def _expire(self, conn: Connection) -> None:
        conn.idle_timer = None
        if any(c is conn for c in self._idle):
            self._idle = [c for c in self._idle if c is not conn]
            conn.close()

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their request ends."""
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle = []
