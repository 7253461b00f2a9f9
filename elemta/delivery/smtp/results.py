"""What a delivery attempt tells its caller: per-recipient results, errors, server replies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Stage = Literal["connect", "greeting", "ehlo", "lhlo", "starttls", "auth", "rset", "mail", "rcpt",
                "data", "end_of_data"]

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


def default_enhanced(code: int) -> str:
    """An enhanced status for a reply that had none (RFC 3463 class only)."""
    return {2: "2.0.0", 4: "4.0.0"}.get(code // 100, "5.0.0")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome for one recipient.

    ``code``/``enhanced``/``text`` are the server's reply at ``stage`` (``rcpt``
    for a rejected recipient, ``end_of_data`` for a delivered one: under LMTP
    the reply for this recipient alone), or, when
    ``local`` is true, a reply this client made up because the server never gave
    one (lost connection, timeout, SMTPUTF8 or SIZE refusal). ``text`` joins the
    lines of a multi-line reply with a space.
    """

    recipient: str
    code: int
    enhanced: str | None
    text: str
    stage: Stage
    local: bool = False

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def temporary(self) -> bool:
        return not self.delivered and not self.permanent

    def reply(self) -> str:
        """The reply as the server sent it, for logs and DSN Diagnostic-Code fields."""
        return " ".join(filter(None, (str(self.code), self.enhanced, self.text)))


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What one :meth:`SMTPConnection.send` achieved.

    ``results`` is in the order the recipients were given. ``remote`` is
    ``mx_host[ip]:port``, ``tls`` the protocol version if the connection is
    encrypted. ``stale`` is true when the connection turned out to be dead
    before the server answered MAIL: nothing of the message can have been
    accepted, so it can be tried again at once on a fresh connection.
    ``dsn`` is true when the server offers DSN and the message's RFC 3461
    parameters went with it: the server reports on it from here on.
    """

    results: list[RecipientResult]
    remote: str
    tls: str | None
    stale: bool = False
    dsn: bool = False

    @property
    def delivered(self) -> list[RecipientResult]:
        return [r for r in self.results if r.delivered]

    @property
    def failed(self) -> list[RecipientResult]:
        return [r for r in self.results if not r.delivered]


class SMTPError(Exception):
    """The connection could not be opened or used; nothing was delivered through it.

    ``code`` is the server's reply code, or a code made up by this client when
    ``local`` is true (no reply: refused connection, timeout, failed TLS). A 535
    to AUTH is permanent; everything but a 5xx reply is temporary.
    """

    def __init__(self, code: int, enhanced: str | None, text: str, *, stage: Stage,
                 local: bool = False) -> None:
        super().__init__(" ".join(filter(None, (str(code), enhanced, text))))
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.stage = stage
        self.local = local

    @property
    def temporary(self) -> bool:
        return not 500 <= self.code < 600

    def result_for(self, recipient: str) -> RecipientResult:
        """This error as the outcome for one recipient of a message that could not be sent."""
        return RecipientResult(recipient, self.code, self.enhanced, self.text, self.stage,
                               self.local)


class Reply:
    """A server reply: its code, enhanced status (RFC 3463) and text lines.

    The client reuses the one it made for a line it reads again (``wire.py``):
    never change one.
    """

    __slots__ = ("code", "enhanced", "lines")

    def __init__(self, code: int, enhanced: str | None, lines: list[str]) -> None:
        self.code = code
        self.enhanced = enhanced
        self.lines = lines

    @property
    def text(self) -> str:
        return self.lines[0] if len(self.lines) == 1 else " ".join(self.lines)

    def result(self, recipient: str, stage: Stage) -> RecipientResult:
        return RecipientResult(recipient, self.code, self.enhanced, self.text, stage)

    def error(self, stage: Stage) -> SMTPError:
        return SMTPError(self.code, self.enhanced, self.text, stage=stage)


class Lost(Exception):
    """The conversation ended without a reply: connection lost, timeout, garbage.

    ``what`` is what the client was doing ("sending RCPT TO"); ``closed``: the
    server closed the connection (an orderly end of stream), as opposed to a
    reset, a timeout (``timed_out``) or a reply that made no sense.
    """

    def __init__(self, what: str, timed_out: bool = False, closed: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.timed_out = timed_out
        self.closed = closed
        self.note = ""  # added to the text of the error it becomes


def parse_reply(raw: list[bytes]) -> Reply:
    """One reply from its raw lines; :class:`Lost` when they are not an SMTP reply."""
    code_bytes = raw[0][:3]
    if not code_bytes.isdigit() or code_bytes[:1] not in b"2345":
        raise Lost("received a malformed reply")
    lines = []
    for line in raw:
        if line[:3] != code_bytes:
            raise Lost("received a malformed reply")
        lines.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
    enhanced = None
    first = lines[0]
    # The enhanced code's class must agree with the reply's (RFC 3463 §2).
    if first[1:2] == "." and first[:1] == chr(code_bytes[0]):
        match = _ENHANCED.match(first)
        if match is not None:
            enhanced = match.group(0).rstrip()
            cut = len(match.group(0))
            lines = [line[cut:] if line.startswith(enhanced) else line for line in lines]
    return Reply(int(code_bytes), enhanced, lines)
