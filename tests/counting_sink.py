"""A sink that counts copies, for the crash tests.

It records every message it accepted with the connection it came on, and
whether the client said anything more on that connection after the 250 (the
next MAIL, RSET or QUIT). A client that did had read the reply: a later copy
of that message is a real duplicate. A copy whose 250 was the last thing on a
connection a kill cut may be repeated once (RFC 1047): the sender died before
it could read the reply.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


@dataclass
class Copy:
    """One message the sink accepted."""

    message_id: str
    recipients: list[str]
    connection: int
    content: bytes = b""
    confirmed: bool = False  # the client sent another command after our 250


@dataclass
class CountingSink:
    copies: list[Copy] = field(default_factory=list)
    port: int = 0
    keep_content: bool = False
    delay: float = 0.0       # seconds before each 250 after DATA: a slow next hop
    message_ids: set[str] = field(default_factory=set)   # every message that arrived
    _last: dict[int, Copy] = field(default_factory=dict)
    _ids: Any = field(default_factory=itertools.count)
    _server: Any = None

    async def start(self) -> CountingSink:
        handler = _Handler(self)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Protocol(handler, next(self._ids)), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    def accepted(self, connection: int, message_id: str, recipients: list[str],
                 content: bytes) -> None:
        copy = Copy(message_id, recipients, connection,
                    content if self.keep_content else b"")
        self.copies.append(copy)
        self.message_ids.add(message_id)
        self._last[connection] = copy

    def spoke(self, connection: int) -> None:
        copy = self._last.pop(connection, None)
        if copy is not None:
            copy.confirmed = True

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter((c.message_id, r) for c in self.copies for r in c.recipients)

    def by_message(self) -> dict[str, list[Copy]]:
        copies: dict[str, list[Copy]] = defaultdict(list)
        for copy in self.copies:
            copies[copy.message_id].append(copy)
        return copies


class _Protocol(SMTP):
    def __init__(self, handler: _Handler, number: int) -> None:
        super().__init__(handler, hostname="sink.example", data_size_limit=64 << 20)
        self.number = number


class _Handler:
    def __init__(self, sink: CountingSink) -> None:
        self.sink = sink

    async def handle_MAIL(self, server: _Protocol, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        self.sink.spoke(server.number)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RSET(self, server: _Protocol, session: Session,
                          envelope: Envelope) -> str:
        self.sink.spoke(server.number)
        return "250 OK"

    async def handle_QUIT(self, server: _Protocol, session: Session,
                          envelope: Envelope) -> str:
        self.sink.spoke(server.number)
        return "221 Bye"

    async def handle_DATA(self, server: _Protocol, session: Session,
                          envelope: Envelope) -> str:
        if self.sink.delay:
            await asyncio.sleep(self.sink.delay)
        content = envelope.original_content or b""
        found = MESSAGE_ID.search(content)
        self.sink.accepted(server.number, found.group(1).decode() if found else "",
                           list(envelope.rcpt_tos), content)
        return "250 2.0.0 Accepted"


def queued(spool: Path) -> int:
    """Messages waiting in a stopped (or running) server's spool."""
    return sum(1 for state in ("ready", "deferred")
               for name in os.listdir(spool / state) if name.endswith(".json"))
