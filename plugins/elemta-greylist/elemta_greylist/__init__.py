"""elemta-greylist: triplet greylisting at RCPT, on the server's shared state store.

Enabled as ``greylist``; the rules are in :mod:`elemta_greylist.policy`. It
answers ``rcpt_ok``, which runs only for recipients the ``rcpt`` stage
accepted: mail for unknown users gets its ``550`` at once, never a delay.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from elemta import (App, Recipient, Session, StateUnavailable, TempFail, Transaction,
                    hookimpl)

from .policy import Greylist
from .settings import GreylistSettings

__all__ = ["GreylistPlugin", "GreylistSettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.greylist")


class GreylistPlugin:
    """The ``greylist`` plugin."""

    def __init__(self) -> None:
        self.settings = GreylistSettings()
        self.greylist: Greylist | None = None
        self._exempt: tuple[Any, ...] = ()
        self._results: Any = None

    @hookimpl
    def register_config(self) -> dict[str, type[GreylistSettings]]:
        return {"greylist": GreylistSettings}

    @hookimpl
    def register_commands(self, cli: Any) -> None:
        from .cli import greylist

        if "greylist" not in cli.commands:
            cli.add_command(greylist)

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        from prometheus_client import Counter

        self._results = Counter(
            "smtp_greylist_results", "Recipients greylisting decided on, by result "
            "(greylisted, passed, allowed, auto_allowed, exempt, failed_open, failed).",
            ["result"], registry=registry)

    @hookimpl
    def startup(self, app: App) -> None:
        self.settings = app.plugin_settings("greylist")
        self.greylist = Greylist(app.state, self.settings)
        self._exempt = tuple(ipaddress.ip_network(n, strict=False)
                             for n in self.settings.exempt_networks)
        log.info("greylist: %.0f s delay, %s state", self.settings.delay_seconds,
                 app.settings.state.backend)

    def _count(self, result: str) -> None:
        if self._results is not None:
            self._results.labels(result=result).inc()

    def _exempted(self, session: Session, tx: Transaction, recipient: Recipient) -> str | None:
        """Why this recipient is not greylisted, or ``None``."""
        s = self.settings
        if session.auth_user is not None:
            return "authenticated"
        if session.relay_allowed:
            return "relay network"
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in self._exempt):
            return "exempt network"
        local, _, rdomain = recipient.address.lower().rpartition("@")
        if local in s.exempt_recipients or recipient.address.lower() in s.exempt_recipients:
            return "exempt recipient"
        if rdomain in s.exempt_recipient_domains:
            return "exempt recipient domain"
        sdomain = tx.sender.lower().rpartition("@")[2]
        if sdomain and sdomain in s.exempt_sender_domains:
            return "exempt sender domain"
        if sdomain and sdomain in s.spf_pass_domains and _spf_passed(tx, sdomain):
            return "SPF pass"
        return None

    @hookimpl
    async def rcpt_ok(self, session: Session, tx: Transaction, recipient: Recipient) -> Any:
        if self.greylist is None:
            return None
        why = self._exempted(session, tx, recipient)
        if why is not None:
            self._count("exempt")
            return None
        try:
            decision = await self.greylist.check(session.peer_ip, tx.sender, recipient.address)
        except StateUnavailable as e:
            if self.settings.on_store_failure == "accept":
                self._count("failed_open")
                log.warning("%s: greylisting unavailable (%s); <%s> from %s let through "
                            "(on_store_failure = accept)", tx.id, e, recipient.address,
                            session.peer_ip)
                return None
            self._count("failed")
            log.warning("%s: greylisting unavailable (%s); <%s> told to retry", tx.id, e,
                        recipient.address)
            return TempFail(451, "4.3.0", "Temporary local problem, please try again later")
        if decision.outcome == "greylisted":
            self._count("greylisted")
            log.info("%s: greylisted %s <%s> -> <%s> for %.0f s", tx.id, session.peer_ip,
                     tx.sender, recipient.address, decision.wait)
            minutes = max(1, round(decision.wait / 60))
            return TempFail(451, "4.7.1", f"Greylisted, please try again in {minutes} "
                            f"minute{'s' if minutes != 1 else ''}")
        self._count("auto_allowed" if decision.auto_allowed else decision.outcome)
        if decision.auto_allowed:
            log.info("%s: the network of %s passed often enough: allowed", tx.id,
                     session.peer_ip)
        return None


def _spf_passed(tx: Transaction, domain: str) -> bool:
    """Whether elemta-spf, if it is installed and checked this transaction (it must come
    before this plugin in ``[plugins] enabled``), found ``pass`` for ``domain`` as MAIL FROM."""
    try:
        from elemta_spf import OUTCOME
    except ImportError:
        return False
    outcome = tx.stash.get(OUTCOME, None)
    mailfrom = getattr(outcome, "mailfrom", None)
    return (mailfrom is not None and mailfrom.result == "pass"
            and mailfrom.domain.lower().rstrip(".") == domain)

