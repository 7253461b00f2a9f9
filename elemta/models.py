"""The objects hooks receive: session, transaction, recipient, message, auth results.

They are plain mutable objects owned by the core; plugins read them and keep
their own state in the typed ``stash`` each one carries.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable

from .stash import Stash

if TYPE_CHECKING:
    from .config import ListenerSettings


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
        out: list[str] = []
        for a in addresses:
            if not isinstance(a, str) or a.count("@") < 1 or not a.rpartition("@")[0] \
                    or not a.rpartition("@")[2] or any(c in a for c in "<> \t\r\n"):
                raise ValueError(f"rewrite: {a!r} is not a mail address (local@domain)")
            out.append(a)
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

    def __repr__(self) -> str:
        return f"<Transaction {self.id} from <{self.sender}> to {len(self.recipients)}>"


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


class Message:
    """The message received in DATA, spooled as it arrived.

    The header section is parsed (``headers``); the body stays in the spool file
    or buffer. Use :meth:`open` to stream it and :meth:`as_bytes` only when the
    whole message is needed. Plugins add headers with :meth:`add_header` (they
    are prepended when the message is committed) and can drop received header
    fields with :meth:`remove_headers`.
    """

    __slots__ = ("_header_block", "_body", "_body_path", "size", "_headers", "_removed",
                 "added", "stash")

    def __init__(self, header_block: bytes, body: bytes | None, body_path: str | None,
                 size: int) -> None:
        self._header_block = header_block
        self._body = body
        self._body_path = body_path
        self.size = size
        self._headers: list[tuple[str, str]] | None = None
        self._removed: set[int] = set()
        self.added: list[tuple[str, str]] = []
        self.stash = Stash()

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The received header fields as (name, unfolded value), parsed on first use."""
        if self._headers is None:
            self._headers = parse_header_block(self._header_block)
        return self._headers

    def header(self, name: str) -> str | None:
        """The first header field called ``name`` (case-insensitive), unfolded."""
        lname = name.lower()
        for i, (n, v) in enumerate(self.headers):
            if i not in self._removed and n.lower() == lname:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for i, (n, v) in enumerate(self.headers)
                if i not in self._removed and n.lower() == lname]

    def add_header(self, name: str, value: str) -> None:
        """Prepend ``name: value`` to the message when it is committed."""
        check_header(name, value)
        self.added.append((name, value))

    def remove_headers(self, predicate: Callable[[str, str], bool]) -> int:
        """Drop received header fields for which ``predicate(name, value)`` is true."""
        n = 0
        for i, (name, value) in enumerate(self.headers):
            if i not in self._removed and predicate(name, value):
                self._removed.add(i)
                n += 1
        return n

    @property
    def modified(self) -> bool:
        """True when received header fields were removed."""
        return bool(self._removed)

    def header_bytes(self) -> bytes:
        """The received header section, minus removed fields (no added ones)."""
        if not self._removed:
            return self._header_block
        fields = split_header_fields(self._header_block)
        out = [raw for i, raw in enumerate(fields) if i not in self._removed]
        tail = self._header_block[sum(len(f) for f in fields):]
        return b"".join(out) + tail

    def open(self) -> BinaryIO:
        """A binary file object over the received message (headers then body)."""
        if self._body_path is None:
            return io.BytesIO(self.header_bytes() + (self._body or b""))
        return _ChainReader(self.header_bytes(), self._body_path)

    def as_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()

    @property
    def body_path(self) -> str | None:
        return self._body_path

    @property
    def body(self) -> bytes | None:
        return self._body


def check_header(name: str, value: str) -> None:
    """Refuse a header that would break the message or inject another field."""
    if not name or any(c in name for c in ": \t\r\n") or not name.isascii():
        raise ValueError(f"invalid header field name {name!r}")
    for line in value.split("\r\n")[1:]:
        if not line[:1] in (" ", "\t"):
            raise ValueError(f"header {name} continuation lines must start with white space")
    if "\n" in value.replace("\r\n", "") or "\r" in value.replace("\r\n", ""):
        raise ValueError(f"header {name} value contains a bare CR or LF")


def split_header_fields(block: bytes) -> list[bytes]:
    """Split a header section into raw fields (each with its continuation lines)."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def parse_header_block(block: bytes) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for raw in split_header_fields(block):
        name, sep, value = raw.partition(b":")
        if not sep:
            out.append(("", raw.decode("utf-8", "surrogateescape").strip()))
            continue
        text = value.decode("utf-8", "surrogateescape")
        unfolded = " ".join(part.strip() for part in text.splitlines())
        out.append((name.decode("ascii", "replace").strip(), unfolded.strip()))
    return out


class _ChainReader(io.RawIOBase):
    """Read a bytes prefix, then a file: a received message whose body was spilled."""

    def __init__(self, prefix: bytes, path: str) -> None:
        self._prefix = memoryview(prefix)
        self._pos = 0
        self._file = open(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self._pos < len(self._prefix):
            n = min(len(b), len(self._prefix) - self._pos)
            b[:n] = self._prefix[self._pos:self._pos + n]
            self._pos += n
            return n
        return self._file.readinto(b)

    def close(self) -> None:
        self._file.close()
        super().close()


def new_id() -> str:
    """A unique, time-ordered identifier (queue ids, session ids): 20 characters."""
    return _ID_FACTORY()


_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _id_factory() -> Callable[[], str]:
    last = [0, 0]

    def make() -> str:
        t = time.time_ns() // 1000
        if t <= last[0]:
            t = last[0] + 1
        last[0] = t
        rnd = int.from_bytes(os.urandom(5), "big")
        n = (t << 40) | rnd
        chars = []
        for _ in range(20):
            chars.append(_ALPHABET[n & 31])
            n >>= 5
        return "".join(reversed(chars))

    return make


_ID_FACTORY = _id_factory()


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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one recipient in one delivery attempt (the ``deliver`` hook's answer).

    ``code`` is the SMTP reply code (``250`` delivered, ``4xx`` try again later,
    ``5xx`` failed for good), ``enhanced`` the RFC 3463 status, ``text`` the
    reply or local error text, ``remote`` the host that answered, if any.
    """

    recipient: str
    code: int
    enhanced: str
    text: str
    remote: str | None = None

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
