"""Delivery status notifications: the bounces and delay warnings the runner sends.

:func:`build_dsn` turns the outcome of one delivery attempt batch into one
RFC 3464 ``multipart/report`` message, sent from the null reverse-path ``<>``
to the original envelope sender. It is a pure function: the runner decides
when to call it and hands the result to the spool like any other message.

Decisions, and why:

* **No bounce loops.** A message whose sender is ``<>`` is itself a
  notification; nothing is ever sent about it (RFC 5321 §4.5.5).
* **RFC 3461 NOTIFY is honoured per recipient.** ``NOTIFY=NEVER`` suppresses
  everything, success reports go out only when ``SUCCESS`` was asked for, and
  without NOTIFY failures and delays are reported (§4.1 lets the MTA choose
  ``FAILURE`` or ``FAILURE,DELAY``; whether to warn about delays at all is the
  runner's schedule).
* **Headers, or the whole message when the sender asked for it.** Without
  ``RET`` (the MTA's choice, RFC 3461 §4.3), with ``RET=HDRS`` and in every
  report that has no failure in it, only the header section goes back: the
  body is the sender's own data, can be large, and a bounce with a body is
  what makes backscatter useful to spammers. With ``RET=FULL`` a failure
  report returns the whole message as ``message/rfc822`` (``message/global``
  with UTF-8 headers) when it is at most :data:`MAX_RETURNED_MESSAGE_BYTES`;
  a larger one, or ``BINARYMIME`` content (which no 8-bit MIME part can
  carry), gets its headers only, and the text part says so.
* **The text part is quoted-printable UTF-8.** Remote replies are attacker
  controlled and may be long or non-ASCII; QP keeps every line at 76 octets
  and the part 7-bit, so the DSN passes any relay without 8BITMIME. Control
  and format characters are replaced first, so a reply cannot forge lines
  that look like ours or reorder text with bidi overrides.
* **The delivery-status part is ASCII** (``message/delivery-status`` allows
  nothing else): a non-ASCII address uses the RFC 6533 ``utf-8`` address type
  in its ``\\x{HEX}`` form; other non-ASCII text becomes ``?``, and the text
  part keeps the original. Long fields are folded at spaces (RFC 5322 §2.2.3);
  a run of more than 76 non-space characters is broken with an inserted space,
  the only way to stay under the 998-octet line limit.
* **Original headers with non-ASCII text go in** ``message/global-headers``
  with ``8bit`` encoding, as RFC 6533 §6.3 recommends; such a message came in
  with SMTPUTF8, so the path back to its sender speaks 8-bit. The runner sends
  the DSN with ``BODY=8BITMIME`` when its top-level Content-Transfer-Encoding
  is ``8bit``, and with SMTPUTF8 when the sender's address is not ASCII (it is
  in ``To:``).
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import secrets
import time

from ...spool.envelope import Envelope, RecipientState
from ..smtp.encoding import DataEncoder
from .headers import (_FOLDED, MAX_RETURNED_HEADER_BYTES, _header_section, _message_id,
                      _read_header_section, _returnable_headers)
from .outcome import ACTIONS, RecipientOutcome
from .parts import _notify_allows, _status_part, _text_part
from .text import (MAX_DIAGNOSTIC_CHARS, _boundary, _checked_host, _date, _safe_queue_id,
                   _subject, _visible)

__all__ = [
    "ACTIONS",
    "MAX_DIAGNOSTIC_CHARS",
    "MAX_RETURNED_HEADER_BYTES",
    "MAX_RETURNED_MESSAGE_BYTES",
    "RecipientOutcome",
    "build_dsn",
    "is_bounce",
    "parse_dsn",
]

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")

# RET=FULL: a message up to this size goes back whole (Postfix's bounce_size_limit is 50 000)
MAX_RETURNED_MESSAGE_BYTES = 256 * 1024


def is_bounce(envelope: Envelope) -> bool:
    """Whether the message is itself a notification (null reverse-path ``<>``)."""
    return envelope.sender == ""


def build_dsn(*, envelope: Envelope, outcomes: list[RecipientOutcome], reporting_mta: str,
              original_headers: bytes | os.PathLike[str], postmaster: str | None = None,
              now: float | None = None,
              message_id_domain: str | None = None) -> tuple[str, list[str], bytes] | None:
    """Build the DSN for one attempt batch of ``envelope``.

    :param outcomes: the recipients to report, all in one message; the caller
        batches them (one DSN for this batch's failures, another for its delays).
    :param reporting_mta: this host's name, for ``From:`` and ``Reporting-MTA``.
    :param original_headers: the original message, or its header section, or a
        path to it; only the header section is read and returned, unless the
        sender asked for the full message (``RET=FULL``) and this report has a
        failure: then the whole message (bytes or file) is returned when it is
        at most :data:`MAX_RETURNED_MESSAGE_BYTES`.
    :param postmaster: an address the sender can write to for help.
    :param now: the ``Date:`` of the DSN (epoch seconds); defaults to the clock.
    :param message_id_domain: the right-hand side of the ``Message-ID``;
        defaults to ``reporting_mta``.
    :returns: ``("", [envelope.sender], message)`` — the envelope and the
        content of the DSN, CRLF line endings — or ``None`` when nothing is to
        be sent: the original is itself a bounce, no outcomes, or every
        recipient's NOTIFY excludes its outcome.
    :raises ValueError: an unknown action, a malformed status code or a
        ``reporting_mta``/``message_id_domain`` that is not a host name.
    """
    for outcome in outcomes:
        if outcome.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {outcome.action!r}")
        if not _STATUS.fullmatch(outcome.status):
            raise ValueError(f"malformed enhanced status code {outcome.status!r}")
    host = _checked_host(reporting_mta, "reporting_mta")
    id_domain = _checked_host(message_id_domain, "message_id_domain") if message_id_domain else host
    if is_bounce(envelope) or not outcomes:
        return None

    by_address: dict[str, RecipientState] = {}
    for r in envelope.recipients:
        by_address.setdefault(r.address, r)
    reported = [o for o in outcomes if _notify_allows(by_address.get(o.recipient), o.action)]
    if not reported:
        return None

    if isinstance(original_headers, (bytes, bytearray, memoryview)):
        section = _header_section(bytes(original_headers))
    else:
        section = _read_header_section(original_headers)
    returned, returned_is_utf8 = _returnable_headers(section)
    original_id = _message_id(section)
    whole: bytes | None = None
    note = None
    if (envelope.mail_params.get("RET") == "FULL" and returned
            and any(o.action == "failed" for o in reported)):
        whole = _whole_message(original_headers, envelope)
        if whole is None:
            note = ("The message was too large to return whole"
                    if envelope.mail_params.get("BODY") != "BINARYMIME"
                    else "The message holds binary content, which a report cannot carry")
            note += "; its header section is attached."

    now = time.time() if now is None else now
    text_part = _text_part(envelope, reported, host, postmaster, note)
    status_part = _status_part(envelope, reported, by_address, host)
    parts = [text_part, status_part]
    if whole is not None:
        eight_bit = not whole.isascii()
        returned_is_utf8 = eight_bit
        content_type = "message/global" if not section.isascii() else "message/rfc822"
        part_headers = (f"Content-Type: {content_type}\r\n"
                        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}\r\n"
                        "Content-Description: The original message\r\n")
        parts.append((part_headers.encode("ascii"), whole))
    elif returned:
        content_type, encoding = (("message/global-headers", "8bit") if returned_is_utf8
                                  else ("text/rfc822-headers", "7bit"))
        part_headers = (f"Content-Type: {content_type}\r\n"
                        f"Content-Transfer-Encoding: {encoding}\r\n"
                        "Content-Description: Headers of the original message\r\n")
        parts.append((part_headers.encode("ascii"), returned))

    boundary = _boundary(body for _, body in parts)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{_visible(envelope.sender, keep_breaks=False)}>",
        f"Subject: {_subject(reported)}",
        f"Date: {_date(now)}",
        f"Message-ID: <{_safe_queue_id(envelope.id)}.{secrets.token_hex(12)}@{id_domain}>",
    ]
    if original_id:
        headers += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    headers += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if returned_is_utf8 else '7bit'}",
    ]
    out = bytearray("\r\n".join(headers).encode("utf-8"))
    out += b"\r\n\r\n"
    delimiter = b"--" + boundary.encode("ascii")
    for part_headers, body in parts:
        out += delimiter + b"\r\n" + part_headers + b"\r\n" + body
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046 §5.1.1):
        # without another one the last line of a part would lose its line end.
        out += b"\r\n" if body.endswith(b"\r\n") else b"\r\n\r\n"
    out += delimiter + b"--\r\n"
    return "", [envelope.sender], bytes(out)


def _whole_message(original: bytes | os.PathLike[str], envelope: Envelope) -> bytes | None:
    """The original message to return with RET=FULL: CRLF lines of at most 998 octets.

    ``None`` when it is larger than :data:`MAX_RETURNED_MESSAGE_BYTES` or binary.
    """
    if envelope.mail_params.get("BODY") == "BINARYMIME":
        return None
    if isinstance(original, (bytes, bytearray, memoryview)):
        data = bytes(original[:MAX_RETURNED_MESSAGE_BYTES + 1])
    else:
        try:
            with open(original, "rb") as f:
                data = f.read(MAX_RETURNED_MESSAGE_BYTES + 1)
        except OSError:
            return None
    if len(data) > MAX_RETURNED_MESSAGE_BYTES or b"\0" in data:
        return None
    encoder = DataEncoder(dots=False)   # CRLF and 998-octet lines, as it would be relayed
    out = encoder.feed(data) + encoder.finish()
    return out if out.endswith(b"\r\n") else out + b"\r\n"


def parse_dsn(raw: bytes) -> list[dict[str, str]]:
    """The per-recipient field blocks of a DSN, in order, folding undone.

    Field names are kept as written (a DSN from this module uses the RFC 3464
    spelling: ``Final-Recipient``, ``Remote-MTA``…); values are the raw text,
    with no RFC 2047 decoding, since remote text must not be reinterpreted.

    :raises ValueError: the message has no ``message/delivery-status`` part.
    """
    message = email.message_from_bytes(raw, policy=email.policy.default)
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            return [{name: _FOLDED.sub("", value).strip() for name, value in block.raw_items()}
                    for block in blocks[1:]]
    raise ValueError("not a delivery status notification: no message/delivery-status part")
