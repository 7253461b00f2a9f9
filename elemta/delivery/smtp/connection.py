"""One SMTP (or LMTP) session with a mail host: open it, send messages, close it.

The behaviour worth knowing is in this package's ``__init__``; the wire
(bytes, replies, the broken and closing states) is ``wire.py``.

Longer than 500 lines because one session's steps (connect, EHLO or LHLO,
STARTTLS with its plaintext fallback, AUTH, the pipelined transaction, LMTP's
replies per recipient) share its state and read best as one class.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
from collections.abc import Iterable
from typing import BinaryIO, Self, Union

from ...models import TLSInfo
from .encoding import DataEncoder
from .params import DSNParams
from .results import DeliveryResult, Lost, Reply, RecipientResult, SMTPError, Stage
from .settings import Timeouts, TLSPolicy, client_context, tls_reason
from .wire import Wire

log = logging.getLogger("elemta.delivery.smtp")

Content = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", BinaryIO]
_Body = bytes | bytearray | memoryview | BinaryIO

_FILE_CHUNK_BYTES = 131_072
CHUNK_BYTES = 262_144   # content per BDAT chunk (read, encoded and sent one at a time)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SMTPConnection:
    """An open, greeted (and, as the policy says, encrypted and authenticated) SMTP session.

    Or, made by :meth:`open_lmtp`, an LMTP session (``lmtp`` is true; ``path``
    is the unix socket, if it is one).
    """

    def __init__(self, ip: str, port: int, *, mx_host: str, helo: str, tls: TLSPolicy,
                 timeouts: Timeouts, local_address: str | None = None, lmtp: bool = False,
                 path: str | None = None) -> None:
        self.ip = ip
        self.port = port
        self.mx_host = mx_host
        self.helo = helo
        self.policy = tls
        self.timeouts = timeouts
        self.local_address = local_address
        self.lmtp = lmtp
        self.path = path
        self.remote = lmtp_remote(ip, port, path) if lmtp else f"{mx_host}[{ip}]:{port}"
        #: EHLO keywords (upper case) and their parameters; empty after HELO.
        self.extensions: dict[str, str] = {}
        self.tls: TLSInfo | None = None
        #: Why an opportunistic STARTTLS was given up, for logs and trace headers.
        self.tls_failure: str | None = None
        self.authenticated_as: str | None = None
        #: Transactions completed (final reply to the dot received) on this connection.
        self.transactions = 0
        self.wire = Wire(self.remote)
        self._needs_rset = False
        self._busy = False
        self._last_chunk_sent = False   # BDAT ... LAST went out: the server may hold the message
        self._stage: Stage = "connect"

    def __repr__(self) -> str:
        state = "usable" if self.usable else "unusable"
        return f"<SMTPConnection {self.remote} tls={self.tls and self.tls.version} {state}>"

    # -------------------------------------------------------------- opening

    @classmethod
    async def open(cls, ip: str, port: int, *, mx_host: str, helo: str, tls: TLSPolicy,
                   auth: tuple[str, str] | None = None, allow_plaintext_auth: bool = False,
                   timeouts: Timeouts | None = None,
                   local_address: str | None = None) -> SMTPConnection:
        """Connect, read the greeting, EHLO, STARTTLS and AUTH as asked.

        Raises :class:`SMTPError`; a refused or failed connection is temporary,
        a 5xx greeting or EHLO/HELO reply or a 535 to AUTH is permanent.
        """
        ipaddress.ip_address(ip)  # a name here would be resolved behind the shared resolver's back
        if auth is not None and tls.mode == "none" and not allow_plaintext_auth:
            raise ValueError("AUTH credentials need TLS, or allow_plaintext_auth=True")
        conn = cls(ip, port, mx_host=mx_host, helo=helo, tls=tls,
                   timeouts=timeouts or Timeouts(), local_address=local_address)
        await conn._establish(auth, allow_plaintext_auth)
        return conn

    @classmethod
    async def open_lmtp(cls, host: str | None = None, port: int = 24, *, path: str | None = None,
                        lhlo: str, timeouts: Timeouts | None = None) -> SMTPConnection:
        """Connect to the LMTP server at ``host``:``port`` or unix socket ``path``, then LHLO.

        LMTP serves a delivery agent on this host or a trusted network: no
        STARTTLS, no AUTH. ``host`` may be a name: the operating system resolves
        it (``/etc/hosts``, a container's service name), since it names a local
        service rather than a mail domain. Raises :class:`SMTPError` as
        :meth:`open` does; a missing or refused socket is ``451 4.4.1``.
        """
        if (host is None) == (path is None):
            raise ValueError("give an LMTP server's host (and port) or its unix socket path")
        conn = cls(host or "", port if path is None else 0, mx_host=host or path or "",
                   helo=lhlo, tls=TLSPolicy("none"), timeouts=timeouts or Timeouts(),
                   lmtp=True, path=path)
        await conn._establish()
        return conn

    async def _establish(self, auth: tuple[str, str] | None = None,
                         allow_plaintext_auth: bool = False) -> None:
        """Connect, greet, STARTTLS as the policy says and AUTH if asked; abort on any failure."""
        try:
            await self._start()
            if self.policy.mode != "none":
                await self._starttls()
            if auth is not None:
                await self._authenticate(auth[0], auth[1], allow_plaintext_auth)
        except Lost as lost:
            self.wire.abort()
            raise self.wire.lost_error(lost, self._stage) from None
        except BaseException:
            self.wire.abort()
            raise

    async def _start(self) -> None:
        self._stage = "connect"
        try:
            await self.wire.connect(ip=self.ip, port=self.port, path=self.path,
                                    local_address=self.local_address,
                                    timeout=self.timeouts.connect_seconds)
        except TimeoutError:
            raise SMTPError(451, "4.4.1", f"connect to {self.remote}: timed out",
                            stage="connect", local=True) from None
        except OSError as exc:
            raise SMTPError(451, "4.4.1", f"connect to {self.remote}: {exc.strerror or exc}",
                            stage="connect", local=True) from None
        self._stage = "greeting"
        greeting = await self.wire.read_reply(self.timeouts.greeting_seconds,
                                              "receiving the initial server greeting")
        if greeting.code != 220:
            raise greeting.error("greeting")
        await self._ehlo()

    async def _ehlo(self) -> None:
        helo = self.helo.encode("idna" if not self.helo.isascii() else "ascii")
        if self.lmtp:
            await self._lhlo(helo)
            return
        self._stage = "ehlo"
        self.wire.write(b"EHLO " + helo + b"\r\n")
        reply = await self.wire.read_reply(self.timeouts.ehlo_seconds, "sending EHLO")
        if reply.code == 250:
            self.extensions = _extensions(reply.lines[1:])
            return
        if reply.code // 100 != 5 or self.wire.closing is not None:
            raise reply.error("ehlo")
        self.wire.write(b"HELO " + helo + b"\r\n")
        reply = await self.wire.read_reply(self.timeouts.ehlo_seconds, "sending HELO")
        if reply.code != 250:
            raise reply.error("ehlo")
        self.extensions = {}

    async def _lhlo(self, name: bytes) -> None:
        # RFC 2033 §4.1: LHLO is the only greeting; there is no HELO to fall back to.
        self._stage = "lhlo"
        self.wire.write(b"LHLO " + name + b"\r\n")
        reply = await self.wire.read_reply(self.timeouts.ehlo_seconds, "sending LHLO")
        if reply.code != 250:
            raise reply.error("lhlo")
        self.extensions = _extensions(reply.lines[1:])

    async def _starttls(self) -> None:
        mode = self.policy.mode
        self._stage = "starttls"
        if "STARTTLS" not in self.extensions:
            if mode == "opportunistic":
                return
            raise SMTPError(451, "4.7.4", f"TLS is required, but was not offered by {self.remote}",
                            stage="starttls", local=True)
        self.wire.write(b"STARTTLS\r\n")
        reply = await self.wire.read_reply(self.timeouts.starttls_seconds, "sending STARTTLS")
        if reply.code != 220:
            if self.wire.closing is not None:
                raise reply.error("starttls")
            if mode == "opportunistic":
                self.tls_failure = f"STARTTLS refused: {reply.code} {reply.text}"
                log.info("%s: %s; continuing without TLS", self.remote, self.tls_failure)
                return
            raise SMTPError(451, "4.7.4", f"TLS is required, but {self.remote} answered STARTTLS "
                            f"with {reply.code} {reply.text}", stage="starttls", local=True)
        try:
            context = client_context(mode == "verify", self.policy.cafile)
            ssl_object = await self.wire.start_tls(context, self.mx_host,
                                                   self.timeouts.starttls_seconds)
        except (OSError, TimeoutError, EOFError) as exc:
            reason = tls_reason(exc)
            self.wire.abort()
            if mode != "opportunistic":
                raise SMTPError(451, "4.7.5", f"TLS with {self.remote} failed: {reason}",
                                stage="starttls", local=True) from None
            self.tls_failure = f"TLS handshake failed: {reason}"
            log.warning("%s: %s; connecting again without TLS", self.remote, self.tls_failure)
            await self._start()
            return
        name, _protocol, bits = ssl_object.cipher()
        self.tls = TLSInfo(version=ssl_object.version(), cipher=name, bits=bits, implicit=False)
        await self._ehlo()

    async def _authenticate(self, user: str, password: str, allow_plaintext: bool) -> None:
        self._stage = "auth"
        if self.tls is None and not allow_plaintext:
            raise SMTPError(451, "4.7.0", f"not sending credentials to {self.remote} without TLS",
                            stage="auth", local=True)
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        secret_user, secret_password = user.encode("utf-8"), password.encode("utf-8")
        what = "sending AUTH"
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + secret_user + b"\0" + secret_password)
            self.wire.write(b"AUTH PLAIN " + token + b"\r\n")
            reply = await self.wire.read_reply(self.timeouts.auth_seconds, what)
        elif "LOGIN" in mechanisms:
            self.wire.write(b"AUTH LOGIN\r\n")
            reply = await self.wire.read_reply(self.timeouts.auth_seconds, what)
            for secret in (secret_user, secret_password):
                if reply.code != 334:
                    break
                self.wire.write(base64.b64encode(secret) + b"\r\n")
                reply = await self.wire.read_reply(self.timeouts.auth_seconds, what)
        else:
            offered = " ".join(mechanisms) or "none"
            raise SMTPError(451, "4.7.0", f"{self.remote} offers no AUTH mechanism this client "
                            f"supports (PLAIN, LOGIN); offered: {offered}", stage="auth", local=True)
        if reply.code == 334:
            # A challenge we cannot answer (a server treating the initial
            # response as absent); "*" cancels the exchange (RFC 4954 §4).
            self.wire.write(b"*\r\n")
            reply = await self.wire.read_reply(self.timeouts.auth_seconds, what)
            raise SMTPError(451, "4.7.0", f"AUTH exchange with {self.remote} did not complete: "
                            f"{reply.code} {reply.text}", stage="auth", local=True)
        if reply.code != 235:
            raise reply.error("auth")
        self.authenticated_as = user

    # -------------------------------------------------------------- state

    @property
    def usable(self) -> bool:
        """Whether another message may be sent over this connection."""
        return self.wire.usable

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The server's SIZE limit in octets, or None (no SIZE, or SIZE 0 = no limit)."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    # -------------------------------------------------------------- sending

    async def send(self, sender: str, recipients: Iterable[str], content: Content, *,
                   utf8: bool = False, eight_bit: bool = False,
                   size: int | None = None, binary: bool = False, chunking: bool = False,
                   dsn: DSNParams | None = None) -> DeliveryResult:
        """Send one message to ``recipients``; never raises for what the server or network did.

        ``sender`` is the bare reverse-path (``""`` for the null sender).
        ``content`` is the message as bytes, a path to read it from, or a binary
        file object positioned at its start. ``utf8``: the message needs
        SMTPUTF8 (non-ASCII addresses imply it). ``eight_bit``: the content has
        8-bit octets (declared with BODY=8BITMIME when the server offers it).
        ``size``: the message size for SIZE; taken from bytes or the file if None.
        ``binary``: the content is ``BODY=BINARYMIME`` (sent only with BDAT to a
        server that offers BINARYMIME and CHUNKING; otherwise every recipient
        gets ``554 5.6.3`` and nothing is sent). ``chunking``: send with BDAT
        whenever the server offers CHUNKING, not only for binary content.
        ``dsn``: the RFC 3461 parameters, passed on when the server offers DSN
        (:attr:`DeliveryResult.dsn` then says so).

        A file that cannot be opened raises ``OSError`` before anything is sent;
        one that fails while being read raises it too, and the connection is
        closed since the server holds half a message.
        """
        rcpts = list(recipients)
        if not rcpts:
            raise ValueError("a message needs at least one recipient")
        if self._busy:
            raise RuntimeError(f"{self!r} is already sending a message")
        if not self.usable:
            raise RuntimeError(f"{self!r} cannot send any more messages")
        if isinstance(content, (str, os.PathLike)):
            with open(content, "rb") as stream:  # noqa: ASYNC230 -- see _stream
                if size is None:
                    size = os.fstat(stream.fileno()).st_size
                return await self._send_once(sender, rcpts, stream, utf8, eight_bit, size,
                                             _Options(binary, chunking, dsn))
        return await self._send_once(sender, rcpts, content, utf8, eight_bit, size,
                                     _Options(binary, chunking, dsn))

    async def _send_once(self, sender: str, rcpts: list[str], content: _Body, utf8: bool,
                         eight_bit: bool, size: int | None, options: _Options) -> DeliveryResult:
        self._busy = True
        try:
            return await self._send(sender, rcpts, content, utf8, eight_bit, size, options)
        except BaseException:
            # Cancelled, or the content could not be read: where the
            # conversation stood is unknown, so it is never reused.
            self.wire.abort()
            raise
        finally:
            self._busy = False

    async def _send(self, sender: str, rcpts: list[str], content: _Body, utf8: bool,
                    eight_bit: bool, size: int | None, options: _Options) -> DeliveryResult:
        results: list[RecipientResult | None] = [None] * len(rcpts)
        ext = self.extensions
        binary = options.binary
        if size is None and isinstance(content, (bytes, bytearray, memoryview)):
            size = len(content)
        ascii_only = sender.isascii() and all(map(str.isascii, rcpts))
        utf8 = utf8 or not ascii_only
        refusal = self._refusal(sender, rcpts, utf8, size, binary)
        if refusal is not None:
            return self._result(refusal)
        bdat = "CHUNKING" in ext and not self.lmtp and (binary or options.chunking)
        dsn = options.dsn if "DSN" in ext else None
        params = ""
        if size is not None and "SIZE" in ext:
            params += f" SIZE={size}"
        if binary:
            params += " BODY=BINARYMIME"
        elif (eight_bit or utf8) and "8BITMIME" in ext:
            params += " BODY=8BITMIME"
        if utf8:
            params += " SMTPUTF8"
        if dsn is not None:
            params += dsn.mail(utf8)
        encoding = "utf-8" if utf8 else "ascii"
        mail = f"MAIL FROM:<{sender}>{params}\r\n".encode(encoding)
        rcpt_lines = [f"RCPT TO:<{rcpt}>{dsn.rcpt(i, utf8) if dsn else ''}\r\n".encode(encoding)
                      for i, rcpt in enumerate(rcpts)]
        data_command = b"" if bdat else b"DATA\r\n"

        accepted: list[int] = []
        stage: Stage = "mail"
        answered = dot_sent = False
        try:
            if "PIPELINING" in ext:
                rset, self._needs_rset = self._needs_rset, True
                self.wire.write(b"".join([b"RSET\r\n" if rset else b"", mail, *rcpt_lines,
                                          data_command]))
                if rset:
                    await self.wire.read_reply(self.timeouts.rset_seconds, "sending RSET")
                mail_reply = await self.wire.read_reply(self.timeouts.mail_seconds, "sending MAIL FROM")
                # A 421 here is most often a server that closed the idle connection.
                answered = mail_reply.code != 421
                stage = "rcpt"
                rcpt_replies = [await self.wire.read_reply(self.timeouts.rcpt_seconds, "sending RCPT TO")
                                for _ in rcpts]
                stage = "data"
                if not bdat:
                    data_reply = await self.wire.read_reply(self.timeouts.data_init_seconds,
                                                            "sending DATA")
                if mail_reply.code // 100 != 2:
                    results = [mail_reply.result(rcpt, "mail") for rcpt in rcpts]
                    rcpt_replies = []
                for index, reply in enumerate(rcpt_replies):
                    if reply.code // 100 == 2:
                        accepted.append(index)
                    else:
                        results[index] = reply.result(rcpts[index], "rcpt")
            else:
                if self._needs_rset:
                    self.wire.write(b"RSET\r\n")
                    await self.wire.read_reply(self.timeouts.rset_seconds, "sending RSET")
                self._needs_rset = True
                self.wire.write(mail)
                mail_reply = await self.wire.read_reply(self.timeouts.mail_seconds, "sending MAIL FROM")
                answered = mail_reply.code != 421
                if mail_reply.code // 100 != 2:
                    return self._result([mail_reply.result(rcpt, "mail") for rcpt in rcpts],
                                        stale=not answered)
                stage = "rcpt"
                for index, line in enumerate(rcpt_lines):
                    self.wire.write(line)
                    reply = await self.wire.read_reply(self.timeouts.rcpt_seconds, "sending RCPT TO")
                    if reply.code // 100 == 2:
                        accepted.append(index)
                    else:
                        results[index] = reply.result(rcpts[index], "rcpt")
                if not accepted:
                    return self._result(results)
                stage = "data"
                if not bdat:
                    self.wire.write(b"DATA\r\n")
                    data_reply = await self.wire.read_reply(self.timeouts.data_init_seconds,
                                                            "sending DATA")

            if bdat:
                if not accepted:
                    return self._result(results, stale=not answered)
                stage = "end_of_data"
                final, dot_sent = await self._send_chunks(content, binary)
                for index in accepted:
                    results[index] = final.result(rcpts[index], "end_of_data")
                if final.code // 100 == 2:
                    self._needs_rset = False
                    self.transactions += 1
                return self._result(results, dsn=dsn is not None)
            if data_reply.code != 354:
                for index in accepted:
                    results[index] = data_reply.result(rcpts[index], "data")
                return self._result(results, stale=not answered)
            stage = "end_of_data"
            if not accepted:
                if self.lmtp:
                    # RFC 2033 §4.2 forbids this 354, and how many replies a dot
                    # would get is anyone's guess: the connection cannot go on.
                    self.wire.abort()
                    return self._result(results)
                # RFC 2920 §3.1: DATA was accepted although no recipient was;
                # end the empty transaction without sending the content.
                self.wire.write(b".\r\n")
                await self.wire.read_reply(self.timeouts.data_done_seconds, "sending end of data")
                return self._result(results)
            await self._send_content(content)
            dot_sent = True
            if self.lmtp:
                await self._lmtp_replies(rcpts, accepted, results)
            else:
                final = await self.wire.read_reply(self.timeouts.data_done_seconds,
                                               "sending end of data")
                for index in accepted:
                    results[index] = final.result(rcpts[index], "end_of_data")
            self._needs_rset = False
            self.transactions += 1
            return self._result(results, dsn=dsn is not None)
        except Lost as lost:
            if dot_sent or self._last_chunk_sent:
                lost.note = " -- message may be sent more than once"
            error = self.wire.lost_error(lost, stage)
            for index, result in enumerate(results):
                if result is None:
                    results[index] = error.result_for(rcpts[index])
            return self._result(results, stale=not answered)

    async def _lmtp_replies(self, rcpts: list[str], accepted: list[int],
                            results: list[RecipientResult | None]) -> None:
        """RFC 2033 §4.2: one reply per accepted recipient, in RCPT order, each its own result.

        Each is recorded as it arrives, so a connection lost halfway keeps the
        replies already read.
        """
        for index in accepted:
            reply = await self.wire.read_reply(self.timeouts.data_done_seconds,
                                           f"waiting for the reply for <{rcpts[index]}>")
            results[index] = reply.result(rcpts[index], "end_of_data")

    def _refusal(self, sender: str, rcpts: list[str], utf8: bool,
                 size: int | None, binary: bool = False) -> list[RecipientResult] | None:
        """Results for a message this server cannot take, decided before sending anything."""
        if _CONTROL.search(sender):
            return [RecipientResult(rcpt, 553, "5.1.7", f"bad sender address syntax: {sender!r}",
                                    "mail", local=True) for rcpt in rcpts]
        if any(_CONTROL.search(rcpt) for rcpt in rcpts):
            return [RecipientResult(rcpt, 553, "5.1.3", f"bad recipient address syntax: {rcpt!r}",
                                    "rcpt", local=True) if _CONTROL.search(rcpt) else
                    RecipientResult(rcpt, 451, "4.3.0", "not sent: the message has a recipient "
                                    "with a bad address", "rcpt", local=True) for rcpt in rcpts]
        if utf8 and "SMTPUTF8" not in self.extensions:
            # RFC 6531 §3.2: never downgraded; 5.6.7 for addresses, 5.6.9 for headers alone
            if not sender.isascii() or not all(map(str.isascii, rcpts)):
                return [RecipientResult(rcpt, 553, "5.6.7", f"the message has non-ASCII "
                                        f"addresses and needs SMTPUTF8, which {self.remote} "
                                        "does not support", "mail", local=True)
                        for rcpt in rcpts]
            return [RecipientResult(rcpt, 550, "5.6.9", f"the message has UTF-8 header fields "
                                    f"and needs SMTPUTF8, which {self.remote} does not "
                                    "support", "mail", local=True) for rcpt in rcpts]
        if binary and (self.lmtp or not {"BINARYMIME", "CHUNKING"} <= self.extensions.keys()):
            # RFC 3030 §3: binary content goes only where BINARYMIME is offered; a MIME
            # conversion would break signatures, so it is returned instead.
            return [RecipientResult(rcpt, 554, "5.6.3", f"the message is BINARYMIME content, "
                                    f"which {self.remote} does not accept (no BINARYMIME and "
                                    "CHUNKING offered)", "mail", local=True) for rcpt in rcpts]
        limit = self.size_limit
        if limit is not None and size is not None and size > limit:
            return [RecipientResult(rcpt, 552, "5.3.4", f"message size {size} exceeds the size "
                                    f"limit {limit} of {self.remote}", "mail", local=True)
                    for rcpt in rcpts]
        return None

    def _result(self, results: list[RecipientResult | None] | list[RecipientResult], *,
                stale: bool = False, dsn: bool = False) -> DeliveryResult:
        return DeliveryResult(results, self.remote,  # type: ignore[arg-type]
                              self.tls.version if self.tls else None, stale, dsn)

    async def _send_chunks(self, content: _Body, binary: bool) -> tuple[Reply, bool]:
        """The content in BDAT chunks; the reply that decides, and whether all was sent.

        That reply is the first refusal of a chunk, or the reply to the last one.
        With PIPELINING the next chunk goes out before the reply to the previous
        one is read; after a refusal nothing more is sent (RFC 3030 §2).
        """
        encoder = None if binary else DataEncoder(dots=False)
        window = 2 if self.pipelining else 1
        self._last_chunk_sent = False
        unanswered = 0
        refusal: Reply | None = None
        if isinstance(content, (bytes, bytearray, memoryview)):
            view = memoryview(content)
            pieces: Iterable[bytes] = (bytes(view[i:i + CHUNK_BYTES])
                                       for i in range(0, len(view), CHUNK_BYTES))
        else:
            stream = content
            pieces = iter(lambda: stream.read(CHUNK_BYTES), b"")
        for piece in pieces:
            data = piece if encoder is None else encoder.feed(piece)
            if not data:
                continue
            self.wire.write(b"BDAT %d\r\n" % len(data) + data)
            await self.wire.drain(self.timeouts.data_block_seconds)
            unanswered += 1
            if unanswered >= window:
                reply = await self.wire.read_reply(self.timeouts.data_block_seconds,
                                                   "sending a BDAT chunk")
                unanswered -= 1
                if reply.code // 100 != 2:
                    refusal = reply
                    break
        if refusal is None:
            tail = b"" if encoder is None else encoder.finish()
            self.wire.write(b"BDAT %d LAST\r\n" % len(tail) + tail)
            self._last_chunk_sent = True
            await self.wire.drain(self.timeouts.data_block_seconds)
            unanswered += 1
        last: Reply | None = None
        while unanswered:
            unanswered -= 1
            last = await self.wire.read_reply(
                self.timeouts.data_done_seconds if not unanswered else
                self.timeouts.data_block_seconds, "sending the last BDAT chunk")
            if refusal is None and last.code // 100 != 2 and unanswered:
                refusal = last
        assert refusal is not None or last is not None
        return (refusal or last), refusal is None  # type: ignore[return-value]

    async def _send_content(self, content: _Body) -> None:
        encoder = DataEncoder()
        if isinstance(content, (bytes, bytearray, memoryview)):
            self.wire.write(encoder.feed(bytes(content)) + encoder.finish())
            await self.wire.drain(self.timeouts.data_block_seconds)
        else:
            await self._stream(content, encoder)

    async def _stream(self, stream: BinaryIO, encoder: DataEncoder) -> None:
        # Reads are synchronous: the content is a spool file on a local disk,
        # normally still in the page cache; a 128 KiB read costs less than
        # handing it to a thread. Each encoded chunk is held back until the next
        # read says whether it is the last, so that the last goes out with the
        # final dot: a message of one chunk is one send, not two.
        held = b""
        while chunk := stream.read(_FILE_CHUNK_BYTES):
            encoded = encoder.feed(chunk)
            if encoded:
                if held:
                    self.wire.write(held)
                    await self.wire.drain(self.timeouts.data_block_seconds)
                held = encoded
        self.wire.write(held + encoder.finish())
        await self.wire.drain(self.timeouts.data_block_seconds)

    async def reset(self) -> None:
        """Send RSET and wait for 250: aborts a transaction and checks that a cached connection is alive.

        Raises :class:`SMTPError` (and the connection becomes unusable) when it is not.
        """
        try:
            self.wire.write(b"RSET\r\n")
            reply = await self.wire.read_reply(self.timeouts.rset_seconds, "sending RSET")
        except Lost as lost:
            raise self.wire.lost_error(lost, "rset") from None
        if reply.code != 250:
            self.wire.broken = True
            raise reply.error("rset")
        self._needs_rset = False

    async def close(self) -> None:
        """QUIT (when the connection is still in a state to say it) and close; never raises."""
        await self.wire.quit(self.timeouts.quit_seconds)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _Options:
    """What :meth:`SMTPConnection.send` was asked beyond the basics."""

    __slots__ = ("binary", "chunking", "dsn")

    def __init__(self, binary: bool, chunking: bool, dsn: DSNParams | None) -> None:
        self.binary = binary
        self.chunking = chunking
        self.dsn = dsn


def lmtp_remote(host: str, port: int, path: str | None) -> str:
    """An LMTP server's name in results and logs: ``lmtp:unix:/path`` or ``lmtp:host:port``."""
    if path is not None:
        return f"lmtp:unix:{path}"
    return f"lmtp:[{host}]:{port}" if ":" in host else f"lmtp:{host}:{port}"


def _extensions(lines: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lines:
        keyword, _, value = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):  # pre-RFC 4954 servers
            keyword, value = "AUTH", keyword[5:] + (" " + value if value else "")
            if "AUTH" in found:
                continue
        if keyword:
            found[keyword] = value
    return found
