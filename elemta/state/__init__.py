"""Shared state for policy plugins: rate limits, leases and small records with lifetimes.

One store per server (``app.state``), configured in ``[state]``, the way
there is one resolver: greylisting and rate limiting keep their state here,
so that one setting moves them all from one machine to several. Two
implementations with the same semantics:

* **embedded** (the default): SQLite in ``state_dir``, every operation one
  transaction on a thread of its own, so state survives restarts, a command
  line in another process sees it at once, and the event loop never waits
  on disk;
* **redis**: Redis (or Valkey) through redis-py's asyncio client; each
  operation one Lua script or one command, timed by the Redis server's clock,
  so any number of nodes share exact counts.

Every operation is atomic: two concurrent callers never both take the last
unit of a limit. A store that cannot answer raises :class:`StateUnavailable`;
what that means (refuse for now, or let the mail through) is the plugin's
setting, never the store's.

Rate limits use GCRA, a token bucket kept as one number per key (the
"theoretical arrival time"): ``limit`` per ``period``, all of them in a burst
if the key was idle, one more every ``period / limit`` after that. Exact under
concurrency, constant memory per key, and a refund is the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Rate", "StateStore", "StateUnavailable", "StateEntry", "state_store"]


class StateUnavailable(Exception):
    """The store cannot answer now (Redis down, a database error): a temporary failure."""


@dataclass(frozen=True, slots=True)
class Rate:
    """The answer of :meth:`StateStore.rate`."""

    allowed: bool
    remaining: int         # how many more would be allowed right now
    retry_after: float     # seconds until one more is allowed (0 when ``allowed``)


@dataclass(frozen=True, slots=True)
class StateEntry:
    """A key as :meth:`StateStore.scan` lists it.

    For a value or counter, its value and seconds left; for a rate, its GCRA
    time (seconds since the epoch) and the seconds until it is idle again;
    for leases, how many are held (``expires_in`` ``None``).
    """

    key: str
    value: str
    expires_in: float | None


class StateStore(Protocol):
    """What :func:`state_store` returns. Keys are plain strings; the store namespaces them."""

    async def open(self) -> None:
        """Connect (Redis) or create the database (embedded); may raise
        :class:`StateUnavailable`. Every other method opens on demand too."""

    async def close(self) -> None: ...

    async def rate(self, key: str, limit: int, period: float, cost: int = 1) -> Rate:
        """Take ``cost`` units of ``limit`` per ``period`` seconds, if they are there.

        Nothing is taken when the answer is ``allowed=False``. A negative
        ``cost`` gives units back (a reservation that was not used).
        """

    async def rates(self, items: Sequence[tuple[str, int, float]], cost: int = 1) -> list[Rate]:
        """:meth:`rate` for several ``(key, limit, period)`` at once, all or none: when
        one is not allowed, nothing is taken from any. One round trip."""

    async def acquire(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        """Hold one of ``limit`` leases of ``key`` as ``holder`` (a connection id)
        for at most ``ttl`` seconds; ``False`` when all are held. Idempotent."""

    async def release(self, key: str, holder: str) -> None: ...

    async def get(self, key: str) -> str | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """Several values in one round trip."""

    async def put(self, key: str, value: str, ttl: float) -> None:
        """Set ``key`` for ``ttl`` seconds (replacing value and lifetime)."""

    async def add(self, key: str, value: str, ttl: float) -> bool:
        """Set ``key`` only if it does not exist; whether it was set."""

    async def incr(self, key: str, ttl: float, by: int = 1) -> int:
        """Add ``by`` to a counter, which (re)starts a lifetime of ``ttl`` seconds;
        the new value."""

    async def delete(self, key: str) -> bool: ...

    async def scan(self, prefix: str, limit: int = 1000) -> list[StateEntry]:
        """The keys under ``prefix`` (at most ``limit``), for commands that list state."""

    async def clear(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (values, rates and leases); how many."""


def state_store(settings: Settings, *, clock: Callable[[], float] | None = None) -> StateStore:
    """The store ``[state]`` configures (not connected yet).

    ``clock`` (tests) is the embedded store's idea of now; Redis keeps the
    time of its own server.
    """
    state = settings.state
    if state.backend == "redis":
        import importlib.util

        from ..config import ConfigError
        from .redis import RedisStore

        if importlib.util.find_spec("redis") is None:
            raise ConfigError([f'{settings.source}: state.backend: "redis" needs the redis '
                               "package: pip install 'elemta[redis]'"])

        assert state.redis_url is not None
        return RedisStore(state.redis_url.get_secret_value(),
                          password=state.redis_password.get_secret_value()
                          if state.redis_password is not None else None,
                          ca_file=settings.resolve(state.redis_ca_file)
                          if state.redis_ca_file is not None else None,
                          prefix=state.key_prefix, timeout=state.timeout_seconds)
    from .embedded import EmbeddedStore

    path = state.path or settings.server.state_dir / "state.sqlite3"
    return EmbeddedStore(settings.resolve(path), prefix=state.key_prefix,
                         **({"clock": clock} if clock is not None else {}))


def gcra(tat: float | None, now: float, limit: int, period: float,
         cost: int) -> tuple[bool, float | None, int, float]:
    """One GCRA step: ``(allowed, new_tat or None to keep, remaining, retry_after)``.

    ``tat`` is the stored theoretical arrival time (``None``: idle). Both
    stores run exactly this arithmetic (the Redis one in Lua).
    """
    interval = period / limit
    base = now if tat is None or tat < now else tat
    if cost < 0:                                   # a refund, never below now
        new = max(now, base + cost * interval)
        return True, new, int((period - (new - now)) / interval + 1e-9), 0.0
    new = base + cost * interval
    allow_at = new - period
    if now < allow_at - 1e-9:
        return False, None, max(0, int((period - (base - now)) / interval + 1e-9)), allow_at - now
    return True, new, int((period - (new - now)) / interval + 1e-9), 0.0
