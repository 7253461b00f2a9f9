"""What the runner reports about each recipient, and the actions a DSN can report."""

from __future__ import annotations

from dataclasses import dataclass


ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")


@dataclass(frozen=True)
class RecipientOutcome:
    """What happened to one recipient in this attempt batch.

    ``diagnostic`` is the remote reply as received (multi-line replies joined
    with line breaks are fine), or a local explanation such as
    ``"connect to mx1.example.com: Connection refused"``; an SMTP reply gets
    the ``smtp`` diagnostic type, anything else ``X-Elemta``.

    ``original_recipient`` is the RCPT ``ORCPT`` value (``addr-type;xtext``,
    e.g. ``"rfc822;bob+2Bx@example.com"``) or a plain address. When it is
    ``None`` the ORCPT parameter of the matching envelope recipient is used.
    """

    recipient: str
    action: str
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    original_recipient: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None
