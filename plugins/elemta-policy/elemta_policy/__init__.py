"""elemta-policy: ask Postfix SMTP access policy services (postgrey, policyd-spf…).

Enabled as ``policy``. For every configured service, at its stage — ``rcpt``
(the ``rcpt_ok`` hook: only recipients the ``rcpt`` stage accepted) or
``end-of-message`` (the ``data`` hook) — the plugin sends the attributes Postfix
sends (:mod:`elemta_policy.attributes`) over a kept-open connection
(:mod:`elemta_policy.client`) and turns the ``action=`` of the reply
(:mod:`elemta_policy.protocol`) into a verdict or an edit of the transaction.
What an RCPT-stage answer asks of the whole message (``PREPEND``, ``HOLD``,
``DISCARD``, ``BCC``) is remembered in ``tx.stash`` and done in this plugin's
``data`` hook.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from elemta import (App, Discard, Disconnect, Message, Quarantine, Recipient, Reject, Session,
                    StartupError, StashKey, TempFail, Transaction, hookimpl)

from .attributes import (CLIENT_NAME_TIMEOUT, END_OF_MESSAGE, RCPT, UNKNOWN, client_address,
                         lookup_client_names, request_attributes)
from .client import Connection, PolicyError, ServiceClient
from .protocol import Action, ProtocolError, parse_action
from .settings import PolicySettings, ServiceSettings

__all__ = ["PolicyPlugin", "PolicySettings", "ServiceSettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.policy")

FAILURE_TEXT = "Temporary policy problem, please try again later"


@dataclass
class Pending:
    """What RCPT-stage answers asked of the whole message, done at DATA. Each entry keeps
    the recipient it was answered for: it counts only if that recipient was accepted."""

    prepend: list[tuple[Recipient, str, str]] = field(default_factory=list)
    bcc: list[tuple[Recipient, str]] = field(default_factory=list)
    hold: list[tuple[Recipient, str]] = field(default_factory=list)
    discard: list[tuple[Recipient, str]] = field(default_factory=list)


PENDING = StashKey[Pending]()
#: per transaction: the connection each service last used for it (requests travel together)
CONNECTIONS = StashKey[dict[str, Connection]]()
#: per session: the reverse lookup of the client, shared by every request
CLIENT_NAMES = StashKey["asyncio.Future[tuple[str, str]]"]()


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "smtp_policy_requests", "Requests sent to policy services, by service and stage "
            "(RCPT, END-OF-MESSAGE).", ["service", "stage"], registry=registry)
        self.latency = Histogram(
            "smtp_policy_request_seconds", "Time from a request to its reply (or failure), "
            "by service.", ["service"], registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.actions = Counter(
            "smtp_policy_actions", "Actions answered by policy services, by service and "
            "action word (ok, dunno, reject, defer, defer_if_permit, defer_if_reject, 4xx, "
            "5xx, prepend, hold, discard, filter, redirect, bcc, warn, info, unknown).",
            ["service", "action"], registry=registry)
        self.failures = Counter(
            "smtp_policy_failures", "Requests without a usable answer, by service, reason "
            "(connect, timeout, closed, protocol, unknown_action) and what was done "
            "(tempfail: 451 4.3.0; accept: let through).",
            ["service", "reason", "handled_as"], registry=registry)
        self.connections = Counter(
            "smtp_policy_connections", "Connections opened to policy services, by service.",
            ["service"], registry=registry)
        self.exempt = Counter(
            "smtp_policy_exempt", "Requests not sent because the session is exempt, by "
            "service and reason (authenticated, relay_client, network, listener).",
            ["service", "reason"], registry=registry)


class _Service:
    """A configured service at run time: its settings, client and exemptions."""

    def __init__(self, settings: ServiceSettings, client: ServiceClient) -> None:
        self.settings = settings
        self.name = settings.name
        self.client = client
        self.networks = settings.networks
        self.listeners = frozenset(settings.listeners)

    def exemption(self, session: Session) -> str | None:
        s = self.settings
        if self.listeners and session.listener.name not in self.listeners:
            return "listener"
        if s.exempt_authenticated and session.auth_user is not None:
            return "authenticated"
        if s.exempt_relay_clients and session.relay_allowed:
            return "relay_client"
        if self.networks:
            try:
                ip = ipaddress.ip_address(client_address(session))
            except ValueError:
                return None
            if any(ip.version == n.version and ip in n for n in self.networks):
                return "network"
        return None


class PolicyPlugin:
    """The ``policy`` plugin."""

    def __init__(self) -> None:
        self.settings: PolicySettings | None = None
        self.rcpt_services: list[_Service] = []
        self.eom_services: list[_Service] = []
        self.metrics: _Metrics | None = None
        self.resolver: Any = None

    # ------------------------------------------------------------ lifecycle

    @hookimpl
    def register_config(self) -> dict[str, type[PolicySettings]]:
        return {"policy": PolicySettings}

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self.metrics = _Metrics(registry)

    @hookimpl
    def startup(self, app: App) -> None:
        settings: PolicySettings = app.plugin_settings("policy")
        listeners = {listener.name for listener in app.settings.listeners}
        for s in settings.services:
            unknown = sorted(set(s.listeners) - listeners)
            if unknown:
                raise StartupError(
                    f"[plugins.policy] service {s.name!r}: listeners {unknown} do not exist; "
                    f"the listeners are {sorted(listeners)}")
        budget = app.settings.plugins.timeout_for("policy")
        lookup = CLIENT_NAME_TIMEOUT if settings.resolve_client_name else 0.0
        for stage in ("rcpt", "end-of-message"):
            services = [s for s in settings.services if s.stage == stage]
            worst = lookup + sum(s.request_timeout_seconds for s in services)
            if services and worst >= budget:
                raise StartupError(
                    f"[plugins.policy] the {stage} services may take {worst:g} s in one hook "
                    f"(request_timeout_seconds of {', '.join(s.name for s in services)}"
                    f"{f' + {lookup:g} s for the client name' if lookup else ''}), not less "
                    f"than the plugin's timeout of {budget:g} s, after which the core answers "
                    "451 4.3.0 whatever on_failure says: lower request_timeout_seconds or "
                    "raise [plugins] timeouts = { policy = N }")
        self.settings = settings
        self.resolver = app.resolver
        self.rcpt_services, self.eom_services = [], []
        for s in settings.services:
            service = _Service(s, ServiceClient(s, on_connect=self._connected(s.name)))
            (self.rcpt_services if s.stage == "rcpt" else self.eom_services).append(service)
            log.info("policy: service %s at %s, asked at %s (%s on failure)", s.name, s.address,
                     "RCPT" if s.stage == "rcpt" else "END-OF-MESSAGE", s.on_failure)

    @hookimpl
    def shutdown(self, app: App) -> None:
        for service in self.rcpt_services + self.eom_services:
            service.client.close()

    def _connected(self, name: str) -> Any:
        def count() -> None:
            if self.metrics is not None:
                self.metrics.connections.labels(service=name).inc()
        return count

    # ------------------------------------------------------------ SMTP stages

    @hookimpl
    async def rcpt_ok(self, session: Session, tx: Transaction, recipient: Recipient) -> Any:
        for service in self.rcpt_services:
            if self._exempt(service, session):
                continue
            attributes = request_attributes(
                state=RCPT, session=session, tx=tx, recipient=recipient,
                client_names=await self._client_names(session),
                policy_context=service.settings.policy_context)
            answer = await self._ask(service, attributes, tx, f"<{recipient.address}>")
            if answer is None:
                continue
            if not isinstance(answer, Action):
                return answer                      # the failure verdict
            word = answer.word
            if word == "ok":
                break                              # the later services are not asked
            verdict = _refusal(answer, "Recipient address rejected")
            if verdict is not None:
                return verdict
            if word in ("prepend", "hold", "discard", "bcc"):
                pending = tx.stash.setdefault(PENDING, Pending())
                if word == "prepend" and answer.header is not None:
                    pending.prepend.append((recipient, *answer.header))
                elif word == "bcc":
                    pending.bcc.append((recipient, answer.address))
                elif word == "hold":
                    pending.hold.append((recipient, _reason(answer, service)))
                else:
                    pending.discard.append((recipient, _reason(answer, service)))
            elif word == "redirect":
                recipient.rewrite([answer.address])
                log.info("%s: policy %s redirects <%s> to <%s>", tx.id, service.name,
                         recipient.address, answer.address)
        return None

    @hookimpl
    async def data(self, session: Session, tx: Transaction, message: Message) -> Any:
        hold: str | None = None
        pending = tx.stash.get(PENDING, None)
        if pending is not None:
            accepted = list(tx.recipients)

            def counts(r: Recipient) -> bool:
                return any(a is r for a in accepted)

            for _, reason in (d for d in pending.discard if counts(d[0])):
                log.info("%s: discarded as a policy service asked at RCPT (%s)", tx.id, reason)
                return Discard(reason)
            seen: set[tuple[str, str]] = set()
            for r, name, value in pending.prepend:
                if counts(r) and (name.lower(), value) not in seen:
                    seen.add((name.lower(), value))
                    message.add_header(name, value)
            for r, address in pending.bcc:
                if counts(r):
                    tx.add_recipient(address)
            hold = next((reason for r, reason in pending.hold if counts(r)), None)
        for service in self.eom_services:
            if self._exempt(service, session):
                continue
            attributes = request_attributes(
                state=END_OF_MESSAGE, session=session, tx=tx, message=message,
                client_names=await self._client_names(session),
                policy_context=service.settings.policy_context)
            answer = await self._ask(service, attributes, tx, "the message")
            if answer is None:
                continue
            if not isinstance(answer, Action):
                return answer
            word = answer.word
            if word == "ok":
                break
            verdict = _refusal(answer, "Message rejected")
            if verdict is not None:
                return verdict
            if word == "prepend" and answer.header is not None:
                message.add_header(*answer.header)
            elif word == "bcc":
                tx.add_recipient(answer.address)
            elif word == "redirect":
                for r in list(tx.recipients):
                    tx.remove_recipient(r.address)
                tx.add_recipient(answer.address)
                log.info("%s: policy %s redirects the message to <%s>", tx.id, service.name,
                         answer.address)
            elif word == "discard":
                return Discard(_reason(answer, service))
            elif word == "hold":
                hold = hold or _reason(answer, service)
        if hold is not None:
            return Quarantine(hold)
        return None

    # ------------------------------------------------------------ helpers

    def _exempt(self, service: _Service, session: Session) -> bool:
        why = service.exemption(session)
        if why is not None and self.metrics is not None:
            self.metrics.exempt.labels(service=service.name, reason=why).inc()
        return why is not None

    async def _client_names(self, session: Session) -> tuple[str, str]:
        if self.settings is None or not self.settings.resolve_client_name \
                or self.resolver is None:
            return UNKNOWN, UNKNOWN
        future = session.stash.get(CLIENT_NAMES, None)
        if future is None or future.cancelled():
            future = asyncio.ensure_future(
                lookup_client_names(self.resolver, client_address(session)))
            session.stash[CLIENT_NAMES] = future
        return await asyncio.shield(future)

    async def _ask(self, service: _Service, attributes: dict[str, str], tx: Transaction,
                   about: str) -> Action | TempFail | None:
        """The action the service answered (logged and counted); on a failure the failure
        verdict, or ``None`` when ``on_failure = "accept"``."""
        m = self.metrics
        stage = attributes["protocol_state"]
        if m is not None:
            m.requests.labels(service=service.name, stage=stage).inc()
        connections = tx.stash.setdefault(CONNECTIONS, {})
        started = time.perf_counter()
        try:
            reply, conn = await service.client.ask(
                attributes, prefer=connections.get(service.name))
            connections[service.name] = conn
            action = parse_action(reply["action"])
        except PolicyError as e:
            return self._failed(service, tx, about, e.reason, str(e))
        except ProtocolError as e:
            return self._failed(service, tx, about, "protocol", f"not a usable action: {e}")
        finally:
            if m is not None:
                m.latency.labels(service=service.name).observe(time.perf_counter() - started)
        if m is not None:
            m.actions.labels(service=service.name, action=action.label).inc()
        if action.word == "unknown":
            return self._failed(service, tx, about, "unknown_action",
                                f"action {action.raw!r} is not one Elemta can carry out "
                                "(see the README of elemta-policy for the actions it knows)")
        if action.word == "dunno":
            log.debug("%s: policy %s: DUNNO for %s", tx.id, service.name, about)
        elif action.word == "warn":
            log.warning("%s: policy %s warns about %s: %s", tx.id, service.name, about,
                        action.text)
        elif action.word == "filter":
            log.warning("%s: policy %s asked for FILTER %s for %s; elemta-policy does not "
                        "route mail through content filters (use a route or deliver plugin): "
                        "ignored", tx.id, service.name, action.text, about)
        else:
            log.info("%s: policy %s answered %s for %s", tx.id, service.name, action.raw,
                     about)
        return action

    def _failed(self, service: _Service, tx: Transaction, about: str, reason: str,
                detail: str) -> TempFail | None:
        accept = service.settings.on_failure == "accept"
        if self.metrics is not None:
            self.metrics.failures.labels(service=service.name, reason=reason,
                                         handled_as="accept" if accept else "tempfail").inc()
        if accept:
            log.warning("%s: policy service %s (%s) failed for %s: %s; let through "
                        "(on_failure = accept)", tx.id, service.name, service.settings.address,
                        about, detail)
            return None
        log.warning("%s: policy service %s (%s) failed for %s: %s; answered 451 4.3.0 "
                    "(on_failure = tempfail)", tx.id, service.name, service.settings.address,
                    about, detail)
        return TempFail(451, "4.3.0", FAILURE_TEXT)


def _refusal(action: Action, default: str) -> Reject | TempFail | Disconnect | None:
    """The verdict of a refusing action; ``None`` for the others.

    ``DEFER_IF_PERMIT`` defers: the stage it is asked at has already permitted (the
    recipient was accepted; the message was received). ``DEFER_IF_REJECT`` is not a
    refusal: nothing before it rejected.
    """
    word, text = action.word, action.text
    if word == "reject":
        return Reject(550, action.enhanced or "5.7.1", text or default)
    if word in ("defer", "defer_if_permit"):
        return TempFail(451, action.enhanced or "4.7.1", text or "Try again later")
    if word == "reply":
        if action.code in (421, 521):          # Postfix disconnects after these
            return Disconnect(action.code, action.enhanced, text or "Closing connection")
        if action.code >= 500:
            return Reject(action.code, action.enhanced, text or default)
        return TempFail(action.code, action.enhanced, text or "Try again later")
    return None


def _reason(action: Action, service: _Service) -> str:
    return action.text or f"{action.word.upper()} by policy service {service.name}"
