"""The embedded state store: SQLite, one thread, one transaction per operation.

Three tables: ``kv`` (values and counters with an expiry), ``rates`` (one
GCRA time per key) and ``leases`` (holders of a key's leases, each with an
expiry). Every operation runs in a ``BEGIN IMMEDIATE`` transaction on the
store's own thread, so concurrent callers, in this process or in a command
line next to it, see each other's changes in order. WAL mode with
``synchronous=NORMAL``: a power failure may lose the last moments of policy
state (a counter, a greylist entry), never the database; mail is never at
stake here. Expired rows are deleted once a minute.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from . import StateEntry, Rate, StateUnavailable, gcra

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
    "expires REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rates (key TEXT PRIMARY KEY, tat REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases (key TEXT NOT NULL, holder TEXT NOT NULL, "
    "expires REAL NOT NULL, PRIMARY KEY (key, holder))",
    "CREATE INDEX IF NOT EXISTS kv_expires ON kv(expires)",
)
PRUNE_SECONDS = 60.0


class EmbeddedStore:
    """:class:`~elemta.state.StateStore` on an SQLite file."""

    def __init__(self, path: Path, prefix: str = "elemta:",
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.prefix = prefix
        self._clock = clock
        self._pool: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._pruned = 0.0

    # ---------------------------------------------------------------- plumbing

    async def open(self) -> None:
        await self._run(lambda db: None)

    async def close(self) -> None:
        if self._pool is None:
            return

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)
        self._pool = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # made 0600 before SQLite opens it: its -wal and -shm files take the database
            # file's mode when they are created
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            for statement in SCHEMA:
                db.execute(statement)
            for suffix in ("", "-wal", "-shm"):  # a database made before this was
                try:
                    os.chmod(f"{self.path}{suffix}", 0o600)
                except OSError:
                    pass
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """``fn(db)`` in one immediate transaction on the store's thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="elemta-state")

        def transaction() -> Any:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                now = self._clock()
                if now - self._pruned >= PRUNE_SECONDS:
                    self._pruned = now
                    db.execute("DELETE FROM kv WHERE expires <= ?", (now,))
                    db.execute("DELETE FROM leases WHERE expires <= ?", (now,))
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, transaction)
        except (sqlite3.Error, OSError) as e:
            raise StateUnavailable(f"state database {self.path}: {e}") from None

    def _key(self, key: str) -> str:
        return self.prefix + key

    # ---------------------------------------------------------------- operations

    async def rate(self, key: str, limit: int, period: float, cost: int = 1) -> Rate:
        return (await self.rates([(key, limit, period)], cost))[0]

    async def rates(self, items: Sequence[tuple[str, int, float]], cost: int = 1) -> list[Rate]:
        keyed = [(self._key(key), limit, period) for key, limit, period in items]

        def run(db: sqlite3.Connection) -> list[Rate]:
            now = self._clock()
            answers, writes = [], []
            for k, limit, period in keyed:
                row = db.execute("SELECT tat FROM rates WHERE key = ?", (k,)).fetchone()
                allowed, new, remaining, retry = gcra(row[0] if row else None, now, limit,
                                                      period, cost)
                answers.append(Rate(allowed, remaining, retry))
                writes.append((k, new))
            if all(a.allowed for a in answers):
                for k, new in writes:
                    if new is None:
                        continue
                    if new <= now:
                        db.execute("DELETE FROM rates WHERE key = ?", (k,))
                    else:
                        db.execute("INSERT INTO rates (key, tat) VALUES (?, ?) ON CONFLICT "
                                   "(key) DO UPDATE SET tat = excluded.tat", (k, new))
            return answers

        return await self._run(run)

    async def acquire(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        k = self._key(key)

        def run(db: sqlite3.Connection) -> bool:
            now = self._clock()
            db.execute("DELETE FROM leases WHERE key = ? AND expires <= ?", (k, now))
            held = db.execute("SELECT 1 FROM leases WHERE key = ? AND holder = ?",
                              (k, holder)).fetchone()
            if held is None:
                count = db.execute("SELECT COUNT(*) FROM leases WHERE key = ?",
                                   (k,)).fetchone()[0]
                if count >= limit:
                    return False
            db.execute("INSERT INTO leases (key, holder, expires) VALUES (?, ?, ?) "
                       "ON CONFLICT (key, holder) DO UPDATE SET expires = excluded.expires",
                       (k, holder, now + ttl))
            return True

        return await self._run(run)

    async def release(self, key: str, holder: str) -> None:
        k = self._key(key)
        await self._run(lambda db: db.execute(
            "DELETE FROM leases WHERE key = ? AND holder = ?", (k, holder)))

    async def get(self, key: str) -> str | None:
        k = self._key(key)

        def run(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT value FROM kv WHERE key = ? AND expires > ?",
                             (k, self._clock())).fetchone()
            return None if row is None else row[0]

        return await self._run(run)

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        keyed = [self._key(k) for k in keys]

        def run(db: sqlite3.Connection) -> list[str | None]:
            now = self._clock()
            out = []
            for k in keyed:
                row = db.execute("SELECT value FROM kv WHERE key = ? AND expires > ?",
                                 (k, now)).fetchone()
                out.append(None if row is None else row[0])
            return out

        return await self._run(run)

    async def put(self, key: str, value: str, ttl: float) -> None:
        k = self._key(key)
        await self._run(lambda db: db.execute(
            "INSERT INTO kv (key, value, expires) VALUES (?, ?, ?) ON CONFLICT (key) "
            "DO UPDATE SET value = excluded.value, expires = excluded.expires",
            (k, value, self._clock() + ttl)))

    async def add(self, key: str, value: str, ttl: float) -> bool:
        k = self._key(key)

        def run(db: sqlite3.Connection) -> bool:
            now = self._clock()
            db.execute("DELETE FROM kv WHERE key = ? AND expires <= ?", (k, now))
            cur = db.execute("INSERT INTO kv (key, value, expires) VALUES (?, ?, ?) "
                             "ON CONFLICT (key) DO NOTHING", (k, value, now + ttl))
            return cur.rowcount == 1

        return await self._run(run)

    async def incr(self, key: str, ttl: float, by: int = 1) -> int:
        k = self._key(key)

        def run(db: sqlite3.Connection) -> int:
            now = self._clock()
            db.execute("DELETE FROM kv WHERE key = ? AND expires <= ?", (k, now))
            row = db.execute(
                "INSERT INTO kv (key, value, expires) VALUES (?, ?, ?) ON CONFLICT (key) "
                "DO UPDATE SET value = CAST(CAST(kv.value AS INTEGER) + ? AS TEXT), "
                "expires = excluded.expires RETURNING value",
                (k, str(by), now + ttl, by)).fetchone()
            return int(row[0])

        return await self._run(run)

    async def delete(self, key: str) -> bool:
        k = self._key(key)

        def run(db: sqlite3.Connection) -> bool:
            n = db.execute("DELETE FROM kv WHERE key = ?", (k,)).rowcount
            n += db.execute("DELETE FROM rates WHERE key = ?", (k,)).rowcount
            n += db.execute("DELETE FROM leases WHERE key = ?", (k,)).rowcount
            return n > 0

        return await self._run(run)

    async def scan(self, prefix: str, limit: int = 1000) -> list[StateEntry]:
        low, high = self._range(prefix)
        cut = len(self.prefix)

        def run(db: sqlite3.Connection) -> list[StateEntry]:
            now = self._clock()
            rows = db.execute("SELECT key, value, expires FROM kv WHERE key >= ? AND key < ? "
                              "AND expires > ? ORDER BY key LIMIT ?",
                              (low, high, now, limit)).fetchall()
            out = [StateEntry(k[cut:], v, e - now) for k, v, e in rows]
            if len(out) < limit:      # a rate: its GCRA time, until it is idle again
                rates = db.execute("SELECT key, tat FROM rates WHERE key >= ? AND key < ? "
                                   "AND tat > ? ORDER BY key LIMIT ?",
                                   (low, high, now, limit - len(out))).fetchall()
                out += [StateEntry(k[cut:], f"{t:.6f}", t - now) for k, t in rates]
            if len(out) < limit:      # leases: how many are held
                leases = db.execute("SELECT key, COUNT(*) FROM leases WHERE key >= ? AND key < ? "
                                    "AND expires > ? GROUP BY key ORDER BY key LIMIT ?",
                                    (low, high, now, limit - len(out))).fetchall()
                out += [StateEntry(k[cut:], str(n), None) for k, n in leases]
            return sorted(out, key=lambda e: e.key)

        return await self._run(run)

    async def clear(self, prefix: str) -> int:
        low, high = self._range(prefix)

        def run(db: sqlite3.Connection) -> int:
            """How many keys went: a key's leases count once, as in Redis."""
            leases = db.execute("SELECT COUNT(DISTINCT key) FROM leases WHERE key >= ? "
                                "AND key < ?", (low, high)).fetchone()[0]
            db.execute("DELETE FROM leases WHERE key >= ? AND key < ?", (low, high))
            return leases + sum(db.execute(f"DELETE FROM {t} WHERE key >= ? AND key < ?",
                                           (low, high)).rowcount for t in ("kv", "rates"))

        return await self._run(run)

    def _range(self, prefix: str) -> tuple[str, str]:
        low = self._key(prefix)
        return low, low + "\U0010ffff"
