"""The datasource plugin's hooks: RCPT validation, alias expansion, rules, routing, AUTH
and what an authenticated user may send (:mod:`.accounts`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from elemta import Accept, Outcome, Quarantine, Reject, Route, StashKey, TempFail, hookimpl

from .accounts import Accounts
from .backends import make_backend, make_source, make_verifier
from .directory import (Backend, BackendUnavailable, DirectoryError, Lookup, Resolution,
                        TTLCache, resolve)
from .settings import DatasourceSettings

log = logging.getLogger("elemta.datasource")

# per transaction: quarantine reasons and the smallest per-domain size limit
_quarantine = StashKey[list[str]]()
_max_size = StashKey[int]()

REOPEN_SECONDS = 5.0
FAIL_FAST_SECONDS = 2.0

# Routes of mail that reaches delivery without an RCPT stage (a bounce, a notice)
# for an address of a hosted domain that no mailbox has, or that is an alias.
UNKNOWN = "datasource:unknown"
ALIAS = "datasource:alias"
MAX_PASSED_ON = 50 << 20      # an alias's message is read whole to be queued again


class DatasourcePlugin:
    """Hosted domains, mailboxes, aliases and routing rules, answered at RCPT time."""

    def __init__(self) -> None:
        self.settings = DatasourceSettings()
        self.backend: Backend | None = None
        self._opened = False
        self._next_open = 0.0
        self._down_until = 0.0
        self._cache = TTLCache(self.settings.cache_seconds)
        self.accounts: Accounts | None = None
        self.app: Any = None

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
        self.app = app
        self.settings = app.plugin_settings("datasource")
        self._cache = TTLCache(self.settings.cache_seconds)
        self.backend = make_backend(self.settings, app.settings)
        await self._start_accounts(app)
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

    async def _start_accounts(self, app: Any) -> None:
        auth = self.settings.auth
        assert self.backend is not None
        verifier = make_verifier(auth)
        source = make_source(auth, self.backend, verifier, app.settings)
        self.accounts = Accounts(auth, source, verifier, self._query,
                                 self.settings.recipient_delimiter, self.settings.cache_seconds)
        if source is None or auth.source == "directory":
            return
        try:
            await source.open()
        except BackendUnavailable as e:
            if auth.source == "passwd-file":
                raise RuntimeError(f"[plugins.datasource.auth]: {e}") from None
            # like a database that is down: logins get 454 until it answers
            log.error("datasource: %s; logins get 454 4.7.0 until it answers", e)

    @hookimpl
    async def shutdown(self, app: Any) -> None:
        if self.accounts is not None:
            if self.accounts.source is not None:
                await self.accounts.source.close()
            self.accounts.verifier.close()
            self.accounts = None
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

    def _postmaster(self, address: str, res: Resolution) -> bool:
        """Whether an address refused as unknown is postmaster@ a hosted domain (or
        [server] postmaster itself), which is accepted without a mailbox."""
        if res.enhanced != "5.1.1" or self.app is None:
            return False
        local, _, domain = address.rpartition("@")
        return bool(domain) and (
            local.lower() == "postmaster"
            or address.lower() == self.app.settings.postmaster_address.lower())

    # -------------------------------------------------------------- AUTH

    @hookimpl
    def auth_mechanisms(self) -> list[str] | None:
        return self.accounts.mechanisms() if self.accounts is not None else None

    @hookimpl
    async def auth(self, session: Any, credentials: Any) -> Any:
        if self.accounts is None:
            return None
        return await self.accounts.login(session, credentials)

    @hookimpl
    async def scram_keys(self, login: str) -> Any:
        if self.accounts is None:
            return None
        try:
            return await self.accounts.scram_keys(login)
        except (BackendUnavailable, TimeoutError) as e:
            # an exception is a 454 to the client: a temporary failure, as it should be
            raise RuntimeError(f"datasource unavailable: {e or 'timed out'}") from None

    @hookimpl
    async def authorize(self, login: str, authzid: str) -> bool | None:
        if self.accounts is None:
            return None
        return await self.accounts.authorize(login, authzid)

    @hookimpl
    async def mail(self, session: Any, tx: Any, sender: str) -> Any:
        if self.accounts is None or session.auth_user is None:
            return None
        return await self.accounts.check_mail(session, tx, sender)

    @hookimpl
    async def queued(self, session: Any, tx: Any) -> None:
        if self.accounts is not None and session.auth_user is not None:
            await self.accounts.queued(session, tx)

    # -------------------------------------------------------------- limits

    async def domain(self, name: str) -> Any:
        """A hosted domain's record (``None``: not hosted); while the backend is down,
        the last answer known."""
        key = ("D", name)
        hit = self._cache.get(key)
        if hit is not None:
            return hit or None
        try:
            found = await self._query(lambda b: b.get_domain(name))
        except (BackendUnavailable, TimeoutError) as e:
            stale = self._cache.get_stale(key)
            if stale is None:
                raise RuntimeError(f"datasource unavailable: {e or 'timed out'}") from None
            return stale or None
        self._cache.put(key, found or False)
        return found

    @hookimpl
    async def rate_limits(self, kind: str, key: str) -> dict[str, int | None] | None:
        """The limits of mail from a hosted domain, or by a user, of their own: the
        domain's ``messages_per_hour``/``messages_per_day``, the user's
        ``messages_per_hour`` and ``daily_quota`` (``0``: no limit)."""
        if kind == "domain":
            d = await self.domain(key.rstrip("."))
            if d is None or (d.messages_per_hour is None and d.messages_per_day is None):
                return None
            return {"per_hour": d.messages_per_hour, "per_day": d.messages_per_day}
        if kind != "user" or self.accounts is None:
            return None
        try:
            user = await self.accounts.user(key)
        except (BackendUnavailable, TimeoutError) as e:
            raise RuntimeError(f"datasource unavailable: {e or 'timed out'}") from None
        if user is None or (user.messages_per_hour is None and user.daily_quota is None):
            return None
        return {"per_hour": user.messages_per_hour, "per_day": user.daily_quota}

    # -------------------------------------------------------------- DKIM keys

    @hookimpl
    async def dkim_keys(self, domain: str) -> list[Any] | None:
        """The DKIM signing keys of a hosted domain (``elemta domains dkim add``), or
        ``None`` when it has none. A backend that cannot answer raises: the signer
        refuses the message for now rather than send it unsigned."""
        key = ("k", domain)
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = tuple(await self._query(lambda b: b.dkim_keys(domain)))
            except (BackendUnavailable, TimeoutError) as e:
                raise RuntimeError(f"datasource unavailable: {e or 'timed out'}") from None
            self._cache.put(key, hit)
        return list(hit) or None  # type: ignore[arg-type]

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
        if res.kind == "reject" and self._postmaster(recipient.address, res):
            # RFC 5321 §4.5.1: postmaster at every domain we accept mail for, mailbox or
            # not; it goes where the core sends postmaster@ its own domains
            target = self.app.settings.postmaster_address
            if recipient.address.lower() != target.lower():
                recipient.rewrite([target])
                log.info("%s: <%s> → <%s> ([server] postmaster)", tx.id, recipient.address,
                         target)
            return Accept()
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
    async def data(self, session: Any, tx: Any, message: Any) -> Any:
        if self.accounts is not None and session.auth_user is not None:
            verdict = await self.accounts.check_data(session, tx, message)
            if verdict is not None:
                return verdict
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
        """Hosted domains go to the local transport, but only for addresses that are
        mailboxes: mail that never passed RCPT (a bounce) for an unknown address
        fails, and for an alias is passed on to its members."""
        domain = recipient.address.rpartition("@")[2].lower().rstrip(".")
        if not domain:
            return None
        # Unknown while the backend is down (and never answered for this domain):
        # BackendUnavailable propagates and the runner keeps the recipient queued
        # (451) rather than guess between our mailboxes and the domain's MX.
        if not await self.hosted(domain):
            return None
        try:
            res = await self.resolve(recipient.address)
        except (BackendUnavailable, TimeoutError):
            stale = self._cache.get_stale(("r", recipient.address))
            if stale is None:
                # down: this address passed RCPT (or the last answer said so); the
                # local transport defers what has no mailbox
                return Route(transport=self.settings.transport, destination=domain)
            res = stale  # type: ignore[assignment]
        if res.kind == "reject":
            if self._postmaster(recipient.address, res):
                return Route(transport=self.settings.transport, destination=domain)
            return Route(transport=UNKNOWN, destination=domain)
        if res.deliver_to is not None and not _keeps_a_copy(recipient.address, res.deliver_to):
            return Route(transport=ALIAS, destination=domain)
        # a mailbox, or one with a forward rule: its own copy of a message whose recipients
        # were already expanded at RCPT (passing it on again would never end)
        return Route(transport=self.settings.transport, destination=domain)

    @hookimpl
    async def deliver(self, envelope: Any, route: Route, recipients: list[Any],
                      content_path: str) -> list[Outcome] | None:
        if route.transport == UNKNOWN:
            outcomes = []
            for r in recipients:
                res = await self.resolve(r.address)
                if res.kind != "reject":          # it became a mailbox meanwhile
                    outcomes.append(Outcome(r.address, 451, "4.3.0", "the address changed; "
                                            "trying again"))
                    continue
                log.info("%s: <%s> is no mailbox here: %d %s", envelope.id, r.address,
                         res.code, res.text)
                outcomes.append(Outcome(r.address, res.code, res.enhanced, res.text))
            return outcomes
        if route.transport == ALIAS:
            return [await self._pass_on(envelope, r.address, content_path) for r in recipients]
        return None

    async def _pass_on(self, envelope: Any, address: str, content_path: str) -> Outcome:
        """Queue the message again for an alias's members (durable before the 250)."""
        res = await self.resolve(address)
        if res.kind != "accept" or not res.deliver_to:
            return Outcome(address, 451, "4.3.0", "the alias changed; trying again")
        try:
            with open(content_path, "rb") as f:
                content = f.read(MAX_PASSED_ON + 1)
        except OSError as e:
            return Outcome(address, 451, "4.3.0", f"cannot read the message: {e.strerror}")
        if len(content) > MAX_PASSED_ON:
            return Outcome(address, 552, "5.3.4", "message too big to pass on to an alias")
        queue_id = await self.app.queue_message(envelope.sender, list(res.deliver_to), content,
                                                note=f"alias <{address}> of {envelope.id}")
        log.info("%s: <%s> passed on to %s as %s", envelope.id, address,
                 ", ".join(f"<{a}>" for a in res.deliver_to), queue_id)
        return Outcome(address, 250, "2.1.5", f"passed on to {len(res.deliver_to)} "
                       f"recipient(s) as {queue_id}")


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so that asyncio does not report it."""
    if not task.cancelled():
        task.exception()


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _keeps_a_copy(address: str, deliver_to: tuple[str, ...]) -> bool:
    """Whether ``address`` is among its own final recipients (a forward rule)."""
    lowered = address.lower()
    return any(target.lower() == lowered for target in deliver_to)
