"""The datasource plugin's hooks: RCPT validation, alias expansion, rules, routing."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from elemta import Accept, Quarantine, Reject, Route, StashKey, TempFail, hookimpl

from .directory import (Backend, BackendUnavailable, DirectoryError, Lookup, Resolution,
                        TTLCache, resolve)
from .backends import make_backend
from .settings import DatasourceSettings

log = logging.getLogger("elemta.datasource")

# per transaction: quarantine reasons and the smallest per-domain size limit
_quarantine = StashKey[list[str]]()
_max_size = StashKey[int]()

REOPEN_SECONDS = 5.0
FAIL_FAST_SECONDS = 2.0


class DatasourcePlugin:
    """Hosted domains, mailboxes, aliases and routing rules, answered at RCPT time."""

    def __init__(self) -> None:
        self.settings = DatasourceSettings()
        self.backend: Backend | None = None
        self._opened = False
        self._next_open = 0.0
        self._down_until = 0.0
        self._cache = TTLCache(self.settings.cache_seconds)

    # -------------------------------------------------------------- lifecycle

    @hookimpl
    def register_config(self) -> dict[str, type]:
        return {"datasource": DatasourceSettings}

    @hookimpl
    def register_commands(self, cli: Any) -> None:
        from .cli import add_commands

        add_commands(cli)

    @hookimpl
    async def startup(self, app: Any) -> None:
        self.settings = app.plugin_settings("datasource")
        self._cache = TTLCache(self.settings.cache_seconds)
        self.backend = make_backend(self.settings, app.settings)
        try:
            await self.backend.open()
        except DirectoryError as e:
            raise RuntimeError(f"[plugins.datasource]: {e}") from None
        except BackendUnavailable as e:
            if self.settings.backend != "postgresql":
                raise RuntimeError(f"[plugins.datasource]: {e}") from None
            # A database server that is down must not keep the MX from
            # starting: every lookup answers 451 until it is back.
            log.error("datasource: %s; recipients get 451 4.3.0 until it answers", e)
            self._next_open = time.monotonic() + REOPEN_SECONDS
            return
        self._opened = True

    @hookimpl
    async def shutdown(self, app: Any) -> None:
        if self.backend is not None:
            await self.backend.close()
            self.backend = None
            self._opened = False

    # -------------------------------------------------------------- lookups

    async def _ensure_open(self) -> Backend:
        if self.backend is None:
            raise BackendUnavailable("the datasource is not started")
        if not self._opened:
            if time.monotonic() < self._next_open:
                raise BackendUnavailable("the datasource is down")
            self._next_open = time.monotonic() + REOPEN_SECONDS
            await self.backend.open()
            self._opened = True
            log.info("datasource: connected")
        return self.backend

    async def _query(self, make_call) -> Any:
        """Run one backend call with the lookup timeout, failing fast while it is down.

        After a failure or timeout, calls fail at once for ``FAIL_FAST_SECONDS``:
        a database that hangs must not hold every RCPT for the whole timeout.
        """
        if time.monotonic() < self._down_until:
            raise BackendUnavailable("the datasource did not answer a moment ago")
        backend = await self._ensure_open()
        # Not wait_for: it waits for the cancelled call to wind down, and a
        # database driver cancelling a query on a hung connection can take
        # as long again. The call is cancelled and left to finish on its own.
        task = asyncio.ensure_future(make_call(backend))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.settings.lookup_timeout_seconds)
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_consume)
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            self._down_until = time.monotonic() + FAIL_FAST_SECONDS
            raise TimeoutError(f"no answer within {self.settings.lookup_timeout_seconds} s")
        try:
            return task.result()
        except BackendUnavailable:
            self._down_until = time.monotonic() + FAIL_FAST_SECONDS
            raise

    async def lookup(self, address: str, base: str, domain: str) -> Lookup:
        key = ("l", address, base)
        hit = self._cache.get(key)
        if hit is not None:
            return hit  # type: ignore[return-value]
        result = await self._query(lambda b: b.lookup(address, base, domain))
        self._cache.put(key, result)
        return result

    async def hosted(self, domain: str) -> bool:
        """Whether ``domain`` is hosted; while the backend is down, the last answer known."""
        key = ("d", domain)
        hit = self._cache.get(key)
        if hit is not None:
            return hit  # type: ignore[return-value]
        try:
            found = await self._query(lambda b: b.get_domain(domain)) is not None
        except (BackendUnavailable, TimeoutError):
            stale = self._cache.get_stale(key)
            if stale is None:
                raise
            return stale  # type: ignore[return-value]
        self._cache.put(key, found)
        return found

    async def resolve(self, address: str) -> Resolution:
        """The whole resolution, cached as one entry: a hit costs one dictionary lookup."""
        key = ("r", address)
        hit = self._cache.get(key)
        if hit is not None:
            return hit  # type: ignore[return-value]
        result = await resolve(self.lookup, address, self.settings.recipient_delimiter,
                               self.settings.max_alias_depth)
        self._cache.put(key, result)
        return result

    # -------------------------------------------------------------- SMTP stages

    @hookimpl
    async def rcpt(self, session: Any, tx: Any, recipient: Any) -> Any:
        try:
            res = await self.resolve(recipient.address)
        except (BackendUnavailable, TimeoutError) as e:
            log.warning("%s: datasource lookup for <%s> failed: %s", tx.id, recipient.address,
                        e or "timed out")
            return TempFail(451, "4.3.0", "Temporary lookup failure, try again later")
        for line in res.trace:
            log.warning("%s: <%s>: %s", tx.id, recipient.address, line)
        if res.kind == "foreign":
            return None
        if res.kind == "reject":
            if res.code < 500:
                return TempFail(res.code, res.enhanced, res.text)
            return Reject(res.code, res.enhanced, res.text)
        limit = res.max_message_bytes
        if limit is not None:
            declared = _int(tx.mail_params.get("SIZE"))
            if declared is not None and declared > limit:
                return Reject(552, "5.3.4", f"Message too big for <{recipient.address}> "
                              f"(at most {limit} bytes)")
            current = tx.stash.get(_max_size, None)
            tx.stash[_max_size] = limit if current is None else min(current, limit)
        if res.deliver_to is not None:
            recipient.rewrite(res.deliver_to)
            log.info("%s: <%s> → %s", tx.id, recipient.address,
                     ", ".join(f"<{a}>" for a in res.deliver_to))
        if res.quarantine is not None:
            tx.stash.setdefault(_quarantine, []).append(f"{recipient.address}: {res.quarantine}")
        return Accept()

    @hookimpl
    def data(self, tx: Any, message: Any) -> Any:
        limit = tx.stash.get(_max_size, None)
        if limit is not None and message.size > limit:
            return Reject(552, "5.3.4", f"Message too big for a recipient's domain "
                          f"(at most {limit} bytes)")
        reasons = tx.stash.get(_quarantine, None)
        if reasons:
            return Quarantine(reason="; ".join(reasons))
        return None

    # -------------------------------------------------------------- delivery

    @hookimpl
    async def route(self, recipient: Any) -> Route | None:
        domain = recipient.address.rpartition("@")[2].lower().rstrip(".")
        if not domain:
            return None
        # Unknown while the backend is down (and never answered for this domain):
        # BackendUnavailable propagates and the runner keeps the recipient queued
        # (451) rather than guess between our mailboxes and the domain's MX.
        if await self.hosted(domain):
            return Route(transport=self.settings.transport, destination=domain)
        return None


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so that asyncio does not report it."""
    if not task.cancelled():
        task.exception()


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
