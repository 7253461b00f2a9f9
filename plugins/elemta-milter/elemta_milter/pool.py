"""Idle milter connections, kept between SMTP sessions with SMFIC_QUIT_NC.

After SMFIC_QUIT_NC a milter forgets the session (its macros, its client) and waits
for the SMFIC_CONNECT of the next one on the same connection; the negotiated options
stay. libmilter takes SMFIC_QUIT_NC only right after a message that ended with
SMFIR_CONTINUE: elsewhere its state machine ignores it, and then the next SMFIC_CONNECT
too. So with ``reuse_connections = "auto"`` only such connections are kept (the session
decides, :meth:`MilterSession.close`); ``"always"`` is for milters with a state machine
of their own that take it anywhere (rspamd).
"""

from __future__ import annotations

import collections
import logging
import time

from . import protocol as p
from .client import MilterConnection
from .metrics import Metrics
from .settings import MilterSettings

log = logging.getLogger("elemta.milter")


class Pool:
    """The idle connections of one milter (most recently used first)."""

    def __init__(self, settings: MilterSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.idle: collections.deque[MilterConnection] = collections.deque()

    def _prune(self, now: float) -> None:
        while self.idle and (now - self.idle[0].idle_since >= self.settings.idle_timeout_seconds
                             or not self.idle[0].usable):
            self.idle.popleft().close()

    async def acquire(self) -> tuple[MilterConnection, bool]:
        """A connection to the milter, and whether it was reused."""
        now = time.monotonic()
        self._prune(now)
        while self.idle:
            conn = self.idle.pop()
            if conn.usable and now - conn.idle_since < self.settings.idle_timeout_seconds:
                self.metrics.connection(self.settings.name, "reused")
                return conn, True
            conn.close()
        conn = await MilterConnection.open(self.settings)
        self.metrics.connection(self.settings.name, "new")
        return conn, False

    async def release(self, conn: MilterConnection, reusable: bool) -> None:
        """End the session on ``conn``: SMFIC_QUIT_NC into the pool when ``reusable`` and
        the milter speaks version 6, SMFIC_QUIT and close otherwise. Never raises."""
        s = self.settings
        keep = (reusable and s.reuse_connections != "never" and s.max_idle_connections > 0
                and conn.usable and conn.negotiated.version >= 6)
        if not keep:
            await conn.quit(p.QUIT)
            return
        await conn.quit(p.QUIT_NC)
        if conn.closed:
            return
        now = time.monotonic()
        conn.idle_since = now
        self.idle.append(conn)
        self._prune(now)
        while len(self.idle) > s.max_idle_connections:
            self.idle.popleft().close()

    async def close(self) -> None:
        """Close every idle connection (server shutdown)."""
        while self.idle:
            self.idle.pop().close()
