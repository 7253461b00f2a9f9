"""Triplet greylisting on the server's shared state store.

A triplet is (client network, envelope sender, recipient). The first time a
triplet is seen it is remembered and refused with ``451 4.7.1``; a retry
after ``delay_seconds`` (and within ``retry_window_seconds`` of the first
try) passes, and the triplet stays passed for ``pass_lifetime_days`` after
its last use. A network that passed ``auto_allow_after`` triplets is
allowed as a whole for as long. Keys in the store (``app.state``; embedded or
Redis, so several servers share them)::

    greylist:t:<network>|<sender>|<recipient>   first try (epoch seconds)
    greylist:p:<network>|<sender>|<recipient>   passed
    greylist:n:<network>                        passes of the network
    greylist:a:<network>                        allowed (auto, or `elemta greylist allow`)

Every step is one atomic store operation, so two servers (or two sessions)
retrying the same triplet at once cannot disagree about it.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Callable, Literal

from elemta import StateStore

from .settings import GreylistSettings

PREFIX = "greylist:"
REFRESH_SECONDS = 3600.0      # a passed triplet's lifetime is renewed at most once an hour
Outcome = Literal["greylisted", "passed", "allowed"]


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    wait: float = 0.0                  # greylisted: seconds until a retry will pass
    auto_allowed: bool = False         # this pass made the network allowed


def network_of(ip: str, settings: GreylistSettings) -> str:
    """The client network a triplet is kept for: the /24 or /64 around ``ip``."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = settings.ipv4_prefix if addr.version == 4 else settings.ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def triplet(network: str, sender: str, recipient: str) -> str:
    return f"{network}|{(sender or '<>').lower()}|{recipient.lower()}"


class Greylist:
    """The decisions, against a store."""

    def __init__(self, store: StateStore, settings: GreylistSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock

    async def check(self, ip: str, sender: str, recipient: str) -> Decision:
        """May this triplet pass now? Raises ``StateUnavailable``."""
        s = self.settings
        net = network_of(ip, s)
        key = triplet(net, sender, recipient)
        lifetime = s.pass_lifetime_days * 86_400
        now = self.clock()
        allowed, passed = await self.store.get_many([f"{PREFIX}a:{net}", f"{PREFIX}p:{key}"])
        if allowed is not None:
            return Decision("allowed")
        if passed is not None:
            if now - float(passed) >= REFRESH_SECONDS:   # its lifetime runs from its last use
                await self.store.put(f"{PREFIX}p:{key}", str(int(now)), lifetime)
            return Decision("passed")
        if await self.store.add(f"{PREFIX}t:{key}", f"{now:.3f}", s.retry_window_seconds):
            return Decision("greylisted", s.delay_seconds)
        first = await self.store.get(f"{PREFIX}t:{key}")
        waited = now - float(first) if first is not None else 0.0
        if first is None or waited < s.delay_seconds:
            if first is None:   # expired in between: this is a first try again
                await self.store.add(f"{PREFIX}t:{key}", f"{now:.3f}", s.retry_window_seconds)
            return Decision("greylisted", s.delay_seconds - waited)
        await self.store.put(f"{PREFIX}p:{key}", str(int(now)), lifetime)
        await self.store.delete(f"{PREFIX}t:{key}")
        auto = False
        if s.auto_allow_after:
            passes = await self.store.incr(f"{PREFIX}n:{net}", lifetime)
            if passes >= s.auto_allow_after:
                auto = await self.store.add(f"{PREFIX}a:{net}", "auto", lifetime)
        return Decision("passed", auto_allowed=auto)

    async def allow(self, network: str, days: float) -> str:
        """Allow a network (or the network of an address) by hand."""
        net = network_of(network, self.settings) if "/" not in network \
            else str(ipaddress.ip_network(network, strict=False))
        await self.store.put(f"{PREFIX}a:{net}", "manual", days * 86_400)
        return net
