"""Sending mail to a test server, and running the ``elemta`` command line in-process.

:func:`send_mail` speaks SMTP with :class:`~elemta.testing.client.RawSMTP`
(no extra dependency): EHLO, optional STARTTLS and AUTH PLAIN, MAIL, RCPT,
DATA. It returns the server's answers instead of raising, so a test can
assert on a refusal as easily as on a ``250``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .client import RawSMTP, Reply, unverified_context

if TYPE_CHECKING:
    from .fixtures import RunningServer


@dataclass
class Sent:
    """What the server answered: ``reply`` to the last command sent (250 after DATA)."""

    reply: Reply
    replies: list[Reply] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.reply.code == 250 and "queued as" in self.reply.text

    @property
    def queue_id(self) -> str | None:
        """The queue id from ``250 2.0.0 Ok: queued as <ID>``."""
        return self.reply.text.rsplit(" ", 1)[1] if self.accepted else None


def data_bytes(message: bytes | str | EmailMessage) -> bytes:
    """A message as DATA sends it: CRLF line ends, dot-stuffed, ending in CRLF.CRLF."""
    if isinstance(message, EmailMessage):
        raw = message.as_bytes()
    elif isinstance(message, str):
        raw = message.encode("utf-8")
    else:
        raw = message
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


async def send_mail(server: RunningServer | int, sender: str, recipients: Sequence[str],
                    message: bytes | str | EmailMessage, *, listener: str = "mx",
                    helo: str = "client.example", starttls: bool = False,
                    auth: tuple[str, str] | None = None, implicit_tls: bool = False,
                    mail_params: str = "") -> Sent:
    """Send one message; stops at the first refusal and returns it.

    ``server`` is a :class:`~elemta.testing.fixtures.RunningServer` (then
    ``listener`` names the port) or a port. Certificates are not verified.
    """
    port = server if isinstance(server, int) else server.port(listener)
    replies: list[Reply] = []

    async def step(client: RawSMTP, line: str, ok: int) -> bool:
        reply = await client.cmd(line)
        replies.append(reply)
        return reply.code == ok

    async with RawSMTP(port, tls=unverified_context() if implicit_tls else None) as client:
        replies.append(client.greeting)  # type: ignore[arg-type]
        if not await step(client, f"EHLO {helo}", 250):
            return Sent(replies[-1], replies)
        if starttls:
            reply = await client.starttls(unverified_context())
            replies.append(reply)
            if reply.code != 220 or not await step(client, f"EHLO {helo}", 250):
                return Sent(replies[-1], replies)
        if auth is not None:
            token = base64.b64encode(b"\0" + auth[0].encode() + b"\0" + auth[1].encode())
            if not await step(client, "AUTH PLAIN " + token.decode(), 235):
                return Sent(replies[-1], replies)
        if not await step(client, f"MAIL FROM:<{sender}>{mail_params}", 250):
            return Sent(replies[-1], replies)
        accepted = 0
        for rcpt in recipients:
            accepted += await step(client, f"RCPT TO:<{rcpt}>", 250)
        if not accepted or not await step(client, "DATA", 354):
            return Sent(replies[-1], replies)
        await client.send(data_bytes(message))
        reply = await client.read_reply()
        replies.append(reply)
        await client.cmd("QUIT")
        return Sent(reply, replies)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str, config: str | Path | None = None, input: str | None = None) -> CliResult:
    """Run ``elemta [--config CONFIG] ARGS…`` in this process, plugin commands included;
    ``input`` is its standard input (a password for ``--password-stdin``)."""
    from click.testing import CliRunner

    from ..cli.main import command_line

    argv = (["--config", str(config)] if config is not None else []) + list(args)
    result = CliRunner().invoke(command_line(argv), argv, prog_name="elemta", input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)
