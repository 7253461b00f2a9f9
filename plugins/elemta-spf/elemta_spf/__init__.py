"""elemta-spf: SPF (RFC 7208) for inbound mail, MAIL FROM and HELO identities.

Enabled as ``spf``; the core makes one :class:`SpfPlugin` per server. This
module holds only the hooks: the evaluation is :mod:`elemta_spf.checker`
(pyspf replayed on the event loop, DNS through ``app.resolver``) and what a result
means is :mod:`elemta_spf.policy`.

When: the check runs at ``MAIL FROM`` (both identities at once; the HELO
result is kept for the session), a refusal is answered at ``RCPT TO``, where
exempt recipients (``abuse@``…) are spared, and the result goes into the
message at the end of ``DATA`` (``message_auth``): the core's
Authentication-Results and, optionally, ``Received-SPF``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from elemta import (AuthResult, BoundedLabels, Message, Recipient, Reject, Session, StartupError,
                    StashKey, TempFail, Transaction, hookimpl)

from .checker import SpfChecker, SpfResult
from .policy import (Network, Outcome, auth_result, client_exemption, decide, parse_networks,
                     received_spf, recipient_is_exempt)
from .settings import SpfSettings

if TYPE_CHECKING:
    from elemta import App

__all__ = ["OUTCOME", "Outcome", "SpfPlugin", "SpfResult", "SpfSettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.spf")

NAME = "spf"

OUTCOME = StashKey[Outcome | str]()
"""``tx.stash[OUTCOME]``: the transaction's :class:`Outcome`, or why it was not checked.

Public, for plugins that come later (a DMARC evaluator): read it with
``tx.stash.get(elemta_spf.OUTCOME, None)``.
"""

# session.stash: the HELO identity's result, for the HELO name it was checked for
_HELO = StashKey[tuple[str, SpfResult]]()

# the check must end, and leave room for the reply, within the plugin's timeout
_TIMEOUT_MARGIN_SECONDS = 2.0


class SpfPlugin:
    """The ``spf`` plugin: checks at MAIL, refuses at RCPT, reports in ``message_auth``."""

    def __init__(self) -> None:
        self.settings = SpfSettings()
        self.checker: SpfChecker | None = None
        self.receiver = "unknown"
        self.labels = BoundedLabels(())
        self.exempt_networks: tuple[Network, ...] = ()
        self.relay_networks: tuple[Network, ...] = ()
        self.results_total: Counter | None = None

    # ------------------------------------------------------------ start and stop

    @hookimpl
    def register_config(self) -> Mapping[str, type[SpfSettings]]:
        return {NAME: SpfSettings}

    @hookimpl
    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.results_total = Counter(
            "smtp_spf_results", "SPF results of inbound transactions (MAIL FROM identity, or "
            "HELO for the null sender), by sender domain (unlisted domains are \"other\") "
            "and result.", ["domain", "result"], registry=registry)

    @hookimpl
    def startup(self, app: App) -> None:
        settings: SpfSettings = app.plugin_settings(NAME)
        plugins = app.settings.plugins
        timeout = plugins.timeouts.get(NAME, plugins.timeout_seconds)
        if settings.time_limit_seconds + _TIMEOUT_MARGIN_SECONDS > timeout:
            where = (f"[plugins] timeouts.{NAME}" if NAME in plugins.timeouts
                     else "[plugins] timeout_seconds")
            raise StartupError(
                f"[plugins.{NAME}] time_limit_seconds = {settings.time_limit_seconds:g} does not "
                f"fit in the plugin's timeout of {timeout:g} s ({where}): a slow SPF check "
                f"would be cut off and the client told 451 4.3.0. Set time_limit_seconds to "
                f"at most {max(timeout - _TIMEOUT_MARGIN_SECONDS, 0):g}, or raise the timeout, "
                f"e.g. [plugins] timeouts = {{ {NAME} = "
                f"{settings.time_limit_seconds + 10:g} }}")
        self.settings = settings
        self.receiver = app.settings.server.hostname
        self.labels = BoundedLabels(settings.metrics_domains)
        self.exempt_networks = parse_networks(settings.exempt_networks)
        self.relay_networks = parse_networks(app.settings.server.relay_networks)
        self.checker = SpfChecker(app.resolver, time_limit=settings.time_limit_seconds,
                                  workers=settings.max_concurrent_checks,
                                  receiver=self.receiver)
        log.info("spf: checking MAIL FROM and HELO; fail=%s softfail=%s temperror=%s "
                 "permerror=%s; %d exempt networks; at most %d checks at once, %gs each",
                 settings.on_fail, settings.on_softfail, settings.on_temperror,
                 settings.on_permerror, len(self.exempt_networks),
                 settings.max_concurrent_checks, settings.time_limit_seconds)

    @hookimpl
    def shutdown(self) -> None:
        if self.checker is not None:
            self.checker.close()
            self.checker = None

    # ------------------------------------------------------------ the transaction

    @hookimpl
    async def mail(self, session: Session, tx: Transaction) -> None:
        """Check both identities now; what the result calls for is answered at RCPT."""
        await self._outcome(session, tx)

    @hookimpl(tryfirst=True)
    async def rcpt(self, session: Session, tx: Transaction,
                   recipient: Recipient) -> Reject | TempFail | None:
        """Refuse the recipient if the result calls for it and the recipient is not exempt.

        ``tryfirst``: a refusal must come before any plugin that accepts the
        recipient (the first verdict ends the stage). Postmaster never gets
        here: the core accepts it before asking plugins.
        """
        outcome = await self._outcome(session, tx)
        if not isinstance(outcome, Outcome) or outcome.refusal is None:
            return None
        if recipient_is_exempt(recipient.address, self.settings.exempt_recipients):
            log.info("spf: %s: <%s> is exempt; accepting it despite SPF %s", tx.id,
                     recipient.address, outcome.governing.result)
            return None
        log.info("spf: %s: refusing <%s>: %d %s %s", tx.id, recipient.address,
                 outcome.refusal.code, outcome.refusal.enhanced, outcome.refusal.text)
        return outcome.refusal

    @hookimpl
    async def message_auth(self, session: Session, tx: Transaction,
                           message: Message) -> AuthResult | None:
        """The ``spf`` result for Authentication-Results, and ``Received-SPF`` fields."""
        outcome = await self._outcome(session, tx)
        if not isinstance(outcome, Outcome):
            return None
        if self.settings.received_spf_header:
            identities = [outcome.helo] if outcome.mailfrom is None else [outcome.helo,
                                                                          outcome.mailfrom]
            for result in identities:
                message.add_header("Received-SPF",
                                   received_spf(result, self.receiver, tx.sender))
        return auth_result(outcome)

    # ------------------------------------------------------------ evaluation

    async def _outcome(self, session: Session, tx: Transaction) -> Outcome | str:
        """The transaction's outcome, evaluated on first use and kept in ``tx.stash``.

        First use is normally ``mail``; ``rcpt`` and ``message_auth`` evaluate
        it themselves if a plugin before this one answered ``MAIL FROM``.
        """
        known = tx.stash.get(OUTCOME, None)
        if known is not None:
            return known
        checker = self.checker
        if checker is None:
            raise RuntimeError("the spf plugin has not started")
        why = client_exemption(peer_ip=session.peer_ip, auth_user=session.auth_user,
                               relay_allowed=session.relay_allowed, settings=self.settings,
                               exempt_networks=self.exempt_networks,
                               relay_networks=self.relay_networks)
        if why is not None:
            log.debug("spf: %s: not checked: %s", tx.id, why)
            tx.stash[OUTCOME] = why
            return why
        helo_name = session.helo or ""
        cached = session.stash.get(_HELO, None)
        if cached is not None and cached[0] == helo_name:
            helo = cached[1]
            mailfrom = await checker.check(session.peer_ip, tx.sender, helo_name) \
                if tx.sender else None
        elif tx.sender:
            # both at once; without a task when the answers are cached already
            helo = checker.check_now(session.peer_ip, "", helo_name)
            mailfrom = checker.check_now(session.peer_ip, tx.sender, helo_name)
            if helo is None and mailfrom is None:
                helo, mailfrom = await asyncio.gather(
                    checker.check(session.peer_ip, "", helo_name),
                    checker.check(session.peer_ip, tx.sender, helo_name))
            elif helo is None:
                helo = await checker.check(session.peer_ip, "", helo_name)
            elif mailfrom is None:
                mailfrom = await checker.check(session.peer_ip, tx.sender, helo_name)
        else:
            helo, mailfrom = await checker.check(session.peer_ip, "", helo_name), None
        session.stash[_HELO] = (helo_name, helo)
        outcome = decide(helo, mailfrom, self.settings)
        tx.stash[OUTCOME] = outcome
        governing = outcome.governing
        if self.results_total is not None:
            self.results_total.labels(self.labels(governing.domain), governing.result).inc()
        if not log.isEnabledFor(logging.INFO):
            return outcome
        log.info("spf: %s: client %s: %s%s; %s (%.3fs)%s", tx.id, session.peer_ip,
                 f"mailfrom=<{tx.sender}> {mailfrom.result}, " if mailfrom is not None else "",
                 f"helo={helo_name} {helo.result}", governing.comment or "no comment",
                 max(helo.seconds, mailfrom.seconds if mailfrom is not None else 0.0),
                 f"; refusing with {outcome.refusal.code} {outcome.refusal.enhanced}"
                 if outcome.refusal is not None else "")
        return outcome
