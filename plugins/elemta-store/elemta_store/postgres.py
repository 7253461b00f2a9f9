"""The PostgreSQL store: the SQLite schema in ``elemta_store_*`` tables, on an async pool.

Search uses a ``tsvector`` (the ``simple`` configuration) over the same words
the SQLite index holds: punctuation splits words and accents are dropped before
PostgreSQL sees the text, so a query finds the same messages on both backends.
Each change is announced with ``NOTIFY elemta_store`` at commit; every store
open on the database (another node, the web UI's process) relays the others'
announcements to its subscribers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import unicodedata
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .api import Event, Page, StoredEnvelope, StoredMessage, StoreError, Summary
from .message import Incoming, parse
from .query import like_pattern, terms
from .settings import StoreSettings
from .sqlite import load

log = logging.getLogger("elemta.store")

CHANNEL = "elemta_store"
_IDLE = 0   # psycopg.pq.TransactionStatus.IDLE: no transaction open

SCHEMA = """
CREATE TABLE IF NOT EXISTS elemta_store_messages (
    id BIGSERIAL PRIMARY KEY,
    queue_id TEXT NOT NULL UNIQUE,
    received TIMESTAMPTZ NOT NULL,
    sender TEXT NOT NULL,
    recipients JSONB NOT NULL,
    subject TEXT NOT NULL,
    from_header TEXT NOT NULL,
    to_header TEXT NOT NULL,
    size BIGINT NOT NULL,
    has_attachments BOOLEAN NOT NULL,
    snippet TEXT NOT NULL,
    headers JSONB NOT NULL,
    envelope JSONB NOT NULL,
    words TSVECTOR NOT NULL
);
CREATE INDEX IF NOT EXISTS elemta_store_messages_received ON elemta_store_messages (received);
CREATE INDEX IF NOT EXISTS elemta_store_messages_words ON elemta_store_messages USING GIN (words);
CREATE TABLE IF NOT EXISTS elemta_store_recipients (
    message_id BIGINT NOT NULL REFERENCES elemta_store_messages (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    address TEXT NOT NULL,
    original TEXT,
    params JSONB NOT NULL,
    PRIMARY KEY (message_id, address)
);
CREATE INDEX IF NOT EXISTS elemta_store_recipients_address ON elemta_store_recipients (address);
CREATE TABLE IF NOT EXISTS elemta_store_contents (
    id BIGINT PRIMARY KEY REFERENCES elemta_store_messages (id) ON DELETE CASCADE,
    raw BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS elemta_store_totals (
    k INTEGER PRIMARY KEY CHECK (k = 0),
    messages BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
INSERT INTO elemta_store_totals VALUES (0, 0, 0) ON CONFLICT DO NOTHING;
"""

INSERT = """
WITH m AS (
    INSERT INTO elemta_store_messages (queue_id, received, sender, recipients, subject,
        from_header, to_header, size, has_attachments, snippet, headers, envelope, words)
    VALUES (%(queue_id)s, %(received)s, %(sender)s, %(recipients)s, %(subject)s,
        %(from_header)s, %(to_header)s, %(size)s, %(has_attachments)s, %(snippet)s,
        %(headers)s, %(envelope)s, to_tsvector('simple', %(words)s))
    ON CONFLICT (queue_id) DO NOTHING
    RETURNING id
), c AS (
    INSERT INTO elemta_store_contents SELECT id, %(raw)s FROM m
), r AS (
    INSERT INTO elemta_store_recipients
    SELECT m.id, x.position, x.address, x.original, x.params
    FROM m, jsonb_to_recordset(%(rcpts)s::jsonb)
        AS x(position INTEGER, address TEXT, original TEXT, params JSONB)
    ON CONFLICT DO NOTHING
), t AS (
    UPDATE elemta_store_totals SET messages = messages + 1, bytes = bytes + %(size)s
    WHERE k = 0 AND EXISTS (SELECT 1 FROM m)
    RETURNING messages, bytes
)
SELECT m.id, t.messages, t.bytes,
    pg_notify('elemta_store', json_build_object('type', 'stored', 'id', m.id, 'new', true,
                                                'origin', %(origin)s::text)::text)
FROM m, t
"""

SUMMARY = ("m.id, m.received, m.sender, m.recipients, m.subject, m.from_header, m.to_header, "
           "m.size, m.has_attachments, m.snippet")
_WORD = re.compile(r"\w+")
# a tsvector holds at most 1 MiB; text well under it keeps the lexemes under it
MAX_WORDS_CHARS = 512 * 1024


def plain_words(text: str) -> str:
    """Lower-case words without accents, separated by spaces: what the index holds."""
    folded = unicodedata.normalize("NFKD", text.lower())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    return " ".join(_WORD.findall(folded))


def _summary(row: tuple[Any, ...]) -> Summary:
    return Summary(row[0], row[1].astimezone(timezone.utc), row[2], list(row[3]), row[4],
                   row[5], row[6], row[7], bool(row[8]), row[9])


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


class PostgresBackend:
    def __init__(self, settings: StoreSettings, notify: Callable[[Event], None]) -> None:
        assert settings.postgresql_dsn is not None
        self.settings = settings
        self._dsn = settings.postgresql_dsn.get_secret_value()
        self._notify = notify
        self._origin = uuid.uuid4().hex
        self._pool: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        from psycopg import OperationalError
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(self._dsn, min_size=1, max_size=self.settings.postgresql_pool_size,
                                   open=False, timeout=self.settings.timeout_seconds,
                                   name="elemta-store", kwargs={"autocommit": True},
                                   configure=_durable)
        try:
            await pool.open(wait=True, timeout=self.settings.timeout_seconds)
            async with pool.connection() as conn:
                # one node creates the tables at a time
                await conn.execute("SELECT pg_advisory_xact_lock(724100117)")
                await conn.execute(SCHEMA)
        except (OperationalError, Exception) as e:
            await pool.close()
            raise StoreError(f"cannot open the PostgreSQL message store: {_clean(e)} (check "
                             "[plugins.store] postgresql_dsn and that the server is up)") from e
        self._pool = pool
        self._listening = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(), name="elemta-store-listen")
        # events of other nodes are heard from when start returns
        try:
            await asyncio.wait_for(self._listening.wait(), self.settings.timeout_seconds)
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("store: PostgreSQL LISTEN not ready; other nodes' events will arrive "
                        "once it is")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):
                pass
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _listen(self) -> None:
        """Relay the other stores' NOTIFY to this store's subscribers; reconnect on failure."""
        from psycopg import AsyncConnection

        delay = 1.0
        while True:
            try:
                async with await AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    delay = 1.0
                    async for n in conn.notifies():
                        try:
                            event = json.loads(n.payload)
                        except ValueError:
                            continue
                        if event.pop("origin", None) != self._origin:
                            self._notify(event)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - logged, retried
                log.warning("store: PostgreSQL LISTEN lost (%s); retrying in %.0f s",
                            _clean(e), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    def _event(self, type: str, id: int | None, **more: Any) -> str:
        return json.dumps({"type": type, "id": id, "origin": self._origin, **more})

    async def _tx(self, fn: Callable[[Any], Any], atomic: bool = True) -> Any:
        """``fn(cursor)`` in a transaction; with ``atomic=False``, each statement commits
        by itself (one statement: one round trip less on each side)."""
        from psycopg import Error

        if self._pool is None:
            raise StoreError("the message store is closed")
        try:
            async with self._pool.connection() as conn:
                if not atomic:
                    async with conn.cursor() as cur:
                        return await fn(cur)
                async with conn.transaction():
                    async with conn.cursor() as cur:
                        return await fn(cur)
        except Error as e:
            raise StoreError(f"PostgreSQL message store: {_clean(e)}") from e
        except TimeoutError as e:
            raise StoreError("PostgreSQL message store: no connection free in time") from e

    # -- writes --------------------------------------------------------------

    async def put(self, item: Incoming) -> tuple[int, bool, list[int]]:
        p, incoming = await asyncio.to_thread(self._prepare, item)
        addresses = [r[0] for r in incoming.recipients]
        words = plain_words(" ".join([incoming.sender, *addresses, p.subject, p.body]))
        envelope = {"mail_params": incoming.mail_params, "helo": incoming.helo,
                    "peer": incoming.peer, "auth": incoming.auth}
        rcpts = [{"position": n, "address": a, "original": o, "params": params}
                 for n, (a, params, o) in enumerate(incoming.recipients)]

        async def run(cur: Any) -> tuple[int, bool, list[int]]:
            # one round trip: the message, its content, its recipients, the totals, NOTIFY
            await cur.execute(INSERT, {
                "queue_id": incoming.queue_id, "received": incoming.received,
                "sender": _nul(incoming.sender), "recipients": json.dumps(addresses),
                "subject": _nul(p.subject), "from_header": _nul(p.from_header),
                "to_header": _nul(p.to_header), "size": len(incoming.raw),
                "has_attachments": p.has_attachments, "snippet": _nul(p.snippet),
                "headers": _nul(json.dumps(p.headers)), "envelope": json.dumps(envelope),
                "words": words[:MAX_WORDS_CHARS], "raw": incoming.raw,
                "rcpts": json.dumps(rcpts), "origin": self._origin})
            row = await cur.fetchone()
            if row is None:
                if cur.connection.info.transaction_status == _IDLE:
                    raise _Again    # autocommit: redo it in a transaction
                return await self._add_recipients(cur, incoming)
            id, count, total = row[:3]
            pruned = await self._prune(cur, id, count, total)
            for d in pruned:
                await cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._event("deleted", d)))
            return id, True, pruned

        # unbounded, the insert is one statement: atomic and durable by itself once it
        # returns (autocommit); a repeated delivery takes the transaction path
        bounded = bool(self.settings.max_messages or self.settings.max_bytes)
        try:
            return await self._tx(run, atomic=bounded)
        except _Again:
            return await self._tx(run, atomic=True)

    def _prepare(self, item: Incoming) -> tuple[Any, Incoming]:
        incoming = load(item)
        return parse(incoming.raw, self.settings.index_bytes), incoming

    async def _add_recipients(self, cur: Any, incoming: Incoming) -> tuple[int, bool, list[int]]:
        await cur.execute("SELECT id, recipients FROM elemta_store_messages WHERE queue_id = %s"
                          " FOR UPDATE", (incoming.queue_id,))
        id, stored = await cur.fetchone()
        stored = list(stored)
        added = [r for r in incoming.recipients if r[0] not in stored]
        if added:
            for n, (address, params, original) in enumerate(added, len(stored)):
                await cur.execute("INSERT INTO elemta_store_recipients VALUES (%s, %s, %s, %s, %s)"
                                  " ON CONFLICT DO NOTHING",
                                  (id, n, address, original, json.dumps(params)))
            stored += [r[0] for r in added]
            await cur.execute(
                "UPDATE elemta_store_messages SET recipients = %s,"
                " words = words || to_tsvector('simple', %s) WHERE id = %s",
                (json.dumps(stored), plain_words(" ".join(r[0] for r in added)), id))
            await cur.execute("SELECT pg_notify(%s, %s)",
                              (CHANNEL, self._event("stored", id, new=False)))
        return id, False, []

    async def _prune(self, cur: Any, newest: int, count: int, total: int) -> list[int]:
        max_messages, max_bytes = self.settings.max_messages, self.settings.max_bytes
        doomed: list[int] = []
        freed = 0
        if max_messages and count > max_messages:
            await cur.execute("SELECT id, size FROM elemta_store_messages WHERE id < %s"
                              " ORDER BY id LIMIT %s", (newest, count - max_messages))
            for id, size in await cur.fetchall():
                doomed.append(id)
                freed += size
        if max_bytes and total - freed > max_bytes:
            await cur.execute("SELECT id, size FROM elemta_store_messages WHERE id > %s"
                              " AND id < %s ORDER BY id", (doomed[-1] if doomed else 0, newest))
            while total - freed > max_bytes:
                row = await cur.fetchone()
                if row is None:
                    break
                doomed.append(row[0])
                freed += row[1]
        if doomed:
            await self._delete_ids(cur, doomed)
        return doomed

    @staticmethod
    async def _delete_ids(cur: Any, ids: list[int]) -> int:
        await cur.execute("DELETE FROM elemta_store_messages WHERE id = ANY(%s)"
                          " RETURNING size", (ids,))
        rows = await cur.fetchall()
        if rows:
            await cur.execute("UPDATE elemta_store_totals SET messages = messages - %s,"
                              " bytes = bytes - %s WHERE k = 0",
                              (len(rows), sum(r[0] for r in rows)))
        return len(rows)

    async def delete(self, id: int) -> bool:
        async def run(cur: Any) -> bool:
            n = await self._delete_ids(cur, [id])
            if n:
                await cur.execute("SELECT pg_notify(%s, %s)",
                                  (CHANNEL, self._event("deleted", id)))
            return bool(n)
        return await self._tx(run)

    async def clear(self) -> int:
        async def run(cur: Any) -> int:
            await cur.execute("SELECT messages FROM elemta_store_totals WHERE k = 0 FOR UPDATE")
            (n,) = await cur.fetchone()
            await cur.execute("TRUNCATE elemta_store_contents, elemta_store_recipients,"
                              " elemta_store_messages")
            await cur.execute("UPDATE elemta_store_totals SET messages = 0, bytes = 0"
                              " WHERE k = 0")
            await cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._event("cleared", None)))
            return int(n)
        return await self._tx(run)

    # -- reads ---------------------------------------------------------------

    async def count(self) -> int:
        async def run(cur: Any) -> int:
            await cur.execute("SELECT messages FROM elemta_store_totals WHERE k = 0")
            return int((await cur.fetchone())[0])
        return await self._tx(run, atomic=False)

    async def search(self, text: str | None, to: str | None, sender: str | None,
                     since: datetime | None, before: datetime | None,
                     offset: int, limit: int) -> Page:
        where: list[str] = []
        args: list[Any] = []
        for words, prefix in terms(text or ""):
            words = plain_words(words)
            if not words:
                continue
            if prefix:
                where.append("m.words @@ to_tsquery('simple', %s)")
                args.append(" <-> ".join(words.split()) + ":*")
            else:
                where.append("m.words @@ phraseto_tsquery('simple', %s)")
                args.append(words)
        if to:
            where.append("EXISTS (SELECT 1 FROM elemta_store_recipients r"
                         " WHERE r.message_id = m.id AND r.address ILIKE %s)")
            args.append(like_pattern(to))
        if sender:
            where.append("m.sender ILIKE %s")
            args.append(like_pattern(sender))
        if since is not None:
            where.append("m.received >= %s")
            args.append(_aware(since))
        if before is not None:
            where.append("m.received < %s")
            args.append(_aware(before))
        clause = (" WHERE " + " AND ".join(where)) if where else ""

        async def run(cur: Any) -> Page:
            if where:
                await cur.execute(f"SELECT count(*) FROM elemta_store_messages m{clause}", args)
            else:
                await cur.execute("SELECT messages FROM elemta_store_totals WHERE k = 0")
            (total,) = await cur.fetchone()
            await cur.execute(f"SELECT {SUMMARY} FROM elemta_store_messages m{clause}"
                              " ORDER BY m.id DESC LIMIT %s OFFSET %s", [*args, limit, offset])
            return Page(int(total), [_summary(r) for r in await cur.fetchall()])
        return await self._tx(run, atomic=False)

    async def get(self, id: int) -> StoredMessage | None:
        async def run(cur: Any) -> StoredMessage | None:
            await cur.execute(f"SELECT {SUMMARY}, m.headers, m.envelope, m.queue_id"
                              " FROM elemta_store_messages m WHERE m.id = %s", (id,))
            row = await cur.fetchone()
            if row is None:
                return None
            await cur.execute("SELECT address, params FROM elemta_store_recipients"
                              " WHERE message_id = %s ORDER BY position", (id,))
            rcpts = await cur.fetchall()
            s = _summary(row)
            env = row[11]
            envelope = StoredEnvelope(row[12], s.sender, s.recipients,
                                      env.get("mail_params", {}), {a: p for a, p in rcpts},
                                      env.get("helo"), env.get("peer"), env.get("auth"))
            return StoredMessage(s.id, s.received, s.sender, s.recipients, s.subject,
                                 s.from_header, s.to_header, s.size, s.has_attachments,
                                 s.snippet, [tuple(h) for h in row[10]], envelope)
        return await self._tx(run, atomic=False)

    async def raw(self, id: int) -> bytes | None:
        async def run(cur: Any) -> bytes | None:
            await cur.execute("SELECT raw FROM elemta_store_contents WHERE id = %s", (id,))
            row = await cur.fetchone()
            return None if row is None else bytes(row[0])
        return await self._tx(run, atomic=False)


async def _durable(conn: Any) -> None:
    """A commit must be on disk when it returns: never ``synchronous_commit = off``."""
    cur = await conn.execute("SHOW synchronous_commit")
    (value,) = await cur.fetchone()
    if value == "off":
        await conn.execute("SET synchronous_commit = on")


class _Again(Exception):
    """The statement needs a transaction around it."""


def _nul(text: str) -> str:
    """PostgreSQL text cannot hold NUL."""
    return text.replace("\x00", "\ufffd")


def _clean(e: BaseException) -> str:
    """An error's first line, with any password in a DSN hidden."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", first)
