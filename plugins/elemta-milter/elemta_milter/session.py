"""The MTA side of the milter protocol for one SMTP session, over every configured milter.

:class:`MilterSession` is kept in ``session.stash`` from ``connect`` to
``disconnect``. Each configured milter is a :class:`Link`: its connection and where
it stands in the protocol. At every stage the milters are asked in configured order;
the first one that answers with anything but "continue" or "accept" decides the stage
and the later ones are not asked (as Sendmail does).

Protocol states kept per link, as libmilter's state machine needs them:

* ``in_message``: SMFIC_MAIL was answered "continue" and the message is not over.
  A link still in a message when the next MAIL (or HELO, or the end of the session)
  comes gets SMFIC_ABORT first.
* ``message_done``: the milter said all it had to say about this message (accept, or
  a verdict): nothing more is sent to it until the next MAIL.
* ``session_done``: it accepted at connect or HELO: nothing more for this session.
* ``at_endm``: the last exchange was a message that ended with SMFIR_CONTINUE; only
  then may the connection go back to the pool with SMFIC_QUIT_NC.
* ``failure``: the milter failed; its ``on_failure`` action answers every later
  stage of the session.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from elemta import (Disconnect, Discard, Message, Quarantine, Recipient, Reject, Session,
                    TempFail, Transaction, Verdict)

from . import edits as ed
from . import macros as mac
from . import protocol as p
from . import replies as rp
from .client import MilterConnection, MilterFailure, Reply
from .metrics import Metrics
from .pool import Pool
from .settings import MilterSettings
from .source import MessageSource

log = logging.getLogger("elemta.milter")


@dataclass
class Link:
    """One milter within one SMTP session."""

    settings: MilterSettings
    pool: Pool
    conn: MilterConnection | None = None
    failure: MilterFailure | None = None
    session_done: bool = False
    in_message: bool = False
    message_done: bool = False
    skip_rcpt: bool = False
    at_endm: bool = False
    applies: bool = False          # to the current transaction
    reused: bool = False           # the connection came from the pool
    symbols: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.settings.name

    def flag(self, bit: int) -> bool:
        return self.conn is not None and self.conn.negotiated.has(bit)


class MilterSession:
    """Every milter of one SMTP session."""

    def __init__(self, links: list[Link], facts: mac.Facts, metrics: Metrics) -> None:
        self.links = links
        self.facts = facts
        self.metrics = metrics
        self.discard_all: str | None = None     # discard every message (connect/helo)
        self.tx_id: str | None = None
        self.tx_discard: str | None = None      # discard this message (mail/rcpt)

    # ================================================================ stages

    async def connect(self, session: Session) -> Verdict | None:
        for link in self.links:
            verdict = await self._guard(link, "connect", self._connect(link, session))
            if verdict is not None:
                return verdict
        return None

    async def helo(self, session: Session, hostname: str) -> Verdict | None:
        for link in self.links:
            if not self._active(link):
                continue
            verdict = await self._guard(link, "helo", self._helo(link, session, hostname))
            if verdict is not None:
                return verdict
        return None

    async def mail(self, session: Session, tx: Transaction, sender: str,
                   params: dict[str, str | None]) -> Verdict | None:
        self.tx_id, self.tx_discard = tx.id, None
        for link in self.links:
            link.message_done = link.skip_rcpt = False
            link.applies = self._applies(link, session)
            if link.in_message and self._active(link):
                await self._abort(link)
        if self.discard_all is not None:
            self.tx_discard = self.discard_all
            return None
        for link in self.links:
            if not link.applies or link.session_done:
                continue
            if link.failure is not None:
                verdict = rp.failure_verdict(link.settings.on_failure, "mail")
                if verdict is not None:
                    return verdict
                continue
            if link.conn is None:
                continue              # never connected: an earlier milter ended the stage
            verdict = await self._guard(link, "mail",
                                        self._mail(link, session, tx, sender, params))
            if verdict is not None or self.tx_discard is not None:
                return verdict
        return None

    async def rcpt(self, session: Session, tx: Transaction,
                   recipient: Recipient) -> Verdict | None:
        if self.tx_id != tx.id:
            # a plugin before this one accepted MAIL FROM: the milters hear of it now
            verdict = await self.mail(session, tx, tx.sender, tx.mail_params)
            if verdict is not None:
                return verdict
        if self.tx_discard is not None:
            return None
        for link in self.links:
            if link.failure is not None and link.applies and not link.session_done:
                verdict = rp.failure_verdict(link.settings.on_failure, "rcpt")
                if verdict is not None:
                    return verdict
                continue
            if not self._in_message(link) or link.skip_rcpt:
                continue
            verdict = await self._guard(link, "rcpt",
                                        self._rcpt(link, session, tx, recipient))
            if verdict is not None or self.tx_discard is not None:
                return verdict
        return None

    async def data(self, session: Session, tx: Transaction, message: Message) -> Verdict | None:
        if self.tx_id != tx.id:
            # MAIL FROM was accepted before this plugin was asked (and so RCPT TO went
            # by): the milters hear of the envelope now
            verdict = await self.mail(session, tx, tx.sender, tx.mail_params)
            for recipient in list(tx.recipients):
                if verdict is not None:
                    break
                verdict = await self.rcpt(session, tx, recipient)
            if verdict is not None:
                return verdict
        if self.tx_discard is not None:
            return Discard(self.tx_discard)
        quarantine: str | None = None
        for link in self.links:
            if link.failure is not None and link.applies and not link.session_done:
                verdict = rp.failure_verdict(link.settings.on_failure, "data")
                if verdict is not None:
                    return verdict
                continue
            if not self._in_message(link):
                continue
            outcome = await self._guard(link, "data", self._message(link, session, tx, message))
            if isinstance(outcome, Quarantine):
                quarantine = quarantine or outcome.reason
                continue
            if outcome is not None:
                return outcome
        if quarantine is not None:
            return Quarantine(quarantine)
        return None

    async def close(self) -> None:
        """The SMTP session is over: SMFIC_QUIT, or SMFIC_QUIT_NC into the pool."""
        for link in self.links:
            conn, link.conn = link.conn, None
            if conn is None:
                continue
            reuse = link.settings.reuse_connections
            reusable = link.failure is None and (
                reuse == "always" or (reuse == "auto" and link.at_endm and not link.in_message
                                      and not link.session_done))
            log.debug("milter %s: end of session, connection %s", link.name,
                      "kept" if reusable else "closed")
            try:
                if link.in_message and not conn.closed:
                    await conn.send(p.packet(p.ABORT))
                await link.pool.release(conn, reusable)
            except (MilterFailure, OSError):
                conn.close()
            except BaseException:
                conn.close()
                raise

    # ================================================================ helpers

    def _active(self, link: Link) -> bool:
        return link.conn is not None and link.failure is None and not link.session_done

    def _in_message(self, link: Link) -> bool:
        return (link.applies and link.in_message and not link.message_done
                and self._active(link))

    @staticmethod
    def _applies(link: Link, session: Session) -> bool:
        s = link.settings
        if session.auth_user is not None:
            return s.authenticated
        if session.relay_allowed:
            return s.relay
        return True

    async def _guard(self, link: Link, stage: str, work: Any) -> Any:
        """Run one milter's part of a stage; a failure becomes its ``on_failure`` action."""
        started = time.monotonic()
        try:
            return await work
        except MilterFailure as failure:
            return self._fail(link, stage, failure)
        except p.ProtocolError as e:
            return self._fail(link, stage, MilterFailure(
                "protocol", f"milter {link.name}: {e}"))
        except ed.Edit as e:
            return self._fail(link, stage, MilterFailure("edit", f"milter {link.name}: {e}"))
        except BaseException as e:
            # cancelled (the client went away, or the plugin timeout): the connection is
            # somewhere in the middle of an exchange and cannot be used again
            if link.conn is not None:
                link.conn.close()
            if link.failure is None:
                link.failure = MilterFailure("closed", f"milter {link.name}: {stage} was "
                                             f"interrupted ({type(e).__name__})")
                log.warning("%s", link.failure)
            link.in_message = False
            raise
        finally:
            self.metrics.call(link.name, stage, time.monotonic() - started)

    def _fail(self, link: Link, stage: str, failure: MilterFailure) -> Verdict | None:
        action = link.settings.on_failure
        link.failure = failure
        link.in_message = False
        if link.conn is not None:
            link.conn.close()
        self.metrics.failure(link.name, failure.reason, action)
        if action == "accept":
            log.warning("%s at %s; going on without it for the rest of this session "
                        "(on_failure = \"accept\")", failure, stage)
        else:
            log.warning("%s at %s; answering %s for the rest of this session "
                        "(on_failure = \"%s\")", failure, stage,
                        "451" if action == "tempfail" else "550", action)
        return rp.failure_verdict(link.settings.on_failure, stage)

    async def _exchange(self, link: Link, stage: str, packets: list[bytes],
                        no_reply: bool, what: str) -> Reply | None:
        """Send a command (after its macros); its reply unless the milter wants none."""
        assert link.conn is not None
        link.at_endm = False
        await link.conn.send(*packets)
        if no_reply:
            return None
        return await link.conn.reply(what)

    def _macros(self, link: Link, stage: int, session: Session, tx: Transaction | None = None,
                recipient: Recipient | None = None) -> list[bytes]:
        values = mac.for_stage(stage, link.symbols, self.facts, session, tx, recipient)
        return [p.macros(p.STAGE_COMMAND[stage], values)] if values else []

    def _verdict(self, link: Link, stage: str, reply: Reply,
                 count: bool = True) -> Verdict | None:
        """What a reply to connect, helo, mail, rcpt or a DATA-stage command means.

        ``None`` for continue (and accept, skip, which also change the link's state).
        Discard before the end of the message marks the message (or, at connect and
        HELO, every message of the session) to be discarded at DATA.
        """
        code = reply.code
        result = reply.name
        verdict: Verdict | None = None
        if code == p.CONTINUE:
            pass
        elif code == p.ACCEPT:
            if stage in ("connect", "helo"):
                link.session_done = True
            else:
                link.message_done = True
                link.in_message = False
        elif code == p.SKIP:
            if stage == "rcpt":
                link.skip_rcpt = True
        elif code == p.REJECT:
            verdict = Reject(550, "5.7.1", rp.REJECT_TEXT)
        elif code == p.TEMPFAIL:
            verdict = TempFail(451, "4.7.1", rp.TEMPFAIL_TEXT)
        elif code == p.REPLYCODE:
            verdict = rp.replycode(link.name, reply.data)
        elif code in (p.CONN_FAIL, p.SHUTDOWN):
            verdict = Disconnect(421, "4.7.0", "Closing connection")
            result = "disconnect"
        elif code == p.DISCARD:
            reason = f"discarded by milter {link.name}"
            if stage in ("connect", "helo"):
                self.discard_all = reason
            elif stage in ("mail", "rcpt"):
                self.tx_discard = reason
            else:
                verdict = Discard(reason)
            link.message_done = True
        else:
            raise p.ProtocolError(f"answered {stage} with {reply.name}, which is not an "
                                  "answer to that command")
        if count:
            self.metrics.result(link.name, stage, result)
        if verdict is not None:
            log.info("milter %s: %s at %s", link.name, rp.describe(verdict), stage)
            if stage != "rcpt":
                # libmilter leaves the message on any verdict but one for a recipient
                link.message_done = True
                link.in_message = False
        return verdict

    async def _abort(self, link: Link) -> None:
        """SMFIC_ABORT: the message this milter was told about ended without its end."""
        link.in_message = False
        assert link.conn is not None
        try:
            await link.conn.send(p.packet(p.ABORT))
            link.at_endm = False
        except MilterFailure as failure:
            self._fail(link, "mail", failure)

    # ================================================================ one milter, one stage

    async def _connect(self, link: Link, session: Session) -> Verdict | None:
        conn, reused = await link.pool.acquire()
        link.conn, link.reused = conn, reused
        link.symbols = conn.negotiated.symbols
        try:
            return await self._send_connect(link, session)
        except MilterFailure as e:
            if not reused or e.reason == "protocol":
                raise
            # a pooled connection that went bad while idle: once more on a new one
            log.info("milter %s: a kept connection failed (%s); opening a new one",
                     link.name, e)
        conn.close()
        conn, link.reused = await MilterConnection.open(link.settings), False
        self.metrics.connection(link.name, "new")
        link.conn, link.symbols = conn, conn.negotiated.symbols
        return await self._send_connect(link, session)

    async def _send_connect(self, link: Link, session: Session) -> Verdict | None:
        assert link.conn is not None
        n = link.conn.negotiated
        if n.ignored_actions or n.ignored_protocol:
            log.debug("milter %s asked for action bits %#x and step bits %#x that were not "
                      "offered; ignored", link.name, n.ignored_actions, n.ignored_protocol)
        packets = self._macros(link, p.STAGE_CONNECT, session)
        if not n.has(p.SMFIP_NOCONNECT):
            ip = session.peer_ip
            family = (p.FAMILY_UNKNOWN if not ip
                      else p.FAMILY_INET6 if ":" in ip else p.FAMILY_INET)
            packets.append(p.connect(self.facts.client_name, family, session.peer[1], ip))
        elif not packets:
            return None
        reply = await self._exchange(
            link, "connect", packets,
            n.has(p.SMFIP_NOCONNECT) or n.has(p.SMFIP_NR_CONN), "SMFIC_CONNECT")
        return None if reply is None else self._verdict(link, "connect", reply)

    async def _helo(self, link: Link, session: Session, hostname: str) -> Verdict | None:
        if link.in_message:
            await self._abort(link)
            if link.failure is not None:
                return rp.failure_verdict(link.settings.on_failure, "helo")
        packets = self._macros(link, p.STAGE_HELO, session)
        skip = link.flag(p.SMFIP_NOHELO)
        if not skip:
            packets.append(p.helo(hostname))
        elif not packets:
            return None
        reply = await self._exchange(link, "helo", packets, skip or link.flag(p.SMFIP_NR_HELO),
                                     "SMFIC_HELO")
        return None if reply is None else self._verdict(link, "helo", reply)

    async def _mail(self, link: Link, session: Session, tx: Transaction, sender: str,
                    params: dict[str, str | None]) -> Verdict | None:
        packets = self._macros(link, p.STAGE_MAIL, session, tx)
        skip = link.flag(p.SMFIP_NOMAIL)
        if not skip:
            packets.append(p.envelope(p.MAIL, sender, params))
        link.in_message = True          # from now on the milter is in this message
        if not packets:
            return None
        reply = await self._exchange(link, "mail", packets, skip or link.flag(p.SMFIP_NR_MAIL),
                                     "SMFIC_MAIL")
        return None if reply is None else self._verdict(link, "mail", reply)

    async def _rcpt(self, link: Link, session: Session, tx: Transaction,
                    recipient: Recipient) -> Verdict | None:
        packets = self._macros(link, p.STAGE_RCPT, session, tx, recipient)
        skip = link.flag(p.SMFIP_NORCPT)
        if not skip:
            packets.append(p.envelope(p.RCPT, recipient.address, recipient.params))
        elif not packets:
            return None
        reply = await self._exchange(link, "rcpt", packets, skip or link.flag(p.SMFIP_NR_RCPT),
                                     "SMFIC_RCPT")
        return None if reply is None else self._verdict(link, "rcpt", reply)

    async def _message(self, link: Link, session: Session, tx: Transaction,
                       message: Message) -> Verdict | None:
        """DATA, the header fields, EOH, the body, then the end of the message and the
        milter's modifications; ``Quarantine`` when it asked for one and accepted."""
        conn = link.conn
        assert conn is not None

        async def step(packets: list[bytes], no_reply: bool, what: str) -> Verdict | None | bool:
            """``True`` to go on, ``False`` when the milter is done with the message."""
            reply = await self._exchange(link, "data", packets, no_reply, what)
            if reply is None:
                return True
            if reply.code == p.SKIP and what == "SMFIC_BODY":
                self.metrics.result(link.name, "data", "skip")
                return False
            verdict = self._verdict(link, "data", reply, count=reply.code != p.CONTINUE)
            if verdict is not None:
                return verdict
            return not link.message_done

        packets = self._macros(link, p.STAGE_DATA, session, tx)
        if not link.flag(p.SMFIP_NODATA):
            r = await step(packets + [p.packet(p.DATA)], link.flag(p.SMFIP_NR_DATA),
                           "SMFIC_DATA")
            if r is not True:
                return None if r is False else r
            packets = []
        async with MessageSource(message) as source:
            if not link.flag(p.SMFIP_NOHDRS):
                leadspc = link.flag(p.SMFIP_HDR_LEADSPC)
                no_reply = link.flag(p.SMFIP_NR_HDR)
                for name, value in source.fields:
                    if not leadspc and value.startswith(" "):
                        value = value[1:]
                    r = await step(packets + [p.header(name, value)], no_reply,
                                   "SMFIC_HEADER")
                    packets = []
                    if r is not True:
                        return None if r is False else r
            packets += self._macros(link, p.STAGE_EOH, session, tx)
            if not link.flag(p.SMFIP_NOEOH):
                r = await step(packets + [p.packet(p.EOH)], link.flag(p.SMFIP_NR_EOH),
                               "SMFIC_EOH")
                packets = []
                if r is not True:
                    return None if r is False else r
            if not link.flag(p.SMFIP_NOBODY):
                no_reply = link.flag(p.SMFIP_NR_BODY)
                async for chunk in source.body():
                    r = await step(packets + [p.body(chunk)], no_reply, "SMFIC_BODY")
                    packets = []
                    if r is False and not link.message_done:
                        break                      # SMFIR_SKIP: straight to the end
                    if r is not True:
                        return None if r is False else r
        packets += self._macros(link, p.STAGE_EOM, session, tx)
        await self._exchange(link, "data", packets + [p.packet(p.BODYEOB)], True, "")
        return await self._end_of_message(link, tx, message)

    async def _end_of_message(self, link: Link, tx: Transaction,
                              message: Message) -> Verdict | None:
        """The final answer and the modifications before it (:mod:`.edits`)."""
        assert link.conn is not None
        pending = ed.Pending()
        try:
            reply = await ed.read_end(link.conn, tx, message, pending)
            if reply.code not in (p.CONTINUE, p.ACCEPT):
                return self._verdict(link, "data", reply)
            await ed.apply(pending)
        finally:
            pending.drop()
        link.in_message = False
        link.message_done = True
        link.at_endm = reply.code == p.CONTINUE
        if pending.quarantine is not None:
            self.metrics.result(link.name, "data", "quarantine")
            log.info("milter %s: quarantine (%s)", link.name, pending.quarantine)
            return Quarantine(pending.quarantine)
        self.metrics.result(link.name, "data", reply.name)
        return None
