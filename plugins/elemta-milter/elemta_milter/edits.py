"""The end of a message at one milter: its modifications, read until its final answer,
and carried out on the message and the envelope only if that answer lets it through.

A milter's modifications (SMFIR_ADDHEADER … SMFIR_QUARANTINE) come before its final
answer. They are checked as they arrive and kept in a :class:`Pending`; a replacement
body is written as it comes into ``message.body_writer()`` (so a large one goes to
disk, not to memory) and dropped unless applied. :func:`apply` carries them out, in
the order the milter sent them, when it answers SMFIR_CONTINUE or SMFIR_ACCEPT.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from elemta import Message, Transaction

from . import protocol as p
from .client import MilterConnection, Reply

log = logging.getLogger("elemta.milter")

# the answers that end a milter's part of the message
FINAL = frozenset({p.CONTINUE, p.ACCEPT, p.REJECT, p.TEMPFAIL, p.REPLYCODE, p.DISCARD,
                   p.CONN_FAIL, p.SHUTDOWN})
# large replacement bodies are written in a worker thread past this many bytes
THREAD_ABOVE = 256 * 1024


class Edit(Exception):
    """A modification the message or envelope cannot take (failure reason ``edit``)."""


@dataclass
class Pending:
    """The modifications of one milter's end of message, applied only if it accepts."""

    edits: list[Callable[[], None]] = field(default_factory=list)
    writer: Any = None             # message.body_writer() once SMFIR_REPLBODY came
    written: int = 0
    last_cr: bool = False
    quarantine: str | None = None

    @property
    def count(self) -> int:
        return len(self.edits) + (self.writer is not None)

    def drop(self) -> None:
        """Forget a replacement body that was not applied (a verdict, a failure, a cancel)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.__exit__(Edit, Edit("not applied"), None)


async def read_end(conn: MilterConnection, tx: Transaction, message: Message,
                   pending: Pending) -> Reply:
    """The milter's answer to SMFIC_BODYEOB, its modifications recorded in ``pending`` on
    the way, within ``end_timeout_seconds`` (SMFIR_PROGRESS included)."""
    deadline = time.monotonic() + conn.settings.end_timeout_seconds
    leadspc = conn.negotiated.has(p.SMFIP_HDR_LEADSPC)
    while True:
        reply = await conn.read(deadline, "the end of the message")
        if reply.code == p.PROGRESS:
            conn.ack_now()
            continue
        if reply.code not in p.MODIFICATIONS:
            break
        conn.ack_now()              # the next reply is on its way: don't hold it up
        if not conn.negotiated.actions & ACTION_OF[reply.code]:
            # Sendmail logs "lied about …" and honours it; so does Elemta
            log.info("milter %s: sent %s without having asked for that action in the "
                     "option negotiation; carried out all the same", conn.name, reply.name)
        await record(conn.name, reply, leadspc, tx, message, pending)
    if reply.code not in FINAL:
        raise p.ProtocolError(f"answered the end of the message with {reply.name}, which "
                              "is not a final answer")
    log.debug("milter %s: %s at the end of the message (%d modifications)", conn.name,
              reply.name, pending.count)
    return reply


# the action (SMFIF_*) a milter must have negotiated for each modification
ACTION_OF = {
    p.ADDHEADER: p.SMFIF_ADDHDRS, p.INSHEADER: p.SMFIF_ADDHDRS, p.CHGHEADER: p.SMFIF_CHGHDRS,
    p.REPLBODY: p.SMFIF_CHGBODY, p.ADDRCPT: p.SMFIF_ADDRCPT | p.SMFIF_ADDRCPT_PAR,
    p.ADDRCPT_PAR: p.SMFIF_ADDRCPT_PAR, p.DELRCPT: p.SMFIF_DELRCPT,
    p.CHGFROM: p.SMFIF_CHGFROM, p.QUARANTINE: p.SMFIF_QUARANTINE,
}


async def record(milter: str, reply: Reply, leadspc: bool, tx: Transaction, message: Message,
                 pending: Pending) -> None:
    """Check one SMFIR_* modification and keep it (the body is written as it comes)."""
    code, data = reply.code, reply.data
    log.debug("milter %s: %s %r", milter, reply.name, data[:80])
    if code == p.ADDHEADER:
        _, name, value = p.header_edit(data, False, "SMFIR_ADDHEADER")
        value = header_value(name, value, leadspc)
        pending.edits.append(lambda: message.append_header(name, value))
    elif code == p.INSHEADER:
        index, name, value = p.header_edit(data, True, "SMFIR_INSHEADER")
        value = header_value(name, value, leadspc)
        pending.edits.append(lambda: message.insert_header(index, name, value))
    elif code == p.CHGHEADER:
        index, name, value = p.header_edit(data, True, "SMFIR_CHGHEADER")
        new: str | None = header_value(name, value, leadspc) if value else None
        occurrence = max(index, 1)
        pending.edits.append(lambda: message.change_header(name, new, occurrence))
    elif code in (p.ADDRCPT, p.ADDRCPT_PAR):
        what = "SMFIR_ADDRCPT_PAR" if code == p.ADDRCPT_PAR else "SMFIR_ADDRCPT"
        address, params = p.address_edit(data, what, code == p.ADDRCPT_PAR)
        check_address(address, what)
        pending.edits.append(lambda: tx.add_recipient(address, params or None))
    elif code == p.DELRCPT:
        address, _ = p.address_edit(data, "SMFIR_DELRCPT", False)
        pending.edits.append(lambda: _remove(tx, address, milter))
    elif code == p.CHGFROM:
        address, params = p.address_edit(data, "SMFIR_CHGFROM", True)
        if address:
            check_address(address, "SMFIR_CHGFROM")
        has_args = data.rstrip(b"\0").count(b"\0") >= 1
        pending.edits.append(lambda: tx.set_sender(address, params if has_args else None))
    elif code == p.QUARANTINE:
        reason = data.rstrip(b"\0").decode("utf-8", "replace").strip()
        reason = "".join(c if c.isprintable() else " " for c in reason)
        pending.quarantine = reason or f"quarantined by milter {milter}"
    elif code == p.REPLBODY:
        await _body_chunk(message, pending, data)


async def _body_chunk(message: Message, pending: Pending, data: bytes) -> None:
    """One SMFIR_REPLBODY chunk into the new body (bare LF made CRLF)."""
    if pending.writer is None:
        pending.writer = message.body_writer()
    if data:
        if pending.last_cr and data.startswith(b"\n"):
            head, data = b"\n", data[1:]
        else:
            head = b""
        data = head + re.sub(rb"(?<!\r)\n", b"\r\n", data)
        pending.last_cr = data.endswith(b"\r")
    pending.written += len(data)
    if pending.written > THREAD_ABOVE:
        await asyncio.to_thread(pending.writer.write, data)
    else:
        pending.writer.write(data)


async def apply(pending: Pending) -> None:
    """Carry out a milter's modifications, in the order it sent them."""
    if pending.writer is not None:
        writer, pending.writer = pending.writer, None
        try:
            if pending.written > THREAD_ABOVE:
                await asyncio.to_thread(writer.close)
            else:
                writer.close()
        except (OSError, ValueError) as e:
            raise Edit(f"the new body could not be stored: {e}") from None
    for edit in pending.edits:
        try:
            edit()
        except ValueError as e:
            raise Edit(f"asked for a modification Elemta refuses: {e}") from None


def header_value(name: str, value: str, leadspc: bool) -> str:
    """A header value from a milter as Message takes it: CRLF line ends, and without the
    one leading space that SMFIP_HDR_LEADSPC milters include (the message adds it).

    Checked here, as the message would check it, so that a bad field fails the milter
    before any of its modifications is carried out."""
    if leadspc and value[:1] == " ":
        value = value[1:]
    value = value.replace("\r\n", "\n").replace("\n", "\r\n")
    if not name or not name.isascii() or any(c in name for c in ": \t\r\n"):
        raise Edit(f"header name {name!r} is not a field name")
    if "\r" in value.replace("\r\n", ""):
        raise Edit(f"header {name}: the value has a bare CR")
    if any(line[:1] not in (" ", "\t") for line in value.split("\r\n")[1:]):
        raise Edit(f"header {name}: a continuation line does not start with white space")
    return value


def check_address(address: str, what: str) -> None:
    if "@" not in address or any(c in address for c in "<> \t\r\n"):
        raise Edit(f"{what} {address!r} is not an address (local@domain)")


def _remove(tx: Transaction, address: str, milter: str) -> None:
    if not tx.remove_recipient(address):
        log.info("milter %s: SMFIR_DELRCPT <%s>, which is not a recipient of %s",
                 milter, address, tx.id)
