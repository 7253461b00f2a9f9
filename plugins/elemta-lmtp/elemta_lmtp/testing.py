"""Test servers for LMTP delivery: a recording LMTP server, and a real Dovecot.

:class:`LMTPSink` is aiosmtpd's ``LMTP`` on a unix socket or 127.0.0.1.
aiosmtpd pushes what ``handle_DATA`` returns as the one reply after the dot;
an LMTP server owes one reply per accepted recipient (RFC 2033 §4.2). The
handler here pushes them itself, each as the test says::

    async with LMTPSink(path=str(tmp_path / "lmtp.sock")) as lmtp:
        lmtp.data_replies["full@example.test"] = ["452 4.2.2 Mailbox full"]  # once, then 250
        lmtp.data_replies["gone@example.test"] = "550 5.1.1 No such user"    # every time
        ...
        assert lmtp.delivered("bob@example.test") == [content]

:class:`Dovecot` is a private Dovecot 2.3 (``dovecot -F``) serving LMTP on a
unix socket and IMAP on a free port of 127.0.0.1, with Maildir++ mailboxes
and a Maildir++ quota, for tests that check what Dovecot makes of a delivery::

    with Dovecot.started([DovecotUser("bob@example.test", quota="*:storage=20K")]) as dovecot:
        ...  # deliver to dovecot.lmtp_address, or write into dovecot.store
        with dovecot.imap("bob@example.test") as imap:
            imap.select("INBOX")
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from elemta.testing import free_port, require_tool_or_skip


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


# ------------------------------------------------------------------ a real Dovecot

#: The unprivileged user that owns the test mailboxes (Dovecot reads no mail as root).
MAIL_USER = "elemtamail"
#: How long Dovecot may take to answer on IMAP and LMTP.
START_SECONDS = 15.0
#: Where distributions put Dovecot's service binaries (imap, lmtp).
_LIBEXEC_DIRS = ("/usr/lib/dovecot", "/usr/libexec/dovecot")


@dataclass(frozen=True)
class DovecotUser:
    """A mailbox: its login (the address), password and Dovecot ``quota_rule``, if any."""

    address: str
    password: str = "secret"
    quota: str | None = None   # e.g. "*:storage=20K:messages=100"


class Dovecot:
    """One private ``dovecot -F``: configuration, sockets, log and mailboxes under ``root``.

    ``root`` is a folder of its own (``0711``) so that the mail user can reach
    ``store``, where the mailbox of ``user@domain`` is ``store/domain/user/Maildir``
    (the home ``store/domain/user`` exists, owned by the mail user). LMTP
    listens on the unix socket ``lmtp_socket``, IMAP on 127.0.0.1:``imap_port``.
    Sub-addresses go to the folder the detail names (``lmtp_save_to_detail_mailbox``).
    The quota is Maildir++ (``quota = maildir:User quota``), ``quota_full_tempfail``
    is off: a full mailbox gets ``552 5.2.2`` at LMTP.

    Dovecot must switch to the mail user, so this needs root: as another
    user, the test is skipped. The mail user is created when missing.
    """

    def __init__(self, users: Iterable[DovecotUser]) -> None:
        self.binary = require_tool_or_skip("dovecot", "dovecot-core")
        self.doveadm_binary = require_tool_or_skip("doveadm", "dovecot-core")
        for service, package in (("imap", "dovecot-imapd"), ("lmtp", "dovecot-lmtpd")):
            _require_service(service, package)
        if os.geteuid() != 0:
            pytest.skip("Dovecot needs root to switch to the user that owns the mailboxes")
        self.uid, self.gid = _mail_user()
        self.users = {u.address: u for u in users}
        self.root = Path(tempfile.mkdtemp(prefix="elemta-dovecot-"))
        self.root.chmod(0o711)
        self.store = self.root / "store"
        self.lmtp_socket = self.root / "run" / "lmtp"
        self.log = self.root / "dovecot.log"
        self.conf = self.root / "dovecot.conf"
        self.imap_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._make_store()
            self._write_config()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @classmethod
    @contextlib.contextmanager
    def started(cls, users: Iterable[DovecotUser]) -> Iterator[Dovecot]:
        """A running Dovecot, stopped and removed (mailboxes and all) at the end."""
        server = cls(users)
        try:
            server.start()
            yield server
        finally:
            server.stop()

    @property
    def lmtp_address(self) -> str:
        """The value for ``[plugins.lmtp] address``."""
        return f"unix:{self.lmtp_socket}"

    @property
    def owner(self) -> str:
        """The value for ``[plugins.maildir] owner``."""
        return f"{self.uid}:{self.gid}"

    @property
    def mail_path(self) -> str:
        """The value for ``[plugins.maildir] path``: the mailboxes Dovecot serves."""
        return f"{self.store}/{{domain}}/{{user}}/Maildir"

    def maildir(self, address: str) -> Path:
        user, _, domain = address.partition("@")
        return self.store / domain / user / "Maildir"

    def _make_store(self) -> None:
        for address in self.users:
            home = self.maildir(address).parent
            for folder in (self.store, home.parent, home):
                if not folder.exists():
                    folder.mkdir(mode=0o700)
                    os.chown(folder, self.uid, self.gid)
        self.store.chmod(0o711)
        users = self.root / "users"
        users.write_text("".join(
            f"{u.address}:{{PLAIN}}{u.password}:{self.uid}:{self.gid}::"
            f"{self.maildir(u.address).parent}::"
            + (f"userdb_quota_rule={u.quota}" if u.quota else "") + "\n"
            for u in self.users.values()), encoding="utf-8")
        users.chmod(0o644)   # read by the auth process, which is not root

    def _write_config(self) -> None:
        root = self.root
        self.conf.write_text(f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {self.log}
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {self.uid}
last_valid_uid = {self.uid}
auth_mechanisms = plain
disable_plaintext_auth = no
mail_location = maildir:~/Maildir
recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
mail_plugins = $mail_plugins quota
protocol imap {{
  mail_plugins = $mail_plugins imap_quota
}}
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
""")

    def start(self) -> None:
        with open(self.root / "dovecot.out", "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.conf)],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while not (self._lmtp_answers() and self._imap_answers()):
            if self.proc.poll() is not None:
                pytest.fail(f"dovecot exited with status {self.proc.returncode}:\n"
                            f"{self.output()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"dovecot did not answer on IMAP and LMTP within {START_SECONDS} s:"
                            f"\n{self.output()}", pytrace=False)
            time.sleep(0.05)

    def _lmtp_answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2.0)
                s.connect(str(self.lmtp_socket))
                return s.recv(512).startswith(b"220 ")
        except OSError:
            return False

    def _imap_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.imap_port), timeout=2.0) as s:
                return s.recv(512).startswith(b"* OK")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop every Dovecot process and remove ``root``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()   # the master stops its children, then exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def output(self) -> str:
        """Dovecot's log, and what it wrote before its log was open."""
        text = ""
        for name in ("dovecot.out", "dovecot.log"):
            with contextlib.suppress(FileNotFoundError):
                text += (self.root / name).read_text(errors="replace")
        return text

    @contextlib.contextmanager
    def imap(self, address: str) -> Iterator[imaplib.IMAP4]:
        """An IMAP session logged in as ``address``; logged out at the end."""
        client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        try:
            client.login(address, self.users[address].password)
            yield client
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                client.logout()

    def doveadm(self, *args: str) -> str:
        """``doveadm -c <this config> ARGS``; its output (the test fails if it does)."""
        done = subprocess.run([self.doveadm_binary, "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.fail(f"doveadm {' '.join(args)} failed ({done.returncode}): "
                        f"{done.stderr}", pytrace=False)
        return done.stdout


def _require_service(name: str, package: str) -> None:
    """Skip (fail under ``CI=true``) when Dovecot's ``name`` service is not installed."""
    if any(os.access(os.path.join(d, name), os.X_OK) for d in _LIBEXEC_DIRS):
        return
    reason = (f"Dovecot's {name} service is not installed (install it with `make test-tools`, "
              f"or `apt-get install {package}`)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a required tool is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def _mail_user() -> tuple[int, int]:
    """The uid and gid of :data:`MAIL_USER`, created as a system user when missing."""
    try:
        entry = pwd.getpwnam(MAIL_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        done = subprocess.run([useradd, "--system", "--no-create-home", "--home-dir",
                               "/nonexistent", "--shell", "/usr/sbin/nologin", MAIL_USER],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.fail(f"cannot create the mail user {MAIL_USER!r}: {done.stderr}",
                        pytrace=False)
        entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid
