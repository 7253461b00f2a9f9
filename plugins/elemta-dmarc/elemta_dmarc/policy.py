"""From an evaluation to what this server does: local overrides, annotation, report rows.

Plain functions over :class:`~elemta_dmarc.evaluator.Evaluation` and the
settings, tested without a server. RFC 7489 §6.6.4 lets the receiver deviate
from the published policy ("local policy"); the deviations made here are
reported with the §C ``PolicyOverrideType`` names (``sampled_out``,
``local_policy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from elemta import AuthResult

from .evaluator import Evaluation
from .settings import DmarcSettings
from .store import ReportRow

__all__ = ["Action", "Decision", "auth_result", "decide", "exempt", "report_row", "strictest"]

Action = Literal["none", "quarantine", "tempfail", "reject"]
_SEVERITY: tuple[Action, ...] = ("none", "quarantine", "tempfail", "reject")


@dataclass(frozen=True, slots=True)
class Decision:
    """What is done about one evaluation: ``action``, and why it differs from
    the published disposition (``override``, ``comment``), if it does."""

    evaluation: Evaluation
    action: Action
    override: str | None = None
    comment: str | None = None


def exempt(domain: str, exempt_domains: Sequence[str]) -> bool:
    """``domain`` is a listed domain or under one."""
    return any(domain == e or domain.endswith("." + e) for e in exempt_domains)


def decide(evaluation: Evaluation, settings: DmarcSettings) -> Decision:
    """The action for one evaluation under the local policy of ``settings``."""
    e = evaluation
    is_exempt = exempt(e.from_domain, settings.exempt_domains)
    if e.result == "temperror":
        if settings.on_temperror == "tempfail" and not is_exempt:
            return Decision(e, "tempfail")
        return Decision(e, "none")
    if e.result != "fail":
        return Decision(e, "none")
    if e.sampled_out:
        pct = e.record.pct if e.record is not None else 100
        decision = Decision(e, e.disposition, "sampled_out", f"pct={pct}: not sampled")
    else:
        decision = Decision(e, e.disposition)
    if is_exempt and decision.action != "none":
        return Decision(e, "none", "local_policy", f"{e.from_domain} is in exempt_domains")
    if decision.action == "reject" and settings.never_reject:
        return Decision(e, "quarantine", "local_policy", "never_reject")
    return decision


def strictest(decisions: Sequence[Decision]) -> Decision:
    """The decision with the most severe action (RFC 7489 §6.6.1: for several
    Author Domains, the strictest policy among the failing checks)."""
    return max(decisions, key=lambda d: _SEVERITY.index(d.action))


def auth_result(decision: Decision) -> AuthResult:
    """The ``dmarc=`` result for ``Authentication-Results:`` (RFC 7489 §11.2, RFC 8601).

    ``header.from`` is the From domain; ``policy.dmarc`` the published policy
    that applies (``p``, ``sp`` or ``np``), when there is one; ``reason`` says
    why the result is not a plain pass or fail, and what was done when it is
    not what the policy asks.
    """
    e = decision.evaluation
    properties = {"header.from": e.from_domain}
    if e.policy is not None:
        properties["policy.dmarc"] = e.policy
    reasons = [e.reason] if e.reason and not e.sampled_out else []
    if e.result == "fail" and decision.action != e.policy:
        # sampled out by pct, exempt, never_reject
        why = f" ({decision.comment})" if decision.comment else ""
        reasons.append(f"{e.policy_tag}={e.policy} applied as {decision.action}{why}")
    reason = "; ".join(reasons) or None
    return AuthResult("dmarc", e.result, reason=reason, properties=properties)


def report_row(decision: Decision, *, received_at: float, queue_id: str, source_ip: str,
               envelope_from: str, envelope_to: Sequence[str], helo: str) -> ReportRow | None:
    """The aggregate-report row of a decision, or ``None`` when no DMARC record
    was used (nothing to report to: no record, no ``rua``)."""
    e = decision.evaluation
    record = e.record
    if record is None or e.policy_domain is None or e.result not in ("pass", "fail"):
        return None
    spf = next((s for s in e.spf if s.scope == "mfrom"), e.spf[0] if e.spf else None)
    applied = decision.action if decision.action != "tempfail" else "none"
    return ReportRow(
        received_at=received_at, queue_id=queue_id, source_ip=source_ip,
        header_from=e.from_domain, envelope_from=envelope_from,
        envelope_to=" ".join(sorted(set(envelope_to))), helo=helo,
        spf_domain=spf.domain if spf else None, spf_scope=spf.scope if spf else None,
        spf_result=spf.result if spf else None,
        dkim=tuple({"domain": d.domain, "selector": d.selector, "result": d.result}
                   for d in e.dkim),
        result=e.result, spf_aligned=e.spf_aligned, dkim_aligned=e.dkim_aligned,
        disposition=applied, override=decision.override, override_comment=decision.comment,
        policy_domain=e.policy_domain, p=record.p or "none", sp=record.sp, np=record.np,
        pct=record.pct, adkim=record.adkim, aspf=record.aspf, fo=record.fo, rua=record.rua,
    )
