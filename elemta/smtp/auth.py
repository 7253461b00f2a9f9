"""AUTH (RFC 4954): the SASL exchange, then the ``auth`` hook decides.

The mechanisms decode what the client sends into
:class:`~elemta.models.Credentials`; only a plugin can say yes (there is no
"accept everybody" default). AUTH is offered only over TLS unless the listener
sets ``allow_plaintext_auth``; no password ever reaches a log line.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import TYPE_CHECKING

from .. import verdicts as v
from ..hookcall import HookFailure
from ..models import Credentials
from . import replies
from .errors import Close

if TYPE_CHECKING:
    from .protocol import ElemtaSMTP

log = logging.getLogger("elemta.smtp")

MECHANISMS = ("PLAIN", "LOGIN")

_USERNAME = "VXNlcm5hbWU6"  # base64 "Username:"
_PASSWORD = "UGFzc3dvcmQ6"  # base64 "Password:"


def allowed(proto: ElemtaSMTP) -> bool:
    """Whether the session may authenticate: over TLS, or where plaintext is allowed."""
    return proto.conn.tls is not None or proto.listener.allow_plaintext_auth  # type: ignore[union-attr]


def offered(proto: ElemtaSMTP) -> bool:
    """Whether EHLO lists AUTH."""
    return allowed(proto) and proto.conn.auth_user is None  # type: ignore[union-attr]


async def command(proto: ElemtaSMTP, arg: str | None) -> None:
    """AUTH mechanism [initial-response]."""
    conn = proto.conn
    assert conn is not None
    if conn.helo is None or not conn.esmtp:
        proto.reply(replies.EHLO_FIRST)
        return
    if not allowed(proto):
        proto.reply(replies.ENCRYPTION_REQUIRED)
        return
    if conn.auth_user is not None:
        proto.reply(replies.ALREADY_AUTHENTICATED)
        return
    if proto.tx is not None:
        proto.reply(replies.AUTH_IN_TRANSACTION)
        return
    if not arg:
        proto.reply(replies.AUTH_SYNTAX)
        return
    mechanism, _, initial = arg.partition(" ")
    mechanism = mechanism.upper()
    initial = initial.strip()
    if mechanism == "PLAIN":
        creds = await _plain(proto, initial or None)
    elif mechanism == "LOGIN":
        creds = await _login(proto, initial or None)
    else:
        proto.reply(replies.UNKNOWN_MECHANISM)
        return
    if creds is None:
        return
    await _decide(proto, mechanism, creds)


async def _decide(proto: ElemtaSMTP, mechanism: str, creds: Credentials) -> None:
    """Ask the ``auth`` hook and answer."""
    conn = proto.conn
    assert conn is not None
    try:
        answer = await proto.ctx.hooks.call("auth", session=conn, mechanism=mechanism,
                                            credentials=creds)
    except HookFailure as f:
        proto.count_reject("auth", f.plugin, 454)
        proto.reply(replies.AUTH_TEMPORARY)
        return
    plugin, verdict = answer.plugin, answer.value
    if isinstance(verdict, v.Accept):
        conn.auth_user = creds.login
        log.info("session %s: authenticated as %s (%s)", conn.id, creds.login, mechanism)
        proto.reply(replies.AUTH_OK)
        return
    if isinstance(verdict, v.TempFail):
        proto.count_reject("auth", plugin, verdict.code)
        proto.reply(replies.auth_temporary(verdict))
        return
    if isinstance(verdict, v.Disconnect):
        proto.verdict_reply("auth", plugin, verdict)
    proto.auth_failures += 1
    log.info("session %s: authentication failed for %s (%s)", conn.id, creds.login, mechanism)
    proto.count_reject("auth", plugin, 535)
    proto.reply(replies.AUTH_INVALID)
    if proto.auth_failures >= proto.ctx.settings.server.max_auth_failures:
        proto.reply(replies.TOO_MANY_AUTH_FAILURES)
        raise Close


async def _read_response(proto: ElemtaSMTP, challenge: str) -> str | None:
    """Send a ``334`` challenge and read the answer; ``None`` if the exchange ended."""
    proto.reply(replies.challenge(challenge))
    proto.flush()
    line = await proto.read_line()
    if line is None:
        return None
    text = line.rstrip(b"\r\n").decode("ascii", "replace")
    if text == "*":
        proto.reply(replies.AUTH_CANCELLED)
        return None
    return text


def _b64(proto: ElemtaSMTP, text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        proto.reply(replies.BAD_BASE64)
        return None


async def _plain(proto: ElemtaSMTP, initial: str | None) -> Credentials | None:
    """RFC 4616: ``authzid NUL authcid NUL passwd``."""
    if initial is None:
        initial = await _read_response(proto, "")
        if initial is None:
            return None
    raw = _b64(proto, initial) if initial != "=" else b""
    if raw is None:
        return None
    parts = raw.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        proto.reply(replies.MALFORMED_PLAIN)
        return None
    authzid, login, password = (p.decode("utf-8", "surrogateescape") for p in parts)
    if authzid and authzid != login:
        proto.reply(replies.AUTHZID_MISMATCH)
        return None
    return Credentials("PLAIN", login, password)


async def _login(proto: ElemtaSMTP, initial: str | None) -> Credentials | None:
    """The LOGIN mechanism: user name, then password, each base64 after a prompt."""
    if initial is None:
        initial = await _read_response(proto, _USERNAME)
        if initial is None:
            return None
    login = _b64(proto, initial)
    if login is None:
        return None
    answer = await _read_response(proto, _PASSWORD)
    if answer is None:
        return None
    password = _b64(proto, answer)
    if password is None:
        return None
    return Credentials("LOGIN", login.decode("utf-8", "surrogateescape"),
                       password.decode("utf-8", "surrogateescape"))
