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
* **Headers only, never the body**, even with ``RET=FULL``: the body is the
  sender's own data, can be large, and a bounce with a body is what makes
  backscatter useful to spammers. The header section is enough to diagnose.
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
import textwrap
import time
import unicodedata
from binascii import b2a_qp
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from ..spool.envelope import Envelope, RecipientState

__all__ = [
    "ACTIONS",
    "MAX_DIAGNOSTIC_CHARS",
    "MAX_RETURNED_HEADER_BYTES",
    "RecipientOutcome",
    "build_dsn",
    "is_bounce",
    "parse_dsn",
]

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")

# A hostile server can send a reply of any length; this is plenty for a real one.
MAX_DIAGNOSTIC_CHARS = 2000
# Enough for long DKIM/ARC chains; bounds the DSN when the original carried megabytes of headers.
MAX_RETURNED_HEADER_BYTES = 64 * 1024

_MAX_LINE_OCTETS = 998  # RFC 5322 §2.1.1, without the CRLF
_FOLD_WIDTH = 78        # RFC 5322 §2.1.1 "SHOULD"

_NOTIFY_KEYWORD = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}
_DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Za-z:.-]{1,253}\]")
_SMTP_REPLY = re.compile(r"[245][0-9][0-9](?:[ -]|$)")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_UTF8_ADDR_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_MSG_ID = re.compile(r"<[!-;=?-~]{1,900}>")  # no '<' or '>' inside, no space or control
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 5322 ftext, then the colon; within the first line once long lines are split
_FIELD_START = re.compile(rb"[!-9;-~]{1,997}:")
_FOLDED = re.compile(r"\r?\n(?=[ \t])")

# Characters that must not reach a reader unchanged: controls (line breaks, ESC,
# NUL), format characters (bidi overrides, zero-width joiners), lone surrogates
# from surrogateescape decoding, and Unicode line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


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
        path to it; only the header section is read and returned.
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

    now = time.time() if now is None else now
    text_part = _text_part(envelope, reported, host, postmaster)
    status_part = _status_part(envelope, reported, by_address, host)
    parts = [text_part, status_part]
    if returned:
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


def _read_header_section(path: str | os.PathLike[str]) -> bytes:
    """The header section of the message in ``path``, cut like :func:`_header_section`.

    Reads line by line and stops at the blank line, so the body is never read.
    """
    lines: list[bytes] = []
    total = 0
    with open(path, "rb") as f:
        while total <= MAX_RETURNED_HEADER_BYTES:
            line = f.readline(MAX_RETURNED_HEADER_BYTES + 1 - total)
            if not line or line in (b"\r\n", b"\n"):
                break
            lines.append(line)
            total += len(line)
    return b"".join(lines)


# ------------------------------------------------------------------ NOTIFY, ORCPT, ENVID


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


# ------------------------------------------------------------------ the three parts


def _text_part(envelope: Envelope, reported: list[RecipientOutcome], host: str,
               postmaster: str | None) -> tuple[bytes, bytes]:
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


def _header_section(message: bytes) -> bytes:
    """Everything before the first empty line; the whole input when there is none."""
    if message.startswith((b"\r\n", b"\n")):
        return b""
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    section = message[:min(ends)] if ends else message
    return section[:MAX_RETURNED_HEADER_BYTES + 1]


def _returnable_headers(section: bytes) -> tuple[bytes, bool]:
    """The header section made safe to embed: CRLF lines ≤ 998 octets, no controls.

    Returns ``(text, is_utf8)``; non-ASCII octets that are not UTF-8 become
    U+FFFD, since ``message/global-headers`` is UTF-8 by definition. A line
    that is neither a field nor a continuation ends the section, as it does
    for a parser reading the original, so what is returned always parses.
    """
    out: list[bytes] = []
    total = 0
    for line in re.split(rb"\r\n|\n", section):
        continuation = line[:1] in (b" ", b"\t")
        if continuation and not out:
            continue
        if not continuation and not _FIELD_START.match(line):
            break
        if not line.isascii():
            line = line.decode("utf-8", "replace").encode("utf-8")
        line = _CONTROL_BYTES.sub(b"?", line)
        pieces = _split_long_line(line)
        size = sum(len(p) + 2 for p in pieces)
        if total + size > MAX_RETURNED_HEADER_BYTES:
            if continuation:  # drop the whole field rather than return half of it
                while out and out[-1][:1] in (b" ", b"\t"):
                    out.pop()
                if out:
                    out.pop()
            break
        out += pieces
        total += size
    if not out:
        return b"", False
    text = b"\r\n".join(out) + b"\r\n"
    return text, not text.isascii()


def _split_long_line(line: bytes) -> list[bytes]:
    pieces = []
    while len(line) > _MAX_LINE_OCTETS:
        cut = _MAX_LINE_OCTETS
        while 0x80 <= line[cut] <= 0xBF:  # never cut a UTF-8 sequence in two
            cut -= 1
        pieces.append(line[:cut])
        # A leading space turns the rest into a continuation line of the same field.
        line = b" " + line[cut:]
    pieces.append(line)
    return pieces


def _message_id(section: bytes) -> str | None:
    text = section.decode("ascii", "replace")
    unfolded = _FOLDED.sub("", text.replace("\r\n", "\n"))
    for line in unfolded.split("\n"):
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "message-id":
            m = _MSG_ID.search(value)
            return m.group(0) if m and "@" in m.group(0) else None
    return None


# ------------------------------------------------------------------ text hygiene


def _visible(text: str, *, keep_breaks: bool = True) -> str:
    """``text`` with every control or format character replaced by ``?``.

    With ``keep_breaks`` line breaks survive (as ``\\n``) for the caller to split on.
    """
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif ch in "\r\n" and keep_breaks:
            out.append(ch)
        elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            out.append("?")
        elif unicodedata.category(ch) == "Zs":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _ascii_text(text: str) -> str:
    """One line of printable ASCII: line breaks become spaces, runs of spaces one space."""
    one_line = " ".join(_LINE_BREAK.split(text))
    printable = "".join(ch if " " <= ch <= "~" else "?" for ch in _visible(one_line))
    return " ".join(printable.split())


def _diagnostic_type(diagnostic: str) -> str:
    """RFC 3464 §2.3.6: ``smtp`` only for an SMTP reply; local errors get our own type."""
    return "smtp" if _SMTP_REPLY.match(diagnostic.lstrip()) else "X-Elemta"


# a host name, optionally with the address and port a transport reports after it
_DNS_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?:\[[0-9A-Fa-f.:]+\])?"
                       r"(?::\d+)?$")


def _mta_field(remote: str) -> str:
    """``dns; mx.example.net`` for a host (``mx.example.net[192.0.2.1]:25``); else another type.

    A local delivery agent is no DNS name (``lmtp:unix:/run/dovecot/lmtp``),
    and RFC 3464 §2.3.5 wants the name type to say what the name is.
    """
    m = _DNS_NAME.match(_host_text(remote))
    if m is not None:
        return f"dns; {m.group(1)}"
    return f"x-local; {_ascii_text(remote.strip())}"


def _host_text(name: str) -> str:
    """A remote host name for the ``dns`` name type, which is ASCII: U-labels become A-labels."""
    name = name.strip().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # not a valid IDN: _ascii_text marks the characters instead
    return _ascii_text(name)


def _truncated(text: str) -> str:
    if len(text) <= MAX_DIAGNOSTIC_CHARS:
        return text
    return text[:MAX_DIAGNOSTIC_CHARS] + " [...]"


def _fold(name: str, value: str) -> list[str]:
    """``name: value`` as RFC 5322 folded lines; ``value`` is one line of ASCII
    with single spaces, so no line is ever whitespace only."""
    words = value.split(" ") if value else []
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        # A word too long for any line is cut; each piece gets its own line.
        room = _FOLD_WIDTH - 1
        pieces = [word[i:i + room] for i in range(0, len(word), room)] or [""]
        for piece in pieces:
            if (piece and len(line) + 1 + len(piece) > _FOLD_WIDTH
                    and line.strip() != f"{name}:"):
                lines.append(line)
                line = ""
            line += " " + piece
    lines.append(line)
    return lines


def _wrap(paragraph: str) -> list[str]:
    return textwrap.wrap(paragraph, 72, break_on_hyphens=False)


def _subject(reported: list[RecipientOutcome]) -> str:
    actions = {o.action for o in reported}
    for action in ("failed", "delayed"):
        if action in actions:
            return _SUBJECTS[action]
    return _SUBJECTS["delivered"]


def _date(epoch_seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(epoch_seconds), tz=UTC))


def _safe_queue_id(queue_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", queue_id) or "_"


def _checked_host(name: str, what: str) -> str:
    name = name.rstrip(".") if not name.startswith("[") else name
    if not _HOST.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a host name")
    return name


def _boundary(bodies: Iterable[bytes]) -> str:
    contents = list(bodies)
    while True:
        # "=_" never occurs in quoted-printable text, and the random part in nothing else.
        boundary = f"=_elemta_{secrets.token_hex(12)}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in body for body in contents):
            return boundary
