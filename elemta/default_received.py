"""Built-in Received header (RFC 5321 §4.4, with the TLS and AUTH facts).

    Received: from client.example (client.example [192.0.2.1])
            by mx.example.com (Elemta) with ESMTPSA id 01K0…
            (version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256)
            for <user@example.com>; Sat, 21 Nov 2026 18:00:00 +0000

The protocol keyword follows RFC 3848 (ESMTP, ESMTPS, ESMTPA, ESMTPSA; UTF8SMTP…
for SMTPUTF8 per RFC 6531). The authenticated identity itself is not disclosed.
A listener with ``received_hide_client`` writes ``from authenticated-user
(hidden)`` instead of the client's name and address.
"""

from __future__ import annotations

import email.utils
import time
from datetime import datetime, timezone

from .config import Settings
from .hookspecs import hookimpl
from .models import Message, Session, Transaction


def protocol_keyword(session: Session, utf8: bool) -> str:
    base = ("UTF8SMTP" if utf8 else "ESMTP") if session.esmtp else ("UTF8SMTP" if utf8 else "SMTP")
    if session.tls is not None:
        base += "S"
    if session.auth_user is not None:
        base += "A"
    return base


def _clean(text: str) -> str:
    """A client-supplied token made safe for a header comment."""
    return "".join(c if c.isprintable() and c not in "()\\" else "?" for c in text)[:255]


class ReceivedHeader:
    def __init__(self, settings: Settings) -> None:
        self.hostname = settings.server.hostname

    @hookimpl(trylast=True)
    def received_header(self, session: Session, tx: Transaction, message: Message) -> str:
        if session.listener.received_hide_client:
            # a user's home or phone address stays in the log, not in their mail
            origin = "from authenticated-user (hidden)"
        else:
            ip = session.peer_ip
            literal = f"IPv6:{ip}" if ":" in ip else ip
            origin = f"from {_clean(session.helo or 'unknown')} (unknown [{literal}])"
        parts = [origin,
                 f"by {self.hostname} (Elemta) with "
                 f"{protocol_keyword(session, 'SMTPUTF8' in tx.mail_params)} id {tx.id}"]
        if session.tls is not None:
            t = session.tls
            parts.append(f"(version={t.version} cipher={t.cipher} bits={t.bits})")
        if len(tx.recipients) == 1:
            parts.append(f"for <{tx.recipients[0].address}>")
        return "\r\n\t".join(parts) + f"; {_date()}"


_last_date: tuple[int, str] = (0, "")


def _date() -> str:
    """RFC 5322 date of this second (formatting it costs more than the rest of the header)."""
    global _last_date
    now = int(time.time())
    if _last_date[0] != now:
        _last_date = (now, email.utils.format_datetime(datetime.fromtimestamp(now, timezone.utc)))
    return _last_date[1]


def make_plugin(settings: Settings) -> ReceivedHeader:
    return ReceivedHeader(settings)
