"""Aggregate-report data: one SQLite row per message evaluated against a DMARC record.

A row holds what an RFC 7489 aggregate report (Appendix C) is made of: the
source IP, the identifiers (header From, envelope from and to, HELO), the
SPF and DKIM results, the evaluation (aligned or not, the disposition applied
and why it differs from the policy) and the published policy (domain, ``p``,
``sp``, ``np``, ``pct``, ``adkim``, ``aspf``, ``fo``, ``rua``). Reports are
grouped per ``policy_domain`` and day; see the README for the query.

All SQLite work happens on one thread of its own, which owns the connection.
The server hands rows over with :meth:`ReportStore.submit`, which does not
wait: rows are gathered for a quarter of a second (or until 256 wait) and
written in one transaction, as are the rows that arrive while a batch is being
written, so the writes never hold a message up and cost one commit and one
thread hand-over per batch, not per message. Writes are bounded: when
:data:`MAX_PENDING` rows wait for the thread (a stalled disk), further rows are
dropped with a warning instead of piling up in memory. Rows older than
``retention_days`` are deleted at start-up and every hour, and the table never
holds more than ``max_rows`` rows (the oldest go first).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("elemta.dmarc")

__all__ = ["MAX_PENDING", "ReportRow", "ReportStore", "ReportStoreError", "read_rows"]

SCHEMA_VERSION = 1
MAX_PENDING = 1000
#: submitted rows wait this long (or until BATCH_ROWS wait) to be written together
FLUSH_DELAY_SECONDS = 0.25
BATCH_ROWS = 256
WRITE_TIMEOUT_SECONDS = 2.0
BUSY_TIMEOUT_SECONDS = 2.0
PRUNE_INTERVAL_SECONDS = 3600.0
_WARN_EVERY_SECONDS = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY,
    received_at     REAL    NOT NULL,   -- unix time
    queue_id        TEXT    NOT NULL,
    source_ip       TEXT    NOT NULL,
    header_from     TEXT    NOT NULL,
    envelope_from   TEXT    NOT NULL,   -- domain of MAIL FROM, '' for the null sender
    envelope_to     TEXT    NOT NULL,   -- recipient domains, space-separated
    helo            TEXT    NOT NULL,
    spf_domain      TEXT,
    spf_scope       TEXT,               -- 'mfrom' or 'helo'
    spf_result      TEXT,
    dkim            TEXT    NOT NULL,   -- JSON: [{"domain", "selector", "result"}]
    result          TEXT    NOT NULL,   -- DMARC: 'pass' or 'fail'
    spf_aligned     INTEGER NOT NULL,
    dkim_aligned    INTEGER NOT NULL,
    disposition     TEXT    NOT NULL,   -- applied: 'none', 'quarantine', 'reject'
    override        TEXT,               -- PolicyOverrideType: sampled_out, local_policy...
    override_comment TEXT,
    policy_domain   TEXT    NOT NULL,
    p               TEXT    NOT NULL,
    sp              TEXT,
    np              TEXT,
    pct             INTEGER NOT NULL,
    adkim           TEXT    NOT NULL,
    aspf            TEXT    NOT NULL,
    fo              TEXT    NOT NULL,
    rua             TEXT    NOT NULL    -- the record's rua URIs, comma-separated
);
CREATE INDEX IF NOT EXISTS messages_received_at ON messages (received_at);
CREATE INDEX IF NOT EXISTS messages_policy_domain ON messages (policy_domain, received_at);
"""

_COLUMNS = ("received_at", "queue_id", "source_ip", "header_from", "envelope_from",
            "envelope_to", "helo", "spf_domain", "spf_scope", "spf_result", "dkim", "result",
            "spf_aligned", "dkim_aligned", "disposition", "override", "override_comment",
            "policy_domain", "p", "sp", "np", "pct", "adkim", "aspf", "fo", "rua")
_INSERT = (f"INSERT INTO messages ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")


class ReportStoreError(Exception):
    """The report database cannot be opened or is not ours."""


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One message's aggregate-report data (the columns of ``messages``)."""

    received_at: float
    queue_id: str
    source_ip: str
    header_from: str
    envelope_from: str
    envelope_to: str
    helo: str
    spf_domain: str | None
    spf_scope: str | None
    spf_result: str | None
    dkim: tuple[dict[str, str], ...]
    result: str
    spf_aligned: bool
    dkim_aligned: bool
    disposition: str
    override: str | None
    override_comment: str | None
    policy_domain: str
    p: str
    sp: str | None
    np: str | None
    pct: int
    adkim: str
    aspf: str
    fo: str
    rua: tuple[str, ...] = field(default=())

    def values(self) -> tuple[Any, ...]:
        """The row in the order of ``_COLUMNS``."""
        return (self.received_at, self.queue_id, self.source_ip, self.header_from,
                self.envelope_from, self.envelope_to, self.helo, self.spf_domain,
                self.spf_scope, self.spf_result,
                json.dumps(list(self.dkim), separators=(",", ":")), self.result,
                int(self.spf_aligned), int(self.dkim_aligned), self.disposition,
                self.override, self.override_comment, self.policy_domain, self.p, self.sp,
                self.np, self.pct, self.adkim, self.aspf, self.fo, ",".join(self.rua))


class ReportStore:
    """The SQLite table of :class:`ReportRow`, written on a thread of its own.

    :param clock: ``time.time`` by default; retention is measured against it.
    """

    def __init__(self, path: Path, *, retention_days: int, max_rows: int,
                 clock: Callable[[], float] = time.time) -> None:
        if retention_days < 1 or max_rows < 1:
            raise ValueError("retention_days and max_rows must be at least 1")
        self.path = path
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.clock = clock
        self.dropped = 0
        self._pending = 0
        self._queued: list[ReportRow] = []
        self._writing = False           # a batch is being written
        self._urgent = False            # drain() waits: write what is queued at once
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None
        self._warned_at = -_WARN_EVERY_SECONDS
        self._conn: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------ on the event loop

    async def open(self) -> None:
        """Create or open the database (and its folder), then prune it.

        :raises ReportStoreError: naming the file and what to do.
        """
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dmarc-reports")
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def add(self, row: ReportRow) -> bool:
        """Store ``row``; ``False`` when it was dropped or could not be written (logged).

        Never raises: report data must not decide the fate of a message.
        """
        if self._executor is None:
            return False
        if self._pending >= MAX_PENDING:
            self.dropped += 1
            self._warn("%d report rows are waiting for the disk; dropping rows (%d so far)",
                       self._pending, self.dropped)
            return False
        self._pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._insert, row)
        future.add_done_callback(self._written)
        try:
            # shielded: a write that outlives the wait still happens
            await asyncio.wait_for(asyncio.shield(future), WRITE_TIMEOUT_SECONDS)
        except TimeoutError:
            self._warn("a report row took more than %gs to write to %s",
                       WRITE_TIMEOUT_SECONDS, self.path)
            return False
        except (sqlite3.Error, OSError) as e:
            self._warn("cannot write a report row to %s: %s", self.path, e)
            return False
        return True

    def submit(self, row: ReportRow) -> None:
        """Hand ``row`` over to be written with the next batch; never waits, never raises.

        Rows are gathered for :data:`FLUSH_DELAY_SECONDS` (or until
        :data:`BATCH_ROWS` wait) and written in one transaction: a transaction
        per message would cost the event loop a thread hand-over per message.
        """
        if self._executor is None:
            return
        if self._pending + len(self._queued) >= MAX_PENDING:
            self.dropped += 1
            self._warn("%d report rows are waiting for the disk; dropping rows (%d so far)",
                       self._pending + len(self._queued), self.dropped)
            return
        self._queued.append(row)
        if self._writing:
            return                      # written when the batch under way is done
        if len(self._queued) >= BATCH_ROWS:
            self._flush()
        elif self._timer is None:
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            self._timer = asyncio.get_running_loop().call_later(FLUSH_DELAY_SECONDS,
                                                                self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._queued = self._queued, []
        if not rows or self._executor is None:
            self._writing = False
            if self._drained is not None:
                self._drained.set()
            return
        self._writing = True
        self._pending += len(rows)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._insert_many,
                                                            rows)
        future.add_done_callback(lambda f: self._batch_written(f, len(rows)))

    def _batch_written(self, future: asyncio.Future[None], n: int) -> None:
        self._pending -= n
        self._writing = False
        if not future.cancelled() and future.exception() is not None:
            self._warn("cannot write %d report rows to %s: %s", n, self.path,
                       future.exception())
        if self._urgent or len(self._queued) >= BATCH_ROWS or not self._queued:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_DELAY_SECONDS,
                                                                self._flush)

    async def drain(self) -> None:
        """Write every row handed to :meth:`submit` so far now, and wait until it is
        written (or failed)."""
        if self._drained is None or self._drained.is_set():
            return
        self._urgent = True
        try:
            if not self._writing:
                self._flush()
            await self._drained.wait()
        finally:
            self._urgent = False

    async def prune(self) -> int:
        """Delete rows older than ``retention_days`` and beyond ``max_rows``; how many."""
        if self._executor is None:
            return 0
        return await self._run(self._prune)

    async def close(self) -> None:
        """Finish the writes under way, then close the database."""
        if self._executor is None:
            return
        await self.drain()
        executor, self._executor = self._executor, None
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
        finally:
            executor.shutdown(wait=False)

    async def _run(self, function: Callable[[], Any]) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def _written(self, future: asyncio.Future[None]) -> None:
        self._pending -= 1
        if not future.cancelled() and future.exception() is not None:
            future.exception()  # retrieved: add() reported it, or it outlived its wait

    def _warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning("dmarc: " + message, *args)

    # ------------------------------------------------------------ on the store's thread

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS)
        except (OSError, sqlite3.Error) as e:
            raise ReportStoreError(f"cannot open the DMARC report database {self.path}: {e}; "
                                   "make its folder writable by the server, set "
                                   "[plugins.dmarc.reports] path elsewhere, or set "
                                   "enabled = false there") from None
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ReportStoreError(
                    f"{self.path} was written by a newer elemta-dmarc (schema {version}, this "
                    f"one knows {SCHEMA_VERSION}); upgrade the plugin or use another path")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            conn.close()
            raise ReportStoreError(f"{self.path} is not a usable DMARC report database ({e}); "
                                   "move it away and a new one is created") from None
        except ReportStoreError:
            conn.close()
            raise
        self._conn = conn
        self._prune()

    def _insert(self, row: ReportRow) -> None:
        assert self._conn is not None
        with self._conn:
            rowid = self._conn.execute(_INSERT, row.values()).lastrowid
            # ids only grow and only the oldest rows are deleted, so the newest
            # max_rows rows are those above this id: an index range, not a count
            if rowid is not None and rowid > self.max_rows:
                self._conn.execute("DELETE FROM messages WHERE id <= ?",
                                   (rowid - self.max_rows,))

    def _insert_many(self, rows: list[ReportRow]) -> None:
        """A batch in one transaction; the table then keeps its newest ``max_rows``."""
        assert self._conn is not None
        with self._conn:
            self._conn.executemany(_INSERT, [r.values() for r in rows])
            top = self._conn.execute("SELECT max(id) FROM messages").fetchone()[0]
            if top is not None and top > self.max_rows:
                self._conn.execute("DELETE FROM messages WHERE id <= ?",
                                   (top - self.max_rows,))

    def _prune(self) -> int:
        assert self._conn is not None
        cutoff = self.clock() - self.retention_days * 86400
        with self._conn:
            old = self._conn.execute("DELETE FROM messages WHERE received_at < ?",
                                     (cutoff,)).rowcount
            top = self._conn.execute("SELECT max(id) FROM messages").fetchone()[0]
            over = 0
            if top is not None and top > self.max_rows:
                over = self._conn.execute("DELETE FROM messages WHERE id <= ?",
                                          (top - self.max_rows,)).rowcount
        return old + over

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a report database, oldest first, as dicts (``dkim`` decoded).

    Blocking: call it from a thread (``asyncio.to_thread``) on a running server.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()
    out = []
    for row in rows:
        item = dict(row)
        item["dkim"] = json.loads(item["dkim"])
        item["rua"] = [u for u in item["rua"].split(",") if u]
        out.append(item)
    return out
