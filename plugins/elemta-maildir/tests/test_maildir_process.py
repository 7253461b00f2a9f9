"""The delivery helper process: batches, log records, a helper that dies or cannot start.

In-process servers with the installed ``maildir`` plugin, as in test_maildir.py;
the helper is a real second interpreter started by the plugin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import sys
import time
from pathlib import Path

from elemta_maildir import store
from elemta_maildir.delivery import Maildirs
from elemta_maildir.settings import MaildirSettings
from test_maildir import (
    DOMAIN,
    files,
    maildir,
    message,
    on_the_wire,
    start,
    submit,
    wait_deferred,
    wait_for,
    wait_gone,
)

from elemta import Envelope, HelperGone, RecipientState, Route, new_id


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


async def test_deliveries_run_in_the_helper_and_its_log_lines_reach_the_server(
        elemta_server, caplog):
    server = await start(elemta_server)
    plugin = server.app.pm.get_plugin("maildir")
    pid = plugin.process.pid
    assert pid is not None and pid != os.getpid() and alive(pid)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"elemta_maildir.helper" in f.read()

    # by SMTP: a resident message, whose content path is a memory file of this process
    queue_id = await submit(server, "alice@example.test", ["bob@example.test"],
                            on_the_wire(message("helper")))
    [path] = await wait_for(lambda: files(maildir(server, "bob")), what="a file in new/")
    await wait_gone(server, queue_id)
    assert path.read_bytes().endswith(message("helper"))

    # the same envelope again: the helper's "already delivered" line is the server's
    content = server.root / "content.eml"
    content.write_bytes(message("again"))
    rcpt = RecipientState("carol@example.test")
    env = Envelope(new_id(), "alice@example.test", [rcpt], time.time(),
                   content.stat().st_size, attempts=1)
    route = Route("local", DOMAIN)
    caplog.set_level(logging.INFO, logger="elemta.maildir")
    [first] = await plugin.deliver(env, route, [rcpt], str(content))
    [second] = await plugin.deliver(env, route, [rcpt], str(content))
    assert first.code == second.code == 250 and "already" in second.text
    [record] = [r for r in caplog.records if "already delivered to" in r.getMessage()]
    assert record.name == "elemta.maildir" and record.levelno == logging.INFO
    assert env.id in record.getMessage()
    assert plugin.process.pid == pid, "the helper was replaced"


async def test_an_unreadable_content_path_defers_without_reaching_the_helper(elemta_server):
    server = await start(elemta_server)
    plugin = server.app.pm.get_plugin("maildir")
    rcpt = RecipientState("bob@example.test")
    env = Envelope(new_id(), "alice@example.test", [rcpt], time.time(), 10, attempts=1)
    [outcome] = await plugin.deliver(env, Route("local", DOMAIN), [rcpt],
                                     str(server.root / "missing.eml"))
    assert (outcome.code, outcome.enhanced) == (451, "4.3.0")
    assert "cannot be read" in outcome.text


async def test_a_killed_helper_defers_its_deliveries_and_they_arrive_once(elemta_server,
                                                                          caplog):
    """SIGSTOP keeps a delivery in the helper; SIGKILL then ends it: 451 4.3.0, retried in
    threads until a new helper runs, one copy in the mailbox."""
    server = await start(elemta_server, retry=0.3)
    plugin = server.app.pm.get_plugin("maildir")
    first = plugin.process.pid
    await wait_gone(server, await submit(server, "alice@example.test", ["bob@example.test"],
                                         on_the_wire(message("before"))))
    os.kill(first, signal.SIGSTOP)
    try:
        queue_id = await submit(server, "alice@example.test", ["bob@example.test"],
                                on_the_wire(message("killed")))
        await wait_for(lambda: plugin.process._pending, what="a delivery in the helper")
    finally:
        os.kill(first, signal.SIGKILL)
        os.kill(first, signal.SIGCONT)
    env = await wait_deferred(server, queue_id)
    [rcpt] = env["recipients"]
    assert rcpt["last_error"].startswith("451 4.3.0 local delivery was interrupted"), rcpt
    await wait_gone(server, queue_id)
    assert len(files(maildir(server, "bob"))) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"delivery process {first} exited" in e and "1 requests in flight" in e
               and "started again in 1 s" in e for e in errors), errors
    text = server.app.metrics.render().decode()
    assert 'smtp_maildir_helper_failures_total{what="exited"} 1.0' in text

    # a second helper is started for later deliveries
    await asyncio.sleep(1.1)
    queue_id = await submit(server, "alice@example.test", ["bob@example.test"],
                            on_the_wire(message("later")))
    await wait_gone(server, queue_id)
    assert len(files(maildir(server, "bob"))) == 3
    assert plugin.process.pid not in (None, first) and alive(plugin.process.pid)


async def test_a_helper_that_dies_before_answering_is_restarted_less_and_less_often(
        tmp_path, monkeypatch, caplog):
    from elemta_maildir import process

    (tmp_path / "dies_at_once.py").write_text(
        "def main(channel, init):\n    raise SystemExit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    helper = process.DeliveryProcess(MaildirSettings(path=str(tmp_path / "{user}")),
                                     "mx.example.test")
    helper.target = "dies_at_once:main"
    content = tmp_path / "content.eml"
    content.write_bytes(message("dies"))
    rcpt = RecipientState("bob@example.test")
    env = Envelope(new_id(), "alice@example.test", [rcpt], time.time(), 10, attempts=1)
    waits = []
    for _ in range(3):
        helper._died_at = float("-inf")   # as if the wait were over
        assert helper.running()
        try:
            await asyncio.wait_for(helper.deliver_all(env, [rcpt], str(content)), 10)
        except HelperGone as e:
            assert "status 3" in str(e)
        else:
            raise AssertionError("the helper answered")
        assert not helper.running()      # not at once
        waits.append(helper._restart_after)
    assert waits == [2.0, 4.0, 8.0]
    assert "started again in 8 s" in caplog.records[-1].getMessage()
    await helper.stop()


async def test_a_helper_that_cannot_start_leaves_delivery_to_threads(elemta_server,
                                                                     monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    server = await start(elemta_server)
    plugin = server.app.pm.get_plugin("maildir")
    assert plugin.process.pid is None
    assert any("cannot start the maildir delivery process" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    text = server.app.metrics.render().decode()
    assert 'smtp_maildir_helper_failures_total{what="not_started"} 1.0' in text
    queue_id = await submit(server, "alice@example.test", ["bob@example.test"],
                            on_the_wire(message("threads")))
    await wait_gone(server, queue_id)
    assert len(files(maildir(server, "bob"))) == 1


async def test_helper_process_false_delivers_in_threads(elemta_server):
    server = await start(elemta_server, helper_process=False)
    plugin = server.app.pm.get_plugin("maildir")
    assert plugin.process is None
    queue_id = await submit(server, "alice@example.test", ["bob@example.test"],
                            on_the_wire(message("no helper")))
    await wait_gone(server, queue_id)
    assert len(files(maildir(server, "bob"))) == 1


async def test_stopping_the_server_stops_the_helper(elemta_server):
    server = await start(elemta_server)
    plugin = server.app.pm.get_plugin("maildir")
    pid = plugin.process.pid
    await server.app.stop(grace=1)
    assert not alive(pid)
    assert plugin.process.pid is None and not plugin.process.running()


def batch_maildirs(tmp_path: Path, subject: str) -> tuple[Maildirs, Path]:
    """Maildirs under ``tmp_path`` (mailboxes made as needed) and a spooled message."""
    settings = MaildirSettings(path=str(tmp_path / "{domain}" / "{user}"),
                               create_mailboxes=True)
    maildirs = Maildirs(settings, Path, "mx.example.test")
    assert maildirs.writer.group is not None, "syncfs is available on Linux"
    content = tmp_path / "content.eml"
    content.write_bytes(message(subject))
    return maildirs, content


def test_a_batch_is_named_with_two_syncs(tmp_path: Path):
    """deliver_many: every message written, then one syncfs before the links and one after,
    however many messages and mailboxes the batch holds."""
    maildirs, content = batch_maildirs(tmp_path, "batch")
    jobs = []
    for n in range(30):
        rcpts = [RecipientState(f"user{n % 5}@example.test"),
                 RecipientState(f"other{n % 3}@example.test")]
        jobs.append((Envelope(new_id(), "alice@example.test", rcpts, time.time(),
                              content.stat().st_size, attempts=1), rcpts, str(content)))
    for n in range(5):  # made before counting: creating a mailbox syncs its parent folder
        store.make_maildir(tmp_path / "example.test" / f"user{n}", 0o700, True)
    for n in range(3):
        store.make_maildir(tmp_path / "example.test" / f"other{n}", 0o700, True)
    calls = 0
    real = maildirs.writer.group._flush

    def counting(path):
        nonlocal calls
        calls += 1
        real(path)

    maildirs.writer.group._flush = counting
    results = maildirs.deliver_many(jobs)
    assert [[o.code for o in outcomes] for outcomes in results] == [[250, 250]] * 30
    assert calls == 2
    written = sum(len(files(tmp_path / "example.test" / f"user{n}")) for n in range(5))
    assert written == 30
    assert files(tmp_path / "example.test" / "user0", "tmp") == []


def test_a_failed_sync_fails_its_batch_and_leaves_no_name(tmp_path: Path):
    """The syncfs before the links fails: no message is named in new/, each gets a 451."""
    maildirs, content = batch_maildirs(tmp_path, "eio")
    rcpts = [RecipientState("bob@example.test")]
    store.make_maildir(tmp_path / "example.test" / "bob", 0o700, True)

    def failing(path):
        raise OSError(5, "Input/output error")

    maildirs.writer.group._flush = failing
    jobs = [(Envelope(new_id(), "alice@example.test", rcpts, time.time(),
                      content.stat().st_size, attempts=1), rcpts, str(content))
            for _ in range(3)]
    results = maildirs.deliver_many(jobs)
    assert [(o.code, o.enhanced) for [o] in results] == [(451, "4.3.0")] * 3
    assert "Input/output error" in results[0][0].text
    assert files(tmp_path / "example.test" / "bob") == []
    assert files(tmp_path / "example.test" / "bob", "tmp") == []


def test_a_files_own_write_back_error_fails_that_message_only(tmp_path: Path, monkeypatch):
    """After the batch's syncfs, each file's own write-back error is read (not an fsync per
    file): the message whose file failed is deferred and not named; the others are."""
    from elemta_maildir import writer

    maildirs, content = batch_maildirs(tmp_path, "own error")
    store.make_maildir(tmp_path / "example.test" / "bob", 0o700, True)
    checked: list[int] = []
    real = writer.check_write_back

    def failing_second(fd: int) -> None:
        checked.append(fd)
        if len(checked) == 2:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(writer, "check_write_back", failing_second)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    rcpts = [RecipientState("bob@example.test")]
    jobs = [(Envelope(new_id(), "alice@example.test", rcpts, time.time(),
                      content.stat().st_size, attempts=1), rcpts, str(content))
            for _ in range(3)]
    results = maildirs.deliver_many(jobs)
    assert [o.code for [o] in results] == [250, 451, 250]
    assert "Input/output error" in results[1][0].text
    assert len(checked) == 3 and fsyncs == []
    assert len(files(tmp_path / "example.test" / "bob")) == 2
    assert files(tmp_path / "example.test" / "bob", "tmp") == []


def test_a_batch_counts_its_own_messages_against_the_quota(tmp_path: Path):
    """Five messages to one mailbox in one batch, room for two: two delivered, three deferred
    (maildirsize is appended to only after the batch is named)."""
    content = tmp_path / "content.eml"
    content.write_bytes(message("quota"))
    settings = MaildirSettings(path=str(tmp_path / "{domain}" / "{user}"),
                               create_mailboxes=True)
    maildirs = Maildirs(settings, Path, "mx.example.test")
    rcpt = RecipientState("bob@example.test")
    head = len(b"Return-Path: <alice@example.test>\r\nDelivered-To: bob@example.test\r\n")
    box = tmp_path / "example.test" / "bob"
    store.make_maildir(box, 0o700, True)
    (box / "maildirsize").write_text(f"{2 * (head + content.stat().st_size) + 10}S\n0 0\n")
    jobs = [(Envelope(new_id(), "alice@example.test", [rcpt], time.time(),
                      content.stat().st_size, attempts=1), [rcpt], str(content))
            for _ in range(5)]
    results = maildirs.deliver_many(jobs)
    assert [(o.code, o.enhanced) for [o] in results] == [(250, "2.0.0")] * 2 + [
        (452, "4.2.2")] * 3
    assert len(files(box)) == 2
    assert (box / "maildirsize").read_text().count(" 1\n") == 2


def test_a_bug_in_the_middle_of_a_batch_leaves_no_file_open_or_behind(tmp_path: Path):
    """Written through tmp/ and a rename; the names' sync raises something unexpected: the
    exception goes up, no descriptor of the batch stays open, nothing is left in tmp/."""
    settings = MaildirSettings(path=str(tmp_path / "{domain}" / "{user}"),
                               create_mailboxes=True)
    maildirs = Maildirs(settings, Path, "mx.example.test")
    maildirs.writer.tmpfile = False
    content = tmp_path / "content.eml"
    content.write_bytes(message("bug"))
    box = tmp_path / "example.test" / "bob"
    store.make_maildir(box, 0o700, True)
    calls = 0

    def broken(batch):
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug")

    maildirs.writer._sync_files = broken
    rcpts = [RecipientState("bob@example.test")]
    jobs = [(Envelope(new_id(), "alice@example.test", rcpts, time.time(),
                      content.stat().st_size, attempts=1), rcpts, str(content))
            for _ in range(4)]
    before = len(os.listdir("/proc/self/fd"))
    try:
        maildirs.deliver_many(jobs)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the bug was swallowed")
    assert calls == 1
    assert len(os.listdir("/proc/self/fd")) == before
    assert files(box, "tmp") == [] and files(box) == []


async def test_many_recipients_outcomes_in_parts_and_a_request_too_large_for_the_helper(
        elemta_server, monkeypatch):
    """1,000 recipients: the helper's outcomes are larger than one message on the socket and
    come back in parts; 2,000: the request itself is too large and a thread delivers it."""

    kinds: list[str] = []
    loads = pickle.loads

    def recording(data):
        message = loads(data)
        kinds.append(message[0])
        return message

    monkeypatch.setattr(pickle, "loads", recording)
    server = await start(elemta_server)
    plugin = server.app.pm.get_plugin("maildir")
    content = server.root / "content.eml"
    content.write_bytes(message("crowd"))
    route = Route("local", DOMAIN)
    for count in (1000, 2000):
        rcpts = [RecipientState(f"user{n:05d}.with.a.rather.long.local.part@{DOMAIN}")
                 for n in range(count)]
        env = Envelope(new_id(), "alice@example.test", rcpts, time.time(),
                       content.stat().st_size, attempts=1)
        sent: list[int] = []
        real = plugin.process._send

        def counting(sock, data, fd, real=real, sent=sent):
            sent.append(len(data))
            real(sock, data, fd)

        plugin.process._send = counting
        outcomes = await plugin.deliver(env, route, rcpts, str(content))
        plugin.process._send = real
        assert [o.recipient for o in outcomes] == [r.address for r in rcpts]
        assert all(o.code == 250 for o in outcomes), {o.text for o in outcomes}
        if count == 1000:
            assert len(sent) == 1, "not sent to the helper"
            assert kinds.count("p") >= 1 and kinds.count("r") == 1, kinds
        else:
            assert sent == [], "a request too large for the socket went to the helper"
    assert len(files(maildir(server, "user00000.with.a.rather.long.local.part"))) == 2
    assert len(files(maildir(server, "user01999.with.a.rather.long.local.part"))) == 1


async def test_requests_wait_for_room_on_the_socket_while_the_helper_is_stopped(tmp_path):
    """A stopped helper: the socket fills, later requests wait in order for room (the loop
    watches for it), and every delivery is answered once the helper runs again."""
    from elemta_maildir import process

    helper = process.DeliveryProcess(
        MaildirSettings(path=str(tmp_path / "{user}"), create_mailboxes=True),
        "mx.example.test")
    assert helper.running()
    content = tmp_path / "content.eml"
    content.write_bytes(message("room"))
    rcpt = RecipientState("bob@example.test")
    os.kill(helper.pid, signal.SIGSTOP)
    try:
        tasks = [asyncio.ensure_future(helper.deliver_all(
            Envelope(new_id(), "alice@example.test", [rcpt], time.time(), 10, attempts=1),
            [rcpt], str(content))) for _ in range(1500)]
        await wait_for(lambda: helper._waiting_room, what="a full socket")
        assert len(helper._out) > 1
    finally:
        os.kill(helper.pid, signal.SIGCONT)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert [o.code for [o] in results] == [250] * 1500
    assert not helper._waiting_room and not helper._out
    assert len(files(tmp_path / "bob")) == 1500
    await helper.stop()


def test_the_helper_imports_only_what_a_delivery_needs():
    """The helper's start is on the first local delivery's path: it imports neither
    ``site``, pydantic nor the plugin's hooks, settings or server side."""
    import subprocess

    import elemta_maildir

    import elemta

    path = [str(Path(elemta_maildir.__file__).parents[1]), str(Path(elemta.__file__).parents[1]),
            *sys.path]
    probe = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
             "import elemta_maildir.helper; "
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('site', 'pydantic') or m in ('elemta_maildir.plugin', "
             "'elemta_maildir.settings', 'elemta_maildir.process'))))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe, json.dumps(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []
