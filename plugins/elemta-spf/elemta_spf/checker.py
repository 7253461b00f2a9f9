"""SPF evaluation (RFC 7208 ``check_host()``) with pyspf, over Elemta's own resolver.

pyspf blocks: it asks DNS through a module-level function, ``spf.DNSLookup``,
and waits for each answer. So every check runs in a worker thread of a
bounded pool that belongs to the plugin (the event loop never waits), and
pyspf's DNS function is replaced by one that hands each question back to the
event loop as a coroutine of the server's one resolver (``app.resolver``:
its nameservers, timeouts, cache, TCP fallback), with
:func:`asyncio.run_coroutine_threadsafe`, and waits for the answer in the
worker thread.

The replacement is installed once per process. It finds the check it serves
through a thread-local: a thread that is not running one of our checks gets
pyspf's own DNS function, so other users of pyspf in the process are
unaffected.

Limits: pyspf enforces RFC 7208 §4.6.4 (10 DNS-querying terms, 10 MX or PTR
names, 2 void lookups) in strict mode, which is always used here. On top of
that every check has a deadline (``time_limit_seconds``): a lookup waits at
most until then, and a lookup asked after it fails at once. A DNS failure
(timeout, ``SERVFAIL``, a malformed answer…) ends the check with
``temperror``, never with a pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf

from elemta import DNSError, InvalidName, NotFound, Resolver, TempError

__all__ = ["RESULTS", "SpfChecker", "SpfResult"]

log = logging.getLogger("elemta.spf")

RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
"""The results of RFC 7208 §2.6, as Authentication-Results writes them."""

# what pyspf asks for; anything else is a bug in this module or a new pyspf
_QTYPES = frozenset({"A", "AAAA", "MX", "PTR", "TXT"})


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one ``check_host()`` for one identity.

    ``identity`` is ``"mailfrom"`` or ``"helo"``; ``domain`` is the domain
    whose policy was evaluated (for the HELO identity, the HELO name).
    ``explanation`` is the explanation of a ``fail``: the domain owner's (RFC
    7208 §6.2, already macro-expanded; then ``explained_by_domain`` is true)
    or the default one. ``comment`` says in words why this result came out
    (for logs and ``Received-SPF``); ``mechanism`` is the term that matched,
    or for a ``permerror`` the one in error, when pyspf names it.
    """

    result: str
    identity: str
    domain: str
    client_ip: str
    sender: str
    helo: str
    explanation: str = ""
    explained_by_domain: bool = False
    comment: str = ""
    mechanism: str = ""
    seconds: float = 0.0


class _Lookups:
    """pyspf's DNS function for one check: every question goes to the event loop.

    Called in a worker thread only. ``deadline`` is on the
    :func:`time.monotonic` clock.
    """

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop,
                 deadline: float, time_limit: float) -> None:
        self.resolver = resolver
        self.loop = loop
        self.deadline = deadline
        self.time_limit = time_limit
        self._lock = threading.Lock()
        self._abandoned = False
        self._pending: concurrent.futures.Future[list[Any]] | None = None

    def abandon(self) -> None:
        """Give the check up: the lookup under way and every later one fail at once."""
        with self._lock:
            self._abandoned = True
            pending = self._pending
        if pending is not None:
            pending.cancel()

    def __call__(self, name: str, qtype: str, strict: Any = True,
                 timeout: float | None = None) -> list[tuple[tuple[str, str], Any]]:
        if qtype not in _QTYPES:
            # RFC 7208 §3.1 removed the SPF RR type (99): nobody is to ask for it
            raise spf.TempError(f"refusing to look up {qtype} records for {name}")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise spf.TempError(f"SPF evaluation exceeded its time limit of "
                                f"{self.time_limit:g} s")
        wait = remaining if timeout is None else min(remaining, float(timeout))
        with self._lock:
            if self._abandoned:
                raise spf.TempError("SPF evaluation abandoned")
            ask = self._ask(name, qtype)
            try:
                future = asyncio.run_coroutine_threadsafe(ask, self.loop)
            except RuntimeError:
                # the event loop is closed: the server is stopping
                ask.close()
                raise spf.TempError("the server is stopping") from None
            self._pending = future
        try:
            values = future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise spf.TempError(f"DNS lookup of {name} {qtype} exceeded the SPF time limit "
                                f"of {self.time_limit:g} s") from None
        except concurrent.futures.CancelledError:
            raise spf.TempError("SPF evaluation abandoned") from None
        except TempError as e:
            raise spf.TempError(f"DNS lookup failed: {e}") from None
        finally:
            with self._lock:
                self._pending = None
        return [((name, qtype), value) for value in values]

    async def _ask(self, name: str, qtype: str) -> list[Any]:
        """The answer in the shape pyspf expects, ``[]`` when there is none.

        ``NXDOMAIN`` and ``NODATA`` are both "no records" (and count as void
        lookups in pyspf). A name that cannot be a DNS name (an empty or
        over-long label, a character DNS names cannot carry) has no records
        either: RFC 7208 §4.3 and §5 treat such names as not matching.
        """
        r = self.resolver
        try:
            if qtype == "TXT":
                # one value per record: its character-strings, joined (RFC 7208 §3.3)
                return [(data,) for data in await r.txt_bytes(name)]
            if qtype == "A":
                return await r.a(name)
            if qtype == "AAAA":
                return await r.aaaa(name)
            if qtype == "MX":
                return [_mx(text) for text in await r.query(name, "MX")]
            if qtype == "PTR":
                return [_hostname(text) for text in await r.query(name, "PTR")]
        except (NotFound, InvalidName):
            return []
        except TempError:
            raise
        except DNSError as e:
            # any other DNS error class the resolver may grow is not an answer
            raise TempError(e.name, e.rdtype, e.reason) from None
        raise AssertionError(qtype)


def _hostname(text: str) -> str:
    """A name in presentation format, without the final dot (the root is ``""``)."""
    return text[:-1] if text.endswith(".") else text


def _mx(text: str) -> tuple[int, str]:
    preference, _, exchange = text.partition(" ")
    return int(preference), _hostname(exchange)


# ------------------------------------------------------------ the process-wide hook

_current = threading.local()
_install_lock = threading.Lock()
_fallback: Callable[..., Any] | None = None


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Any:
    """``spf.DNSLookup``: the lookups of the check running in this thread, else pyspf's own."""
    lookups: _Lookups | None = getattr(_current, "lookups", None)
    if lookups is None:
        if _fallback is None:  # pragma: no cover - _install always sets it first
            raise spf.TempError("no DNS function")
        return _fallback(name, qtype, strict, timeout)
    return lookups(name, qtype, strict, timeout)


def _install() -> None:
    global _fallback
    with _install_lock:
        if spf.DNSLookup is not _dispatch:
            _fallback = spf.DNSLookup
            spf.DNSLookup = _dispatch


# ------------------------------------------------------------ the checker


class _Query(spf.query):
    """pyspf's query, with RFC 7208 §5.5's treatment of DNS errors in ``ptr``.

    pyspf 2.0.14 ends the whole check with ``temperror`` when a lookup made
    for the ``ptr`` mechanism (or the ``%{p}`` macro) fails. RFC 7208 §5.5
    says otherwise: a failed PTR lookup makes the mechanism not match, and a
    failed A/AAAA lookup of one of the names skips that name.
    """

    def validated_ptrs(self) -> list[str]:
        try:
            names = self.dns_ptr(self.i)
        except spf.TempError:
            return []
        validated = []
        # RFC 7208 §4.6.4: at most 10 PTR names are looked up, the rest ignored
        for name in names[:spf.MAX_PTR]:
            try:
                addresses = self.dns_a(name, self.A)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                validated.append(name)
        return validated


def _split(sender: str, helo: str) -> tuple[str, str]:
    """The local part and domain of ``sender`` (RFC 7208 §4.3), the last ``@`` splitting.

    A quoted local part may contain ``@``; the domain never does. A sender
    without a domain is treated as the domain alone, and a null sender as
    ``postmaster@<helo>`` (RFC 7208 §2.4), as pyspf does.
    """
    if not sender:
        return "postmaster", helo
    local, at, domain = sender.rpartition("@")
    if not at:
        return "postmaster", sender
    return local or "postmaster", domain


def _multi_label(domain: str) -> bool:
    """Whether ``domain`` can have an SPF record: a name of two labels or more.

    An address literal (``[192.0.2.1]``) is not one. Over-long and empty
    labels are left to pyspf, which also answers ``none`` for them.
    """
    name = domain[:-1] if domain.endswith(".") else domain
    return "." in name and not name.startswith("[")


def _client_ip(ip: str) -> str:
    """The connecting address as pyspf takes it: no IPv6 zone, IPv4-mapped made IPv4."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class SpfChecker:
    """Evaluates SPF in a bounded pool of worker threads, asking ``resolver``.

    :param resolver: the server's resolver (``app.resolver``), or any
        :class:`elemta.Resolver`.
    :param time_limit: seconds one check may take in all, queueing for a
        worker thread included (RFC 7208 §4.6.4 asks for at least 20).
    :param workers: the most checks that run at once; more wait for a thread.
    :param receiver: this host's name, for the ``%{r}`` macro.
    :param default_explanation: the explanation of a ``fail`` whose domain
        gives none (``None``: pyspf's "SPF fail - not authorized").
    """

    def __init__(self, resolver: Resolver, *, time_limit: float = 20.0, workers: int = 32,
                 receiver: str = "unknown", default_explanation: str | None = None) -> None:
        if time_limit <= 0:
            raise ValueError("time_limit must be a positive number of seconds")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        _install()
        self.resolver = resolver
        self.time_limit = time_limit
        self.receiver = receiver
        self.default_explanation = default_explanation
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix="elemta-spf")
        self._running: set[_Lookups] = set()
        self._closed = False

    def close(self) -> None:
        """Give up every check under way (they end with ``temperror``) and stop the threads."""
        self._closed = True
        for lookups in list(self._running):
            lookups.abandon()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def check(self, ip: str, sender: str, helo: str) -> SpfResult:
        """``check_host()`` for ``sender`` (``""``: the HELO identity) from ``ip``.

        Never raises for anything DNS or the policy does: every outcome is one
        of :data:`RESULTS`. A failure of pyspf itself is logged and reported
        as ``temperror`` (never a pass, and not held against the sender).
        """
        started = time.monotonic()
        identity = "mailfrom" if sender else "helo"
        local, domain = _split(sender, helo)

        def result(res: str, comment: str, **kw: Any) -> SpfResult:
            return SpfResult(res, identity, domain, ip, sender, helo, comment=comment,
                             seconds=time.monotonic() - started, **kw)

        if not sender and not helo:
            return result("none", "no HELO name to check")
        if not _multi_label(domain):
            # RFC 7208 §4.3: no lookup for an address literal or a single-label name
            return result("none", f"{domain} is not a multi-label domain name")
        try:
            client = _client_ip(ip)
        except ValueError:
            return result("none", f"the client address {ip!r} is not an IP address")
        if self._closed:
            return result("temperror", "the server is stopping")
        loop = asyncio.get_running_loop()
        lookups = _Lookups(self.resolver, loop, started + self.time_limit, self.time_limit)
        self._running.add(lookups)
        try:
            try:
                work = loop.run_in_executor(self._pool, self._evaluate, lookups, client,
                                            sender, helo, local, domain)
                # the lookups keep to the deadline; this is the backstop for CPU-bound
                # trouble inside pyspf, with a little room for the last answer
                res, comment, explanation, explained, mechanism = await asyncio.wait_for(
                    asyncio.shield(work), self.time_limit + 1.0)
            except TimeoutError:
                lookups.abandon()
                return result("temperror", f"SPF evaluation exceeded its time limit of "
                                           f"{self.time_limit:g} s")
            except asyncio.CancelledError:
                lookups.abandon()
                task = asyncio.current_task()
                if work.cancelled() and task is not None and not task.cancelling():
                    # not our caller giving up: close() dropped the queued work
                    return result("temperror", "the server is stopping")
                raise
            except RuntimeError as e:
                # the pool was shut down under us
                return result("temperror", f"SPF evaluation could not run: {e}")
        finally:
            self._running.discard(lookups)
        if res not in RESULTS:  # pragma: no cover - pyspf answers only these in strict mode
            log.error("spf: pyspf answered %r for %s; reporting temperror", res, domain)
            res, comment = "temperror", f"unexpected SPF result {res!r}"
        return result(res, comment, explanation=explanation,
                      explained_by_domain=explained and bool(explanation), mechanism=mechanism)

    def _evaluate(self, lookups: _Lookups, ip: str, sender: str, helo: str, local: str,
                  domain: str) -> tuple[str, str, str, bool, str]:
        """In a worker thread: pyspf's ``check()`` with our lookups; (result, comment,
        explanation, explained by the domain, mechanism)."""
        _current.lookups = lookups
        try:
            q = _Query(i=ip, s=sender, h=helo, receiver=self.receiver, strict=True,
                       timeout=self.time_limit, querytime=self.time_limit)
            # pyspf splits at the first "@"; a quoted local part may hold one
            q.l, q.o, q.d = local, domain, domain
            if self.default_explanation is not None:
                q.set_default_explanation(self.default_explanation)
            default_explanation = q.defexps.get("fail", "")
            res, _code, explanation = q.check()
            comment = q.get_header_comment(res) if res in RESULTS else ""
            if res == "temperror":
                comment = f"{comment}: {getattr(q, 'prob', '')}".rstrip(": ")
            mechanism = q.mechanism if isinstance(getattr(q, "mechanism", None), str) else ""
            if res == "permerror":
                mechanism = " ".join(str(m) for m in getattr(q, "mech", []) if m)
            if res != "fail":
                explanation = ""
            return res, comment, explanation, explanation != default_explanation, mechanism
        except Exception as e:  # noqa: BLE001 - pyspf's own failure is reported, not raised
            log.error("spf: pyspf failed checking %s for %s from %s: %s: %s", domain,
                      sender or f"HELO {helo}", ip, type(e).__name__, e, exc_info=True)
            return "temperror", f"SPF evaluation failed ({type(e).__name__})", "", False, ""
        finally:
            _current.lookups = None
