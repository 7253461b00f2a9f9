"""SQLite (embedded, the default) and PostgreSQL (psycopg 3, async) backends.

Both use the same tables, created and migrated on first start: the
``elemta_schema`` table holds the version and every migration runs once, in
order, in one transaction. SQLite runs on one dedicated thread (the event loop
never waits on disk); PostgreSQL answers lookups from an async psycopg
connection pool, and the editing commands (cold, run by the CLI) on a plain
connection in a worker thread. A database
that cannot be reached raises :class:`BackendUnavailable`, which the ``rcpt``
stage answers with ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from elemta import DkimKey

from .directory import (DOMAIN_LIMITS, USER_FIELDS, BackendUnavailable, DirectoryError, Domain,
                        Lookup, Rule, User)

log = logging.getLogger("elemta.datasource")

# (version, statements). Append only: never edit a migration that shipped.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE domains (
               name TEXT PRIMARY KEY,
               reject_unknown BOOLEAN NOT NULL DEFAULT TRUE,
               catch_all TEXT,
               max_message_bytes BIGINT)""",
        """CREATE TABLE mailboxes (
               address TEXT PRIMARY KEY,
               domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE)""",
        "CREATE INDEX mailboxes_domain ON mailboxes(domain)",
        """CREATE TABLE aliases (
               address TEXT NOT NULL,
               target TEXT NOT NULL,
               domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
               PRIMARY KEY (address, target))""",
        "CREATE INDEX aliases_domain ON aliases(domain)",
        """CREATE TABLE rules (
               pattern TEXT PRIMARY KEY,
               action TEXT NOT NULL CHECK (action IN ('forward','redirect','reject','quarantine')),
               targets TEXT NOT NULL DEFAULT '',
               code INTEGER,
               enhanced TEXT,
               text TEXT)""",
    )),
    (2, (
        # who logs in: hashes (NULL password: checked elsewhere, LDAP or Dovecot), limits
        """CREATE TABLE users (
               address TEXT PRIMARY KEY,
               password TEXT,
               scram TEXT,
               disabled BOOLEAN NOT NULL DEFAULT FALSE,
               max_message_bytes BIGINT,
               daily_quota INTEGER)""",
        """CREATE TABLE user_senders (
               login TEXT NOT NULL REFERENCES users(address) ON DELETE CASCADE,
               pattern TEXT NOT NULL,
               PRIMARY KEY (login, pattern))""",
        """CREATE TABLE user_sent (
               login TEXT NOT NULL,
               day TEXT NOT NULL,
               count INTEGER NOT NULL,
               PRIMARY KEY (login, day))""",
        "CREATE INDEX aliases_target ON aliases(target)",
    )),
    (3, (
        # limits of mail sent from a domain or by a user, for a rate limiter (rate_limits);
        # NULL: the limiter's configuration applies, 0: no limit
        "ALTER TABLE domains ADD COLUMN messages_per_hour INTEGER",
        "ALTER TABLE domains ADD COLUMN messages_per_day INTEGER",
        "ALTER TABLE users ADD COLUMN messages_per_hour INTEGER",
    )),
    (4, (
        # DKIM signing keys of hosted domains (the dkim_keys hook): the private key is
        # stored here (PEM) or in a 0600 file named here; validity in UTC epoch seconds
        """CREATE TABLE dkim_keys (
               domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
               selector TEXT NOT NULL,
               algorithm TEXT NOT NULL CHECK (algorithm IN ('rsa','ed25519')),
               private_key TEXT,
               key_file TEXT,
               not_before DOUBLE PRECISION,
               not_after DOUBLE PRECISION,
               PRIMARY KEY (domain, selector),
               CHECK ((private_key IS NULL) <> (key_file IS NULL)))""",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_LOOKUP_SQL = (
    "SELECT name, reject_unknown, catch_all, max_message_bytes, messages_per_hour, "
    "messages_per_day FROM domains WHERE name = ?",
    "SELECT 1 FROM mailboxes WHERE address = ?",
    "SELECT address, target FROM aliases WHERE address IN (?, ?) ORDER BY target",
    "SELECT pattern, action, targets, code, enhanced, text FROM rules WHERE pattern IN (?, ?, ?)",
)


_DKIM_SQL = ("SELECT domain, selector, algorithm, private_key, key_file, not_before, not_after "
             "FROM dkim_keys WHERE domain = ? ORDER BY selector")
_DKIM_ALL_SQL = ("SELECT domain, selector, algorithm, private_key, key_file, not_before, "
                 "not_after FROM dkim_keys ORDER BY domain, selector")


def _dkim(row: Sequence[Any]) -> DkimKey:
    return DkimKey(row[0], row[1], row[2], row[3], row[4],
                   None if row[5] is None else float(row[5]),
                   None if row[6] is None else float(row[6]))


_USER_SQL = ("SELECT address, password, scram, disabled, max_message_bytes, daily_quota, "
             "messages_per_hour FROM users WHERE address = ?")
_SENDERS_SQL = "SELECT pattern FROM user_senders WHERE login = ? ORDER BY pattern"
_ALIASES_TO_SQL = "SELECT DISTINCT address FROM aliases WHERE target = ? ORDER BY address"
_SENT_SQL = "SELECT count FROM user_sent WHERE login = ? AND day = ?"
_PRUNE_SENT_SQL = "DELETE FROM user_sent WHERE day < ?"
_ADD_SENT_SQL = ("INSERT INTO user_sent (login, day, count) VALUES (?, ?, 1) "
                 "ON CONFLICT (login, day) DO UPDATE SET count = user_sent.count + 1 "
                 "RETURNING count")


def _user(row: Sequence[Any] | None, senders: Sequence[Sequence[Any]]) -> User | None:
    if row is None:
        return None
    return User(row[0], row[1], row[2], bool(row[3]), row[4], row[5],
                tuple(r[0] for r in senders), row[6])


def _domain(row: Sequence[Any] | None) -> Domain | None:
    if row is None:
        return None
    return Domain(row[0], bool(row[1]), row[2], row[3], row[4], row[5])


def _rule(row: Sequence[Any]) -> Rule:
    targets = tuple(t for t in row[2].split(",") if t)
    return Rule(row[0], row[1], targets, row[3], row[4], row[5])


def _lookup_from(domain_row, mailbox_row, alias_rows, rule_rows, address: str, base: str,
                 domain: str) -> Lookup:
    d = _domain(domain_row)
    if d is None:
        return Lookup(None)
    exact = tuple(t for a, t in alias_rows if a == address)
    aliases = exact or tuple(t for a, t in alias_rows if a == base)
    by_pattern = {r[0]: _rule(r) for r in rule_rows}
    rules = tuple(by_pattern[p] for p in dict.fromkeys((address, base, domain)) if p in by_pattern)
    return Lookup(d, mailbox_row is not None, aliases, rules)


class SQLBackend:
    """The queries, written once with ``?`` placeholders."""

    placeholder = "?"

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    # subclasses: run one function in a transaction
    async def _tx(self, fn: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    # -------------------------------------------------------------- lookups

    async def lookup(self, address: str, base: str, domain: str) -> Lookup:
        q = [self.sql(s) for s in _LOOKUP_SQL]

        def run(cur: Any) -> Lookup:
            cur.execute(q[0], (domain,))
            domain_row = cur.fetchone()
            if domain_row is None:
                return Lookup(None)
            cur.execute(q[1], (base,))
            mailbox = cur.fetchone()
            cur.execute(q[2], (address, base))
            aliases = cur.fetchall()
            cur.execute(q[3], (address, base, domain))
            rules = cur.fetchall()
            return _lookup_from(domain_row, mailbox, aliases, rules, address, base, domain)

        return await self._tx(run)

    async def get_domain(self, name: str) -> Domain | None:
        q = self.sql(_LOOKUP_SQL[0])

        def run(cur: Any) -> Domain | None:
            cur.execute(q, (name,))
            return _domain(cur.fetchone())

        return await self._tx(run)

    # -------------------------------------------------------------- editing

    async def add_domain(self, domain: Domain, *, replace: bool = False) -> None:
        def run(cur: Any) -> None:
            cur.execute(self.sql("SELECT 1 FROM domains WHERE name = ?"), (domain.name,))
            if cur.fetchone() is not None:
                if not replace:
                    raise DirectoryError(f"domain {domain.name} exists already "
                                         "(use --update to change its settings)")
                cur.execute(self.sql("UPDATE domains SET reject_unknown = ?, catch_all = ?, "
                                     "max_message_bytes = ? WHERE name = ?"),
                            (domain.reject_unknown, domain.catch_all, domain.max_message_bytes,
                             domain.name))
                return
            cur.execute(self.sql("INSERT INTO domains (name, reject_unknown, catch_all, "
                                 "max_message_bytes) VALUES (?, ?, ?, ?)"),
                        (domain.name, domain.reject_unknown, domain.catch_all,
                         domain.max_message_bytes))

        await self._tx(run)

    async def remove_domain(self, name: str) -> bool:
        def run(cur: Any) -> bool:
            # explicit, so that it does not depend on SQLite's foreign_keys pragma
            cur.execute(self.sql("DELETE FROM dkim_keys WHERE domain = ?"), (name,))
            cur.execute(self.sql("DELETE FROM mailboxes WHERE domain = ?"), (name,))
            cur.execute(self.sql("DELETE FROM aliases WHERE domain = ?"), (name,))
            cur.execute(self.sql("DELETE FROM domains WHERE name = ?"), (name,))
            return cur.rowcount > 0

        return await self._tx(run)

    async def list_domains(self) -> list[Domain]:
        def run(cur: Any) -> list[Domain]:
            cur.execute("SELECT name, reject_unknown, catch_all, max_message_bytes, "
                        "messages_per_hour, messages_per_day FROM domains ORDER BY name")
            return [_domain(r) for r in cur.fetchall()]  # type: ignore[misc]

        return await self._tx(run)

    async def set_domain_limits(self, name: str, **limits: int | None) -> bool:
        """Set a domain's ``messages_per_hour``/``messages_per_day`` (``None`` clears);
        ``False`` when the domain is not hosted."""
        unknown = set(limits) - set(DOMAIN_LIMITS)
        if unknown:
            raise TypeError(f"not domain limits: {sorted(unknown)}")
        if not limits:
            return await self.get_domain(name) is not None
        columns = ", ".join(f"{k} = ?" for k in limits)

        def run(cur: Any) -> bool:
            cur.execute(self.sql(f"UPDATE domains SET {columns} WHERE name = ?"),
                        (*limits.values(), name))
            return cur.rowcount > 0

        return await self._tx(run)

    def _require_domain(self, cur: Any, address: str) -> str:
        domain = address.rpartition("@")[2]
        cur.execute(self.sql("SELECT 1 FROM domains WHERE name = ?"), (domain,))
        if cur.fetchone() is None:
            raise DirectoryError(f"{domain} is not a hosted domain; add it first with "
                                 f"`elemta domains add {domain}`")
        return domain

    async def add_mailbox(self, address: str) -> None:
        def run(cur: Any) -> None:
            domain = self._require_domain(cur, address)
            cur.execute(self.sql("SELECT 1 FROM mailboxes WHERE address = ?"), (address,))
            if cur.fetchone() is not None:
                raise DirectoryError(f"mailbox {address} exists already")
            cur.execute(self.sql("INSERT INTO mailboxes (address, domain) VALUES (?, ?)"),
                        (address, domain))

        await self._tx(run)

    async def remove_mailbox(self, address: str) -> bool:
        def run(cur: Any) -> bool:
            cur.execute(self.sql("DELETE FROM mailboxes WHERE address = ?"), (address,))
            return cur.rowcount > 0

        return await self._tx(run)

    async def list_mailboxes(self, domain: str | None = None) -> list[str]:
        def run(cur: Any) -> list[str]:
            if domain is None:
                cur.execute("SELECT address FROM mailboxes ORDER BY domain, address")
            else:
                cur.execute(self.sql("SELECT address FROM mailboxes WHERE domain = ? "
                                     "ORDER BY address"), (domain,))
            return [r[0] for r in cur.fetchall()]

        return await self._tx(run)

    async def add_alias(self, address: str, targets: list[str]) -> None:
        def run(cur: Any) -> None:
            domain = self._require_domain(cur, address)
            for target in targets:
                cur.execute(self.sql("SELECT 1 FROM aliases WHERE address = ? AND target = ?"),
                            (address, target))
                if cur.fetchone() is None:
                    cur.execute(self.sql("INSERT INTO aliases (address, target, domain) "
                                         "VALUES (?, ?, ?)"), (address, target, domain))

        await self._tx(run)

    async def remove_alias(self, address: str, target: str | None = None) -> int:
        def run(cur: Any) -> int:
            if target is None:
                cur.execute(self.sql("DELETE FROM aliases WHERE address = ?"), (address,))
            else:
                cur.execute(self.sql("DELETE FROM aliases WHERE address = ? AND target = ?"),
                            (address, target))
            return cur.rowcount

        return await self._tx(run)

    async def list_aliases(self, domain: str | None = None) -> list[tuple[str, str]]:
        def run(cur: Any) -> list[tuple[str, str]]:
            if domain is None:
                cur.execute("SELECT address, target FROM aliases ORDER BY address, target")
            else:
                cur.execute(self.sql("SELECT address, target FROM aliases WHERE domain = ? "
                                     "ORDER BY address, target"), (domain,))
            return [(r[0], r[1]) for r in cur.fetchall()]

        return await self._tx(run)

    async def set_rule(self, rule: Rule) -> None:
        def run(cur: Any) -> None:
            cur.execute(self.sql("DELETE FROM rules WHERE pattern = ?"), (rule.pattern,))
            cur.execute(self.sql("INSERT INTO rules (pattern, action, targets, code, enhanced, "
                                 "text) VALUES (?, ?, ?, ?, ?, ?)"),
                        (rule.pattern, rule.action, ",".join(rule.targets), rule.code,
                         rule.enhanced, rule.text))

        await self._tx(run)

    async def remove_rule(self, pattern: str) -> bool:
        def run(cur: Any) -> bool:
            cur.execute(self.sql("DELETE FROM rules WHERE pattern = ?"), (pattern,))
            return cur.rowcount > 0

        return await self._tx(run)

    async def list_rules(self) -> list[Rule]:
        def run(cur: Any) -> list[Rule]:
            cur.execute("SELECT pattern, action, targets, code, enhanced, text FROM rules "
                        "ORDER BY pattern")
            return [_rule(r) for r in cur.fetchall()]

        return await self._tx(run)

    # -------------------------------------------------------------- DKIM keys

    async def dkim_keys(self, domain: str) -> list[DkimKey]:
        q = self.sql(_DKIM_SQL)

        def run(cur: Any) -> list[DkimKey]:
            cur.execute(q, (domain,))
            return [_dkim(r) for r in cur.fetchall()]

        return await self._tx(run)

    async def list_dkim_keys(self, domain: str | None = None) -> list[DkimKey]:
        if domain is not None:
            return await self.dkim_keys(domain)

        def run(cur: Any) -> list[DkimKey]:
            cur.execute(_DKIM_ALL_SQL)
            return [_dkim(r) for r in cur.fetchall()]

        return await self._tx(run)

    async def add_dkim_key(self, key: DkimKey) -> None:
        def run(cur: Any) -> None:
            self._require_domain(cur, "@" + key.domain)
            cur.execute(self.sql("SELECT 1 FROM dkim_keys WHERE domain = ? AND selector = ?"),
                        (key.domain, key.selector))
            if cur.fetchone() is not None:
                raise DirectoryError(f"selector {key.selector} of {key.domain} exists already; "
                                     "a new key needs a new selector (mail signed with the old "
                                     "one may still be in transit)")
            cur.execute(self.sql("INSERT INTO dkim_keys (domain, selector, algorithm, "
                                 "private_key, key_file, not_before, not_after) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)"),
                        (key.domain, key.selector, key.algorithm, key.private_key, key.key_file,
                         key.not_before, key.not_after))

        await self._tx(run)

    async def remove_dkim_key(self, domain: str, selector: str) -> bool:
        def run(cur: Any) -> bool:
            cur.execute(self.sql("DELETE FROM dkim_keys WHERE domain = ? AND selector = ?"),
                        (domain, selector))
            return cur.rowcount > 0

        return await self._tx(run)

    # -------------------------------------------------------------- users

    async def get_user(self, login: str) -> User | None:
        q_user, q_senders = self.sql(_USER_SQL), self.sql(_SENDERS_SQL)

        def run(cur: Any) -> User | None:
            cur.execute(q_user, (login,))
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute(q_senders, (login,))
            return _user(row, cur.fetchall())

        return await self._tx(run)

    async def add_user(self, user: User) -> None:
        def run(cur: Any) -> None:
            cur.execute(self.sql("SELECT 1 FROM users WHERE address = ?"), (user.address,))
            if cur.fetchone() is not None:
                raise DirectoryError(f"user {user.address} exists already (change it with "
                                     "`elemta users passwd`, `disable`, `enable`, `set`)")
            cur.execute(self.sql("INSERT INTO users (address, password, scram, disabled, "
                                 "max_message_bytes, daily_quota, messages_per_hour) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)"),
                        (user.address, user.password, user.scram, user.disabled,
                         user.max_message_bytes, user.daily_quota, user.messages_per_hour))
            for pattern in user.send_as:
                cur.execute(self.sql("INSERT INTO user_senders (login, pattern) VALUES (?, ?)"),
                            (user.address, pattern))

        await self._tx(run)

    async def update_user(self, login: str, **changes: object) -> bool:
        unknown = set(changes) - set(USER_FIELDS)
        if unknown:
            raise TypeError(f"not user fields: {sorted(unknown)}")
        if not changes:
            return await self.get_user(login) is not None
        columns = ", ".join(f"{k} = ?" for k in changes)

        def run(cur: Any) -> bool:
            cur.execute(self.sql(f"UPDATE users SET {columns} WHERE address = ?"),
                        (*changes.values(), login))
            return cur.rowcount > 0

        return await self._tx(run)

    async def remove_user(self, login: str) -> bool:
        def run(cur: Any) -> bool:
            cur.execute(self.sql("DELETE FROM user_senders WHERE login = ?"), (login,))
            cur.execute(self.sql("DELETE FROM users WHERE address = ?"), (login,))
            return cur.rowcount > 0

        return await self._tx(run)

    async def list_users(self, domain: str | None = None) -> list[User]:
        def run(cur: Any) -> list[User]:
            cur.execute("SELECT address, password, scram, disabled, max_message_bytes, "
                        "daily_quota, messages_per_hour FROM users ORDER BY address")
            rows = [r for r in cur.fetchall()
                    if domain is None or r[0].endswith("@" + domain)]
            cur.execute("SELECT login, pattern FROM user_senders ORDER BY login, pattern")
            senders: dict[str, list[tuple[str]]] = {}
            for login, pattern in cur.fetchall():
                senders.setdefault(login, []).append((pattern,))
            return [_user(r, senders.get(r[0], [])) for r in rows]  # type: ignore[misc]

        return await self._tx(run)

    async def grant(self, login: str, pattern: str) -> None:
        def run(cur: Any) -> None:
            cur.execute(self.sql("SELECT 1 FROM users WHERE address = ?"), (login,))
            if cur.fetchone() is None:
                raise DirectoryError(f"no user {login} (add it with `elemta users add {login}`)")
            cur.execute(self.sql("SELECT 1 FROM user_senders WHERE login = ? AND pattern = ?"),
                        (login, pattern))
            if cur.fetchone() is None:
                cur.execute(self.sql("INSERT INTO user_senders (login, pattern) VALUES (?, ?)"),
                            (login, pattern))

        await self._tx(run)

    async def revoke(self, login: str, pattern: str) -> bool:
        def run(cur: Any) -> bool:
            cur.execute(self.sql("DELETE FROM user_senders WHERE login = ? AND pattern = ?"),
                        (login, pattern))
            return cur.rowcount > 0

        return await self._tx(run)

    async def aliases_to(self, address: str) -> list[str]:
        q = self.sql(_ALIASES_TO_SQL)

        def run(cur: Any) -> list[str]:
            cur.execute(q, (address,))
            return [r[0] for r in cur.fetchall()]

        return await self._tx(run)

    async def count_sent(self, login: str, day: str) -> int:
        q = self.sql(_SENT_SQL)

        def run(cur: Any) -> int:
            cur.execute(q, (login, day))
            row = cur.fetchone()
            return 0 if row is None else int(row[0])

        return await self._tx(run)

    async def add_sent(self, login: str, day: str) -> int:
        q, prune = self.sql(_ADD_SENT_SQL), self._prune(day)

        def run(cur: Any) -> int:
            if prune is not None:
                cur.execute(self.sql(_PRUNE_SENT_SQL), (prune,))
            cur.execute(q, (login, day))
            return int(cur.fetchone()[0])

        return await self._tx(run)

    _pruned_day = ""

    def _prune(self, day: str) -> str | None:
        """Once a day: the oldest day worth keeping (a week back); older counts go."""
        if day == self._pruned_day:
            return None
        self._pruned_day = day
        return (datetime.date.fromisoformat(day) - datetime.timedelta(days=7)).isoformat()


# ---------------------------------------------------------------- SQLite


class SQLiteBackend(SQLBackend):
    """An SQLite file, created on first use; one connection on one thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="datasource-sqlite")
        try:
            await self._run(self._connect)
        except sqlite3.Error as e:
            raise BackendUnavailable(f"SQLite database {self.path}: {e}") from None
        except OSError as e:
            raise BackendUnavailable(f"SQLite database {self.path}: {e.strerror or e}") from None

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # password hashes and SCRAM keys: the owner's alone (SQLite gives its -wal and -shm
        # files the database's mode)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        mode = os.stat(self.path).st_mode & 0o777
        if mode & 0o077:
            # a database made by something else (or an older version): it holds hashes and
            # DKIM private keys, so it is made private before anything is read from it
            try:
                os.chmod(self.path, 0o600)
                log.warning("datasource: %s was mode %04o (readable by other users); it is "
                            "now 0600", self.path, mode)
            except OSError as e:
                log.error("datasource: %s is mode %04o, readable by other users, and cannot "
                          "be changed (%s); run `chmod 600 %s`", self.path, mode, e.strerror,
                          self.path)
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        self._conn = conn
        self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS elemta_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM elemta_schema").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {current} is newer than this elemta-datasource "
                    f"understands ({SCHEMA_VERSION}); upgrade the plugin")
            for version, statements in MIGRATIONS:
                if version > current:
                    for stmt in statements:
                        conn.execute(stmt)
                    conn.execute("INSERT INTO elemta_schema (version) VALUES (?)", (version,))
                    log.info("datasource: %s migrated to schema version %d", self.path, version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def _run(self, fn: Callable[[], Any]) -> Any:
        if self._pool is None:
            raise BackendUnavailable("the SQLite backend is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def _tx(self, fn: Callable[[Any], Any]) -> Any:
        def run() -> Any:
            conn = self._conn
            if conn is None:
                raise BackendUnavailable(f"SQLite database {self.path} is not open")
            cur = conn.cursor()
            cur.execute("BEGIN")
            try:
                result = fn(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return result

        try:
            return await self._run(run)
        except sqlite3.Error as e:
            raise BackendUnavailable(f"SQLite database {self.path}: {e}") from None

    async def close(self) -> None:
        if self._pool is None:
            return

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(shut)
        self._pool.shutdown(wait=True)
        self._pool = None


# ---------------------------------------------------------------- PostgreSQL


class PostgresBackend(SQLBackend):
    """PostgreSQL through psycopg 3's async connection pool."""

    placeholder = "%s"

    def __init__(self, dsn: str, pool_size: int = 4, timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.timeout = timeout
        self._pool: Any = None

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(self.dsn, min_size=1, max_size=self.pool_size,
                                   timeout=self.timeout, open=False,
                                   kwargs={"connect_timeout": max(1, int(self.timeout))})
        try:
            await pool.open(wait=True, timeout=self.timeout)
        except Exception as e:
            await pool.close()
            raise BackendUnavailable(f"PostgreSQL: {_pg_reason(e)}") from None
        self._pool = pool
        await self._migrate()

    async def _migrate(self) -> None:
        import psycopg

        try:
            async with self._pool.connection() as conn:
                async with conn.transaction():
                    # one migrator at a time across servers sharing the database
                    await conn.execute("SELECT pg_advisory_xact_lock(7406131)")
                    await conn.execute("CREATE TABLE IF NOT EXISTS elemta_schema "
                                       "(version INTEGER NOT NULL)")
                    cur = await conn.execute("SELECT MAX(version) FROM elemta_schema")
                    current = (await cur.fetchone())[0] or 0
                    if current > SCHEMA_VERSION:
                        raise BackendUnavailable(
                            f"PostgreSQL schema version {current} is newer than this "
                            f"elemta-datasource understands ({SCHEMA_VERSION}); upgrade the plugin")
                    for version, statements in MIGRATIONS:
                        if version > current:
                            for stmt in statements:
                                await conn.execute(stmt)
                            await conn.execute("INSERT INTO elemta_schema (version) VALUES (%s)",
                                               (version,))
                            log.info("datasource: PostgreSQL migrated to schema version %d",
                                     version)
        except psycopg.Error as e:
            raise BackendUnavailable(f"PostgreSQL: {_pg_reason(e)}") from None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; any failure to get or use it is :class:`BackendUnavailable`."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._pool is None:
            raise BackendUnavailable("the PostgreSQL backend is closed")
        try:
            async with self._pool.connection(timeout=self.timeout) as conn:
                yield conn
        except PoolTimeout as e:
            raise BackendUnavailable(f"PostgreSQL: no connection within {self.timeout} s "
                                     f"({e})") from None
        except (psycopg.Error, OSError) as e:
            raise BackendUnavailable(f"PostgreSQL: {_pg_reason(e)}") from None

    async def lookup(self, address: str, base: str, domain: str) -> Lookup:
        """The hot path, natively async: four indexed queries on one pooled connection."""
        q = [self.sql(s) for s in _LOOKUP_SQL]
        async with self._connection() as conn:
            domain_row = await (await conn.execute(q[0], (domain,))).fetchone()
            if domain_row is None:
                return Lookup(None)
            mailbox = await (await conn.execute(q[1], (base,))).fetchone()
            aliases = await (await conn.execute(q[2], (address, base))).fetchall()
            rules = await (await conn.execute(q[3], (address, base, domain))).fetchall()
        return _lookup_from(domain_row, mailbox, aliases, rules, address, base, domain)

    async def get_domain(self, name: str) -> Domain | None:
        """Routing asks this for every new domain: natively async, like :meth:`lookup`."""
        async with self._connection() as conn:
            return _domain(await (await conn.execute(self.sql(_LOOKUP_SQL[0]),
                                                     (name,))).fetchone())

    async def dkim_keys(self, domain: str) -> list[DkimKey]:
        """Signing asks this for each domain it has no cached answer for: natively async."""
        async with self._connection() as conn:
            rows = await (await conn.execute(self.sql(_DKIM_SQL), (domain,))).fetchall()
        return [_dkim(r) for r in rows]

    # logins and every submitted message ask these: natively async too

    async def get_user(self, login: str) -> User | None:
        async with self._connection() as conn:
            row = await (await conn.execute(self.sql(_USER_SQL), (login,))).fetchone()
            if row is None:
                return None
            senders = await (await conn.execute(self.sql(_SENDERS_SQL), (login,))).fetchall()
        return _user(row, senders)

    async def aliases_to(self, address: str) -> list[str]:
        async with self._connection() as conn:
            rows = await (await conn.execute(self.sql(_ALIASES_TO_SQL), (address,))).fetchall()
        return [r[0] for r in rows]

    async def count_sent(self, login: str, day: str) -> int:
        async with self._connection() as conn:
            row = await (await conn.execute(self.sql(_SENT_SQL), (login, day))).fetchone()
        return 0 if row is None else int(row[0])

    async def add_sent(self, login: str, day: str) -> int:
        prune = self._prune(day)
        async with self._connection() as conn:
            if prune is not None:
                await conn.execute(self.sql(_PRUNE_SENT_SQL), (prune,))
            row = await (await conn.execute(self.sql(_ADD_SENT_SQL), (login, day))).fetchone()
            await conn.commit()
        return int(row[0])

    async def _tx(self, fn: Callable[[Any], Any]) -> Any:
        """Run an editing function (the CLI: a cold path) in one transaction.

        The functions are written against a DB-API cursor, so they run in a
        worker thread on a plain (synchronous) connection of their own.
        """
        import psycopg

        def run() -> Any:
            with psycopg.connect(self.dsn, connect_timeout=max(1, int(self.timeout))) as conn:
                with conn.transaction(), conn.cursor() as cur:
                    return fn(cur)

        try:
            return await asyncio.to_thread(run)
        except (psycopg.Error, OSError) as e:
            raise BackendUnavailable(f"PostgreSQL: {_pg_reason(e)}") from None

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def _pg_reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
