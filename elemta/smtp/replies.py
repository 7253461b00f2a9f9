"""Every reply the SMTP server sends, by name.

A reply is written once here, with its enhanced status code (RFC 3463, RFC
2034), and the session sends it by name: ``session.reply(replies.SENDER_OK)``.
Replies that carry a value (a host name, a queue id) are functions. A plugin's
verdict becomes a reply through :meth:`Reply.of`. Nothing else in the SMTP
layer spells out a reply code; ``tests/test_replies.py`` holds it to that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..verdicts import Disconnect, Reject, TempFail


class Reply:
    """One SMTP reply; ``wire`` is what goes on the connection, CRLF included."""

    __slots__ = ("code", "enhanced", "text", "wire")

    def __init__(self, code: int, enhanced: str | None, text: str) -> None:
        self.code = code
        self.enhanced = enhanced
        self.text = text
        line = f"{code} {enhanced} {text}" if enhanced else f"{code} {text}"
        self.wire = line.encode("utf-8", "surrogateescape") + b"\r\n"

    @classmethod
    def of(cls, verdict: Reject | TempFail | Disconnect, code: int | None = None) -> Reply:
        """The reply a plugin's verdict asks for (``code`` overrides the verdict's)."""
        return cls(verdict.code if code is None else code, verdict.enhanced, verdict.text)

    @classmethod
    def multiline(cls, code: int, lines: Sequence[str]) -> Reply:
        """A reply of several lines (EHLO): ``250-first`` … ``250 last``."""
        reply = cls(code, None, lines[-1])
        reply.wire = "".join(f"{code}-{line}\r\n" for line in lines[:-1]).encode(
            "utf-8", "surrogateescape") + reply.wire
        return reply

    def __str__(self) -> str:
        return self.wire.decode("utf-8", "surrogateescape").rstrip("\r\n")

    def __repr__(self) -> str:
        return f"<Reply {self}>"


# ------------------------------------------------------------------ connection


def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP Elemta")


def connect_failed(hostname: str) -> Reply:
    """A ``connect`` plugin failed: a 451 is no valid greeting (RFC 5321 §3.1)."""
    return Reply(421, "4.3.0", f"{hostname} temporary local problem, closing")


def timed_out(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def too_many_connections(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Too many connections, try again later")


def too_many_from_address(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Too many connections from your address")


SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
BYE = Reply(221, "2.0.0", "Bye")

# ------------------------------------------------------------------ commands in general

OK = Reply(250, "2.0.0", "Ok")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
UNRECOGNIZED = Reply(500, "5.5.2", "Syntax error, command unrecognized")
EMPTY_COMMAND = Reply(500, "5.5.2", "Syntax error, empty command")
GREETING_WAS_REFUSED = Reply(503, "5.5.1", "Bad sequence of commands: the greeting was refused")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
LOCAL_FAILURE = Reply(451, "4.3.0", "Temporary local problem, please try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, please try again later")
RSET_SYNTAX = Reply(501, "5.5.4", "Syntax: RSET")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_UNSUPPORTED = Reply(502, "5.5.1", "EXPN not supported")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT "
                           "VRFY STARTTLS AUTH")

# ------------------------------------------------------------------ HELO, EHLO, STARTTLS


def helo_syntax(verb: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {verb} hostname")


def helo_ok(hostname: str) -> Reply:
    return Reply(250, None, hostname)


def ehlo_ok(hostname: str, keywords: Sequence[str]) -> Reply:
    return Reply.multiline(250, [hostname, *keywords])


EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first")
STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
STARTTLS_UNAVAILABLE = Reply(502, "5.5.1", "STARTTLS not available on this port")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_BUSY = Reply(454, "4.7.0", "TLS not available due to temporary reason")

# ------------------------------------------------------------------ AUTH (RFC 4954)

AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11",
                            "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available")   # no plugin checks logins
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
AUTHZID_REFUSED = Reply(535, "5.7.8", "Not authorized to act as that identity")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0",
                               "Too many authentication failures, closing connection")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")
MALFORMED_PLAIN = Reply(501, "5.5.2", "Malformed AUTH PLAIN response")
MALFORMED_SCRAM = Reply(501, "5.5.2", "Malformed SCRAM-SHA-256 message")
SCRAM_NO_AUTHZID = Reply(504, "5.5.4", "No authorization identity with SCRAM-SHA-256; "
                         "use PLAIN for that")


def auth_locked(seconds: float) -> Reply:
    """Too many failed logins from this address (or for this login): try later."""
    minutes = max(1, round(seconds / 60))
    return Reply(454, "4.7.0", f"Too many failed logins; try again in {minutes} "
                 f"minute{'s' if minutes != 1 else ''}")


def auth_temporary(verdict: TempFail) -> Reply:
    """A ``TempFail`` at AUTH is always a 454 (RFC 4954), with the plugin's words."""
    return Reply.of(verdict, code=454)


def challenge(base64_text: str) -> Reply:
    return Reply(334, None, base64_text)


# ------------------------------------------------------------------ MAIL, RCPT

HELO_FIRST = Reply(503, "5.5.1", "Send HELO/EHLO first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
MAIL_PARAMS_NEED_EHLO = Reply(555, "5.5.4", "MAIL parameters require EHLO")
RCPT_PARAMS_NEED_EHLO = Reply(555, "5.5.4", "RCPT parameters require EHLO")
SIZE_SYNTAX = Reply(501, "5.5.4", "Syntax: SIZE=<number>")
BODY_SYNTAX = Reply(501, "5.5.4", "Syntax: BODY=7BIT|8BITMIME|BINARYMIME")
RET_SYNTAX = Reply(501, "5.5.4", "Syntax: RET=FULL|HDRS")
ENVID_SYNTAX = Reply(501, "5.5.4", "Syntax: ENVID=<xtext of at most 100 characters>")
NOTIFY_SYNTAX = Reply(501, "5.5.4", "Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY "
                      "(one or more)")
ORCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: ORCPT=<address type>;<xtext address>, "
                     "e.g. ORCPT=rfc822;user@example.com")
SMTPUTF8_TAKES_NO_VALUE = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")  # no plugin accepted the recipient


def mail_param_unsupported(keyword: str) -> Reply:
    return Reply(555, "5.5.4", f"MAIL parameter {keyword} not supported")


def rcpt_param_unsupported(keyword: str) -> Reply:
    return Reply(555, "5.5.4", f"RCPT parameter {keyword} not supported")


def path_error(code: int, enhanced: str, text: str) -> Reply:
    """A MAIL FROM or RCPT TO argument refused by the address parser."""
    return Reply(code, enhanced, text)


# ------------------------------------------------------------------ DATA

NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_NEWLINE = Reply(550, "5.5.2",
                     "Message contains a bare CR or LF; lines must end with CRLF")
NUL_IN_DATA = Reply(554, "5.6.0", "Message contains a NUL character, which mail may not carry")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA cannot follow BDAT in one transaction; send RSET")
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", "BODY=BINARYMIME content must be sent with BDAT")
SPOOL_FAILURE = Reply(451, "4.3.0", "Local error in processing, please try again later")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, please try again later")


def chunk_received(size: int, total: int) -> Reply:
    return Reply(250, "2.0.0", f"{size} octets received, {total} in all")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def discarded(queue_id: str) -> Reply:
    """``Discard``: the client is told the same as for mail that was kept."""
    return Reply(250, "2.0.0", f"Ok: {queue_id}")
