"""Helpers of elemta-store's tests: store settings per backend, messages as clients write them."""

from __future__ import annotations

import base64
import quopri
from datetime import datetime, timezone

from elemta_store import StoreSettings
from elemta_store.message import Incoming

BACKENDS = ["sqlite", "postgresql"]


def settings_for(backend: str, tmp_path, dsn: str | None = None, **more) -> StoreSettings:
    if backend == "postgresql":
        return StoreSettings(backend="postgresql", postgresql_dsn=dsn, **more)
    return StoreSettings(path=str(tmp_path / "store" / "messages.db"), **more)


def store_config(backend: str, request, **more) -> dict:
    """The ``[plugins.store]`` table for a test server on ``backend``."""
    if backend == "postgresql":
        return {"backend": "postgresql", "postgresql_dsn": request.getfixturevalue("postgresql"),
                **more}
    return {"path": "store/messages.db", **more}


def incoming(queue_id: str, raw: bytes, recipients=("bob@example.test",),
             sender: str = "alice@example.org", received: datetime | None = None,
             params: dict | None = None) -> Incoming:
    return Incoming(queue_id, sender, [(r, dict(params or {}), None) for r in recipients], raw,
                    received or datetime.now(timezone.utc), mail_params={"BODY": "8BITMIME"},
                    helo="client.example.org", peer="127.0.0.1")


def plain(subject: str, text: str, to: str = "bob@example.test") -> bytes:
    return (f"From: Alice <alice@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\n{text}\r\n").encode()


def mime(secret_b64: str, secret_qp: str, attachment: bytes = b"") -> bytes:
    """multipart/mixed: a base64 text/plain part, a quoted-printable text/html part and,
    if given, a base64 attachment."""
    b64 = base64.encodebytes(secret_b64.encode("utf-8")).replace(b"\n", b"\r\n")
    qp = quopri.encodestring(f"<p>{secret_qp}</p>".encode("utf-8")).replace(b"\n", b"\r\n")
    parts = [
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64,
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp + b"\r\n",
    ]
    if attachment:
        parts.append(b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: "
                     b"base64\r\nContent-Disposition: attachment; filename=\"a.bin\"\r\n\r\n"
                     + base64.encodebytes(attachment).replace(b"\n", b"\r\n"))
    body = b"".join(b"--XyZ\r\n" + p for p in parts) + b"--XyZ--\r\n"
    return (b"From: =?utf-8?q?Zo=C3=A9?= <zoe@example.org>\r\nTo: bob@example.test\r\n"
            b"Subject: =?utf-8?b?" + base64.b64encode("Réunion".encode()) + b"?=\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XyZ\r\n\r\n" + body)
