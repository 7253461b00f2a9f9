"""A recording LMTP server for tests: aiosmtpd's ``LMTP`` on a unix socket or 127.0.0.1.

aiosmtpd pushes what ``handle_DATA`` returns as the one reply after the dot;
an LMTP server owes one reply per accepted recipient (RFC 2033 §4.2). The
handler here pushes them itself, each as the test says::

    async with LMTPSink(path=str(tmp_path / "lmtp.sock")) as lmtp:
        lmtp.data_replies["full@example.test"] = ["452 4.2.2 Mailbox full"]  # once, then 250
        lmtp.data_replies["gone@example.test"] = "550 5.1.1 No such user"    # every time
        ...
        assert lmtp.delivered("bob@example.test") == [content]
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Stored:
    """One recipient's copy of a message, as the LMTP server accepted it."""

    session: int          # which session (1, 2, …) carried it
    sender: str
    recipient: str
    content: bytes
    mail_options: list[str]


@dataclass
class LMTPSink:
    """An LMTP server that records what it stores; on ``path`` (unix socket) or TCP.

    ``rcpt_replies``: address → reply to its RCPT (accepted with 250 when absent).
    ``data_replies``: address → its reply after the dot, a string for every
    delivery or a list consumed one per delivery (250 once it is empty).
    ``sessions`` counts connections, ``lhlo`` the LHLO names received.
    """

    path: str | None = None
    pipelining: bool = True
    smtputf8: bool = True
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: dict[str, str | list[str]] = field(default_factory=dict)
    stored: list[Stored] = field(default_factory=list)
    sessions: int = 0
    lhlo: list[str] = field(default_factory=list)
    port: int = 0
    _server: Any = None
    _protocols: list[SMTP] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The value for ``[plugins.lmtp] address``."""
        return f"unix:{self.path}" if self.path is not None else f"127.0.0.1:{self.port}"

    async def start(self) -> LMTPSink:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)

        def factory() -> LMTP:
            self.sessions += 1
            protocol = LMTP(handler, hostname="lmtp.example.test",
                            enable_SMTPUTF8=self.smtputf8,
                            data_size_limit=64 << 20)
            self._protocols.append(protocol)
            return protocol

        if self.path is not None:
            self._server = await loop.create_unix_server(factory, self.path)
        else:
            self._server = await loop.create_server(factory, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, drop every session and remove the socket file."""
        if self._server is not None:
            self._server.close()
            for protocol in self._protocols:
                if protocol.transport is not None:
                    protocol.transport.close()
            await self._server.wait_closed()
            self._server = None
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)

    async def __aenter__(self) -> LMTPSink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def delivered(self, recipient: str) -> list[bytes]:
        """The contents stored for ``recipient``, in order."""
        return [s.content for s in self.stored if s.recipient == recipient]

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Stored]:
        """Wait until ``n`` recipient copies are stored."""
        async with asyncio.timeout(timeout):
            while len(self.stored) < n:
                await asyncio.sleep(0.02)
        return self.stored

    def _reply_after_data(self, recipient: str) -> str:
        reply = self.data_replies.get(recipient)
        if isinstance(reply, list):
            reply = reply.pop(0) if reply else None
        return reply or f"250 2.0.0 <{recipient}> Saved"


class _Handler:
    def __init__(self, sink: LMTPSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        # aiosmtpd's LMTP answers LHLO through the EHLO hook
        session.host_name = hostname
        self.sink.lhlo.append(hostname)
        if self.sink.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.sink.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        number = sink._protocols.index(server) + 1
        replies = []
        for rcpt in envelope.rcpt_tos:
            reply = sink._reply_after_data(rcpt)
            if reply.startswith("2"):
                sink.stored.append(Stored(
                    number, "" if envelope.mail_from == "<>" else str(envelope.mail_from), rcpt,
                    bytes(envelope.original_content or b""), list(envelope.mail_options)))
            replies.append(reply)
        for reply in replies[:-1]:
            await server.push(reply)
        return replies[-1]
