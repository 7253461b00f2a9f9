"""Which limits apply to a connection, a transaction, a recipient; taking and giving back.

Every limit is a GCRA rate in the server's state store (``app.state``), so it
is exact under concurrency and shared by every node pointed at the same
Redis. A message is reserved when it is announced (``MAIL``, and ``RCPT`` for
limits per recipient) and the reservation is given back unless the message
is queued: a refused or abandoned message costs nothing, yet two sessions
racing for the last unit cannot both have it. Keys::

    ratelimit:conn:<ip>                       leases: connections open now
    ratelimit:connrate:<ip>                   connections per minute
    ratelimit:<kind>:<hour|day>:<value>       messages (kind: ip, sender, domain, user,
                                              recipient)
    ratelimit:limit:<domain|user>:<hour|day>:<value>
                                              a limit of that domain or user's own, from the
                                              ``rate_limits`` hook (for ``elemta ratelimit
                                              status``; ``0``: no limit)

A domain's or a user's own limits come first from the ``rate_limits`` hook
(the datasource), window by window, then from ``domains``/``users`` in the
configuration, then from ``domain``/``user``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from elemta import StateStore

from .settings import RatelimitSettings, Window

PREFIX = "ratelimit:"
WINDOWS = (("hour", "per_hour", 3600.0), ("day", "per_day", 86_400.0))

Own = Mapping[str, Any]      # a rate_limits answer: per_hour/per_day, 0 = no limit


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit that applies: what it counts, the value it counts for, its size."""

    kind: str            # ip, sender, domain, user, recipient
    value: str
    window: str          # hour, day
    limit: int
    period: float

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.kind}:{self.window}:{self.value}"

    def describe(self) -> str:
        return f"{self.limit} messages per {self.window} for {self.kind} {self.value}"


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: Limit
    retry_after: float


def message_limits(settings: RatelimitSettings, ip: str, sender: str,
                   user: str | None, own_domain: Own | None = None,
                   own_user: Own | None = None) -> list[Limit]:
    """The limits a message of this client, sender and user counts against; ``own_domain``
    and ``own_user`` are the ``rate_limits`` answers for the sender's domain and the user."""
    out: list[Limit] = []
    sender = sender.lower()
    domain = sender.rpartition("@")[2]
    subjects: list[tuple[str, str, Window, Own | None]] = [("ip", ip, settings.ip, None)]
    if sender:
        subjects.append(("sender", sender, settings.sender, None))
        subjects.append(("domain", domain, settings.domains.get(domain, settings.domain),
                         own_domain))
    if user is not None:
        subjects.append(("user", user.lower(), settings.users.get(user.lower(), settings.user),
                         own_user))
    for kind, value, window, own in subjects:
        out += [Limit(kind, value, name, limit, period)
                for name, limit, period in effective(window, own)]
    return out


def effective(window: Window, own: Own | None) -> list[tuple[str, int, float]]:
    """``(name, limit, period)`` of each limit: the configured ``window``, each of whose
    windows ``own`` may replace (a number) or lift (``0``)."""
    if not own:
        return window.limits()
    out = []
    for name, field, period in WINDOWS:
        value = own.get(field)
        if value is None:
            value = getattr(window, field)
        if value:
            out.append((name, value, period))
    return out


def checked_own(answer: Any) -> Own | None:
    """A ``rate_limits`` answer, checked: ``ValueError`` says what is wrong with it."""
    if answer is None:
        return None
    if not isinstance(answer, Mapping):
        raise ValueError(f"rate_limits answered {type(answer).__name__}, not a mapping")
    extra = set(answer) - {"per_hour", "per_day"}
    if extra:
        raise ValueError(f"rate_limits answered unknown key(s) {sorted(extra)} (per_hour, "
                         "per_day)")
    for field, value in answer.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(f"rate_limits answered {field} = {value!r}: a number of "
                             "messages, 0 for no limit, or None")
    return {f: answer.get(f) for f in ("per_hour", "per_day")}


def recipient_limits(settings: RatelimitSettings, recipient: str) -> list[Limit]:
    return [Limit("recipient", recipient.lower(), name, limit, period)
            for name, limit, period in settings.recipient.limits()]


async def reserve(store: StateStore, limits: list[Limit]) -> tuple[list[Limit], Refusal | None]:
    """Take one unit of each limit, all or none, in one store operation:
    ``(taken, None)``, or ``([], the refusal that waits longest)``."""
    answers = await store.rates([(lim.key, lim.limit, lim.period) for lim in limits])
    refused = [(a.retry_after, lim) for a, lim in zip(answers, limits) if not a.allowed]
    if refused:
        wait, limit = max(refused, key=lambda r: r[0])
        return [], Refusal(limit, wait)
    return limits, None


async def give_back(store: StateStore, limits: list[Limit]) -> None:
    if limits:
        await store.rates([(lim.key, lim.limit, lim.period) for lim in limits], cost=-1)
