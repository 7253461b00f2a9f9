"""A raw SMTP client for tests: send exact bytes, read exact replies.

smtplib and aiosmtplib fix up what they send; protocol tests need to send
malformed commands, bare LFs and pipelined batches, and to see every reply.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        first = self.lines[0].split(" ", 1)[0] if self.lines else ""
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return first
        return None

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawSMTP:
    """``async with RawSMTP(port) as c: await c.cmd("EHLO x")``."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None,
                 timeout: float = 10.0, source: str | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.timeout = timeout
        self.source = source   # the client's own address, e.g. "127.0.0.2" to be another client
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.greeting: Reply | None = None

    async def __aenter__(self) -> "RawSMTP":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def connect(self) -> Reply:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                    server_hostname="localhost" if self.tls else None,
                                    limit=1 << 20,
                                    local_addr=(self.source, 0) if self.source else None),
            self.timeout)
        self.greeting = await self.read_reply()
        return self.greeting

    def close(self) -> None:
        self.writer.close()

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.writer.write(data)
        await self.writer.drain()

    async def read_reply(self) -> Reply:
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not raw:
                raise ConnectionError(f"connection closed; got so far: {lines}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            code, sep, text = line[:3], line[3:4], line[4:]
            lines.append(text)
            if sep != "-":
                return Reply(int(code), tuple(lines))

    async def cmd(self, line: str) -> Reply:
        await self.send(line + "\r\n")
        return await self.read_reply()

    async def starttls(self, context: ssl.SSLContext) -> Reply:
        reply = await self.cmd("STARTTLS")
        if reply.code == 220:
            await self.writer.start_tls(context, server_hostname="localhost")
        return reply

    async def send_message(self, sender: str, recipients: list[str], data: bytes) -> Reply:
        """MAIL, RCPT…, DATA with ``data`` sent as given (it must end with CRLF.CRLF)."""
        for line in [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in recipients]:
            reply = await self.cmd(line)
            if reply.code >= 400:
                return reply
        reply = await self.cmd("DATA")
        if reply.code != 354:
            return reply
        await self.send(data)
        return await self.read_reply()

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout``."""
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            return False
        except ConnectionError:
            return True
        return data == b"" or self.reader.at_eof()


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
