"""The end of DATA: what happens to a received message, step by step.

1. :func:`filter_message` — on a submission listener, first the ``Message-ID``
   and ``Date`` a message lacks (:func:`add_missing_headers`); then the
   ``message_auth`` hooks (concurrently), then the ``data`` hooks, which may
   refuse, discard, quarantine or accept.
2. :func:`trace_headers` — forged Authentication-Results removed (RFC 8601
   §5), then the ``Received`` and ``Authentication-Results`` fields the header
   hooks write, then the headers of every verdict so far and those plugins
   added to the message, as the bytes to prepend.
3. :func:`build_envelope` — the spool's record of sender, recipients
   (rewritten ones expanded) and the session's facts.
4. :func:`finish` runs them and commits: ``250`` only once the spool says the
   message is durable; any failure on the way is a ``451``, never a ``250``.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import verdicts as v
from ..hookcall import HookCaller, HookFailure
from ..models import AuthResult, Message, Recipient, Session, Transaction
from ..spool.envelope import Envelope, RecipientState
from . import replies
from .replies import Reply

if TYPE_CHECKING:
    from ..spool.incoming import IncomingMessage
    from .protocol import ElemtaSMTP

log = logging.getLogger("elemta.smtp")

_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


@dataclass(slots=True)
class Filtered:
    """What the filter hooks decided: a verdict (or ``None``), who gave it, the auth results."""

    verdict: v.Verdict | None = None
    plugin: str | None = None
    auth_results: list[AuthResult] = field(default_factory=list)


def add_missing_headers(message: Message, tx: Transaction, hostname: str) -> None:
    """``Message-ID:`` and ``Date:`` for a message submitted without them (RFC 6409 §8)."""
    if message.header("Message-ID") is None:
        message.add_header("Message-ID", f"<{tx.id}@{hostname}>")
    if message.header("Date") is None:
        message.add_header("Date", email.utils.formatdate(usegmt=True))


async def filter_message(hooks: HookCaller, conn: Session, tx: Transaction,
                         message: Message) -> Filtered:
    """``message_auth`` then ``data``; raises :class:`HookFailure`."""
    results = await hooks.call("message_auth", session=conn, tx=tx, message=message)
    auth_results = results.values
    answer = await hooks.call("data", session=conn, tx=tx, message=message,
                              auth_results=auth_results)
    return Filtered(answer.value, answer.plugin, auth_results)


async def trace_headers(hooks: HookCaller, conn: Session, tx: Transaction, message: Message,
                        filtered: Filtered, authserv: str) -> bytes:
    """The header fields to prepend to the message, as bytes; raises :class:`HookFailure`."""
    remove_forged(message, authserv)
    received = (await hooks.call("received_header", session=conn, tx=tx,
                                 message=message)).value
    authres = (await hooks.call("authentication_results_header", session=conn, tx=tx,
                                message=message, auth_results=filtered.auth_results)).value
    headers: list[tuple[str, str]] = []
    if received:
        headers.append(("Received", received))
    if authres:
        headers.append(("Authentication-Results", authres))
    headers.extend(conn.headers)
    headers.extend(tx.headers)
    if filtered.verdict is not None:
        headers.extend(filtered.verdict.headers)
    headers.extend(message.added)
    return b"".join(f"{n}: {val}\r\n".encode("utf-8", "surrogateescape") for n, val in headers)


def build_envelope(conn: Session, tx: Transaction, listener: str, size: int,
                   hold_reason: str | None) -> Envelope:
    return Envelope(
        id=tx.id, sender=tx.sender, recipients=envelope_recipients(tx.recipients),
        received_at=time.time(), size=size, mail_params=dict(tx.mail_params),
        peer={"ip": conn.peer[0], "port": conn.peer[1]}, helo=conn.helo,
        listener=listener, tls=conn.tls.as_dict() if conn.tls else None,
        auth=conn.auth_user, hold_reason=hold_reason)


def envelope_recipients(recipients: list[Recipient]) -> list[RecipientState]:
    """The envelope's recipients: rewritten ones expanded, each address once."""
    out: list[RecipientState] = []
    seen: set[str] = set()
    for r in recipients:
        if r.deliver_to is None:
            key = r.address.lower()
            if key not in seen:
                seen.add(key)
                out.append(RecipientState(r.address, dict(r.params)))
            continue
        for a in r.deliver_to:
            key = a.lower()
            if key not in seen:
                seen.add(key)
                out.append(RecipientState(a, dict(r.params), original=r.address))
    return out


async def finish(proto: ElemtaSMTP, conn: Session, tx: Transaction,
                 incoming: IncomingMessage) -> None:
    """Filter, add the trace headers, commit and answer."""
    hooks = proto.ctx.hooks
    message = incoming.message()
    if proto.listener.add_missing_headers:
        add_missing_headers(message, tx, proto.hostname)
    try:
        filtered = await filter_message(hooks, conn, tx, message)
    except HookFailure as f:
        _refuse(proto, incoming, tx, message, "data", f.plugin, replies.LOCAL_FAILURE)
        return
    verdict, plugin = filtered.verdict, filtered.plugin
    if isinstance(verdict, v.REPLY_VERDICTS):
        incoming.discard()
        _log_tx(conn, tx, message, f"rejected by {plugin}: {verdict.code}")
        try:
            proto.verdict_reply("data", plugin, verdict)
        finally:
            proto.tx = None
        return
    if isinstance(verdict, v.Discard) or not tx.recipients:
        incoming.discard()
        why = (f"discarded by {plugin}: {verdict.reason}" if isinstance(verdict, v.Discard)
               else "discarded: plugins removed every recipient")
        _log_tx(conn, tx, message, why)
        proto.tx = None
        proto.reply(replies.discarded(tx.id))
        return
    try:
        prepend = await trace_headers(hooks, conn, tx, message, filtered, proto.hostname)
    except HookFailure as f:
        _refuse(proto, incoming, tx, message, "data", f.plugin, replies.LOCAL_FAILURE)
        return
    hold = isinstance(verdict, v.Quarantine)
    envelope = build_envelope(conn, tx, proto.listener.name, message.size + len(prepend),
                              verdict.reason if isinstance(verdict, v.Quarantine) else None)
    start = time.perf_counter()
    try:
        await proto.ctx.spool.commit(
            incoming, envelope, prepend=prepend,
            header_block=message.header_bytes() if message.modified else None,
            body=(message.body, message.body_path) if message.modified else None,
            state="hold" if hold else "ready")
    except Exception as e:
        log.error("session %s: spool commit of %s failed: %s", conn.id, tx.id, e)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        _refuse(proto, incoming, tx, message, "spool", None,
                replies.NO_STORAGE if full else replies.SPOOL_FAILURE)
        return
    proto.ctx.metrics.spool_commit.observe(time.perf_counter() - start)
    proto.tx = None
    conn.transactions += 1
    await hooks.call("queued", session=conn, tx=tx, envelope=envelope)
    proto.ctx.count_received(proto.listener.name, message.size,
                             [r.address for r in envelope.recipients])
    _log_tx(conn, tx, message, "held" if hold else "queued")
    proto.reply(replies.queued(tx.id))


def _refuse(proto: ElemtaSMTP, incoming: IncomingMessage, tx: Transaction, message: Message,
            stage: str, plugin: str | None, reply: Reply) -> None:
    incoming.discard()
    _log_tx(proto.conn, tx, message, f"temporary failure ({stage})")  # type: ignore[arg-type]
    proto.count_reject(stage, plugin, reply.code)
    proto.tx = None
    proto.reply(reply)


def _log_tx(conn: Session, tx: Transaction, message: Message, outcome: str) -> None:
    log.info("%s: %s from=<%s> nrcpt=%d size=%d session=%s client=%s helo=%s tls=%s auth=%s",
             tx.id, outcome, tx.sender, len(tx.recipients), message.size, conn.id,
             conn.peer[0], conn.helo, conn.tls.version if conn.tls else "no",
             conn.auth_user or "-")


# ------------------------------------------------------------------ forged Authentication-Results


def authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (comments removed)."""
    text = value
    for _ in range(5):  # nested comments
        stripped = _COMMENT.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    return text.split(";", 1)[0].strip().split()[0].lower() if text.strip() else ""


def remove_forged(message: Message, ours: str) -> int:
    """Drop received Authentication-Results fields that claim to come from ``ours``.

    Done by the core before the ``authentication_results_header`` hook, so a
    plugin that replaces the built-in header cannot forget it (RFC 8601 §5).
    """
    if b"authentication-results" not in message.header_bytes().lower():
        return 0  # the common case: no need to parse the header section
    ours = ours.lower()
    removed = message.remove_headers(
        lambda name, value: name.lower() == "authentication-results"
        and authserv_id(value) == ours)
    if removed:
        log.info("removed %d Authentication-Results field(s) claiming to be from %s",
                 removed, ours)
    return removed
