"""The objects hooks receive: session, transaction, recipient, message, auth results.

They are plain mutable objects owned by the core; plugins read them and keep
their own state in the typed ``stash`` each one carries.
"""

from __future__ import annotations

import base64
import binascii
import copyreg
import operator
import os
import threading
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Iterable, TypeVar

# the message of a transaction has a module of its own; its names stay importable here
from .message import Message, check_header, parse_header_block, split_header_fields  # noqa: F401
from .stash import Stash

if TYPE_CHECKING:
    from .config import ListenerSettings


_T = TypeVar("_T")


def pickled_by_position(cls: type[_T]) -> type[_T]:
    """Pickle (and copy) a slotted dataclass as ``cls(*field values)``.

    The ``__getstate__``/``__setstate__`` that ``dataclass(slots=True)`` writes
    run a Python loop over the fields on both sides; this takes the values
    with one C call and builds the object again through ``__init__``. A
    delivery handed to the transport process pickles an envelope, its
    recipients and a route, and its outcomes come back pickled. Only for
    dataclasses whose fields are all ``__init__`` parameters, in order; a
    subclass (a plugin's, with fields of its own) pickles the usual way.
    """
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    values = operator.attrgetter(*names)

    def __reduce__(self: Any) -> tuple[Any, ...]:
        if type(self) is not cls:
            # what object.__reduce_ex__ does for a class with __getstate__
            return copyreg.__newobj__, (type(self),), self.__getstate__()
        got = values(self)
        return cls, (got if len(names) > 1 else (got,))

    cls.__reduce__ = __reduce__  # type: ignore[assignment,method-assign]
    return cls


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """Facts about an established TLS session."""

    version: str
    cipher: str
    bits: int
    implicit: bool  # True on an implicit-TLS (465-style) listener

    def as_dict(self) -> dict[str, object]:
        return {"version": self.version, "cipher": self.cipher, "bits": self.bits,
                "implicit": self.implicit}


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client sent with AUTH. ``password`` never appears in logs or ``repr``.

    ``authzid`` is the authorization identity of PLAIN (RFC 4616): ``""`` when
    the client sent none or the same as ``login``. A different one is allowed
    only when a plugin's ``authorize`` hook says so, after the password was
    accepted.
    """

    mechanism: str
    login: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What a server keeps to check SCRAM-SHA-256 logins (RFC 5802, RFC 7677).

    Derived from the password when it is set (:meth:`derive`); the password
    itself cannot be recovered from them. :meth:`to_string` and :meth:`parse`
    use PostgreSQL's format, ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``
    (base64), so a verifier can be stored in one text column.
    """

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    PREFIX = "SCRAM-SHA-256$"

    @classmethod
    def derive(cls, password: str, *, iterations: int = 4096,
               salt: bytes | None = None) -> "ScramKeys":
        """The keys of ``password`` (SASLprep-ed, as clients do); a random 16-byte salt."""
        from scramp import ScramMechanism

        salt_, stored, server, i = ScramMechanism("SCRAM-SHA-256").make_auth_info(
            password, iteration_count=iterations, salt=salt or os.urandom(16))
        return cls(salt_, i, stored, server)

    def to_string(self) -> str:
        b64 = base64.b64encode
        return (f"{self.PREFIX}{self.iterations}:{b64(self.salt).decode()}$"
                f"{b64(self.stored_key).decode()}:{b64(self.server_key).decode()}")

    @classmethod
    def parse(cls, text: str) -> "ScramKeys":
        """Read :meth:`to_string`'s format; ``ValueError`` says what is wrong."""
        if not text.startswith(cls.PREFIX):
            raise ValueError("a SCRAM-SHA-256 verifier starts with 'SCRAM-SHA-256$'")
        try:
            head, keys = text[len(cls.PREFIX):].split("$")
            iterations, salt = head.split(":")
            stored, server = keys.split(":")
            out = cls(base64.b64decode(salt, validate=True), int(iterations),
                      base64.b64decode(stored, validate=True),
                      base64.b64decode(server, validate=True))
        except (ValueError, binascii.Error):
            raise ValueError("not a SCRAM-SHA-256 verifier "
                             "(SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)") from None
        if out.iterations < 1 or len(out.stored_key) != 32 or len(out.server_key) != 32:
            raise ValueError("a SCRAM-SHA-256 verifier needs 32-byte keys and iterations >= 1")
        return out


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A DKIM signing key of a domain, as a key store answers ``dkim_keys``.

    ``algorithm`` is ``"rsa"`` or ``"ed25519"``. The private key is either
    ``private_key`` (the PEM text, or for Ed25519 the base64 32-byte seed) or
    ``key_file`` (an absolute path to a file of mode 0600 holding it); exactly
    one of the two. ``not_before`` and ``not_after`` are UTC timestamps
    (seconds since the epoch) bounding when the key signs: from ``not_before``
    on, until just before ``not_after``; ``None`` means no bound.
    """

    domain: str
    selector: str
    algorithm: str = "rsa"
    private_key: str | None = field(default=None, repr=False)
    key_file: str | None = None
    not_before: float | None = None
    not_after: float | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ("rsa", "ed25519"):
            raise ValueError(f"DkimKey {self.selector} of {self.domain}: algorithm "
                             f"{self.algorithm!r} is not \"rsa\" or \"ed25519\"")
        if (self.private_key is None) == (self.key_file is None):
            raise ValueError(f"DkimKey {self.selector} of {self.domain}: give exactly one "
                             "of private_key and key_file")


class Session:
    """One client connection, from accept to close.

    ``helo`` is the HELO/EHLO argument (``None`` before HELO and again right after
    STARTTLS), ``auth_user`` the authenticated identity, ``relay_allowed`` true
    when the client's address is in ``[server] relay_networks``, and a flag a
    plugin may set in ``connect`` (for example from a network allow-list) so that
    the built-in relay policy lets the session send to any domain.
    """

    __slots__ = ("id", "peer", "local", "listener", "helo", "esmtp", "tls", "auth_user",
                 "relay_allowed", "started", "transactions", "headers", "stash")

    def __init__(self, id: str, peer: tuple[str, int], local: tuple[str, int],
                 listener: ListenerSettings) -> None:
        self.id = id
        self.peer = peer
        self.local = local
        self.listener = listener
        self.helo: str | None = None
        self.esmtp = False
        self.tls: TLSInfo | None = None
        self.auth_user: str | None = None
        self.relay_allowed = False
        self.started = time.time()
        self.transactions = 0
        self.headers: list[tuple[str, str]] = []  # from connect/helo verdicts
        self.stash = Stash()

    @property
    def peer_ip(self) -> str:
        return self.peer[0]

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.peer[0]}:{self.peer[1]} on {self.listener.name}>"


class Recipient:
    """One RCPT TO: the address as given (without angle brackets) and its parameters.

    ``deliver_to`` is ``None`` (deliver to ``address``) unless a plugin called
    :meth:`rewrite`.
    """

    __slots__ = ("address", "params", "stash", "deliver_to")

    def __init__(self, address: str, params: dict[str, str | None] | None = None) -> None:
        self.address = address
        self.params = params or {}
        self.stash = Stash()
        self.deliver_to: tuple[str, ...] | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    def rewrite(self, addresses: Iterable[str]) -> None:
        """Spool this recipient as ``addresses`` instead (aliases, redirects, forwards).

        Each becomes a recipient of its own in the envelope, delivered and
        retried on its own, with ``original`` set to this address; an address
        that appears twice in a message (two aliases naming the same mailbox)
        is spooled once. Include ``self.address`` to keep a copy for it. Only
        the final list counts: call it again to replace it.
        """
        out = [_checked_address(a, "rewrite") for a in addresses]
        if not out:
            raise ValueError("rewrite: at least one address is needed (reject the recipient "
                             "to refuse it)")
        self.deliver_to = tuple(out)

    def __repr__(self) -> str:
        return f"<Recipient {self.address}>"


class Transaction:
    """One mail transaction: MAIL FROM up to the end of DATA (or RSET).

    ``id`` is the queue id the message will have in the spool. ``sender`` is ``""``
    for the null reverse-path.
    """

    __slots__ = ("id", "sender", "mail_params", "recipients", "headers", "stash", "started")

    def __init__(self, id: str, sender: str, mail_params: dict[str, str | None]) -> None:
        self.id = id
        self.sender = sender
        self.mail_params = mail_params
        self.recipients: list[Recipient] = []
        self.headers: list[tuple[str, str]] = []  # from mail/rcpt verdicts
        self.stash = Stash()
        self.started = time.time()

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower() if self.sender else ""

    # Envelope edits at the end of DATA (milter CHGFROM, ADDRCPT, DELRCPT): the
    # spooled envelope is built from the transaction after the data hooks.

    def set_sender(self, address: str, params: dict[str, str | None] | None = None) -> None:
        """Change the envelope sender (``""``: the null sender); ``params`` replace the
        MAIL FROM parameters when given."""
        self.sender = "" if address == "" else _checked_address(address, "set_sender")
        if params is not None:
            self.mail_params = dict(params)

    def add_recipient(self, address: str,
                      params: dict[str, str | None] | None = None) -> Recipient:
        """Add a recipient (with its RCPT TO parameters); an address already there is
        not added twice. The recipient, new or existing."""
        address = _checked_address(address, "add_recipient")
        for r in self.recipients:
            if r.address.lower() == address.lower():
                return r
        recipient = Recipient(address, params)
        self.recipients.append(recipient)
        return recipient

    def remove_recipient(self, address: str) -> bool:
        """Remove a recipient (its address as given at RCPT, case-insensitive); whether
        there was one. The sender is not told: at DATA the reply is for the whole
        message. Removing every recipient makes the message go nowhere (it is
        answered 250 and dropped, like ``Discard``)."""
        keep = [r for r in self.recipients if r.address.lower() != address.lower()]
        removed = len(keep) != len(self.recipients)
        self.recipients[:] = keep
        return removed

    def __repr__(self) -> str:
        return f"<Transaction {self.id} from <{self.sender}> to {len(self.recipients)}>"


def _checked_address(a: object, what: str) -> str:
    if not isinstance(a, str) or a.count("@") < 1 or not a.rpartition("@")[0] \
            or not a.rpartition("@")[2] or any(c in a for c in "<> \t\r\n"):
        raise ValueError(f"{what}: {a!r} is not a mail address (local@domain)")
    return a


@dataclass(slots=True)
class AuthResult:
    """One message authentication result, as in an RFC 8601 resinfo.

    ``method`` ("spf", "dkim", "dmarc", "arc"…), ``result`` ("pass", "fail",
    "temperror"…), an optional ``reason`` and the ``properties`` to report
    (``{"smtp.mailfrom": "example.com"}``). Property values should be domains or
    tokens: the header writer quotes anything else.
    """

    method: str
    result: str
    reason: str | None = None
    properties: dict[str, str] = field(default_factory=dict)


def new_id() -> str:
    """A unique, time-ordered identifier (queue ids, session ids): 20 characters."""
    return _ID_FACTORY()


_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)  # 10 bits -> two characters
_RANDOM_POOL = 5 * 256  # random bytes read at once: 256 identifiers


class _IdFactory:
    """20 characters of Crockford base 32: microseconds since the epoch, then 40 random bits.

    Its random bits are read 256 identifiers at a time: ``os.urandom`` is a
    system call that gives the interpreter lock away, and a session id and a
    queue id are made on the event loop for every message. The pool is
    forgotten in a forked child, which must not repeat its parent's bits.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # a new lock too: in a child forked while a thread held it, it stays held
        self._lock = threading.Lock()
        self._last = 0
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        with self._lock:
            t = time.time_ns() // 1000
            if t <= self._last:
                t = self._last + 1
            self._last = t
            at = self._at
            if at >= len(self._pool):
                self._pool = os.urandom(_RANDOM_POOL)
                at = 0
            rnd = int.from_bytes(self._pool[at:at + 5], "big")
            self._at = at + 5
        n = (t << 40) | rnd
        p = _PAIRS
        return "".join((p[n >> 90 & 1023], p[n >> 80 & 1023], p[n >> 70 & 1023],
                        p[n >> 60 & 1023], p[n >> 50 & 1023], p[n >> 40 & 1023],
                        p[n >> 30 & 1023], p[n >> 20 & 1023], p[n >> 10 & 1023],
                        p[n & 1023]))


_ID_FACTORY = _IdFactory()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ID_FACTORY.reset)


@pickled_by_position
@dataclass(frozen=True, slots=True)
class Route:
    """Where and how the runner delivers one recipient (the ``route`` hook's answer).

    ``transport`` names the delivery method: ``"smtp"`` (the built-in outbound
    SMTP transport) or one a transport plugin implements in ``deliver``.
    Recipients with equal routes travel together: one SMTP transaction per
    destination. For SMTP, ``destination`` is the domain whose MX is looked up,
    or ``host`` (``"host:port"``) names a relay or smarthost that is used instead.
    """

    transport: str = "smtp"
    destination: str = ""
    host: str | None = None
    tls: str = "opportunistic"
    auth: tuple[str, str] | None = field(default=None, repr=False)
    ca_file: str | None = None


@pickled_by_position
@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one recipient in one delivery attempt (the ``deliver`` hook's answer).

    ``code`` is the SMTP reply code (``250`` delivered, ``4xx`` try again later,
    ``5xx`` failed for good), ``enhanced`` the RFC 3463 status, ``text`` the
    reply or local error text, ``remote`` the host that answered, if any.
    ``relayed``: the message went on to another mail server rather than into a
    mailbox; ``dsn_passed``: that server took the RFC 3461 DSN parameters and
    reports from there (no success notice is then sent from here).
    """

    recipient: str
    code: int
    enhanced: str
    text: str
    remote: str | None = None
    relayed: bool = False
    dsn_passed: bool = False

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"
