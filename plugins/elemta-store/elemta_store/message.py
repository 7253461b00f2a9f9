"""What the store keeps of a message, taken apart once at delivery.

:func:`parse` reads the raw bytes with the standard library's parser (the
``compat32`` policy: several times faster than ``default``, and it never
raises on a malformed header) and returns decoded headers, the summary fields
and the text that full-text search indexes: the decoded text parts, never the
base64 or quoted-printable on the wire.
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32

log = logging.getLogger("elemta.store")

SNIPPET_CHARS = 200
_FOLD = re.compile(r"\r?\n[ \t]*")
_SPACE = re.compile(r"\s+")
_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)


@dataclass(slots=True)
class Incoming:
    """One message to store: the envelope, the raw bytes, and when it arrived."""

    queue_id: str
    sender: str
    recipients: list[tuple[str, dict[str, str | None], str | None]]  # address, params, original
    raw: bytes
    received: datetime
    mail_params: dict[str, str | None] = field(default_factory=dict)
    helo: str | None = None
    peer: str | None = None
    auth: str | None = None
    content_path: str | None = None     # raw is read from here, off the event loop


@dataclass(slots=True)
class Parsed:
    headers: list[tuple[str, str]]
    subject: str
    from_header: str
    to_header: str
    has_attachments: bool
    snippet: str
    body: str


def decode(value: str) -> str:
    """A header value unfolded, with RFC 2047 words decoded; never raises."""
    value = _FOLD.sub(" ", str(value))
    if "=?" in value:
        try:
            value = str(make_header(decode_header(value)))
        except (ValueError, LookupError, UnicodeError, AssertionError):
            pass
    # bytes that were not UTF-8 come through the parser as surrogates
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()


def _is_attachment(part: Message) -> bool:
    # with 8-bit bytes in it, a header comes back as an email.header.Header: str() it
    disposition = str(part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    if disposition == "attachment":
        return True
    try:
        return part.get_filename() is not None and not part.is_multipart()
    except (ValueError, LookupError, UnicodeError, AttributeError, TypeError):
        return True     # a filename parameter there is, if malformed


def _text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("latin-1")


def parse(raw: bytes, index_bytes: int) -> Parsed:
    """Headers, summary fields and at most ``index_bytes`` of body text; never raises.

    A message the parser cannot take apart is still stored, whole, with its
    raw bytes as text for search (and a warning in the log).
    """
    try:
        return _parse(raw, index_bytes)
    except Exception as e:  # noqa: BLE001 - the message is kept whatever its shape
        log.warning("store: a message could not be taken apart (%s: %s); stored as it is",
                    type(e).__name__, e)
        text = raw.decode("utf-8", "replace")
        return Parsed([], "", "", "", False, _SPACE.sub(" ", text[:800]).strip()[:SNIPPET_CHARS],
                      text[:index_bytes])


def _parse(raw: bytes, index_bytes: int) -> Parsed:
    msg = message_from_bytes(raw, policy=compat32)
    headers = [(str(name), decode(value)) for name, value in msg.items()]
    first = {}
    for name, value in headers:
        first.setdefault(name.lower(), value)
    has_attachments = False
    plain: list[str] = []
    htmls: list[str] = []
    size = 0
    for part in msg.walk():
        if part.is_multipart():
            continue
        try:
            if _is_attachment(part):
                has_attachments = True
                continue
            ctype = part.get_content_type()
            if ctype not in ("text/plain", "text/html") or size >= index_bytes:
                continue
            text = _text(part)
        except (ValueError, LookupError, UnicodeError, AttributeError, TypeError):
            continue    # a part too broken to read is kept in raw, not indexed
        if ctype == "text/html":
            text = html.unescape(_TAGS.sub(" ", text))
            htmls.append(text)
        else:
            plain.append(text)
        size += len(text)
    body = "\n".join(plain + htmls)[:index_bytes]
    source = plain[0] if plain else (htmls[0] if htmls else "")
    snippet = _SPACE.sub(" ", source[:SNIPPET_CHARS * 4]).strip()[:SNIPPET_CHARS]
    return Parsed(headers, first.get("subject", ""), first.get("from", ""), first.get("to", ""),
                  has_attachments, snippet, body)
