"""What is POSTed: the message read from the spool, as a JSON document or form fields.

Plain functions of bytes, testable without a server. :func:`describe` parses
the message (header fields, the text and HTML bodies, attachment metadata);
:func:`json_body` and :func:`multipart_body` encode it. Everything here is
blocking; the plugin runs it in a thread for messages over a few hundred KiB.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from typing import Any

# The header section of a message too large to send is read up to this size.
MAX_HEADER_BYTES = 1 << 20
# Version of the document; grows only with an incompatible change.
VERSION = 1


@dataclass
class Post:
    """One request: what the receiver is told about one message and its recipients."""

    id: str
    idempotency_key: str
    timestamp: int
    received_at: float
    attempt: int
    target: str
    sender: str
    recipients: list[str]
    size: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    subject: str | None = None
    message_id: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: list[dict[str, Any]] | None = None
    raw: bytes | None = None
    truncated: bool = False
    link: str | None = None

    def fields(self) -> dict[str, Any]:
        """The document's members, in order (``raw`` base64 or null)."""
        return {
            "version": VERSION,
            "id": self.id,
            "idempotencyKey": self.idempotency_key,
            "timestamp": self.timestamp,
            "receivedAt": datetime.fromtimestamp(self.received_at, timezone.utc)
                                  .strftime("%Y-%m-%dT%H:%M:%SZ"),
            "attempt": self.attempt,
            "target": self.target,
            "from": self.sender,
            "to": self.recipients,
            "size": self.size,
            "subject": self.subject,
            "messageId": self.message_id,
            "headers": [[n, v] for n, v in self.headers],
            "body": None if self.truncated else {"text": self.text, "html": self.html},
            "attachments": None if self.truncated else self.attachments,
            "raw": None if self.raw is None else base64.b64encode(self.raw).decode("ascii"),
            "truncated": self.truncated,
            "link": self.link,
        }


def idempotency_key(queue_id: str, recipients: list[str]) -> str:
    """The queue id and a digest of the recipient set: equal on every repeat of a POST."""
    rcpts = "\n".join(sorted(r.lower() for r in recipients)).encode("utf-8", "surrogateescape")
    return f"{queue_id}-{hashlib.sha256(rcpts).hexdigest()[:16]}"


def _clean(text: str) -> str:
    """A string JSON and HTTP can carry: undecodable bytes become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def header_section(content: bytes) -> list[tuple[str, str]]:
    """The header fields of ``content`` in order, unfolded, values as written (RFC 5322)."""
    head = content.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    fields: list[tuple[str, str]] = []
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + _clean(line.strip().decode("utf-8", "replace")))
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        fields.append((name.decode("ascii", "replace").strip(),
                       _clean(value.strip().decode("utf-8", "replace"))))
    return fields


def read_head(path: str) -> bytes:
    """The header section of the spooled message, at most :data:`MAX_HEADER_BYTES`."""
    with open(path, "rb") as f:
        got = b""
        while len(got) < MAX_HEADER_BYTES:
            chunk = f.read(65536)
            if not chunk:
                break
            got += chunk
            end = got.find(b"\r\n\r\n")
            if end >= 0:
                return got[:end + 2]
        return got[:MAX_HEADER_BYTES]


def _decoded_header(msg: EmailMessage, name: str) -> str | None:
    try:
        value = msg.get(name)
    except Exception:   # a header the parser cannot make sense of: the raw one stays in headers
        return None
    return None if value is None else _clean(str(value))


def _text_of(part: EmailMessage) -> str:
    try:
        content = part.get_content()
    except (LookupError, UnicodeError, ValueError, AssertionError):
        payload = part.get_payload(decode=True) or b""
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    # CRLF on the wire; a JSON consumer expects the text's lines as Python or JS write them
    return _clean(content if isinstance(content, str) else "").replace("\r\n", "\n")


def _size_of(part: EmailMessage) -> int:
    """The size of the decoded content; for base64, counted without decoding it."""
    if part.get_content_type() == "message/rfc822":
        return len(part.as_bytes())
    if part.get("Content-Transfer-Encoding", "").strip().lower() == "base64":
        encoded = part.get_payload()
        if isinstance(encoded, str):
            chars = len(encoded) - sum(encoded.count(c) for c in "\r\n\t ")
            return max(0, chars * 3 // 4 - encoded.rstrip().count("=", -2))
    payload = part.get_payload(decode=True)
    return len(payload) if isinstance(payload, bytes) else 0


def _leaves(part: EmailMessage) -> list[EmailMessage]:
    """The parts that hold content: an attached message counts as one."""
    if part.get_content_type() == "message/rfc822" or not part.is_multipart():
        return [part]
    out: list[EmailMessage] = []
    for sub in part.iter_parts():
        out += _leaves(sub)  # type: ignore[arg-type]
    return out


def parse(content: bytes) -> dict[str, Any]:
    """The parts of a whole message: ``subject``, ``message_id``, ``text``, ``html``,
    ``attachments`` (metadata: ``filename``, ``contentType``, ``size`` of the decoded
    content, ``disposition``, ``contentId``)."""
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(content)
    assert isinstance(msg, EmailMessage)
    text_part = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    bodies = [p for p in (text_part, html_part) if p is not None]
    attachments = []
    for part in _leaves(msg):
        if any(part is b for b in bodies):
            continue
        try:
            filename = part.get_filename()
        except Exception:
            filename = None
        cid = part.get("Content-ID")
        attachments.append({
            "filename": None if filename is None else _clean(filename),
            "contentType": part.get_content_type(),
            "size": _size_of(part),
            "disposition": part.get_content_disposition(),
            "contentId": None if cid is None else _clean(str(cid)).strip("<>"),
        })
    return {
        "subject": _decoded_header(msg, "Subject"),
        "message_id": _decoded_header(msg, "Message-ID"),
        "text": None if text_part is None else _text_of(text_part),   # type: ignore[arg-type]
        "html": None if html_part is None else _text_of(html_part),   # type: ignore[arg-type]
        "attachments": attachments,
    }


def describe(path: str, post: Post, *, max_message_bytes: int, raw: bool,
             link_base: str | None) -> Post:
    """Fill ``post`` from the spooled message at ``path``: whole, or only its header
    section (and a link) when it is larger than ``max_message_bytes``."""
    size = os.stat(path).st_size
    post.size = size
    if size > max_message_bytes:
        head = read_head(path)
        post.headers = header_section(head)
        msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        post.subject = _decoded_header(msg, "Subject")     # type: ignore[arg-type]
        post.message_id = _decoded_header(msg, "Message-ID")  # type: ignore[arg-type]
        post.truncated = True
        post.link = None if link_base is None else f"{link_base}/{post.id}"
        return post
    with open(path, "rb") as f:
        content = f.read()
    post.headers = header_section(content)
    parts = parse(content)
    post.subject = parts["subject"]
    post.message_id = parts["message_id"]
    post.text = parts["text"]
    post.html = parts["html"]
    post.attachments = parts["attachments"]
    post.raw = content if raw else None
    return post


def json_body(post: Post) -> bytes:
    fields = post.fields()
    raw = fields.pop("raw")
    head = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if raw is None:
        return head[:-1] + b',"raw":null}'
    # spliced in rather than serialised: base64 needs no escaping, and a copy of a large
    # message is saved
    return b"".join((head[:-1], b',"raw":"', raw.encode("ascii"), b'"}'))


def multipart_body(post: Post, boundary: str) -> bytes:
    """``multipart/form-data`` (RFC 7578): one text field per member (objects and arrays
    as JSON, absent values left out) and the message as the file part ``raw``."""
    out: list[bytes] = []
    for name, value in post.fields().items():
        if name == "raw" or value is None:
            continue
        if name == "body":
            for sub in ("text", "html"):
                if value[sub] is not None:
                    out.append(_field(boundary, sub, value[sub]))
            continue
        if isinstance(value, (dict, list, bool)):
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        else:
            text = str(value)
        out.append(_field(boundary, name, text))
    if post.raw is not None:
        out.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="raw"; '
            f'filename="{post.id}.eml"\r\nContent-Type: message/rfc822\r\n\r\n'.encode("ascii")
            + post.raw + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def _field(boundary: str, name: str, text: str) -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
            f'Content-Type: text/plain; charset=utf-8\r\n\r\n').encode("ascii") \
        + text.encode("utf-8") + b"\r\n"
