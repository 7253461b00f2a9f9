"""Keeping a certificate: when to order, the order lock, failures, requests.

One :class:`Renewer` per server runs as a background task (``run``): about
twice a second it looks for a certificate another process installed (one
``readlink``) and for a renewal request from ``elemta acme renew``; whenever
the schedule says so it decides whether the certificate is due, and orders.
``elemta acme renew`` without a running server uses the same object for one
renewal (``renew_now``).

Ordering happens only under the state directory's order lock, and only after
looking again, under the lock, at what another process may have done while
this one waited: several nodes sharing a state directory never order at once
for the same names, and the ones that did not order pick up the new
certificate. Failures are counted in ``status.json`` with the time of the
next attempt (exponential backoff with jitter, or longer when the CA asked
for it with ``Retry-After``), so a restart neither forgets nor hurries them.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .issuer import AcmeFailure, Issuer, fetch_renewal_info
from .responders import Responders
from .schedule import (RenewalWindow, next_attempt_delay, renewal_time, time_in_window)
from .settings import AcmeSettings
from .store import Current, Store, StoreError

log = logging.getLogger("elemta.acme")

POLL_SECONDS = 0.5
"""How often the background task looks for requests and certificates of other processes."""
IDLE_RECHECK_SECONDS = 3600.0
"""The longest the background task goes without deciding again whether to renew."""
BUSY_RECHECK_SECONDS = 5.0
"""How soon to look again when another process holds the order lock."""
KEEP_ANSWERS = 10
"""Answers to `elemta acme renew` kept in status.json (the newest)."""
STALE_REQUEST_SECONDS = 1800.0
"""A renewal request older than this (left by a server that stopped) is dropped."""
ARI_ERROR_RECHECK_SECONDS = 3600.0
ARI_NOT_OFFERED_RECHECK_SECONDS = 86400.0


def _utc(ts: float | None) -> datetime.datetime | None:
    return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)


def when_text(ts: float | None) -> str:
    return "-" if ts is None else f"{_utc(ts):%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True)
class Result:
    """The outcome of a renewal asked for (``elemta acme renew``)."""

    ok: bool
    message: str
    ordered: bool = False


class Renewer:
    """Orders, renews and reports the certificate of one state directory.

    ``on_new_certificate(current)`` is awaited whenever a certificate that is
    not the one last seen becomes current (this process's order, another's, or
    the one found at start); the plugin builds its TLS context there and
    reloads the listeners. ``metrics(result)`` counts each order's result.
    """

    def __init__(self, settings: AcmeSettings, store: Store, *,
                 on_new_certificate: Callable[[Current], Awaitable[None]] | None = None,
                 count: Callable[[str, dict[str, Any]], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.store = store
        self.responders = Responders(settings, store, shared=settings.responders == "always")
        self.issuer = Issuer(settings, store, self.responders)
        self.on_new_certificate = on_new_certificate
        self.count = count
        self.rng = rng or random.Random()
        self.current: Current | None = None
        self._seen_generation: str | None = None
        self._next_check = 0.0
        self._busy_logged = False

    @property
    def verb(self) -> str:
        return "renew" if self.current is not None else "obtain"

    # ------------------------------------------------------------ the background task

    async def run(self) -> None:
        """The background task: until cancelled (at shutdown)."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug or a broken state directory: say so, keep serving
                log.exception("ACME: the renewal task failed; it tries again in %.0f s",
                              BUSY_RECHECK_SECONDS)
                self._next_check = time.time() + BUSY_RECHECK_SECONDS
            await asyncio.sleep(POLL_SECONDS)

    async def tick(self) -> None:
        await self.refresh()
        request = await asyncio.to_thread(self.store.claim_request)
        if request is not None:
            await self.handle_request(request)
            return
        if time.time() >= self._next_check:
            await self.check()

    async def refresh(self) -> bool:
        """Load the current certificate when it is not the one last seen; whether it was new."""
        generation = await asyncio.to_thread(self.store.current_generation)
        if generation is None or generation == self._seen_generation:
            return False
        self._seen_generation = generation
        try:
            current = await asyncio.to_thread(self.store.load_current)
        except StoreError as e:
            log.error("ACME: %s; new connections keep the certificate in service", e)
            return False
        if current is None:
            return False
        self.current = current
        if self.on_new_certificate is not None:
            await self.on_new_certificate(current)
        return True

    async def check(self) -> None:
        """Decide whether the certificate is due, and order if it is."""
        status = await asyncio.to_thread(self.store.read_status)
        now = time.time()
        next_attempt = status.get("next_attempt_at")
        if next_attempt is not None and now < next_attempt:
            self._next_check = next_attempt
            return
        due, when, reason = await self.due(status)
        if not due:
            self._next_check = min(when, now + IDLE_RECHECK_SECONDS)
            return
        lock = self.store.order_lock()
        if not await asyncio.to_thread(lock.acquire):
            if not self._busy_logged:
                holder = await asyncio.to_thread(lock.holder)
                log.info("ACME: %s is ordering a certificate for this state directory; "
                         "waiting for its result", holder or "another process")
                self._busy_logged = True
            self._next_check = now + BUSY_RECHECK_SECONDS
            return
        self._busy_logged = False
        try:
            await self._order_if_still_due(force=False)
        finally:
            lock.release()

    # ------------------------------------------------------------ the schedule

    async def due(self, status: dict[str, Any]) -> tuple[bool, float, str]:
        """Whether to order now, when otherwise, and why."""
        settings, current, now = self.settings, self.current, time.time()
        if current is None:
            return True, now, "there is no certificate yet"
        info = current.info
        if set(info.names) != set(settings.names):
            missing = sorted(set(settings.names) - set(info.names))
            extra = sorted(set(info.names) - set(settings.names))
            what = "; ".join(filter(None, [
                f"lacks {', '.join(missing)}" if missing else "",
                f"still names {', '.join(extra)}" if extra else ""]))
            return True, now, f"names changed: the certificate {what}"
        issued_by = status.get("directory")
        if issued_by is not None and issued_by != settings.directory_url:
            return True, now, (f"the directory changed: the certificate comes from {issued_by}, "
                               f"directory is {settings.directory_url}")
        if info.key_type != settings.key_type:
            return True, now, (f"the certificate has a {info.key_type} key and key_type is "
                               f"{settings.key_type}")
        window, chosen = None, None
        if settings.ari:
            window, chosen = await self._renewal_info(status, current)
        when_dt, reason = renewal_time(info, settings.renew_share, settings.renew_days,
                                       window, chosen)
        when = when_dt.timestamp()
        if status.get("renew_at") != when or status.get("renew_reason") != reason:
            def note(s: dict[str, Any]) -> None:
                s["renew_at"], s["renew_reason"] = when, reason
                s["renew_serial"] = info.serial_hex
            await asyncio.to_thread(self.store.update_status, note)
        return now >= when, when, f"it is due ({reason})"

    async def _renewal_info(self, status: dict[str, Any], current: Current,
                            ) -> tuple[RenewalWindow | None, datetime.datetime | None]:
        """The CA's renewal window (ARI) for the current certificate, asked again only
        when the last answer says so; ``(None, None)`` when there is none."""
        info, now = current.info, time.time()
        ari = status.get("ari") or {}
        if ari.get("serial") != info.serial_hex or now >= ari.get("recheck_at", 0):
            try:
                window = await asyncio.to_thread(fetch_renewal_info, self.settings,
                                                 self.store, info)
            except AcmeFailure as e:
                log.warning("ACME: no renewal information from the CA (%s); the renewal "
                            "follows renew_share/renew_days meanwhile", e)
                ari = {"serial": info.serial_hex, "error": str(e),
                       "recheck_at": now + ARI_ERROR_RECHECK_SECONDS}
            else:
                if window is None:
                    ari = {"serial": info.serial_hex, "offered": False,
                           "recheck_at": now + ARI_NOT_OFFERED_RECHECK_SECONDS}
                else:
                    chosen = ari.get("chosen")
                    same = (ari.get("serial") == info.serial_hex
                            and ari.get("start") == window.start.timestamp()
                            and ari.get("end") == window.end.timestamp())
                    if not same or chosen is None:
                        chosen = time_in_window(window, _utc(now), self.rng).timestamp()
                        log.info("ACME: the CA suggests renewing between %s and %s; chosen: "
                                 "%s%s", when_text(window.start.timestamp()),
                                 when_text(window.end.timestamp()), when_text(chosen),
                                 f" ({window.explanation_url})" if window.explanation_url
                                 else "")
                    ari = {"serial": info.serial_hex, "offered": True, **window.to_json(),
                           "chosen": chosen}
            new_ari = ari

            def note(s: dict[str, Any]) -> None:
                s["ari"] = new_ari
            await asyncio.to_thread(self.store.update_status, note)
        if not ari.get("offered") or ari.get("start") is None:
            return None, None
        window = RenewalWindow(
            datetime.datetime.fromtimestamp(ari["start"], datetime.timezone.utc),
            datetime.datetime.fromtimestamp(ari["end"], datetime.timezone.utc),
            ari.get("explanation_url"),
            datetime.datetime.fromtimestamp(ari["recheck_at"], datetime.timezone.utc))
        return window, _utc(ari.get("chosen"))

    # ------------------------------------------------------------ ordering

    async def handle_request(self, request: dict[str, Any]) -> Result:
        """A request of ``elemta acme renew`` found in the state directory: act, answer."""
        force = bool(request.get("force"))
        age = time.time() - float(request.get("requested_at") or 0)
        if age > STALE_REQUEST_SECONDS:
            log.warning("ACME: ignoring a renewal request of %s: nobody waits for it any more",
                        when_text(request.get("requested_at")))
            return Result(False, "the request was too old")
        log.info("ACME: renewal requested by `elemta acme renew%s` (pid %s)",
                 " --force" if force else "", request.get("pid"))
        try:
            result = await self.renew_now(force=force, generation=request.get("generation"))
        except Exception as e:
            result = Result(False, f"the server failed to handle the request: {e}")
            log.exception("ACME: renewal request failed")
        answer = {"id": request["id"], "ok": result.ok, "message": result.message,
                  "ordered": result.ordered, "finished_at": time.time()}

        def note(s: dict[str, Any]) -> None:
            answers = [a for a in s.get("requests") or [] if a.get("id") != answer["id"]]
            s["requests"] = (answers + [answer])[-KEEP_ANSWERS:]
        await asyncio.to_thread(self.store.update_status, note)
        return result

    async def renew_now(self, *, force: bool, generation: str | None,
                        wait_seconds: float | None = None) -> Result:
        """Renew now if due (or ``force``), waiting for another process's order first.

        ``generation`` is the certificate the caller saw: when another process
        replaced it while this one waited for the lock, that is the renewal
        asked for, and nothing is ordered again.
        """
        wait = (self.settings.order_timeout_seconds + 2 * self.settings.request_timeout_seconds
                if wait_seconds is None else wait_seconds)
        deadline = time.monotonic() + wait
        lock = self.store.order_lock()
        while not await asyncio.to_thread(lock.acquire):
            if time.monotonic() >= deadline:
                holder = await asyncio.to_thread(lock.holder)
                return Result(False, f"{holder or 'another process'} is still ordering a "
                                     "certificate for this state directory; try again later")
            await asyncio.sleep(POLL_SECONDS)
        try:
            await self.refresh()
            now_generation = self.current.generation if self.current else None
            if now_generation != generation:
                info = self.current.info if self.current else None
                return Result(True, "another process renewed the certificate meanwhile"
                              + (f": serial {info.serial_hex}, valid until "
                                 f"{info.not_after:%Y-%m-%d %H:%M} UTC" if info else ""))
            return await self._order_if_still_due(force=force)
        finally:
            lock.release()

    async def _order_if_still_due(self, *, force: bool) -> Result:
        """With the order lock held: look again, then order (or say why not)."""
        await self.refresh()
        status = await asyncio.to_thread(self.store.read_status)
        now = time.time()
        limited = status.get("rate_limited_until")
        if limited is not None and now < limited:
            message = (f"the CA rate-limited this account until {when_text(limited)}; "
                       "no order is sent before then")
            log.warning("ACME: %s", message)
            self._next_check = limited
            return Result(False, message)
        if force:
            reason = "a renewal was forced (`elemta acme renew --force`)"
        else:
            next_attempt = status.get("next_attempt_at")
            if next_attempt is not None and now < next_attempt:
                self._next_check = next_attempt
                return Result(False, f"the last attempt failed ({status.get('last_error')}); "
                                     f"the next one is at {when_text(next_attempt)} "
                                     "(--force to try now)")
            due, when, reason = await self.due(status)
            if not due:
                self._next_check = min(when, now + IDLE_RECHECK_SECONDS)
                return Result(True, f"not due: the next renewal is at {when_text(when)} "
                                    "(--force to renew now)")
        return await self._order(reason, status)

    async def _order(self, reason: str, status: dict[str, Any]) -> Result:
        names = ", ".join(self.settings.names)
        verb = self.verb
        log.info("ACME: ordering a certificate for %s from %s: %s", names,
                 self.settings.directory_url, reason)

        def started(s: dict[str, Any]) -> None:
            s["last_attempt_at"] = time.time()
        await asyncio.to_thread(self.store.update_status, started)
        try:
            current = await self.issuer.issue()
        except AcmeFailure as f:
            return await self._failed(f, verb)
        now = time.time()
        info = current.info

        def succeeded(s: dict[str, Any]) -> None:
            for key in ("failures", "last_error", "last_error_kind", "last_error_at",
                        "next_attempt_at", "rate_limited_until", "ari", "renew_at",
                        "renew_reason", "renew_serial"):
                s.pop(key, None)
            s["last_success_at"] = now
            s["directory"] = self.settings.directory_url
        await asyncio.to_thread(self.store.update_status, succeeded)
        self._next_check = 0.0
        if self.count is not None:
            self.count("success", {})
        await self.refresh()
        return Result(True, f"issued a certificate for {', '.join(info.names)}: serial "
                            f"{info.serial_hex}, valid until "
                            f"{info.not_after:%Y-%m-%d %H:%M} UTC", ordered=True)

    async def _failed(self, failure: AcmeFailure, verb: str) -> Result:
        now = time.time()
        settings = self.settings
        shared: dict[str, Any] = {}

        def failed(s: dict[str, Any]) -> None:
            failures = int(s.get("failures") or 0) + 1
            delay = next_attempt_delay(failures, settings.retry_initial_seconds,
                                       settings.retry_max_seconds, failure.retry_after,
                                       self.rng)
            s.update(failures=failures, last_error=str(failure), last_error_kind=failure.kind,
                     last_error_at=now, next_attempt_at=now + delay)
            if failure.kind == "rate_limited":
                s["rate_limited_until"] = now + (failure.retry_after
                                                 if failure.retry_after is not None else delay)
            shared.update(s)
        await asyncio.to_thread(self.store.update_status, failed)
        self._next_check = shared["next_attempt_at"]
        if self.count is not None:
            self.count("rate_limited" if failure.kind == "rate_limited" else "failure", shared)
        serving = (f"new connections keep the certificate serial {self.current.info.serial_hex}"
                   f" (valid until {self.current.info.not_after:%Y-%m-%d %H:%M} UTC)"
                   if self.current else
                   "new connections get the [tls] or self-signed certificate meanwhile")
        log.warning("ACME: could not %s a certificate for %s (failure %d in a row): %s. %s; "
                    "next attempt at %s", verb, ", ".join(settings.names), shared["failures"],
                    failure, serving, when_text(shared["next_attempt_at"]))
        return Result(False, str(failure))
