"""The SQLite store: one file in WAL mode, one writer thread, a few reader threads.

Writes go to a single dedicated thread with its own connection. It takes every
write waiting (up to ``GROUP``), runs each in its own savepoint and commits them
together: one ``fsync`` for the group (``synchronous = FULL``: a commit is on
disk when it returns, power loss included). A write that fails rolls back its
savepoint only, and only its caller hears of it. Reads run on a small pool of
threads, each with its own connection; WAL lets them read while the writer
writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .api import Page, StoredEnvelope, StoredMessage, StoreError, Summary
from .message import Incoming, parse
from .query import fts_query, like_pattern
from .settings import StoreSettings

log = logging.getLogger("elemta.store")

GROUP = 64
READERS = 2
# checkpoints: at most every CHECKPOINT_SECONDS, in their own thread; past WAL_LIMIT_PAGES
# (64 MiB of 4 KiB pages) the writer waits for one to finish, so the WAL stays bounded
CHECKPOINT_SECONDS = 0.2
WAL_LIMIT_PAGES = 16384

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id TEXT NOT NULL UNIQUE,
    received REAL NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,           -- JSON list, in RCPT order
    subject TEXT NOT NULL,
    from_header TEXT NOT NULL,
    to_header TEXT NOT NULL,
    size INTEGER NOT NULL,
    has_attachments INTEGER NOT NULL,
    snippet TEXT NOT NULL,
    headers TEXT NOT NULL,              -- JSON [[name, value], ...]
    envelope TEXT NOT NULL              -- JSON: mail_params, helo, peer, auth
);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received);
CREATE TABLE IF NOT EXISTS recipients (
    message_id INTEGER NOT NULL,
    position INTEGER NOT NULL,
    address TEXT NOT NULL,
    original TEXT,
    params TEXT NOT NULL,               -- JSON: the RCPT TO ESMTP parameters
    PRIMARY KEY (message_id, address)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_address ON recipients (address);
CREATE TABLE IF NOT EXISTS contents (
    id INTEGER PRIMARY KEY,
    raw BLOB NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5 (
    sender, recipients, subject, body, tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TABLE IF NOT EXISTS totals (
    k INTEGER PRIMARY KEY CHECK (k = 0),
    messages INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
"""

SUMMARY = ("m.id, m.received, m.sender, m.recipients, m.subject, m.from_header, m.to_header, "
           "m.size, m.has_attachments, m.snippet")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _ts(dt: datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _summary(row: tuple[Any, ...]) -> Summary:
    return Summary(row[0], _utc(row[1]), row[2], json.loads(row[3]), row[4], row[5], row[6],
                   row[7], bool(row[8]), row[9])


def connect(path: Path, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    return conn


class SQLiteBackend:
    def __init__(self, settings: StoreSettings, path: Path) -> None:
        self.settings = settings
        self.path = path
        self._jobs: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]
                                      | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        self._readers: ThreadPoolExecutor | None = None
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.pruned = 0          # messages pruned since start (for metrics)
        self.pruned_bytes = 0
        self._checkpointer: threading.Thread | None = None
        self._commits = threading.Event()
        self._stopping = threading.Event()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._create)
        self._writer = threading.Thread(target=self._write_loop, name="elemta-store-writer",
                                        daemon=True)
        self._writer.start()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                              name="elemta-store-checkpoint", daemon=True)
        self._checkpointer.start()
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="elemta-store-read")

    def _create(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # the file, and so the -wal and -shm files SQLite makes like it, 0600
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = connect(self.path, self.settings.timeout_seconds)
            try:
                conn.executescript(SCHEMA)
            finally:
                conn.close()
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the message store {self.path}: {e} (check that "
                             "[plugins.store] path is a writable file)") from e

    async def close(self) -> None:
        if self._writer is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._checkpointer is not None:
            self._stopping.set()
            self._commits.set()
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    # -- threads -------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            conn = connect(self.path, self.settings.timeout_seconds)
        except sqlite3.Error as e:
            log.error("store: cannot open %s for writing: %s", self.path, e)
            self._fail_waiting(StoreError(f"cannot open the message store {self.path}: {e}"))
            return
        # the checkpoint thread copies the WAL into the database; done here, a commit
        # now and then would also wait for that copy and its fsync
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                group = [job]
                stop = False
                while len(group) < GROUP:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    group.append(more)
                self._run_group(conn, group)
                if stop:
                    return
        finally:
            conn.close()

    def _run_group(self, conn: sqlite3.Connection,
                   group: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]]) -> None:
        # a caller that gave up (a delivery's timeout) before its write started is skipped;
        # a started write can no longer be cancelled, so every future below gets a result
        group = [(fn, fut) for fn, fut in group if fut.set_running_or_notify_cancel()]
        if not group:
            return
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in group:
                conn.execute("SAVEPOINT job")
                try:
                    value = fn(conn)
                except Exception as e:  # noqa: BLE001 - handed to its caller
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((fut, None, e))
                else:
                    conn.execute("RELEASE job")
                    results.append((fut, value, None))
            conn.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001 - every caller hears of it
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            error = StoreError(f"message store {self.path}: {e}")
            log.warning("store: a write to %s failed and was rolled back: %s", self.path, e)
            for _, fut in group:
                fut.set_exception(error)
            return
        self._commits.set()
        for fut, value, err in results:
            if err is None:
                fut.set_result(value)
            elif isinstance(err, (sqlite3.Error, OSError)):
                fut.set_exception(StoreError(f"message store {self.path}: {err}"))
            else:
                fut.set_exception(err)

    def _fail_waiting(self, error: StoreError) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and job[1].set_running_or_notify_cancel():
                job[1].set_exception(error)

    def _checkpoint_loop(self) -> None:
        """Copy committed WAL pages into the database while the writer goes on (PASSIVE);
        a WAL beyond ``WAL_LIMIT_PAGES`` is checkpointed with RESTART, which makes the
        writer wait, so that it starts again from the beginning of the file."""
        conn = connect(self.path, self.settings.timeout_seconds)
        try:
            while True:
                self._commits.wait()
                if self._stopping.is_set():
                    return
                self._commits.clear()
                try:
                    _, frames, copied = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames > WAL_LIMIT_PAGES and copied < frames:
                        conn.execute("PRAGMA wal_checkpoint(RESTART)")
                except sqlite3.Error as e:
                    log.warning("store: checkpoint of %s failed (tried again after the next "
                                "commit): %s", self.path, e)
                if self._stopping.wait(CHECKPOINT_SECONDS):
                    return
        finally:
            conn.close()

    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._writer is None:
            raise StoreError("the message store is closed")
        if not self._writer.is_alive():
            raise StoreError(f"the writer of the message store {self.path} has stopped; "
                             "see the log, and restart the server")
        fut: Future[Any] = Future()
        self._jobs.put((fn, fut))
        return await asyncio.wrap_future(fut)

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.settings.timeout_seconds)
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._readers is None:
            raise StoreError("the message store is closed")

        def run() -> Any:
            conn = self._reader()
            try:
                conn.execute("BEGIN")
                try:
                    return fn(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"message store {self.path}: {e}") from e

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    # -- writes --------------------------------------------------------------

    async def put(self, item: Incoming) -> tuple[int, bool, list[int]]:
        return await self._write(lambda conn: self._put(conn, item))

    def _put(self, conn: sqlite3.Connection,
             item: Incoming) -> tuple[int, bool, list[int]]:
        incoming = load(item)
        row = conn.execute("SELECT id, recipients FROM messages WHERE queue_id = ?",
                           (incoming.queue_id,)).fetchone()
        if row is not None:
            # a repeated delivery: add the recipients not stored yet, keep one copy
            id, stored = row[0], json.loads(row[1])
            added = [r for r in incoming.recipients if r[0] not in stored]
            if added:
                for n, (address, params, original) in enumerate(added, len(stored)):
                    conn.execute("INSERT OR IGNORE INTO recipients VALUES (?, ?, ?, ?, ?)",
                                 (id, n, address, original, json.dumps(params)))
                stored += [r[0] for r in added]
                conn.execute("UPDATE messages SET recipients = ? WHERE id = ?",
                             (json.dumps(stored), id))
                conn.execute("UPDATE search SET recipients = ? WHERE rowid = ?",
                             (" ".join(stored), id))
            return id, False, []
        p = parse(incoming.raw, self.settings.index_bytes)
        addresses = [r[0] for r in incoming.recipients]
        envelope = {"mail_params": incoming.mail_params, "helo": incoming.helo,
                    "peer": incoming.peer, "auth": incoming.auth}
        cur = conn.execute(
            "INSERT INTO messages (queue_id, received, sender, recipients, subject, from_header,"
            " to_header, size, has_attachments, snippet, headers, envelope)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (incoming.queue_id, _ts(incoming.received), incoming.sender, json.dumps(addresses),
             p.subject, p.from_header, p.to_header, len(incoming.raw), int(p.has_attachments),
             p.snippet, json.dumps(p.headers), json.dumps(envelope)))
        id = cur.lastrowid
        assert id is not None
        conn.executemany("INSERT OR IGNORE INTO recipients VALUES (?, ?, ?, ?, ?)",
                         [(id, n, a, original, json.dumps(params))
                          for n, (a, params, original) in enumerate(incoming.recipients)])
        conn.execute("INSERT INTO contents VALUES (?, ?)", (id, incoming.raw))
        conn.execute("INSERT INTO search (rowid, sender, recipients, subject, body)"
                     " VALUES (?, ?, ?, ?, ?)",
                     (id, incoming.sender, " ".join(addresses), p.subject, p.body))
        conn.execute("UPDATE totals SET messages = messages + 1, bytes = bytes + ? WHERE k = 0",
                     (len(incoming.raw),))
        return id, True, self._prune(conn, id)

    def _prune(self, conn: sqlite3.Connection, newest: int) -> list[int]:
        """Delete the oldest messages beyond the bounds; the newest one always stays."""
        max_messages, max_bytes = self.settings.max_messages, self.settings.max_bytes
        if not max_messages and not max_bytes:
            return []
        count, total = conn.execute("SELECT messages, bytes FROM totals WHERE k = 0").fetchone()
        doomed: list[int] = []
        if max_messages and count > max_messages:
            doomed = [r[0] for r in conn.execute(
                "SELECT id FROM messages WHERE id < ? ORDER BY id LIMIT ?",
                (newest, count - max_messages))]
        if max_bytes:
            freed = sum(r[0] for r in conn.execute(
                "SELECT size FROM messages WHERE id IN (%s)" % ",".join("?" * len(doomed)),
                doomed)) if doomed else 0
            if total - freed > max_bytes:
                after = doomed[-1] if doomed else 0
                for id, size in conn.execute(
                        "SELECT id, size FROM messages WHERE id > ? AND id < ? ORDER BY id",
                        (after, newest)):
                    doomed.append(id)
                    freed += size
                    if total - freed <= max_bytes:
                        break
        if doomed:
            n, size = self._delete_ids(conn, doomed)
            self.pruned += n
            self.pruned_bytes += size
        return doomed

    @staticmethod
    def _delete_ids(conn: sqlite3.Connection, ids: list[int]) -> tuple[int, int]:
        n = size = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            got = conn.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM messages"
                               f" WHERE id IN ({marks})", chunk).fetchone()
            n, size = n + got[0], size + got[1]
            for sql in (f"DELETE FROM messages WHERE id IN ({marks})",
                        f"DELETE FROM recipients WHERE message_id IN ({marks})",
                        f"DELETE FROM contents WHERE id IN ({marks})",
                        f"DELETE FROM search WHERE rowid IN ({marks})"):
                conn.execute(sql, chunk)
        conn.execute("UPDATE totals SET messages = messages - ?, bytes = bytes - ? WHERE k = 0",
                     (n, size))
        return n, size

    async def delete(self, id: int) -> bool:
        n, _ = await self._write(lambda conn: self._delete_ids(conn, [id]))
        return bool(n)

    async def clear(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            n = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            for table in ("messages", "recipients", "contents", "search"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("UPDATE totals SET messages = 0, bytes = 0 WHERE k = 0")
            return int(n)
        return await self._write(run)

    # -- reads ---------------------------------------------------------------

    async def count(self) -> int:
        return await self._read(
            lambda conn: conn.execute("SELECT messages FROM totals WHERE k = 0").fetchone()[0])

    async def search(self, text: str | None, to: str | None, sender: str | None,
                     since: datetime | None, before: datetime | None,
                     offset: int, limit: int) -> Page:
        where: list[str] = []
        args: list[Any] = []
        if text:
            query = fts_query(text)
            if query:
                where.append("m.id IN (SELECT rowid FROM search WHERE search MATCH ?)")
                args.append(query)
        if to:
            where.append("EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                         " AND r.address LIKE ? ESCAPE '\\')")
            args.append(like_pattern(to))
        if sender:
            where.append("m.sender LIKE ? ESCAPE '\\'")
            args.append(like_pattern(sender))
        if since is not None:
            where.append("m.received >= ?")
            args.append(_ts(since))
        if before is not None:
            where.append("m.received < ?")
            args.append(_ts(before))
        clause = (" WHERE " + " AND ".join(where)) if where else ""

        def run(conn: sqlite3.Connection) -> Page:
            if where:
                total = conn.execute(f"SELECT count(*) FROM messages m{clause}",
                                     args).fetchone()[0]
            else:
                total = conn.execute("SELECT messages FROM totals WHERE k = 0").fetchone()[0]
            rows = conn.execute(f"SELECT {SUMMARY} FROM messages m{clause}"
                                " ORDER BY m.id DESC LIMIT ? OFFSET ?",
                                [*args, limit, offset]).fetchall()
            return Page(int(total), [_summary(r) for r in rows])

        try:
            return await self._read(run)
        except StoreError as e:
            if text and "fts5" in str(e).lower():
                raise ValueError(f"cannot search for {text!r}: {e}") from None
            raise

    async def get(self, id: int) -> StoredMessage | None:
        def run(conn: sqlite3.Connection) -> StoredMessage | None:
            row = conn.execute(f"SELECT {SUMMARY}, m.headers, m.envelope, m.queue_id"
                               " FROM messages m WHERE m.id = ?", (id,)).fetchone()
            if row is None:
                return None
            rcpts = conn.execute("SELECT address, params FROM recipients WHERE message_id = ?"
                                 " ORDER BY position", (id,)).fetchall()
            s = _summary(row)
            env = json.loads(row[11])
            envelope = StoredEnvelope(row[12], s.sender, s.recipients, env.get("mail_params", {}),
                                      {a: json.loads(p) for a, p in rcpts}, env.get("helo"),
                                      env.get("peer"), env.get("auth"))
            return StoredMessage(s.id, s.received, s.sender, s.recipients, s.subject,
                                 s.from_header, s.to_header, s.size, s.has_attachments,
                                 s.snippet, [tuple(h) for h in json.loads(row[10])], envelope)
        return await self._read(run)

    async def raw(self, id: int) -> bytes | None:
        def run(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT raw FROM contents WHERE id = ?", (id,)).fetchone()
            return None if row is None else bytes(row[0])
        return await self._read(run)


def load(incoming: Incoming) -> Incoming:
    """Read the raw bytes of a message still in its spool file (in the store's thread)."""
    if incoming.content_path is not None:
        with open(incoming.content_path, "rb") as f:
            incoming.raw = f.read()
        incoming.content_path = None
    return incoming

