"""An SMTP sink on loopback that stands in for a remote MX host in tests.

It records every message it accepts, and can be told to refuse recipients or
the whole message, to offer STARTTLS, or to require AUTH::

    async with Sink() as mx:
        mx.rcpt_replies["nobody@remote.example"] = "550 5.1.1 No such user"
        ...
        assert mx.messages[0].recipients == ["user@remote.example"]
"""

from __future__ import annotations

import asyncio
import email.parser
import re
import email.policy
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    mail_options: list[str]
    tls: bool
    auth: str | None

    @property
    def message_id(self) -> str | None:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(self.content)
        return msg.get("Message-ID")


@dataclass
class Sink:
    """A recording SMTP server; on ``port``, or a free one known after ``start()``."""

    tls_context: ssl.SSLContext | None = None
    users: dict[str, str] | None = None          # require AUTH with these credentials
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None                # e.g. "451 4.3.0 Try later" for every message
    data_replies: list[str] = field(default_factory=list)  # consumed one per message first
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: Any = None

    async def start(self) -> "Sink":
        loop = asyncio.get_running_loop()
        handler = _Handler(self)

        def factory() -> SMTP:
            self.connections += 1
            kwargs: dict[str, Any] = {"hostname": "sink.example", "enable_SMTPUTF8": True,
                                      "data_size_limit": 64 << 20}
            if self.tls_context is not None:
                kwargs["tls_context"] = self.tls_context
            if self.users is not None:
                kwargs.update(auth_required=True, auth_require_tls=self.tls_context is not None,
                              authenticator=self._authenticate)
            return SMTP(handler, **kwargs)

        self._server = await loop.create_server(factory, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.users is not None:
            login = auth_data.login.decode()
            if self.users.get(login) == auth_data.password.decode():
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> "Sink":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def deliveries(self) -> Counter[tuple[str | None, str]]:
        """How often each (Message-ID, recipient) arrived: a duplicate shows as 2."""
        return Counter((m.message_id, r) for m in self.messages for r in m.recipients)

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < n:
                await asyncio.sleep(0.02)
        return self.messages

    async def wait_for_tokens(self, tokens: set[str], pattern: re.Pattern[bytes],
                              timeout: float = 10.0) -> None:
        """Wait until a message matching ``pattern`` (group 1) arrived for every token."""
        try:
            async with asyncio.timeout(timeout):
                while tokens - self.tokens(pattern):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            missing = sorted(tokens - self.tokens(pattern))
            raise AssertionError(f"{len(missing)} message(s) never arrived: {missing[:20]}"
                                 ) from None

    def tokens(self, pattern: re.Pattern[bytes]) -> set[str]:
        found = (pattern.search(m.content) for m in self.messages)
        return {m.group(1).decode() for m in found if m is not None}


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.sink.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.data_replies:
            reply = self.sink.data_replies.pop(0)
            if not reply.startswith("2"):
                return reply
        elif self.sink.data_reply is not None and not self.sink.data_reply.startswith("2"):
            return self.sink.data_reply
        self.sink.messages.append(Received(
            "" if envelope.mail_from == "<>" else envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or b""),
            list(envelope.mail_options), session.ssl is not None,
            session.auth_data if isinstance(session.auth_data, str) else None))
        return "250 2.0.0 Queued"
