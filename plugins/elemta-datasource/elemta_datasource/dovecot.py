"""Passwords checked by a running Dovecot, over its authentication socket.

``[plugins.datasource.auth] source = "dovecot"`` hands every AUTH to the
authentication service of a Dovecot that already knows the users, as Postfix
does with ``smtpd_sasl_type = dovecot``. This is the client side of Dovecot's
authentication protocol, version 1 (the ``auth-client`` socket):

* handshake: the client sends ``VERSION 1 2`` and ``CPID <pid>``; Dovecot
  answers ``VERSION 1 <minor>``, one ``MECH`` line per mechanism, ``SPID``,
  ``CUID``, ``COOKIE`` and ``DONE``. A major version other than 1, or no
  ``PLAIN`` mechanism, is refused;
* each check is one ``AUTH <id> PLAIN service=smtp [secured] [lip=…] [rip=…]
  resp=<base64 of NUL login NUL password>`` line, answered by ``OK <id>
  user=…`` (the login as Dovecot spells it), ``FAIL <id> …`` (``temp`` or
  ``code=temp_fail`` when Dovecot could not decide: a temporary failure) or
  ``CONT <id>`` (never right for PLAIN with its initial response: an error).

Fields are separated by tabs, so a login or password holding a NUL, tab, CR or
LF is refused without asking Dovecot; so is one too long for Dovecot's line
limit (a line it cannot read would make it drop the connection, and every
check in flight with it).

One connection, opened at start-up (or at the first check) and kept open, is
shared by all checks: each request has its own numeric id and the replies,
read by one task, are handed to the waiting check by id. A connection that
breaks fails the checks in flight and is reopened by the next check; opening
it and each check are bounded by ``timeout_seconds``, after which the check
raises ``BackendUnavailable`` (``454 4.7.0``) and its id is forgotten, so a
late reply is dropped. Dovecot delays each failed login (``auth_failure_delay``,
2 s by default, more for an address that keeps failing), so the timeout must be
longer than that delay; a client past the timeout gets a temporary failure.

Only unix sockets are supported: the protocol carries passwords in clear
(base64), and Dovecot's ``inet_listener`` for auth has no TLS. Give Elemta's
user a listener of its own in Dovecot's configuration::

    service auth {
      unix_listener auth-elemta {
        mode = 0660
        user = elemta
      }
    }

Passwords are never logged, nor are Dovecot's replies as sent (a proxy
configuration can echo the password back in them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import re
from pathlib import Path

import pydantic
from pydantic import ConfigDict, Field

from .directory import BackendUnavailable

log = logging.getLogger("elemta.datasource")

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2
#: Longer than Dovecot's own limit for a line (16 KiB); a longer one breaks the connection.
MAX_LINE = 64 * 1024
#: Longer logins and passwords are refused without asking: the request must stay
#: well inside the 8 KiB lines of older Dovecot versions.
MAX_LOGIN_BYTES = 512
MAX_PASSWORD_BYTES = 4096
_FORBIDDEN = re.compile("[\0\t\r\n]")
_MAX_ID = 0xFFFFFFFF
_ID = re.compile(r"^[0-9]{1,10}$")
_UNESCAPE = {"0": "\0", "1": "\x01", "t": "\t", "r": "\r", "n": "\n"}
_INET = re.compile(r"^(inet:)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d+$")


def _tab_unescape(value: str) -> str:
    """A value as Dovecot's ``str_tabescape()`` wrote it (``\\x01`` + ``t`` for a tab, …)."""
    if "\x01" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "\x01" and i + 1 < len(value):
            out.append(_UNESCAPE.get(value[i + 1], value[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _strerror(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _ip(value: str | None) -> str | None:
    """``value`` as Dovecot's ``lip``/``rip`` want it; ``None`` if it is not an IP address."""
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        return None


class DovecotSettings(pydantic.BaseModel):
    """``[plugins.datasource.auth.dovecot]``: where Dovecot's authentication service listens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A unix socket of Dovecot's ``service auth`` (an ``auth-client`` listener).
    socket: Path = Path("/run/dovecot/auth-client")
    #: The service name Dovecot sees (``%s``, ``%{service}`` in its passdb settings).
    service: str = Field("smtp", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    #: How long one check may take, (re)connecting included.
    timeout_seconds: float = Field(5.0, gt=0, le=300)

    @pydantic.field_validator("socket")
    @classmethod
    def _unix_socket(cls, value: Path) -> Path:
        text = str(value)
        if text in ("", ".") or "\0" in text:
            raise ValueError("must be the path of a unix socket of Dovecot's auth service "
                             "(such as /run/dovecot/auth-client)")
        if "/" not in text and _INET.match(text):
            raise ValueError(f"{text!r} looks like a network address; only unix sockets are "
                             "supported (the protocol carries passwords in clear): add a "
                             "unix_listener to Dovecot's service auth and give its path")
        return value


class _Connection:
    """One open ``auth-client`` connection and the checks waiting for its replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 server_pid: str) -> None:
        self.reader = reader
        self.writer = writer
        self.server_pid = server_pid
        self.pending: dict[int, asyncio.Future[tuple[str, list[str]]]] = {}
        self.reader_task: asyncio.Task[None] | None = None
        self.closed = False


class DovecotPasswords:
    """A :class:`~elemta_datasource.sources.PasswordSource` answered by Dovecot's auth service."""

    writable = False

    def __init__(self, settings: DovecotSettings | None = None) -> None:
        self.settings = settings if settings is not None else DovecotSettings()
        self._where = str(self.settings.socket)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False
        self._last_id = 0
        self._connects = 0          # connections opened so far (for tests and logs)
        self._down_logged = False   # "cannot reach Dovecot" logged since the last success

    # -------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Connect and complete the handshake; ``BackendUnavailable`` if Dovecot cannot be used."""
        self._closed = False
        await self._connection()

    async def close(self) -> None:
        """Close the connection; checks in flight raise ``BackendUnavailable``."""
        self._closed = True
        task = self._connecting
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        conn = self._conn
        if conn is not None:
            self._drop(conn, "the datasource is closing", quiet=True)
            if conn.reader_task is not None:
                conn.reader_task.cancel()
                await asyncio.wait([conn.reader_task])
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.writer.wait_closed(), 1.0)

    # -------------------------------------------------------------- checking

    async def verify(self, login: str, password: str, *, peer_ip: str, secured: bool,
                     local_ip: str | None = None) -> str | None:
        """Dovecot's name for ``login`` if ``password`` is right, else ``None``.

        ``secured`` is passed on as Dovecot's ``secured`` flag, ``peer_ip`` as
        ``rip`` and ``local_ip`` as ``lip`` (they are left out if they are not
        IP addresses). ``BackendUnavailable`` when Dovecot cannot be reached,
        does not answer in time or reports a temporary failure.
        """
        credentials = self._credentials(login, password)
        if credentials is None:
            return None
        resp = base64.b64encode(credentials).decode()
        fields = [f"service={self.settings.service}"]
        if secured:
            fields.append("secured")
        lip, rip = _ip(local_ip), _ip(peer_ip)
        if lip:
            fields.append(f"lip={lip}")
        if rip:
            fields.append(f"rip={rip}")
        timeout = self.settings.timeout_seconds
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(2):
                    conn = await self._connection()
                    request_id = self._next_id(conn)
                    reply: asyncio.Future[tuple[str, list[str]]] = loop.create_future()
                    conn.pending[request_id] = reply
                    line = "\t".join(["AUTH", str(request_id), "PLAIN", *fields, f"resp={resp}"])
                    try:
                        try:
                            conn.writer.write(line.encode() + b"\n")
                            await conn.writer.drain()
                        except OSError as e:
                            # Not sent: Dovecot went away while the connection was idle,
                            # and the reader has not seen it yet. Once more, reconnecting.
                            conn.pending.pop(request_id, None)
                            self._drop(conn, _strerror(e))
                            if attempt:
                                raise BackendUnavailable(
                                    f"lost the connection to Dovecot's auth service at "
                                    f"{self._where}: {_strerror(e)}") from None
                            continue
                        command, args = await reply
                        break
                    finally:
                        conn.pending.pop(request_id, None)   # a later reply is dropped
                        if reply.done() and not reply.cancelled():
                            reply.exception()   # retrieved, even if failed by _drop()
        except TimeoutError:
            raise BackendUnavailable(f"Dovecot's auth service at {self._where} did not answer "
                                     f"within {timeout:g} s (timeout_seconds)") from None
        return self._answer(login, command, args)

    @staticmethod
    def _credentials(login: str, password: str) -> bytes | None:
        """PLAIN's response (NUL login NUL password); ``None`` if it must not be sent."""
        why = None
        if not login or _FORBIDDEN.search(login) or _FORBIDDEN.search(password):
            why = "empty, or a NUL, tab or line break in the login or password"
        else:
            try:
                # surrogateescape: the bytes the client sent, if they were not UTF-8
                user = login.encode("utf-8", "surrogateescape")
                secret = password.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                why = "not encodable"
            else:
                if len(user) > MAX_LOGIN_BYTES or len(secret) > MAX_PASSWORD_BYTES:
                    why = "login or password too long"
                else:
                    return b"\0" + user + b"\0" + secret
        log.debug("datasource: dovecot: login %r refused without asking Dovecot: %s",
                  login[:64], why)
        return None

    def _answer(self, login: str, command: str, args: list[str]) -> str | None:
        fields: dict[str, str] = {}
        flags: set[str] = set()
        for arg in args:
            key, eq, value = arg.partition("=")
            if eq:
                fields.setdefault(key, _tab_unescape(value))
            else:
                flags.add(arg)
        if command == "OK":
            user = fields.get("user") or login
            log.debug("datasource: dovecot: %r authenticated as %r", login, user)
            return user
        if command == "FAIL":
            code = fields.get("code", "")
            if "temp" in flags or code == "temp_fail":
                reason = fields.get("reason")
                raise BackendUnavailable(
                    f"Dovecot's auth service at {self._where} could not check the password of "
                    f"{login!r} now (temporary failure{': ' + reason if reason else ''}); "
                    "Dovecot's log says why")
            detail = code or next((f for f in ("user_disabled", "pass_expired", "authz")
                                   if f in flags), "")
            log.debug("datasource: dovecot: %r refused%s", login, f" ({detail})" if detail else "")
            return None
        # CONT: PLAIN's initial response holds everything, there is nothing to continue
        raise BackendUnavailable(f"Dovecot's auth service at {self._where} asked to continue "
                                 "a PLAIN authentication (CONT); this is a protocol error")

    def _next_id(self, conn: _Connection) -> int:
        """The next request id: 1 to 2³²-1, wrapping, skipping ids still in flight."""
        while True:
            self._last_id = self._last_id % _MAX_ID + 1
            if self._last_id not in conn.pending:
                return self._last_id

    # -------------------------------------------------------------- connection

    async def _connection(self) -> _Connection:
        """The open connection, or one opened now (one attempt at a time, shared)."""
        if self._closed:
            raise BackendUnavailable(f"the connection to Dovecot's auth service at "
                                     f"{self._where} is closed")
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.ensure_future(self._connect())
            task.add_done_callback(self._connect_done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                # close() stopped the attempt; this caller was not cancelled itself
                raise BackendUnavailable(f"the connection to Dovecot's auth service at "
                                         f"{self._where} is closed") from None
            raise

    def _connect_done(self, task: asyncio.Task[_Connection]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()   # retrieved: no "never retrieved" warning if nobody waits

    async def _connect(self) -> _Connection:
        timeout = self.settings.timeout_seconds
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(self._where, limit=MAX_LINE)
                server_pid = await self._handshake(reader, writer)
        except BaseException as e:
            if writer is not None:
                writer.close()
            failure = self._connect_failure(e)
            if failure is None:
                raise
            if not self._down_logged:
                log.warning("datasource: %s", failure)
                self._down_logged = True
            raise failure from None
        conn = _Connection(reader, writer, server_pid)
        conn.reader_task = asyncio.create_task(self._read_replies(conn),
                                               name=f"dovecot-auth {self._where}")
        self._conn = conn
        self._connects += 1
        self._down_logged = False
        log.info("datasource: connected to Dovecot's auth service at %s (auth process %s)",
                 self._where, server_pid or "?")
        return conn

    def _connect_failure(self, e: BaseException) -> BackendUnavailable | None:
        """What to tell about a failed connection attempt; ``None`` to let ``e`` through."""
        where, timeout = self._where, self.settings.timeout_seconds
        if isinstance(e, BackendUnavailable):
            return e
        if isinstance(e, TimeoutError):
            return BackendUnavailable(
                f"Dovecot's auth service at {where} did not complete the handshake within "
                f"{timeout:g} s (is Dovecot overloaded, or is this not its auth-client socket?)")
        if isinstance(e, FileNotFoundError):
            hint = "is Dovecot running, and is this the path of a unix_listener of its " \
                   "service auth?"
        elif isinstance(e, PermissionError):
            hint = "give Elemta's user access with a unix_listener of its own (mode, user, " \
                   "group) in Dovecot's service auth"
        elif isinstance(e, ConnectionRefusedError):
            hint = "Dovecot is not running; the socket is left over"
        elif isinstance(e, (asyncio.IncompleteReadError, ConnectionResetError,
                            BrokenPipeError)):
            return BackendUnavailable(
                f"Dovecot's auth service at {where} closed the connection during the "
                "handshake; is this its auth-client socket (auth-master and auth-userdb "
                "speak another protocol)?")
        elif isinstance(e, OSError):
            hint = ""
        else:
            return None
        reason = _strerror(e)
        return BackendUnavailable(f"cannot connect to Dovecot's auth service at {where}: "
                                  f"{reason}" + (f" ({hint})" if hint else ""))

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> str:
        """Exchange the handshake; Dovecot's auth process id."""
        writer.write(f"VERSION\t{PROTOCOL_MAJOR}\t{PROTOCOL_MINOR}\n"
                     f"CPID\t{os.getpid()}\n".encode())
        await writer.drain()
        first = await self._handshake_line(reader)
        version = first.split("\t")
        if version[0] != "VERSION" or len(version) < 2:
            raise BackendUnavailable(
                f"{self._where} does not speak Dovecot's auth protocol (it sent "
                f"{first[:40]!r} first); is this Dovecot's auth-client socket?")
        if version[1] != str(PROTOCOL_MAJOR):
            raise BackendUnavailable(
                f"Dovecot's auth service at {self._where} speaks protocol version "
                f"{'.'.join(version[1:3])}; this client speaks {PROTOCOL_MAJOR}.x")
        mechanisms: list[str] = []
        server_pid = ""
        while True:
            parts = (await self._handshake_line(reader)).split("\t")
            if parts[0] == "MECH" and len(parts) > 1:
                mechanisms.append(parts[1].upper())
            elif parts[0] == "SPID" and len(parts) > 1:
                server_pid = parts[1]
            elif parts[0] == "DONE":
                break
            # CUID and COOKIE are for login processes; anything newer is ignored
        if "PLAIN" not in mechanisms:
            raise BackendUnavailable(
                f"Dovecot's auth service at {self._where} does not offer PLAIN (it offers "
                f"{', '.join(mechanisms) or 'nothing'}); add plain to its auth_mechanisms")
        return server_pid

    async def _handshake_line(self, reader: asyncio.StreamReader) -> str:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise BackendUnavailable(f"{self._where} sent a handshake line longer than "
                                     f"{MAX_LINE} bytes; is this Dovecot's auth-client "
                                     "socket?") from None
        return line[:-1].decode("utf-8", "replace")

    async def _read_replies(self, conn: _Connection) -> None:
        """Hand each reply to the check waiting for its id, until the connection ends."""
        reason = "Dovecot closed the connection"
        try:
            while True:
                line = await conn.reader.readuntil(b"\n")
                if not self._dispatch(conn, line[:-1].decode("utf-8", "replace")):
                    reason = "Dovecot sent a reply without a valid request id"
                    break
        except asyncio.IncompleteReadError:
            pass
        except asyncio.LimitOverrunError:
            reason = f"Dovecot sent a line longer than {MAX_LINE} bytes"
        except OSError as e:
            reason = _strerror(e)
        finally:
            self._drop(conn, reason)

    def _dispatch(self, conn: _Connection, line: str) -> bool:
        """Deliver one reply line; ``False`` if the connection cannot be trusted any more."""
        parts = line.split("\t")
        if parts[0] not in ("OK", "FAIL", "CONT"):
            log.debug("datasource: dovecot: ignoring a %r line from %s", parts[0][:20],
                      self._where)
            return True
        if len(parts) < 2 or not _ID.match(parts[1]):
            return False
        reply = conn.pending.pop(int(parts[1]), None)
        if reply is None or reply.done():
            log.debug("datasource: dovecot: dropping a late %s for request %s", parts[0], parts[1])
        else:
            reply.set_result((parts[0], parts[2:]))
        return True

    def _drop(self, conn: _Connection, reason: str, quiet: bool = False) -> None:
        """Forget a broken (or closing) connection and fail the checks still waiting on it."""
        if conn.closed:
            return
        conn.closed = True
        if self._conn is conn:
            self._conn = None
        waiting = [f for f in conn.pending.values() if not f.done()]
        conn.pending.clear()
        for reply in waiting:
            reply.set_exception(BackendUnavailable(
                f"lost the connection to Dovecot's auth service at {self._where} ({reason})"))
        conn.writer.close()
        if not quiet:
            log.warning("datasource: lost the connection to Dovecot's auth service at %s (%s)%s;"
                        " it is reopened at the next login", self._where, reason,
                        f", {len(waiting)} login(s) in flight failed" if waiting else "")
