"""elemta-ratelimit: connections and messages per client, sender, domain, user and recipient.

Enabled as ``ratelimit``; which limits apply and how units are taken and
given back is in :mod:`elemta_ratelimit.limits`. The state is the server's
store (``app.state``): embedded, or Redis shared by several nodes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

from elemta import (App, Disconnect, HookFailure, Recipient, Session, StashKey,
                    StateUnavailable, TempFail, Transaction, hookimpl)

from .limits import (PREFIX, WINDOWS, Limit, Own, Refusal, checked_own, give_back,
                     message_limits, recipient_limits, reserve)
from .settings import RatelimitSettings

__all__ = ["RatelimitPlugin", "RatelimitSettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.ratelimit")

_pending = StashKey[list[Limit]]()      # units reserved for a message not queued yet
_lease = StashKey[bool]()               # this connection holds a connection slot
_exempt = StashKey[bool]()

UNAVAILABLE = "Temporary local problem, please try again later"
LOOKUP_FAILED = "Temporary lookup failure, please try again later"
MAX_CACHED = 10_000          # own limits remembered at once (domains and users)


class LookupFailed(Exception):
    """The ``rate_limits`` hook failed and no earlier answer is known."""


class RatelimitPlugin:
    """The ``ratelimit`` plugin."""

    def __init__(self) -> None:
        self.settings = RatelimitSettings()
        self.store: Any = None
        self.app: Any = None
        # (kind, key) -> (fresh until, answer): the rate_limits answers, reused briefly
        self._own: dict[tuple[str, str], tuple[float, Own | None]] = {}
        self._asking: dict[tuple[str, str], asyncio.Future[Own | None]] = {}
        self._noted: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._networks: tuple[Any, ...] = ()
        self._refused: Any = None
        self._failed_open: Any = None

    @hookimpl
    def register_config(self) -> dict[str, type[RatelimitSettings]]:
        return {"ratelimit": RatelimitSettings}

    @hookimpl
    def register_commands(self, cli: Any) -> None:
        from .cli import ratelimit

        if "ratelimit" not in cli.commands:
            cli.add_command(ratelimit)

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        from prometheus_client import Counter

        self._refused = Counter("smtp_ratelimit_refused", "Connections, messages and "
                                "recipients refused by a rate limit, by what it counts.",
                                ["kind"], registry=registry)
        self._failed_open = Counter("smtp_ratelimit_failed_open", "Limits not checked because "
                                    "the state store could not answer (on_store_failure = "
                                    "accept).", registry=registry)

    @hookimpl
    def startup(self, app: App) -> None:
        self.settings = app.plugin_settings("ratelimit")
        self.store = app.state
        self.app = app
        self._networks = tuple(ipaddress.ip_network(n, strict=False)
                               for n in self.settings.exempt_networks)

    # ---------------------------------------------------------------- helpers

    def _is_exempt(self, session: Session) -> bool:
        cached = session.stash.get(_exempt, None)
        if cached is not None:
            return cached
        try:
            ip = ipaddress.ip_address(session.peer_ip)
            exempt = any(ip in net for net in self._networks)
        except ValueError:
            exempt = False
        exempt = exempt or (self.settings.exempt_relay_networks and session.relay_allowed)
        session.stash[_exempt] = exempt
        return exempt

    def _unavailable(self, where: str, e: StateUnavailable, verdict: Any) -> Any:
        if self.settings.on_store_failure == "accept":
            if self._failed_open is not None:
                self._failed_open.inc()
            log.warning("ratelimit: %s not limited: %s (on_store_failure = accept)", where, e)
            return None
        log.warning("ratelimit: %s told to retry: %s", where, e)
        return verdict

    def _refused_by(self, where: str, refusal: Refusal) -> None:
        if self._refused is not None:
            self._refused.labels(kind=refusal.limit.kind).inc()
        log.info("ratelimit: %s refused: %s reached (next in %.0f s)", where,
                 refusal.limit.describe(), refusal.retry_after)

    async def own_limits(self, kind: str, key: str) -> Own | None:
        """The ``rate_limits`` answer for ``kind`` ``key``, reused for
        ``lookup_cache_seconds``; callers waiting for the same key share one call.
        A failure reuses the last answer, however old, or raises :class:`LookupFailed`."""
        k = (kind, key)
        hit = self._own.get(k)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        task = self._asking.get(k)
        if task is None:
            # its own task: a session that goes away does not cancel the others' answer
            task = self._asking[k] = asyncio.ensure_future(self._ask(k, hit))
            task.add_done_callback(lambda t: (self._asking.pop(k, None),
                                              t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _ask(self, k: tuple[str, str], hit: tuple[float, Own | None] | None
                   ) -> Own | None:
        kind, key = k
        try:
            own = checked_own(await self.app.rate_limits(kind, key))
        except (HookFailure, ValueError) as e:
            if hit is None:
                raise LookupFailed(str(e)) from None
            log.warning("ratelimit: the own limits of %s %s are the last known: %s",
                        kind, key, e)
            # asked again soon, not on every message while the source is down
            self._own[k] = (time.monotonic() + min(self.settings.lookup_cache_seconds, 2.0),
                            hit[1])
            return hit[1]
        if len(self._own) >= MAX_CACHED:
            self._own.clear()
        self._own[k] = (time.monotonic() + self.settings.lookup_cache_seconds, own)
        self._note(kind, key, own)
        return own

    def _note(self, kind: str, key: str, own: Own | None) -> None:
        """Write down a domain's or user's own limits where ``elemta ratelimit status``
        reads them (in the background: MAIL does not wait for it)."""
        k = (kind, key)
        if not own and k not in self._noted:
            return
        if own:
            self._noted.add(k)
        else:
            self._noted.discard(k)

        async def write() -> None:
            try:
                for name, field, period in WINDOWS:
                    note = f"{PREFIX}limit:{kind}:{name}:{key}"
                    value = (own or {}).get(field)
                    if value is None:
                        await self.store.delete(note)
                    else:
                        await self.store.put(note, str(value), period)
            except Exception as e:     # only for the command's display: never worth more
                log.debug("ratelimit: own limits of %s %s not noted: %s", kind, key, e)

        task = asyncio.ensure_future(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _give_back_pending(self, session: Session) -> None:
        pending = session.stash.get(_pending, None)
        if pending:
            session.stash[_pending] = []
            try:
                await give_back(self.store, pending)
            except StateUnavailable as e:
                log.warning("ratelimit: could not give back %d unused unit(s): %s",
                            len(pending), e)

    # ---------------------------------------------------------------- SMTP stages

    @hookimpl
    async def connect(self, session: Session) -> Any:
        s = self.settings
        if self.store is None or self._is_exempt(session) or \
                (s.connections_concurrent is None and s.connections_per_minute is None):
            return None
        ip = session.peer_ip
        try:
            if s.connections_per_minute is not None:
                rate = await self.store.rate(f"{PREFIX}connrate:{ip}", s.connections_per_minute,
                                             60.0)
                if not rate.allowed:
                    limit = Limit("connections", ip, "minute", s.connections_per_minute, 60.0)
                    self._refused_by(f"connection from {ip}", Refusal(limit, rate.retry_after))
                    return Disconnect(421, "4.7.0", "Too many connections from your address, "
                                      "try again later")
            if s.connections_concurrent is not None:
                if not await self.store.acquire(f"{PREFIX}conn:{ip}", session.id,
                                                s.connections_concurrent, s.lease_seconds):
                    limit = Limit("connections", ip, "moment", s.connections_concurrent, 0.0)
                    self._refused_by(f"connection from {ip}", Refusal(limit, 0.0))
                    return Disconnect(421, "4.7.0", "Too many connections from your address, "
                                      "try again later")
                session.stash[_lease] = True
        except StateUnavailable as e:
            return self._unavailable(f"connection from {ip}", e,
                                     Disconnect(421, "4.3.0", UNAVAILABLE))
        return None

    @hookimpl
    async def mail(self, session: Session, tx: Transaction, sender: str) -> Any:
        if self.store is None:
            return None
        await self._give_back_pending(session)     # an earlier message that was not queued
        if self._is_exempt(session):
            return None
        domain = sender.rpartition("@")[2].lower()
        user = session.auth_user.lower() if session.auth_user is not None else None
        try:
            own_domain = await self.own_limits("domain", domain) if domain else None
            own_user = await self.own_limits("user", user) if user is not None else None
        except LookupFailed as e:
            if self.settings.on_store_failure != "accept":
                log.warning("ratelimit: %s: MAIL FROM:<%s> told to retry: own limits unknown: "
                            "%s", tx.id, sender, e)
                return TempFail(451, "4.3.0", LOOKUP_FAILED)
            if self._failed_open is not None:
                self._failed_open.inc()
            log.warning("ratelimit: %s: MAIL FROM:<%s>: own limits unknown, the configured "
                        "ones apply: %s (on_store_failure = accept)", tx.id, sender, e)
            own_domain = own_user = None
        limits = message_limits(self.settings, session.peer_ip, sender, session.auth_user,
                                own_domain, own_user)
        if not limits:
            return None
        try:
            taken, refusal = await reserve(self.store, limits)
        except StateUnavailable as e:
            return self._unavailable(f"{tx.id}: MAIL FROM:<{sender}>", e,
                                     TempFail(451, "4.3.0", UNAVAILABLE))
        if refusal is not None:
            self._refused_by(f"{tx.id}: MAIL FROM:<{sender}> from {session.peer_ip}", refusal)
            return _tempfail(refusal)
        session.stash[_pending] = taken
        return None

    @hookimpl
    async def rcpt_ok(self, session: Session, tx: Transaction, recipient: Recipient) -> Any:
        if self.store is None or self._is_exempt(session):
            return None
        limits = recipient_limits(self.settings, recipient.address)
        if not limits:
            return None
        try:
            taken, refusal = await reserve(self.store, limits)
        except StateUnavailable as e:
            return self._unavailable(f"{tx.id}: RCPT TO:<{recipient.address}>", e,
                                     TempFail(451, "4.3.0", UNAVAILABLE))
        if refusal is not None:
            self._refused_by(f"{tx.id}: RCPT TO:<{recipient.address}>", refusal)
            return _tempfail(refusal)
        session.stash.setdefault(_pending, []).extend(taken)
        return None

    @hookimpl
    def queued(self, session: Session) -> None:
        session.stash[_pending] = []              # the message counts: nothing to give back

    @hookimpl
    async def disconnect(self, session: Session) -> None:
        if self.store is None:
            return
        await self._give_back_pending(session)
        if session.stash.get(_lease, False):
            try:
                await self.store.release(f"{PREFIX}conn:{session.peer_ip}", session.id)
            except StateUnavailable as e:
                log.warning("ratelimit: the connection slot of %s is freed when its lease "
                            "ends (%.0f s): %s", session.peer_ip, self.settings.lease_seconds, e)


def _tempfail(refusal: Refusal) -> TempFail:
    minutes = max(1, round(refusal.retry_after / 60))
    return TempFail(451, "4.7.1", f"Rate limit reached ({refusal.limit.describe()}), try "
                    f"again in {minutes} minute{'s' if minutes != 1 else ''}")
