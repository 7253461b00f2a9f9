"""Failed logins: slow down, then lock out, a client that guesses passwords.

Counted in this server process, over a sliding window (``[auth]
window_seconds``):

* **per client address** (an IPv6 client by its /64, which one customer
  usually holds whole): from ``slow_after_failures`` on, every AUTH reply to
  that address waits 1, 2, 4… seconds (at most ``max_delay_seconds``),
  success or not, so the delay tells nothing; at ``lock_after_failures`` the
  address gets ``454 4.7.0`` for ``lock_seconds`` without its password being
  checked.
* **per login**: at ``user_lock_after_failures`` failures from anywhere, the
  login is refused the same way, except from the addresses it logged in from
  before: the owner keeps working while a botnet guesses their password.

A success does not reset an address's count (one valid account would
otherwise let it guess the others); failures simply age out of the window.
The tables hold at most ``MAX_KEYS`` entries each and forget the oldest.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict, deque
from typing import Callable

from ..config import AuthSettings

log = logging.getLogger("elemta.smtp")

MAX_KEYS = 100_000
KNOWN_ADDRESSES_PER_LOGIN = 16
KNOWN_SECONDS = 30 * 86_400.0


def client_key(ip: str) -> str:
    """The unit failures are counted by: the address, or an IPv6 address's /64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class _Failures:
    """Timestamps of recent failures per key, bounded in keys and per key."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._by_key: OrderedDict[str, deque[float]] = OrderedDict()

    def add(self, key: str, now: float) -> None:
        times = self._by_key.get(key)
        if times is None:
            if len(self._by_key) >= MAX_KEYS:
                self._by_key.popitem(last=False)
            times = self._by_key[key] = deque(maxlen=self.keep)
        else:
            self._by_key.move_to_end(key)
        times.append(now)

    def count(self, key: str, since: float) -> int:
        times = self._by_key.get(key)
        if times is None:
            return 0
        while times and times[0] < since:
            times.popleft()
        if not times:
            del self._by_key[key]
            return 0
        return len(times)


class AuthGuard:
    """The failed-login tables of one server process."""

    def __init__(self, settings: AuthSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._clients = _Failures(max(settings.lock_after_failures, settings.slow_after_failures))
        self._logins = _Failures(settings.user_lock_after_failures)
        self._locked: OrderedDict[str, float] = OrderedDict()   # client → until
        self._known: OrderedDict[str, dict[str, float]] = OrderedDict()  # login → client → when

    def _since(self) -> float:
        return self._clock() - self.settings.window_seconds

    def client_locked(self, ip: str) -> float:
        """Seconds left of the address's lock-out; 0 when it may try."""
        key = client_key(ip)
        until = self._locked.get(key)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._locked[key]
            return 0.0
        return left

    def login_locked(self, login: str, ip: str) -> bool:
        """Whether ``login`` is locked for this address (not one it logged in from)."""
        failures = self._logins.count(login.lower(), self._since())
        if failures < self.settings.user_lock_after_failures:
            return False
        seen = self._known.get(login.lower(), {}).get(client_key(ip))
        return seen is None or self._clock() - seen > KNOWN_SECONDS

    def delay(self, ip: str) -> float:
        """How long to wait before answering this address's AUTH."""
        n = self._clients.count(client_key(ip), self._since())
        over = n - self.settings.slow_after_failures
        if over < 0:
            return 0.0
        return min(self.settings.max_delay_seconds, float(2 ** min(over, 16)))

    def failed(self, ip: str, login: str) -> None:
        now = self._clock()
        key = client_key(ip)
        self._clients.add(key, now)
        self._logins.add(login.lower(), now)
        s = self.settings
        if self._clients.count(key, now - s.window_seconds) >= s.lock_after_failures:
            if key not in self._locked:
                log.warning("auth: %s locked out for %.0f s after %d failed logins in %.0f s",
                            key, s.lock_seconds, s.lock_after_failures, s.window_seconds)
            if len(self._locked) >= MAX_KEYS:
                self._locked.popitem(last=False)
            self._locked[key] = now + s.lock_seconds
        if self._logins.count(login.lower(), now - s.window_seconds) == s.user_lock_after_failures:
            log.warning("auth: login %s locked for addresses it never used, after %d failures "
                        "in %.0f s", login, s.user_lock_after_failures, s.window_seconds)

    def succeeded(self, ip: str, login: str) -> None:
        """Remember the address as one ``login`` uses."""
        known = self._known.get(login.lower())
        if known is None:
            if len(self._known) >= MAX_KEYS:
                self._known.popitem(last=False)
            known = self._known[login.lower()] = {}
        else:
            self._known.move_to_end(login.lower())
        key = client_key(ip)
        known.pop(key, None)
        known[key] = self._clock()
        while len(known) > KNOWN_ADDRESSES_PER_LOGIN:
            del known[next(iter(known))]
