"""The one DNS resolver: SPF, DKIM, DMARC, delivery and plugins all ask it.

It asks the recursive nameservers of ``[dns]`` through dnspython and caches
their answers for as long as their TTLs say. Results are plain values (``MX``,
strings), never dnspython objects, and every failure has a type:

- :class:`NXDomain` and :class:`NoData`: the name, or the record, does not exist;
- :class:`TempError`: the answer could not be found out (timeout, ``SERVFAIL``,
  ``REFUSED``, a malformed or nonsensical answer, a network error). Callers turn
  it into a temporary failure (``451``, ``temperror``), never into a pass;
- :class:`InvalidName`: the name cannot be asked about at all.

Names may be given with U-labels (``bücher.example``); they are encoded with
IDNA 2008 (UTS #46 mapping). Names in results are lower-case A-labels without
the final dot.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename

from .config import ConfigError, DNSSettings, parse_hostport

__all__ = [
    "MX", "DNSError", "InvalidName", "NXDomain", "NoData", "NotFound", "NullMX", "Resolver",
    "TempError", "to_name",
]

# the EDNS buffer size of DNS Flag Day 2020: larger UDP answers risk IP
# fragmentation, which is lost or spoofable, so they come over TCP instead
EDNS_PAYLOAD_BYTES = 1232

# characters that have a meaning in DNS presentation format, or that no
# hostname, selector or macro-expanded SPF name can contain
# Characters with a meaning in DNS presentation format. A space is an ordinary octet
# in a label (SPF macros can expand to one, RFC 7208 §7.3), so it is allowed.
_FORBIDDEN = frozenset('\t\r\n\\()";')

# what the answer section of a no-data answer may hold: the CNAME chain that led
# to the name, DNAMEs that synthesised it, and their signatures
_CHAIN_TYPES = frozenset({dns.rdatatype.CNAME, dns.rdatatype.DNAME, dns.rdatatype.RRSIG})

_META_TYPES = frozenset({dns.rdatatype.ANY, dns.rdatatype.AXFR, dns.rdatatype.IXFR,
                         dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY})


class DNSError(Exception):
    """Base class of every error a lookup raises."""

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        self.name = name
        self.rdtype = rdtype
        self.reason = reason
        super().__init__(f"{name} {rdtype}: {reason}" if rdtype else f"{name}: {reason}")


class InvalidName(DNSError, ValueError):
    """The name is not a valid DNS name (or the address not an IP address)."""


class NotFound(DNSError):
    """The DNS answered, authoritatively, that there is nothing there."""


class NXDomain(NotFound):
    """The name does not exist (``NXDOMAIN``)."""


class NoData(NotFound):
    """The name exists but has no record of this type (``NOERROR`` with no answer)."""


class NullMX(DNSError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail at all."""


class TempError(DNSError):
    """The answer could not be found out; asking again later may work."""


@dataclass(frozen=True, slots=True)
class MX:
    """One MX host; ``host`` is a lower-case A-label without the final dot."""

    preference: int
    host: str


@dataclass(frozen=True, slots=True)
class _Entry:
    """One cached outcome of a (name, rdtype) lookup."""

    records: tuple[dns.rdata.Rdata, ...] = ()
    error: type[DNSError] | None = None
    reason: str = ""
    ttl: float = 0.0

    def unwrap(self, name: dns.name.Name, rdtype: int) -> tuple[dns.rdata.Rdata, ...]:
        # a fresh exception per caller: one shared instance would collect the
        # tracebacks of every coroutine that re-raised it
        if self.error is not None:
            raise self.error(_text(name), dns.rdatatype.to_text(rdtype), self.reason)
        return self.records


@functools.lru_cache(maxsize=4096)
def to_name(name: str) -> dns.name.Name:
    """``name`` as an absolute DNS name, U-labels encoded with IDNA 2008.

    Remembered for the last few thousand names: parsing a name costs more
    than a cached lookup, and the same few names are asked again and again.

    :raises InvalidName: if it is not a valid DNS name.
    """
    if not isinstance(name, str):
        raise InvalidName(repr(name), "", "a DNS name must be a string")
    if not name or name == "@" or any(c in _FORBIDDEN or ord(c) < 0x20 for c in name):
        raise InvalidName(repr(name), "", "not a DNS name")
    try:
        return dns.name.from_text(name, origin=dns.name.root,
                                  idna_codec=dns.name.IDNA_2008_Practical)
    except dns.name.NoIDNA2008:
        raise InvalidName(repr(name), "", "non-ASCII names need the idna package "
                          "(pip install idna)") from None
    except dns.name.EmptyLabel:
        raise InvalidName(repr(name), "", "not a DNS name: empty label") from None
    except dns.name.LabelTooLong:
        raise InvalidName(repr(name), "", "not a DNS name: a label is longer than "
                          "63 octets") from None
    except dns.name.NameTooLong:
        raise InvalidName(repr(name), "", "not a DNS name: longer than 255 octets") from None
    except (dns.exception.DNSException, UnicodeError) as e:
        raise InvalidName(repr(name), "", f"not a DNS name: {e}") from None


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _nameservers(settings: DNSSettings) -> list[dns.nameserver.Nameserver]:
    if settings.nameservers:
        return [dns.nameserver.Do53Nameserver(*parse_hostport(ns, "a nameserver"))
                for ns in settings.nameservers]
    try:
        system = dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration as e:
        raise ConfigError([(f"[dns] nameservers is empty, and the system's resolver "
                            f"configuration cannot be used ({e}); list the nameservers, "
                            'such as nameservers = ["127.0.0.1:53"]')]) from None
    out = []
    for ns in system.nameservers:
        if isinstance(ns, dns.nameserver.Nameserver):
            out.append(ns)
        else:
            out.append(dns.nameserver.Do53Nameserver(ns, system.port))
    return out


def _wrong_answer(response: dns.message.Message) -> bool:
    """Whether a no-data answer carries records that have no business there: of
    another type, or of the type asked for but under another name."""
    return any(rrset.rdtype not in _CHAIN_TYPES for rrset in response.answer)


def _negative_ttl(response: dns.message.Message, cap_seconds: int) -> float:
    """How long a negative answer may be cached (RFC 2308 §5)."""
    chain = response.resolve_chaining()
    if not any(rrset.rdtype == dns.rdatatype.SOA and chain.canonical_name.is_subdomain(rrset.name)
               for rrset in response.authority):
        # without the zone's SOA there is no negative TTL to honour
        return 0.0
    return float(min(chain.minimum_ttl, cap_seconds))


class Resolver:
    """An async, caching stub resolver configured by ``[dns]``.

    :param clock: a monotonic clock in seconds; tests replace it to expire the cache.
    :param rng: the random source that orders MX hosts of equal preference.
    """

    def __init__(self, settings: DNSSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.settings = settings = settings if settings is not None else DNSSettings()
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = _nameservers(settings)
        self._resolver.timeout = settings.timeout_seconds
        self._resolver.lifetime = (settings.timeout_seconds * settings.attempts
                                   * len(self._resolver.nameservers))
        self._resolver.use_edns(0, 0, EDNS_PAYLOAD_BYTES)
        self._resolver.use_search_by_default = False
        self._resolver.retry_servfail = False
        # keyed by the name as the caller wrote it: a str hashes once, a dns.name.Name
        # hashes label by label in Python on every lookup
        self._cache: OrderedDict[tuple[str, int], tuple[float, _Entry]] = OrderedDict()
        self._inflight: dict[tuple[str, int], asyncio.Task[_Entry]] = {}

    # ------------------------------------------------------------ the record types

    async def mx(self, domain: str) -> list[MX]:
        """The MX hosts of ``domain``, most preferred first.

        Hosts of equal preference come in a new random order on each call, which
        spreads the load as RFC 5321 §5.1 requires. A ``.`` host among real ones
        is left out.

        :raises NullMX: if the only MX is ``.`` (RFC 7505).
        :raises NoData: if ``domain`` has no MX; deliver to its addresses instead.
        """
        name = to_name(domain)
        records = await self._lookup(domain, name, dns.rdatatype.MX)
        hosts = [MX(r.preference, _text(r.exchange)) for r in records]  # type: ignore[attr-defined]
        real = [h for h in hosts if h.host != "."]
        if not real:
            raise NullMX(_text(name), "MX", "the domain accepts no mail (null MX)")
        return sorted(real, key=lambda h: (h.preference, self._rng.random()))

    async def a(self, name: str) -> list[str]:
        """The IPv4 addresses of ``name``."""
        records = await self._lookup(name, to_name(name), dns.rdatatype.A)
        return [r.address for r in records]  # type: ignore[attr-defined]

    async def aaaa(self, name: str) -> list[str]:
        """The IPv6 addresses of ``name``."""
        records = await self._lookup(name, to_name(name), dns.rdatatype.AAAA)
        return [r.address for r in records]  # type: ignore[attr-defined]

    async def addresses(self, name: str) -> list[str]:
        """The IPv6 then the IPv4 addresses of ``name``, looked up together.

        When one family fails temporarily and the other has addresses, those are
        returned: a host is reachable at any of them. Use :meth:`a` and
        :meth:`aaaa` when every address matters.

        :raises NoData: if the name has neither.
        :raises TempError: if neither could be found and one lookup failed.
        """
        qname = to_name(name)
        results = await asyncio.gather(self._lookup(name, qname, dns.rdatatype.AAAA),
                                       self._lookup(name, qname, dns.rdatatype.A),
                                       return_exceptions=True)
        found: list[str] = []
        errors: list[DNSError] = []
        for result in results:
            if isinstance(result, DNSError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                found.extend(r.address for r in result)  # type: ignore[attr-defined]
        if found:
            return found
        for kind in (TempError, NXDomain):
            for error in errors:
                if isinstance(error, kind):
                    raise error
        raise NoData(_text(qname), "AAAA/A", "the name has no address")

    async def txt(self, name: str) -> list[str]:
        """The TXT records of ``name``, one string per record.

        The character-strings of one record are joined, as SPF, DKIM and DMARC
        read them; bytes that are not UTF-8 become U+FFFD.
        """
        return [b.decode("utf-8", "replace") for b in await self.txt_bytes(name)]

    async def txt_bytes(self, name: str) -> list[bytes]:
        """Like :meth:`txt`, as the raw bytes."""
        records = await self._lookup(name, to_name(name), dns.rdatatype.TXT)
        return [b"".join(r.strings) for r in records]  # type: ignore[attr-defined]

    async def ptr(self, ip: str) -> list[str]:
        """The host names of an IPv4 or IPv6 address (reverse DNS)."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidName(repr(ip), "PTR", "not an IP address") from None
        qname = dns.reversename.from_address(str(address))
        records = await self._lookup(str(qname), qname, dns.rdatatype.PTR)
        return [_text(r.target) for r in records]  # type: ignore[attr-defined]

    async def exists(self, name: str) -> bool:
        """Whether ``name`` exists at all, with any record (RFC 9091 for DMARC ``np``).

        :raises TempError: if that could not be found out.
        """
        try:
            await self._lookup(name, to_name(name), dns.rdatatype.A)
        except NoData:
            return True
        except NXDomain:
            return False
        return True

    async def query(self, name: str, rdtype: str | int) -> list[str]:
        """Any record type, for plugins: each record in presentation format
        (``"10 mx1.example.com."``, ``'"v=spf1" " -all"'``)."""
        try:
            qtype = dns.rdatatype.RdataType.make(rdtype)
        except (dns.exception.DNSException, ValueError):
            raise ValueError(f"unknown DNS record type {rdtype!r}") from None
        if qtype in _META_TYPES:
            raise ValueError(f"{dns.rdatatype.to_text(qtype)} is not a record type one can look up")
        return [r.to_text() for r in await self._lookup(name, to_name(name), qtype)]

    async def dkim_dnsfunc(self, name: bytes, timeout: float = 5) -> bytes:
        """dkimpy's async ``dnsfunc``: the key record at ``name``, or ``b""``.

        ``b""`` (no such record, or a name that cannot exist) makes dkimpy
        report a missing key. A lookup that fails raises :class:`TempError`,
        which dkimpy does not catch, so the DKIM check can report ``temperror``
        instead of ``fail``.
        """
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return b""
        try:
            qname = to_name(text)
            entry = self._cached((text, dns.rdatatype.TXT))
            if entry is not None:  # answered from the cache: no time limit to set up
                records = entry.unwrap(qname, dns.rdatatype.TXT)
            else:
                async with asyncio.timeout(timeout):
                    records = await self._lookup(text, qname, dns.rdatatype.TXT)
        except (NotFound, InvalidName):
            return b""
        except TimeoutError:
            raise TempError(text, "TXT", f"no answer within {timeout} s") from None
        return b"".join(records[0].strings) if records else b""  # type: ignore[attr-defined]

    # ------------------------------------------------------------ cache and lookups

    def clear_cache(self) -> None:
        """Forget every cached answer (lookups under way still finish)."""
        self._cache.clear()

    async def _lookup(self, name: str, qname: dns.name.Name,
                      rdtype: dns.rdatatype.RdataType) -> tuple[dns.rdata.Rdata, ...]:
        """The records of ``qname`` (``to_name(name)``), cached under ``name``."""
        key = (name, int(rdtype))
        entry = self._cached(key)
        if entry is None:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._fetch(qname, rdtype))
                self._inflight[key] = task
                task.add_done_callback(lambda t: self._landed(key, t))
            # one caller giving up must not cancel the lookup the others wait for
            entry = await asyncio.shield(task)
        return entry.unwrap(qname, rdtype)

    def _cached(self, key: tuple[str, int]) -> _Entry | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        expires, entry = hit
        if self._clock() >= expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry

    def _landed(self, key: tuple[str, int], task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled() or task.exception() is not None:
            return
        entry = task.result()
        if entry.error is not TempError and entry.ttl > 0:
            self._store(key, entry)

    def _store(self, key: tuple[str, int], entry: _Entry) -> None:
        limit = self.settings.cache_max_entries
        if limit == 0:
            return
        self._cache[key] = (self._clock() + entry.ttl, entry)
        self._cache.move_to_end(key)
        while len(self._cache) > limit:
            self._cache.popitem(last=False)

    async def _fetch(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Entry:
        cap = self.settings.negative_ttl_seconds
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as e:
            response = e.responses().get(qname)
            ttl = _negative_ttl(response, cap) if response is not None else 0.0
            return _Entry(error=NXDomain, reason="no such domain (NXDOMAIN)", ttl=ttl)
        except dns.resolver.LifetimeTimeout:
            return _Entry(error=TempError, reason=f"no answer within "
                          f"{self._resolver.lifetime:g} s (timeout)")
        except dns.resolver.NoNameservers as e:
            return _Entry(error=TempError, reason=f"no nameserver gave a usable answer ({e})")
        except (dns.exception.DNSException, OSError) as e:
            # a malformed, truncated-over-TCP or otherwise unusable answer
            return _Entry(error=TempError, reason=f"lookup failed ({type(e).__name__}: {e})")
        if answer.rrset is None:
            if _wrong_answer(answer.response):
                return _Entry(error=TempError,
                              reason="the answer holds records that were not asked for")
            return _Entry(error=NoData, reason="no record of this type (NODATA)",
                          ttl=_negative_ttl(answer.response, cap))
        s = self.settings
        ttl = min(max(answer.chaining_result.minimum_ttl, s.min_ttl_seconds), s.max_ttl_seconds)
        return _Entry(records=tuple(answer.rrset), ttl=ttl)

