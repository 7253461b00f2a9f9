"""The aggregate-report store (RFC 7489 §7.2 data): SQLite on a thread of its own,
pruned by age and by row count."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from elemta_dmarc import store as store_module
from elemta_dmarc.store import ReportRow, ReportStore, ReportStoreError, read_rows


def row(n: int = 0, received_at: float = 1_000_000.0) -> ReportRow:
    return ReportRow(
        received_at=received_at, queue_id=f"Q{n}", source_ip="192.0.2.1",
        header_from="example.org", envelope_from="example.net", envelope_to="example.test",
        helo="mx.example.net", spf_domain="example.net", spf_scope="mfrom", spf_result="pass",
        dkim=({"domain": "example.org", "selector": "s1", "result": "pass"},), result="pass",
        spf_aligned=False, dkim_aligned=True, disposition="none", override=None,
        override_comment=None, policy_domain="example.org", p="reject", sp=None, np="reject",
        pct=100, adkim="r", aspf="r", fo="0", rua=("mailto:a@example.org", "mailto:b@x.example"))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_rows_are_written_and_read_back(tmp_path):
    path = tmp_path / "state" / "sub" / "dmarc.sqlite3"
    store = ReportStore(path, retention_days=14, max_rows=1000, clock=Clock(1_000_000.0))
    await store.open()
    assert await store.add(row(1))
    await store.close()
    [got] = await asyncio.to_thread(read_rows, path)
    assert got["queue_id"] == "Q1" and got["dkim_aligned"] == 1 and got["spf_aligned"] == 0
    assert got["dkim"] == [{"domain": "example.org", "selector": "s1", "result": "pass"}]
    assert got["rua"] == ["mailto:a@example.org", "mailto:b@x.example"]
    assert (got["p"], got["sp"], got["np"], got["pct"]) == ("reject", None, "reject", 100)
    assert (path.parent.stat().st_mode & 0o777) == 0o700


async def test_writes_happen_on_the_store_thread_not_the_event_loop(tmp_path):
    threads: list[str] = []

    class Watched(ReportStore):
        def _insert(self, r: ReportRow) -> None:
            threads.append(threading.current_thread().name)
            super()._insert(r)

    store = Watched(tmp_path / "r.sqlite3", retention_days=1, max_rows=1000)
    await store.open()
    await store.add(row())
    await store.close()
    assert threads and threads[0].startswith("dmarc-reports")
    assert threads[0] != threading.current_thread().name


async def test_rows_older_than_the_retention_are_pruned(tmp_path):
    clock = Clock(10 * 86400.0)
    store = ReportStore(tmp_path / "r.sqlite3", retention_days=2, max_rows=1000, clock=clock)
    await store.open()
    for n, age_days in enumerate([5, 3, 1, 0]):
        await store.add(row(n, received_at=clock.now - age_days * 86400))
    assert await store.prune() == 2
    await store.close()
    assert [r["queue_id"] for r in read_rows(tmp_path / "r.sqlite3")] == ["Q2", "Q3"]


async def test_old_rows_are_pruned_at_open(tmp_path):
    path = tmp_path / "r.sqlite3"
    clock = Clock(100 * 86400.0)
    store = ReportStore(path, retention_days=30, max_rows=1000, clock=clock)
    await store.open()
    await store.add(row(1, received_at=clock.now - 40 * 86400))
    await store.add(row(2, received_at=clock.now))
    await store.close()
    store = ReportStore(path, retention_days=30, max_rows=1000, clock=clock)
    await store.open()
    await store.close()
    assert [r["queue_id"] for r in read_rows(path)] == ["Q2"]


async def test_the_row_cap_keeps_the_newest_rows(tmp_path):
    store = ReportStore(tmp_path / "r.sqlite3", retention_days=30, max_rows=3,
                        clock=Clock(1_000_000.0))
    await store.open()
    for n in range(7):
        assert await store.add(row(n))
    await store.close()
    assert [r["queue_id"] for r in read_rows(tmp_path / "r.sqlite3")] == ["Q4", "Q5", "Q6"]


async def test_a_lower_row_cap_is_applied_by_prune(tmp_path):
    path = tmp_path / "r.sqlite3"
    clock = Clock(1_000_000.0)
    store = ReportStore(path, retention_days=30, max_rows=100, clock=clock)
    await store.open()
    for n in range(10):
        await store.add(row(n))
    await store.close()
    store = ReportStore(path, retention_days=30, max_rows=4, clock=clock)
    await store.open()   # prunes
    await store.close()
    assert [r["queue_id"] for r in read_rows(path)] == ["Q6", "Q7", "Q8", "Q9"]


async def test_rows_beyond_the_pending_limit_are_dropped_not_queued(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_PENDING", 3)
    store = ReportStore(tmp_path / "r.sqlite3", retention_days=30, max_rows=1000)
    await store.open()
    gate = threading.Event()
    assert store._executor is not None
    blocker = asyncio.get_running_loop().run_in_executor(store._executor, gate.wait, 10)
    adds = [asyncio.create_task(store.add(row(n))) for n in range(5)]
    await asyncio.sleep(0.05)
    done = [t.result() for t in adds if t.done()]
    assert done == [False, False] and store.dropped == 2
    gate.set()
    await blocker
    assert [await t for t in adds[:3]] == [True, True, True]
    await store.close()
    assert len(read_rows(tmp_path / "r.sqlite3")) == 3


async def test_a_database_of_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(ReportStoreError, match="newer elemta-dmarc"):
        await ReportStore(path, retention_days=1, max_rows=1000).open()


async def test_a_file_that_is_not_a_database_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "r.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReportStoreError, match="move it away"):
        await ReportStore(path, retention_days=1, max_rows=1000).open()


async def test_a_path_that_cannot_be_created_says_which_key_to_change(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportStoreError, match=r"\[plugins.dmarc.reports\] path"):
        await ReportStore(tmp_path / "file" / "r.sqlite3", retention_days=1,
                          max_rows=1000).open()


async def test_a_write_that_fails_is_logged_and_reported_not_raised(tmp_path, caplog):
    store = ReportStore(tmp_path / "r.sqlite3", retention_days=1, max_rows=1000)
    await store.open()
    assert store._executor is not None
    await asyncio.get_running_loop().run_in_executor(
        store._executor, lambda: store._conn.execute("DROP TABLE messages"))
    assert await store.add(row()) is False
    assert "cannot write a report row" in caplog.text
    await store.close()


async def test_a_closed_store_takes_no_rows(tmp_path):
    store = ReportStore(tmp_path / "r.sqlite3", retention_days=1, max_rows=1000)
    await store.open()
    await store.close()
    assert await store.add(row()) is False
    assert await store.prune() == 0


async def test_submitted_rows_are_written_in_batches_without_waiting(tmp_path):
    store = ReportStore(tmp_path / "r.sqlite3", retention_days=14, max_rows=50)
    await store.open()
    for n in range(120):
        store.submit(row(n))          # returns at once: the server never waits for the disk
    await store.drain()
    rows = read_rows(tmp_path / "r.sqlite3")
    assert [r["queue_id"] for r in rows] == [f"Q{n}" for n in range(70, 120)], "newest 50 kept"
    await store.close()
    store.submit(row(999))            # closed: ignored, no error


def test_a_rows_values_are_in_the_order_of_the_columns():
    import dataclasses
    import json

    r = row(7)
    by_name = {f.name: getattr(r, f.name) for f in dataclasses.fields(ReportRow)}
    by_name.update(dkim=json.dumps(list(r.dkim), separators=(",", ":")), rua=",".join(r.rua),
                   spf_aligned=0, dkim_aligned=1)
    assert set(by_name) == set(store_module._COLUMNS)
    assert r.values() == tuple(by_name[c] for c in store_module._COLUMNS)


async def test_submitted_rows_wait_to_be_written_together(tmp_path, monkeypatch):
    writes: list[int] = []
    store = ReportStore(tmp_path / "r.sqlite3", retention_days=14, max_rows=1000)
    real = store._insert_many
    monkeypatch.setattr(store, "_insert_many", lambda rows: (writes.append(len(rows)),
                                                             real(rows))[1])
    await store.open()
    for n in range(5):
        store.submit(row(n))
        await asyncio.sleep(0.01)     # one message at a time: still one batch
    assert writes == []
    await asyncio.sleep(store_module.FLUSH_DELAY_SECONDS + 0.2)
    assert writes == [5]
    for n in range(store_module.BATCH_ROWS):
        store.submit(row(n))          # a full batch is written without waiting
    await asyncio.sleep(0.1)
    assert writes == [5, store_module.BATCH_ROWS]
    store.submit(row(1000))
    await store.close()               # what waits is written at close
    assert writes[-1] == 1 and len(read_rows(tmp_path / "r.sqlite3")) == 262
