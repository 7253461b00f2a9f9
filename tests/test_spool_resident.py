"""Resident messages: delivered from memory, retired by a journal record, written out only
when they must be; and what a crash at each point leaves."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from elemta.spool import journal
from elemta.spool.journal import SegmentReader
from elemta.spool.layout import Layout, is_queue_id
from elemta.spool.lock import SPOOL_FORMAT, lock_spool, unlock_spool
from elemta.spool.store import Spool
from tests.test_spool import BODY, HEADERS, RECEIVED, commit_message, files_in, journal_only_spool

CONTENT = RECEIVED + HEADERS + BODY


def resident_spool(tmp_path: Path, **kw) -> tuple[Spool, list[str], list[tuple[str, str]]]:
    """A spool with a listener, as the runner listens: ``(spool, journaled, durable)``."""
    spool = journal_only_spool(tmp_path, **kw)
    journaled: list[str] = []
    durable: list[tuple[str, str]] = []
    spool.on_journaled(journaled.extend)
    spool.on_durable(durable.extend)
    return spool, journaled, durable


def records_in(spool: Spool) -> list[tuple[str, str]]:
    """``(queue id, state)`` of every valid record in the spool's journal segments and
    retire files."""
    layout = Layout(spool.root)
    out = []
    files = [(seq, path, False) for seq, path in layout.journal_segments()[0]]
    files += [(seq, path, True) for seq, path in layout.retire_files()]
    for seq, path, retire_file in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            out += [(r.queue_id, r.state)
                    for r in SegmentReader(fd, seq, is_queue_id, retire_file=retire_file)]
        finally:
            os.close(fd)
    return out


def crash_and_find_nothing(spool: Spool) -> None:
    """Crash now: the next start finds no message to deliver and no content left."""
    spool._crash_for_tests()
    again = Spool(spool.root)
    assert again.recover()["ready"] == 0
    assert files_in(again.messages_dir) == []


async def wait_for(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_a_resident_message_is_delivered_from_memory_and_never_written(
        tmp_path: Path) -> None:
    spool, journaled, durable = resident_spool(tmp_path)
    try:
        queue_id = await commit_message(spool)
        assert journaled == [queue_id]                      # handed over with the 250
        assert spool.load(queue_id)[0] == "ready"
        with spool.content(queue_id) as path:
            assert path.startswith("/proc/self/fd/")
            assert Path(path).read_bytes() == CONTENT
        assert spool.original(queue_id) == CONTENT
        spool.remove(queue_id, "ready")
        assert spool.counts()["ready"] == 0
        assert (queue_id, journal.RETIRED) in records_in(spool)   # before remove returned
        await spool.checkpoint()
        assert files_in(spool.messages_dir) == [] and files_in(spool.state_dir("ready")) == []
        assert durable == []              # the runner had it already: not announced again
        assert spool.stats.retired == 1
        assert records_in(spool) == []     # the segment is gone (or reused), its retire file too
    finally:
        await spool.close()


async def test_a_retired_message_is_not_replayed_after_a_crash_and_the_others_are(
        tmp_path: Path) -> None:
    spool, journaled, _ = resident_spool(tmp_path)
    delivered = await commit_message(spool)
    waiting = await commit_message(spool)
    assert journaled == [delivered, waiting]
    spool.remove(delivered, "ready")
    spool._crash_for_tests()          # at once: the retire record was written by remove

    again = Spool(tmp_path / "queue")
    counts = again.recover()
    assert counts["ready"] == 1
    assert files_in(again.state_dir("ready")) == [f"{waiting}.json"]
    assert again.message_path(waiting).read_bytes() == CONTENT
    assert not again.message_path(delivered).exists()
    assert Layout(again.root).retire_files() == []   # gone with the segments they covered


async def test_a_deferred_resident_gets_its_files_and_a_crash_keeps_its_new_state(
        tmp_path: Path) -> None:
    spool, _, _ = resident_spool(tmp_path)
    queue_id = await commit_message(spool)
    state, env = spool.load(queue_id)
    env.attempts = 1
    env.recipients[0].last_error = "451 4.4.1 try again"
    spool.rewrite(env, "ready", "deferred")
    assert files_in(spool.state_dir("deferred")) == [f"{queue_id}.json"]
    assert spool.message_path(queue_id).read_bytes() == CONTENT
    assert spool.counts()["deferred"] == 1 and spool.counts()["ready"] == 0
    spool._crash_for_tests()

    again = Spool(tmp_path / "queue")
    again.recover()
    state, env = again.load(queue_id)
    assert (state, env.attempts, env.recipients[0].last_error) == (
        "deferred", 1, "451 4.4.1 try again")
    assert files_in(again.state_dir("ready")) == []


async def test_a_partial_delivery_is_kept_in_memory_and_written_out_at_sealing(
        tmp_path: Path) -> None:
    spool, _, durable = resident_spool(tmp_path)
    try:
        queue_id = await commit_message(spool)
        state, env = spool.load(queue_id)
        env.recipients[0].state = "delivered"
        spool.rewrite(env, "ready", "ready")               # still in memory
        assert files_in(spool.state_dir("ready")) == []
        assert spool.load(queue_id)[1].recipients[0].state == "delivered"
        await spool.checkpoint()                             # sealed: written out now
        assert durable == []
        assert files_in(spool.state_dir("ready")) == [f"{queue_id}.json"]
        assert spool.load(queue_id)[1].recipients[0].state == "delivered"
        assert spool.message_path(queue_id).read_bytes() == CONTENT
        with spool.content(queue_id) as path:               # from its file now
            assert path == spool.message_file(queue_id)
        spool.remove(queue_id, "ready")
        assert files_in(spool.state_dir("ready")) == []
        spool.finish_removals()
        assert files_in(spool.messages_dir) == []
    finally:
        await spool.close()


async def test_a_resident_written_out_then_removed_before_its_checkpoint_stays_removed(
        tmp_path: Path) -> None:
    spool, _, _ = resident_spool(tmp_path)
    queue_id = await commit_message(spool)
    spool.wait_written()                                     # a barrier writes residents too
    assert files_in(spool.state_dir("ready")) == [f"{queue_id}.json"]
    spool.remove(queue_id, "ready")
    crash_and_find_nothing(spool)                            # its segment never checkpointed


async def test_without_a_listener_and_for_spilled_bodies_nothing_is_resident(
        tmp_path: Path) -> None:
    spool = journal_only_spool(tmp_path)
    try:
        queue_id = await commit_message(spool)
        spool.wait_written()
        assert files_in(spool.state_dir("ready")) == [f"{queue_id}.json"]
    finally:
        await spool.close()
    spool, journaled, durable = resident_spool(tmp_path / "2")
    try:
        big = await commit_message(spool, HEADERS + b"x" * 4096 + b"\r\n")  # over memory_bytes
        held = await commit_message(spool, state="hold")
        assert journaled == []
        await spool.checkpoint()
        assert sorted(durable) == sorted([(big, "ready"), (held, "hold")])
    finally:
        await spool.close()


async def test_many_residents_delivered_while_others_are_sealed(tmp_path: Path) -> None:
    """Interleaved retiring and sealing: every message ends delivered once or in ready/."""
    spool, journaled, durable = resident_spool(tmp_path, checkpoint_interval=0.02,
                                               checkpoint_idle=0.01)
    try:
        ids = await asyncio.gather(*(commit_message(spool) for _ in range(200)))
        retired = set(ids[::2])
        for queue_id in retired:
            spool.remove(queue_id, "ready")
            await asyncio.sleep(0)
        await spool.checkpoint()
        assert set(journaled) == set(ids) and durable == []
        assert set(p.stem for p in spool.state_dir("ready").iterdir()) == set(ids) - retired
        assert spool.counts()["ready"] == 100
    finally:
        await spool.close()


# ------------------------------------------------------------------ carried at a seal


def carrying_spool(tmp_path: Path) -> tuple[Spool, list[str], list[tuple[str, str]]]:
    """Sealed a moment after each commit, so that residents are carried (no checkpoint
    request: a requested checkpoint gives every message its files)."""
    return resident_spool(tmp_path, checkpoint_interval=0.05, checkpoint_idle=0.02)


def segments_of(spool: Spool, queue_id: str) -> list[int]:
    """The sequence numbers of the segments holding a record of ``queue_id``."""
    layout = Layout(spool.root)
    out = []
    for seq, path in layout.journal_segments()[0]:
        fd = os.open(path, os.O_RDONLY)
        try:
            if any(r.queue_id == queue_id for r in SegmentReader(fd, seq, is_queue_id)):
                out.append(seq)
        finally:
            os.close(fd)
    return out


async def test_a_resident_still_in_memory_at_a_seal_is_carried_not_written_out(
        tmp_path: Path) -> None:
    spool, journaled, durable = carrying_spool(tmp_path)
    queue_id = await commit_message(spool)
    first = segments_of(spool, queue_id)
    state, env = spool.load(queue_id)
    env.recipients[0].last_error = "a change the runner made"
    spool.rewrite(env, "ready", "ready")                     # still in memory
    await wait_for(lambda: spool.stats.carried >= 1 and spool.stats.checkpoints >= 1)
    assert journaled == [queue_id] and durable == []        # the runner has it already
    assert files_in(spool.messages_dir) == [] and files_in(spool.state_dir("ready")) == []
    with spool.content(queue_id) as path:                     # still from memory
        assert path.startswith("/proc/self/fd/")
    later = segments_of(spool, queue_id)
    assert later and min(later) > max(first)     # the first segment is gone; replayed after it
    spool._crash_for_tests()

    again = Spool(tmp_path / "queue")
    assert again.recover()["ready"] == 1                      # its journal record brings it back
    assert again.message_path(queue_id).read_bytes() == CONTENT
    assert again.load(queue_id)[1].recipients[0].last_error == "a change the runner made"


async def test_a_crash_before_the_sealed_segments_checkpoint_replays_the_carried_copy_last(
        tmp_path: Path) -> None:
    """Both copies on disk: replay goes by sequence number and the carried one, with the
    envelope the runner changed, is what stays."""
    spool, _, _ = carrying_spool(tmp_path)
    spool._materialize_gate.clear()                   # no sealed segment reaches its checkpoint
    queue_id = await commit_message(spool)
    state, env = spool.load(queue_id)
    env.recipients[0].last_error = "a change the runner made"
    spool.rewrite(env, "ready", "ready")
    await wait_for(lambda: spool.stats.carried >= 1)
    assert len(segments_of(spool, queue_id)) == 2
    spool._crash_for_tests()

    again = Spool(tmp_path / "queue")
    assert again.recover()["ready"] == 1
    assert again.load(queue_id)[1].recipients[0].last_error == "a change the runner made"
    assert again.message_path(queue_id).read_bytes() == CONTENT


async def test_a_carried_message_delivered_before_a_crash_is_not_replayed(
        tmp_path: Path) -> None:
    spool, _, _ = carrying_spool(tmp_path)
    queue_id = await commit_message(spool)
    await wait_for(lambda: spool.stats.carried >= 1 and spool.stats.checkpoints >= 1)
    spool.remove(queue_id, "ready")
    crash_and_find_nothing(spool)


async def test_a_message_delivered_while_it_is_carried_stays_delivered(
        tmp_path: Path, monkeypatch) -> None:
    """Retired between being picked for the carry and moving: its retire record went to
    the old segment, which is deleted at its checkpoint; the new segment gets one too."""
    from elemta.spool import writer

    spool, _, _ = carrying_spool(tmp_path)
    queue_id = await commit_message(spool)
    real_sync = writer.sync_data

    def sync_then_deliver(fd: int) -> None:
        real_sync(fd)
        if spool._resident.table.jobs.get(queue_id) is not None and not delivered:
            delivered.append(spool._resident.remove(queue_id, "ready"))

    delivered: list[bool] = []
    monkeypatch.setattr(writer, "sync_data", sync_then_deliver)   # the carry's sync
    await wait_for(lambda: spool.stats.carried >= 1 and spool.stats.checkpoints >= 1)
    assert delivered == [True]
    crash_and_find_nothing(spool)


async def test_a_resident_past_the_carry_age_gets_its_files_at_the_seal(
        tmp_path: Path, monkeypatch) -> None:
    from elemta.spool import writer

    monkeypatch.setattr(writer, "CARRY_SECONDS", 0.0)
    spool, _, durable = carrying_spool(tmp_path)
    try:
        queue_id = await commit_message(spool)
        await wait_for(lambda: spool.stats.checkpoints >= 1)
        assert spool.stats.carried == 0
        assert files_in(spool.state_dir("ready")) == [f"{queue_id}.json"]
        assert durable == []
    finally:
        await spool.close()


async def test_carried_residents_get_their_files_when_the_spool_closes(tmp_path: Path) -> None:
    spool, _, _ = carrying_spool(tmp_path)
    ids = [await commit_message(spool) for _ in range(3)]
    await wait_for(lambda: spool.stats.carried >= 3)
    await spool.close()
    assert sorted(files_in(spool.state_dir("ready"))) == sorted(f"{i}.json" for i in ids)
    assert Layout(spool.root).journal_segments()[0] == []
    again = Spool(tmp_path / "queue")
    assert again.recover()["ready"] == 3


def test_the_spool_is_stamped_with_this_format_when_locked(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    root.mkdir()
    (root / "format").write_text("1\n")
    fd = lock_spool(root)
    unlock_spool(fd)
    assert SPOOL_FORMAT == 2
    assert (root / "format").read_text() == "2\n"
