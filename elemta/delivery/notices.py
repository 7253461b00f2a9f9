"""Success notifications (RFC 3461 ``NOTIFY=SUCCESS``): "delivered" and "relayed" reports.

The runner asks for them around one delivery attempt:

1. :func:`headers_if_wanted`, before the attempt: the original's header
   section, read only when a pending recipient asked for ``SUCCESS`` (a message
   delivered to everyone leaves the spool within the attempt, and a report
   returns its headers, RFC 3461 §4.3).
2. :func:`send_success`, after the attempt has been recorded: one report for
   the recipients delivered in it that asked for ``SUCCESS``, queued like a
   bounce (from ``<>`` to the envelope sender, never about a message from
   ``<>``).

Which action a recipient gets (RFC 3464 §2.3.3):

* ``delivered``: the message went into a mailbox (a local transport, LMTP:
  anything whose outcome is not ``relayed``);
* ``relayed``: it went on to a mail server that does not offer DSN, so no
  further report can come;
* nothing: it went on to a server that offers DSN and took the parameters
  (``Outcome.dsn_passed``); that server reports success at the end of the
  path, and a report from here would be a second one.

A report is queued after the deliveries are recorded, so a crash in between
can lose it (the delivery itself is never repeated for it): success reports
are advisory, failure reports are not (those are queued before the failures
are recorded).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from ..models import Outcome, new_id
from ..spool.envelope import DELIVERED, Envelope, RecipientState, params_for
from . import dsn
from .dsn.headers import _read_header_section

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger("elemta.delivery")


def asked_for_success(recipient: RecipientState) -> bool:
    notify = recipient.params.get("NOTIFY")
    return bool(notify) and "SUCCESS" in notify.upper().split(",")


def headers_if_wanted(envelope: Envelope, pending: list[RecipientState],
                      content: str | os.PathLike[str]) -> bytes | None:
    """The header section of the message in ``content``, if a success report may be sent."""
    if dsn.is_bounce(envelope) or not any(asked_for_success(r) for r in pending):
        return None
    try:
        return _read_header_section(content)
    except OSError:
        return b""


def success_outcomes(delivered: list[tuple[RecipientState, Outcome]],
                     now: float) -> list[dsn.RecipientOutcome]:
    """The report lines for the recipients that asked for success and get one from here."""
    out = []
    for rcpt, outcome in delivered:
        if not outcome.delivered or not asked_for_success(rcpt) or outcome.dsn_passed:
            continue
        out.append(dsn.RecipientOutcome(
            recipient=rcpt.address, action="relayed" if outcome.relayed else "delivered",
            status=outcome.enhanced if outcome.enhanced.startswith("2.") else "2.0.0",
            diagnostic=outcome.reply(), remote_mta=outcome.remote, last_attempt=now))
    return out


async def send_success(runner: Runner, envelope: Envelope, pending: list[RecipientState],
                       outcomes: dict[str, Outcome], headers: bytes | None,
                       now: float | None = None) -> str | None:
    """Queue the success report for this attempt, if any is due; its queue id.

    ``pending`` and ``outcomes`` are the attempt's (``Runner.attempt``);
    ``headers`` what :func:`headers_if_wanted` returned before it. Never raises
    for a report that cannot be queued: it is logged, the mail is delivered.
    """
    if headers is None:
        return None
    now = time.time() if now is None else now
    delivered = [(r, outcomes[r.address]) for r in pending
                 if r.state == DELIVERED and r.address in outcomes]
    reports = success_outcomes(delivered, now)
    if not reports:
        return None
    built = dsn.build_dsn(envelope=envelope, outcomes=reports, reporting_mta=runner.hostname,
                          original_headers=headers, now=now)
    if built is None:
        return None
    sender, recipients, message = built
    notice_id = new_id()
    notice = Envelope(id=notice_id, sender=sender,
                      recipients=[RecipientState(r) for r in recipients],
                      received_at=now, size=len(message),
                      mail_params=params_for(message, sender, recipients),
                      listener=None, trace=[{"notice_of": envelope.id}])
    try:
        await runner.spool.commit_bytes(notice, message)
    except Exception as e:
        log.error("%s: success report for %d recipient(s) not queued: %s", envelope.id,
                  len(reports), e)
        return None
    log.info("%s: success report %s queued to <%s> for %d recipient(s)", envelope.id,
             notice_id, envelope.sender, len(reports))
    return notice_id
