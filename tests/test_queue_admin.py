"""``elemta queue`` changing the spool: through a running server, and with none.

The server runs in the test's event loop (the ``elemta_server`` fixture) with
its delivery runner active, sinks standing in for the remote MX hosts; the
command line runs as operators run it, a subprocess, started with
``asyncio.create_subprocess_exec`` so the event loop keeps serving the control
socket meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from elemta import Outcome, hookimpl
from elemta.app import StartupError
from elemta.spool.lock import lock_spool, unlock_spool
from elemta.delivery.dsn import parse_dsn
from elemta.models import new_id
from elemta.spool.envelope import Envelope, RecipientState
from elemta.spool.store import Spool
from elemta.testing.client import RawSMTP
from elemta.testing.fixtures import write_config
from elemta.testing.sink import Sink

from elemta.testing.process import free_port, listener

REFUSE = "451 4.3.0 Try again later"


def message(n: int = 1) -> bytes:
    return (f"Subject: queue admin {n}\r\nMessage-ID: <q{n}@origin.example>\r\n\r\n"
            "body\r\n").encode()


def delivery_config(dns_server: Any, **delivery: Any) -> dict[str, Any]:
    return {
        "server": {"relay_networks": ["127.0.0.0/8"]},
        "dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1, "attempts": 1},
        "delivery": {"enabled": True, "workers": 4, "retry_intervals_seconds": [0.3, 0.6],
                     "idle_connection_seconds": 0, **delivery},
    }


def mx(dns_server: Any, domain: str) -> None:
    dns_server.zone(domain)
    dns_server.add(domain, "MX", f"10 mx.{domain}.")
    dns_server.add(f"mx.{domain}", "A", "127.0.0.1")


async def submit(server: Any, sender: str, rcpts: list[str], data: bytes) -> str:
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message(sender, rcpts, data + b".\r\n")
    assert reply.code == 250, str(reply)
    await server.app.spool.checkpoint()  # hand it to the runner now
    return reply.text.rsplit(" ", 1)[1]


def where(root: Path, queue_id: str) -> tuple[str | None, dict[str, Any] | None]:
    for state in ("ready", "deferred", "hold", "failed"):
        try:
            return state, json.loads((root / state / f"{queue_id}.json").read_bytes())
        except FileNotFoundError:
            continue
    return None, None


async def wait_state(root: Path, queue_id: str, state: str | None, timeout: float = 10.0,
                     attempts: int = 0) -> dict[str, Any] | None:
    async with asyncio.timeout(timeout):
        while True:
            now, env = where(root, queue_id)
            if now == state and (env is None or env["attempts"] >= attempts):
                return env
            await asyncio.sleep(0.02)


async def queue(config: Path, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """``elemta --config CONFIG queue ARGS…`` in a subprocess: (status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "ELEMTA_LOAD_PLUGINS"}
    env["COLUMNS"] = "200"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "elemta", "--config", str(config), "queue", *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert b"Traceback" not in err, err.decode()
    return proc.returncode or 0, out.decode(), err.decode()


def config_of(server: Any) -> Path:
    return server.root / "elemta.toml"


class Attempts:
    """Counts the deferred attempts per queue id."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}

    @hookimpl
    def deferred(self, envelope: Envelope, recipient: RecipientState, outcome: Outcome) -> None:
        self.count[envelope.id] = self.count.get(envelope.id, 0) + 1


def assert_no_duplicates(*sinks: Sink) -> None:
    for sink in sinks:
        twice = {k: n for k, n in sink.deliveries().items() if n > 1}
        assert not twice, f"delivered more than once: {twice}"


# ------------------------------------------------------------------ with the server running


async def test_hold_keeps_a_deferred_message_and_release_delivers_it(elemta_server, dns_server):
    attempts = Attempts()
    async with Sink(data_reply=REFUSE) as sink:
        mx(dns_server, "remote.example")
        server = await elemta_server(
            delivery_config(dns_server, mx_overrides={"mx.remote.example": sink.address}),
            plugins=[("attempts", attempts)])
        root, config = server.spool_path, config_of(server)
        queue_id = await submit(server, "alice@origin.example", ["bob@remote.example"], message())
        await wait_state(root, queue_id, "deferred", attempts=1)

        status, out, err = await queue(config, "hold", queue_id)
        assert status == 0, err
        assert f"{queue_id}: held" in out
        state, env = where(root, queue_id)
        assert state == "hold" and env["hold_reason"] == "held by administrator"
        tried = attempts.count[queue_id]
        await asyncio.sleep(1.5)  # five retry intervals
        assert attempts.count[queue_id] == tried, "a held message was retried"
        assert where(root, queue_id)[0] == "hold"

        status, out, err = await queue(config, "hold", queue_id)
        assert status == 0, "holding a held message again is no error"

        sink.data_reply = None
        status, out, err = await queue(config, "release", queue_id)
        assert status == 0, err
        assert f"{queue_id}: released" in out
        [got] = await sink.wait_for(1)
        await wait_state(root, queue_id, None)
    assert got.recipients == ["bob@remote.example"]
    assert not (root / "messages" / queue_id).exists()
    assert_no_duplicates(sink)


async def test_retry_delivers_before_the_scheduled_time(elemta_server, dns_server):
    async with Sink(data_reply=REFUSE) as sink:
        mx(dns_server, "remote.example")
        server = await elemta_server(delivery_config(
            dns_server, retry_intervals_seconds=[3600],
            mx_overrides={"mx.remote.example": sink.address}))
        root, config = server.spool_path, config_of(server)
        first = await submit(server, "alice@origin.example", ["bob@remote.example"], message(1))
        others = [await submit(server, "alice@origin.example", [f"u{n}@remote.example"],
                               message(n)) for n in (2, 3)]
        for queue_id in (first, *others):
            env = await wait_state(root, queue_id, "deferred", attempts=1)
            assert env["next_attempt_at"] > time.time() + 3000
        sink.data_reply = None

        status, out, err = await queue(config, "retry", first)
        assert status == 0, err
        assert f"{first}: scheduled for delivery now" in out
        [got] = await sink.wait_for(1)
        await wait_state(root, first, None)
        assert got.recipients == ["bob@remote.example"]

        status, out, err = await queue(config, "retry", "--all")
        assert status == 0, err
        assert "2 deferred messages scheduled for delivery now" in out
        await sink.wait_for(3)
        for queue_id in others:
            await wait_state(root, queue_id, None)
    assert sorted(r for m in sink.messages for r in m.recipients) == [
        "bob@remote.example", "u2@remote.example", "u3@remote.example"]
    assert_no_duplicates(sink)


async def test_delete_removes_envelope_and_content(elemta_server, dns_server):
    async with Sink(data_reply=REFUSE) as sink:
        mx(dns_server, "remote.example")
        server = await elemta_server(delivery_config(
            dns_server, mx_overrides={"mx.remote.example": sink.address}))
        root, config = server.spool_path, config_of(server)
        queue_id = await submit(server, "alice@origin.example", ["bob@remote.example"], message())
        await wait_state(root, queue_id, "deferred", attempts=1)
        assert (root / "messages" / queue_id).exists()

        status, out, err = await queue(config, "delete", queue_id)
        assert status == 0, err
        assert f"{queue_id}: deleted" in out
        assert where(root, queue_id) == (None, None)
        assert not (root / "messages" / queue_id).exists()
        sink.data_reply = None
        await asyncio.sleep(1.0)  # retries would have happened by now
    assert sink.messages == []
    assert server.app.spool.counts()["deferred"] == 0


async def test_bounce_returns_the_message_to_its_sender(elemta_server, dns_server):
    async with Sink(data_reply=REFUSE) as remote, Sink() as origin:
        mx(dns_server, "remote.example")
        mx(dns_server, "origin.example")
        server = await elemta_server(delivery_config(dns_server, mx_overrides={
            "mx.remote.example": remote.address, "mx.origin.example": origin.address}))
        root, config = server.spool_path, config_of(server)
        queue_id = await submit(server, "alice@origin.example",
                                ["bob@remote.example", "carol@remote.example"], message())
        await wait_state(root, queue_id, "deferred", attempts=1)

        status, out, err = await queue(config, "bounce", queue_id)
        assert status == 0, err
        assert f"{queue_id}: returned to the sender" in out
        assert where(root, queue_id) == (None, None)
        assert not (root / "messages" / queue_id).exists()
        [dsn] = await origin.wait_for(1)
        remote.data_reply = None
        await asyncio.sleep(0.8)
    assert dsn.sender == "" and dsn.recipients == ["alice@origin.example"]
    fields = parse_dsn(dsn.content)
    assert [f["Final-Recipient"] for f in fields] == ["rfc822; bob@remote.example",
                                                      "rfc822; carol@remote.example"]
    assert all(f["Action"] == "failed" and f["Status"] == "5.0.0" for f in fields)
    assert "returned by the administrator" in fields[0]["Diagnostic-Code"]
    assert b"Subject: queue admin 1" in dsn.content
    assert remote.messages == [], "a returned message was delivered after all"


async def test_bounce_of_a_bounce_sends_nothing(elemta_server, dns_server):
    async with Sink(data_reply=REFUSE) as remote, Sink() as origin:
        mx(dns_server, "remote.example")
        mx(dns_server, "origin.example")
        server = await elemta_server(delivery_config(dns_server, mx_overrides={
            "mx.remote.example": remote.address, "mx.origin.example": origin.address}))
        root, config = server.spool_path, config_of(server)
        queue_id = await submit(server, "", ["bob@remote.example"], message())
        await wait_state(root, queue_id, "deferred", attempts=1)
        status, out, err = await queue(config, "bounce", queue_id)
        assert status == 0, err
        assert where(root, queue_id) == (None, None)
        await asyncio.sleep(0.8)
    assert origin.messages == []


async def test_stats_and_list_filters(elemta_server, dns_server):
    async with Sink(data_reply=REFUSE) as remote, Sink(data_reply=REFUSE) as other:
        mx(dns_server, "remote.example")
        mx(dns_server, "other.example")
        server = await elemta_server(delivery_config(dns_server, mx_overrides={
            "mx.remote.example": remote.address, "mx.other.example": other.address}))
        root, config = server.spool_path, config_of(server)
        to_remote = [await submit(server, "alice@origin.example", [f"u{n}@remote.example"],
                                  message(n)) for n in (1, 2)]
        to_both = await submit(server, "bob@elsewhere.example",
                               ["x@other.example", "y@remote.example"], message(3))
        to_other = await submit(server, "alice@origin.example", ["z@other.example"], message(4))
        held = await submit(server, "alice@origin.example", ["h@remote.example"], message(5))
        for queue_id in (*to_remote, to_both, to_other, held):
            await wait_state(root, queue_id, "deferred", attempts=1)
        assert (await queue(config, "hold", held))[0] == 0

        status, out, err = await queue(config, "list", "--state", "deferred",
                                       "--domain", "remote.example")
        assert status == 0, err
        assert all(q in out for q in (*to_remote, to_both)), out
        assert to_other not in out and held not in out
        assert "3 messages in state deferred" in out

        status, out, err = await queue(config, "list", "--from", "bob@", "--json")
        assert status == 0, err
        [item] = json.loads(out)
        assert item["id"] == to_both and item["state"] == "deferred"
        assert item["recipients"] == ["x@other.example", "y@remote.example"]
        assert item["pending"] == 2 and "451 4.3.0" in item["last_error"]

        status, out, err = await queue(config, "list", "--to", "z@other", "--json")
        assert [i["id"] for i in json.loads(out)] == [to_other]

        status, out, err = await queue(config, "list", "--limit", "2")
        assert status == 0, err
        assert "2 of 5 messages" in out
        assert to_remote[0] in out and held not in out  # oldest first

        status, out, err = await queue(config, "stats")
        assert status == 0, err
        lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
        assert lines["deferred"][0] == "4" and lines["hold"][0] == "1"
        assert lines["ready"][0] == "0" and lines["total"][0] == "5"
        assert lines["remote.example"][:2] == ["3", "3"]  # recipients, messages
        assert lines["other.example"][:2] == ["2", "2"]
        assert "Server: running" in out

        status, out, err = await queue(config, "stats", "--json")
        stats = json.loads(out)
        assert stats["total"] == 5 and stats["states"]["hold"]["messages"] == 1
        assert stats["deferred_domains"][0] == {"domain": "remote.example", "recipients": 3,
                                                "messages": 3}
        assert stats["server"]["delivery_enabled"] is True
        assert stats["server"]["counts"]["deferred"] == 4


async def test_unknown_ids_exit_1_and_the_known_ones_are_done(elemta_server, dns_server):
    async with Sink(data_reply=REFUSE) as sink:
        mx(dns_server, "remote.example")
        server = await elemta_server(delivery_config(
            dns_server, mx_overrides={"mx.remote.example": sink.address}))
        root, config = server.spool_path, config_of(server)
        queue_id = await submit(server, "alice@origin.example", ["bob@remote.example"], message())
        await wait_state(root, queue_id, "deferred", attempts=1)

        for command in ("hold", "release", "retry", "delete", "bounce"):
            status, out, err = await queue(config, command, "NOSUCHMESSAGE")
            assert status == 1, (command, out, err)
            assert "no such message: NOSUCHMESSAGE" in err

        status, out, err = await queue(config, "hold", queue_id, "NOSUCHMESSAGE", "../../etc")
        assert status == 1
        assert f"{queue_id}: held" in out
        assert "no such message: NOSUCHMESSAGE ../../etc" in err
        assert where(root, queue_id)[0] == "hold"

        status, out, err = await queue(config, "retry", queue_id)
        assert status == 1 and "cannot retry: held" in err
        status, out, err = await queue(config, "release", queue_id)
        assert status == 0, err
        status, out, err = await queue(config, "release", queue_id)
        assert status == 1 and "cannot release: not held" in err

        for usage in (("retry",), ("retry", "--all", queue_id), ("hold",),
                      ("list", "--state", "active")):
            status, out, err = await queue(config, *usage)
            assert status == 2, (usage, out, err)


class SlowRefusal:
    """A transport that takes its time, then defers: a delivery is in progress for a while."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.calls = 0

    @hookimpl
    async def deliver(self, envelope, route, recipients, content_path):
        self.calls += 1
        self.started.set()
        await asyncio.sleep(1.0)
        return [Outcome(r.address, 451, "4.4.1", "slow and busy") for r in recipients]


async def test_commands_wait_for_a_delivery_in_progress(elemta_server, dns_server):
    slow = SlowRefusal()
    server = await elemta_server(delivery_config(dns_server, retry_intervals_seconds=[3600]),
                                 plugins=[("slow", slow)])
    root, config = server.spool_path, config_of(server)
    queue_id = await submit(server, "alice@origin.example", ["bob@example.test"], message())
    await asyncio.wait_for(slow.started.wait(), 10)
    assert queue_id in server.app.runner._busy

    status, out, err = await queue(config, "hold", queue_id)
    assert status == 0, err
    state, env = where(root, queue_id)
    # the attempt was recorded first, and the hold kept
    assert state == "hold" and env["attempts"] == 1
    assert "slow and busy" in env["recipients"][0]["last_error"]
    assert queue_id not in server.app.runner._busy

    slow.started.clear()
    assert (await queue(config, "release", queue_id))[0] == 0
    await asyncio.wait_for(slow.started.wait(), 10)
    status, out, err = await queue(config, "delete", queue_id)
    assert status == 0, err
    assert where(root, queue_id) == (None, None)
    await asyncio.sleep(0.3)
    assert slow.calls == 2


async def test_many_commands_while_the_runner_delivers_deliver_each_once(elemta_server,
                                                                         dns_server):
    async with Sink(data_reply=REFUSE) as sink:
        mx(dns_server, "remote.example")
        server = await elemta_server(delivery_config(
            dns_server, retry_intervals_seconds=[0.2],
            mx_overrides={"mx.remote.example": sink.address}))
        root, config = server.spool_path, config_of(server)
        ids = [await submit(server, "alice@origin.example", [f"u{n}@remote.example"],
                            message(n)) for n in range(20)]
        for queue_id in ids:
            await wait_state(root, queue_id, "deferred", attempts=1)
        # From now on every other attempt succeeds: while the commands run, the
        # runner is busy delivering some messages and deferring others.
        sink.data_reply = None
        sink.data_replies = [REFUSE, "250 ok"] * 10
        held = ids[::4]
        results = await asyncio.gather(
            queue(config, "hold", *held), queue(config, "retry", "--all"),
            queue(config, "retry", *ids[1::4]), queue(config, "retry", "--all"))
        for status, out, err in results:
            # a message delivered before the command reached it is no longer known
            assert status == 0 or (status == 1 and "no such message" in err), (out, err)
        kept = [q for q in held if where(root, q)[0] == "hold"]
        await asyncio.sleep(0.6)
        assert all(where(root, q)[0] == "hold" for q in kept)
        assert len(sink.messages) <= 20 - len(kept)
        if kept:
            status, out, err = await queue(config, "release", *kept)
            assert status == 0, err
        await sink.wait_for(20)
        for queue_id in ids:
            await wait_state(root, queue_id, None)
        await asyncio.sleep(0.3)
    assert_no_duplicates(sink)
    assert sorted(r for m in sink.messages for r in m.recipients) == sorted(
        f"u{n}@remote.example" for n in range(20))


async def test_control_socket_with_a_long_state_dir(elemta_server, tmp_path):
    state_dir = tmp_path / ("d" * 60) / ("e" * 60)
    server = await elemta_server({"server": {"state_dir": str(state_dir)}})
    assert len(str(state_dir / "control.sock")) > 108
    assert (state_dir / "control.sock").exists()
    assert (state_dir / "control.sock").stat().st_mode & 0o777 == 0o600
    status, out, err = await queue(config_of(server), "stats")
    assert status == 0, err
    assert "Server: running" in out and "delivery disabled" in out


async def test_second_server_on_the_same_spool_is_refused(elemta_server):
    first = await elemta_server()
    with pytest.raises(StartupError, match=r"is in use.*another elemta server"):
        await elemta_server({"spool": {"path": str(first.spool_path)}})
    assert first.app.readiness() == (True, "ready")


async def test_spool_path_that_is_a_file_is_a_clear_startup_error(elemta_server, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(StartupError, match=r"\[spool\] path: .*afile is not a directory"):
        await elemta_server({"spool": {"path": str(tmp_path / "afile")}})
    with pytest.raises(StartupError, match=r"\[spool\] path: cannot lock .*Not a directory"):
        await elemta_server({"spool": {"path": str(tmp_path / "afile" / "queue")}})


def test_second_serve_process_is_refused(tmp_path, start_server):
    def config(name: str) -> Path:
        return write_config(tmp_path / name, {
            "server": {"state_dir": str(tmp_path / name / "state")},
            "listeners": [listener("mx", free_port())],
            "spool": {"path": str(tmp_path / "queue")},
            "metrics": {"enabled": False},
        })

    running = start_server(config("one"))
    result = subprocess.run([sys.executable, "-m", "elemta", "serve", "--config",
                             str(config("two"))], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot start" in result.stderr and "is in use" in result.stderr
    assert f"process {running.pid}" in result.stderr
    assert running.proc.poll() is None


async def test_queue_commands_against_a_serve_process(tmp_path, start_server):
    port = free_port()
    path = write_config(tmp_path / "cfg", {
        "listeners": [listener("mx", port)], "metrics": {"enabled": False}})
    await asyncio.to_thread(start_server, path)
    spool = tmp_path / "cfg" / "queue"
    ids = []
    for n in range(2):
        async with RawSMTP(port) as c:
            await c.cmd("EHLO client.example")
            reply = await c.send_message("a@origin.example", ["u@example.test"],
                                         message(n) + b".\r\n")
        ids.append(reply.text.rsplit(" ", 1)[1])
    status, out, err = await queue(path, "hold", *ids)
    assert status == 0, err
    assert all(where(spool, q)[0] == "hold" for q in ids)
    status, out, err = await queue(path, "release", ids[0])
    assert status == 0, err
    status, out, err = await queue(path, "delete", ids[1])
    assert status == 0, err
    assert where(spool, ids[0])[0] == "ready" and where(spool, ids[1]) == (None, None)
    status, out, err = await queue(path, "retry", "--all")
    assert status == 0, err
    assert "delivery is disabled" in err


# ------------------------------------------------------------------ with no server


def spool_with(root: Path, messages: dict[str, str], **fields: Any) -> None:
    """Messages in a spool as a cleanly stopped server leaves them: id → state."""
    for d in ("ready", "deferred", "hold", "failed", "messages", "tmp", "journal"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for queue_id, state in messages.items():
        env = Envelope(id=queue_id, sender="alice@origin.example",
                       recipients=[RecipientState("bob@remote.example")],
                       received_at=time.time(), size=30, **fields)
        (root / "messages" / queue_id).write_bytes(b"Subject: x\r\n\r\nbody\r\n")
        (root / state / f"{queue_id}.json").write_bytes(env.to_json())


async def test_offline_changes_without_a_server(tmp_path):
    config = write_config(tmp_path / "cfg")
    root = tmp_path / "cfg" / "queue"
    ready, deferred, other = new_id(), new_id(), new_id()
    spool_with(root, {ready: "ready", deferred: "deferred", other: "deferred"},
               next_attempt_at=time.time() + 3600, attempts=2)

    status, out, err = await queue(config, "hold", ready)
    assert status == 0, err
    assert "no server is running" in err
    state, env = where(root, ready)
    assert state == "hold" and env["hold_reason"] == "held by administrator"

    status, out, err = await queue(config, "release", ready)
    assert status == 0, err
    state, env = where(root, ready)
    assert state == "ready" and env["hold_reason"] is None

    status, out, err = await queue(config, "retry", deferred)
    assert status == 0, err
    assert "due now" in out
    state, env = where(root, deferred)
    assert state == "deferred" and env["next_attempt_at"] <= time.time()
    assert where(root, other)[1]["next_attempt_at"] > time.time() + 3000

    status, out, err = await queue(config, "retry", "--all")
    assert status == 0, err
    assert "2 deferred messages due now" in out
    assert where(root, other)[1]["next_attempt_at"] <= time.time()

    status, out, err = await queue(config, "delete", other, "NOSUCHMESSAGE")
    assert status == 1
    assert "no such message: NOSUCHMESSAGE" in err
    assert where(root, other) == (None, None) and not (root / "messages" / other).exists()

    status, out, err = await queue(config, "bounce", deferred)
    assert status == 1
    assert "bounce needs the running server" in err
    assert where(root, deferred)[0] == "deferred"
    assert not list((root / "tmp").iterdir())


async def test_offline_changes_replay_a_journal_left_by_a_crash_first(elemta_server, tmp_path):
    # A server that dies leaves the messages of its last second in the journal
    # only; a delete that did not replay it first would be undone at the next start.
    server = await elemta_server()
    config, root = config_of(server), server.spool_path
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message("a@origin.example", ["u@example.test"],
                                     message() + b".\r\n")
    queue_id = reply.text.rsplit(" ", 1)[1]
    server.app.spool._crash_for_tests()
    await server.app.control.stop()
    server.app.control = None
    unlock_spool(server.app._spool_lock)
    server.app._spool_lock = None

    status, out, err = await queue(config, "delete", queue_id)
    assert status == 0, err
    assert where(root, queue_id) == (None, None)
    # what the next server start finds
    assert Spool(root).recover() == {"ready": 0, "deferred": 0, "hold": 0, "failed": 0}
    assert where(root, queue_id) == (None, None)
    assert not (root / "messages" / queue_id).exists()


async def test_lock_held_without_a_control_socket(tmp_path):
    config = write_config(tmp_path / "cfg")
    root = tmp_path / "cfg" / "queue"
    queue_id = new_id()
    spool_with(root, {queue_id: "ready"})
    fd = lock_spool(root)
    try:
        status, out, err = await queue(config, "hold", queue_id)
    finally:
        unlock_spool(fd)
    assert status == 1
    assert f"process {os.getpid()}" in err and "holds the spool lock" in err
    assert where(root, queue_id)[0] == "ready"


# ------------------------------------------------------------------ a big queue


def test_list_of_a_big_queue_is_fast(tmp_path):
    config = write_config(tmp_path / "cfg")
    root = tmp_path / "cfg" / "queue"
    n = 5000
    for d in ("ready", "deferred", "hold", "failed"):
        (root / d).mkdir(parents=True)
    now = time.time()
    for i in range(n):
        state = ("ready", "deferred", "deferred", "hold")[i % 4]
        env = Envelope(id=new_id(), sender=f"s{i}@origin.example",
                       recipients=[RecipientState(f"r{i}@d{i % 7}.example"),
                                   RecipientState("x@remote.example")],
                       received_at=now - i, size=1000 + i,
                       peer={"ip": "192.0.2.1", "port": 1234}, helo="client.example",
                       listener="mx", attempts=i % 5, last_error=REFUSE)
        (root / state / f"{env.id}.json").write_bytes(env.to_json())

    def run(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "elemta", "--config", str(config),
                                 "queue", *args], capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        return time.perf_counter() - start, result

    took, result = run("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == n + 2 and lines[-1] == f"{n} messages"
    assert f"s{n - 1}@origin.example" in lines[1]  # oldest first
    assert took < 20, f"queue list of {n} messages took {took:.1f}s"

    took, result = run("list", "--state", "deferred", "--domain", "d3.example")
    assert result.returncode == 0, result.stderr
    expected = sum(1 for i in range(n) if i % 4 in (1, 2) and i % 7 == 3)
    assert result.stdout.splitlines()[-1] == f"{expected} messages in state deferred"
    assert len(result.stdout.splitlines()) == expected + 2
    assert took < 20
