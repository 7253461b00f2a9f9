"""DATA: the content is streamed off the wire into the spool's incoming file.

The terminator is CRLF "." CRLF only (a bare LF or CR never ends DATA: SMTP
smuggling). The content is dot-unstuffed and written in chunks of up to 64 KiB
into an :class:`~elemta.spool.incoming.IncomingMessage`, so a 20 MiB message
never sits in memory. The size limit is checked as it arrives (the data is
read to its end, then ``552``); a bare CR or LF is refused (``550 5.5.2``) or
rewritten to CRLF, as ``[server] bare_newline`` says; a NUL octet is refused
(``554 5.6.0``: neither RFC 5322 text nor 8BITMIME allows one, and silently
stripping it would change a message a signature may cover). What happens to a
complete message is ``end_of_data.py``'s.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from typing import TYPE_CHECKING

from . import bdat, end_of_data, replies
from .errors import Close
from .replies import Reply

if TYPE_CHECKING:
    from ..spool.incoming import IncomingMessage
    from .protocol import ElemtaSMTP

log = logging.getLogger("elemta.smtp")

NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


async def command(proto: ElemtaSMTP, arg: str | None) -> None:
    """DATA: read the message, then run the end-of-data pipeline."""
    conn, tx = proto.conn, proto.tx
    assert conn is not None
    if tx is None:
        proto.reply(replies.NEED_MAIL)
        return
    if bdat.refuse_data(proto):
        return
    if not tx.recipients:
        proto.reply(replies.NO_VALID_RECIPIENTS)
        return
    if arg:
        proto.reply(replies.DATA_SYNTAX)
        return
    if proto.refuse_for_storage(tx.mail_params.get("SIZE"), "data"):
        proto.tx = None
        return
    proto.reply(replies.START_DATA)
    proto.flush()
    incoming = proto.ctx.spool.incoming(tx.id)
    try:
        problem = await receive(proto, incoming)
        if problem is not None:
            incoming.discard()
            proto.count_reject("data", None, problem.code)
            proto.tx = None
            proto.reply(problem)
            return
        await end_of_data.finish(proto, conn, tx, incoming)
    except BaseException:
        incoming.discard()
        proto.tx = None
        raise


async def receive(proto: ElemtaSMTP, incoming: IncomingMessage) -> Reply | None:
    """Stream DATA into ``incoming``; the refusal to send, or ``None`` if all is well.

    A virtual CRLF is put in front of the stream so that a message consisting
    only of "." CRLF ends at once, like any other.
    """
    reader = proto._reader
    settings = proto.ctx.settings.server
    limit = proto.data_size_limit
    data_timeout = settings.data_timeout_seconds
    normalize = settings.bare_newline == "normalize"
    reader._buffer[:0] = b"\r\n"  # type: ignore[attr-defined]
    carry = b""
    size = 0
    too_big = False
    bare = False
    nul = False    # a NUL octet: no text message carries one (RFC 5322 §2.1, RFC 5321 §2.3.8)
    failed: OSError | None = None  # writing the content failed: read on, then refuse
    first = True
    while True:
        proto._reset_timeout(data_timeout)
        try:
            piece = await reader.readuntil(b"\r\n.\r\n")
            last = True
        except asyncio.LimitOverrunError as e:
            piece = await reader.read(e.consumed)
            last = False
        except asyncio.IncompleteReadError:
            raise Close from None
        chunk = carry + piece if carry else piece
        if last:
            chunk = chunk[:-3]   # keep the CRLF that ends the last line
            carry = b""
        elif chunk.endswith(b"\r\n"):
            carry, chunk = chunk[-2:], chunk[:-2]
        elif chunk.endswith(b"\r"):
            carry, chunk = chunk[-1:], chunk[:-1]
        else:
            carry = b""
        chunk = chunk.replace(b"\r\n.", b"\r\n")
        if first:
            chunk = chunk[2:]
            first = False
        crlf = chunk.count(b"\r\n")  # once: a two-octet count is the slow one (3.4 µs a 4 KiB)
        if chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf:
            if normalize:
                chunk = _BARE_CR.sub(b"\r\n", _BARE_LF.sub(b"\r\n", chunk))
            else:
                bare = True
        if b"\0" in chunk:
            nul = True
        size += len(chunk)
        if size > limit:
            too_big = True
        if not too_big and not bare and not nul and failed is None:
            try:
                incoming.write(chunk)
            except OSError as e:
                failed = e
        if last:
            break
    proto._reset_timeout()
    if too_big:
        return replies.MESSAGE_TOO_BIG
    if bare:
        return replies.BARE_NEWLINE
    if nul:
        return replies.NUL_IN_DATA
    if failed is not None:
        log.error("session %s: cannot keep the message being received: %s",
                  proto.conn.id if proto.conn else "-", failed)
        return replies.NO_STORAGE if failed.errno in NO_ROOM else replies.SPOOL_FAILURE
    return None
