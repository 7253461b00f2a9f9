"""The query API of the message store: what a web UI, an HTTP API or a test reads.

A :class:`Store` is one open store, SQLite or PostgreSQL as ``[plugins.store]``
says. The running plugin has its own; :func:`current_store` returns it, so that
another plugin in the same server (an HTTP API, a webhook) reads the same store
and hears its events::

    from elemta_store import current_store

    store = current_store()            # None before the store plugin has started
    page = await store.search(text="invoice", limit=20)
    async with store.subscribe() as events:
        async for event in events:     # {"type": "stored", "id": 42}
            ...

Another process opens its own with :meth:`Store.open` and the same settings;
it hears the events of its own changes only (SQLite), or of every node's
(PostgreSQL, through ``LISTEN``/``NOTIFY``).

Every method is a coroutine that never blocks the event loop: SQLite work runs
in the store's own threads, PostgreSQL work on an async connection pool. Times
are aware ``datetime`` objects in UTC. Ids are positive integers, larger for
newer messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .settings import StoreSettings

__all__ = ["Store", "Page", "Summary", "StoredMessage", "StoredEnvelope", "Subscription",
           "Event", "StoreError", "current_store"]

# an event: {"type": "stored" | "deleted" | "cleared", "id": int | None}
Event = dict[str, Any]

MAX_LIMIT = 1000


class StoreError(Exception):
    """The store cannot do what was asked: unreachable database, corrupt file, bad query."""


@dataclass(frozen=True, slots=True)
class Summary:
    """One message in a list: what a list row shows."""

    id: int
    received: datetime              # when the server accepted the message (UTC)
    sender: str                     # the envelope sender (MAIL FROM); "" for a bounce
    recipients: list[str]           # the envelope recipients stored, in RCPT order
    subject: str                    # decoded (RFC 2047); "" when there is none
    from_header: str                # the From: header, decoded
    to_header: str                  # the To: header, decoded
    size: int                       # bytes of the raw message
    has_attachments: bool           # a part with Content-Disposition: attachment, or a filename
    snippet: str                    # the start of the first text part, one line, <= 200 chars


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """The SMTP envelope the message came with."""

    queue_id: str                                   # the spool's id of the message
    sender: str
    recipients: list[str]
    mail_params: dict[str, str | None] = field(default_factory=dict)   # MAIL FROM ESMTP params
    rcpt_params: dict[str, dict[str, str | None]] = field(default_factory=dict)  # by recipient
    helo: str | None = None
    peer: str | None = None                         # the client's IP address
    auth: str | None = None                         # the authenticated login, if any


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message in full, less its raw bytes (:meth:`Store.raw`)."""

    id: int
    received: datetime
    sender: str
    recipients: list[str]
    subject: str
    from_header: str
    to_header: str
    size: int
    has_attachments: bool
    snippet: str
    headers: list[tuple[str, str]]  # every header in order, values decoded, unfolded
    envelope: StoredEnvelope

    def summary(self) -> Summary:
        return Summary(self.id, self.received, self.sender, self.recipients, self.subject,
                       self.from_header, self.to_header, self.size, self.has_attachments,
                       self.snippet)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a search: ``total`` matches in all, ``items`` newest first."""

    total: int
    items: list[Summary]


class Subscription:
    """The events of one store, from the moment of :meth:`Store.subscribe`.

    An async iterator of events, each a dict ``{"type": "stored" | "deleted" |
    "cleared", "id": int | None}`` (``id`` is ``None`` for ``cleared``;
    ``stored`` also has ``"new"``: ``False`` when recipients were added to a
    message already stored, as a repeated delivery does). A
    subscriber that lets ``queue_size`` events wait loses them all and receives
    ``{"type": "overflow", "id": None}`` instead, then the events after it:
    reload what it shows.
    Iteration ends when the store closes or :meth:`close` is called. Use it as an
    async context manager, or call :meth:`close`, so the store forgets it.
    """

    def __init__(self, hub: _Hub, queue_size: int = 1000) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._size = queue_size
        self._closed = False
        self._loop = asyncio.get_running_loop()

    def _put(self, event: Event | None) -> None:       # in the subscriber's loop
        if self._closed:
            return
        if event is not None and self._queue.qsize() >= self._size:
            # what is queued is stale anyway: the subscriber must reload
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait({"type": "overflow", "id": None})
        self._queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self._closed = True
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving events; a pending ``__anext__`` ends."""
        if not self._closed:
            self._hub.remove(self)
            self._put(None)


class _Hub:
    """The in-process broadcaster: events to every subscription, in its own loop."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def add(self, sub: Subscription) -> None:
        self._subs.add(sub)

    def remove(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, event: Event | None) -> None:
        """Thread-safe; ``None`` ends every subscription."""
        for sub in list(self._subs):
            try:
                if asyncio.get_running_loop() is sub._loop:
                    sub._put(event)
                    continue
            except RuntimeError:
                pass
            try:
                sub._loop.call_soon_threadsafe(sub._put, event)
            except RuntimeError:         # that loop is closed
                self._subs.discard(sub)
        if event is None:
            self._subs.clear()


class Backend(Protocol):
    """What :class:`Store` needs of a database (private; SQLite and PostgreSQL)."""

    async def start(self) -> None: ...
    async def put(self, item: Any) -> tuple[int, bool, list[int]]: ...
    async def search(self, text: str | None, to: str | None, sender: str | None,
                     since: datetime | None, before: datetime | None,
                     offset: int, limit: int) -> Page: ...
    async def get(self, id: int) -> StoredMessage | None: ...
    async def raw(self, id: int) -> bytes | None: ...
    async def delete(self, id: int) -> bool: ...
    async def clear(self) -> int: ...
    async def count(self) -> int: ...
    async def close(self) -> None: ...


class Store:
    """One open message store. Make it with :meth:`open`; close it with :meth:`close`."""

    def __init__(self, settings: StoreSettings, backend: Backend) -> None:
        self.settings = settings
        self._backend = backend
        self._hub = _Hub()
        self._closed = False
        self.pruned_total = 0       # messages pruned by this store's writes since it opened

    @classmethod
    async def open(cls, settings: StoreSettings, *, base: str | Path | None = None) -> Store:
        """Open (and create, the first time) the store ``settings`` describe.

        ``settings`` is the ``[plugins.store]`` model
        (:class:`elemta_store.StoreSettings`). A relative SQLite ``path`` is
        taken relative to ``base`` (the plugin passes the config file's folder),
        else to the working directory. Raises :class:`StoreError` when the
        database cannot be opened or created.
        """
        store = cls.__new__(cls)
        if settings.backend == "postgresql":
            from .postgres import PostgresBackend
            backend: Backend = PostgresBackend(settings, store._notify)
        else:
            from .sqlite import SQLiteBackend
            path = Path(settings.path)
            if not path.is_absolute() and base is not None:
                path = Path(base) / path
            backend = SQLiteBackend(settings, path)
        Store.__init__(store, settings, backend)
        await backend.start()
        return store

    async def search(self, *, text: str | None = None, to: str | None = None,
                     sender: str | None = None, since: datetime | None = None,
                     before: datetime | None = None, offset: int = 0, limit: int = 50) -> Page:
        """The messages matching every given condition, newest first.

        - ``text``: words, all of which must appear in the sender, the
          recipients, the subject or the decoded text of the body (SQLite FTS5:
          whole words, a trailing ``*`` is a prefix; ``"quoted phrase"``).
        - ``to``: a recipient (envelope) containing this, case-insensitive.
        - ``sender``: the envelope sender containing this, case-insensitive.
        - ``since`` (inclusive) / ``before`` (exclusive): received time; a naive
          ``datetime`` is taken as UTC.
        - ``offset``, ``limit``: the page; ``limit`` is at most 1000.

        ``total`` counts every match, not only the page.
        """
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        return await self._backend.search(text or None, to or None, sender or None, since,
                                          before, offset, min(limit, MAX_LIMIT))

    async def get(self, id: int) -> StoredMessage | None:
        """The message with this id, or ``None`` (never stored, deleted or pruned)."""
        return await self._backend.get(id)

    async def raw(self, id: int) -> bytes | None:
        """The message exactly as it was delivered (headers and body), or ``None``."""
        return await self._backend.raw(id)

    async def delete(self, id: int) -> bool:
        """Delete one message; ``False`` when there was none. Subscribers hear ``deleted``."""
        deleted = await self._backend.delete(id)
        if deleted:
            self._notify({"type": "deleted", "id": id})
        return deleted

    async def clear(self) -> int:
        """Delete every message; how many there were. Subscribers hear ``cleared``."""
        n = await self._backend.clear()
        self._notify({"type": "cleared", "id": None})
        return n

    async def count(self) -> int:
        """How many messages the store holds."""
        return await self._backend.count()

    def subscribe(self, queue_size: int = 1000) -> Subscription:
        """Events from now on (see :class:`Subscription`). Call from a running loop."""
        sub = Subscription(self._hub, queue_size)
        if self._closed:
            sub._put(None)
        else:
            self._hub.add(sub)
        return sub

    async def close(self) -> None:
        """Close the database; subscriptions end. Calling it twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._hub.publish(None)
        await self._backend.close()

    # -- for the transport -------------------------------------------------

    async def put(self, item: Any) -> int:
        """Store one message (an :class:`elemta_store.message.Incoming`); its id.

        Returns once the transaction is durable. Storing again the same queue id
        adds only the recipients not yet stored, to the same message: a delivery
        repeated after a crash keeps one copy.
        """
        id, created, pruned = await self._backend.put(item)
        self.pruned_total += len(pruned)
        for p in pruned:
            self._notify({"type": "deleted", "id": p})
        self._notify({"type": "stored", "id": id, "new": created})
        return id

    def _notify(self, event: Event) -> None:
        self._hub.publish(event)


# the store of each running server (by its App), and the last one started
_stores: dict[int, Store] = {}
_last: list[Store | None] = [None]


def current_store(app: Any = None) -> Store | None:
    """The :class:`Store` the running ``store`` plugin of ``app`` uses, or ``None``
    before it starts.

    For other plugins of the same server (an HTTP API, a webhook): call it in or
    after their ``startup`` hook (the store starts at its own ``startup``; order
    plugins with ``tryfirst``/``trylast`` or call it lazily), passing the ``App``
    their hooks are given, so that two servers in one process (tests) each find
    their own. Without ``app``: the store started last. Do not close it.
    """
    if app is None:
        return _last[0]
    return _stores.get(id(app))


def _set_current(app: Any, store: Store | None) -> None:
    if store is None:
        gone = _stores.pop(id(app), None)
        if _last[0] is gone:
            _last[0] = next(reversed(_stores.values()), None)
        return
    _stores[id(app)] = _last[0] = store
