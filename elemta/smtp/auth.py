"""AUTH (RFC 4954): the SASL exchange, then the plugins decide.

Mechanisms:

* **PLAIN** (RFC 4616) and **LOGIN** decode what the client sends into
  :class:`~elemta.models.Credentials`, and the ``auth`` hook checks them.
* **SCRAM-SHA-256** (RFC 5802, RFC 7677) runs here, with :mod:`scramp`; the
  ``scram_keys`` hook supplies what the server stored for the login, so the
  password never crosses the wire. Offered while some plugin implements it.
  No channel binding (``-PLUS``) and no authorization identity.

Only a plugin can say yes: there is no "accept everybody" default. An
authorization identity other than the login needs the ``authorize`` hook's
consent. AUTH is offered only over TLS unless the listener sets
``allow_plaintext_auth``. Failed logins are slowed down and locked out per
client address and per login (:mod:`.guard`). No password ever reaches a log
line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
from typing import TYPE_CHECKING

from .. import verdicts as v
from ..hookcall import HookCaller, HookFailure
from ..models import Credentials, ScramKeys
from . import replies
from .errors import Close

if TYPE_CHECKING:
    from .protocol import ElemtaSMTP

log = logging.getLogger("elemta.smtp")

SCRAM = "SCRAM-SHA-256"
PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")

_USERNAME = "VXNlcm5hbWU6"  # base64 "Username:"
_PASSWORD = "UGFzc3dvcmQ6"  # base64 "Password:"
# made-up SCRAM keys for unknown logins are derived from this, per process
_FAKE_SECRET = os.urandom(32)


def allowed(proto: ElemtaSMTP) -> bool:
    """Whether the session may authenticate: over TLS, or where plaintext is allowed."""
    conn = proto.conn
    assert conn is not None
    return conn.tls is not None or proto.listener.allow_plaintext_auth


ALL_MECHANISMS = (SCRAM, *PASSWORD_MECHANISMS)   # strongest first


def available(hooks: HookCaller) -> tuple[str, ...]:
    """The mechanisms the enabled plugins can check, strongest first (asked once).

    A plugin counts for what its ``auth_mechanisms`` says, or else for the
    hooks it implements: ``auth`` for PLAIN and LOGIN, ``scram_keys`` for
    SCRAM-SHA-256.
    """
    declared: dict[str, set[str]] = {}
    for plugin, names in hooks.call_at_startup("auth_mechanisms").items:
        wanted = {str(n).upper() for n in names}
        unknown = wanted - set(ALL_MECHANISMS)
        if unknown:
            log.warning("plugin %s names SASL mechanisms Elemta does not speak: %s (it "
                        "speaks %s)", plugin, ", ".join(sorted(unknown)),
                        ", ".join(ALL_MECHANISMS))
        declared[plugin] = wanted
    found: set[str] = set()
    for hook, names in (("auth", set(PASSWORD_MECHANISMS)), ("scram_keys", {SCRAM})):
        for impl in hooks.impls(hook):
            found |= names & declared.get(impl.plugin, names)
    return tuple(m for m in ALL_MECHANISMS if m in found)


def mechanisms(proto: ElemtaSMTP) -> tuple[str, ...]:
    """The mechanisms some plugin can check, strongest first."""
    ctx = proto.ctx
    if ctx.auth_mechanisms is None:
        ctx.auth_mechanisms = available(ctx.hooks)
    return ctx.auth_mechanisms


def offered(proto: ElemtaSMTP) -> tuple[str, ...]:
    """The mechanisms EHLO lists (none before TLS, after a login, or without a plugin)."""
    if not allowed(proto) or proto.conn.auth_user is not None:  # type: ignore[union-attr]
        return ()
    return mechanisms(proto)


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
    available = mechanisms(proto)
    if not available:
        proto.reply(replies.AUTH_UNAVAILABLE)
        return
    if mechanism not in available:
        proto.reply(replies.UNKNOWN_MECHANISM)
        return
    left = proto.ctx.auth_guard.client_locked(conn.peer_ip)
    if left:
        _count(proto, mechanism, "locked")
        proto.reply(replies.auth_locked(left))
        return
    if mechanism == SCRAM:
        await _scram(proto, initial or None)
        return
    if mechanism == "PLAIN":
        creds = await _plain(proto, initial or None)
    else:
        creds = await _login(proto, initial or None)
    if creds is None:
        _count(proto, mechanism, "aborted")
        return
    await _check_password(proto, creds)


# ------------------------------------------------------------------ outcomes


def _plugin_failed(proto: ElemtaSMTP, mechanism: str, failure: HookFailure) -> None:
    """A plugin raised or timed out: ``454 4.7.0``, the RFC 4954 temporary failure."""
    proto.count_reject("auth", failure.plugin, 454)
    _count(proto, mechanism, "tempfail")
    proto.reply(replies.AUTH_TEMPORARY)


def _count(proto: ElemtaSMTP, mechanism: str, result: str) -> None:
    proto.ctx.metrics.auth_attempts.labels(listener=proto.listener.name, mechanism=mechanism,
                                           result=result).inc()


async def _wait(proto: ElemtaSMTP) -> None:
    """The address's delay, before any reply that ends an exchange."""
    delay = proto.ctx.auth_guard.delay(proto.conn.peer_ip)  # type: ignore[union-attr]
    if delay:
        await asyncio.sleep(delay)


def _login_locked(proto: ElemtaSMTP, mechanism: str, login: str) -> bool:
    conn = proto.conn
    assert conn is not None
    if not proto.ctx.auth_guard.login_locked(login, conn.peer_ip):
        return False
    log.info("session %s: login %s refused: locked after too many failures (client=%s)",
             conn.id, login, conn.peer_ip)
    _count(proto, mechanism, "locked")
    proto.reply(replies.auth_locked(proto.ctx.settings.auth.lock_seconds))
    return True


async def _authorized(proto: ElemtaSMTP, mechanism: str, login: str, authzid: str) -> str | None:
    """The identity the session gets, or ``None`` (answered) if ``authzid`` is refused."""
    if not authzid or authzid == login:
        return login
    conn = proto.conn
    assert conn is not None
    try:
        allowed_ = (await proto.ctx.hooks.call("authorize", session=conn, login=login,
                                               authzid=authzid)).value
    except HookFailure as f:
        _plugin_failed(proto, mechanism, f)
        return None
    if allowed_ is True:
        return authzid
    log.info("session %s: %s may not act as %s (%s)", conn.id, login, authzid, mechanism)
    _count(proto, mechanism, "failure")
    await _wait(proto)
    proto.reply(replies.AUTHZID_REFUSED)
    return None


def _succeeded(proto: ElemtaSMTP, mechanism: str, login: str, identity: str) -> None:
    conn = proto.conn
    assert conn is not None
    conn.auth_user = identity
    proto.ctx.auth_guard.succeeded(conn.peer_ip, login)
    _count(proto, mechanism, "success")
    if identity == login:
        log.info("session %s: authenticated as %s (%s)", conn.id, login, mechanism)
    else:
        log.info("session %s: authenticated as %s, acting as %s (%s)", conn.id, login,
                 identity, mechanism)
    proto.reply(replies.AUTH_OK)


async def _failed(proto: ElemtaSMTP, mechanism: str, login: str, plugin: str | None) -> None:
    conn = proto.conn
    assert conn is not None
    proto.ctx.auth_guard.failed(conn.peer_ip, login)
    proto.auth_failures += 1
    log.info("session %s: authentication failed for %s (%s, client=%s)", conn.id, login,
             mechanism, conn.peer_ip)
    proto.count_reject("auth", plugin, 535)
    _count(proto, mechanism, "failure")
    await _wait(proto)
    proto.reply(replies.AUTH_INVALID)
    if proto.auth_failures >= proto.ctx.settings.server.max_auth_failures:
        proto.reply(replies.TOO_MANY_AUTH_FAILURES)
        raise Close


# ------------------------------------------------------------------ PLAIN and LOGIN


async def _check_password(proto: ElemtaSMTP, creds: Credentials) -> None:
    """Ask the ``auth`` hook and answer."""
    conn = proto.conn
    assert conn is not None
    mechanism = creds.mechanism
    if _login_locked(proto, mechanism, creds.login):
        return
    try:
        answer = await proto.ctx.hooks.call("auth", session=conn, mechanism=mechanism,
                                            credentials=creds)
    except HookFailure as f:
        _plugin_failed(proto, mechanism, f)
        return
    plugin, verdict = answer.plugin, answer.value
    if isinstance(verdict, v.Accept):
        login = verdict.identity or creds.login
        identity = await _authorized(proto, mechanism, login, creds.authzid)
        if identity is not None:
            await _wait(proto)
            _succeeded(proto, mechanism, login, identity)
        return
    if isinstance(verdict, v.TempFail):
        proto.count_reject("auth", plugin, verdict.code)
        _count(proto, mechanism, "tempfail")
        proto.reply(replies.auth_temporary(verdict))
        return
    if isinstance(verdict, v.Disconnect):
        _count(proto, mechanism, "failure")
        proto.verdict_reply("auth", plugin, verdict)
    await _failed(proto, mechanism, creds.login, plugin)


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
    if text == "=":            # RFC 4954: an empty response
        return b""
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
    raw = _b64(proto, initial)
    if raw is None:
        return None
    parts = raw.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        proto.reply(replies.MALFORMED_PLAIN)
        return None
    authzid, login, password = (p.decode("utf-8", "surrogateescape") for p in parts)
    return Credentials("PLAIN", login, password, "" if authzid == login else authzid)


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


# ------------------------------------------------------------------ SCRAM-SHA-256


def _saslname(text: str) -> str | None:
    """RFC 5802 ``saslname``: ``=2C`` is a comma, ``=3D`` an equals sign; others are errors."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "=":
            code = text[i + 1:i + 3]
            if code not in ("2C", "3D"):
                return None
            out.append("," if code == "2C" else "=")
            i += 3
        elif c == ",":
            return None
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _scram_identities(client_first: str) -> tuple[str, str] | None:
    """``(login, authzid)`` from a client-first message, before any key is looked up."""
    parts = client_first.split(",", 3)
    if len(parts) < 4 or not parts[3].startswith("r="):
        return None
    flag, authz, user = parts[0], parts[1], parts[2]
    if flag not in ("n", "y") and not flag.startswith("p="):
        return None
    if authz and not authz.startswith("a="):
        return None
    if not user.startswith("n="):
        return None          # "m=" (a mandatory extension) is not supported either
    login = _saslname(user[2:])
    authzid = _saslname(authz[2:]) if authz else ""
    if not login or authzid is None:
        return None
    return login, authzid


def _fake_keys(login: str) -> ScramKeys:
    """Keys no password matches, the same for a login every time (no tell-tale salt)."""
    digest = hmac.new(_FAKE_SECRET, login.encode("utf-8", "surrogateescape"),
                      hashlib.sha256).digest()
    return ScramKeys(digest[:16], 4096, os.urandom(32), os.urandom(32))


async def _scram(proto: ElemtaSMTP, initial: str | None) -> None:
    from scramp import ScramException, ScramMechanism

    conn = proto.conn
    assert conn is not None
    if initial is None:
        initial = await _read_response(proto, "")
        if initial is None:
            _count(proto, SCRAM, "aborted")
            return
    raw = _b64(proto, initial)
    if raw is None:
        _count(proto, SCRAM, "aborted")
        return
    client_first = raw.decode("utf-8", "replace")
    identities = _scram_identities(client_first)
    if identities is None or client_first.startswith("p="):
        # "p=": the client insists on channel binding, which SCRAM-SHA-256 (not -PLUS) lacks
        _count(proto, SCRAM, "aborted")
        proto.reply(replies.MALFORMED_SCRAM)
        return
    login, authzid = identities
    if authzid:
        # scramp, like most SCRAM servers, takes no authorization identity
        _count(proto, SCRAM, "aborted")
        proto.reply(replies.SCRAM_NO_AUTHZID)
        return
    if _login_locked(proto, SCRAM, login):
        return
    try:
        keys = (await proto.ctx.hooks.call("scram_keys", session=conn, mechanism=SCRAM,
                                           login=login)).value
    except HookFailure as f:
        _plugin_failed(proto, SCRAM, f)
        return
    known = keys is not None
    if keys is None:
        keys = _fake_keys(login)

    server = ScramMechanism(SCRAM).make_server(
        lambda _: (keys.salt, keys.stored_key, keys.server_key, keys.iterations))
    try:
        server.set_client_first(client_first)
        server_first = server.get_server_first()
    except ScramException:
        _count(proto, SCRAM, "aborted")
        proto.reply(replies.MALFORMED_SCRAM)
        return
    answer = await _read_response(proto, base64.b64encode(server_first.encode()).decode())
    if answer is None:
        _count(proto, SCRAM, "aborted")
        return
    raw = _b64(proto, answer)
    if raw is None:
        _count(proto, SCRAM, "aborted")
        return
    try:
        server.set_client_final(raw.decode("utf-8", "replace"))
        proven = known
    except ScramException as e:
        if getattr(e.server_error, "value", None) != "invalid-proof":
            _count(proto, SCRAM, "aborted")
            proto.reply(replies.MALFORMED_SCRAM)
            return
        proven = False
    if not proven:
        await _failed(proto, SCRAM, login, None)
        return
    # RFC 4954 §4: success data goes in a last 334; the client answers with an empty line
    server_final = server.get_server_final()
    answer = await _read_response(proto, base64.b64encode(server_final.encode()).decode())
    if answer is None:
        _count(proto, SCRAM, "aborted")
        return
    await _wait(proto)
    _succeeded(proto, SCRAM, login, login)
