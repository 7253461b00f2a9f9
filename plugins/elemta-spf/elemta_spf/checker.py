"""SPF evaluation (RFC 7208 ``check_host()``) with pyspf, over Elemta's own resolver.

pyspf asks DNS through a module-level function, ``spf.DNSLookup``, and waits
for each answer. Rather than give it a thread and a blocking lookup (every
answer would then cross between threads, and under load each crossing waits
for the interpreter lock), the evaluation runs on the event loop itself and
is *replayed*: pyspf's DNS function answers from the answers gathered so
far, and a question it has no answer for ends that run. The question is then
asked of the server's one resolver (``app.resolver``: its nameservers,
timeouts, cache, TCP fallback), without blocking, and the evaluation runs
again, until it needs nothing it does not have. An evaluation is pure
computation on a handful of records (tens of microseconds a run), and a
policy with ``n`` lookups runs ``n + 1`` times; with a warm resolver cache
the answers come at once.

The replacement DNS function is installed once per process. It finds the
evaluation it serves through a thread-local: a thread that is not running one
of our checks gets pyspf's own DNS function, so other users of pyspf in the
process are unaffected.

Limits: pyspf enforces RFC 7208 §4.6.4 (10 DNS-querying terms, 10 MX or PTR
names, 2 void lookups) in strict mode, which is always used here. On top of
that every check has a deadline (``time_limit_seconds``) and a bound on the
questions it may ask. A DNS failure (timeout, ``SERVFAIL``, a malformed
answer…) ends the check with ``temperror``, never with a pass.
"""

from __future__ import annotations

import asyncio
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


class _Missing(BaseException):
    """Raised by :class:`_Replay` for a question it has no answer for yet.

    A ``BaseException`` so that pyspf's own ``except Exception`` does not take
    it for an answer; where pyspf swallows everything (a bare ``except``), the
    replay still knows the question was asked and runs the evaluation again.
    """


class _Replay:
    """pyspf's DNS function for one run of one evaluation: the answers gathered so far,
    and those the resolver holds in its cache (asked at once, up to ``limit`` answers
    in all), so that a policy whose answers are all cached is evaluated once."""

    def __init__(self, answers: dict[tuple[str, str], list[Any] | Exception],
                 resolver: Resolver | None = None, limit: int = 0) -> None:
        self.answers = answers
        self.missing: list[tuple[str, str]] = []
        self.resolver = resolver
        self.limit = limit

    def __call__(self, name: str, qtype: str, strict: Any = True,
                 timeout: float | None = None) -> list[tuple[tuple[str, str], Any]]:
        if qtype not in _QTYPES:
            # RFC 7208 §3.1 removed the SPF RR type (99): nobody is to ask for it
            raise spf.TempError(f"refusing to look up {qtype} records for {name}")
        key = (name.lower(), qtype)
        found = self.answers.get(key)
        if found is None and self.resolver is not None and len(self.answers) < self.limit:
            found = _answer_now(self.resolver, *key)
            if found is not None:
                self.answers[key] = found
        if found is None:
            self.missing.append(key)
            raise _Missing(key)
        if isinstance(found, Exception):
            raise found
        return [((name, qtype), value) for value in found]


async def _ask(resolver: Resolver, name: str, qtype: str) -> list[Any]:
    """The answer in the shape pyspf expects, ``[]`` when there is none.

    ``NXDOMAIN`` and ``NODATA`` are both "no records" (and count as void
    lookups in pyspf). A name that cannot be a DNS name (an empty or
    over-long label, a character DNS names cannot carry) has no records
    either: RFC 7208 §4.3 and §5 treat such names as not matching.
    """
    r = resolver
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


def _answer_now(resolver: Resolver, name: str, qtype: str) -> list[Any] | Exception | None:
    """What :func:`_ask` answers, if the resolver answers without waiting (from its
    cache); ``None`` if it would wait (its lookup goes on, shared, for whoever waits)."""
    asking = _ask(resolver, name, qtype)
    try:
        asking.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    except TempError as e:
        return spf.TempError(f"DNS lookup failed: {e}")
    asking.close()
    return None


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
    lookups: _Replay | None = getattr(_current, "lookups", None)
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
    """Evaluates SPF on the event loop, asking ``resolver`` between replays.

    :param resolver: the server's resolver (``app.resolver``), or any
        :class:`elemta.Resolver`.
    :param time_limit: seconds one check may take in all, waiting for its turn
        included (RFC 7208 §4.6.4 asks for at least 20).
    :param workers: the most checks under way at once; more wait their turn.
    :param receiver: this host's name, for the ``%{r}`` macro.
    :param default_explanation: the explanation of a ``fail`` whose domain
        gives none (``None``: pyspf's "SPF fail - not authorized").
    """

    #: the most questions one evaluation may ask (RFC 7208 §4.6.4 allows about 10
    #: terms, with up to 10 names behind an mx or ptr, and an explanation)
    MAX_QUESTIONS = 64

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
        self._slots = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[Any]] = set()
        self._closed = False

    def close(self) -> None:
        """Give up every check under way (they end with ``temperror``)."""
        self._closed = True
        for task in list(self._running):
            task.cancel()

    async def check(self, ip: str, sender: str, helo: str) -> SpfResult:
        """``check_host()`` for ``sender`` (``""``: the HELO identity) from ``ip``.

        Never raises for anything DNS or the policy does: every outcome is one
        of :data:`RESULTS`. A failure of pyspf itself is logged and reported
        as ``temperror`` (never a pass, and not held against the sender).
        """
        started = time.monotonic()
        prepared = self._prepare(ip, sender, helo, started)
        if isinstance(prepared, SpfResult):
            return prepared
        client, local, domain, result = prepared
        outcome, known = self._now(client, sender, helo, local, domain)
        if outcome is None:
            outcome = await self._waited(client, sender, helo, local, domain, known, started,
                                         result)
            if isinstance(outcome, SpfResult):
                return outcome
        return self._result(outcome, result, domain)

    def check_now(self, ip: str, sender: str, helo: str) -> SpfResult | None:
        """What :meth:`check` would answer, if it needs no DNS answer that the resolver
        does not hold already (in its cache); ``None`` when it does (then call
        :meth:`check`). Computed at once: no task, no wait."""
        started = time.monotonic()
        prepared = self._prepare(ip, sender, helo, started)
        if isinstance(prepared, SpfResult):
            return prepared
        client, local, domain, result = prepared
        outcome, _ = self._now(client, sender, helo, local, domain)
        return None if outcome is None else self._result(outcome, result, domain)

    def _prepare(self, ip: str, sender: str, helo: str, started: float
                 ) -> SpfResult | tuple[str, str, str, Callable[..., SpfResult]]:
        """The answer of a check that needs no evaluation, or what the evaluation needs:
        (client address, local part, domain, the result maker)."""
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
        return client, local, domain, result

    def _now(self, ip: str, sender: str, helo: str, local: str, domain: str
             ) -> tuple[tuple[str, str, str, bool, str] | str | None, dict[Any, Any]]:
        """Evaluate with the answers the resolver gives without waiting (its cache):
        (the outcome, or ``None`` as soon as an answer must be waited for; the answers
        known so far). Most mail comes from senders whose records are cached."""
        answers: dict[tuple[str, str], list[Any] | Exception] = {}
        while True:
            replay = _Replay(answers, self.resolver, self.MAX_QUESTIONS)
            outcome = self._evaluate(replay, ip, sender, helo, local, domain)
            if not replay.missing:
                return outcome, answers
            if len(answers) + len(replay.missing) > self.MAX_QUESTIONS:
                return (f"SPF evaluation asked more than {self.MAX_QUESTIONS} DNS "
                        "questions"), answers
            for name, qtype in dict.fromkeys(replay.missing):
                found = _answer_now(self.resolver, name, qtype)
                if found is None:
                    # the resolver is asking a server: that lookup goes on (its answer
                    # is shared), and the check waits for it on its own task
                    return None, answers
                answers[(name, qtype)] = found

    async def _waited(self, client: str, sender: str, helo: str, local: str, domain: str,
                      known: dict[Any, Any], started: float,
                      result: Callable[..., SpfResult]
                      ) -> tuple[str, str, str, bool, str] | str | SpfResult:
        """The evaluation that waits for DNS answers, on a task of its own (so that
        :meth:`close` can end it), under the time limit."""
        task = asyncio.ensure_future(self._replayed(client, sender, helo, local, domain,
                                                    started + self.time_limit, known))
        self._running.add(task)
        try:
            outcome = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            current = asyncio.current_task()
            if task.cancelled() and self._closed and current is not None \
                    and not current.cancelling():
                return result("temperror", "the server is stopping")
            raise
        finally:
            self._running.discard(task)
        return outcome

    def _result(self, outcome: tuple[str, str, str, bool, str] | str,
                result: Callable[..., SpfResult], domain: str) -> SpfResult:
        if isinstance(outcome, str):
            return result("temperror", outcome)
        res, comment, explanation, explained, mechanism = outcome
        if res not in RESULTS:  # pragma: no cover - pyspf answers only these in strict mode
            log.error("spf: pyspf answered %r for %s; reporting temperror", res, domain)
            res, comment = "temperror", f"unexpected SPF result {res!r}"
        return result(res, comment, explanation=explanation,
                      explained_by_domain=explained and bool(explanation), mechanism=mechanism)

    async def _replayed(self, ip: str, sender: str, helo: str, local: str, domain: str,
                        deadline: float, known: dict[Any, Any] | None = None
                        ) -> tuple[str, str, str, bool, str] | str:
        """Evaluate until nothing is missing; the outcome, or why it is a ``temperror``.
        ``known``: answers already in hand."""
        answers: dict[tuple[str, str], list[Any] | Exception] = dict(known or {})
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                async with self._slots:
                    while True:
                        replay = _Replay(answers, self.resolver, self.MAX_QUESTIONS)
                        outcome = self._evaluate(replay, ip, sender, helo, local, domain)
                        if not replay.missing:
                            return outcome
                        if len(answers) + len(replay.missing) > self.MAX_QUESTIONS:
                            return (f"SPF evaluation asked more than {self.MAX_QUESTIONS} "
                                    "DNS questions")
                        for name, qtype in dict.fromkeys(replay.missing):
                            try:
                                answers[(name, qtype)] = await _ask(self.resolver, name, qtype)
                            except TempError as e:
                                answers[(name, qtype)] = spf.TempError(f"DNS lookup failed: {e}")
        except TimeoutError:
            return f"SPF evaluation exceeded its time limit of {self.time_limit:g} s"

    def _evaluate(self, replay: _Replay, ip: str, sender: str, helo: str, local: str,
                  domain: str) -> tuple[str, str, str, bool, str]:
        """One run of pyspf's ``check()`` over ``replay``'s answers; (result, comment,
        explanation, explained by the domain, mechanism). Its result means nothing
        when ``replay.missing`` is set afterwards."""
        _current.lookups = replay
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
        except _Missing:
            return "temperror", "", "", False, ""      # asked again once the answer is in
        except Exception as e:  # noqa: BLE001 - pyspf's own failure is reported, not raised
            log.error("spf: pyspf failed checking %s for %s from %s: %s: %s", domain,
                      sender or f"HELO {helo}", ip, type(e).__name__, e, exc_info=True)
            return "temperror", f"SPF evaluation failed ({type(e).__name__})", "", False, ""
        finally:
            _current.lookups = None
