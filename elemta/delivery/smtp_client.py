"""The outbound SMTP client: one connection to one address of an MX host, reused for many messages.

The same client speaks LMTP (RFC 2033) to a local delivery agent such as
Dovecot, over TCP or a unix socket: :meth:`SMTPConnection.open_lmtp`.

The caller has already resolved the MX and picked an address; this module never
resolves the names of mail hosts (``ip`` must be an IP literal), so every lookup
goes through the one shared resolver (an LMTP server's host name, a local
service, is left to the operating system). ``mx_host`` is the name the
certificate is checked against, the SNI, and the name in logs and results
(``mx.example[192.0.2.1]:25``).

It is a small client of its own on asyncio streams rather than a wrapper around
aiosmtplib. aiosmtplib does not pipeline (four round trips per message instead
of two), does not add SMTPUTF8 or BODY=8BITMIME for raw bytes and does not wrap
long lines; even without any of that it took about twice the CPU per message
(``bench/smtp_client.py`` measures both on the same load).

Behaviour worth knowing:

* **Per-recipient outcome, not exceptions.** :meth:`SMTPConnection.send` returns
  one :class:`RecipientResult` per recipient: the RCPT reply for a rejected
  recipient, the end-of-DATA reply for the accepted ones. A lost connection or
  a timeout becomes a temporary result for every recipient not yet decided.
  :class:`SMTPError` is raised only while opening a connection (and by
  :meth:`SMTPConnection.reset`).
* **PIPELINING** (RFC 2920): MAIL, every RCPT and DATA go out in one write and
  the replies are read in order. When DATA gets 354 although every RCPT failed,
  the content is not sent; a lone dot ends the empty transaction.
* **STARTTLS** by :class:`TLSPolicy`: ``opportunistic`` uses TLS when offered and,
  when the handshake fails, connects again and delivers in plaintext (Postfix's
  "may"); ``required`` and ``verify`` fail temporarily instead. ``verify`` also
  checks that the certificate is valid for ``mx_host``.
* **SMTPUTF8**: a message that needs it (the ``utf8`` flag, or a non-ASCII
  address) is not sent to a server that does not offer it; its recipients get
  ``553 5.6.7`` without anything being sent (RFC 6531 §3.2).
* **8-bit content without 8BITMIME is sent as it is.** RFC 6152 would have the
  client convert it; the alternative Postfix and most MTAs take is to send it
  and let the server cope, since every server met in practice accepts 8-bit
  data and a MIME down-conversion would break DKIM signatures.
* **SIZE**: the size is declared when the server advertises SIZE, and a message
  larger than the advertised limit fails with ``552 5.3.4`` without being sent.
* **Content** goes out with CRLF line ends (a bare LF or CR becomes CRLF),
  dot-stuffed, and ending in CRLF before the final dot. A line longer than 998
  octets is broken, as Postfix's ``smtp_line_length_limit`` does, by inserting
  CRLF SPACE, in headers and body alike: the space keeps a continuation from
  ever starting with a dot or looking like a MIME boundary, in a header it is
  folding. Where the line has a space or tab in its second half, the break goes
  before it and no character is added, so a folded header unfolds to the
  original. A hard break never splits a UTF-8 sequence. Files are read in
  chunks; a 20 MiB message never sits in memory whole.
* **Reuse**: after a completed transaction the server has reset itself (RFC 5321
  §4.1.1.4), so the next MAIL follows directly; after an aborted one a RSET is
  pipelined in front of the next MAIL. A 421 reply, a lost connection or a
  timeout makes the connection unusable (:attr:`SMTPConnection.usable`).
* **Timeouts** default to RFC 5321 §4.5.3.2 and Postfix's values; tests pass
  short ones (:meth:`Timeouts.uniform`).
* Credentials are sent only over TLS unless ``allow_plaintext_auth`` is set, and
  no command or reply of the AUTH exchange is ever logged.
* **LMTP** (:meth:`SMTPConnection.open_lmtp`): LHLO instead of EHLO (and no HELO
  fallback), never STARTTLS or AUTH, a TCP address or a unix socket, and after
  the final dot one reply per accepted recipient, in RCPT order (RFC 2033
  §4.2), so each recipient gets its own end-of-data result. A connection lost
  in the middle of those replies leaves the recipients already answered with
  their reply and makes the others temporary. Everything else (pipelining,
  BODY/SMTPUTF8/SIZE, content encoding, reuse, timeouts) is as for SMTP.

A connection is for one task at a time: ``send`` must not be called again before
the previous call returned.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Literal, Self, Union

from ..models import TLSInfo

__all__ = [
    "DataEncoder",
    "DeliveryResult",
    "RecipientResult",
    "SMTPConnection",
    "SMTPError",
    "TLSPolicy",
    "Timeouts",
    "default_enhanced",
    "lmtp_remote",
]

log = logging.getLogger("elemta.delivery.smtp")

TLSMode = Literal["none", "opportunistic", "required", "verify"]
Stage = Literal["connect", "greeting", "ehlo", "lhlo", "starttls", "auth", "rset", "mail", "rcpt",
                "data", "end_of_data"]
Content = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", BinaryIO]
_Body = bytes | bytearray | memoryview | BinaryIO

LINE_LIMIT_OCTETS = 998
_READ_BYTES = 65_536
_FILE_CHUNK_BYTES = 131_072
# A line with no line break at all (a base64 blob someone forgot to wrap) is
# wrapped as it arrives instead of being collected whole.
_PARTIAL_LINE_MAX_OCTETS = 65_536
_MAX_REPLY_LINE_OCTETS = 8_192
_MAX_REPLY_LINES = 200
_TLS_MODES = ("none", "opportunistic", "required", "verify")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


# ------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """How much TLS a connection insists on.

    ``none`` never sends STARTTLS. ``opportunistic`` uses it when offered,
    without checking the certificate, and falls back to plaintext when the
    handshake fails. ``required`` fails (temporarily) when STARTTLS is not
    offered or the handshake fails, still without checking the certificate.
    ``verify`` is ``required`` plus a certificate valid for the MX host name,
    checked against ``cafile`` or, without one, the system's CAs.
    """

    mode: TLSMode = "opportunistic"
    cafile: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in _TLS_MODES:
            raise ValueError(f"TLS mode must be one of {', '.join(_TLS_MODES)}, not {self.mode!r}")
        if self.cafile is not None and self.mode != "verify":
            raise ValueError("cafile is only used by TLS mode 'verify'")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait for each step; the defaults are RFC 5321 §4.5.3.2 and Postfix's."""

    connect_seconds: float = 30.0
    greeting_seconds: float = 300.0
    ehlo_seconds: float = 300.0
    starttls_seconds: float = 300.0
    auth_seconds: float = 120.0
    mail_seconds: float = 300.0
    rcpt_seconds: float = 300.0
    data_init_seconds: float = 120.0
    data_block_seconds: float = 180.0
    data_done_seconds: float = 600.0
    rset_seconds: float = 20.0
    quit_seconds: float = 5.0

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """The same limit for every step (tests, probes)."""
        return cls(**{f.name: seconds for f in dataclasses.fields(cls)})

    @classmethod
    def scaled(cls, connect: float, command: float) -> Timeouts:
        """RFC 5321's per-step limits scaled so that the 5-minute ones become ``command``.

        The wait after the final dot keeps its longer share (10 minutes at
        300 s): that is when the server delivers (Sieve, quota checks, filters).
        """
        defaults = cls()
        scale = command / 300.0
        return cls(**{f.name: getattr(defaults, f.name) * scale
                      for f in dataclasses.fields(cls) if f.name != "connect_seconds"},
                   connect_seconds=connect)


# ------------------------------------------------------------------ results


def default_enhanced(code: int) -> str:
    """An enhanced status for a reply that had none (RFC 3463 class only)."""
    return {2: "2.0.0", 4: "4.0.0"}.get(code // 100, "5.0.0")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome for one recipient.

    ``code``/``enhanced``/``text`` are the server's reply at ``stage`` (``rcpt``
    for a rejected recipient, ``end_of_data`` for a delivered one: under LMTP
    the reply for this recipient alone), or, when
    ``local`` is true, a reply this client made up because the server never gave
    one (lost connection, timeout, SMTPUTF8 or SIZE refusal). ``text`` joins the
    lines of a multi-line reply with a space.
    """

    recipient: str
    code: int
    enhanced: str | None
    text: str
    stage: Stage
    local: bool = False

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def temporary(self) -> bool:
        return not self.delivered and not self.permanent

    def reply(self) -> str:
        """The reply as the server sent it, for logs and DSN Diagnostic-Code fields."""
        return " ".join(filter(None, (str(self.code), self.enhanced, self.text)))


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What one :meth:`SMTPConnection.send` achieved.

    ``results`` is in the order the recipients were given. ``remote`` is
    ``mx_host[ip]:port``, ``tls`` the protocol version if the connection is
    encrypted. ``stale`` is true when the connection turned out to be dead
    before the server answered MAIL: nothing of the message can have been
    accepted, so it can be tried again at once on a fresh connection.
    """

    results: list[RecipientResult]
    remote: str
    tls: str | None
    stale: bool = False

    @property
    def delivered(self) -> list[RecipientResult]:
        return [r for r in self.results if r.delivered]

    @property
    def failed(self) -> list[RecipientResult]:
        return [r for r in self.results if not r.delivered]


class SMTPError(Exception):
    """The connection could not be opened or used; nothing was delivered through it.

    ``code`` is the server's reply code, or a code made up by this client when
    ``local`` is true (no reply: refused connection, timeout, failed TLS). A 535
    to AUTH is permanent; everything but a 5xx reply is temporary.
    """

    def __init__(self, code: int, enhanced: str | None, text: str, *, stage: Stage,
                 local: bool = False) -> None:
        super().__init__(" ".join(filter(None, (str(code), enhanced, text))))
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.stage = stage
        self.local = local

    @property
    def temporary(self) -> bool:
        return not 500 <= self.code < 600

    def result_for(self, recipient: str) -> RecipientResult:
        """This error as the outcome for one recipient of a message that could not be sent."""
        return RecipientResult(recipient, self.code, self.enhanced, self.text, self.stage,
                               self.local)


# ------------------------------------------------------------------ replies


class _Reply:
    __slots__ = ("code", "enhanced", "lines")

    def __init__(self, code: int, enhanced: str | None, lines: list[str]) -> None:
        self.code = code
        self.enhanced = enhanced
        self.lines = lines

    @property
    def text(self) -> str:
        return self.lines[0] if len(self.lines) == 1 else " ".join(self.lines)

    def result(self, recipient: str, stage: Stage) -> RecipientResult:
        return RecipientResult(recipient, self.code, self.enhanced, self.text, stage)

    def error(self, stage: Stage) -> SMTPError:
        return SMTPError(self.code, self.enhanced, self.text, stage=stage)


class _Lost(Exception):
    """The conversation ended without a reply: connection lost, timeout, garbage."""

    def __init__(self, what: str, timed_out: bool = False) -> None:
        super().__init__(what)
        self.timed_out = timed_out


def _parse_reply(raw: list[bytes]) -> _Reply:
    code_bytes = raw[0][:3]
    if not code_bytes.isdigit() or code_bytes[:1] not in b"2345":
        raise _Lost("received a malformed reply")
    lines = []
    for line in raw:
        if line[:3] != code_bytes:
            raise _Lost("received a malformed reply")
        lines.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
    enhanced = None
    first = lines[0]
    # The enhanced code's class must agree with the reply's (RFC 3463 §2).
    if first[1:2] == "." and first[:1] == chr(code_bytes[0]):
        match = _ENHANCED.match(first)
        if match is not None:
            enhanced = match.group(0).rstrip()
            cut = len(match.group(0))
            lines = [line[cut:] if line.startswith(enhanced) else line for line in lines]
    return _Reply(int(code_bytes), enhanced, lines)


# ------------------------------------------------------------------ DATA encoding


class DataEncoder:
    """Message content as it goes on the wire after DATA.

    ``feed`` any number of chunks, then ``finish``; together the outputs are the
    content with CRLF line ends, dot-stuffed, no line longer than 998 octets,
    ending in CRLF and the final dot. Chunks may split a line, or a CRLF, anywhere.
    """

    __slots__ = ("_cr", "_partial")

    def __init__(self) -> None:
        self._partial = b""  # an unfinished line, already dot-stuffed
        self._cr = False     # the last chunk ended in CR: the line end depends on what follows

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk[-1:] == b"\r"
        if self._cr:
            chunk = chunk[:-1]
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        out = b""
        if self._partial:
            end = chunk.find(b"\r\n")
            if end < 0:
                return self._grow_partial(chunk)
            out = _wrap(self._partial + chunk[:end]) + b"\r\n"
            self._partial = b""
            chunk = chunk[end + 2:]
        cut = chunk.rfind(b"\r\n") + 2
        if cut < 2:
            return out + self._grow_partial(chunk) if chunk else out
        lines, rest = chunk[:cut], chunk[cut:]
        if (lines[:1] == b"." or b"\n." in lines
                or (cut > LINE_LIMIT_OCTETS and max(map(len, lines.split(b"\r\n"))) > LINE_LIMIT_OCTETS)):
            lines = _transparent(lines)
        if rest:
            out += lines
            return out + self._grow_partial(rest)
        return out + lines if out else lines

    def finish(self) -> bytes:
        if self._partial or self._cr:
            tail = _wrap(self._partial) + b"\r\n.\r\n"
        else:
            tail = b".\r\n"
        self._partial = b""
        self._cr = False
        return tail

    def _grow_partial(self, more: bytes) -> bytes:
        """Add to the unfinished line; emit what can already be wrapped of a long one."""
        partial = self._partial + more if self._partial else (b"." + more if more[:1] == b"." else more)
        if len(partial) <= _PARTIAL_LINE_MAX_OCTETS:
            self._partial = partial
            return b""
        wrapped = _wrap(partial)
        split = wrapped.rfind(b"\r\n")
        # The last piece stays: more of its line may follow. It starts with a
        # space or tab, so it is never dot-stuffed again.
        self._partial = wrapped[split + 2:]
        return wrapped[:split + 2]


def _transparent(lines: bytes) -> bytes:
    """Dot-stuff and wrap complete CRLF-terminated lines (the slow path)."""
    out = []
    for line in lines.split(b"\r\n")[:-1]:
        if line[:1] == b".":
            line = b"." + line
        if len(line) > LINE_LIMIT_OCTETS:
            line = _wrap(line)
        out.append(line)
    out.append(b"")
    return b"\r\n".join(out)


def _wrap(line: bytes) -> bytes:
    if len(line) <= LINE_LIMIT_OCTETS:
        return line
    pieces = []
    limit = LINE_LIMIT_OCTETS
    while len(line) > limit:
        blank = max(line.rfind(b" ", limit // 2, limit + 1), line.rfind(b"\t", limit // 2, limit + 1))
        if blank > 0:
            pieces.append(line[:blank])
            line = line[blank:]
            continue
        cut = limit
        while cut > limit - 3 and 0x80 <= line[cut] < 0xC0:
            cut -= 1
        pieces.append(line[:cut])
        line = b" " + line[cut:]
    pieces.append(line)
    return b"\r\n".join(pieces)


# ------------------------------------------------------------------ TLS contexts


@functools.lru_cache(maxsize=16)
def _client_context(verify: bool, cafile: str | None) -> ssl.SSLContext:
    # Cached: loading the system CA store takes milliseconds, and every
    # connection would otherwise do it. A changed cafile needs a restart.
    if verify:
        return ssl.create_default_context(cafile=cafile)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# ------------------------------------------------------------------ the connection


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
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = bytearray()
        self._closing: _Reply | None = None   # a 421 received: every later reply is this one
        self._broken = False
        self._needs_rset = False
        self._busy = False
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
        except _Lost as lost:
            self._abort()
            raise self._lost_error(lost, self._stage) from None
        except BaseException:
            self._abort()
            raise

    async def _start(self) -> None:
        self._stage = "connect"
        try:
            async with asyncio.timeout(self.timeouts.connect_seconds):
                if self.path is not None:
                    self._reader, self._writer = await asyncio.open_unix_connection(
                        self.path, limit=_READ_BYTES)
                else:
                    self._reader, self._writer = await asyncio.open_connection(
                        self.ip, self.port, limit=_READ_BYTES,
                        local_addr=(self.local_address, 0) if self.local_address else None)
        except TimeoutError:
            raise SMTPError(451, "4.4.1", f"connect to {self.remote}: timed out",
                            stage="connect", local=True) from None
        except OSError as exc:
            raise SMTPError(451, "4.4.1", f"connect to {self.remote}: {exc.strerror or exc}",
                            stage="connect", local=True) from None
        self._stage = "greeting"
        greeting = await self._read_reply(self.timeouts.greeting_seconds,
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
        self._write(b"EHLO " + helo + b"\r\n")
        reply = await self._read_reply(self.timeouts.ehlo_seconds, "sending EHLO")
        if reply.code == 250:
            self.extensions = _extensions(reply.lines[1:])
            return
        if reply.code // 100 != 5 or self._closing is not None:
            raise reply.error("ehlo")
        self._write(b"HELO " + helo + b"\r\n")
        reply = await self._read_reply(self.timeouts.ehlo_seconds, "sending HELO")
        if reply.code != 250:
            raise reply.error("ehlo")
        self.extensions = {}

    async def _lhlo(self, name: bytes) -> None:
        # RFC 2033 §4.1: LHLO is the only greeting; there is no HELO to fall back to.
        self._stage = "lhlo"
        self._write(b"LHLO " + name + b"\r\n")
        reply = await self._read_reply(self.timeouts.ehlo_seconds, "sending LHLO")
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
        self._write(b"STARTTLS\r\n")
        reply = await self._read_reply(self.timeouts.starttls_seconds, "sending STARTTLS")
        if reply.code != 220:
            if self._closing is not None:
                raise reply.error("starttls")
            if mode == "opportunistic":
                self.tls_failure = f"STARTTLS refused: {reply.code} {reply.text}"
                log.info("%s: %s; continuing without TLS", self.remote, self.tls_failure)
                return
            raise SMTPError(451, "4.7.4", f"TLS is required, but {self.remote} answered STARTTLS "
                            f"with {reply.code} {reply.text}", stage="starttls", local=True)
        try:
            if self._buffer:
                # Anything after the 220 was sent before the handshake and would
                # be read as if it came over TLS (CVE-2011-0411 in reverse).
                raise ConnectionError("the server sent data after its STARTTLS reply")
            assert self._writer is not None
            context = _client_context(mode == "verify", self.policy.cafile)
            async with asyncio.timeout(self.timeouts.starttls_seconds):
                await self._writer.start_tls(context, server_hostname=self.mx_host)
        except (OSError, TimeoutError, EOFError) as exc:
            reason = _tls_reason(exc)
            self._abort()
            if mode != "opportunistic":
                raise SMTPError(451, "4.7.5", f"TLS with {self.remote} failed: {reason}",
                                stage="starttls", local=True) from None
            self.tls_failure = f"TLS handshake failed: {reason}"
            log.warning("%s: %s; connecting again without TLS", self.remote, self.tls_failure)
            self._broken = False
            self._closing = None
            self._buffer.clear()
            await self._start()
            return
        ssl_object = self._writer.get_extra_info("ssl_object")
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
            self._write(b"AUTH PLAIN " + token + b"\r\n")
            reply = await self._read_reply(self.timeouts.auth_seconds, what)
        elif "LOGIN" in mechanisms:
            self._write(b"AUTH LOGIN\r\n")
            reply = await self._read_reply(self.timeouts.auth_seconds, what)
            for secret in (secret_user, secret_password):
                if reply.code != 334:
                    break
                self._write(base64.b64encode(secret) + b"\r\n")
                reply = await self._read_reply(self.timeouts.auth_seconds, what)
        else:
            offered = " ".join(mechanisms) or "none"
            raise SMTPError(451, "4.7.0", f"{self.remote} offers no AUTH mechanism this client "
                            f"supports (PLAIN, LOGIN); offered: {offered}", stage="auth", local=True)
        if reply.code == 334:
            # A challenge we cannot answer (a server treating the initial
            # response as absent); "*" cancels the exchange (RFC 4954 §4).
            self._write(b"*\r\n")
            reply = await self._read_reply(self.timeouts.auth_seconds, what)
            raise SMTPError(451, "4.7.0", f"AUTH exchange with {self.remote} did not complete: "
                            f"{reply.code} {reply.text}", stage="auth", local=True)
        if reply.code != 235:
            raise reply.error("auth")
        self.authenticated_as = user

    # -------------------------------------------------------------- state

    @property
    def usable(self) -> bool:
        """Whether another message may be sent over this connection."""
        return self._writer is not None and not self._broken and self._closing is None

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
                   size: int | None = None) -> DeliveryResult:
        """Send one message to ``recipients``; never raises for what the server or network did.

        ``sender`` is the bare reverse-path (``""`` for the null sender).
        ``content`` is the message as bytes, a path to read it from, or a binary
        file object positioned at its start. ``utf8``: the message needs
        SMTPUTF8 (non-ASCII addresses imply it). ``eight_bit``: the content has
        8-bit octets (declared with BODY=8BITMIME when the server offers it).
        ``size``: the message size for SIZE; taken from bytes or the file if None.

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
                return await self._send_once(sender, rcpts, stream, utf8, eight_bit, size)
        return await self._send_once(sender, rcpts, content, utf8, eight_bit, size)

    async def _send_once(self, sender: str, rcpts: list[str], content: _Body, utf8: bool,
                         eight_bit: bool, size: int | None) -> DeliveryResult:
        self._busy = True
        try:
            return await self._send(sender, rcpts, content, utf8, eight_bit, size)
        except BaseException:
            # Cancelled, or the content could not be read: where the
            # conversation stood is unknown, so it is never reused.
            self._abort()
            raise
        finally:
            self._busy = False

    async def _send(self, sender: str, rcpts: list[str], content: _Body, utf8: bool,
                    eight_bit: bool, size: int | None) -> DeliveryResult:
        results: list[RecipientResult | None] = [None] * len(rcpts)
        ext = self.extensions
        if size is None and isinstance(content, (bytes, bytearray, memoryview)):
            size = len(content)
        ascii_only = sender.isascii() and all(map(str.isascii, rcpts))
        utf8 = utf8 or not ascii_only
        refusal = self._refusal(sender, rcpts, utf8, size)
        if refusal is not None:
            return self._result(refusal)
        params = ""
        if size is not None and "SIZE" in ext:
            params += f" SIZE={size}"
        if (eight_bit or utf8) and "8BITMIME" in ext:
            params += " BODY=8BITMIME"
        if utf8:
            params += " SMTPUTF8"
        encoding = "ascii" if ascii_only else "utf-8"
        mail = f"MAIL FROM:<{sender}>{params}\r\n".encode(encoding)
        rcpt_lines = [f"RCPT TO:<{rcpt}>\r\n".encode(encoding) for rcpt in rcpts]

        accepted: list[int] = []
        stage: Stage = "mail"
        answered = dot_sent = False
        try:
            if "PIPELINING" in ext:
                rset, self._needs_rset = self._needs_rset, True
                self._write(b"".join([b"RSET\r\n" if rset else b"", mail, *rcpt_lines, b"DATA\r\n"]))
                if rset:
                    await self._read_reply(self.timeouts.rset_seconds, "sending RSET")
                mail_reply = await self._read_reply(self.timeouts.mail_seconds, "sending MAIL FROM")
                # A 421 here is most often a server that closed the idle connection.
                answered = mail_reply.code != 421
                stage = "rcpt"
                rcpt_replies = [await self._read_reply(self.timeouts.rcpt_seconds, "sending RCPT TO")
                                for _ in rcpts]
                stage = "data"
                data_reply = await self._read_reply(self.timeouts.data_init_seconds, "sending DATA")
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
                    self._write(b"RSET\r\n")
                    await self._read_reply(self.timeouts.rset_seconds, "sending RSET")
                self._needs_rset = True
                self._write(mail)
                mail_reply = await self._read_reply(self.timeouts.mail_seconds, "sending MAIL FROM")
                answered = mail_reply.code != 421
                if mail_reply.code // 100 != 2:
                    return self._result([mail_reply.result(rcpt, "mail") for rcpt in rcpts],
                                        stale=not answered)
                stage = "rcpt"
                for index, line in enumerate(rcpt_lines):
                    self._write(line)
                    reply = await self._read_reply(self.timeouts.rcpt_seconds, "sending RCPT TO")
                    if reply.code // 100 == 2:
                        accepted.append(index)
                    else:
                        results[index] = reply.result(rcpts[index], "rcpt")
                if not accepted:
                    return self._result(results)
                stage = "data"
                self._write(b"DATA\r\n")
                data_reply = await self._read_reply(self.timeouts.data_init_seconds, "sending DATA")

            if data_reply.code != 354:
                for index in accepted:
                    results[index] = data_reply.result(rcpts[index], "data")
                return self._result(results, stale=not answered)
            stage = "end_of_data"
            if not accepted:
                if self.lmtp:
                    # RFC 2033 §4.2 forbids this 354, and how many replies a dot
                    # would get is anyone's guess: the connection cannot go on.
                    self._abort()
                    return self._result(results)
                # RFC 2920 §3.1: DATA was accepted although no recipient was;
                # end the empty transaction without sending the content.
                self._write(b".\r\n")
                await self._read_reply(self.timeouts.data_done_seconds, "sending end of data")
                return self._result(results)
            await self._send_content(content)
            dot_sent = True
            if self.lmtp:
                await self._lmtp_replies(rcpts, accepted, results)
            else:
                final = await self._read_reply(self.timeouts.data_done_seconds,
                                               "sending end of data")
                for index in accepted:
                    results[index] = final.result(rcpts[index], "end_of_data")
            self._needs_rset = False
            self.transactions += 1
            return self._result(results)
        except _Lost as lost:
            if dot_sent:
                lost = _Lost(f"{lost} -- message may be sent more than once", lost.timed_out)
            error = self._lost_error(lost, stage)
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
            reply = await self._read_reply(self.timeouts.data_done_seconds,
                                           f"waiting for the reply for <{rcpts[index]}>")
            results[index] = reply.result(rcpts[index], "end_of_data")

    def _refusal(self, sender: str, rcpts: list[str], utf8: bool,
                 size: int | None) -> list[RecipientResult] | None:
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
            return [RecipientResult(rcpt, 553, "5.6.7", f"the message needs SMTPUTF8, which "
                                    f"{self.remote} does not support", "mail", local=True)
                    for rcpt in rcpts]
        limit = self.size_limit
        if limit is not None and size is not None and size > limit:
            return [RecipientResult(rcpt, 552, "5.3.4", f"message size {size} exceeds the size "
                                    f"limit {limit} of {self.remote}", "mail", local=True)
                    for rcpt in rcpts]
        return None

    def _result(self, results: list[RecipientResult | None] | list[RecipientResult], *,
                stale: bool = False) -> DeliveryResult:
        return DeliveryResult(results, self.remote,  # type: ignore[arg-type]
                              self.tls.version if self.tls else None, stale)

    async def _send_content(self, content: _Body) -> None:
        encoder = DataEncoder()
        if isinstance(content, (bytes, bytearray, memoryview)):
            self._write(encoder.feed(bytes(content)) + encoder.finish())
            await self._drain()
        else:
            await self._stream(content, encoder)

    async def _stream(self, stream: BinaryIO, encoder: DataEncoder) -> None:
        # Reads are synchronous: the content is a spool file on a local disk,
        # normally still in the page cache; a 128 KiB read costs less than
        # handing it to a thread.
        while chunk := stream.read(_FILE_CHUNK_BYTES):
            encoded = encoder.feed(chunk)
            if encoded:
                self._write(encoded)
                await self._drain()
        self._write(encoder.finish())
        await self._drain()

    async def reset(self) -> None:
        """Send RSET and wait for 250: aborts a transaction and checks that a cached connection is alive.

        Raises :class:`SMTPError` (and the connection becomes unusable) when it is not.
        """
        try:
            self._write(b"RSET\r\n")
            reply = await self._read_reply(self.timeouts.rset_seconds, "sending RSET")
        except _Lost as lost:
            raise self._lost_error(lost, "rset") from None
        if reply.code != 250:
            self._broken = True
            raise reply.error("rset")
        self._needs_rset = False

    async def close(self) -> None:
        """QUIT (when the connection is still in a state to say it) and close; never raises."""
        writer = self._writer
        if writer is None:
            return
        if not self._broken and self._closing is None:
            try:
                self._write(b"QUIT\r\n")
                await self._read_reply(self.timeouts.quit_seconds, "sending QUIT")
            except _Lost:
                pass
        self._writer = None
        self._broken = True
        writer.close()
        try:
            async with asyncio.timeout(self.timeouts.quit_seconds):
                await writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            writer.transport.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -------------------------------------------------------------- wire

    def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or self._broken or writer.transport.is_closing():
            self._broken = True
            raise _Lost("the connection was already closed")
        writer.write(data)

    async def _drain(self) -> None:
        writer = self._writer
        assert writer is not None
        if writer.transport.get_write_buffer_size():
            try:
                async with asyncio.timeout(self.timeouts.data_block_seconds):
                    await writer.drain()
            except TimeoutError:
                self._abort()
                raise _Lost("sending message content", timed_out=True) from None
            except (OSError, EOFError):
                self._abort()
                raise _Lost("sending message content") from None

    async def _read_reply(self, timeout: float, what: str) -> _Reply:
        if self._closing is not None:
            return self._closing
        raw: list[bytes] = []
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n")
            while end < 0:
                if len(buffer) > _MAX_REPLY_LINE_OCTETS:
                    self._abort()
                    raise _Lost(what + ": reply line too long")
                await self._fill(timeout, what)
                end = buffer.find(b"\n")
            line = bytes(buffer[:end + 1])
            del buffer[:end + 1]
            raw.append(line)
            if line[3:4] != b"-":
                break
            if len(raw) > _MAX_REPLY_LINES:
                self._abort()
                raise _Lost(what + ": reply too long")
        try:
            reply = _parse_reply(raw)
        except _Lost:
            self._abort()
            raise _Lost(what + ": malformed reply") from None
        if reply.code == 421:
            self._closing = reply
        return reply

    async def _fill(self, timeout: float, what: str) -> None:
        reader = self._reader
        if reader is None or self._broken:
            raise _Lost(what)
        try:
            async with asyncio.timeout(timeout):
                data = await reader.read(_READ_BYTES)
        except TimeoutError:
            self._abort()
            raise _Lost(what, timed_out=True) from None
        except (OSError, EOFError):
            self._abort()
            raise _Lost(what) from None
        if not data:
            self._abort()
            raise _Lost(what)
        self._buffer += data

    def _abort(self) -> None:
        self._broken = True
        writer = self._writer
        if writer is not None:
            writer.transport.abort()

    def _lost_error(self, lost: _Lost, stage: Stage) -> SMTPError:
        if self._closing is not None:
            return self._closing.error(stage)
        verb = "conversation with" if lost.timed_out else "lost connection with"
        tail = " timed out" if lost.timed_out else ""
        return SMTPError(451, "4.4.2", f"{verb} {self.remote}{tail} while {lost}",
                         stage=stage, local=True)


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


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    return str(exc) or type(exc).__name__
