"""What the tests of elemta-policy share: a policy service of their own, postgrey, config.

:class:`PolicyServer` is an independent implementation of the server side of
Postfix's policy delegation protocol (SMTPD_POLICY_README), on a real TCP port or
unix socket: it reads ``name=value`` lines up to an empty line, records the
request, and answers ``action=…`` and an empty line, or misbehaves as told.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elemta.testing import RawSMTP, free_port, require_tool_or_skip

MESSAGE = (b"From: a@origin.example\r\nTo: user@example.test\r\nSubject: policy test\r\n"
           b"\r\nHello.\r\n.\r\n")


# ------------------------------------------------------------------ behaviours of the service

@dataclass(frozen=True)
class Hang:
    """Read the request and answer nothing for ``seconds``; then answer ``action`` (late),
    if given."""

    seconds: float = 30.0
    action: str | None = None


@dataclass(frozen=True)
class Close:
    """Read the request, send ``partial_reply`` (a reply cut short, if any) and close the
    connection."""

    partial_reply: bytes = b""


@dataclass(frozen=True)
class Raw:
    """Answer these bytes instead of a policy reply."""

    data: bytes


Answer = str | Hang | Close | Raw


@dataclass
class PolicyServer:
    """``decide(request)`` gives the answer to each request: an action (``"DUNNO"``,
    ``"REJECT go away"``), or :class:`Hang`, :class:`Close`, :class:`Raw`."""

    decide: Callable[[dict[str, str]], Answer]
    unix: bool = False
    one_request_per_connection: bool = False
    requests: list[dict[str, str]] = field(default_factory=list)
    connections: int = 0
    address: str = ""
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _folder: str = ""

    async def start(self) -> "PolicyServer":
        if self.unix:
            # a short path: a unix socket address holds 107 bytes, pytest's tmp_path is long
            self._folder = tempfile.mkdtemp(prefix="policy-", dir="/tmp")
            path = os.path.join(self._folder, "policy.sock")
            self._server = await asyncio.start_unix_server(self._handle, path)
            self.address = f"unix:{path}"
        else:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            port = self._server.sockets[0].getsockname()[1]
            self.address = f"inet:127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)

    def of(self, name: str) -> list[str]:
        """The values of one attribute, request by request."""
        return [r.get(name, "") for r in self.requests]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                answer = self.decide(request)
                if isinstance(answer, Hang):
                    await asyncio.sleep(answer.seconds)
                    if answer.action is None:
                        return
                    answer = answer.action
                if isinstance(answer, Close):
                    if answer.partial_reply:
                        writer.write(answer.partial_reply)
                        await writer.drain()
                    return
                writer.write(answer.data if isinstance(answer, Raw)
                             else f"action={answer}\n\n".encode())
                await writer.drain()
                if self.one_request_per_connection:
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> dict[str, str] | None:
        """One request, or ``None`` when the client closed the connection."""
        request: dict[str, str] = {}
        for _ in range(200):                       # a request has about 30 attributes
            line = await reader.readline()
            if not line:
                return None
            assert line.endswith(b"\n"), f"a request line without its newline: {line!r}"
            text = line[:-1].decode("utf-8")
            if text == "":
                assert request, "an empty request"
                return request
            name, sep, value = text.partition("=")
            assert sep and name, f"not a name=value line: {text!r}"
            assert name not in request, f"attribute {name} sent twice"
            request[name] = value
        raise AssertionError("a request of more than 200 lines")


# ------------------------------------------------------------------ postgrey

@dataclass
class Postgrey:
    address: str
    delay: float
    log: Path
    process: subprocess.Popen[bytes]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_postgrey(delay: int = 2) -> tuple[Postgrey, Callable[[], None]]:
    """A real postgrey in the foreground on a loopback port, with its database in a new
    folder; the function that stops it and removes the folder."""
    exe = require_tool_or_skip("postgrey", "postgrey")
    root = Path(tempfile.mkdtemp(prefix="elemta-postgrey-"))
    root.chmod(0o755)
    dbdir = root / "db"
    dbdir.mkdir()
    empty = root / "empty"
    empty.write_text("")
    empty.chmod(0o644)
    if os.geteuid() == 0:
        # postgrey drops root for a user of its own; nobody must be able to write the db
        user = pwd.getpwnam("nobody")
        group = grp.getgrgid(user.pw_gid).gr_name
        os.chown(dbdir, user.pw_uid, user.pw_gid)
        identity = [f"--user={user.pw_name}", f"--group={group}"]
    else:
        identity = [f"--user={pwd.getpwuid(os.getuid()).pw_name}",
                    f"--group={grp.getgrgid(os.getgid()).gr_name}"]
    port = free_port()
    log = root / "postgrey.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [exe, f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}", f"--pidfile={root}/pid",
             f"--delay={delay}", "--auto-whitelist-clients=0", "--hostname=policy-test",
             f"--whitelist-clients={empty}", f"--whitelist-recipients={empty}", "-v",
             *identity],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Postgrey(f"inet:127.0.0.1:{port}", delay, log, process)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(root, ignore_errors=True)

    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            output = server.output()
            stop()
            raise RuntimeError(f"postgrey exited with {process.returncode}:\n{output}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, stop
        except OSError:
            pass
        if time.monotonic() > deadline:
            output = server.output()
            stop()
            raise RuntimeError(f"postgrey did not listen on port {port} within 20 s:\n{output}")
        time.sleep(0.05)


# ------------------------------------------------------------------ Elemta side

def config(dns_server: Any, *services: dict[str, Any], **table: Any) -> dict[str, Any]:
    """A test configuration with the policy plugin asking ``services``; DNS is the test's."""
    return {"dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1,
                    "attempts": 1},
            "plugins": {"enabled": ["policy"], "policy": {"services": list(services), **table}}}


async def rcpt(server: Any, recipient: str, sender: str, *, source: str = "127.0.0.2") -> Any:
    """The reply to RCPT TO in a session of its own."""
    async with RawSMTP(server.port("mx"), source=source) as c:
        await c.cmd("EHLO client.example.org")
        await c.cmd(f"MAIL FROM:<{sender}>")
        return await c.cmd(f"RCPT TO:<{recipient}>")


async def send(server: Any, sender: str, recipients: list[str], *, source: str = "127.0.0.2",
               message: bytes = MESSAGE) -> list[Any]:
    """One session with one message: the replies to RCPT TO… and to the end of DATA (or to
    DATA when it was refused)."""
    replies = []
    async with RawSMTP(server.port("mx"), source=source) as c:
        await c.cmd("EHLO client.example.org")
        await c.cmd(f"MAIL FROM:<{sender}> SIZE={len(message)}")
        for r in recipients:
            replies.append(await c.cmd(f"RCPT TO:<{r}>"))
        reply = await c.cmd("DATA")
        if reply.code == 354:
            await c.send(message)
            reply = await c.read_reply()
        replies.append(reply)
        await c.cmd("QUIT")
    return replies


def metric(server: Any, name: str, **labels: str) -> float:
    """The value of one sample of the server's metrics (0 when it was never counted)."""
    shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    wanted = f"{name}{{{shown}}} " if labels else f"{name} "
    for line in server.app.metrics.render().decode().splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
