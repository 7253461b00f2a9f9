"""The SMTP session: aiosmtpd's transport machinery, Elemta's command handling.

aiosmtpd (pinned at 1.4.6) supplies the connection plumbing we do not want to
rewrite: the StreamReader protocol, the in-place STARTTLS upgrade (with the
buffer flush that fixes CVE-2024-34083), and connection-lost handling. Every
command, reply and limit is Elemta's own, because aiosmtpd lacks a connect
stage, awaits no authenticator, replies without enhanced status codes, buffers
DATA in memory, refuses long lines and MAIL/RCPT parameters, and spends a
third of its CPU on per-connection introspection and envelope-address parsing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl
import time
from asyncio import sslproto
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiosmtpd.smtp import SMTP as _AioSMTP
from aiosmtpd.smtp import Session as _AioSession

from .. import verdicts as v
from ..default_authres import remove_forged
from ..hookcall import HookFailure
from ..models import AuthResult, Credentials, Message, Recipient, Session, Transaction, new_id
from ..spool.envelope import Envelope, RecipientState
from . import address
from .tls import tls_info

if TYPE_CHECKING:
    from ..config import ListenerSettings
    from .context import SMTPContext

log = logging.getLogger("elemta.smtp")

LINE_LIMIT = 512 + 4096          # RFC 5321 command line plus room for extensions' parameters
READ_LIMIT = 65536               # StreamReader chunk limit while streaming DATA
MAX_HEADER_LINE = 998

_GREETING_ALLOWED = frozenset({"QUIT", "NOOP", "RSET", "HELP"})
_BEFORE_STARTTLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "RSET", "HELP"})
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")

_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH"})
_RCPT_PARAMS: frozenset[str] = frozenset()

FAILURE_REPLY = "451 4.3.0 Temporary local problem, please try again later"



class _Close(Exception):
    """Raised inside a command to end the session after its reply was sent."""


class ElemtaSMTP(_AioSMTP):
    """One SMTP connection on one listener."""

    # aiosmtpd's __init__ scans the class and the handler with inspect on every
    # connection; everything it sets up is replaced here, so it is not called.
    def __init__(self, ctx: SMTPContext, listener: ListenerSettings,
                 tls_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=READ_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.ctx = ctx
        self.listener = listener
        self.hostname = ctx.hostname
        self.tls_context = tls_context if listener.tls == "starttls" else None
        self._implicit_tls = listener.tls == "implicit"
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
        self._out: list[bytes] = []
        self._refused: str | None = None
        self._greeting_rejected = False
        self._bad_commands = 0
        self._auth_failures = 0
        self._counted_ip: str | None = None
        self._busy = False
        self._closing = False

    # ---------------------------------------------------------------- plumbing

    def _create_envelope(self) -> None:  # type: ignore[override]
        return None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            self._after_starttls()
            return
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.conn = Session(new_id(), (peer[0], peer[1]), (sock[0], sock[1]), self.listener)
        if self._implicit_tls:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.conn.tls = tls_info(ssl_object, implicit=True)
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
            self.transport.write(b"421 4.4.2 " + self.hostname.encode() +
                                 b" Error: timeout exceeded\r\n")
            self.transport.close()

    def reply(self, line: str) -> None:
        """Queue a reply; replies to pipelined commands go out in one write."""
        self._out.append(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    async def push(self, status: Any) -> None:  # used by inherited code paths
        self.reply(status if isinstance(status, str) else status.decode())
        self.flush()
        await self._writer.drain()

    def close(self) -> None:
        self.flush()
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def shutdown_idle(self) -> bool:
        """Close the session if it is between transactions; used by graceful stop.

        A session inside a command or a mail transaction (after MAIL) is left to
        finish; the command loop closes it when the transaction ends.
        """
        if self._busy or self.tx is not None or self.transport is None:
            return False
        self.reply("421 4.3.2 Service shutting down, closing connection")
        self.close()
        return True

    # ---------------------------------------------------------------- session loop

    async def _handle_client(self) -> None:
        conn = self.conn
        assert conn is not None
        if self._refused is not None:
            self.reply(self._refused)
            self.close()
            return
        try:
            await self._greet(conn)
            if not self._closing:
                await self._command_loop()
        except _Close:
            self.close()
        except (asyncio.CancelledError, ConnectionError):
            raise
        finally:
            self.tx = None
            self.ctx.session_ended(self)

    async def _greet(self, conn: Session) -> None:
        try:
            answer = await self.ctx.hooks.call("connect", session=conn)
        except HookFailure as f:
            self._greeting_rejected = True
            self._count_reject("connect", f.plugin, 451)
            self.reply(f"421 4.3.0 {self.hostname} temporary local problem, closing")
            raise _Close from None
        plugin, verdict = answer.plugin, answer.value
        if isinstance(verdict, v.Accept) or verdict is None:
            if verdict is not None:
                conn.headers.extend(verdict.headers)
            self.reply(f"220 {self.hostname} ESMTP Elemta")
        elif isinstance(verdict, v.Disconnect):
            self._count_reject("connect", plugin, verdict.code)
            self.reply(v.reply_line(verdict))
            raise _Close
        else:
            # RFC 5321 §3.1: after a 554 greeting the client may only QUIT; we
            # answer 503 to everything else.
            self._greeting_rejected = True
            self._count_reject("connect", plugin, verdict.code)
            code = 554 if isinstance(verdict, v.Reject) else 421
            self.reply(f"{code} {verdict.enhanced} {verdict.text}")
            if code == 421:
                raise _Close
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
                self.reply("500 5.5.2 Line too long")
                self._bad(max_bad)
                continue
            except asyncio.IncompleteReadError:
                return
            self._reset_timeout()
            if len(line) > LINE_LIMIT:
                self.reply("500 5.5.2 Line too long")
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
                self.reply("500 5.5.2 Syntax error, command unrecognized" if verb_b
                           else "500 5.5.2 Syntax error, empty command")
                self._bad(max_bad)
                continue
            if self._greeting_rejected and verb not in _GREETING_ALLOWED:
                self.reply("503 5.5.1 Bad sequence of commands: the greeting was refused")
                self._bad(max_bad)
                continue
            if (self.listener.require_tls and self.conn.tls is None  # type: ignore[union-attr]
                    and verb not in _BEFORE_STARTTLS):
                self.reply("530 5.7.0 Must issue a STARTTLS command first")
                continue
            self._busy = True
            try:
                await method(self, arg)
            except _Close:
                raise
            except HookFailure as f:
                self._count_reject(verb.lower(), f.plugin, 451)
                self.reply(FAILURE_REPLY)
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                log.exception("session %s: internal error handling %s",
                              self.conn.id if self.conn else "-", verb)
                self.reply("451 4.3.0 Internal error, please try again later")
            finally:
                self._busy = False
            if self.ctx.stopping and self.tx is None:
                self.reply("421 4.3.2 Service shutting down, closing connection")
                raise _Close

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
            self.reply("421 4.7.0 Too many errors, closing connection")
            raise _Close

    def _count_reject(self, stage: str, plugin: str | None, code: int) -> None:
        self.ctx.metrics.messages_rejected.labels(stage=stage, plugin=plugin or "core",
                                                  code=str(code)).inc()
        conn, tx = self.conn, self.tx
        log.info("session %s: %s refused with %d by %s (client=%s%s)",
                 conn.id if conn else "-", stage, code, plugin or "core",
                 conn.peer[0] if conn else "-",
                 f" queue_id={tx.id} from=<{tx.sender}>" if tx is not None else "")

    def _verdict_reply(self, stage: str, plugin: str | None,
                       verdict: v.Reject | v.TempFail | v.Disconnect) -> None:
        self._count_reject(stage, plugin, verdict.code)
        self.reply(v.reply_line(verdict))
        if isinstance(verdict, v.Disconnect):
            raise _Close

    # ---------------------------------------------------------------- commands

    async def smtp_HELO(self, arg: str | None) -> None:
        await self._helo(arg, esmtp=False)

    async def smtp_EHLO(self, arg: str | None) -> None:
        await self._helo(arg, esmtp=True)

    async def _helo(self, arg: str | None, esmtp: bool) -> None:
        conn = self.conn
        assert conn is not None
        verb = "EHLO" if esmtp else "HELO"
        if not arg or " " in arg or not arg.isprintable():
            self.reply(f"501 5.5.4 Syntax: {verb} hostname")
            return
        self.tx = None
        conn.esmtp = esmtp
        answer = await self.ctx.hooks.call("helo", session=conn, hostname=arg)
        plugin, verdict = answer.plugin, answer.value
        if isinstance(verdict, v.REPLY_VERDICTS):
            conn.helo = None
            self._verdict_reply("helo", plugin, verdict)
            return
        if verdict is not None:
            conn.headers.extend(verdict.headers)
        conn.helo = arg
        if not esmtp:
            self.reply(f"250 {self.hostname}")
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.data_size_limit}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and conn.tls is None:
            lines.append("STARTTLS")
        if self._auth_allowed() and conn.auth_user is None:
            lines.append("AUTH PLAIN LOGIN")
        self.reply("\r\n".join(f"250-{ln}" for ln in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def _auth_allowed(self) -> bool:
        return self.conn.tls is not None or self.listener.allow_plaintext_auth  # type: ignore[union-attr]

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            self.reply("501 5.5.4 Syntax: STARTTLS")
            return
        if self.conn.tls is not None:  # type: ignore[union-attr]
            self.reply("503 5.5.1 TLS already active")
            return
        if self.tls_context is None:
            self.reply("502 5.5.1 STARTTLS not available on this port")
            return
        if self.conn.helo is None:  # type: ignore[union-attr]
            self.reply("503 5.5.1 Send EHLO first")
            return
        self.reply("220 2.0.0 Ready to start TLS")
        self.flush()
        # The same in-place upgrade aiosmtpd performs, without its un-coded reply.
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter,
                                                  server_side=True)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            async with asyncio.timeout(self.ctx.settings.server.command_timeout_seconds):
                await waiter
        except (Exception, TimeoutError) as e:
            log.info("session %s: TLS handshake failed: %s", self.conn.id, e)  # type: ignore[union-attr]
            self._closing = True
            if self._original_transport is not None:
                self._original_transport.close()
            raise _Close from None

    def _after_starttls(self) -> None:
        conn = self.conn
        assert conn is not None
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is not None:
            conn.tls = tls_info(ssl_object, implicit=False)
        # RFC 3207 §4.2: forget everything learnt before the handshake.
        conn.helo = None
        conn.esmtp = False
        self.tx = None

    async def smtp_AUTH(self, arg: str | None) -> None:
        conn = self.conn
        assert conn is not None
        if conn.helo is None or not conn.esmtp:
            self.reply("503 5.5.1 Send EHLO first")
            return
        if not self._auth_allowed():
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if conn.auth_user is not None:
            self.reply("503 5.5.1 Already authenticated")
            return
        if self.tx is not None:
            self.reply("503 5.5.1 AUTH not allowed during a mail transaction")
            return
        if not arg:
            self.reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if mechanism == "PLAIN":
            creds = await self._auth_plain(initial or None)
        elif mechanism == "LOGIN":
            creds = await self._auth_login(initial or None)
        else:
            self.reply("504 5.5.4 Unrecognized authentication mechanism")
            return
        if creds is None:
            return
        try:
            answer = await self.ctx.hooks.call("auth", session=conn, mechanism=mechanism,
                                               credentials=creds)
        except HookFailure as f:
            self._count_reject("auth", f.plugin, 454)
            self.reply("454 4.7.0 Temporary authentication failure")
            return
        plugin, verdict = answer.plugin, answer.value
        if isinstance(verdict, v.Accept):
            conn.auth_user = creds.login
            log.info("session %s: authenticated as %s (%s)", conn.id, creds.login, mechanism)
            self.reply("235 2.7.0 Authentication successful")
            return
        if isinstance(verdict, v.TempFail):
            self._count_reject("auth", plugin, verdict.code)
            self.reply(f"454 {verdict.enhanced} {verdict.text}")
            return
        if isinstance(verdict, v.Disconnect):
            self._verdict_reply("auth", plugin, verdict)
        self._auth_failures += 1
        log.info("session %s: authentication failed for %s (%s)", conn.id, creds.login,
                 mechanism)
        self._count_reject("auth", plugin, 535)
        self.reply("535 5.7.8 Authentication credentials invalid")
        if self._auth_failures >= self.ctx.settings.server.max_auth_failures:
            self.reply("421 4.7.0 Too many authentication failures, closing connection")
            raise _Close

    async def _auth_read(self, challenge: str) -> str | None:
        self.reply(f"334 {challenge}")
        self.flush()
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            await self._skip_long_line(e.consumed)
            self.reply("500 5.5.2 Line too long")
            return None
        except asyncio.IncompleteReadError:
            raise _Close from None
        text = line.rstrip(b"\r\n").decode("ascii", "replace")
        if text == "*":
            self.reply("501 5.7.0 Authentication cancelled")
            return None
        return text

    def _b64(self, text: str) -> bytes | None:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.reply("501 5.5.2 Cannot decode base64 response")
            return None

    async def _auth_plain(self, initial: str | None) -> Credentials | None:
        if initial is None:
            initial = await self._auth_read("")
            if initial is None:
                return None
        raw = self._b64(initial) if initial != "=" else b""
        if raw is None:
            return None
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self.reply("501 5.5.2 Malformed AUTH PLAIN response")
            return None
        authzid, login, password = (p.decode("utf-8", "surrogateescape") for p in parts)
        if authzid and authzid != login:
            self.reply("535 5.7.8 Authorization identity must match the login")
            return None
        return Credentials("PLAIN", login, password)

    async def _auth_login(self, initial: str | None) -> Credentials | None:
        if initial is None:
            initial = await self._auth_read("VXNlcm5hbWU6")  # "Username:"
            if initial is None:
                return None
        login = self._b64(initial)
        if login is None:
            return None
        answer = await self._auth_read("UGFzc3dvcmQ6")  # "Password:"
        if answer is None:
            return None
        password = self._b64(answer)
        if password is None:
            return None
        return Credentials("LOGIN", login.decode("utf-8", "surrogateescape"),
                           password.decode("utf-8", "surrogateescape"))

    async def smtp_MAIL(self, arg: str | None) -> None:
        conn = self.conn
        assert conn is not None
        if conn.helo is None:
            self.reply("503 5.5.1 Send HELO/EHLO first")
            return
        if self.listener.require_auth and conn.auth_user is None:
            self.reply("530 5.7.0 Authentication required")
            return
        if self.tx is not None:
            self.reply("503 5.5.1 Nested MAIL command")
            return
        try:
            sender, params, utf8 = address.parse_mail_from(arg, smtputf8_allowed=True)
        except address.PathError as e:
            self.reply(e.reply())
            return
        if params and not conn.esmtp:
            self.reply("555 5.5.4 MAIL parameters require EHLO")
            return
        for key, value in params.items():
            if key not in _MAIL_PARAMS:
                self.reply(f"555 5.5.4 MAIL parameter {key} not supported")
                return
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self.reply("501 5.5.4 Syntax: SIZE=<number>")
                    return
                if int(value) > self.data_size_limit:
                    self._count_reject("mail", None, 552)
                    self.reply("552 5.3.4 Message size exceeds fixed maximum message size")
                    return
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self.reply("501 5.5.4 Syntax: BODY=7BIT|8BITMIME")
                    return
                params[key] = value.upper()
            elif key == "SMTPUTF8" and value is not None:
                self.reply("501 5.5.4 SMTPUTF8 takes no value")
                return
        if utf8 and "SMTPUTF8" not in params:
            self.reply("553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter")
            return
        params.pop("AUTH", None)  # RFC 4954 AUTH= is advisory; we do not trust it
        tx = Transaction(new_id(), sender, params)
        answer = await self.ctx.hooks.call("mail", session=conn, tx=tx, sender=sender,
                                           params=params)
        plugin, verdict = answer.plugin, answer.value
        if isinstance(verdict, v.REPLY_VERDICTS):
            self._verdict_reply("mail", plugin, verdict)
            return
        if verdict is not None:
            tx.headers.extend(verdict.headers)
        self.tx = tx
        self.reply("250 2.1.0 Sender OK")

    async def smtp_RCPT(self, arg: str | None) -> None:
        conn, tx = self.conn, self.tx
        assert conn is not None
        if tx is None:
            self.reply("503 5.5.1 Need MAIL command first")
            return
        try:
            rcpt, params, utf8 = address.parse_rcpt_to(
                arg, smtputf8_allowed="SMTPUTF8" in tx.mail_params)
        except address.PathError as e:
            self.reply(e.reply())
            return
        for key in params:
            if key not in _RCPT_PARAMS:
                self.reply(f"555 5.5.4 RCPT parameter {key} not supported")
                return
        if len(tx.recipients) >= self.ctx.settings.server.max_recipients:
            self._count_reject("rcpt", None, 452)
            self.reply("452 4.5.3 Too many recipients")
            return
        recipient = Recipient(rcpt, params)
        answer = await self.ctx.hooks.call("rcpt", session=conn, tx=tx, recipient=recipient,
                                           params=params)
        plugin, verdict = answer.plugin, answer.value
        if isinstance(verdict, v.Accept):
            tx.headers.extend(verdict.headers)
            tx.recipients.append(recipient)
            self.reply("250 2.1.5 Recipient OK")
            return
        if verdict is None:
            verdict = v.Reject(550, "5.7.1", "Relaying denied")
        self._verdict_reply("rcpt", plugin, verdict)

    async def smtp_DATA(self, arg: str | None) -> None:
        conn, tx = self.conn, self.tx
        assert conn is not None
        if tx is None:
            self.reply("503 5.5.1 Need MAIL command first")
            return
        if not tx.recipients:
            self.reply("554 5.5.1 No valid recipients")
            return
        if arg:
            self.reply("501 5.5.4 Syntax: DATA")
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        self.flush()
        incoming = self.ctx.spool.incoming(tx.id)
        try:
            problem = await self._receive_data(incoming)
            if problem is not None:
                incoming.discard()
                self.tx = None
                self._count_reject("data", None, int(problem[:3]))
                self.reply(problem)
                return
            await self._end_of_data(conn, tx, incoming)
        except BaseException:
            incoming.discard()
            self.tx = None
            raise

    async def _receive_data(self, incoming: Any) -> str | None:
        """Stream DATA into ``incoming``; return an error reply, or None if all is well.

        The terminator is CRLF "." CRLF only (bare LF or CR never ends DATA: SMTP
        smuggling). A virtual CRLF is put in front of the stream so that a
        message consisting only of "." CRLF ends at once, like any other.
        """
        reader = self._reader
        settings = self.ctx.settings.server
        limit = self.data_size_limit
        data_timeout = settings.data_timeout_seconds
        normalize = settings.bare_newline == "normalize"
        reader._buffer[:0] = b"\r\n"  # type: ignore[attr-defined]
        carry = b""
        size = 0
        too_big = False
        bare = False
        first = True
        while True:
            self._reset_timeout(data_timeout)
            try:
                piece = await reader.readuntil(b"\r\n.\r\n")
                last = True
            except asyncio.LimitOverrunError as e:
                piece = await reader.read(e.consumed)
                last = False
            except asyncio.IncompleteReadError:
                raise _Close from None
            chunk = carry + piece if carry else piece
            if last:
                chunk = chunk[:-3]   # keep the CRLF that ends the last line
                carry = b""
            elif chunk.endswith(b"\r\n"):
                carry, chunk = chunk[-2:], chunk[:-2]
            elif chunk.endswith(b"\r"):
                carry, chunk = chunk[-1:], chunk[:-1]
            else:
                carry = b""
            chunk = chunk.replace(b"\r\n.", b"\r\n")
            if first:
                chunk = chunk[2:]
                first = False
            if chunk.count(b"\n") != chunk.count(b"\r\n") or chunk.count(b"\r") != chunk.count(b"\r\n"):
                if normalize:
                    chunk = _BARE_CR.sub(b"\r\n", _BARE_LF.sub(b"\r\n", chunk))
                else:
                    bare = True
            size += len(chunk)
            if size > limit:
                too_big = True
            if not too_big and not bare:
                incoming.write(chunk)
            if last:
                break
        self._reset_timeout()
        if too_big:
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        if bare:
            return "550 5.5.2 Message contains a bare CR or LF; lines must end with CRLF"
        return None

    async def _end_of_data(self, conn: Session, tx: Transaction, incoming: Any) -> None:
        hooks = self.ctx.hooks
        message: Message = incoming.message()
        try:
            results = await hooks.call("message_auth", session=conn, tx=tx, message=message)
            auth_results = results.values
            answer = await hooks.call("data", session=conn, tx=tx, message=message,
                                      auth_results=auth_results)
            plugin, verdict = answer.plugin, answer.value
        except HookFailure as f:
            self._reject_data(incoming, tx, message, "data", f.plugin, 451, FAILURE_REPLY)
            return
        if isinstance(verdict, v.REPLY_VERDICTS):
            incoming.discard()
            self._log_tx(conn, tx, message, f"rejected by {plugin}: {verdict.code}")
            self.tx = None
            self._verdict_reply("data", plugin, verdict)
            return
        if isinstance(verdict, v.Discard):
            incoming.discard()
            self._log_tx(conn, tx, message, f"discarded by {plugin}: {verdict.reason}")
            self.tx = None
            self.reply(f"250 2.0.0 Ok: {tx.id}")
            return
        remove_forged(message, self.hostname)
        try:
            received = (await hooks.call("received_header", session=conn, tx=tx,
                                         message=message)).value
            authres = (await hooks.call("authentication_results_header", session=conn, tx=tx,
                                        message=message, auth_results=auth_results)).value
        except HookFailure as f:
            self._reject_data(incoming, tx, message, "data", f.plugin, 451, FAILURE_REPLY)
            return
        headers: list[tuple[str, str]] = []
        if received:
            headers.append(("Received", received))
        if authres:
            headers.append(("Authentication-Results", authres))
        headers.extend(conn.headers)
        headers.extend(tx.headers)
        if verdict is not None:
            headers.extend(verdict.headers)
        headers.extend(message.added)
        prepend = b"".join(f"{n}: {val}\r\n".encode("utf-8", "surrogateescape")
                           for n, val in headers)
        hold = isinstance(verdict, v.Quarantine)
        envelope = self._envelope(conn, tx, message.size + len(prepend),
                                  verdict.reason if hold else None)
        start = time.perf_counter()
        try:
            await self.ctx.spool.commit(
                incoming, envelope, prepend=prepend,
                header_block=message.header_bytes() if message.modified else None,
                state="hold" if hold else "ready")
        except Exception as e:
            log.error("session %s: spool commit of %s failed: %s", conn.id, tx.id, e)
            self._reject_data(incoming, tx, message, "spool", None, 451,
                              "451 4.3.0 Local error in processing, please try again later")
            return
        self.ctx.metrics.spool_commit.observe(time.perf_counter() - start)
        self.tx = None
        conn.transactions += 1
        await hooks.call("queued", session=conn, tx=tx, envelope=envelope)
        self.ctx.count_received(self.listener.name, message.size)
        self._log_tx(conn, tx, message, "held" if hold else "queued")
        self.reply(f"250 2.0.0 Ok: queued as {tx.id}")

    def _reject_data(self, incoming: Any, tx: Transaction, message: Message, stage: str,
                     plugin: str | None, code: int, line: str) -> None:
        incoming.discard()
        self._log_tx(self.conn, tx, message, f"temporary failure ({stage})")  # type: ignore[arg-type]
        self.tx = None
        self._count_reject(stage, plugin, code)
        self.reply(line)

    def _envelope(self, conn: Session, tx: Transaction, size: int,
                  hold_reason: str | None) -> Envelope:
        return Envelope(
            id=tx.id, sender=tx.sender, recipients=envelope_recipients(tx.recipients),
            received_at=time.time(), size=size, mail_params=dict(tx.mail_params),
            peer={"ip": conn.peer[0], "port": conn.peer[1]}, helo=conn.helo,
            listener=self.listener.name, tls=conn.tls.as_dict() if conn.tls else None,
            auth=conn.auth_user, hold_reason=hold_reason)

    def _log_tx(self, conn: Session, tx: Transaction, message: Message, outcome: str) -> None:
        log.info("%s: %s from=<%s> nrcpt=%d size=%d session=%s client=%s helo=%s tls=%s auth=%s",
                 tx.id, outcome, tx.sender, len(tx.recipients), message.size, conn.id,
                 conn.peer[0], conn.helo, conn.tls.version if conn.tls else "no",
                 conn.auth_user or "-")

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self.reply("501 5.5.4 Syntax: RSET")
            return
        self.tx = None
        self.reply("250 2.0.0 Ok")

    async def smtp_NOOP(self, arg: str | None) -> None:
        self.reply("250 2.0.0 Ok")

    async def smtp_QUIT(self, arg: str | None) -> None:
        self.reply("221 2.0.0 Bye")
        raise _Close

    async def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            self.reply("501 5.5.4 Syntax: VRFY address")
            return
        self.reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        self.reply("502 5.5.1 EXPN not supported")

    async def smtp_HELP(self, arg: str | None) -> None:
        self.reply("214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT "
                   "VRFY STARTTLS AUTH")

_COMMANDS: dict[str, Callable[[ElemtaSMTP, str | None], Awaitable[None]]] = {
    name[5:]: getattr(ElemtaSMTP, name) for name in dir(ElemtaSMTP)
    if name.startswith("smtp_") and name[5:].isupper()
}


def envelope_recipients(recipients: list[Recipient]) -> list[RecipientState]:
    """The envelope's recipients: rewritten ones expanded, each address once."""
    out: list[RecipientState] = []
    seen: set[str] = set()
    for r in recipients:
        if r.deliver_to is None:
            key = r.address.lower()
            if key not in seen:
                seen.add(key)
                out.append(RecipientState(r.address, dict(r.params)))
            continue
        for a in r.deliver_to:
            key = a.lower()
            if key not in seen:
                seen.add(key)
                out.append(RecipientState(a, dict(r.params), original=r.address))
    return out
