"""The two report parts of a DSN: the text for people and ``message/delivery-status``."""

from __future__ import annotations

import re
import textwrap
from binascii import b2a_qp

from ...spool.envelope import Envelope, RecipientState
from .outcome import ACTIONS, RecipientOutcome
from .text import (_LINE_BREAK, _ascii_text, _date, _diagnostic_type, _fold, _host_text,


                   _mta_field, _safe_queue_id, _truncated, _visible, _wrap)

_NOTIFY_KEYWORD = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}

_DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_UTF8_ADDR_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _notify_allows(recipient: RecipientState | None, action: str) -> bool:
    notify = recipient.params.get("NOTIFY") if recipient is not None else None
    if notify is None:
        wanted = _DEFAULT_NOTIFY
    else:
        wanted = frozenset(k.strip().upper() for k in notify.split(","))
    if "NEVER" in wanted:
        return False
    return _NOTIFY_KEYWORD[action] in wanted


def _xtext_decode(text: str) -> str:
    # RFC 3461 §4: "+HH" is one octet, and the octets may spell UTF-8; under
    # SMTPUTF8 the value may also hold UTF-8 characters directly.
    octets = bytearray()
    pos = 0
    for m in _XTEXT_HEX.finditer(text):
        octets += text[pos:m.start()].encode("utf-8", "surrogatepass")
        octets.append(int(m.group(1), 16))
        pos = m.end()
    octets += text[pos:].encode("utf-8", "surrogatepass")
    return octets.decode("utf-8", "replace")


def _original_recipient_field(outcome: RecipientOutcome,
                              recipient: RecipientState | None) -> str | None:
    orcpt = outcome.original_recipient
    if orcpt is None and recipient is not None:
        orcpt = recipient.params.get("ORCPT")
        if not orcpt and recipient.original is not None:
            # rewritten (alias, redirect): the sender knows the address it wrote
            return _address_field(recipient.original)
    if not orcpt:
        return None
    addr_type, sep, value = orcpt.partition(";")
    if not sep:
        return _address_field(orcpt)
    addr_type = addr_type.strip()
    value = _xtext_decode(value.strip())
    if addr_type.lower() == "utf-8":
        value = _UTF8_ADDR_ESCAPE.sub(lambda m: _code_point(m.group(1)), value)
        return _address_field(value)
    if addr_type.lower() == "rfc822":
        return _address_field(value)
    return f"{_ascii_text(addr_type)}; {_ascii_text(value)}"


def _code_point(hex_digits: str) -> str:
    cp = int(hex_digits, 16)
    return chr(cp) if cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF else "\ufffd"


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; addr`` with ``\\x{HEX}`` escapes."""
    address = _visible(address, keep_breaks=False)
    if address.isascii():
        return f"rfc822; {address}"
    encoded = []
    for ch in address:
        # QCHAR: printable ASCII except SP, '\', '+', '=' (RFC 6533 §3)
        if "!" <= ch <= "~" and ch not in "\\+=":
            encoded.append(ch)
        else:
            encoded.append(f"\\x{{{ord(ch):X}}}")
    return "utf-8; " + "".join(encoded)


def _text_part(envelope: Envelope, reported: list[RecipientOutcome], host: str,
               postmaster: str | None, note: str | None = None) -> tuple[bytes, bytes]:
    lines = [f"This is the mail system at {host}.", ""]
    for action in ACTIONS:
        group = [o for o in reported if o.action == action]
        if not group:
            continue
        lines += _wrap(_explanation(action, group))
        lines.append("")
        for outcome in group:
            lines.append(f"  <{_visible(outcome.recipient, keep_breaks=False)}>")
            where = f" from {_host_text(outcome.remote_mta)}" if outcome.remote_mta else ""
            if outcome.diagnostic:
                said = (f"reply{where}" if _diagnostic_type(outcome.diagnostic) == "smtp"
                        else "error")
                lines.append(f"    Status {outcome.status}; {said}:")
                for reply_line in _LINE_BREAK.split(_visible(_truncated(outcome.diagnostic))):
                    lines += textwrap.wrap(reply_line, 76, initial_indent="      ",
                                           subsequent_indent="      ", break_on_hyphens=False)
            else:
                lines.append(f"    Status {outcome.status}{where}.")
            lines.append("")
    if note:
        lines += _wrap(note)
        lines.append("")
    lines.append(f"Queue ID: {_safe_queue_id(envelope.id)}")
    lines.append(f"Arrival date: {_date(envelope.received_at)}")
    if postmaster:
        lines.append("")
        lines += _wrap("For help, write to the postmaster at "
                       f"<{_visible(postmaster, keep_breaks=False)}> and include this report.")
    lines.append("")
    text = "\r\n".join(lines).encode("utf-8")
    headers = (b"Content-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n"
               b"Content-Description: Notification\r\n")
    return headers, b2a_qp(text, istext=True)


_EXPLANATIONS = {
    "failed": ("Your message could not be delivered to the recipients below. This is a "
               "permanent error; the message will not be retried."),
    "delayed": ("Your message has not yet been delivered to the recipients below. Delivery "
                "will be retried{until}; you do not need to send it again."),
    "delivered": "Your message was delivered to the recipients below.",
    "relayed": ("Your message was passed on for the recipients below to a server that does "
                "not send delivery reports; you may hear nothing more about it."),
    "expanded": ("Your message was delivered to the lists or aliases below, which pass it "
                 "on to their members."),
}


def _explanation(action: str, group: list[RecipientOutcome]) -> str:
    deadlines = [o.will_retry_until for o in group if o.will_retry_until is not None]
    until = f" until {_date(max(deadlines))}" if deadlines else ""
    return _EXPLANATIONS[action].format(until=until)


def _status_part(envelope: Envelope, reported: list[RecipientOutcome],
                 by_address: dict[str, RecipientState], host: str) -> tuple[bytes, bytes]:
    per_message: list[tuple[str, str]] = []
    envid = envelope.mail_params.get("ENVID")
    if envid:
        per_message.append(("Original-Envelope-Id", _ascii_text(_xtext_decode(envid))))
    per_message += [
        ("Reporting-MTA", f"dns; {host}"),
        ("X-Elemta-Queue-ID", _safe_queue_id(envelope.id)),
        ("Arrival-Date", _date(envelope.received_at)),
    ]
    blocks = [per_message]
    for outcome in reported:
        recipient = by_address.get(outcome.recipient)
        fields: list[tuple[str, str]] = []
        original = _original_recipient_field(outcome, recipient)
        if original:
            fields.append(("Original-Recipient", original))
        fields += [
            ("Final-Recipient", _address_field(outcome.recipient)),
            ("Action", outcome.action),
            ("Status", outcome.status),
        ]
        if outcome.remote_mta:
            fields.append(("Remote-MTA", _mta_field(outcome.remote_mta)))
        if outcome.diagnostic:
            diagnostic = _ascii_text(_truncated(outcome.diagnostic))
            fields.append(("Diagnostic-Code",
                           f"{_diagnostic_type(outcome.diagnostic)}; {diagnostic}"))
        if outcome.last_attempt is not None:
            fields.append(("Last-Attempt-Date", _date(outcome.last_attempt)))
        if outcome.action == "delayed" and outcome.will_retry_until is not None:
            fields.append(("Will-Retry-Until", _date(outcome.will_retry_until)))
        blocks.append(fields)
    # RFC 3464 §2.1: the blocks are separated by one blank line each.
    text = "\r\n\r\n".join("\r\n".join(line for name, value in block
                                       for line in _fold(name, value))
                           for block in blocks) + "\r\n"
    headers = (b"Content-Type: message/delivery-status\r\n"
               b"Content-Transfer-Encoding: 7bit\r\n"
               b"Content-Description: Delivery report\r\n")
    return headers, text.encode("ascii")
