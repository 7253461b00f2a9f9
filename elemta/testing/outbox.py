"""An outbox for plugin tests: everything the server would deliver, captured instead.

Passed to the ``elemta_server`` fixture (``outbox=elemta_outbox``), it turns
delivery on and answers the ``deliver`` hook first for every route, so the
runner hands it each message as it would go out — the final bytes, with every
header the pipeline added, and the envelope — and records it as delivered::

    async def test_signs(elemta_server, elemta_outbox):
        server = await elemta_server(enabled=["dkim"], outbox=elemta_outbox)
        await send_mail(server, "a@example.test", ["b@remote.example"], "Subject: hi\\n\\nhi\\n")
        [msg] = await elemta_outbox.wait(1)
        assert msg.header("DKIM-Signature") is not None
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
from dataclasses import dataclass
from email.message import Message as EmailMessage

from ..hookspecs import hookimpl
from ..models import Outcome, Route
from ..spool.envelope import Envelope, RecipientState


@dataclass(frozen=True)
class CapturedMessage:
    """One delivery the server made: to ``recipients`` along ``route``, these bytes."""

    envelope: Envelope
    route: Route
    recipients: list[str]
    content: bytes

    @property
    def sender(self) -> str:
        return self.envelope.sender

    def parsed(self) -> EmailMessage:
        """The content parsed by the standard library (``email.policy.default``)."""
        return email.parser.BytesParser(policy=email.policy.default).parsebytes(self.content)

    def header(self, name: str) -> str | None:
        """The first header field called ``name``, unfolded, or ``None``."""
        return self.parsed().get(name)

    def headers(self, name: str) -> list[str]:
        return [str(v) for v in self.parsed().get_all(name, [])]


class Outbox:
    """Records what the server delivers; answers ``250`` for every recipient."""

    def __init__(self) -> None:
        self.messages: list[CapturedMessage] = []
        self._arrived = asyncio.Event()

    @hookimpl(tryfirst=True)
    def deliver(self, envelope: Envelope, route: Route, recipients: list[RecipientState],
                content_path: str) -> list[Outcome]:
        with open(content_path, "rb") as f:
            content = f.read()
        addresses = [r.address for r in recipients]
        self.messages.append(CapturedMessage(envelope, route, addresses, content))
        self._arrived.set()
        return [Outcome(a, 250, "2.0.0", "captured by the test outbox", "outbox")
                for a in addresses]

    async def wait(self, count: int = 1, timeout: float = 10.0) -> list[CapturedMessage]:
        """Wait until ``count`` deliveries were captured; all of them so far."""
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return list(self.messages)

    def to(self, address: str) -> list[CapturedMessage]:
        """The deliveries that had ``address`` among their recipients."""
        return [m for m in self.messages if address in m.recipients]
