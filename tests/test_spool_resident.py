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
    spool._crash_for_tests()                                 # its segment never checkpointed
    again = Spool(tmp_path / "queue")
    assert again.recover()["ready"] == 0
    assert files_in(again.messages_dir) == []


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


def test_the_spool_is_stamped_with_this_format_when_locked(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    root.mkdir()
    (root / "format").write_text("1\n")
    fd = lock_spool(root)
    unlock_spool(fd)
    assert SPOOL_FORMAT == 2
    assert (root / "format").read_text() == "2\n"
