"""Delivery to one LMTP server: a bounded pool of sessions and one outcome per recipient.

Every message goes out as one LMTP transaction: MAIL, one RCPT per recipient
(pipelined when the server offers PIPELINING), DATA and the content streamed
from the spool file. After the final dot the server answers once per accepted
recipient (RFC 2033 §4.2), so each recipient gets its own outcome: a RCPT
refusal, its own post-DATA reply, or, when the server cannot be reached or the
session breaks, a temporary failure for every recipient not yet answered.

Sessions are reused (the client sends RSET first only after a transaction that
did not complete) and closed after :data:`IDLE_SECONDS` without a message.

A unix socket's path names no mail server, and a bounce must not show it to a
sender: an LMTP server on a socket is named after this host (``[server]
hostname``) in outcomes, replies and logs.
"""

from __future__ import annotations

import asyncio
import logging
import time

from elemta import (DeliveryResult, Envelope, Outcome, SMTPConnection, SMTPError, Timeouts,
                    default_enhanced)

from .settings import LMTPAddress, LMTPSettings

log = logging.getLogger("elemta.lmtp")

#: How long an idle session is kept for the next message.
IDLE_SECONDS = 5.0


class LMTPTransport:
    """Delivers messages to the LMTP server at ``target``; at most ``max_connections`` at once.

    ``host_name`` is this host's name: the name of an LMTP server on a unix socket.
    """

    def __init__(self, settings: LMTPSettings, target: LMTPAddress, lhlo: str,
                 host_name: str) -> None:
        self.settings = settings
        self.target = target
        #: The LMTP server's name in outcomes: a DSN's ``Remote-MTA``.
        self.remote = target.remote if target.path is None else host_name
        #: The LMTP server's name in reply texts and logs.
        self.label = target.remote if target.path is None else f"the LMTP server on {host_name}"
        self.lhlo = lhlo
        self.timeouts = Timeouts.scaled(settings.connect_timeout_seconds,
                                        settings.command_timeout_seconds)
        self._limit = asyncio.Semaphore(settings.max_connections)
        self._idle: list[tuple[SMTPConnection, float]] = []
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def deliver(self, envelope: Envelope, addresses: list[str],
                      content_path: str) -> list[Outcome]:
        """One outcome per address, in order; never raises for what the server or network did.

        A file that cannot be read raises ``OSError`` (the runner then retries
        the whole group later).
        """
        async with self._limit:
            try:
                result = await self._send(envelope, addresses, content_path)
            except SMTPError as error:
                return self._failed(envelope, addresses, error)
        outcomes = []
        for r in result.results:
            outcome = Outcome(r.recipient, r.code, r.enhanced or default_enhanced(r.code),
                              self._public(r.text), self.remote)
            # the runner logs every outcome at info already
            log.debug("%s: <%s> %s: %s (%s)", envelope.id, r.recipient, self.label,
                     outcome.reply(), _STAGES.get(r.stage, r.stage))
            outcomes.append(outcome)
        return outcomes

    async def _send(self, envelope: Envelope, addresses: list[str],
                    content_path: str) -> DeliveryResult:
        params = envelope.mail_params
        for _ in range(2):  # an idle session may have been closed by the server meanwhile
            conn = await self._connection()
            try:
                # A local store takes UTF-8 headers as they are: ask for SMTPUTF8
                # only when the server offers it (non-ASCII addresses still need it).
                result = await conn.send(envelope.sender, addresses, content_path,
                                         utf8="SMTPUTF8" in params
                                         and "SMTPUTF8" in conn.extensions,
                                         eight_bit=params.get("BODY") == "8BITMIME",
                                         size=envelope.size)
            except BaseException:
                self._close_later(conn)
                raise
            if not result.stale:
                break
            self._close_later(conn)
        self._release(conn)
        return result

    def _failed(self, envelope: Envelope, addresses: list[str],
                error: SMTPError) -> list[Outcome]:
        """No session: every recipient waits for the server to come back.

        A 5xx greeting or LHLO reply is the server's trouble, not the
        recipients', so it defers too (Postfix's ``smtp_skip_5xx_greeting``).
        """
        if error.temporary:
            code, enhanced, text = error.code, error.enhanced or "4.4.2", self._public(error.text)
        else:
            code, enhanced = 451, "4.3.0"
            text = f"{self.label} refused the LMTP session: {self._public(str(error))}"
        outcomes = []
        for address in addresses:
            log.info("%s: <%s> %s: %d %s %s (%s)", envelope.id, address, self.label, code,
                     enhanced, text, _STAGES.get(error.stage, error.stage))
            outcomes.append(Outcome(address, code, enhanced, text, self.remote))
        return outcomes

    def _public(self, text: str) -> str:
        """``text`` (the client's own wording names the server) without a socket path."""
        if self.target.path is None:
            return text
        return text.replace(self.target.remote, self.label)

    # ------------------------------------------------------------- the session pool

    async def _connection(self) -> SMTPConnection:
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if conn.usable and now - since < IDLE_SECONDS:
                return conn
            self._close_later(conn)
        target = self.target
        if target.path is not None:
            return await SMTPConnection.open_lmtp(path=target.path, lhlo=self.lhlo,
                                                  timeouts=self.timeouts)
        return await SMTPConnection.open_lmtp(target.host, target.port, lhlo=self.lhlo,
                                              timeouts=self.timeouts)

    def _release(self, conn: SMTPConnection) -> None:
        if not (conn.usable and self.settings.reuse_connections):
            self._close_later(conn)
            return
        self._idle.append((conn, time.monotonic()))
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._reap)

    def _reap(self) -> None:
        """Close the sessions idle for :data:`IDLE_SECONDS`; look again while any is left."""
        self._reaper = None
        now = time.monotonic()
        kept = []
        for conn, since in self._idle:
            if conn.usable and now - since < IDLE_SECONDS:
                kept.append((conn, since))
            else:
                self._close_later(conn)
        self._idle = kept
        if kept:
            wait = IDLE_SECONDS - (now - kept[0][1])
            self._reaper = asyncio.get_running_loop().call_later(max(wait, 0.05), self._reap)

    def _close_later(self, conn: SMTPConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def idle_sessions(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        """QUIT every idle session and wait for sessions being closed."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._close_later(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


_STAGES = {"connect": "connecting", "greeting": "at the greeting", "lhlo": "at LHLO",
           "rset": "at RSET", "mail": "at MAIL FROM", "rcpt": "at RCPT TO", "data": "at DATA",
           "end_of_data": "after DATA"}
