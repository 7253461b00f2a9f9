"""The spool: durable group commit, crash recovery, streaming DATA, the queue CLI."""

from __future__ import annotations

import asyncio
import contextvars
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elemta.cli.queue import queue_group
from elemta.config import Settings, SpoolSettings
from elemta.models import new_id
from elemta import durable as durable_io
from elemta.spool import replay, threads
from elemta.spool.envelope import STATES, Envelope, RecipientState
from elemta.spool.incoming import IncomingMessage
from elemta.spool.journal import SegmentReader
from elemta.spool.layout import FreshIds, Layout, segment_seq
from elemta.spool.store import Spool, SpoolError

HEADERS = b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: hello\r\n\r\n"
BODY = b"Hi Bob,\r\n\r\nsee you.\r\n"
RECEIVED = b"Received: from client.example.org by mx.example.com; Thu, 1 Jan 2026 00:00:00 +0000\r\n"


def envelope_for(queue_id: str, *, size: int = 0, sender: str = "alice@example.org",
                 recipients: tuple[str, ...] = ("bob@example.com",)) -> Envelope:
    return Envelope(id=queue_id, sender=sender,
                    recipients=[RecipientState(r) for r in recipients],
                    received_at=time.time(), size=size)


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "queue", commit_threads=4, memory_bytes=1024)
    s.recover()
    yield s
    await s.close()  # its threads must not outlive the test


def journal_only_spool(tmp_path: Path, **kw) -> Spool:
    """A spool whose commits return once journaled, before the files are written.

    It checkpoints only when asked, unless ``kw`` says otherwise.
    """
    kw = {"checkpoint_interval": 60.0, "checkpoint_idle": 60.0, **kw}
    s = Spool(tmp_path / "queue", commit_threads=4, memory_bytes=1024, visible_on_commit=False,
              **kw)
    s.recover()
    return s


async def commit_message(spool: Spool, content: bytes = HEADERS + BODY, *, queue_id: str | None = None,
                         state: str = "ready", prepend: bytes = RECEIVED, **kw) -> str:
    queue_id = queue_id or new_id()
    incoming = spool.incoming(queue_id)
    incoming.write(content)
    await spool.commit(incoming, envelope_for(queue_id, size=len(content)), prepend=prepend,
                       state=state, **kw)
    return queue_id


# ------------------------------------------------------------------ commit


async def test_commit_makes_content_and_envelope_visible_with_exact_bytes(spool: Spool) -> None:
    qid = await commit_message(spool)

    assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + BODY
    state, env = spool.load(qid)
    assert state == "ready"
    assert env.id == qid and env.recipients[0].address == "bob@example.com"
    assert json.loads((spool.root / "ready" / f"{qid}.json").read_bytes())["id"] == qid
    assert files_in(spool.tmp_dir) == []
    assert spool.counts() == {"ready": 1, "deferred": 0, "hold": 0, "failed": 0}


async def test_commit_with_header_block_replaces_the_received_header_section(spool: Spool) -> None:
    incoming = spool.incoming(qid := new_id())
    incoming.write(HEADERS + BODY)
    message = incoming.message()
    message.remove_headers(lambda name, value: name.lower() == "subject")

    await spool.commit(incoming, envelope_for(qid), prepend=RECEIVED,
                       header_block=message.header_bytes())

    assert spool.message_path(qid).read_bytes() == (
        RECEIVED + b"From: alice@example.org\r\nTo: bob@example.com\r\n\r\n" + BODY)


async def test_commit_of_a_spilled_body_is_byte_exact(spool: Spool) -> None:
    body = b"".join(b"line %06d of a long body\r\n" % i for i in range(5000))
    incoming = spool.incoming(qid := new_id())
    for i in range(0, len(HEADERS + body), 777):
        incoming.write((HEADERS + body)[i:i + 777])
    assert (spool.tmp_dir / f"{qid}.body").exists()

    await spool.commit(incoming, envelope_for(qid), prepend=RECEIVED)

    assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + body
    assert files_in(spool.tmp_dir) == []


async def test_commit_into_hold_counts_as_hold(spool: Spool) -> None:
    qid = await commit_message(spool, state="hold")

    assert spool.load(qid)[0] == "hold"
    assert spool.counts()["hold"] == 1 and spool.counts()["ready"] == 0


async def test_concurrent_commits_all_land_in_fewer_batches_than_messages(spool: Spool) -> None:
    ids = await asyncio.gather(*(commit_message(spool, HEADERS + b"message %d\r\n" % i)
                                 for i in range(200)))

    assert len(set(ids)) == 200
    assert spool.counts()["ready"] == 200
    assert len(files_in(spool.messages_dir)) == 200
    assert spool.stats.committed == 200
    assert spool.stats.batches < 200
    for i, qid in enumerate(ids):
        assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + b"message %d\r\n" % i


async def test_commits_arriving_during_a_batch_join_the_next_batch(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real = os.pwritev

    def pwritev(fd, buffers, offset):
        entered.set()
        release.wait(10)  # the first batch stays on its way to disk…
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    first = asyncio.ensure_future(commit_message(spool))
    while not entered.is_set():
        await asyncio.sleep(0.001)
    rest = [asyncio.ensure_future(commit_message(spool)) for _ in range(20)]
    await asyncio.sleep(0.01)  # …while these queue up
    release.set()
    await asyncio.gather(first, *rest)

    assert spool.stats.batches == 2
    assert spool.stats.largest_batch == 20


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


async def test_a_batch_is_acknowledged_after_one_journal_write_and_one_fdatasync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = journal_only_spool(tmp_path)
    calls: list[tuple[str, str]] = []
    for name in ("pwritev", "fdatasync", "fsync", "rename"):
        real = getattr(os, name)

        def traced(*args, _name=name, _real=real, **kw):
            where = args[0] if _name == "rename" else fd_path(args[0])
            calls.append((_name, os.fspath(where)))
            return _real(*args, **kw)

        monkeypatch.setattr(os, name, traced)
    spool._materialize_gate.clear()
    ids = await asyncio.gather(*(commit_message(spool, HEADERS + b"message %d\r\n" % i)
                                 for i in range(50)))

    # acknowledged from the journal alone: no message file exists yet
    assert files_in(spool.messages_dir) == [] and files_in(spool.root / "ready") == []
    journal_dir = os.fspath(spool.journal_dir)
    on_segments = [(name, path) for name, path in calls if path.endswith(".log")]
    assert all(path.startswith(journal_dir) for _, path in on_segments)
    assert [name for name, _ in on_segments] == ["pwritev", "fdatasync"] * spool.stats.batches
    assert not [c for c in calls if not c[1].startswith(journal_dir)]
    assert spool.stats.batches < 50 and spool.counts()["ready"] == 50

    spool._materialize_gate.set()
    await spool.checkpoint()
    for i, qid in enumerate(ids):
        assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + b"message %d\r\n" % i
        assert spool.load(qid)[0] == "ready"
    await spool.close()


@pytest.mark.parametrize("failing", ["pwritev", "fdatasync"])
async def test_a_failed_journal_write_fails_its_batch_and_later_commits_succeed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    spool = journal_only_spool(tmp_path)
    spool._materialize_gate.clear()
    real = getattr(os, failing)
    state = {"failed": False}

    def flaky(fd, *args):
        if state["failed"] or not fd_path(fd).endswith(".log"):
            return real(fd, *args)
        state["failed"] = True
        if failing == "pwritev":
            # a short write first, as a disk filling up gives: half a record on disk
            buffers, offset = args
            real(fd, buffers[:1], offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, flaky)
    queued = [new_id() for _ in range(6)]
    results = await asyncio.gather(*(commit_message(spool, HEADERS + q.encode(), queue_id=q)
                                     for q in queued), return_exceptions=True)
    failed = [q for q, r in zip(queued, results) if isinstance(r, BaseException)]
    assert failed and failed == queued[:len(failed)]  # the first batch, all of it
    for r in results[:len(failed)]:
        assert isinstance(r, OSError) and r.errno == errno.ENOSPC
    later = [await commit_message(spool, HEADERS + b"later %d" % i) for i in range(3)]
    good = queued[len(failed):] + later
    assert spool.stats.failed == len(failed)
    assert spool.counts()["ready"] == len(good)
    # no segment keeps a torn batch in front of acknowledged ones
    for path in sorted(spool.journal_dir.iterdir()):
        with open(path, "rb") as f:
            reader = SegmentReader(f.fileno(), segment_seq(path.name))
            list(reader)
            assert reader.problem is None, (path, reader.problem)

    spool._crash_for_tests()
    recovered = Spool(spool.root)
    assert recovered.recover()["ready"] == len(good)
    assert files_in(spool.messages_dir) == sorted(good)
    for q in queued[len(failed):]:
        assert spool.message_path(q).read_bytes() == RECEIVED + HEADERS + q.encode()


async def test_the_journal_waits_when_writing_out_falls_too_far_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "MAX_BACKLOG_BYTES", 1)
    spool = journal_only_spool(tmp_path)
    spool._materialize_gate.clear()
    await commit_message(spool)  # acknowledged; its files are not written yet

    second = asyncio.ensure_future(commit_message(spool))
    await asyncio.sleep(0.2)
    assert not second.done()
    spool._materialize_gate.set()
    await asyncio.wait_for(second, 5)
    await spool.close()
    assert len(files_in(spool.messages_dir)) == 2


async def test_a_message_that_cannot_be_written_out_stays_in_the_journal(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    spilled = spool.incoming(qid := new_id())
    spilled.write(HEADERS + b"x" * 5000)
    os.rmdir(spool.messages_dir)
    spool.messages_dir.write_bytes(b"")  # every rename into messages/ now fails

    await spool.commit(spilled, envelope_for(qid), prepend=RECEIVED)  # journaled: acknowledged
    assert spool.counts()["ready"] == 1
    assert "cannot write out message" in caplog.text
    with pytest.raises(OSError):
        await spool.checkpoint()  # the retry fails too: the segment is kept
    assert spool.awaiting_checkpoint(qid)
    assert [p for p in spool.journal_dir.iterdir() if p.stat().st_size]

    spool.messages_dir.unlink()
    spool.messages_dir.mkdir()
    await spool.checkpoint()  # written again from the journal
    assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + b"x" * 5000
    assert spool.load(qid)[0] == "ready"
    assert not spool.awaiting_checkpoint(qid)
    assert files_in(spool.tmp_dir) == []
    await spool.close()
    assert files_in(spool.journal_dir) == []


async def test_a_queue_id_already_in_the_spool_is_not_overwritten(spool: Spool) -> None:
    qid = await commit_message(spool, HEADERS + b"first\r\n")

    with pytest.raises(FileExistsError):
        await commit_message(spool, HEADERS + b"second\r\n", queue_id=qid)

    assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + b"first\r\n"
    assert spool.load(qid)[0] == "ready"
    assert spool.counts()["ready"] == 1


async def test_a_queue_id_from_before_a_restart_is_not_overwritten(tmp_path: Path) -> None:
    first = Spool(tmp_path / "queue", commit_threads=4, memory_bytes=1024)
    first.recover()
    qid = await commit_message(first, HEADERS + b"first\r\n")
    await first.close()

    again = Spool(tmp_path / "queue", commit_threads=4, memory_bytes=1024)
    again.recover()
    try:
        with pytest.raises(FileExistsError):
            await commit_message(again, HEADERS + b"second\r\n", queue_id=qid)
        assert again.message_path(qid).read_bytes() == RECEIVED + HEADERS + b"first\r\n"
    finally:
        await again.close()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The queue ids whose content file the journal looked for."""
    seen: list[str] = []
    lexists = os.path.lexists

    def recording(path):
        if f"{os.sep}messages{os.sep}" in os.fspath(path):
            seen.append(os.path.basename(path))
        return lexists(path)

    monkeypatch.setattr(os.path, "lexists", recording)
    return seen


async def test_a_new_queue_id_is_journaled_without_looking_for_its_files(
        spool: Spool, lookups: list[str]) -> None:
    fresh = await commit_message(spool)
    custom = await commit_message(spool, queue_id="not-made-by-new_id")

    assert lookups == [custom]  # another form of id is looked up, as is any id ...
    with pytest.raises(FileExistsError):
        await commit_message(spool, queue_id=fresh)
    await spool.checkpoint()
    with pytest.raises(FileExistsError):  # ... journaled before
        await commit_message(spool, queue_id=fresh)
    assert lookups == [custom, fresh]
    assert spool.counts()["ready"] == 2


async def test_ids_below_the_newest_in_the_spool_at_start_up_are_looked_up(
        tmp_path: Path, lookups: list[str]) -> None:
    # a message from a run whose clock was ahead: new ids sort below its id
    ahead = "Z" * 20
    first = Spool(tmp_path / "queue", commit_threads=4, memory_bytes=1024)
    first.recover()
    await commit_message(first, queue_id=ahead)
    await first.close()

    again = Spool(tmp_path / "queue", commit_threads=4, memory_bytes=1024)
    again.recover()
    lookups.clear()
    try:
        qid = await commit_message(again)
        with pytest.raises(FileExistsError):
            await commit_message(again, queue_id=ahead)
        assert lookups == [qid, ahead]
        assert again.counts()["ready"] == 2
    finally:
        await again.close()


def test_fresh_ids_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FreshIds, "LIMIT", 3)
    fresh = FreshIds(["00000000000000000001", "custom-id", "ZZZZZZZZZZZZZZZZZZZZ-"])
    assert fresh.newest == "00000000000000000001"  # only ids new_id makes count
    ids = sorted(new_id() for _ in range(5))
    assert all(fresh.surely_new(i) for i in ids)
    for i in ids[:3]:
        fresh.journaled(i)
    assert not any(fresh.surely_new(i) for i in ids[:3])
    fresh.journaled(ids[3])  # full: the newest moves up to the highest journaled id
    assert fresh.newest == ids[2] and fresh.recent == {ids[3]}
    assert not fresh.surely_new(ids[0]) and not fresh.surely_new(ids[3])
    assert fresh.surely_new(ids[4])
    assert not fresh.surely_new("custom-id") and not fresh.surely_new(ids[4].lower())


def waiter_behaviour() -> list:
    """How tasks wait on a CommitWaiter, on the running loop (see the test below)."""
    async def run() -> list:
        loop = asyncio.get_running_loop()
        seen: list = []

        async def wait(w: threads.CommitWaiter, tag: str) -> str:
            var.set(tag)
            try:
                await w
            except OSError as e:
                return f"{var.get()}: {e.strerror}"
            return var.get()

        answered, failed, cancelled, inside = (threads.CommitWaiter(loop) for _ in range(4))
        handled: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: handled.append(context))
        answered.add_done_callback(lambda w: 1 / 0)  # a failing callback: the task still runs
        tasks = [loop.create_task(wait(w, tag)) for w, tag in
                 ((answered, "answered"), (failed, "failed"), (cancelled, "cancelled"),
                  (inside, "inside"))]
        await asyncio.sleep(0)  # each task now waits

        def answer() -> None:
            answered.set_result(None)
            seen.append(("same turn", tasks[0].done()))
            failed.set_exception(OSError(errno.EIO, "journal write failed"))

        loop.call_soon(answer)
        await asyncio.sleep(0)
        tasks[2].cancel()
        inside.set_result(None)  # from a running task: the waiter resumes in a later turn
        seen.append(("inside, at once", tasks[3].done()))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        seen += [r if isinstance(r, str) else type(r).__name__ for r in results]
        seen.append(cancelled.cancelled())
        seen.append([type(c["exception"]).__name__ for c in handled])
        return seen

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="")
    return asyncio.run(run())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_commit_resumes_its_session_in_the_turn_that_answers_it(loop: str) -> None:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        seen = waiter_behaviour()
    finally:
        asyncio.set_event_loop_policy(None)
    assert seen == [("same turn", True), ("inside, at once", False), "answered",
                    "failed: journal write failed", "CancelledError", "inside", True,
                    ["ZeroDivisionError"]]


async def test_a_commit_whose_caller_is_cancelled_still_counts(spool: Spool) -> None:
    qid = new_id()
    incoming = spool.incoming(qid)
    incoming.write(HEADERS + BODY)
    task = asyncio.ensure_future(spool.commit(incoming, envelope_for(qid), prepend=RECEIVED))
    await asyncio.sleep(0)  # submitted to the journal, waiting for its answer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await spool.checkpoint()
    assert spool.counts()["ready"] == 1
    assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + BODY


async def test_commit_refuses_an_envelope_of_another_message(spool: Spool) -> None:
    incoming = spool.incoming(new_id())
    incoming.write(HEADERS)
    with pytest.raises(SpoolError):
        await spool.commit(incoming, envelope_for(new_id()))


def test_writing_needs_recovery_first(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="recover"):
        Spool(tmp_path).incoming(new_id())


@pytest.mark.parametrize("queue_id", ["../etc/passwd", "a/b", "", "x.json", "a" * 65])
def test_queue_ids_cannot_escape_the_spool(spool: Spool, queue_id: str) -> None:
    with pytest.raises(SpoolError):
        spool.incoming(queue_id)
    with pytest.raises(KeyError):
        spool.load(queue_id)


async def test_close_finishes_commits_in_flight_then_refuses_more(spool: Spool) -> None:
    pending = [asyncio.ensure_future(commit_message(spool)) for _ in range(10)]
    await asyncio.sleep(0)
    await spool.close()

    assert all(t.done() and t.exception() is None for t in pending)
    assert spool.counts()["ready"] == 10
    with pytest.raises(SpoolError, match="closed"):
        await commit_message(spool)


def test_commit_works_on_uvloop(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    spool = Spool(tmp_path / "queue")
    spool.recover()

    async def main() -> list[str]:
        ids = await asyncio.gather(*(commit_message(spool) for _ in range(20)))
        await spool.close()
        return ids

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        ids = runner.run(main())
    assert sorted(ids) == files_in(spool.messages_dir)
    assert spool.counts()["ready"] == 20


def test_writable(spool: Spool) -> None:
    assert spool.writable()
    assert files_in(spool.tmp_dir) == []
    os.rmdir(spool.tmp_dir)
    spool.tmp_dir.write_bytes(b"")
    assert not spool.writable()


# ------------------------------------------------------------------ reading


async def test_load_and_iter_envelopes(spool: Spool) -> None:
    ready = await commit_message(spool)
    held = await commit_message(spool, state="hold")

    assert spool.load(held)[0] == "hold"
    with pytest.raises(KeyError):
        spool.load(new_id())
    assert sorted((s, e.id) for s, e in spool.iter_envelopes()) == sorted(
        [("ready", ready), ("hold", held)])
    assert [e.id for _, e in spool.iter_envelopes("hold")] == [held]
    with pytest.raises(ValueError):
        list(spool.iter_envelopes("active"))


def test_envelopes_round_trip_what_plugins_put_in_them() -> None:
    """orjson writes and reads envelopes; what it refuses goes through the standard
    library, and reads back the same: a lone surrogate (octets a plugin decoded with
    surrogateescape), ints past 64 bits; keys that are not strings come back as strings,
    NaN as null."""
    plain = Envelope(new_id(), "a@origin.example",
                     [RecipientState("b@remote.example", {"NOTIFY": "SUCCESS,DELAY"})],
                     1_765_000_000.25, 4096, {"BODY": "8BITMIME"},
                     {"ip": "192.0.2.1", "port": 25}, "client.example", "mx",
                     {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "bits": 128,
                      "implicit": False}, trace=[{"rbl": "clean"}])
    raw = plain.to_json()
    assert json.loads(raw)["version"] == 1 and b" " not in raw.replace(b"SUCCESS,DELAY", b"")
    assert Envelope.from_json(raw) == plain == Envelope.from_json(raw.decode())

    odd = Envelope(new_id(), "a@origin.example",
                   [RecipientState("b@remote.example", last_error="451 Tempor\udce4r")],
                   1.0, 10, hold_reason="held by \udcff", trace=[{"count": 2**70}])
    raw = odd.to_json()
    assert b"Tempor\xe4r" in raw  # the octet, as the server received it
    assert Envelope.from_json(raw) == odd

    keyed = Envelope(new_id(), "a@origin.example", [RecipientState("b@remote.example")],
                     1.0, 10, trace=[{1: "one"}])
    assert Envelope.from_json(keyed.to_json()).trace == [{"1": "one"}]
    nan = Envelope(new_id(), "a@origin.example", [RecipientState("b@remote.example")],
                   1.0, 10, trace=[{"ratio": float("nan")}])
    assert Envelope.from_json(nan.to_json()).trace == [{"ratio": None}]  # JSON has no NaN

    with pytest.raises(ValueError):
        Envelope.from_json(b'{"id": "x", "recipients": [')


# ------------------------------------------------------------------ recovery


async def test_recover_removes_tmp_leftovers_and_orphan_content(spool: Spool) -> None:
    kept = await commit_message(spool)
    await spool.close()  # one writer at a time: the next start-up comes after it
    (spool.tmp_dir / "X.content").write_bytes(b"half a message")
    (spool.tmp_dir / "X.body").write_bytes(b"half a body")
    (spool.tmp_dir / "stray-dir").mkdir()
    orphan = new_id()
    spool.message_path(orphan).write_bytes(HEADERS + BODY)  # crash between the two renames

    counts = Spool(spool.root).recover()

    assert counts == {"ready": 1, "deferred": 0, "hold": 0, "failed": 0}
    assert files_in(spool.tmp_dir) == []
    assert files_in(spool.messages_dir) == [kept]


async def test_remove_takes_the_message_away_at_once_and_its_files_soon_after(
        spool: Spool) -> None:
    qid = await commit_message(spool)
    kept = await commit_message(spool)

    spool.remove(qid, "ready")

    assert spool.ids_in("ready") == [kept]
    assert spool.counts()["ready"] == 1
    with pytest.raises(KeyError):
        spool.load(qid)
    await spool.close()    # what the remover thread had left is unlinked before close returns
    assert files_in(spool.tmp_dir) == []
    assert files_in(spool.messages_dir) == [kept]


async def test_a_removal_cut_short_by_a_crash_stays_removed(spool: Spool,
                                                            monkeypatch) -> None:
    """Killed after the envelope left its state directory but before the unlinks: the
    next start deletes what is left, and the message is not delivered again."""
    qid = await commit_message(spool)
    kept = await commit_message(spool)
    await spool.checkpoint()
    monkeypatch.setattr(spool._remover, "unlink_later", lambda path: None)

    spool.remove(qid, "ready")
    spool._crash_for_tests()

    assert (spool.tmp_dir / f"{qid}.removed").exists() and spool.message_path(qid).exists()
    again = Spool(spool.root)
    assert again.recover() == {"ready": 1, "deferred": 0, "hold": 0, "failed": 0}
    assert again.ids_in("ready") == [kept]
    assert files_in(spool.tmp_dir) == []
    assert files_in(spool.messages_dir) == [kept]
    await again.close()


async def test_recover_moves_an_envelope_without_content_to_failed(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    qid = await commit_message(spool)
    await spool.close()  # checkpointed: recovery cannot write it again
    spool.message_path(qid).unlink()

    counts = Spool(spool.root).recover()

    assert counts == {"ready": 0, "deferred": 0, "hold": 0, "failed": 1}
    state, env = spool.load(qid)
    assert state == "failed"
    assert "content missing" in (env.last_error or "")
    assert files_in(spool.root / "ready") == []
    assert qid in caplog.text


async def test_recover_quarantines_a_corrupt_envelope_and_keeps_its_content(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    good = await commit_message(spool)
    bad = await commit_message(spool, state="deferred")
    await spool.close()
    (spool.root / "deferred" / f"{bad}.json").write_bytes(b'{"id": "trunc')

    counts = Spool(spool.root).recover()

    assert counts == {"ready": 1, "deferred": 0, "hold": 0, "failed": 0}
    assert files_in(spool.root / "failed") == [f"{bad}.json.corrupt"]
    assert files_in(spool.messages_dir) == sorted([good, bad])
    assert "unreadable envelope" in caplog.text
    # a second start-up leaves the quarantined file alone
    assert Spool(spool.root).recover() == counts
    assert files_in(spool.root / "failed") == [f"{bad}.json.corrupt"]


async def test_recover_counts_ready_envelopes_unread_and_set_aside_moves_a_corrupt_one(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    good = await commit_message(spool)
    bad = await commit_message(spool)
    await spool.close()
    (spool.root / "ready" / f"{bad}.json").write_bytes(b'{"id": "trunc')

    # ready/ is counted from its listing: the runner reads (and checks) each at once
    again = Spool(spool.root)
    assert again.recover() == {"ready": 2, "deferred": 0, "hold": 0, "failed": 0}
    assert files_in(spool.root / "failed") == []
    with pytest.raises(ValueError) as unreadable:
        again.load(bad)

    target = again.set_aside(bad, unreadable.value)

    assert target == str(spool.root / "failed" / f"{bad}.json.corrupt")
    assert files_in(spool.root / "ready") == [f"{good}.json"]
    assert files_in(spool.root / "failed") == [f"{bad}.json.corrupt"]
    assert files_in(spool.messages_dir) == sorted([good, bad])  # kept for the operator
    assert again.counts() == {"ready": 1, "deferred": 0, "hold": 0, "failed": 0}
    assert "unreadable envelope" in caplog.text
    with pytest.raises(KeyError):
        again.load(bad)
    assert again.set_aside(bad, unreadable.value) is None  # nothing left to move
    assert Spool(spool.root).recover() == {"ready": 1, "deferred": 0, "hold": 0, "failed": 0}


async def test_the_runner_sets_aside_an_unreadable_ready_envelope_and_delivers_the_rest(
        tmp_path: Path, elemta_server, elemta_outbox, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "queue"
    first = Spool(root)
    first.recover()
    good = await commit_message(first)
    bad = await commit_message(first)
    await first.close()
    (root / "ready" / f"{bad}.json").write_bytes(b"{not json")

    server = await elemta_server({"spool": {"path": str(root)}}, outbox=elemta_outbox)

    [got] = await elemta_outbox.wait(1)
    assert got.envelope.id == good
    async with asyncio.timeout(10):
        while files_in(root / "ready") or not (root / "failed" / f"{bad}.json.corrupt").exists():
            await asyncio.sleep(0.02)
    assert (root / "messages" / bad).exists()
    assert server.app.spool.counts()["ready"] == 0
    assert f"unreadable envelope {root / 'ready' / bad}.json" in caplog.text
    await asyncio.sleep(0.2)
    assert len(elemta_outbox.messages) == 1  # tried once, never again


def test_recover_creates_a_private_layout(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    assert Spool(root).recover() == dict.fromkeys(STATES, 0)
    assert files_in(root) == sorted(["tmp", "messages", "journal", *STATES])
    for d in root.iterdir():
        assert d.stat().st_mode & 0o777 == 0o700


# ------------------------------------------------------------------ journal


def spool_snapshot(root: Path) -> dict[str, bytes]:
    """Every message and envelope file of a spool, by relative path."""
    return {f"{d}/{p.name}": p.read_bytes()
            for d in ("messages", *STATES) for p in sorted((root / d).iterdir())}


def segments(spool: Spool) -> list[Path]:
    return sorted(p for p in spool.journal_dir.iterdir() if journal_ids_in(p))


def journal_ids_in(segment: Path) -> list[str]:
    """The queue ids a recovery would replay from one segment file."""
    with open(segment, "rb") as f:
        return [r.queue_id for r in SegmentReader(f.fileno(), segment_seq(segment.name))]


def journal_ids(spool: Spool) -> list[str]:
    return [q for p in sorted(spool.journal_dir.iterdir()) for q in journal_ids_in(p)]


async def commit_mix(spool: Spool) -> dict[str, tuple[str, bytes]]:
    """Small, spilled and held messages; ``{queue id: (state, content)}``."""
    expected: dict[str, tuple[str, bytes]] = {}
    for i in range(12):
        state = "hold" if i % 4 == 3 else "ready"
        body = (b"spilled line %d\r\n" % i) * 200 if i % 3 == 0 else b"small %d\r\n" % i
        qid = await commit_message(spool, HEADERS + body, state=state)
        expected[qid] = (state, RECEIVED + HEADERS + body)
    return expected


def check_recovered(root: Path, expected: dict[str, tuple[str, bytes]]) -> None:
    spool = Spool(root)
    for qid, (state, content) in expected.items():
        assert spool.message_path(qid).read_bytes() == content
        got_state, env = spool.load(qid)
        assert got_state == state and env.id == qid


async def test_acknowledged_messages_come_back_from_the_journal_after_a_crash(
        tmp_path: Path) -> None:
    spool = journal_only_spool(tmp_path)
    spool._materialize_gate.clear()  # crash before any file is written out
    expected = await commit_mix(spool)
    spool._crash_for_tests()
    assert files_in(spool.messages_dir) == []

    counts = Spool(spool.root).recover()

    assert counts == {"ready": 9, "deferred": 0, "hold": 3, "failed": 0}
    check_recovered(spool.root, expected)
    assert files_in(spool.journal_dir) == [] and files_in(spool.tmp_dir) == []


CRASHER = """
import asyncio, sys, time
from elemta.spool.envelope import Envelope, RecipientState
from elemta.spool.store import Spool

async def main():
    spool = Spool(sys.argv[1], memory_bytes=1024, visible_on_commit=False)
    spool.recover()
    spool._materialize_gate.clear()
    for i in range(int(sys.argv[2])):
        qid = "MSG%04d" % i
        incoming = spool.incoming(qid)
        incoming.write(b"Subject: %d\\r\\n\\r\\n" % i + b"line %d\\r\\n" % i * (i * 37 % 300))
        env = Envelope(id=qid, sender="a@example.org", recipients=[RecipientState("b@example.com")],
                       received_at=time.time(), size=0)
        await spool.commit(incoming, env)
        print(qid, flush=True)
    print("done", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_messages_acknowledged_by_a_killed_process_are_recovered(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(root), "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        acked = []
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == b"done":
                break
            acked.append(line.strip().decode())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) == 40, proc.stderr.read().decode()  # type: ignore[union-attr]
    assert files_in(root / "messages") == []

    assert Spool(root).recover()["ready"] == 40
    for i, qid in enumerate(acked):
        assert (root / "messages" / qid).read_bytes() == (
            b"Subject: %d\r\n\r\n" % i + b"line %d\r\n" % i * (i * 37 % 300))
        assert Spool(root).load(qid)[0] == "ready"


async def crashed_with_segment(tmp_path: Path, n: int) -> tuple[Spool, list[str], Path]:
    """``n`` messages committed one batch each into one segment, then a crash."""
    spool = journal_only_spool(tmp_path)
    spool._materialize_gate.clear()
    ids = [await commit_message(spool, HEADERS + b"number %d\r\n" % i) for i in range(n)]
    spool._crash_for_tests()
    [segment] = segments(spool)
    return spool, ids, segment


def record_offsets(segment: Path) -> list[int]:
    with open(segment, "rb") as f:
        return [r.offset for r in SegmentReader(f.fileno(), segment_seq(segment.name))]


async def test_a_torn_record_at_the_end_of_a_segment_is_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool, ids, segment = await crashed_with_segment(tmp_path, 3)
    with open(segment, "r+b") as f:
        f.truncate(segment.stat().st_size - 7)  # the last batch never fully reached the disk

    assert Spool(spool.root).recover()["ready"] == 2

    assert files_in(spool.messages_dir) == sorted(ids[:2])
    assert "cut short" in caplog.text
    assert files_in(spool.journal_dir) == []


async def test_zeroed_space_after_the_last_record_ends_the_segment(tmp_path: Path) -> None:
    spool, ids, segment = await crashed_with_segment(tmp_path, 2)
    with open(segment, "ab") as f:
        f.write(bytes(4096))  # preallocated, or a size update without the data

    assert Spool(spool.root).recover()["ready"] == 2
    assert files_in(spool.messages_dir) == sorted(ids)


async def test_a_corrupt_record_stops_the_replay_of_its_segment_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool, ids, segment = await crashed_with_segment(tmp_path, 3)
    second = record_offsets(segment)[1]
    with open(segment, "r+b") as f:
        f.seek(second + 100)
        byte = f.read(1)
        f.seek(second + 100)
        f.write(bytes([byte[0] ^ 0x20]))

    assert Spool(spool.root).recover()["ready"] == 1

    assert files_in(spool.messages_dir) == [ids[0]]
    assert "damaged" in caplog.text and "checksum mismatch" in caplog.text
    assert f"from offset {second} on" in caplog.text


async def test_replaying_twice_gives_the_same_spool(tmp_path: Path) -> None:
    spool = journal_only_spool(tmp_path)
    spool._materialize_gate.clear()
    expected = await commit_mix(spool)
    spool._crash_for_tests()
    saved = {p: p.read_bytes() for p in segments(spool)}

    Spool(spool.root).recover()
    first = spool_snapshot(spool.root)
    # a crash in the middle of recovery: segments still there, files half written
    for path, data in saved.items():
        path.write_bytes(data)
    some = next(iter(expected))
    spool.message_path(some).write_bytes(b"half")
    (spool.root / expected[some][0] / f"{some}.json").write_bytes(b"")
    counts = Spool(spool.root).recover()

    assert spool_snapshot(spool.root) == first
    assert counts == {"ready": 9, "deferred": 0, "hold": 3, "failed": 0}
    check_recovered(spool.root, expected)


async def test_replay_leaves_a_message_that_moved_on_where_it_is(tmp_path: Path) -> None:
    spool = journal_only_spool(tmp_path)
    qid = await commit_message(spool)
    await asyncio.sleep(0.05)
    spool._crash_for_tests()  # written out, but not checkpointed
    os.rename(spool.root / "ready" / f"{qid}.json", spool.root / "hold" / f"{qid}.json")

    counts = Spool(spool.root).recover()

    assert counts["hold"] == 1 and counts["ready"] == 0
    assert spool.load(qid)[0] == "hold"


@pytest.mark.parametrize("use_syncfs", [True, False])
async def test_checkpoint_syncs_the_files_then_deletes_the_segment(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, use_syncfs: bool) -> None:
    events: list[str] = []
    real_syncfs, real_fdatasync, real_fsync, real_unlink = (
        durable_io.syncfs, os.fdatasync, os.fsync, os.unlink)
    monkeypatch.setattr(replay, "USE_SYNCFS", use_syncfs)
    monkeypatch.setattr(durable_io, "syncfs",
                        lambda fd: (events.append("syncfs"), real_syncfs(fd))[1])
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (events.append(f"fdatasync {fd_path(fd)}"), real_fdatasync(fd))[1])
    monkeypatch.setattr(os, "fsync",
                        lambda fd: (events.append(f"fsync {fd_path(fd)}"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "unlink",
                        lambda p, **kw: (events.append(f"unlink {p}"), real_unlink(p, **kw))[1])
    real_rename = os.rename
    monkeypatch.setattr(os, "rename",
                        lambda a, b: (events.append(f"rename {a}"), real_rename(a, b))[1])
    durable: list[list[tuple[str, str]]] = []
    spool.on_durable(durable.append)
    ids = [await commit_message(spool, state=s) for s in ("ready", "hold")]
    assert all(spool.awaiting_checkpoint(q) for q in ids)
    events.clear()

    await spool.checkpoint()
    await asyncio.sleep(0)  # the callback runs on the loop

    # the segment is renamed for reuse (or deleted) only once the files are durable
    [unlink] = [i for i, e in enumerate(events) if e.endswith(".log")]
    synced = [e for e in events[:unlink] if not e.startswith("rename")]
    if use_syncfs:
        assert synced == ["syncfs"]
    else:
        for qid, state in zip(ids, ("ready", "hold")):
            assert f"fdatasync {spool.message_path(qid)}" in synced
            assert f"fdatasync {spool.root / state / qid}.json" in synced
        for d in ("messages", "ready", "hold"):
            assert f"fsync {spool.root / d}" in synced
    assert events[unlink + 1] == f"fsync {spool.journal_dir}"
    assert journal_ids(spool) == []
    assert durable == [[(ids[0], "ready"), (ids[1], "hold")]]
    assert not any(spool.awaiting_checkpoint(q) for q in ids)
    assert spool.stats.checkpoints == 1 and spool.stats.checkpointed == 2


async def fails_then_recovers(spool: Spool, caplog: pytest.LogCaptureFixture, qid: str,
                              repair: Callable[[], None]) -> None:
    """The first checkpoint fails and keeps the segment; after ``repair`` the next one
    writes the files again from it and retires it."""
    with pytest.raises(OSError):
        await spool.checkpoint()
    assert journal_ids(spool) == [qid] and spool.awaiting_checkpoint(qid)
    assert "checkpoint failed" in caplog.text
    # write-back errors are reported once: the retry must not trust what is on disk
    spool.message_path(qid).write_bytes(b"lost in write-back")
    repair()

    await spool.checkpoint()

    assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + BODY
    assert journal_ids(spool) == [] and not spool.awaiting_checkpoint(qid)
    assert spool.stats.checkpoint_errors >= 1


async def test_a_failed_checkpoint_keeps_the_segment_and_rewrites_the_files_before_retrying(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = durable_io.syncfs
    broken = [True]

    def syncfs(fd: int) -> None:
        if broken[0]:
            raise OSError(errno.EIO, "syncfs: Input/output error")
        real(fd)

    def repair() -> None:
        broken[0] = False

    monkeypatch.setattr(durable_io, "syncfs", syncfs)
    qid = await commit_message(spool)
    await fails_then_recovers(spool, caplog, qid, repair)


async def test_files_written_out_while_a_sync_failed_are_written_again_before_their_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A sync's error may be a file's of the next segment, written out while it ran:
    that segment is written out again from the journal before its own sync, which passes."""
    spool = journal_only_spool(tmp_path)
    real = durable_io.syncfs
    syncing, release = threading.Event(), threading.Event()
    calls = [0]

    def syncfs(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            syncing.set()
            release.wait(10)
            raise OSError(errno.EIO, "syncfs: Input/output error")
        real(fd)

    monkeypatch.setattr(durable_io, "syncfs", syncfs)
    first = await commit_message(spool, HEADERS + b"first\r\n")
    checkpoint = asyncio.ensure_future(spool.checkpoint())
    await asyncio.to_thread(syncing.wait, 10)
    # journaled in the next segment and written out while the sync runs
    second = await commit_message(spool, HEADERS + b"second\r\n")
    for _ in range(500):
        if spool.message_path(second).exists() and (spool.root / "ready" / f"{second}.json").exists():
            break
        await asyncio.sleep(0.01)
    release.set()
    await checkpoint  # the first segment's sync failed; it was written again, then synced
    assert "checkpoint failed" in caplog.text
    assert journal_ids(spool) == [second]
    # what the failed sync may not have written back of the second message
    spool.message_path(second).write_bytes(b"lost in write-back")

    await spool.checkpoint()  # its own sync passes

    assert spool.message_path(first).read_bytes() == RECEIVED + HEADERS + b"first\r\n"
    assert spool.message_path(second).read_bytes() == RECEIVED + HEADERS + b"second\r\n"
    assert journal_ids(spool) == [] and not spool.awaiting_checkpoint(second)
    await spool.close()


def test_a_sync_fails_when_another_failed_after_its_files_were_chosen(tmp_path: Path) -> None:
    syncer = replay.Syncer(Layout(tmp_path), threads=1)
    syncer.open()
    try:
        checked = time.monotonic()
        assert not syncer.suspect(checked)
        syncer.failed_at = time.monotonic()  # another caller's sync failed since
        with pytest.raises(OSError, match="failed meanwhile"):
            syncer.make_durable([], checked)
        assert syncer.suspect(checked)
        syncer.make_durable([], time.monotonic())  # chosen after that failure: trusted
    finally:
        syncer.close()


async def test_segments_are_checkpointed_by_age_without_being_asked(tmp_path: Path) -> None:
    spool = journal_only_spool(tmp_path, checkpoint_interval=0.05)
    durable: list[tuple[str, str]] = []
    spool.on_durable(durable.extend)
    ids = [await commit_message(spool) for _ in range(3)]

    for _ in range(200):
        if len(durable) == 3:
            break
        await asyncio.sleep(0.01)

    assert sorted(q for q, _ in durable) == sorted(ids)
    assert journal_ids(spool) == []
    await spool.close()


async def test_a_pause_in_commits_checkpoints_at_once(tmp_path: Path) -> None:
    spool = journal_only_spool(tmp_path, checkpoint_idle=0.02)
    durable: list[tuple[str, str]] = []
    spool.on_durable(durable.extend)
    started = time.monotonic()
    qid = await commit_message(spool)

    while not durable and time.monotonic() - started < 5:
        await asyncio.sleep(0.005)

    assert durable == [(qid, "ready")]
    assert time.monotonic() - started < 1.0  # not the 60 s interval
    await spool.close()


async def test_a_full_segment_is_followed_by_a_new_one(tmp_path: Path) -> None:
    spool = journal_only_spool(tmp_path, segment_bytes=8192)
    spool._materialize_gate.clear()
    expected = await commit_mix(spool)
    spool._crash_for_tests()

    assert len(segments(spool)) > 2
    Spool(spool.root).recover()
    check_recovered(spool.root, expected)


async def test_a_reused_segment_never_brings_back_its_old_messages(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = journal_only_spool(tmp_path)
    delivered = [await commit_message(spool) for _ in range(5)]
    await spool.checkpoint()  # their segment is kept for reuse…
    old = [await commit_message(spool) for _ in range(2)]
    await spool.checkpoint()  # …and written over from here on
    kept = [await commit_message(spool, HEADERS + b"kept %d\r\n" % i) for i in range(2)]
    await asyncio.sleep(0.05)
    assert spool.stats.segments_reused >= 1
    [segment] = segments(spool)
    assert journal_ids_in(segment) == kept
    assert segment.stat().st_size > spool.stats.journal_bytes // 3  # old records still in it
    spool._crash_for_tests()
    for qid in delivered + old:  # delivered and deleted after their checkpoint
        spool.message_path(qid).unlink()
        (spool.root / "ready" / f"{qid}.json").unlink()

    assert Spool(spool.root).recover()["ready"] == 2
    assert files_in(spool.messages_dir) == sorted(kept)
    assert "damaged" not in caplog.text and "cut short" not in caplog.text


async def test_close_checkpoints_everything(spool: Spool) -> None:
    expected = await commit_mix(spool)
    await spool.close()

    assert files_in(spool.journal_dir) == []
    check_recovered(spool.root, expected)
    assert spool.stats.checkpointed == len(expected)


# ------------------------------------------------------------------ incoming


@pytest.mark.parametrize(("content", "header_block"), [
    (HEADERS + BODY, HEADERS),
    (b"\r\nbody only\r\n", b"\r\n"),
    (b"\r\n\r\nbody\r\n", b"\r\n"),
    (b"Subject: no body\r\n", b"Subject: no body\r\n"),
    (b"Subject: empty body\r\n\r\n", b"Subject: empty body\r\n\r\n"),
    (b"", b""),
])
def test_header_block_ends_at_the_first_empty_line(tmp_path: Path, content: bytes,
                                                   header_block: bytes) -> None:
    incoming = IncomingMessage(tmp_path, "Q", memory_bytes=1024)
    for b in content:  # one byte at a time: every split point at once
        incoming.write(bytes([b]))
    message = incoming.message()

    assert message._header_block == header_block
    assert message.as_bytes() == content
    assert message.size == len(content)


def test_without_an_empty_line_the_header_block_stops_at_the_cap_on_a_line_end(
        tmp_path: Path) -> None:
    lines = b"".join(b"X-Line-%03d: value\r\n" % i for i in range(100))
    incoming = IncomingMessage(tmp_path, "Q", memory_bytes=1 << 20, header_cap_bytes=100)
    incoming.write(lines)
    parts = incoming.parts()

    assert len(parts.header_block) <= 100 and parts.header_block.endswith(b"\r\n")
    assert parts.header_block + parts.body == lines


def test_an_empty_line_just_past_the_cap_does_not_end_the_header_block(tmp_path: Path) -> None:
    content = b"A: " + b"a" * 94 + b"\r\n\r\nbody\r\n"  # the empty line ends at byte 101
    incoming = IncomingMessage(tmp_path, "Q", memory_bytes=1 << 20, header_cap_bytes=100)
    incoming.write(content)

    assert incoming.parts().header_block == b"A: " + b"a" * 94 + b"\r\n"


chunked_messages = st.tuples(
    st.lists(st.sampled_from([b"\r\n", b"\r\n\r\n", b"Subject: x\r\n", b"a", b"\r", b"\n",
                              b" folded\r\n", b"body text\r\n"]), max_size=60).map(b"".join),
    st.lists(st.integers(min_value=1, max_value=40), max_size=30),
    st.integers(min_value=0, max_value=64),
    st.integers(min_value=4, max_value=128),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunked_messages)
def test_any_chunking_round_trips_byte_exact(tmp_path: Path, case) -> None:
    content, cuts, memory_bytes, header_cap = case
    incoming = IncomingMessage(tmp_path, "Q", memory_bytes, header_cap_bytes=header_cap)
    pos = 0
    for n in cuts:
        incoming.write(content[pos:pos + n])
        pos += n
    incoming.write(content[pos:])
    try:
        message = incoming.message()
        assert message.as_bytes() == content
        block = message._header_block
        end = content.find(b"\r\n\r\n", 0, header_cap)
        if content.startswith(b"\r\n"):
            assert block == b"\r\n"
        elif end >= 0:
            assert block == content[:end + 4]
        else:
            assert len(block) <= header_cap and content.startswith(block)
    finally:
        incoming.discard()
    assert not (tmp_path / "Q.body").exists()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("crash", [False, True], ids=["written-out", "replayed"])
async def test_a_20_mib_message_streams_through_without_growing_memory(
        tmp_path: Path, crash: bool) -> None:
    spool = Spool(tmp_path / "queue", memory_bytes=1024, visible_on_commit=not crash)
    spool.recover()
    if crash:
        spool._materialize_gate.clear()
    chunk = b"".join(b"%062d\r\n" % i for i in range(1024))  # 64 KiB of CRLF lines
    chunks = 20 * 16
    digest = hashlib.sha256(HEADERS)
    before = peak = _rss_bytes()
    incoming = spool.incoming(qid := new_id())
    incoming.write(HEADERS)
    for _ in range(chunks):
        incoming.write(chunk)
        digest.update(chunk)
        peak = max(peak, _rss_bytes())
    message = incoming.message()
    await spool.commit(incoming, envelope_for(qid, size=message.size), prepend=RECEIVED)
    peak = max(peak, _rss_bytes())
    if crash:
        # through the journal only: the record is checked and copied in chunks
        spool._crash_for_tests()
        assert files_in(spool.messages_dir) == []
        spool = Spool(spool.root)
        spool.recover()
        peak = max(peak, _rss_bytes())
    else:
        await spool.close()

    assert peak - before < 5 * 1024 * 1024
    path = spool.message_path(qid)
    assert path.stat().st_size == len(RECEIVED) + len(HEADERS) + chunks * len(chunk)
    check = hashlib.sha256()
    with open(path, "rb") as f:
        assert f.read(len(RECEIVED)) == RECEIVED
        while block := f.read(1 << 20):
            check.update(block)
    assert check.digest() == digest.digest()


def test_discard_drops_the_spilled_body_and_is_idempotent(tmp_path: Path) -> None:
    incoming = IncomingMessage(tmp_path, "Q", memory_bytes=10)
    incoming.write(HEADERS + BODY * 10)
    assert (tmp_path / "Q.body").exists()
    incoming.discard()
    incoming.discard()
    assert files_in(tmp_path) == []
    with pytest.raises(RuntimeError):
        incoming.write(b"more")


def test_no_writes_after_the_content_is_complete(tmp_path: Path) -> None:
    incoming = IncomingMessage(tmp_path, "Q", memory_bytes=1024)
    incoming.write(HEADERS)
    incoming.message()
    with pytest.raises(RuntimeError):
        incoming.write(BODY)


# ------------------------------------------------------------------ CLI


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Spool, list[str]]:
    spool = Spool(tmp_path / "queue")
    spool.recover()

    async def fill() -> list[str]:
        ids = [await commit_message(spool),
               await commit_message(spool, state="deferred"),
               await commit_message(spool, state="hold")]
        await spool.close()
        return ids

    return spool, asyncio.run(fill())


def run_cli(spool: Spool, *args: str):
    settings_ = Settings(spool=SpoolSettings(path=spool.root))
    return CliRunner().invoke(queue_group, list(args), obj=SimpleNamespace(settings=settings_))


def test_cli_list_shows_every_message(populated) -> None:
    spool, ids = populated
    result = run_cli(spool, "list")

    assert result.exit_code == 0, result.output
    for qid in ids:
        assert qid in result.output
    assert "alice@example.org" in result.output and "bob@example.com" in result.output
    assert "3 messages" in result.output


def test_cli_list_filters_by_state(populated) -> None:
    spool, (ready, deferred, held) = populated
    result = run_cli(spool, "list", "--state", "hold")

    assert result.exit_code == 0, result.output
    assert held in result.output and ready not in result.output and deferred not in result.output
    assert "1 message in state hold" in result.output


def test_cli_show_prints_envelope_recipients_and_headers(populated) -> None:
    spool, (_, deferred, _) = populated
    result = run_cli(spool, "show", deferred)

    assert result.exit_code == 0, result.output
    assert deferred in result.output and "deferred" in result.output
    assert "bob@example.com" in result.output and "pending" in result.output
    assert "Subject: hello" in result.output and "Received: from client.example.org" in result.output
    assert "see you" not in result.output  # headers only


def test_cli_show_unknown_id_exits_1(populated) -> None:
    spool, _ = populated
    result = run_cli(spool, "show", "NOSUCHMESSAGE")

    assert result.exit_code == 1
    assert "no message NOSUCHMESSAGE" in result.output


def test_cli_show_does_not_pass_terminal_escapes_through(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "queue")
    spool.recover()

    async def fill() -> str:
        qid = new_id()
        incoming = spool.incoming(qid)
        incoming.write(b"Subject: \x1b[2J[bold]gotcha[/bold]\r\n\r\nbody\r\n")
        await spool.commit(incoming, envelope_for(qid, sender="\x1b]0;evil\x07@example.org"))
        await spool.close()
        return qid

    qid = asyncio.run(fill())
    result = run_cli(spool, "show", qid)

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert "\\x1b[2J[bold]gotcha[/bold]" in result.output


def test_cli_reads_the_spool_path_from_the_config_file(populated, tmp_path: Path) -> None:
    spool, ids = populated
    config = tmp_path / "elemta.toml"
    config.write_text('[spool]\npath = "queue"\n')

    result = CliRunner().invoke(queue_group, ["list"], obj=SimpleNamespace(config_path=config))

    assert result.exit_code == 0, result.output
    assert ids[0] in result.output


def test_cli_skips_envelopes_that_vanish_while_listing(populated, monkeypatch) -> None:
    spool, (ready, deferred, held) = populated
    real_scandir = os.scandir

    class Listed(list):  # a finished directory listing, usable like os.scandir()
        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    def scandir(path):
        with real_scandir(path) as it:
            entries = Listed(it)
        victim = Path(path) / f"{deferred}.json"
        if victim.exists():
            victim.unlink()  # delivered between the scan and the read
        return entries

    monkeypatch.setattr(os, "scandir", scandir)
    result = run_cli(spool, "list")

    assert result.exit_code == 0, result.output
    assert ready in result.output and held in result.output and deferred not in result.output


# ------------------------------------------------------------------ a full disk


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` to the last block, less ``leave`` bytes."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        os.posix_fallocate(fd, 0, max(0, free - leave))
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


async def test_the_journal_refuses_a_batch_whose_files_would_not_fit(small_filesystem) -> None:
    folder = small_filesystem("2m")
    spool = Spool(folder / "queue", memory_bytes=1 << 20, visible_on_commit=False,
                  checkpoint_interval=60, checkpoint_idle=60)
    spool.recover()
    spool._materialize_gate.clear()  # the files do not follow while the disk fills
    body = b"x" * (200 << 10) + b"\r\n"
    acknowledged = []
    with pytest.raises(OSError) as refused:
        for _ in range(20):
            acknowledged.append(await commit_message(spool, HEADERS + body))
    assert refused.value.errno == errno.ENOSPC
    assert 2 <= len(acknowledged) < 10
    spool._materialize_gate.set()
    spool.wait_written()
    await spool.checkpoint()
    # every acknowledged message was placed in its files: none waits in the journal
    assert spool.stats.materialize_errors == 0
    assert sorted(spool.ids_in("ready")) == sorted(acknowledged)
    for queue_id in acknowledged:
        assert spool.message_path(queue_id).read_bytes().endswith(body)
    await spool.close()


async def test_recovery_without_room_starts_and_writes_out_later(small_filesystem) -> None:
    folder = small_filesystem("2m")
    spool = journal_only_spool(folder)
    spool._materialize_gate.clear()
    body = b"y" * (100 << 10) + b"\r\n"
    acknowledged = [await commit_message(spool, HEADERS + body) for _ in range(4)]
    spool._crash_for_tests()  # in the journal only: no file of them was written
    assert spool.ids_in("ready") == []
    filler = fill(folder)  # and no room left to write them out

    durable: list[list[tuple[str, str]]] = []
    recovered = Spool(folder / "queue")
    counts = recovered.recover()  # does not raise
    recovered.on_durable(durable.append)

    # one segment or two, as the writer happened to roll them over
    assert counts["ready"] == 0 and recovered.pending_replay >= 1
    assert "wait to be written out" in recovered.refusal()
    assert all(recovered.awaiting_checkpoint(q) for q in acknowledged)
    assert await recovered.retry_pending() == 0  # still no room

    filler.unlink()
    assert await recovered.retry_pending() == 4

    assert recovered.pending_replay == 0 and recovered.refusal() is None
    assert recovered.counts()["ready"] == 4
    assert sorted(q for batch in durable for q, _ in batch) == sorted(acknowledged)
    assert not any(recovered.awaiting_checkpoint(q) for q in acknowledged)
    for queue_id in acknowledged:
        assert recovered.message_path(queue_id).read_bytes().endswith(body)
    assert list((folder / "queue" / "journal").iterdir()) == []
    await recovered.close()


def test_the_reserve_refuses_new_mail_and_says_why(small_filesystem) -> None:
    folder = small_filesystem("4m")
    spool = Spool(folder / "queue", min_free_bytes=1 << 20)
    spool.recover()
    assert spool.refusal() is None
    assert "does not fit" in spool.refusal(size=7 << 19)  # 3.5 MiB
    fill(folder, leave=512 << 10)
    spool.space.read(max_age=0)
    assert "below the reserve of 1.0 MiB ([spool] min_free_bytes)" in spool.refusal()


def test_a_batch_reads_the_free_space_again_unless_a_recent_reading_shows_room_to_spare() -> None:
    """The journal's check that a batch's files will fit: a reading younger than 50 ms
    answers while it shows a gigabyte and 65,536 inodes to spare; nearer the floor, or
    older, every batch reads the file system again."""
    from elemta.spool import space as space_module

    free = {"bytes": 8 << 30, "inodes": 1 << 20}
    calls = []

    def statvfs(path):
        calls.append(path)
        return os.statvfs_result((4096, 4096, 4 << 20, 0, free["bytes"] // 4096, 0, 0,
                                  free["inodes"], 0, 255))

    clock = [1000.0]
    monitor = space_module.SpaceMonitor("/spool", statvfs=statvfs, clock=lambda: clock[0])
    assert all(monitor.fits(100 << 10, 10) for _ in range(20))
    assert len(calls) == 1  # room to spare: one reading for the lot
    clock[0] += 0.06
    assert monitor.fits(100 << 10, 10)
    assert len(calls) == 2  # older than 50 ms: read again

    free["bytes"] = 1 << 30  # within a gigabyte of the need
    clock[0] += 0.06
    assert monitor.fits(100 << 10, 10)
    calls.clear()
    for _ in range(5):
        clock[0] += 0.001
        assert monitor.fits(100 << 10, 10)
    assert len(calls) == 5  # every batch reads afresh

    free["bytes"] = 1 << 20  # and a batch that no longer fits is refused at once
    clock[0] += 0.001
    assert not monitor.fits(1 << 20, 10)
    free.update(bytes=8 << 30, inodes=(1 << 16) + 100)  # few inodes to spare: afresh too
    clock[0] += 0.06
    calls.clear()
    assert monitor.fits(100 << 10, 1)
    clock[0] += 0.001
    assert monitor.fits(100 << 10, 1)
    assert len(calls) == 2


def test_removals_past_the_waiting_limit_are_unlinked_at_once(tmp_path: Path,
                                                              monkeypatch) -> None:
    """A disk whose unlinks stall must not make the remover's list grow without bound."""
    import threading

    from elemta.spool import remover as remover_module

    monkeypatch.setattr(remover_module, "MAX_PENDING", 2)
    release = threading.Event()
    real_unlink = os.unlink

    def unlink(path):
        if threading.current_thread().name == "spool-remover":
            release.wait(10)              # the thread is stuck on the disk
        real_unlink(path)

    monkeypatch.setattr(remover_module.os, "unlink", unlink)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(b"x")
    r = remover_module.Remover(process=False)   # the thread: the fallback
    r.unlink_later(str(paths[0]))         # taken by the thread, which then stalls
    deadline = time.monotonic() + 5
    while r._paths and time.monotonic() < deadline:
        time.sleep(0.01)
    for p in paths[1:]:
        r.unlink_later(str(p))
    assert [p.exists() for p in paths] == [True, True, True, False, False]
    release.set()
    r.close()
    assert not any(p.exists() for p in paths)


def _files(tmp_path: Path, n: int, prefix: str = "f") -> list[Path]:
    paths = [tmp_path / f"{prefix}{i}" for i in range(n)]
    for p in paths:
        p.write_bytes(b"x")
    return paths


def _gone(paths: list[Path], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def test_the_helper_process_gets_one_turns_paths_in_one_write(tmp_path: Path) -> None:
    from elemta.spool.remover import Remover

    r = Remover()
    paths = _files(tmp_path, 50)
    try:
        for p in paths:
            r.unlink_later(str(p))
        assert r._proc is not None and r._proc.pid != os.getpid()   # a process of its own
        assert r._out_paths == 50                   # nothing written before the turn ends
        await asyncio.sleep(0)
        assert r._out_paths == 0
        assert _gone(paths)
    finally:
        r.close()
    assert r._proc is None                          # waited for at close


def test_the_helper_process_stalled_lets_no_more_than_the_limit_wait(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """A helper stuck on the disk fills its pipe; past MAX_PENDING waiting paths the
    caller unlinks at once, and the rest goes once the helper moves again."""
    from elemta.spool import remover as remover_module

    monkeypatch.setattr(remover_module, "MAX_PENDING", 10)
    r = remover_module.Remover()
    first = _files(tmp_path, 1, "first")
    r.unlink_later(str(first[0]))                   # starts the helper (no loop: written now)
    assert _gone(first)
    proc = r._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        # long names fill the pipe (64 KiB) with paths the stopped helper cannot read
        long_dir = tmp_path / ("d" * 200)
        long_dir.mkdir()
        filler = _files(long_dir, 2000, "p" * 40)
        for p in filler:
            r.unlink_later(str(p))
        assert 0 < r._out_paths <= 10               # the rest are in the pipe, or gone
        assert not any(p.exists() for p in filler[-5:])   # over the limit: unlinked at once
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    r.close()
    assert not any(p.exists() for p in filler)


def test_a_helper_process_that_dies_is_replaced_by_the_thread(tmp_path: Path) -> None:
    from elemta.spool.remover import Remover

    r = Remover()
    first = _files(tmp_path, 1, "first")
    r.unlink_later(str(first[0]))
    assert _gone(first)
    proc = r._proc
    assert proc is not None
    proc.kill()
    proc.wait(5)
    later = _files(tmp_path, 20, "later")
    try:
        for p in later:
            r.unlink_later(str(p))                  # the first write finds the pipe broken
        assert r._proc is None and r._thread is not None
        assert _gone(later)
    finally:
        r.close()
