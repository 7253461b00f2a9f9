"""What a milter's answer, or its failure, means to the SMTP client: Elemta verdicts."""

from __future__ import annotations

import logging

from elemta import Disconnect, Reject, TempFail, Verdict

from . import protocol as p

log = logging.getLogger("elemta.milter")

# the replies Sendmail and Postfix give for a plain SMFIR_REJECT / SMFIR_TEMPFAIL
REJECT_TEXT = "Command rejected"
TEMPFAIL_TEXT = "Service unavailable - try again later"


def replycode(milter: str, data: bytes) -> Verdict:
    """SMFIR_REPLYCODE: ``5xx`` a Reject, ``421`` a Disconnect, other ``4xx`` a TempFail;
    a malformed one a plain reject, as Sendmail answers it."""
    rc = p.parse_replycode(data, REJECT_TEXT)
    if rc is None:
        log.warning("milter %s: malformed SMFIR_REPLYCODE %r; answering 550 instead",
                    milter, data[:200])
        return Reject(550, "5.7.1", REJECT_TEXT)
    if rc.code == 421:
        return Disconnect(421, rc.enhanced, rc.text)
    if rc.code >= 500:
        return Reject(rc.code, rc.enhanced, rc.text)
    return TempFail(rc.code, rc.enhanced, rc.text)


def failure_verdict(on_failure: str, stage: str) -> Verdict | None:
    """The verdict of a failed milter at a stage. At connect and HELO the failure is
    answered at the next MAIL FROM: the client gets a plain 4xx for its message."""
    if on_failure == "accept" or stage in ("connect", "helo"):
        return None
    if on_failure == "reject":
        return Reject(550, "5.7.1", "Service unavailable")
    return TempFail(451, "4.7.1", TEMPFAIL_TEXT)


def describe(v: Verdict) -> str:
    """``reject 550 5.7.1 text``, for the log."""
    code = getattr(v, "code", None)
    if code is not None:
        return f"{type(v).__name__.lower()} {code} {getattr(v, 'enhanced', '')} " \
               f"{getattr(v, 'text', '')}"
    return type(v).__name__.lower()
