"""The spool: durable group commit, crash recovery, streaming DATA, the queue CLI."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import elemta.spool.store as store
from elemta.config import Settings, SpoolSettings
from elemta.models import new_id
from elemta.spool.cli import queue_group
from elemta.spool.envelope import STATES, Envelope, RecipientState
from elemta.spool.incoming import IncomingMessage
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
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "queue", commit_threads=4, memory_bytes=1024)
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


async def test_commits_arriving_during_a_batch_join_the_next_batch(spool: Spool) -> None:
    first = asyncio.ensure_future(commit_message(spool))
    await asyncio.sleep(0)  # the first batch is now on disk, with one message
    rest = [asyncio.ensure_future(commit_message(spool)) for _ in range(20)]
    await asyncio.gather(first, *rest)

    assert spool.stats.batches == 2
    assert spool.stats.largest_batch == 20


async def test_content_is_durable_before_the_envelope_becomes_visible(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_link, real_rename, real_fsync_dir = os.link, os.rename, store._fsync_dir

    def link(src, dst):
        events.append(f"link {Path(dst).parent.name}")
        real_link(src, dst)

    def rename(src, dst):
        events.append(f"rename {Path(dst).parent.name}")
        real_rename(src, dst)

    def fsync_dir(path):
        events.append(f"fsync {Path(path).name}")
        real_fsync_dir(path)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(store, "_fsync_dir", fsync_dir)
    await asyncio.gather(commit_message(spool), commit_message(spool))

    assert events == ["link messages", "link messages", "fsync messages",
                      "rename ready", "rename ready", "fsync ready"]


async def test_a_failed_fsync_fails_only_that_message_and_leaves_nothing_of_it(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = new_id()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if doomed in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    others = [new_id() for _ in range(5)]
    results = await asyncio.gather(*(commit_message(spool, queue_id=q) for q in [doomed, *others]),
                                   return_exceptions=True)

    assert isinstance(results[0], OSError) and results[0].errno == errno.ENOSPC
    assert results[1:] == others
    assert spool.stats.largest_batch == 6  # they really shared a batch
    with pytest.raises(KeyError):
        spool.load(doomed)
    assert not spool.message_path(doomed).exists()
    assert files_in(spool.messages_dir) == sorted(others)
    assert files_in(spool.tmp_dir) == []
    assert spool.counts()["ready"] == 5


async def test_a_commit_failing_on_a_broken_spool_raises_and_leaves_nothing_visible(
        spool: Spool) -> None:
    spilled = spool.incoming(qid := new_id())
    spilled.write(HEADERS + b"x" * 5000)
    os.rmdir(spool.messages_dir)
    spool.messages_dir.write_bytes(b"")  # every link into messages/ now fails

    with pytest.raises(OSError):
        await spool.commit(spilled, envelope_for(qid), prepend=RECEIVED)

    assert files_in(spool.root / "ready") == []
    assert files_in(spool.tmp_dir) == []
    assert spool.counts()["ready"] == 0
    assert spool.stats.failed == 1


async def test_a_queue_id_already_in_the_spool_is_not_overwritten(spool: Spool) -> None:
    qid = await commit_message(spool, HEADERS + b"first\r\n")

    with pytest.raises(FileExistsError):
        await commit_message(spool, HEADERS + b"second\r\n", queue_id=qid)

    assert spool.message_path(qid).read_bytes() == RECEIVED + HEADERS + b"first\r\n"
    assert spool.load(qid)[0] == "ready"
    assert spool.counts()["ready"] == 1


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


# ------------------------------------------------------------------ recovery


async def test_recover_removes_tmp_leftovers_and_orphan_content(spool: Spool) -> None:
    kept = await commit_message(spool)
    (spool.tmp_dir / "X.content").write_bytes(b"half a message")
    (spool.tmp_dir / "X.body").write_bytes(b"half a body")
    (spool.tmp_dir / "stray-dir").mkdir()
    orphan = new_id()
    spool.message_path(orphan).write_bytes(HEADERS + BODY)  # crash between the two renames

    counts = Spool(spool.root).recover()

    assert counts == {"ready": 1, "deferred": 0, "hold": 0, "failed": 0}
    assert files_in(spool.tmp_dir) == []
    assert files_in(spool.messages_dir) == [kept]


async def test_recover_moves_an_envelope_without_content_to_failed(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    qid = await commit_message(spool)
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
    (spool.root / "deferred" / f"{bad}.json").write_bytes(b'{"id": "trunc')

    counts = Spool(spool.root).recover()

    assert counts == {"ready": 1, "deferred": 0, "hold": 0, "failed": 0}
    assert files_in(spool.root / "failed") == [f"{bad}.json.corrupt"]
    assert files_in(spool.messages_dir) == sorted([good, bad])
    assert "unreadable envelope" in caplog.text
    # a second start-up leaves the quarantined file alone
    assert Spool(spool.root).recover() == counts
    assert files_in(spool.root / "failed") == [f"{bad}.json.corrupt"]


def test_recover_creates_a_private_layout(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    assert Spool(root).recover() == dict.fromkeys(STATES, 0)
    assert files_in(root) == sorted(["tmp", "messages", *STATES])
    for d in root.iterdir():
        assert d.stat().st_mode & 0o777 == 0o700


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
async def test_a_20_mib_message_streams_through_without_growing_memory(spool: Spool) -> None:
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
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == f"{deferred}.json":
            self.unlink()  # delivered between the scan and the read
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    result = run_cli(spool, "list")

    assert result.exit_code == 0, result.output
    assert ready in result.output and held in result.output and deferred not in result.output
