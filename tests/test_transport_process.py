"""Helper processes (elemta.helper_process), and ``[delivery] transport_process``: the SMTP
transport in one.

In-process servers relaying to aiosmtpd sinks (local DNS as in test_delivery.py);
the helper is a real second interpreter started by the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time

from tests.test_delivery import (MSG, delivery_config, scripted_mx, submit, wait_deferred,
                                 wait_gone)

from elemta import Envelope, RecipientState, Route, new_id
from elemta import helper_process
from elemta.testing.sink import Sink


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_ready(transport, timeout: float = 20.0) -> int:
    """The helper's pid once it has said it is ready."""
    deadline = time.monotonic() + timeout
    while not (transport.process is not None and transport.process.ready):
        assert time.monotonic() < deadline, "the transport process did not become ready"
        await asyncio.sleep(0.02)
    return transport.process.pid


def smtp_transport(server):
    return server.app.pm.get_plugin("elemta.default_transport")


async def relay_server(elemta_server, dns_server, sink, **delivery):
    dns_server.zone("remote.example")
    dns_server.add("remote.example", "MX", "10 mx.remote.example.")
    dns_server.add("mx.remote.example", "A", "127.0.0.1")
    return await elemta_server(delivery_config(
        dns_server, transport_process=True,
        mx_overrides={"mx.remote.example": sink.address,
                      "mx.down.example": "127.0.0.1:9"},  # nothing listens there
        **delivery))


async def test_deliveries_run_in_the_helper_and_its_log_lines_reach_the_server(
        elemta_server, dns_server, caplog):
    caplog.set_level(logging.INFO)
    async with Sink() as sink:
        sink.rcpt_replies["nobody@remote.example"] = "550 5.1.1 No such user"
        server = await relay_server(elemta_server, dns_server, sink)
        transport = smtp_transport(server)
        pid = await wait_ready(transport)
        assert pid != os.getpid() and alive(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[1:3] == [b"-I", b"-S"] and b"elemta.transport_helper" in argv[4]
        queue_id = await submit(server, "a@origin.example",
                                ["bob@remote.example", "carol@remote.example"])
        [got] = await sink.wait_for(1)
        await wait_gone(server, queue_id)
        assert sorted(got.recipients) == ["bob@remote.example", "carol@remote.example"]
        assert got.content.endswith(b"\r\n\r\nbody\r\n")

        # an outcome per recipient, straight from the helper's transport
        env = Envelope(new_id(), "a@origin.example",
                       [RecipientState("dave@remote.example"),
                        RecipientState("nobody@remote.example")], time.time(), len(MSG))
        content = server.root / "content.eml"
        content.write_bytes(MSG[:-3])
        outcomes = await transport.process.request(
            (env, Route("smtp", "remote.example"), env.recipients), str(content))
        assert [(o.recipient, o.code) for o in outcomes] == [
            ("dave@remote.example", 250), ("nobody@remote.example", 550)]
        assert outcomes[0].remote.startswith("mx.remote.example[127.0.0.1]")

        # a log record of the helper's is logged by the server as its own
        dns_server.zone("down.example")
        dns_server.add("down.example", "MX", "10 mx.down.example.")
        caplog.clear()
        await transport.process.request(
            (env, Route("smtp", "down.example"), env.recipients[:1]), str(content))
        records = [r for r in caplog.records if r.name == "elemta.delivery"]
        assert any(f"{env.id}: mx.down.example[127.0.0.1]:9: 451 connect to" in r.getMessage()
                   for r in records), [r.getMessage() for r in records]
        assert transport.process.pid == pid
    await server.app.stop(grace=1)
    assert not alive(pid) or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def helper_instead(monkeypatch, tmp_path, source: str) -> None:
    """Helper processes run ``main`` of this module source instead of their target."""
    (tmp_path / "helper_instead.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = helper_process.HelperProcess.__init__

    def instead(self, target, *args, **kwargs):
        real(self, "helper_instead:main", *args, **kwargs)

    monkeypatch.setattr(helper_process.HelperProcess, "__init__", instead)


async def test_the_loop_delivers_until_the_helper_is_ready_and_after_it_dies(
        elemta_server, dns_server, caplog, monkeypatch, tmp_path):
    """A helper that never becomes ready (it exits at once) leaves the deliveries to the
    server's loop, and is started again less and less often."""
    helper_instead(monkeypatch, tmp_path, "def main(channel, init):\n    raise SystemExit(3)\n")
    async with Sink() as sink:
        server = await relay_server(elemta_server, dns_server, sink)
        transport = smtp_transport(server)
        queue_id = await submit(server, "a@origin.example", ["bob@remote.example"])
        await sink.wait_for(1)
        await wait_gone(server, queue_id)
    process = transport.process
    assert process is not None and not process.ready
    deadline = time.monotonic() + 10
    while process._restart_after < 2 * helper_process.RESTART_SECONDS:
        assert time.monotonic() < deadline, "the dead helper was not noticed"
        await asyncio.sleep(0.02)
    assert any("SMTP transport process" in r.getMessage()
               and "exited (status 3)" in r.getMessage() for r in caplog.records)
    text = server.app.metrics.render().decode()
    assert 'smtp_delivery_helper_failures_total{what="exited"}' in text


async def test_the_loops_connections_are_closed_once_the_helper_delivers(
        elemta_server, dns_server, monkeypatch, tmp_path):
    """Connections the loop kept for reuse while the helper started are closed when the
    helper takes over: a remote server never sees the loop's idle ones beside the
    helper's (``max_per_destination`` holds for the two together)."""
    flag = tmp_path / "go"
    helper_instead(monkeypatch, tmp_path, (
        "import os, time\n"
        "def main(channel, init):\n"
        f"    while not os.path.exists({str(flag)!r}):\n"
        "        time.sleep(0.01)\n"
        "    from elemta.transport_helper import child_main\n"
        "    child_main(channel, init)\n"))
    async with Sink() as sink:
        server = await relay_server(elemta_server, dns_server, sink,
                                    idle_connection_seconds=60)
        transport = smtp_transport(server)
        first = await submit(server, "a@origin.example", ["bob@remote.example"])
        await sink.wait_for(1)
        await wait_gone(server, first)
        [[(kept, _)]] = transport._idle.values()  # the loop delivered, and kept it
        assert not transport.process.ready and kept.usable
        flag.touch()
        await wait_ready(transport)
        second = await submit(server, "a@origin.example", ["carol@remote.example"])
        await sink.wait_for(2)
        await wait_gone(server, second)
        assert transport._idle == {}
        deadline = time.monotonic() + 5
        while kept.usable:
            assert time.monotonic() < deadline, "the loop's idle connection was not closed"
            await asyncio.sleep(0.02)
        assert sink.connections == 2  # the loop's, then the helper's


async def test_a_helper_killed_mid_delivery_leaves_the_message_queued_and_is_replaced(
        elemta_server, dns_server):
    """The remote host holds its reply to the DATA; the helper is killed meanwhile. The
    delivery fails with 451 4.4.2, the message is deferred, and the next attempt (a new
    helper, or the loop) delivers it."""
    release = asyncio.Event()
    seen = asyncio.Event()

    async def after_data():
        seen.set()
        await release.wait()
        return b"250 2.0.0 queued\r\n"

    remote = await asyncio.start_server(scripted_mx("mx.remote.example", after_data),
                                        "127.0.0.1", 0)
    port = remote.sockets[0].getsockname()[1]
    try:
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "10 mx.remote.example.")
        dns_server.add("mx.remote.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(
            dns_server, transport_process=True, retry_intervals_seconds=[0.5],
            mx_overrides={"mx.remote.example": f"127.0.0.1:{port}"}))
        transport = smtp_transport(server)
        pid = await wait_ready(transport)
        queue_id = await submit(server, "a@origin.example", ["bob@remote.example"])
        await asyncio.wait_for(seen.wait(), 10)
        os.kill(pid, signal.SIGKILL)
        env = await wait_deferred(server, queue_id, 10)
        assert env["recipients"][0]["last_error"].startswith(
            "451 4.4.2 delivery was interrupted: the SMTP transport process exited")
        release.set()
        await wait_gone(server, queue_id, timeout=20)
    finally:
        release.set()
        remote.close()


async def test_a_request_too_large_for_the_channel_is_delivered_by_the_loop(
        elemta_server, dns_server, monkeypatch):
    async with Sink() as sink:
        server = await relay_server(elemta_server, dns_server, sink)
        transport = smtp_transport(server)
        await wait_ready(transport)
        sent = []
        real = transport.process._send

        def counting(sock, data, fd):
            sent.append(len(data))
            real(sock, data, fd)

        monkeypatch.setattr(transport.process, "_send", counting)
        monkeypatch.setattr(helper_process, "MAX_MESSAGE", 200)
        queue_id = await submit(server, "a@origin.example", ["bob@remote.example"])
        [got] = await sink.wait_for(1)
        await wait_gone(server, queue_id)
    assert got.recipients == ["bob@remote.example"] and sent == []


def test_answers_are_cut_into_parts_that_fit(monkeypatch):
    import pickle

    from elemta import Outcome

    monkeypatch.setattr(helper_process, "MAX_MESSAGE", 2000)
    outcomes = [Outcome(f"u{n}@example.test", 250, "2.0.0", "x" * (n % 50)) for n in range(77)]
    sent = list(helper_process.helper_answers(7, outcomes))
    messages = [pickle.loads(data) for data in sent]
    assert [m[0] for m in messages] == ["p"] * (len(messages) - 1) + ["r"]
    assert all(m[1] == 7 for m in messages) and len(messages) > 2
    assert [o for m in messages for o in m[2]] == outcomes
    assert all(len(data) <= 2000 for data in sent)
    assert [pickle.loads(d) for d in helper_process.helper_answers(8, [])] == [("r", 8, [])]


def test_the_setting_is_on_by_default(tmp_path):
    from elemta.config import load_settings
    from elemta.testing.fixtures import write_config

    assert load_settings(write_config(tmp_path)).delivery.transport_process is True


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_the_helper_dies_with_the_server(tmp_path, start_server):
    """SIGKILL to the server while its transport helper waits on a remote host's greeting:
    the helper is killed too, not left to finish a delivery the restarted server would
    make again."""
    import smtplib
    import socket as socketlib

    from elemta.testing.fixtures import write_config
    from elemta.testing.process import free_port, listener

    silent = socketlib.create_server(("127.0.0.1", 0))   # accepts, never greets
    silent.settimeout(20)
    port = free_port()
    config = write_config(tmp_path / "srv", {
        "server": {"relay_networks": ["127.0.0.0/8"]},
        "listeners": [listener("mx", port)], "metrics": {"enabled": False},
        "delivery": {"enabled": True, "transport_process": True,
                     "connect_timeout_seconds": 60,
                     "routes": {"*": {"host": f"127.0.0.1:{silent.getsockname()[1]}",
                                      "tls": "none"}}}})
    server = start_server(config)
    deadline = time.monotonic() + 20
    while not (helpers := [c for c in children(server.pid)
                           if b"elemta.transport_helper" in cmdline(c)]):
        assert time.monotonic() < deadline, "no transport helper started"
        time.sleep(0.02)
    [helper] = helpers
    time.sleep(1)  # ready (it takes a fraction of that): the next delivery is the helper's
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@origin.example", ["b@remote.example"], MSG[:-3])
    held, _ = silent.accept()   # the delivery, waiting for a greeting
    try:
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while running(helper):
            assert time.monotonic() < deadline, "the helper outlived the server"
            time.sleep(0.02)
    finally:
        held.close()
        silent.close()


def test_requests_and_outcomes_pickle_by_position_and_subclasses_keep_their_fields():
    """What crosses the channel pickles as ``cls(*fields)``; a plugin's subclass, with a
    field of its own, pickles whole and keeps its type; copies are equal."""
    import copy
    import pickle

    from elemta import Outcome

    env = Envelope(new_id(), "a@origin.example",
                   [RecipientState("b@remote.example", {"NOTIFY": "NEVER"}, original="c@x")],
                   1.5, 42, {"BODY": "8BITMIME"}, trace=[{"delay_notice": 1.0}])
    route = Route("smtp", "remote.example", "mx.remote.example:2525", "verify", ("u", "p"))
    outcome = Outcome("b@remote.example", 250, "2.0.0", "ok", "mx", relayed=True)
    for obj in (env, env.recipients[0], route, outcome):
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        assert obj.__reduce__()[0] is type(obj) and pickle.loads(data) == obj
        assert copy.copy(obj) == obj and copy.deepcopy(obj) == obj
    again = pickle.loads(pickle.dumps(env))
    assert again.recipients[0] is not env.recipients[0] and again.trace == env.trace

    tagged = TaggedRoute("smtp", "remote.example", tag="vip")
    back = pickle.loads(pickle.dumps(tagged))
    assert type(back) is TaggedRoute and back == tagged and back.tag == "vip"


@dataclasses.dataclass(frozen=True, slots=True)
class TaggedRoute(Route):
    """A plugin's route with a field of its own."""

    tag: str = ""
