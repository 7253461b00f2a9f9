"""BDAT: the content in counted chunks (RFC 3030 CHUNKING, with BINARYMIME).

``BDAT <size> [LAST]`` is followed by exactly ``size`` octets of content, no
dot-stuffing and no terminator. The chunks of one transaction go one after the
other into the same :class:`~elemta.spool.incoming.IncomingMessage` as DATA's
content, in pieces of at most 64 KiB, so a 20 MiB message sent in 1 MiB chunks
never sits in memory; the last chunk runs the same end-of-data pipeline as
DATA (``end_of_data.py``), so the hooks see the same message either way.

Rules, and why:

* **A chunk is always read**, whatever the answer to it is (RFC 3030 §2: the
  octets that follow a BDAT command are data, never commands). BDAT without
  MAIL (``503``), without an accepted recipient (``554``), with a bad keyword
  after the size (``501``) or over the size limit (``552``): the chunk is read
  and thrown away, then answered, and the session carries on in step.
* **A size that is not a number cannot be skipped**: nobody knows where the
  next command starts, and reading the chunk as commands would let message
  content act as SMTP. The answer is ``501 5.5.4`` and the connection is
  closed.
* **A failed chunk ends the transaction.** After a 4xx or 5xx the client must
  send no more chunks (§2); pipelined ones that follow are read and answered
  ``503``, and the client starts again with MAIL (after RSET, as §2 says).
* **The size limit counts every chunk**: the chunk that crosses it is read to
  its end and answered ``552 5.3.4``.
* **DATA and BDAT do not mix** (§2): DATA after a BDAT chunk of the same
  transaction is ``503 5.5.1`` and ends the transaction; so is DATA for a
  transaction declared ``BODY=BINARYMIME`` (§3: binary content cannot be sent
  with DATA).
* **Text and binary.** Without ``BODY=BINARYMIME`` the content is text, and a
  bare CR or LF or a NUL is treated exactly as in DATA (``[server]
  bare_newline``). With it, every octet is content: the message is stored as
  received and relayed only with BDAT to a server that offers BINARYMIME.
"""

from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import end_of_data, replies
from .errors import Close

if TYPE_CHECKING:
    from ..models import Transaction
    from ..spool.incoming import IncomingMessage
    from .protocol import ElemtaSMTP
    from .replies import Reply

log = logging.getLogger("elemta.smtp")

PIECE_BYTES = 65_536
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_ARGUMENT = re.compile(r"([0-9]{1,20})(?: +(\S+))?", re.ASCII)


@dataclass(slots=True)
class Chunks:
    """The chunks received so far for one transaction."""

    tx: Transaction
    incoming: IncomingMessage
    binary: bool
    size: int = 0
    cr: bool = False          # the last chunk ended in CR: the line end depends on what follows
    too_big: bool = False
    bare: bool = False
    nul: bool = False
    failed: OSError | None = None

    def problem(self) -> Reply | None:
        if self.too_big:
            return replies.MESSAGE_TOO_BIG
        if self.bare:
            return replies.BARE_NEWLINE
        if self.nul:
            return replies.NUL_IN_DATA
        if self.failed is not None:
            return replies.NO_STORAGE if self.failed.errno in NO_ROOM else replies.SPOOL_FAILURE
        return None


def in_progress(proto: ElemtaSMTP) -> bool:
    """Whether the current transaction has received a BDAT chunk (DATA is then refused)."""
    chunks = proto.chunks
    return chunks is not None and proto.tx is not None and chunks.tx is proto.tx


def discard(proto: ElemtaSMTP) -> None:
    """Forget the chunks received for a transaction that ended (RSET, EHLO, a refusal, the end)."""
    chunks = proto.chunks
    if chunks is not None:
        proto.chunks = None
        chunks.incoming.discard()


async def command(proto: ElemtaSMTP, arg: str | None) -> None:
    """BDAT: read one chunk into the message; after the last one, run the end-of-data pipeline."""
    conn = proto.conn
    assert conn is not None
    m = _ARGUMENT.fullmatch(arg or "")
    if m is None:
        # Without a size nobody knows where the chunk ends; what follows could
        # only be read as commands.
        proto.count_reject("data", None, replies.BDAT_SYNTAX.code)
        proto.reply(replies.BDAT_SYNTAX)
        log.info("session %s: BDAT without a valid size (%r); closing to stay in step",
                 conn.id, (arg or "")[:40])
        raise Close
    size = int(m.group(1))
    keyword = m.group(2)
    last = keyword is not None and keyword.upper() == "LAST"
    if proto.chunks is not None and proto.chunks.tx is not proto.tx:
        discard(proto)  # left over from a transaction that ended
    tx = proto.tx
    refusal: Reply | None = None
    if keyword is not None and not last:
        refusal = replies.BDAT_SYNTAX
    elif tx is None:
        refusal = replies.NEED_MAIL
    elif not tx.recipients:
        refusal = replies.NO_VALID_RECIPIENTS
    if refusal is not None:
        await _skip(proto, size)
        proto.count_reject("data", None, refusal.code)
        if tx is not None and refusal is replies.BDAT_SYNTAX:
            _end(proto)
        proto.reply(refusal)
        return
    assert tx is not None
    chunks = proto.chunks
    if chunks is None:
        if proto.refuse_for_storage(tx.mail_params.get("SIZE"), "data"):
            await _skip(proto, size)
            proto.tx = None
            return
        chunks = proto.chunks = Chunks(tx, proto.ctx.spool.incoming(tx.id),
                                       binary=tx.mail_params.get("BODY") == "BINARYMIME")
    try:
        await _receive(proto, chunks, size, last)
    except BaseException:
        _end(proto)
        raise
    problem = chunks.problem()
    if problem is not None:
        if chunks.failed is not None:
            log.error("session %s: cannot keep the message being received: %s",
                      conn.id, chunks.failed)
        proto.count_reject("data", None, problem.code)  # while it knows the recipients
        _end(proto)
        proto.reply(problem)
        return
    if not last:
        proto.reply(replies.chunk_received(size, chunks.size))
        return
    proto.chunks = None
    try:
        await end_of_data.finish(proto, conn, tx, chunks.incoming)
    except BaseException:
        chunks.incoming.discard()
        proto.tx = None
        raise


async def skip_refused(proto: ElemtaSMTP, verb: str, arg: str | None) -> None:
    """Read the chunk of a BDAT the session refuses before it is handled (greeting
    refused, STARTTLS required), so that its octets are not read as commands."""
    if verb == "BDAT":
        m = _ARGUMENT.fullmatch(arg or "")
        if m is not None:
            await _skip(proto, int(m.group(1)))


def _end(proto: ElemtaSMTP) -> None:
    discard(proto)
    proto.tx = None


async def _skip(proto: ElemtaSMTP, size: int) -> None:
    """Read ``size`` octets of a refused chunk and throw them away."""
    reader = proto._reader
    timeout = proto.ctx.settings.server.data_timeout_seconds
    left = size
    try:
        while left:
            proto._reset_timeout(timeout)
            piece = await reader.read(min(left, PIECE_BYTES))
            if not piece:
                raise Close
            left -= len(piece)
    finally:
        proto._reset_timeout()


async def _receive(proto: ElemtaSMTP, chunks: Chunks, size: int, last: bool) -> None:
    """Read one chunk of ``size`` octets into ``chunks``, checking it as it comes."""
    reader = proto._reader
    settings = proto.ctx.settings.server
    limit = proto.data_size_limit
    normalize = settings.bare_newline == "normalize"
    incoming = chunks.incoming
    left = size
    while left or (last and chunks.cr):
        if left:
            proto._reset_timeout(settings.data_timeout_seconds)
            piece = await reader.read(min(left, PIECE_BYTES))
            if not piece:
                raise Close
            left -= len(piece)
        else:
            piece = b""  # the message ends in CR: flush it, a bare CR
        if not chunks.binary:
            if chunks.cr:
                piece = b"\r" + piece
                chunks.cr = False
            if piece.endswith(b"\r") and (left or not last):
                chunks.cr = True   # its LF may be the next octet
                piece = piece[:-1]
            crlf = piece.count(b"\r\n")
            if piece.count(b"\n") != crlf or piece.count(b"\r") != crlf:
                if normalize:
                    piece = _BARE_CR.sub(b"\r\n", _BARE_LF.sub(b"\r\n", piece))
                else:
                    chunks.bare = True
            if b"\0" in piece:
                chunks.nul = True
        chunks.size += len(piece)
        if chunks.size > limit:
            chunks.too_big = True
        if not (chunks.too_big or chunks.bare or chunks.nul or chunks.failed):
            try:
                incoming.write(piece)
            except OSError as e:
                chunks.failed = e
    proto._reset_timeout()


def refuse_data(proto: ElemtaSMTP) -> bool:
    """DATA in a transaction that must use BDAT: answer ``503`` and end it; ``True`` if so."""
    tx = proto.tx
    if tx is None:
        return False
    if in_progress(proto):
        _end(proto)
        proto.reply(replies.DATA_AFTER_BDAT)
        return True
    if tx.mail_params.get("BODY") == "BINARYMIME":
        proto.reply(replies.BINARYMIME_NEEDS_BDAT)
        return True
    return False


__all__ = ["Chunks", "command", "discard", "in_progress", "refuse_data", "skip_refused"]
