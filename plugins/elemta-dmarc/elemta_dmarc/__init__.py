"""elemta-dmarc: DMARC (RFC 7489, RFC 9091 ``np``) at the end of DATA.

Enabled as ``dmarc``; Elemta makes one :class:`DmarcPlugin` per server. Its
``data`` hook reads the SPF and DKIM results other plugins put in
``auth_results``, evaluates the From domain's DMARC policy
(:mod:`elemta_dmarc.evaluator`), appends a ``dmarc=`` result, applies the
policy under the local overrides (:mod:`elemta_dmarc.policy`) and records the
aggregate-report data (:mod:`elemta_dmarc.store`). This module only holds the hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from elemta import (AuthResult, BoundedLabels, Message, Quarantine, Reject, Session, StartupError,
                    TempFail, Transaction, hookimpl)

from .domains import OrganizationalDomains, PSLError, author_domains
from .evaluator import Evaluation, Evaluator, identifiers
from .policy import Decision, auth_result, decide, report_row, strictest
from .settings import DmarcSettings, ReportSettings
from .store import PRUNE_INTERVAL_SECONDS, ReportStore, ReportStoreError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter

    from elemta import App

__all__ = ["DmarcPlugin", "DmarcSettings", "ReportSettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.dmarc")

REPORT_FILE = "dmarc-reports.sqlite3"


class DmarcPlugin:
    """The ``dmarc`` plugin: ``register_config``, ``register_metrics``, ``startup``,
    ``shutdown`` and ``data``."""

    def __init__(self) -> None:
        self.settings = DmarcSettings()
        self.evaluator: Evaluator | None = None
        self.store: ReportStore | None = None
        self.results: Counter | None = None
        self.labels = BoundedLabels(())
        self._pruner: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    @hookimpl
    def register_config(self) -> Mapping[str, type[DmarcSettings]]:
        return {"dmarc": DmarcSettings}

    @hookimpl
    def register_metrics(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self.results = Counter(
            "smtp_dmarc_results", "DMARC results of received messages, by From domain "
            "([plugins.dmarc] metrics_domains, the rest 'other') and result.",
            ["domain", "result"], registry=registry)

    @hookimpl
    async def startup(self, app: App) -> None:
        """Read the settings, load the Public Suffix List, open the report database."""
        self.settings = settings = app.plugin_settings("dmarc")
        psl_path = (app.settings.resolve(settings.public_suffix_list)
                    if settings.public_suffix_list is not None else None)
        try:
            org_domains = await asyncio.to_thread(
                OrganizationalDomains, private=settings.psl_private_domains, path=psl_path)
        except PSLError as e:
            raise StartupError(f"[plugins.dmarc] public_suffix_list: {e}") from None
        self.evaluator = Evaluator(app.resolver, org_domains)
        self.labels = BoundedLabels(settings.metrics_domains)
        if settings.reports.enabled:
            path = self._report_path(app, settings.reports)
            store = ReportStore(path, retention_days=settings.reports.retention_days,
                                max_rows=settings.reports.max_rows)
            try:
                await store.open()
            except ReportStoreError as e:
                raise StartupError(f"[plugins.dmarc.reports] {e}") from None
            self.store = store
            self._pruner = asyncio.create_task(self._prune_regularly(store),
                                               name="dmarc-report-pruning")
        log.info("dmarc: Public Suffix List %s (%s, private domains %s); report data %s",
                 org_domains.version, org_domains.path,
                 "honoured" if org_domains.private else "ignored",
                 self.store.path if self.store is not None else "off")

    @hookimpl
    async def shutdown(self, app: App) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    @staticmethod
    def _report_path(app: App, reports: ReportSettings) -> Path:
        if reports.path is not None:
            return Path(app.settings.resolve(reports.path))
        return Path(app.settings.resolve(app.settings.server.state_dir)) / REPORT_FILE

    async def _prune_regularly(self, store: ReportStore) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
            try:
                removed = await store.prune()
            except Exception as e:  # a broken prune must not end the pruning
                log.warning("dmarc: pruning %s failed: %s", store.path, e)
            else:
                if removed:
                    log.info("dmarc: pruned %d old report rows from %s", removed, store.path)

    # ------------------------------------------------------------ the message

    @hookimpl
    async def data(self, session: Session, tx: Transaction, message: Message,
                   auth_results: list[AuthResult]) -> Reject | Quarantine | TempFail | None:
        """Evaluate DMARC, annotate, record, and apply the policy.

        ``reject`` → ``550 5.7.1``; ``quarantine`` → held in the spool; ``none``
        → annotated only; a DNS failure → annotated (or ``451 4.4.3`` with
        ``on_temperror = "tempfail"``).
        """
        settings = self.settings
        if settings.skip_authenticated and session.auth_user is not None:
            return None
        if settings.skip_relay and session.relay_allowed:   # relay_networks, or a plugin
            return None
        evaluator = self.evaluator
        if evaluator is None:
            raise RuntimeError("the dmarc plugin has not started")
        authors = author_domains(message.get_all("From"))
        if authors.problem is not None:
            log.info("dmarc: %s from %s [%s]: %s", tx.id, session.helo, session.peer_ip,
                     authors.problem)
            if settings.bad_from == "reject":
                self._count(None, "permerror")
                return Reject(550, "5.7.1", f"{_capitalized(authors.problem)}; DMARC needs "
                              "exactly one author domain in From: (RFC 7489 6.6.1)")
            if not authors.domains:
                self._count(None, "permerror")
                auth_results.append(AuthResult("dmarc", "permerror", reason=authors.problem))
                return None
        spf, dkim = identifiers(auth_results, null_sender=tx.sender == "")
        if len(authors.domains) == 1:   # the usual case: no task to gather
            evaluations = [await evaluator.evaluate(authors.domains[0], spf, dkim)]
        else:
            evaluations = await asyncio.gather(*(evaluator.evaluate(domain, spf, dkim)
                                                 for domain in authors.domains))
        decisions = [decide(e, settings) for e in evaluations]
        for decision in decisions:
            auth_results.append(auth_result(decision))
            self._count(decision.evaluation.from_domain, decision.evaluation.result)
            self._log(tx, session, decision)
        await self._record(session, tx, decisions)
        return _verdict(strictest(decisions))

    def _count(self, domain: str | None, result: str) -> None:
        if self.results is not None:
            self.results.labels(domain=self.labels(domain), result=result).inc()

    def _log(self, tx: Transaction, session: Session, decision: Decision) -> None:
        e = decision.evaluation
        level = logging.INFO if e.result in ("fail", "temperror", "permerror") else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        log.log(level, "dmarc: %s from %s header.from=%s: %s%s, action %s%s", tx.id,
                session.peer_ip, e.from_domain, e.result,
                f" ({e.policy_tag}={e.policy} at {e.policy_domain})" if e.policy else "",
                decision.action, f" ({e.reason})" if e.reason else "")

    async def _record(self, session: Session, tx: Transaction,
                      decisions: list[Decision]) -> None:
        store = self.store
        if store is None:
            return
        now = time.time()
        envelope_from = tx.sender_domain.rstrip(".")
        envelope_to = [r.domain for r in tx.recipients]
        for decision in decisions:
            row = report_row(decision, received_at=now, queue_id=tx.id,
                             source_ip=session.peer_ip, envelope_from=envelope_from,
                             envelope_to=envelope_to, helo=session.helo or "")
            if row is not None:
                store.submit(row)          # written with the next batch; never waited for


def _verdict(decision: Decision) -> Reject | Quarantine | TempFail | None:
    e: Evaluation = decision.evaluation
    if decision.action == "reject":
        return Reject(550, "5.7.1", f"Unauthenticated mail from {e.from_domain} is refused by "
                      f"the DMARC policy of {e.policy_domain} ({e.policy_tag}={e.policy})")
    if decision.action == "quarantine":
        why = f", {decision.comment}" if decision.comment else ""
        return Quarantine(f"DMARC fail for {e.from_domain}: {e.policy_tag}={e.policy} of "
                          f"{e.policy_domain}{why}")
    if decision.action == "tempfail":
        return TempFail(451, "4.4.3", f"The DMARC policy of {e.from_domain} could not be "
                        "looked up; try again later")
    return None


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]
