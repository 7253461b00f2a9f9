"""The envelope of a spooled message: everything but the content, as JSON.

One file per message in the directory of its state. The runner rewrites it
atomically as recipients are delivered, so per-recipient state survives crashes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from orjson import dumps as _dumps, loads as _loads

from ..models import pickled_by_position

FORMAT_VERSION = 1

STATES = ("ready", "deferred", "hold", "failed")

# per-recipient states
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@pickled_by_position
@dataclass(slots=True)
class RecipientState:
    address: str
    params: dict[str, str | None] = field(default_factory=dict)
    state: str = PENDING
    attempts: int = 0
    last_error: str | None = None
    updated_at: float | None = None
    original: str | None = None     # the RCPT TO address this one was rewritten from


@pickled_by_position
@dataclass(slots=True)
class Envelope:
    id: str
    sender: str
    recipients: list[RecipientState]
    received_at: float
    size: int
    mail_params: dict[str, str | None] = field(default_factory=dict)
    peer: dict[str, Any] | None = None          # {"ip": ..., "port": ...}
    helo: str | None = None
    listener: str | None = None
    tls: dict[str, Any] | None = None           # TLSInfo.as_dict()
    auth: str | None = None                     # authenticated identity
    attempts: int = 0
    next_attempt_at: float | None = None
    hold_reason: str | None = None
    last_error: str | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> bytes:
        # dataclasses.asdict deep-copies recursively: a fifth of the commit path.
        d: dict[str, Any] = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}
        d["recipients"] = [{name: getattr(r, name) for name in _RECIPIENT_FIELDS}
                           for r in self.recipients]
        d["version"] = FORMAT_VERSION
        try:
            return _dumps(d)
        except TypeError:
            # what orjson refuses: a lone surrogate (octets a plugin decoded with
            # surrogateescape, written back as those octets), keys that are not strings,
            # ints past 64 bits
            return _ENCODE(d).encode("utf-8", "surrogateescape")

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Envelope":
        d = envelope_json(raw)
        version = d.pop("version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported envelope format version {version!r}")
        d["recipients"] = [RecipientState(**r) for r in d["recipients"]]
        return cls(**d)

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state == PENDING]


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
_RECIPIENT_FIELDS = tuple(f.name for f in fields(RecipientState))
# one encoder: json.dumps with options builds a new JSONEncoder on every call
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def envelope_json(raw: bytes | str) -> Any:
    """The JSON value of an envelope file (a dict, unless the file is not an envelope);
    ``ValueError`` when it is not JSON.

    Read by orjson; what it refuses, by the standard library: octets that are not UTF-8
    (:meth:`Envelope.to_json` writes a lone surrogate back as the octet it stood for; they
    are decoded with ``surrogateescape`` again), NaN, ints past 64 bits.
    """
    try:
        return _loads(raw)
    except ValueError:
        return json.loads(raw.decode("utf-8", "surrogateescape")
                          if isinstance(raw, bytes) else raw)


_READ_CHUNK = 1 << 16


def read_envelope_file(path: str) -> bytes:
    """The bytes of an envelope file; ``FileNotFoundError`` if there is none.

    Three or four system calls (open, read until end of file, close) where
    ``open(path, "rb").read()`` makes nine: the runner reads one envelope per
    delivery on the event loop, and every call gives the interpreter lock
    away, to the threads waiting for it, and back.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunk = os.read(fd, _READ_CHUNK)
        if len(chunk) < _READ_CHUNK:
            # a regular file reads short only at its end; one more read would
            # only confirm it
            return chunk
        chunks = [chunk]
        while chunk:
            chunk = os.read(fd, _READ_CHUNK)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_envelope(raw: bytes, queue_id: str) -> Envelope:
    """An envelope file's contents; ``ValueError`` for anything malformed or misnamed."""
    try:
        env = Envelope.from_json(raw)
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"malformed envelope: {e!r}") from None
    if env.id != queue_id:
        raise ValueError(f"envelope id {env.id!r} does not match its file name")
    return env


def params_for(content: bytes, sender: str, recipients: list[str]) -> dict[str, str | None]:
    """The ``MAIL FROM`` parameters a message the server made itself needs when relayed:
    ``BODY=8BITMIME`` for 8-bit content, ``SMTPUTF8`` for non-ASCII addresses."""
    params: dict[str, str | None] = {}
    head = content.split(b"\r\n\r\n", 1)[0].lower()
    if b"content-transfer-encoding: 8bit" in head or not content.isascii():
        params["BODY"] = "8BITMIME"
    if not sender.isascii() or not all(r.isascii() for r in recipients):
        params["SMTPUTF8"] = None
    return params
