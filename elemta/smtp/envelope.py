"""MAIL and RCPT: the envelope of a transaction.

Strict path and parameter checks (``address.py``), storage room before a
message is announced, then the plugins: ``mail``; ``rcpt`` and, for a
recipient it accepted, ``rcpt_ok``. The postmaster is accepted by the core,
before any plugin, and delivered to ``[server] postmaster`` (RFC 5321 §4.5.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import verdicts as v
from ..models import Recipient, Transaction, new_id
from . import address, dsn_params, replies
from .replies import Reply

if TYPE_CHECKING:
    from .protocol import ElemtaSMTP

_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH", "RET", "ENVID"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


async def mail(proto: ElemtaSMTP, arg: str | None) -> None:
    """MAIL FROM: the path, its parameters, storage room, then the ``mail`` hook."""
    conn = proto.conn
    assert conn is not None
    if conn.helo is None:
        proto.reply(replies.HELO_FIRST)
        return
    if proto.listener.require_auth and conn.auth_user is None:
        proto.reply(replies.AUTH_REQUIRED)
        return
    if proto.tx is not None:
        proto.reply(replies.NESTED_MAIL)
        return
    try:
        sender, params, utf8 = address.parse_mail_from(arg, smtputf8_allowed=True)
    except address.PathError as e:
        proto.reply(e.reply())
        return
    if params and not conn.esmtp:
        proto.reply(replies.MAIL_PARAMS_NEED_EHLO)
        return
    problem = _mail_param_problem(proto, params)
    if problem is not None:
        proto.reply(problem)
        return
    if utf8 and "SMTPUTF8" not in params:
        proto.reply(replies.NEEDS_SMTPUTF8)
        return
    if proto.refuse_for_storage(params.get("SIZE"), "mail"):
        return
    params.pop("AUTH", None)  # RFC 4954 AUTH= is advisory; we do not trust it
    tx = Transaction(new_id(), sender, params)
    answer = await proto.ctx.hooks.call("mail", session=conn, tx=tx, sender=sender,
                                       params=params)
    plugin, verdict = answer.plugin, answer.value
    if isinstance(verdict, v.REPLY_VERDICTS):
        proto.verdict_reply("mail", plugin, verdict)
        return
    if verdict is not None:
        tx.headers.extend(verdict.headers)
    proto.tx = tx
    proto.reply(replies.SENDER_OK)

def _mail_param_problem(proto: ElemtaSMTP, params: dict[str, str | None]) -> Reply | None:
    """Check MAIL's ESMTP parameters (normalising BODY); the refusal, if any."""
    for key, value in params.items():
        if key not in _MAIL_PARAMS:
            return replies.mail_param_unsupported(key)
        if key == "SIZE":
            if value is None or not value.isdigit():
                return replies.SIZE_SYNTAX
            if int(value) > proto.data_size_limit:
                proto.count_reject("mail", None, 552)
                return replies.MESSAGE_TOO_BIG
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
                return replies.BODY_SYNTAX
            params[key] = value.upper()
        elif key == "SMTPUTF8" and value is not None:
            return replies.SMTPUTF8_TAKES_NO_VALUE
    return dsn_params.check_mail(params)

async def rcpt(proto: ElemtaSMTP, arg: str | None) -> None:
    """RCPT TO: the path, the limit, the postmaster, then ``rcpt`` and ``rcpt_ok``."""
    conn, tx = proto.conn, proto.tx
    assert conn is not None
    if tx is None:
        proto.reply(replies.NEED_MAIL)
        return
    try:
        rcpt, params, utf8 = address.parse_rcpt_to(
            arg, smtputf8_allowed="SMTPUTF8" in tx.mail_params)
    except address.PathError as e:
        proto.reply(e.reply())
        return
    for key in params:
        if key not in _RCPT_PARAMS:
            proto.reply(replies.rcpt_param_unsupported(key))
            return
    if params and not conn.esmtp:
        proto.reply(replies.RCPT_PARAMS_NEED_EHLO)
        return
    if params:
        problem = dsn_params.check_rcpt(params)
        if problem is not None:
            proto.reply(problem)
            return
    if len(tx.recipients) >= proto.ctx.settings.server.max_recipients:
        proto.count_reject("rcpt", None, 452, rcpt)
        proto.reply(replies.TOO_MANY_RECIPIENTS)
        return
    recipient = Recipient(rcpt, params)
    if address.is_postmaster(rcpt, proto.ctx.postmaster_domains):
        # RFC 5321 §4.5.1: postmaster is always accepted, and delivered to
        # [server] postmaster; no plugin may refuse it.
        if rcpt.lower() != proto.ctx.postmaster.lower():
            recipient.rewrite([proto.ctx.postmaster])
        tx.recipients.append(recipient)
        proto.reply(replies.RECIPIENT_OK)
        return
    answer = await proto.ctx.hooks.call("rcpt", session=conn, tx=tx, recipient=recipient,
                                       params=params)
    plugin, verdict = answer.plugin, answer.value
    if isinstance(verdict, v.Accept):
        if proto.ctx.hooks.impls("rcpt_ok"):
            after = await proto.ctx.hooks.call("rcpt_ok", session=conn, tx=tx,
                                              recipient=recipient)
            if after.value is not None:
                proto.verdict_reply("rcpt", after.plugin, after.value, rcpt)
                return
        tx.headers.extend(verdict.headers)
        tx.recipients.append(recipient)
        proto.reply(replies.RECIPIENT_OK)
        return
    if verdict is None:
        proto.count_reject("rcpt", None, replies.RELAY_DENIED.code, rcpt)
        proto.reply(replies.RELAY_DENIED)
        return
    proto.verdict_reply("rcpt", plugin, verdict, rcpt)
