"""The SMTP session: aiosmtpd's transport machinery, Elemta's command handling.

aiosmtpd (pinned at 1.4.6) supplies the connection plumbing we do not want to
rewrite: the StreamReader protocol, the in-place TLS upgrade (with the buffer
flush that fixes CVE-2024-34083), and connection-lost handling. Every
command, reply and limit is Elemta's own, because aiosmtpd lacks a connect
stage, awaits no authenticator, replies without enhanced status codes, buffers
DATA in memory, refuses long lines and MAIL/RCPT parameters, and spends a
third of its CPU on per-connection introspection and envelope-address parsing.

This module is the session: connection set-up, the command loop and the
commands HELO/EHLO, RSET, NOOP, QUIT…. TLS (``starttls.py``), AUTH
(``auth.py``), MAIL and RCPT (``envelope.py``) and DATA with the end-of-data
pipeline (``data.py``) are modules of their own; every reply is named in
``replies.py``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiosmtpd.smtp import SMTP as _AioSMTP
from aiosmtpd.smtp import Session as _AioSession

from .. import verdicts as v
from ..hookcall import HookFailure
from ..models import Session, Transaction, new_id
from . import auth, bdat, data, envelope, proxy, replies, starttls
from .errors import Close
from .replies import Reply

if TYPE_CHECKING:
    from ..config import ListenerSettings
    from .context import SMTPContext

log = logging.getLogger("elemta.smtp")

LINE_LIMIT = 512 + 4096          # RFC 5321 command line plus room for extensions' parameters
READ_LIMIT = 65536               # StreamReader chunk limit while streaming DATA

_GREETING_ALLOWED = frozenset({"QUIT", "NOOP", "RSET", "HELP"})
_BEFORE_STARTTLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "RSET", "HELP"})



class ElemtaSMTP(_AioSMTP):
    """One SMTP connection on one listener."""

    # aiosmtpd's __init__ scans the class and the handler with inspect on every
    # connection; everything it sets up is replaced here, so it is not called.
    def __init__(self, ctx: SMTPContext, listener: ListenerSettings) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=READ_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.ctx = ctx
        self.listener = listener
        self.hostname = ctx.hostname
        self.enable_SMTPUTF8 = True
        self.data_size_limit = ctx.settings.server.max_message_bytes
        self._decode_data = False
        self._timeout_duration = ctx.settings.server.command_timeout_seconds
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session: _AioSession | None = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._handle_hooks: dict[str, Any] = {}
        self._proxy_timeout = None
        self.conn: Session | None = None
        self.tx: Transaction | None = None
        self.chunks: bdat.Chunks | None = None   # BDAT content of the transaction
        self._out: list[bytes] = []
        self._refused: Reply | None = None
        self._greeting_rejected = False
        self._bad_commands = 0
        self.auth_failures = 0
        self._counted_ip: str | None = None
        self._busy = False
        self._closing = False
        self.implicit_tls = False

    # ---------------------------------------------------------------- plumbing

    def _create_envelope(self) -> None:  # type: ignore[override]
        return None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            starttls.upgraded(self)
            return
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.conn = Session(new_id(), (peer[0], peer[1]), (sock[0], sock[1]), self.listener)
        if self.listener.proxy_protocol:
            return  # admitted once the PROXY header named the client (_handle_client)
        self.conn.relay_allowed = self.ctx.in_relay_networks(peer[0])
        self._refused = self.ctx.admit(self)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.ctx.release(self)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Called for every command and DATA chunk: move a deadline instead of
        # cancelling and re-creating a timer each time.
        loop = self.loop
        self._deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        if self.transport is not None and not self.transport.is_closing():
            log.info("session %s: timeout, closing", self.conn.id if self.conn else "-")
            self.transport.write(replies.timed_out(self.hostname).wire)
            self.transport.close()

    def reply(self, reply: Reply) -> None:
        """Queue a reply; replies to pipelined commands go out in one write."""
        self._out.append(reply.wire)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        self.flush()
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def shutdown_idle(self) -> bool:
        """Close the session with ``421 4.3.2`` unless a command is being handled.

        Used when the server stops. A session waiting for its client's next
        command is closed at once, in the middle of a mail transaction too (the
        client sends the message again later; nothing of it was accepted). One
        inside a command — DATA being received, a hook or the spool commit
        under way — is left to finish it: the command loop closes it after the
        reply.
        """
        if self._busy or self.transport is None:
            return False
        self.reply(replies.SHUTTING_DOWN)
        self.close()
        return True

    async def read_line(self) -> bytes | None:
        """One line from the client (AUTH continuations); ``None`` when it was too long.

        A line too long is consumed, answered ``500 5.5.2`` and counted.
        Raises :class:`Close` when the client went away.
        """
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            await self._skip_long_line(e.consumed)
            self.reply(replies.LINE_TOO_LONG)
            return None
        except asyncio.IncompleteReadError:
            raise Close from None

    # ---------------------------------------------------------------- session loop

    async def _handle_client(self) -> None:
        conn = self.conn
        assert conn is not None
        if self.listener.proxy_protocol:
            received = False
            try:
                received = await proxy.receive(self)
            finally:
                if not received:
                    self.ctx.session_ended(self)
            if not received:
                return
            self._refused = self.ctx.admit(self)
        if self._refused is not None:
            # Over a limit on an implicit-TLS listener: closed before any handshake,
            # which is the work an overload must not pay for; the client retries.
            if self.listener.tls != "implicit":
                self.reply(self._refused)
            self.close()
            return
        try:
            if self.listener.tls == "implicit":
                await starttls.implicit(self)
            await self._greet(conn)
            if not self._closing:
                await self._command_loop()
        except Close:
            self.close()
        except (asyncio.CancelledError, ConnectionError):
            raise
        finally:
            self.tx = None
            bdat.discard(self)
            self.ctx.session_ended(self)

    async def _greet(self, conn: Session) -> None:
        try:
            answer = await self.ctx.hooks.call("connect", session=conn)
        except HookFailure as f:
            self._greeting_rejected = True
            self.count_reject("connect", f.plugin, 451)
            self.reply(replies.connect_failed(self.hostname))
            raise Close from None
        plugin, verdict = answer.plugin, answer.value
        if isinstance(verdict, v.Accept) or verdict is None:
            if verdict is not None:
                conn.headers.extend(verdict.headers)
            self.reply(replies.greeting(self.hostname))
        elif isinstance(verdict, v.Disconnect):
            self.verdict_reply("connect", plugin, verdict)
        else:
            # RFC 5321 §3.1: after a 554 greeting the client may only QUIT; we
            # answer 503 to everything else.
            self._greeting_rejected = True
            self.count_reject("connect", plugin, verdict.code)
            code = 554 if isinstance(verdict, v.Reject) else 421
            self.reply(Reply.of(verdict, code=code))
            if code == 421:
                raise Close
        self.flush()

    async def _command_loop(self) -> None:
        reader = self._reader
        max_bad = self.ctx.settings.server.max_bad_commands
        while self.transport is not None and not self._closing:
            if not reader._buffer:  # type: ignore[attr-defined]
                self.flush()
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as e:
                await self._skip_long_line(e.consumed)
                self.reply(replies.LINE_TOO_LONG)
                self._bad(max_bad)
                continue
            except asyncio.IncompleteReadError:
                return
            self._reset_timeout()
            if len(line) > LINE_LIMIT:
                self.reply(replies.LINE_TOO_LONG)
                self._bad(max_bad)
                continue
            line = line.rstrip(b"\r\n")
            verb_b, _, arg_b = line.partition(b" ")
            try:
                verb = verb_b.decode("ascii").upper()
                arg = arg_b.decode("utf-8", "surrogateescape").strip() or None
            except UnicodeDecodeError:
                verb = ""
            method = _COMMANDS.get(verb)
            if method is None:
                self.reply(replies.UNRECOGNIZED if verb_b else replies.EMPTY_COMMAND)
                self._bad(max_bad)
                continue
            if self._greeting_rejected and verb not in _GREETING_ALLOWED:
                await bdat.skip_refused(self, verb, arg)
                self.reply(replies.GREETING_WAS_REFUSED)
                self._bad(max_bad)
                continue
            if (self.listener.require_tls and self.conn.tls is None  # type: ignore[union-attr]
                    and verb not in _BEFORE_STARTTLS):
                await bdat.skip_refused(self, verb, arg)
                self.reply(replies.STARTTLS_FIRST)
                continue
            self._busy = True
            try:
                await method(self, arg)
            except Close:
                raise
            except HookFailure as f:
                self.count_reject(verb.lower(), f.plugin, 451)
                self.reply(replies.LOCAL_FAILURE)
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                log.exception("session %s: internal error handling %s",
                              self.conn.id if self.conn else "-", verb)
                self.reply(replies.INTERNAL_ERROR)
            finally:
                self._busy = False
            if self.ctx.stopping:
                self.reply(replies.SHUTTING_DOWN)
                raise Close

    async def _skip_long_line(self, consumed: int) -> None:
        reader = self._reader
        await reader.read(consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await reader.read(e.consumed)

    def _bad(self, limit: int) -> None:
        self._bad_commands += 1
        if self._bad_commands >= limit:
            self.reply(replies.TOO_MANY_ERRORS)
            raise Close

    def count_reject(self, stage: str, plugin: str | None, code: int,
                     recipient: str | None = None) -> None:
        """Count and log a refusal at ``stage`` (by ``plugin``, or the core), of
        ``recipient`` or else of the transaction's recipients so far."""
        conn, tx = self.conn, self.tx
        self.ctx.metrics.count_rejected(
            stage, plugin, code, (recipient,) if recipient is not None else
            (r.address for r in tx.recipients) if tx is not None else ())
        log.info("session %s: %s refused with %d by %s (client=%s%s)",
                 conn.id if conn else "-", stage, code, plugin or "core",
                 conn.peer[0] if conn else "-",
                 f" queue_id={tx.id} from=<{tx.sender}>" if tx is not None else "")

    def refuse_for_storage(self, size: str | None, stage: str) -> bool:
        """Answer ``452 4.3.1`` when the spool cannot take a message now (full disk)."""
        why = self.ctx.spool.refusal(int(size) if size else 0)
        if why is None:
            return False
        self.count_reject(stage, None, 452)
        log.warning("session %s: %s refused: %s", self.conn.id if self.conn else "-", stage, why)
        self.reply(replies.NO_STORAGE)
        return True

    def verdict_reply(self, stage: str, plugin: str | None,
                      verdict: v.Reject | v.TempFail | v.Disconnect,
                      recipient: str | None = None) -> None:
        """Answer a plugin's refusal; ``Disconnect`` then ends the session."""
        self.count_reject(stage, plugin, verdict.code, recipient)
        self.reply(Reply.of(verdict))
        if isinstance(verdict, v.Disconnect):
            raise Close

    # ---------------------------------------------------------------- commands

    async def smtp_HELO(self, arg: str | None) -> None:
        await self._helo(arg, esmtp=False)

    async def smtp_EHLO(self, arg: str | None) -> None:
        await self._helo(arg, esmtp=True)

    async def _helo(self, arg: str | None, esmtp: bool) -> None:
        conn = self.conn
        assert conn is not None
        if not arg or " " in arg or not arg.isprintable():
            self.reply(replies.helo_syntax("EHLO" if esmtp else "HELO"))
            return
        self.tx = None
        conn.esmtp = esmtp
        answer = await self.ctx.hooks.call("helo", session=conn, hostname=arg)
        plugin, verdict = answer.plugin, answer.value
        if isinstance(verdict, v.REPLY_VERDICTS):
            conn.helo = None
            self.verdict_reply("helo", plugin, verdict)
            return
        if verdict is not None:
            conn.headers.extend(verdict.headers)
        conn.helo = arg
        if not esmtp:
            self.reply(replies.helo_ok(self.hostname))
            return
        keywords = ["PIPELINING", f"SIZE {self.data_size_limit}", "8BITMIME", "SMTPUTF8",
                    "ENHANCEDSTATUSCODES", "CHUNKING", "BINARYMIME", "DSN"]
        if starttls.offered(self):
            keywords.append("STARTTLS")
        mechanisms = auth.offered(self)
        if mechanisms:
            keywords.append("AUTH " + " ".join(mechanisms))
        self.reply(replies.ehlo_ok(self.hostname, keywords))

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        await starttls.command(self, arg)

    async def smtp_AUTH(self, arg: str | None) -> None:
        await auth.command(self, arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        await envelope.mail(self, arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await envelope.rcpt(self, arg)

    async def smtp_DATA(self, arg: str | None) -> None:
        await data.command(self, arg)

    async def smtp_BDAT(self, arg: str | None) -> None:
        await bdat.command(self, arg)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self.reply(replies.RSET_SYNTAX)
            return
        self.tx = None
        bdat.discard(self)
        self.reply(replies.OK)

    async def smtp_NOOP(self, arg: str | None) -> None:
        self.reply(replies.OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        self.reply(replies.BYE)
        raise Close

    async def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            self.reply(replies.VRFY_SYNTAX)
            return
        self.reply(replies.CANNOT_VRFY)

    async def smtp_EXPN(self, arg: str | None) -> None:
        self.reply(replies.EXPN_UNSUPPORTED)

    async def smtp_HELP(self, arg: str | None) -> None:
        self.reply(replies.HELP)


_COMMANDS: dict[str, Callable[[ElemtaSMTP, str | None], Awaitable[None]]] = {
    name[5:]: getattr(ElemtaSMTP, name) for name in dir(ElemtaSMTP)
    if name.startswith("smtp_") and name[5:].isupper()
}
