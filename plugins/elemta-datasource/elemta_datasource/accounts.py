"""Logins and what they may send: the datasource's side of authenticated submission.

* **Who logs in** is the password source's answer (:mod:`.sources`), after
  which the directory's user record may still say the account is disabled.
  A login that succeeded is remembered for ``cache_seconds`` (by a keyed hash
  of the password, never the password), so a phone that connects for every
  message does not pay argon2 each time.
* **What a login may send as** (RFC 6409 §6.1): the envelope sender and every
  ``From:`` address must be the login itself (with or without ``+detail``),
  an alias that delivers to it, or granted to it (``send_as``: an address,
  ``@domain`` or ``*``); otherwise ``553 5.7.1``. The null sender is allowed.
* **Limits** from the user record: the largest message (``552 5.3.4``) and
  messages per day (``daily_quota``: ``450 4.7.1`` until midnight UTC; ``0``
  or none: no limit), counted when a message is queued. ``daily_quota`` and
  ``messages_per_hour`` are also what the ``rate_limits`` hook answers for the
  user (``per_day``, ``per_hour``), so that a rate limiter applies the same
  numbers instead of its configured per-user ones.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import hmac
import logging
import os
import time
from typing import Any, Awaitable, Callable

from elemta import Accept, Reject, ScramKeys, StashKey, TempFail

from .directory import (BackendUnavailable, DirectoryError, TTLCache, User, normalize_login,
                        split_detail)
from .hashing import Busy, Verifier
from .settings import AuthSettings
from .sources import PasswordSource

log = logging.getLogger("elemta.datasource")

# per transaction: the message was counted against its user's daily quota
_counted = StashKey[bool]()

Query = Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]]

TEMPORARY = TempFail(454, "4.7.0", "Temporary authentication failure")
BUSY_LOG_SECONDS = 60.0
LOOKUP_FAILED = TempFail(451, "4.3.0", "Temporary lookup failure, try again later")


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


class Accounts:
    """The ``auth``, ``scram_keys`` and ``authorize`` answers and the sender policy."""

    def __init__(self, settings: AuthSettings, source: PasswordSource | None,
                 verifier: Verifier, query: Query, delimiter: str,
                 cache_seconds: float) -> None:
        self.settings = settings
        self.source = source
        self.verifier = verifier
        self.query = query            # a backend call with the lookup timeout
        self.delimiter = delimiter
        self._users = TTLCache(cache_seconds)
        self._logins = TTLCache(settings.cache_seconds)
        self._secret = os.urandom(32)
        self._busy = 0
        self._busy_logged = 0.0

    def mechanisms(self) -> list[str]:
        if self.source is None:
            return []
        if self.settings.source == "directory":
            return ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
        return ["PLAIN", "LOGIN"]

    # -------------------------------------------------------------- records

    async def user(self, login: str) -> User | None:
        key = ("u", login)
        hit = self._users.get(key)
        if hit is not None:
            return hit or None  # type: ignore[return-value]
        found = await self.query(lambda b: b.get_user(login))
        self._users.put(key, found or False)
        return found

    async def _aliases_to(self, login: str) -> list[str]:
        key = ("a", login)
        hit = self._users.get(key)
        if hit is not None:
            return hit  # type: ignore[return-value]
        found = await self.query(lambda b: b.aliases_to(login))
        self._users.put(key, found)
        return found

    # -------------------------------------------------------------- AUTH

    async def login(self, session: Any, credentials: Any) -> Any:
        """The ``auth`` verdict for PLAIN and LOGIN credentials."""
        if self.source is None:
            return None
        typed, password = credentials.login, credentials.password
        try:
            login = normalize_login(typed)
        except DirectoryError:
            login = typed
        if not password or any(c in typed for c in "\0\r\n"):
            return Reject(535, "5.7.8", "Authentication credentials invalid")
        proof = hmac.new(self._secret, f"{login}\0{password}".encode("utf-8", "surrogateescape"),
                         hashlib.sha256).digest()
        canonical = self._logins.get((login, proof))
        if canonical is None:
            try:
                canonical = await self.source.verify(
                    login, password, peer_ip=session.peer_ip, secured=session.tls is not None,
                    local_ip=session.local[0] or None)
            except Busy as e:
                self._busy += 1
                now = time.monotonic()
                if now >= self._busy_logged + BUSY_LOG_SECONDS:   # a flood: one line a minute
                    log.warning("datasource: %d login(s) answered 454 4.7.0 in the last %.0f s: "
                                "%s (max_concurrent_verifications, max_waiting_verifications)",
                                self._busy, now - self._busy_logged if self._busy_logged
                                else 0, e)
                    self._busy, self._busy_logged = 0, now
                return TEMPORARY
            except (BackendUnavailable, TimeoutError) as e:
                log.warning("datasource: cannot check the password of %s now: %s", login,
                            e or "timed out")
                return TEMPORARY
            if canonical is None:
                return Reject(535, "5.7.8", "Authentication credentials invalid")
        try:
            user = await self.user(_canonical(canonical))
        except (BackendUnavailable, TimeoutError) as e:
            log.warning("datasource: cannot read user %s now: %s", canonical, e or "timed out")
            return TEMPORARY
        if user is not None and user.disabled:
            log.info("datasource: %s logged in with the right password but is disabled",
                     canonical)
            return Reject(535, "5.7.8", "Authentication credentials invalid")
        self._logins.put((login, proof), canonical)
        return Accept(identity=_canonical(canonical))

    async def scram_keys(self, login: str) -> ScramKeys | None:
        """The stored SCRAM keys of an enabled directory user; ``None`` otherwise."""
        if self.source is None or self.settings.source != "directory":
            return None
        try:
            user = await self.user(normalize_login(login))
        except DirectoryError:
            return None
        if user is None or user.disabled or not user.scram:
            return None
        try:
            return ScramKeys.parse(user.scram)
        except ValueError as e:
            log.error("datasource: the SCRAM keys of %s cannot be read (%s); set the password "
                      "again with `elemta users passwd %s`", login, e, login)
            return None

    async def authorize(self, login: str, authzid: str) -> bool | None:
        """``login`` may act as ``authzid`` when a ``send_as`` grant names it."""
        if self.source is None:
            return None
        try:
            user = await self.user(_canonical(login))
            target = normalize_login(authzid)
        except DirectoryError:
            return False
        return user is not None and not user.disabled and _granted(user.send_as, target)

    # -------------------------------------------------------------- sending

    async def may_send_as(self, login: str, address: str) -> bool:
        if not address:
            return True                      # the null sender: bounces, receipts
        try:
            wanted = normalize_login(address)
        except DirectoryError:
            return False
        base, _ = split_detail(wanted, self.delimiter)
        login = _canonical(login)
        if wanted == login or base == login:
            return True
        user = await self.user(login)
        if user is not None and (_granted(user.send_as, wanted) or _granted(user.send_as, base)):
            return True
        aliases = await self._aliases_to(login)
        return wanted in aliases or base in aliases

    async def check_mail(self, session: Any, tx: Any, sender: str) -> Any:
        """MAIL FROM of an authenticated session: ownership, size and daily quota."""
        login = session.auth_user
        if login is None or self.source is None:
            return None
        try:
            if self.settings.enforce_sender and not await self.may_send_as(login, sender):
                log.info("%s: %s may not send as <%s>", tx.id, login, sender)
                return Reject(553, "5.7.1", f"<{sender}>: Sender address rejected: not owned "
                              f"by user {login}")
            user = await self.user(_canonical(login))
            if user is None:
                return None
            limit = user.max_message_bytes
            declared = _int(tx.mail_params.get("SIZE"))
            if limit is not None and declared is not None and declared > limit:
                return Reject(552, "5.3.4", f"Message too big for user {login} (at most "
                              f"{limit} bytes)")
            if user.daily_quota:                    # None or 0: no daily limit
                sent = await self.query(lambda b: b.count_sent(user.address, today()))
                if sent >= user.daily_quota:
                    log.info("%s: %s has sent %d messages today (daily_quota %d)", tx.id, login,
                             sent, user.daily_quota)
                    return TempFail(450, "4.7.1", f"Daily limit of {user.daily_quota} "
                                    f"messages reached for {login}; try again tomorrow")
        except (BackendUnavailable, TimeoutError) as e:
            log.warning("%s: datasource lookup for %s failed: %s", tx.id, login, e or "timed out")
            return LOOKUP_FAILED
        return None

    async def check_data(self, session: Any, tx: Any, message: Any) -> Any:
        """End of DATA of an authenticated session: header From: and the size limit."""
        login = session.auth_user
        if login is None or self.source is None:
            return None
        try:
            if self.settings.enforce_sender and self.settings.check_header_from:
                for _, address in email.utils.getaddresses(message.get_all("From")):
                    if not await self.may_send_as(login, address):
                        log.info("%s: %s may not write From: <%s>", tx.id, login, address)
                        return Reject(553, "5.7.1", f"From: <{address}> is not an address of "
                                      f"user {login}")
            user = await self.user(_canonical(login))
        except (BackendUnavailable, TimeoutError) as e:
            log.warning("%s: datasource lookup for %s failed: %s", tx.id, login, e or "timed out")
            return LOOKUP_FAILED
        if user is not None and user.max_message_bytes is not None \
                and message.size > user.max_message_bytes:
            return Reject(552, "5.3.4", f"Message too big for user {login} (at most "
                          f"{user.max_message_bytes} bytes)")
        return None

    async def queued(self, session: Any, tx: Any) -> None:
        """Count a queued message against its user's daily quota."""
        login = session.auth_user
        if login is None or self.source is None:
            return
        user = await self.user(_canonical(login))
        if user is not None and user.daily_quota:
            await self.query(lambda b: b.add_sent(user.address, today()))


def _canonical(login: str) -> str:
    try:
        return normalize_login(login)
    except DirectoryError:
        return login


def _granted(grants: tuple[str, ...], address: str) -> bool:
    domain = "@" + address.rpartition("@")[2]
    return any(g == "*" or g == address or g == domain for g in grants)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
