"""The LDAP password source: a password is right if the server accepts a bind with it.

::

    [plugins.datasource.auth.ldap]
    url = "ldaps://ldap.example.org"
    search_base = "ou=people,dc=example,dc=org"
    search_filter = "(&(objectClass=inetOrgPerson)(mail={login}))"
    service_dn = "cn=elemta,ou=services,dc=example,dc=org"
    service_password = { env = "ELEMTA_LDAP_PASSWORD" }

Two ways to find the user's entry:

* ``bind_dn = "uid={user},ou=people,dc=example,dc=org"``: the DN is made from
  the login and the user binds at once (one round trip, no service account);
  the canonical login is the login as typed.
* ``search_base`` (search-then-bind): ``search_filter`` finds exactly one entry
  (as ``service_dn``, or anonymously), then the user binds as that entry. The
  value of ``login_attribute`` (``mail``) becomes the canonical login, so
  ``ALICE@Example.org`` and ``alice`` can both log in as ``alice@example.org``.

``{login}`` is the login as typed, ``{user}`` its local part and ``{domain}``
the part after the last ``@``; each is escaped for where it goes (a DN value,
or a filter value), so a login cannot change the DN or the filter.

ldap3 is synchronous: every LDAP operation runs on a pool of
``max_connections`` threads, so the event loop never waits on the network and
at most that many operations are in flight. A service connection is kept
between searches (and replaced when the server dropped it); each user bind
uses a connection of its own, closed at once. A whole verification takes at
most ``timeout_seconds``.

TLS (``ldaps://`` or ``start_tls``) always verifies the certificate and the
host name, against ``ca_file`` or the system's store; there is no setting to
turn it off. Passwords are sent as their UTF-8 bytes, unchanged (no SASLprep),
as OpenLDAP's own tools and Dovecot send them.
"""

from __future__ import annotations

import ast
import asyncio
import ipaddress
import logging
import math
import re
import ssl
import string
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import ldap3
import pydantic
from ldap3.core import exceptions as ldap_errors
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn
from pydantic import ConfigDict, Field

from elemta import Secret

from .directory import BackendUnavailable

log = logging.getLogger("elemta.datasource")

PLACEHOLDERS = ("login", "user", "domain")
MAX_LOGIN_LENGTH = 256
INVALID_CREDENTIALS = 49
SIZE_LIMIT_EXCEEDED = 4
NO_SUCH_OBJECT = 32
INSUFFICIENT_ACCESS = 50
# control characters, lone surrogates (invalid UTF-8 from the client), line and
# paragraph separators: never part of a login
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_ATTRIBUTE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)$")


def _template_fields(template: str, what: str) -> frozenset[str]:
    """The placeholders of ``template``; ``ValueError`` for an unknown or malformed one."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{what}: {e} (a literal brace is written {{{{ or }}}})") from None
    fields = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            written = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"{what}: unknown placeholder {{{written}}} "
                             "(use {login}, {user} or {domain})")
        fields.add(name)
    if not fields:
        raise ValueError(f"{what} must contain {{login}}, {{user}} or {{domain}}, "
                         "or every login would find the same entry")
    return frozenset(fields)


def _parts(login: str) -> dict[str, str]:
    """The placeholders' values: ``user`` is the whole login when it has no ``@``."""
    user, at, domain = login.rpartition("@")
    if not at:
        user, domain = login, ""
    return {"login": login, "user": user, "domain": domain}


class LdapSettings(pydantic.BaseModel):
    """``[plugins.datasource.auth.ldap]``: the server and how a login finds its entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str                                   # "ldaps://ldap.example.org", "ldap://127.0.0.1:389"
    start_tls: bool = False                    # ldap:// upgraded with StartTLS
    ca_file: Path | None = None                # default: the system's trusted CAs
    bind_dn: str | None = None                 # direct bind: "uid={user},ou=people,dc=…"
    search_base: str | None = None             # or search-then-bind under this DN
    search_filter: str = "(&(objectClass=inetOrgPerson)(mail={login}))"
    service_dn: str | None = None              # who searches; none: anonymously
    service_password: Secret | None = None
    login_attribute: str | None = "mail"       # its value is the canonical login; "": as typed
    timeout_seconds: float = Field(5.0, gt=0, le=300)
    max_connections: int = Field(4, ge=1, le=256)

    @pydantic.field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v.strip())
        if parts.scheme.lower() not in ("ldap", "ldaps"):
            raise ValueError(f'url must be ldap://host[:port] or ldaps://host[:port], got {v!r} '
                             '(for example "ldaps://ldap.example.org")')
        try:
            parts.port
        except ValueError:
            raise ValueError(f"url {v!r}: the port must be a number from 1 to 65535") from None
        if not parts.hostname:
            raise ValueError(f"url {v!r} names no host (for example \"ldap://127.0.0.1:389\")")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"url {v!r}: give only scheme://host[:port]; the DNs go in "
                             "bind_dn or search_base")
        return v.strip()

    @pydantic.field_validator("bind_dn")
    @classmethod
    def _bind_dn(cls, v: str | None) -> str | None:
        if v is not None:
            _template_fields(v, "bind_dn")
            try:
                parse_dn(v.format(login="x", user="x", domain="x"), escape=True)
            except ldap_errors.LDAPException:
                raise ValueError(f"bind_dn {v!r} is not a DN (for example "
                                 '"uid={user},ou=people,dc=example,dc=org")') from None
        return v

    @pydantic.field_validator("search_base", "service_dn")
    @classmethod
    def _dn(cls, v: str | None, info: pydantic.ValidationInfo) -> str | None:
        if v is not None:
            try:
                parse_dn(v, escape=True)
            except ldap_errors.LDAPException:
                raise ValueError(f"{info.field_name} {v!r} is not a DN (for example "
                                 '"ou=people,dc=example,dc=org")') from None
        return v

    @pydantic.field_validator("login_attribute", mode="before")
    @classmethod
    def _attribute(cls, v: Any) -> Any:
        if v == "":   # TOML has no null: "" means the login as typed
            return None
        if isinstance(v, str) and not _ATTRIBUTE.match(v):
            raise ValueError(f'login_attribute {v!r} is not an attribute name (for example '
                             '"mail"; "" for the login as typed)')
        return v

    @pydantic.field_validator("search_filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        _template_fields(v, "search_filter")
        try:
            parse_filter(v.format(login="x", user="x", domain="x"), None, auto_escape=False,
                         auto_encode=False, validator=None, check_names=False)
        except ldap_errors.LDAPException:
            raise ValueError(f"search_filter {v!r} is not an LDAP filter (for example "
                             '"(&(objectClass=inetOrgPerson)(mail={login}))")') from None
        return v

    @pydantic.model_validator(mode="after")
    def _mode(self) -> "LdapSettings":
        if (self.bind_dn is None) == (self.search_base is None):
            raise ValueError(
                "set either bind_dn (bind directly as the user, for example "
                '"uid={user},ou=people,dc=example,dc=org") or search_base (search for the '
                'user\'s entry first, for example "ou=people,dc=example,dc=org")'
                + (", not both" if self.bind_dn is not None else ""))
        if self.bind_dn is not None:
            search_only = [k for k in ("search_filter", "service_dn", "service_password")
                           if k in self.model_fields_set]
            if "login_attribute" in self.model_fields_set and self.login_attribute is not None:
                search_only.append("login_attribute")
            if search_only:
                raise ValueError(f"{', '.join(search_only)}: only used with search_base; with "
                                 "bind_dn the canonical login is the login as typed")
        if (self.service_dn is None) != (self.service_password is None):
            raise ValueError("set both service_dn and service_password (the account that "
                             "searches), or neither to search anonymously")
        if self.start_tls and urlsplit(self.url).scheme.lower() == "ldaps":
            raise ValueError("start_tls is for ldap:// URLs; ldaps:// is encrypted already")
        return self


class _VerifiedTls(ldap3.Tls):
    """ldap3's TLS hook with our context: the certificate and host name are always checked."""

    def __init__(self, context: ssl.SSLContext, host: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = context
        self._host = host

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=self._host)


def _reason(e: BaseException) -> str:
    """One line about a failure (ldap3's messages never hold the password)."""
    text: Any = e
    # ldap3 wraps messages in exceptions in tuples: find the innermost text
    for _ in range(5):
        args = getattr(text, "args", None)
        if isinstance(text, tuple):
            args = text
        if not args or isinstance(text, str):
            break
        text = args[0]
        if isinstance(text, str) and text.startswith(("('", '("')) and text.endswith(",)"):
            try:
                text = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                pass
    text = " ".join(str(text).split())
    tls = "ssl" in text.lower() or isinstance(e, (ldap_errors.LDAPStartTLSError, ssl.SSLError))
    for prefix in ("socket connection error while opening: ", "wrap socket error: ",
                   "socket ssl wrapping error: "):
        text = text.replace(prefix, "")
    return ("TLS failed: " if tls else "") + (text or type(e).__name__)


def _refusal(login: str, password: str) -> str | None:
    """Why this login and password are refused without asking the server, if they are."""
    if not password:
        return "empty password (a bind without one would be anonymous)"
    if not login:
        return "empty login"
    if len(login) > MAX_LOGIN_LENGTH:
        return f"login longer than {MAX_LOGIN_LENGTH} characters"
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in login):
        return "control character or invalid UTF-8 in the login"
    try:
        password.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "password is not valid text"
    return None


class LdapPasswords:
    """Checks passwords by binding to an LDAP server. Read-only: ``writable`` is false."""

    writable = False

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.url)
        self._ldaps = parts.scheme.lower() == "ldaps"
        self._host = parts.hostname or ""
        self._port = parts.port or (636 if self._ldaps else 389)
        self._where = settings.url
        self._bind_fields = _template_fields(settings.bind_dn, "bind_dn") \
            if settings.bind_dn is not None else frozenset()
        self._filter_fields = _template_fields(settings.search_filter, "search_filter")
        # ldap3 packs the receive time-out into SO_RCVTIMEO as whole seconds
        self._receive_timeout = max(1, math.ceil(settings.timeout_seconds))
        self._context: ssl.SSLContext | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._idle: list[ldap3.Connection] = []   # bound service connections, not in use

    # -------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Reach the server (StartTLS, and in search mode the service bind and search_base).

        When the server cannot be reached, ``BackendUnavailable`` says why, and
        the source stays usable: each check tries the server again.
        """
        self._closed = False
        self._prepare()
        await self._run(self._check)
        s = self.settings
        log.info("datasource: LDAP %s answers (%s)", self._where,
                 f"direct bind as {s.bind_dn}" if s.bind_dn is not None else
                 f"search under {s.search_base} as {s.service_dn or 'anonymous'}")

    def _prepare(self) -> None:
        """The TLS context and the threads, once (no network)."""
        if self._pool is not None:
            return
        s = self.settings
        if self._ldaps or s.start_tls:
            cafile = str(s.ca_file) if s.ca_file is not None else None
            try:
                self._context = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as e:
                raise BackendUnavailable(
                    f"LDAP ca_file {s.ca_file}: {getattr(e, 'strerror', None) or e} (it must "
                    "be a PEM file of the CA certificates that signed the server's)") from None
        elif not self._loopback():
            log.warning("datasource: LDAP %s is neither ldaps:// nor start_tls: passwords "
                        "cross the network in clear", self._where)
        self._pool = ThreadPoolExecutor(s.max_connections, thread_name_prefix="datasource-ldap")

    async def close(self) -> None:
        """Wait for operations in flight (each bounded by the time-out), then unbind."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return

        def shut() -> None:
            pool.shutdown(wait=True, cancel_futures=True)
            with self._lock:
                idle, self._idle = self._idle, []
            for conn in idle:
                self._discard(conn)

        await asyncio.to_thread(shut)

    def _loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self._host).is_loopback
        except ValueError:
            return self._host.lower() == "localhost"

    # -------------------------------------------------------------- checking

    async def verify(self, login: str, password: str, *, peer_ip: str, secured: bool,
                     local_ip: str | None = None) -> str | None:
        """The canonical login if the server accepts a bind with ``password``, else ``None``."""
        refusal = _refusal(login, password)
        if refusal is not None:
            log.info("datasource: LDAP login %r from %s refused: %s", login, peer_ip, refusal)
            return None
        try:
            return await self._run(self._verify, login, password, peer_ip)
        except BackendUnavailable as e:
            log.warning("datasource: LDAP login %r from %s not checked: %s", login, peer_ip, e)
            raise

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the pool, answered within ``timeout_seconds`` (queueing included)."""
        if self._closed:
            raise BackendUnavailable("the LDAP password source is closed")
        self._prepare()
        pool = self._pool
        assert pool is not None
        try:
            future = asyncio.get_running_loop().run_in_executor(pool, self._guarded, fn, *args)
        except RuntimeError:  # shut down meanwhile
            raise BackendUnavailable("the LDAP password source is closing") from None
        try:
            return await asyncio.wait_for(future, self.settings.timeout_seconds)
        except TimeoutError:
            # the thread goes on until its socket time-out; its result is dropped
            raise BackendUnavailable(f"LDAP {self._where}: no answer within "
                                     f"{self.settings.timeout_seconds:g} s") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                # close() dropped it from the queue; the caller was not cancelled
                raise BackendUnavailable("the LDAP password source was closed") from None
            raise

    # Everything below runs on the pool's threads.

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, with every LDAP, socket and TLS error a ``BackendUnavailable``."""
        try:
            return fn(*args)
        except (ldap_errors.LDAPException, OSError) as e:   # ssl.SSLError is an OSError
            reason = _reason(e)
            if reason == "invalid server address":   # ldap3's words when the name does not resolve
                reason = f"cannot resolve the host name {self._host}"
            raise BackendUnavailable(f"LDAP {self._where}: {reason}") from None

    def _check(self) -> None:
        if self.settings.search_base is None:
            self._discard(self._connect())
            return
        conn, _ = self._service_connection()
        try:
            conn.search(self.settings.search_base, "(objectClass=*)", ldap3.BASE,
                        attributes=ldap3.NO_ATTRIBUTES, size_limit=1,
                        time_limit=self._receive_timeout)
        except ldap_errors.LDAPException as e:
            self._discard(conn)
            raise BackendUnavailable(f"LDAP {self._where}: {_reason(e)}") from None
        code = conn.result.get("result")
        if code != 0:
            self._discard(conn)
            who = "the service account" if self.settings.service_dn else "anonymous users"
            hint = (f" (check search_base, and that {who} may read it)"
                    if code in (NO_SUCH_OBJECT, INSUFFICIENT_ACCESS) else "")
            raise BackendUnavailable(f"LDAP {self._where}: search_base {self.settings.search_base}"
                                     f": {conn.result.get('description')} ({code}){hint}")
        self._release(conn)

    def _verify(self, login: str, password: str, peer_ip: str) -> str | None:
        if self.settings.bind_dn is not None:
            dn = self._fill(self.settings.bind_dn, self._bind_fields, login, escape_rdn)
            if dn is None:
                log.info("datasource: LDAP login %r from %s refused: bind_dn needs a "
                         "login of the form user@domain", login, peer_ip)
                return None
            canonical = login
        else:
            found = self._search(login, peer_ip)
            if found is None:
                return None
            dn, canonical = found
        if not self._user_bind(dn, password):
            log.info("datasource: LDAP login %r from %s refused: wrong password or no such "
                     "entry", login, peer_ip)
            return None
        log.info("datasource: LDAP login %r from %s accepted as %s", login, peer_ip, canonical)
        return canonical

    @staticmethod
    def _fill(template: str, fields: frozenset[str], login: str,
              escape: Callable[[str], str]) -> str | None:
        """``template`` with the login's parts, escaped; ``None`` if a needed part is empty."""
        values = _parts(login)
        if any(not values[f] for f in fields):
            return None
        return template.format(**{k: escape(v) if v else "" for k, v in values.items()})

    def _connect(self, dn: str | None = None, password: bytes | None = None) -> ldap3.Connection:
        """A connection to the server, TLS started if configured, not bound yet."""
        tls = _VerifiedTls(self._context, self._host) if self._context is not None else None
        server = ldap3.Server(self._host, port=self._port, use_ssl=self._ldaps, tls=tls,
                              get_info=ldap3.NONE, connect_timeout=self.settings.timeout_seconds)
        conn = ldap3.Connection(server, user=dn, password=password,
                                authentication=ldap3.SIMPLE if dn else ldap3.ANONYMOUS,
                                client_strategy=ldap3.SYNC, auto_bind=ldap3.AUTO_BIND_NONE,
                                raise_exceptions=False, read_only=True, auto_referrals=False,
                                auto_escape=False, receive_timeout=self._receive_timeout)
        try:
            conn.open(read_server_info=False)
            if self.settings.start_tls:
                conn.start_tls(read_server_info=False)
        except BaseException:
            self._discard(conn)
            raise
        return conn

    @staticmethod
    def _discard(conn: ldap3.Connection) -> None:
        """Unbind and close; ldap3 leaves the socket of a failed open to the collector."""
        try:
            conn.unbind()
        except Exception:  # a connection that broke is closed all the same
            pass
        sock = getattr(conn, "socket", None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _service_connection(self) -> tuple[ldap3.Connection, bool]:
        """A bound search connection, and whether it was kept from an earlier search."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        s = self.settings
        secret = s.service_password.get_secret_value().encode("utf-8") \
            if s.service_password is not None else None
        conn = self._connect(s.service_dn, secret)
        if s.service_dn is None:
            return conn, False
        try:
            bound = conn.bind(read_server_info=False)
        except BaseException:
            self._discard(conn)
            raise
        if not bound:
            code, text = conn.result.get("result"), conn.result.get("description")
            self._discard(conn)
            hint = (": check service_dn and service_password" if code == INVALID_CREDENTIALS
                    else "")
            raise BackendUnavailable(f"LDAP {self._where}: the service account {s.service_dn} "
                                     f"cannot bind: {text} ({code}){hint}")
        return conn, False

    def _release(self, conn: ldap3.Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.settings.max_connections:
                self._idle.append(conn)
                return
        self._discard(conn)

    def _search(self, login: str, peer_ip: str) -> tuple[str, str] | None:
        """The DN of the one entry ``search_filter`` finds, and the canonical login."""
        s = self.settings
        assert s.search_base is not None
        flt = self._fill(s.search_filter, self._filter_fields, login, escape_filter_chars)
        if flt is None:
            log.info("datasource: LDAP login %r from %s refused: search_filter needs a login "
                     "of the form user@domain", login, peer_ip)
            return None
        attributes = [s.login_attribute] if s.login_attribute else ldap3.NO_ATTRIBUTES
        while True:
            conn, kept = self._service_connection()
            try:
                conn.search(s.search_base, flt, ldap3.SUBTREE, attributes=attributes,
                            size_limit=2, time_limit=self._receive_timeout)
            except ldap_errors.LDAPException:
                self._discard(conn)
                if kept:   # the server closed it while it was idle: once more, on a new one
                    continue
                raise
            break
        code, text = conn.result.get("result"), conn.result.get("description")
        entries = [r for r in conn.response or () if r.get("type") == "searchResEntry"]
        if code not in (0, SIZE_LIMIT_EXCEEDED):
            self._discard(conn)
            raise BackendUnavailable(f"LDAP {self._where}: search under {s.search_base}: "
                                     f"{text} ({code})")
        self._release(conn)
        if not entries:
            log.info("datasource: LDAP login %r from %s refused: no such user", login, peer_ip)
            return None
        if len(entries) > 1 or code == SIZE_LIMIT_EXCEEDED:
            log.warning("datasource: LDAP login %r from %s refused: more than one entry under "
                        "%s matches %s; make search_filter match one entry per login",
                        login, peer_ip, s.search_base, flt)
            return None
        dn = entries[0]["dn"]
        if not s.login_attribute:
            return dn, login
        canonical = self._canonical(entries[0], login)
        if canonical is None:
            log.warning("datasource: LDAP login %r from %s refused: %s has %s %s attribute; "
                        "set login_attribute to one that every user has once, or to \"\" for "
                        "the login as typed", login, peer_ip, dn,
                        "no readable" if not self._values(entries[0]) else "more than one",
                        s.login_attribute)
            return None
        return dn, canonical

    def _values(self, entry: dict[str, Any]) -> list[str]:
        attrs = entry.get("attributes") or {}
        values = attrs.get(self.settings.login_attribute) or []
        if isinstance(values, (str, bytes)):
            values = [values]
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]

    def _canonical(self, entry: dict[str, Any], login: str) -> str | None:
        """The entry's ``login_attribute``: its one value, or the one equal to the login."""
        values = self._values(entry)
        if len(values) == 1:
            return values[0]
        same = [v for v in values if v.casefold() == login.casefold()]
        return same[0] if len(same) == 1 else None

    def _user_bind(self, dn: str, password: str) -> bool:
        """Whether the server accepts ``password`` for ``dn``, on a connection of its own."""
        conn = self._connect(dn, password.encode("utf-8", "surrogateescape"))
        try:
            if conn.bind(read_server_info=False):
                return True
            code, text = conn.result.get("result"), conn.result.get("description")
        finally:
            self._discard(conn)
        if code == INVALID_CREDENTIALS:
            return False
        raise BackendUnavailable(f"LDAP {self._where}: bind as {dn}: {text} ({code})")


__all__ = ["LdapPasswords", "LdapSettings"]
