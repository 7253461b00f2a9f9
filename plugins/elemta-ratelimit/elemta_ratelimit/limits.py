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
"""

from __future__ import annotations

from dataclasses import dataclass

from elemta import StateStore

from .settings import RatelimitSettings, Window

PREFIX = "ratelimit:"


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
                   user: str | None) -> list[Limit]:
    """The limits a message of this client, sender and user counts against."""
    out: list[Limit] = []
    sender = sender.lower()
    domain = sender.rpartition("@")[2]
    subjects: list[tuple[str, str, Window]] = [("ip", ip, settings.ip)]
    if sender:
        subjects.append(("sender", sender, settings.sender))
        subjects.append(("domain", domain, settings.domains.get(domain, settings.domain)))
    if user is not None:
        subjects.append(("user", user.lower(), settings.users.get(user.lower(), settings.user)))
    for kind, value, window in subjects:
        out += [Limit(kind, value, name, limit, period)
                for name, limit, period in window.limits()]
    return out


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
