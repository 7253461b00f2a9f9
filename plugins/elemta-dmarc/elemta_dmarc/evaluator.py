"""The DMARC evaluator (RFC 7489 §6.6, with RFC 9091 ``np``): pure, except for DNS.

Its only I/O is the DNS object it is given, anything with the async methods
``txt``, ``a``, ``aaaa`` and ``mx`` of :class:`elemta.Resolver` that raises
Elemta's DNS errors (``NXDomain``, ``NoData``, ``TempError``…). The random draw
of ``pct`` is injected too, so every rule can be tested.

    evaluator = Evaluator(app.resolver, OrganizationalDomains())
    spf, dkim = identifiers(auth_results, null_sender=tx.sender == "")
    outcome = await evaluator.evaluate("example.org", spf, dkim)
    outcome.result        # "pass", "fail", "none", "temperror" or "permerror"
    outcome.disposition   # what the domain asks for this message: "none", "quarantine", "reject"

What it does, in RFC order:

1. Policy discovery (§6.6.3): the TXT records at ``_dmarc.<From domain>``;
   those not starting with ``v=DMARC1`` are dropped; if none is left, the same at
   ``_dmarc.<Organizational Domain>`` (when it differs). No record, or more than
   one, means no DMARC processing: ``none``. A record whose ``p`` is missing or
   invalid, or whose ``sp`` or ``np`` is invalid, is read as ``p=none`` when it has a
   valid ``rua``, and is a ``permerror`` (no DMARC processing) otherwise (step 6;
   RFC 9989 §4.10.1 for ``np``). A DNS
   failure is a ``temperror``, never a pass and never a "no record".
2. Identifier alignment (§3.1): SPF passes aligned when its result is ``pass`` and
   its domain equals the From domain (``aspf=s``) or shares its Organizational
   Domain (``aspf=r``); DKIM likewise for every passing signature's ``d=`` under
   ``adkim``. One aligned pass of either makes DMARC ``pass`` (§4.2).
3. The policy that applies to a ``fail`` (§6.6.2, RFC 9091 §4): ``p`` when the
   record is the From domain's own; for a record found at the Organizational
   Domain, ``np`` when the From domain does not exist (NXDOMAIN or NODATA for A,
   AAAA and MX: RFC 9091 §2.1), else ``sp``, else ``p``. The existence lookups are
   made only when ``np`` would change the answer.
4. ``pct`` (§6.3): a message outside the sampled percentage gets the next less
   strict policy, ``reject`` → ``quarantine`` → ``none``.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from elemta import AuthResult, DNSError, InvalidName, NotFound, NullMX, NXDomain, TempError

from .domains import OrganizationalDomains, normalize_domain
from .record import DmarcRecord, Policy, parse_record, weaker

# a record is parsed once while it is published (DmarcRecord is immutable)
_parsed = functools.lru_cache(maxsize=1024)(parse_record)

__all__ = ["DNS", "DkimIdentifier", "Evaluation", "Evaluator", "Result", "Sampler",
           "SpfIdentifier", "identifiers"]

Result = Literal["pass", "fail", "none", "temperror", "permerror"]
Sampler = Callable[[int], bool]
"""``sample(pct)``: whether this message is among the ``pct`` percent the policy applies to."""


class DNS(Protocol):
    """What the evaluator asks of DNS: :class:`elemta.Resolver` has it."""

    async def txt(self, name: str) -> list[str]: ...
    async def a(self, name: str) -> list[str]: ...
    async def aaaa(self, name: str) -> list[str]: ...
    async def mx(self, domain: str) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class SpfIdentifier:
    """The domain SPF checked and its result; ``scope`` is ``"mfrom"`` or ``"helo"``
    (the HELO name stands in for a null ``MAIL FROM``, RFC 7208 §2.4)."""

    domain: str
    result: str
    scope: Literal["mfrom", "helo"] = "mfrom"


@dataclass(frozen=True, slots=True)
class DkimIdentifier:
    """One DKIM signature's ``d=``, ``s=`` and result."""

    domain: str
    result: str
    selector: str = ""


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The outcome of :meth:`Evaluator.evaluate` for one Author Domain.

    ``policy`` is the published policy that applies to this message (the value
    of ``policy_tag``: ``p``, ``sp`` or ``np``), ``disposition`` what it asks for
    after ``pct`` sampling: ``none`` unless the result is ``fail``. ``record`` and
    ``policy_domain`` say which record was used (``None`` without one).
    """

    result: Result
    from_domain: str
    org_domain: str
    reason: str | None = None
    record: DmarcRecord | None = None
    policy_domain: str | None = None
    policy: Policy | None = None
    policy_tag: Literal["p", "sp", "np"] | None = None
    disposition: Policy = "none"
    sampled_out: bool = False
    spf_aligned: bool = False
    dkim_aligned: bool = False
    spf: tuple[SpfIdentifier, ...] = ()
    dkim: tuple[DkimIdentifier, ...] = ()


def identifiers(auth_results: Iterable[AuthResult], *, null_sender: bool
                ) -> tuple[list[SpfIdentifier], list[DkimIdentifier]]:
    """The SPF and DKIM identifiers among the ``message_auth`` results.

    SPF: the domain of ``smtp.mailfrom`` (an address or a domain). When it is
    absent or empty and the ``MAIL FROM`` was null, ``smtp.helo``: SPF then
    checked ``postmaster@<HELO>`` (RFC 7208 §2.4). A HELO-only result for a
    message with a real ``MAIL FROM`` is not DMARC's identifier (RFC 7489 §4.1)
    and is left out. DKIM: ``header.d`` of each signature.
    Domains are normalized; results are lower case.
    """
    spf: list[SpfIdentifier] = []
    dkim: list[DkimIdentifier] = []
    for r in auth_results:
        method = r.method.lower()
        props = r.properties or {}
        if method == "spf":
            mailfrom = (props.get("smtp.mailfrom") or "").strip()
            scope: Literal["mfrom", "helo"] = "mfrom"
            if mailfrom:
                raw = mailfrom.rpartition("@")[2]
            elif null_sender and props.get("smtp.helo"):
                raw, scope = props["smtp.helo"], "helo"
            else:
                continue
            domain = normalize_domain(raw)
            if domain is not None:
                spf.append(SpfIdentifier(domain, r.result.lower(), scope))
        elif method == "dkim":
            domain = normalize_domain(props.get("header.d") or "")
            if domain is not None:
                dkim.append(DkimIdentifier(domain, r.result.lower(),
                                           props.get("header.s") or ""))
    return spf, dkim


def _random_sampler() -> Sampler:
    rng = random.Random()
    return lambda pct: rng.randrange(100) < pct


class _Multiple(Exception):
    def __init__(self, domain: str, count: int) -> None:
        self.domain, self.count = domain, count


class Evaluator:
    """Evaluates DMARC for an Author Domain; see the module's documentation.

    :param dns: the DNS to ask (``app.resolver``, or a test's resolver).
    :param org_domains: the Organizational Domain rule (Public Suffix List).
    :param sample: ``sample(pct) -> bool`` for ``0 < pct < 100``; random by default.
    """

    def __init__(self, dns: DNS, org_domains: OrganizationalDomains, *,
                 sample: Sampler | None = None) -> None:
        self.dns = dns
        self.org_domains = org_domains
        self.sample = sample if sample is not None else _random_sampler()

    # ------------------------------------------------------------ the steps

    async def evaluate(self, from_domain: str, spf: Sequence[SpfIdentifier] = (),
                       dkim: Sequence[DkimIdentifier] = ()) -> Evaluation:
        """DMARC for one Author Domain (given in any case, with or without a final dot)."""
        spf, dkim = tuple(spf), tuple(dkim)
        domain = normalize_domain(from_domain)
        if domain is None:
            return Evaluation("permerror", from_domain, from_domain, spf=spf, dkim=dkim,
                              reason=f"{from_domain!r} is not a domain name")
        org = self.org_domains.of(domain)
        base = {"from_domain": domain, "org_domain": org, "spf": spf, "dkim": dkim}
        try:
            found = await self.discover(domain, org)
        except _Multiple as e:
            return Evaluation("none", **base, policy_domain=e.domain,
                              reason=f"_dmarc.{e.domain} has {e.count} DMARC records; "
                                     "RFC 7489 §6.6.3 applies none of them")
        except DNSError as e:
            return Evaluation("temperror", **base, reason=f"DMARC policy lookup failed: {e}")
        if found is None:
            return Evaluation("none", **base, reason="no DMARC record")
        record, policy_domain = found
        usable = record.usable
        if usable == "no":
            return Evaluation("permerror", **base, record=record, policy_domain=policy_domain,
                              reason=f"the DMARC record at _dmarc.{policy_domain} is unusable "
                                     f"({'; '.join(record.problems)}) and names no valid rua")
        spf_aligned = any(s.result == "pass" and self.aligned(s.domain, domain, record.aspf)
                          for s in spf)
        dkim_aligned = any(d.result == "pass" and self.aligned(d.domain, domain, record.adkim)
                           for d in dkim)
        common = {**base, "record": record, "policy_domain": policy_domain,
                  "spf_aligned": spf_aligned, "dkim_aligned": dkim_aligned}
        if usable == "as-none":
            # §6.6.3 step 6: an invalid p or sp with a valid rua reads as p=none
            reason = ("the DMARC record's policy is invalid "
                      f"({'; '.join(record.problems)}); treated as p=none for its rua")
            return Evaluation("pass" if spf_aligned or dkim_aligned else "fail", **common,
                              policy="none", policy_tag="p", reason=reason)
        tag, policy = self._policy_of(record, domain, policy_domain)
        if spf_aligned or dkim_aligned:
            return Evaluation("pass", **common, policy=policy, policy_tag=tag)
        if policy_domain != domain and record.np is not None and record.np != policy:
            try:
                exists = await self.exists(domain)
            except DNSError as e:
                return Evaluation("temperror", **common,
                                  reason=f"whether {domain} exists (RFC 9091) could not be "
                                         f"found out: {e}")
            if not exists:
                tag, policy = "np", record.np
        disposition, sampled_out = self._sampled(policy, record.pct)
        reason = None
        if sampled_out:
            reason = f"pct={record.pct}: not sampled, {policy} lowered to {disposition}"
        return Evaluation("fail", **common, policy=policy, policy_tag=tag,
                          disposition=disposition, sampled_out=sampled_out, reason=reason)

    async def discover(self, domain: str, org: str | None = None
                       ) -> tuple[DmarcRecord, str] | None:
        """RFC 7489 §6.6.3: the record and the domain it was found at, or ``None``.

        :raises DNSError: (a ``TempError``) when a lookup failed.
        """
        records = await self._records_at(domain)
        if not records:
            org = org if org is not None else self.org_domains.of(domain)
            if org == domain:
                return None
            domain = org
            records = await self._records_at(domain)
        if len(records) > 1:
            raise _Multiple(domain, len(records))
        return (records[0], domain) if records else None

    async def exists(self, domain: str) -> bool:
        """Whether ``domain`` exists for DMARC (RFC 9091 §2.1): it does not when A,
        AAAA and MX all answer NXDOMAIN or NODATA. An NXDOMAIN is conclusive by
        itself (no record of any type is there).

        :raises TempError: when that cannot be found out.
        """
        answers = await asyncio.gather(self.dns.a(domain), self.dns.aaaa(domain),
                                       self.dns.mx(domain), return_exceptions=True)
        failures: list[DNSError] = []
        for answer in answers:
            if isinstance(answer, NullMX):
                return True  # "0 ." is an MX record: the name exists
            if isinstance(answer, BaseException) and not isinstance(answer, DNSError):
                raise answer
            if not isinstance(answer, BaseException):
                if answer:
                    return True
            elif not isinstance(answer, NotFound):
                failures.append(answer)
        if any(isinstance(a, NXDomain) for a in answers):
            return False
        if failures:
            raise failures[0] if isinstance(failures[0], TempError) else \
                TempError(domain, "", str(failures[0]))
        return False

    def aligned(self, identifier: str, author: str, mode: str) -> bool:
        """Identifier Alignment (RFC 7489 §3.1.1, §3.1.2): strict is equality,
        relaxed is the same Organizational Domain. Both are normalized domains."""
        if identifier == author:
            return True
        if mode == "s":
            return False
        return self.org_domains.of(identifier) == self.org_domains.of(author)

    # ------------------------------------------------------------ helpers

    async def _records_at(self, domain: str) -> list[DmarcRecord]:
        try:
            texts = await self.dns.txt(f"_dmarc.{domain}")
        except (NotFound, InvalidName):
            return []
        return [record for record in map(_parsed, texts) if record is not None]

    @staticmethod
    def _policy_of(record: DmarcRecord, domain: str, policy_domain: str
                   ) -> tuple[Literal["p", "sp"], Policy]:
        assert record.p is not None
        if policy_domain == domain or record.sp is None:
            return "p", record.p
        return "sp", record.sp

    def _sampled(self, policy: Policy, pct: int) -> tuple[Policy, bool]:
        """(disposition, sampled out) for a failing message under ``pct``."""
        if policy == "none" or pct >= 100:
            return policy, False
        if pct > 0 and self.sample(pct):
            return policy, False
        return weaker(policy), True
