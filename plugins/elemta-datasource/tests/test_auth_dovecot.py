"""The Dovecot password source against a real Dovecot 2.3 (``dovecot -F``).

The fixture runs a throw-away Dovecot with everything under a tmp folder
(base_dir, state_dir, log file), no protocols (so no network listener at all),
and its ``auth-client`` socket there. Its passdbs:

* a passwd-file of users hashed by ``doveadm pw`` in several schemes;
* ``*@tls.test``: a passwd-file named ``tls%{secured}``, so that a user there
  logs in only when the request carries the ``secured`` flag (Dovecot 2.3's
  auth service leaves ``disable_plaintext_auth`` to its login processes and
  does not apply it to auth-client requests: this shows the flag instead);
* ``*@broken.test``: a checkpassword script exiting 111, a temporary failure;
* ``*@slow.test``: a checkpassword script that answers after a second.

Failed logins are not delayed (``auth_failure_delay = 0``: Dovecot then
answers at its next 0.5 s tick), and each check comes from an address of its
own, so that Dovecot's penalty for an address that keeps failing stays out of
the way. Only the "server that never answers" case uses a tiny asyncio unix
server: a fault, not the protocol.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pwd
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pydantic
import pytest

from elemta.testing import require_tool_or_skip
from elemta_datasource.directory import BackendUnavailable
from elemta_datasource.dovecot import DovecotPasswords, DovecotSettings

START_SECONDS = 15.0
SCHEMES = ("SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID", "SSHA512", "PBKDF2")
ALICE = ("alice@example.test", "alice secret")
TINA = ("tina@tls.test", "tina secret")

_addresses = (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in itertools.count(1))


def ip() -> str:
    """A client address not used before (Dovecot's penalty is per address)."""
    return next(_addresses)


def user_of(scheme: str) -> tuple[str, str]:
    """The login and (not ASCII) password of the user hashed with ``scheme``."""
    return f"{scheme.lower()}@example.test", f"pässwörd {scheme}"


class Dovecot:
    """One ``dovecot -F`` with its configuration, users and log under ``root``."""

    def __init__(self, root: Path, schemes: tuple[str, ...] = SCHEMES) -> None:
        self.binary = require_tool_or_skip("dovecot", "dovecot-core")
        self.doveadm = require_tool_or_skip("doveadm", "dovecot-core")
        self.root = root
        self.conf = root / "dovecot.conf"
        self.log = root / "dovecot.log"
        self.socket = root / "run" / "auth-client"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()
        listed = self._doveadm("pw", "-l").split()
        self.schemes = {s for s in schemes if s in listed}
        users = [("SHA512-CRYPT", *ALICE), *((s, *user_of(s)) for s in sorted(self.schemes))]
        self._passwd_file("users", users)
        self._passwd_file("tls", [])   # nobody, without the secured flag
        self._passwd_file("tlssecured", [("SHA512-CRYPT", *TINA)])
        for name, body in (("tempfail.sh", "exit 111"), ("slow.sh", "sleep 1\nexit 1")):
            (root / name).write_text(f"#!/bin/sh\n{body}\n")
            (root / name).chmod(0o755)

    def _write_config(self) -> None:
        root = self.root
        if os.geteuid() == 0:
            # Dovecot refuses root for its unprivileged processes; the Debian
            # package creates these two. The auth process runs as root so that
            # it can read the files in this private (0700) tmp folder.
            for name in ("dovecot", "dovenull"):
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    pytest.fail(f"running as root and there is no {name!r} user to run "
                                "Dovecot's processes as (install dovecot-core)", pytrace=False)
            internal, login, auth = "dovecot", "dovenull", "root"
            chroot = ""
        else:
            internal = login = auth = pwd.getpwuid(os.geteuid()).pw_name
            chroot = "service anvil {\n  chroot =\n}\n"
        self.conf.write_text(f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {self.log}
protocols =
ssl = no
default_internal_user = {internal}
default_login_user = {login}
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_failure_delay = 0
auth_verbose = yes
auth_debug = yes
passdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
passdb {{
  driver = passwd-file
  username_filter = *@tls.test
  args = username_format=%u {root}/tls%{{secured}}
}}
passdb {{
  driver = checkpassword
  username_filter = *@broken.test
  args = {root}/tempfail.sh
}}
passdb {{
  driver = checkpassword
  username_filter = *@slow.test
  args = {root}/slow.sh
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  user = {auth}
  unix_listener auth-client {{
    mode = 0600
  }}
}}
{chroot}""")

    def _passwd_file(self, name: str, users: list[tuple[str, str, str]]) -> None:
        lines = [f"{login}:{self._doveadm('pw', '-s', scheme, '-p', password).strip()}\n"
                 for scheme, login, password in users]
        (self.root / name).write_text("".join(lines), encoding="utf-8")

    def _doveadm(self, *args: str) -> str:
        done = subprocess.run([self.doveadm, "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            pytest.fail(f"doveadm {args[0]} failed ({done.returncode}): {done.stderr}",
                        pytrace=False)
        return done.stdout

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        with open(self.root / "dovecot.out", "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.conf)],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while not self._answers():
            if self.proc.poll() is not None:
                out = (self.root / "dovecot.out").read_text(errors="replace")
                pytest.fail(f"dovecot exited with status {self.proc.returncode}: {out}"
                            f"{self.output()}", pytrace=False)
            if time.monotonic() > deadline:
                self.crash()
                pytest.fail(f"dovecot's {self.socket} did not answer within {START_SECONDS} s:"
                            f"\n{self.output()}", pytrace=False)
            time.sleep(0.02)

    def _answers(self) -> bool:
        """Whether the auth-client socket completes a handshake now."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(str(self.socket))
                s.sendall(b"VERSION\t1\t2\nCPID\t1\n")
                received = b""
                while b"\nDONE\n" not in received:
                    data = s.recv(4096)
                    if not data:
                        return False
                    received += data
                return True
        except OSError:
            return False

    def crash(self) -> None:
        """SIGKILL to every Dovecot process at once; returns once the socket refuses."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
            except OSError:
                return
            time.sleep(0.02)
        pytest.fail(f"{self.socket} still accepts connections after Dovecot was killed",
                    pytrace=False)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()   # the master stops its children, then exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.crash()

    def count(self, text: str) -> int:
        return self.output().count(text)

    async def logged(self, text: str) -> None:
        """Wait until Dovecot's log (written by its log process) holds ``text``."""
        deadline = time.monotonic() + 5.0
        while text not in self.output():
            assert time.monotonic() < deadline, f"{text!r} is not in Dovecot's log"
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """The module's Dovecot; tests must leave it running."""
    server = Dovecot(tmp_path_factory.mktemp("dovecot"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def source(dovecot: Dovecot):
    passwords = DovecotPasswords(DovecotSettings(socket=dovecot.socket))
    await passwords.open()
    yield passwords
    await passwords.close()


async def verify(source: DovecotPasswords, login: str, password: str,
                 secured: bool = False) -> str | None:
    return await source.verify(login, password, peer_ip=ip(), secured=secured,
                               local_ip="127.0.0.1")


# ------------------------------------------------------------------ answers


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_each_scheme_logs_in(source: DovecotPasswords, dovecot: Dovecot,
                                   scheme: str) -> None:
    if scheme not in dovecot.schemes:
        pytest.skip(f"this Dovecot build has no {scheme} (doveadm pw -l)")
    login, password = user_of(scheme)
    assert await verify(source, login, password) == login
    assert await verify(source, login, password + "x") is None


async def test_the_login_returned_is_dovecots_user(source: DovecotPasswords) -> None:
    # Dovecot lower-cases logins (auth_username_format = %Lu) and says so in user=
    assert await verify(source, "ALICE@Example.TEST", ALICE[1]) == ALICE[0]


async def test_wrong_password_and_unknown_user(source: DovecotPasswords) -> None:
    started = time.monotonic()
    results = await asyncio.gather(verify(source, ALICE[0], "not the secret"),
                                   verify(source, "nobody@example.test", ALICE[1]),
                                   verify(source, ALICE[0], ""))
    assert results == [None, None, None]
    assert time.monotonic() - started < 3.0


async def test_control_characters_are_refused_without_a_request(
        source: DovecotPasswords, dovecot: Dovecot) -> None:
    async def marker() -> None:
        login = f"marker-{uuid.uuid4().hex}@example.test"
        assert await verify(source, login, "x") is None
        await dovecot.logged(login)

    await marker()
    requests = dovecot.count("client in: AUTH")
    for login, password in ((ALICE[0] + "\0x", ALICE[1]), ("ali\tce@example.test", ALICE[1]),
                            ("alice@example.test\n", ALICE[1]), (ALICE[0], "alice\0secret"),
                            (ALICE[0], ALICE[1] + "\n"), (ALICE[0], "a\tb"), ("", ALICE[1]),
                            (ALICE[0], "x" * 5000)):
        assert await verify(source, login, password) is None
    await marker()
    assert dovecot.count("client in: AUTH") == requests + 1, "only the marker reached Dovecot"


async def test_secured_flag_reaches_dovecot(source: DovecotPasswords) -> None:
    assert await verify(source, *TINA, secured=False) is None
    assert await verify(source, *TINA, secured=True) == TINA[0]


async def test_temporary_failure_raises(source: DovecotPasswords) -> None:
    with pytest.raises(BackendUnavailable, match="temporary failure"):
        await verify(source, "bert@broken.test", "whatever")
    assert await verify(source, *ALICE) == ALICE[0], "the connection is still usable"


async def test_fifty_concurrent_checks_share_one_connection(dovecot: Dovecot) -> None:
    users = [ALICE, *(user_of(s) for s in sorted(dovecot.schemes) if "ARGON" not in s)]
    cases = []
    for i in range(50):
        login, password = users[i % len(users)]
        right = i % 3 != 0
        cases.append((login, password if right else password + "!", login if right else None))
    source = DovecotPasswords(DovecotSettings(socket=dovecot.socket))   # not opened: lazily
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(verify(source, login, password)
                                         for login, password, _ in cases))
        assert results == [expected for _, _, expected in cases]
        assert source._connects == 1, "one connection, opened once for all fifty"
        assert time.monotonic() - started < 5.0
    finally:
        await source.close()


# ------------------------------------------------------------------ faults


async def test_no_answer_in_time_raises_and_the_late_reply_is_dropped(dovecot: Dovecot,
                                                                     caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="elemta.datasource")
    source = DovecotPasswords(DovecotSettings(socket=dovecot.socket, timeout_seconds=0.3))
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="did not answer within 0.3 s"):
            await verify(source, "sam@slow.test", "x")
        assert time.monotonic() - started < 1.0
        assert await verify(source, *ALICE) == ALICE[0]
        deadline = time.monotonic() + 5.0
        while "dropping a late FAIL" not in caplog.text:
            assert time.monotonic() < deadline, "the late reply never came"
            await asyncio.sleep(0.05)
        assert await verify(source, *ALICE) == ALICE[0]
        assert source._connects == 1, "the late reply did not break the connection"
    finally:
        await source.close()


async def test_close_fails_checks_in_flight(dovecot: Dovecot) -> None:
    source = DovecotPasswords(DovecotSettings(socket=dovecot.socket))
    await source.open()
    check = asyncio.create_task(verify(source, "sam@slow.test", "x"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await source.close()
    with pytest.raises(BackendUnavailable, match="lost the connection"):
        await check
    assert time.monotonic() - started < 0.5
    with pytest.raises(BackendUnavailable, match="is closed"):
        await verify(source, *ALICE)


async def test_dovecot_down_then_back(tmp_path: Path) -> None:
    server = Dovecot(tmp_path, schemes=())
    server.start()
    source = DovecotPasswords(DovecotSettings(socket=server.socket))
    try:
        await source.open()
        assert await verify(source, *ALICE) == ALICE[0]
        server.crash()       # while the connection is idle
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as failure:
                await verify(source, *ALICE)
            assert time.monotonic() - started < 1.0, "no waiting while Dovecot is down"
            assert str(server.socket) in str(failure.value)
        server.start()
        assert await verify(source, *ALICE) == ALICE[0]
        assert source._connects == 2
        # restarted before the connection was seen to break: the check is sent again
        server.crash()
        server.start()
        assert await verify(source, *ALICE) == ALICE[0]
        assert source._connects == 3
    finally:
        await source.close()
        server.stop()


async def test_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "auth-client"
    source = DovecotPasswords(DovecotSettings(socket=path))
    with pytest.raises(BackendUnavailable) as failure:
        await source.open()
    assert str(path) in str(failure.value)
    assert "No such file or directory" in str(failure.value)
    with pytest.raises(BackendUnavailable, match="No such file or directory"):
        await verify(source, *ALICE)


async def test_not_the_auth_client_socket(dovecot: Dovecot) -> None:
    # auth-userdb speaks Dovecot's master protocol: it hangs up on this handshake
    source = DovecotPasswords(DovecotSettings(socket=dovecot.socket.with_name("auth-userdb")))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="auth-client socket"):
        await source.open()
    assert time.monotonic() - started < 2.0


async def test_a_server_that_never_answers(tmp_path: Path) -> None:
    path = tmp_path / "silent"
    connections: list[asyncio.StreamWriter] = []
    handlers: list[asyncio.Task] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        handlers.append(asyncio.current_task())
        await reader.read()      # never a byte back, until the client hangs up

    server = await asyncio.start_unix_server(accept, str(path))
    source = DovecotPasswords(DovecotSettings(socket=path, timeout_seconds=0.5))
    try:
        for attempt in (source.open(), verify(source, *ALICE)):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="within 0.5 s") as failure:
                await attempt
            assert 0.4 < time.monotonic() - started < 2.0
            assert str(path) in str(failure.value)
        # close() does not wait for a handshake that is not coming
        closing = DovecotPasswords(DovecotSettings(socket=path, timeout_seconds=5.0))
        check = asyncio.create_task(verify(closing, *ALICE))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await closing.close()
        with pytest.raises(BackendUnavailable, match="is closed"):
            await check
        assert time.monotonic() - started < 0.5
        assert len(connections) == 3
    finally:
        await source.close()
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)


async def test_passwords_are_never_logged(dovecot: Dovecot, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="elemta.datasource")
    source = DovecotPasswords(DovecotSettings(socket=dovecot.socket))
    try:
        assert await verify(source, *ALICE) == ALICE[0]
        assert await verify(source, ALICE[0], "wrong-secret-123") is None
        assert await verify(source, ALICE[0], "tab\tsecret-456") is None
        with pytest.raises(BackendUnavailable):
            await verify(source, "bert@broken.test", "broken-secret-789")
    finally:
        await source.close()
    assert "alice@example.test" in caplog.text
    for secret in (ALICE[1], "wrong-secret-123", "secret-456", "broken-secret-789"):
        assert secret not in caplog.text


# ------------------------------------------------------------------ settings


def test_settings() -> None:
    settings = DovecotSettings()
    assert (settings.socket, settings.service, settings.timeout_seconds) == (
        Path("/run/dovecot/auth-client"), "smtp", 5.0)
    assert DovecotPasswords().writable is False
    with pytest.raises(pydantic.ValidationError, match="only unix sockets"):
        DovecotSettings(socket="127.0.0.1:12345")
    with pytest.raises(pydantic.ValidationError, match="only unix sockets"):
        DovecotSettings(socket="inet:localhost:12345")
    assert DovecotSettings(socket="run/auth-client").socket == Path("run/auth-client")
    for bad in ({"service": "smtp\tsecured"}, {"service": ""}, {"timeout_seconds": 0},
                {"sockets": "/run/x"}):
        with pytest.raises(pydantic.ValidationError):
            DovecotSettings(**bad)


# ------------------------------------------------------------------ through a server


async def test_submission_with_dovecot_checking_passwords(dovecot: Dovecot, elemta_server,
                                                          elemta_outbox) -> None:
    """An operator who runs Dovecot points Elemta at its auth socket and is done."""
    import base64

    from elemta.testing import RawSMTP, unverified_context

    server = await elemta_server({"domains": {}, "plugins": {
        "enabled": ["datasource"],
        "datasource": {"auth": {"source": "dovecot", "cache_seconds": 0,
                                "dovecot": {"socket": str(dovecot.socket)}}}}},
        outbox=elemta_outbox)
    login, password = user_of("SHA512-CRYPT")
    c = RawSMTP(server.port("submission"))
    await c.connect()
    await c.cmd("EHLO client.example")
    await c.starttls(unverified_context())
    assert "AUTH PLAIN LOGIN" in (await c.cmd("EHLO client.example")).lines
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    assert (await c.cmd(f"AUTH PLAIN {token}")).code == 235
    assert (await c.send_message(login, ["friend@outside.example"],
                                 f"From: {login}\r\n\r\nhi\r\n.\r\n".encode())).code == 250
    c.close()
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.envelope.auth == login
