"""The real ``elemta serve`` process: crash durability, signals, TLS reload, real clients.

Every test starts the server as a subprocess on free loopback ports and talks
to it over TCP, the way an operator's MTA or a mail client would.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import aiosmtplib
import pytest
import trustme
from cryptography import x509

from elemta.spool.envelope import STATES, Envelope
from elemta.testing.fixtures import write_config

from elemta.testing.process import (ServerProcess, elemta_command, find_tool, free_port, listener,
                                   wait_until)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "elemta.toml"
HOSTNAME = "mx.example.test"
QUEUED = re.compile(r"queued as ([A-Za-z0-9_-]+)")


# ------------------------------------------------------------------ helpers


def run_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ELEMTA_LOAD_PLUGINS"}
    return subprocess.run(elemta_command(*args), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class LineClient:
    """A bare SMTP client on asyncio streams: exact control over what is sent when."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> "LineClient":
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 10)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10) -> str:
        """One complete (possibly multi-line) reply; "" if the server closed the connection."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return "".join(lines)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    def close(self) -> None:
        self.writer.close()


def state_ids(spool: Path) -> dict[str, str]:
    """queue id → state of every envelope file in the spool."""
    out = {}
    for state in STATES:
        d = spool / state
        if d.is_dir():
            for name in os.listdir(d):
                if name.endswith(".json"):
                    out[name.removesuffix(".json")] = state
    return out


def peer_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int:
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def leaf_serial(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


# ------------------------------------------------------------------ 1. durability under SIGKILL

MAX_MESSAGES = 2000
SENDERS = 10
BIG_EVERY = 20                   # every 20th body is spilled to disk (above memory_bytes)
BIG_LINES = 5000                 # ~350 KB


def build_message(n: int, marker: str) -> bytes:
    lines = BIG_LINES if n % BIG_EVERY == 0 else 20
    head = (f"From: sender@client.example\r\nTo: user@example.test\r\n"
            f"Subject: durability {n}\r\nMessage-ID: <{marker}@client.example>\r\n"
            f"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n")
    body = "".join(f"line {i} of {marker} " + "x" * 40 + "\r\n" for i in range(lines))
    return (head + body + f"END {marker}\r\n").encode()


async def _send_until_stopped(port: int, counter: Iterator[int], stop: asyncio.Event,
                              acked: dict[str, str], errors: list[str]) -> None:
    """Send messages on one connection until the server dies or the budget is spent."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=15)
    try:
        await client.connect()
        while not stop.is_set():
            n = next(counter)
            if n >= MAX_MESSAGES:
                return
            marker = f"m{n:05d}-{uuid.uuid4().hex}"
            await client.mail("sender@client.example")
            await client.rcpt("user@example.test")
            response = await client.data(build_message(n, marker))
            match = QUEUED.search(response.message)
            if response.code != 250 or match is None:
                errors.append(f"unexpected reply to DATA: {response}")
                return
            acked[match.group(1)] = marker
    except (aiosmtplib.SMTPException, OSError) as e:
        if not stop.is_set():
            errors.append(f"{type(e).__name__}: {e}")
    finally:
        client.close()


def check_content(path: Path, marker: str) -> None:
    content = path.read_bytes()
    assert f"<{marker}@client.example>".encode() in content, f"{path}: wrong message"
    assert content.endswith(f"END {marker}\r\n".encode()), f"{path}: content is truncated"


def marker_of(path: Path) -> str:
    m = re.search(rb"Message-ID: <([^@>]+)@client\.example>", path.read_bytes())
    assert m is not None, f"{path}: no Message-ID, the content is damaged"
    return m.group(1).decode()


async def test_acknowledged_messages_survive_sigkill(tmp_path: Path, start_server) -> None:
    port = free_port()
    config = write_config(tmp_path / "srv", {
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
        "log": {"level": "warning"},
    })
    spool = tmp_path / "srv" / "queue"
    server = start_server(config)

    acked: dict[str, str] = {}
    errors: list[str] = []
    stop = asyncio.Event()
    counter = itertools.count()
    senders = [asyncio.create_task(_send_until_stopped(port, counter, stop, acked, errors))
               for _ in range(SENDERS)]
    # Kill after about a second of traffic, and in any case while messages
    # are still being sent.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and len(acked) < MAX_MESSAGES // 2 and not errors:
        await asyncio.sleep(0.01)
    os.kill(server.pid, signal.SIGKILL)
    stop.set()
    server.wait(10)
    done, pending = await asyncio.wait(senders, timeout=30)
    for task in pending:
        task.cancel()
    assert not pending, "clients did not notice that the server died"
    assert not errors, f"errors before the server was killed: {errors[:5]}\n{server.output()}"
    assert len(acked) >= 20, f"only {len(acked)} messages were acknowledged in a second"
    assert len(acked) < MAX_MESSAGES, "every message was sent before the kill"

    # --- right after the crash, before any recovery. A 250 means "in the
    # journal": an acknowledged message may not be in the directories yet.
    envelopes = state_ids(spool)
    for queue_id, state in envelopes.items():
        # every visible envelope is whole and its content is whole, acknowledged or not
        env = Envelope.from_json((spool / state / f"{queue_id}.json").read_bytes())
        assert env.id == queue_id
        content = spool / "messages" / queue_id
        assert content.is_file(), f"envelope {queue_id} without content"
        check_content(content, marker_of(content))

    # --- restart: recovery cleans up, nothing acknowledged is lost
    server2 = start_server(config)
    assert os.listdir(spool / "tmp") == []
    contents_after = set(os.listdir(spool / "messages"))
    envelopes_after = state_ids(spool)
    assert contents_after == set(envelopes_after), "orphan content or missing content"
    # Content without its envelope at the kill was either in the journal (recovery
    # completes the message) or not (recovery removes it): every message is whole.
    for queue_id in contents_after:
        check_content(spool / "messages" / queue_id, marker_of(spool / "messages" / queue_id))
    for queue_id, marker in acked.items():
        assert envelopes_after.get(queue_id) in ("ready", "deferred"), \
            f"acknowledged {queue_id} is not in the spool after recovery"
        env = Envelope.from_json(
            (spool / envelopes_after[queue_id] / f"{queue_id}.json").read_bytes())
        assert env.id == queue_id
        assert [r.address for r in env.recipients] == ["user@example.test"]
        check_content(spool / "messages" / queue_id, marker)
    # Recovery keeps every visible message where it was and replays the journal:
    # messages synced to it but not yet written out come back too (duplicates of
    # unacknowledged ones at worst, never losses).
    assert envelopes.items() <= envelopes_after.items(), "recovery lost or moved a message"

    listing = run_cli("--config", str(config), "queue", "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    listed = set(re.findall(r"^\s*([0-9A-Z]{20})\s", listing.stdout, re.M))
    assert set(acked) <= listed, f"missing from `elemta queue list`: {set(acked) - listed}"
    assert f"{len(envelopes_after)} messages" in listing.stdout

    server2.send_signal(signal.SIGTERM)
    assert server2.wait(20) == 0, server2.output()


# ------------------------------------------------------------------ 2. swaks submission flow

AUTH_PLUGIN = '''\
"""Test credentials: alice/secret."""
from elemta import Accept, Reject, hookimpl


@hookimpl
def auth(credentials):
    if credentials.login == "alice" and credentials.password == "secret":
        return Accept()
    return Reject(535, "5.7.8", "Authentication credentials invalid")
'''


@pytest.fixture
def submission_server(tmp_path: Path, start_server) -> dict[str, Any]:
    """A server with submission (STARTTLS) and smtps (implicit TLS) listeners and an auth plugin."""
    site = tmp_path / "sitepkgs" / "testplugins"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    (site / "auth.py").write_text(AUTH_PLUGIN)
    ports = {"submission": free_port(), "smtps": free_port()}
    config = write_config(tmp_path / "srv", {
        "listeners": [listener("submission", ports["submission"], "submission", "starttls"),
                      listener("smtps", ports["smtps"], "submission", "implicit")],
        "metrics": {"enabled": False},
        "log": {"level": "info"},
        "plugins": {"enabled": ["testplugins.auth"]},
    })
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "sitepkgs"),
                                               os.environ.get("PYTHONPATH")]))
    server = start_server(config, env={"PYTHONPATH": pythonpath})
    return {"server": server, "ports": ports, "spool": tmp_path / "srv" / "queue"}


def swaks(path: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [path, "--server", "127.0.0.1", "--port", str(port), "--timeout", "20",
         "--from", "alice@example.test", "--to", "bob@elsewhere.example",
         "--header", "Subject: swaks test", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def queued_id(result: subprocess.CompletedProcess[str]) -> str:
    match = QUEUED.search(result.stdout)
    assert match is not None, result.stdout
    return match.group(1)


def test_swaks_authenticated_submission_is_relayed(submission_server, require_tool) -> None:
    path = require_tool("swaks")
    port, spool = submission_server["ports"]["submission"], submission_server["spool"]
    result = swaks(path, port, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                   "--auth-password", "secret")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    queue_id = queued_id(result)
    env = Envelope.from_json((spool / "ready" / f"{queue_id}.json").read_bytes())
    assert env.auth == "alice"
    assert env.listener == "submission"
    assert env.tls is not None and env.tls["implicit"] is False
    assert [r.address for r in env.recipients] == ["bob@elsewhere.example"]
    content = (spool / "messages" / queue_id).read_bytes()
    assert b"Subject: swaks test\r\n" in content


def test_swaks_wrong_password_gets_535(submission_server, require_tool) -> None:
    path = require_tool("swaks")
    result = swaks(path, submission_server["ports"]["submission"], "--tls", "--auth", "PLAIN",
                   "--auth-user", "alice", "--auth-password", "wrong")
    assert result.returncode != 0
    assert "535 5.7.8" in result.stdout
    assert state_ids(submission_server["spool"]) == {}


def test_swaks_mail_without_auth_gets_530(submission_server, require_tool) -> None:
    path = require_tool("swaks")
    result = swaks(path, submission_server["ports"]["submission"], "--tls")
    assert result.returncode != 0
    assert "530 5.7.0 Authentication required" in result.stdout
    assert state_ids(submission_server["spool"]) == {}


async def test_auth_is_not_offered_before_starttls(submission_server, require_tool) -> None:
    path = require_tool("swaks")
    port = submission_server["ports"]["submission"]
    result = await asyncio.to_thread(swaks, path, port, "--auth", "PLAIN", "--auth-user",
                                     "alice", "--auth-password", "secret")
    assert result.returncode != 0
    assert "Host did not advertise authentication" in result.stdout + result.stderr
    # a client that tries anyway is refused: the port requires TLS first
    client = await LineClient.connect(port)
    try:
        assert (await client.reply()).startswith("220 ")
        ehlo = await client.command("EHLO client.example")
        assert "STARTTLS" in ehlo and "AUTH" not in ehlo
        reply = await client.command("AUTH PLAIN AGFsaWNlAHNlY3JldA==")
        assert reply[:3] in ("530", "538"), reply
    finally:
        client.close()
    assert state_ids(submission_server["spool"]) == {}


def test_swaks_implicit_tls(submission_server, require_tool) -> None:
    path = require_tool("swaks")
    spool = submission_server["spool"]
    result = swaks(path, submission_server["ports"]["smtps"], "--tls-on-connect", "--auth",
                   "LOGIN", "--auth-user", "alice", "--auth-password", "secret")
    assert result.returncode == 0, result.stdout + result.stderr
    env = Envelope.from_json((spool / "ready" / f"{queued_id(result)}.json").read_bytes())
    assert env.listener == "smtps" and env.auth == "alice"
    assert env.tls is not None and env.tls["implicit"] is True


# ------------------------------------------------------------------ 3. SIGTERM graceful stop

GRACE = 5.0


@pytest.fixture
def plain_server(tmp_path: Path, start_server) -> dict[str, Any]:
    port = free_port()
    config = write_config(tmp_path / "srv", {
        "server": {"shutdown_grace_seconds": GRACE},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
    })
    return {"server": start_server(config), "port": port, "spool": tmp_path / "srv" / "queue"}


async def _open_session(port: int, *commands: str) -> LineClient:
    client = await LineClient.connect(port)
    assert (await client.reply()).startswith("220 ")
    for line in commands:
        reply = await client.command(line)
        assert reply.startswith("250"), (line, reply)
    return client


async def _stop_and_see_idle_told(server: ServerProcess, idle: LineClient) -> float:
    """SIGTERM; the idle session gets 421 4.3.2 at once. Returns when the signal was sent."""
    sent = time.monotonic()
    server.send_signal(signal.SIGTERM)
    reply = await idle.reply(timeout=GRACE)
    assert reply.startswith("421 4.3.2"), reply
    assert await idle.reply(timeout=GRACE) == "", "the idle session was not closed"
    return sent


async def _assert_not_accepting(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        client = await LineClient.connect(port)
        client.close()


async def test_sigterm_lets_data_in_progress_finish(plain_server) -> None:
    server, port, spool = plain_server["server"], plain_server["port"], plain_server["spool"]
    busy = await _open_session(port, "EHLO busy.example", "MAIL FROM:<a@client.example>",
                               "RCPT TO:<user@example.test>")
    assert (await busy.command("DATA")).startswith("354")
    await busy.send(b"Subject: graceful\r\n\r\nfirst half\r\n")
    idle = await _open_session(port, "EHLO idle.example")

    sent = await _stop_and_see_idle_told(server, idle)
    await _assert_not_accepting(port)
    await busy.send(b"second half\r\n.\r\n")
    reply = await busy.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    queue_id = QUEUED.search(reply).group(1)  # type: ignore[union-attr]
    await busy.command("QUIT")
    busy.close()
    assert await asyncio.to_thread(server.wait, GRACE + 10) == 0, server.output()
    assert time.monotonic() - sent < GRACE + 3
    assert (spool / "messages" / queue_id).read_bytes().endswith(b"first half\r\nsecond half\r\n")
    assert state_ids(spool) == {queue_id: "ready"}


async def test_sigterm_tells_a_session_idle_in_a_transaction_421_at_once(plain_server) -> None:
    """Between commands a session has nothing in progress, transaction or not: it is
    told 421 4.3.2 at once, and the grace period is not spent waiting for it."""
    server, port, spool = plain_server["server"], plain_server["port"], plain_server["spool"]
    mid = await _open_session(port, "EHLO mid.example", "MAIL FROM:<a@client.example>",
                              "RCPT TO:<user@example.test>")

    sent = await _stop_and_see_idle_told(server, mid)

    assert await asyncio.to_thread(server.wait, GRACE + 10) == 0, server.output()
    assert time.monotonic() - sent < GRACE / 2
    assert state_ids(spool) == {}


SLOW_START = """
import asyncio, os, pathlib
from elemta import hookimpl

@hookimpl
async def startup(app):
    pathlib.Path(os.environ["MARKS"], "starting").touch()
    await asyncio.sleep(60)

@hookimpl
def shutdown(app):
    pathlib.Path(os.environ["MARKS"], "shut-down").touch()
"""


async def test_sigterm_during_start_up_stops_cleanly(tmp_path: Path, start_server) -> None:
    (tmp_path / "slowplug").mkdir()
    (tmp_path / "slowplug" / "__init__.py").write_text("")
    (tmp_path / "slowplug" / "start.py").write_text(SLOW_START)
    port = free_port()
    config = write_config(tmp_path / "srv", {
        "listeners": [listener("mx", port)], "metrics": {"enabled": False},
        "plugins": {"enabled": ["slowplug.start"]}})
    env = {"PYTHONPATH": str(tmp_path), "MARKS": str(tmp_path)}
    server = start_server(config, env=env, wait_ready=False)
    await asyncio.to_thread(wait_until, (tmp_path / "starting").exists, 20, "the plugin starting")

    server.send_signal(signal.SIGTERM)

    assert await asyncio.to_thread(server.wait, 15) == 0, server.output()
    assert "stopping (signal received during start-up)" in server.output()
    assert "Traceback" not in server.output()
    assert (tmp_path / "shut-down").exists()
    await _assert_not_accepting(port)


async def test_sigterm_at_once_after_spawn_stops_cleanly(tmp_path: Path, start_server) -> None:
    config = write_config(tmp_path / "srv", {
        "listeners": [listener("mx", free_port())], "metrics": {"enabled": False}})
    server = start_server(config, wait_ready=False)
    await asyncio.sleep(0.15)  # the interpreter has started, the server has not

    server.send_signal(signal.SIGTERM)

    assert await asyncio.to_thread(server.wait, 15) == 0, server.output()
    assert "Traceback" not in server.output()


async def test_sigterm_closes_sessions_left_open_after_grace(plain_server) -> None:
    server, port = plain_server["server"], plain_server["port"]
    busy = await _open_session(port, "EHLO busy.example", "MAIL FROM:<a@client.example>",
                               "RCPT TO:<user@example.test>")
    assert (await busy.command("DATA")).startswith("354")
    await busy.send(b"Subject: never finished\r\n\r\n")
    sent = time.monotonic()
    server.send_signal(signal.SIGTERM)
    # the client stalls in DATA: the server closes it after the grace period
    assert await asyncio.to_thread(server.wait, GRACE + 15) == 0, server.output()
    assert GRACE - 0.5 <= time.monotonic() - sent < GRACE + 8
    busy.close()
    assert state_ids(plain_server["spool"]) == {}


# ------------------------------------------------------------------ 4. SIGHUP reloads TLS


def write_pair(cert_file: Path, key_file: Path, leaf: trustme.LeafCert) -> None:
    """Replace both files atomically, the way certbot's deploy hooks do."""
    for path, data in ((key_file, leaf.private_key_pem.bytes()),
                       (cert_file, b"".join(b.bytes() for b in leaf.cert_chain_pems))):
        tmp = path.with_suffix(".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)


async def _starttls_session(port: int, ctx: ssl.SSLContext) -> tuple[aiosmtplib.SMTP, int]:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10,
                             local_hostname="client.example")
    await client.connect()
    await client.ehlo()
    await client.starttls(tls_context=ctx)
    await client.ehlo()
    return client, peer_serial(client.get_transport_info("ssl_object"))


async def test_sighup_reloads_certificate_and_keeps_sessions(tmp_path: Path,
                                                             start_server) -> None:
    ca = trustme.CA()
    first = ca.issue_cert(HOSTNAME, "127.0.0.1")
    second = ca.issue_cert(HOSTNAME, "127.0.0.1", key_type=trustme.KeyType.RSA)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_pair(cert_file, key_file, first)
    port = free_port()
    config = write_config(tmp_path / "srv", {
        "listeners": [listener("mx", port, tls="starttls")],
        "tls": {"cert_file": str(cert_file), "key_file": str(key_file)},
        "metrics": {"enabled": False},
    })
    server = start_server(config)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    old, serial = await _starttls_session(port, ctx)
    try:
        assert serial == leaf_serial(first)
        write_pair(cert_file, key_file, second)
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        seen = serial
        while seen != leaf_serial(second) and time.monotonic() < deadline:
            new, seen = await _starttls_session(port, ctx)
            await new.quit()
            if seen != leaf_serial(second):
                await asyncio.sleep(0.1)
        assert seen == leaf_serial(second), "new connections still get the old certificate"

        # the session opened before the reload is still alive and still on the old one
        assert peer_serial(old.get_transport_info("ssl_object")) == leaf_serial(first)
        errors, reply = await old.sendmail(
            "sender@client.example", ["user@example.test"],
            b"Subject: after reload\r\n\r\nstill here\r\n")
        assert errors == {} and QUEUED.search(reply), reply
        await old.quit()
    finally:
        old.close()
    assert server.proc.poll() is None, server.output()
    assert "TLS: new connections use" in server.output()


# ------------------------------------------------------------------ 5. the shipped config runs


def test_shipped_config_runs(tmp_path: Path, start_server) -> None:
    text = SHIPPED_CONFIG.read_text()
    ports = {}
    for default in (2525, 2587, 2465, 9025):
        ports[default] = free_port()
        needle = f"127.0.0.1:{default}\""
        assert needle in text, f"the shipped elemta.toml no longer uses {needle}"
        text = text.replace(needle, f"127.0.0.1:{ports[default]}\"")
    config = tmp_path / "elemta.toml"
    config.write_text(text)
    server = start_server(config)

    # every listener greets; the third one only after the TLS handshake
    for default in (2525, 2587):
        with socket.create_connection(("127.0.0.1", ports[default]), timeout=10) as s:
            assert s.makefile("rb").readline().startswith(b"220 mx.example.test ")
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", ports[2465]), timeout=10) as raw:
        with unverified.wrap_socket(raw, server_hostname=HOSTNAME) as s:
            assert s.makefile("rb").readline().startswith(b"220 mx.example.test ")

    # STARTTLS on submission with the generated self-signed certificate, verified
    self_signed = tmp_path / ".elemta" / "tls" / "selfsigned.crt"
    assert self_signed.is_file(), "no self-signed certificate in state_dir"
    trusted = ssl.create_default_context(cafile=str(self_signed))

    async def starttls() -> str:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=ports[2587], start_tls=False,
                                 timeout=10, local_hostname="client.example")
        await client.connect()
        try:
            await client.ehlo()
            assert client.supports_extension("starttls")
            assert not client.supports_extension("auth")
            await client.starttls(tls_context=trusted, server_hostname=HOSTNAME)
            ehlo = await client.ehlo()
            await client.quit()
            return ehlo.message
        finally:
            client.close()

    ehlo = asyncio.run(starttls())
    assert "AUTH SCRAM-SHA-256 PLAIN LOGIN" in ehlo

    base = f"http://127.0.0.1:{ports[9025]}"
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base + path, timeout=10) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert "smtp_connections_total" in metrics
    assert re.search(r'smtp_connections_total\{listener="smtps"\} [1-9]', metrics), metrics

    # README's "Try it": a hosted domain and mailbox (elemta-datasource), then local mail
    # lands in a maildir next to the config (elemta-maildir); unknown users are refused
    for command in (("domains", "add", "example.test"),
                    ("mailboxes", "add", "user@example.test")):
        done = subprocess.run(elemta_command(*command), cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    with smtplib.SMTP("127.0.0.1", ports[2525], timeout=10) as client:
        client.ehlo("client.example")
        client.mail("you@example.org")
        assert client.rcpt("nobody@example.test")[0] == 550
    with smtplib.SMTP("127.0.0.1", ports[2525], timeout=10) as client:
        client.sendmail("you@example.org", ["user@example.test"],
                        b"Subject: try it\r\n\r\nhello\r\n")
    new = tmp_path / "mail" / "example.test" / "user" / "Maildir" / "new"
    [delivered] = wait_until(lambda: list(new.glob("*")) if new.is_dir() else [],
                             timeout=20, what="the message in the maildir")
    assert delivered.read_bytes().endswith(b"Subject: try it\r\n\r\nhello\r\n")

    # and its submission part: a user, then swaks --auth over STARTTLS on the submission port
    done = subprocess.run(elemta_command("users", "add", "me@example.test", "--password-stdin"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          input="a long enough password\n")
    assert done.returncode == 0, done.stderr
    swaks_path = find_tool("swaks")
    if swaks_path is not None:
        sent = subprocess.run(
            [swaks_path, "--server", f"127.0.0.1:{ports[2587]}", "--tls", "--auth", "PLAIN",
             "--auth-user", "me@example.test", "--auth-password", "a long enough password",
             "--from", "me@example.test", "--to", "user@example.test", "--timeout", "15"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "235 2.7.0" in sent.stdout
        wait_until(lambda: len(list(new.glob("*"))) == 2, timeout=20,
                   what="the submitted message in the maildir")

    # state and queue were created next to the copied config, not in the checkout
    assert (tmp_path / "queue" / "ready").is_dir()
    server.send_signal(signal.SIGTERM)
    assert server.wait(40) == 0, server.output()


# ------------------------------------------------------------------ smtp-source load


def test_smtp_source_load_is_all_queued(plain_server, require_tool) -> None:
    path = require_tool("smtp-source")
    port, spool = plain_server["port"], plain_server["spool"]
    result = subprocess.run(
        [path, "-s", "10", "-m", "300", "-l", "4000", "-f", "sender@client.example",
         "-t", "user@example.test", "-M", "client.example", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    ids = wait_until(lambda: (ids := state_ids(spool)) and len(ids) == 300 and ids,
                     what="300 envelopes in the spool")
    assert set(ids.values()) == {"ready"}
    for queue_id in ids:
        assert (spool / "messages" / queue_id).stat().st_size >= 4000

    # and it is told the truth about relaying
    refused = subprocess.run(
        [path, "-m", "1", "-f", "sender@client.example", "-t", "bob@elsewhere.example",
         f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)
    assert refused.returncode != 0
    assert "550 5.7.1" in refused.stderr
    assert len(state_ids(spool)) == 300
