"""elemta-mtahooks: HTTP policy hooks at the SMTP stages and around delivery.

Enabled as ``mtahooks``. At each configured stage the plugin POSTs a signed JSON
document (``schema/request.json``) to every hook configured for it, in order,
and acts on the answer (``schema/response.json``): the SMTP reply, edits of the
message and envelope at ``data``, or the outcome of recipients at delivery.
The documents are built in :mod:`elemta_mtahooks.protocol`, the HTTP client is
:mod:`elemta_mtahooks.client`; this module maps answers to Elemta's verdicts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from elemta import (App, AuthResult, Credentials, Discard, Envelope, Message, Outcome,
                    Quarantine, Recipient, RecipientState, Route, Session, StartupError,
                    StashKey, TempFail, Transaction, Verdict, existing_ca_file, hookimpl,
                    new_id, plain_http_host)

from . import protocol
from .client import HookClient, HookError
from .protocol import Decision, InvalidResponse
from .settings import NOTIFY_STAGES, STAGES, HookSettings, MtaHooksSettings

__all__ = ["MtaHooksPlugin", "MtaHooksSettings", "HookSettings", "TRANSPORT"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.mtahooks")

# The transport of a recipient a route-stage hook refused: this plugin's deliver
# answers for it with the outcome written in the route's destination.
TRANSPORT = "mtahooks"
# Notifications (delivered, deferred, bounced) waiting or in flight, at most.
MAX_PENDING_NOTIFICATIONS = 10_000
# How long shutdown waits for notifications still in flight.
DRAIN_SECONDS = 5.0
# A message larger than this is read and encoded off the event loop.
INLINE_BYTES = 256 * 1024

# What an earlier stage decided for the message(s): ("discard" | "quarantine", reason).
SESSION_DISPOSITION = StashKey[tuple[str, str]]()
TX_DISPOSITION = StashKey[tuple[str, str]]()
# Recipients a rcpt-stage hook discarded: lower-case address -> reason.
DROPPED_RECIPIENTS = StashKey[dict[str, str]]()

UNAVAILABLE = "Policy check unavailable, please try again later"


def failure_verdict(stage: str) -> Verdict:
    """The reply when a hook fails and its ``on_failure`` is ``tempfail``."""
    if stage == "connect":
        return TempFail(421, "4.3.0", UNAVAILABLE)
    if stage == "auth":
        return TempFail(454, "4.7.0", "Temporary authentication failure, please try again "
                        "later")
    return TempFail(451, "4.3.0", UNAVAILABLE)


def _remember(stash: Any, key: StashKey[tuple[str, str]], action: str, reason: str) -> None:
    """Keep the strongest disposition: a discard beats a quarantine."""
    old = stash.get(key, None)
    if old is None or (old[0] == "quarantine" and action == "discard"):
        stash[key] = (action, reason)


def _route_outcome(destination: str, address: str) -> Outcome:
    """The outcome a refusing route stored in its destination (``"550 5.7.1 text"``)."""
    code, _, rest = destination.partition(" ")
    enhanced, _, text = rest.partition(" ")
    if code.isdigit() and len(code) == 3 and enhanced[:1] == code[:1] and code[0] in "45":
        return Outcome(address, int(code), enhanced, text or "Refused by policy")
    return Outcome(address, 451, "4.3.0", "malformed policy route; will retry")


class _Metrics:
    """``smtp_mtahooks_*``; nothing is counted before ``register_metrics``."""

    def __init__(self) -> None:
        self.calls: Any = None
        self.duration: Any = None
        self.actions: Any = None
        self.failures: Any = None
        self.failed_open: Any = None

    def register(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.calls = Counter("smtp_mtahooks_calls", "Requests sent to MTA hooks.",
                             ["hook", "stage"], registry=registry)
        self.duration = Histogram(
            "smtp_mtahooks_duration_seconds", "Time from sending a hook request to its "
            "complete answer (or failure), waiting for a free slot included.",
            ["hook", "stage"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.actions = Counter("smtp_mtahooks_actions", "Valid answers of MTA hooks, by "
                               "action (notify stages: ok).", ["hook", "stage", "action"],
                               registry=registry)
        self.failures = Counter(
            "smtp_mtahooks_failures", "MTA hook requests without a usable answer, by reason "
            "(timeout, connect, tls, http_status, protocol, too_large, invalid_response, "
            "overflow).", ["hook", "stage", "reason"], registry=registry)
        self.failed_open = Counter(
            "smtp_mtahooks_failed_open", "Failures let through because the hook's "
            "on_failure is accept.", ["hook", "stage"], registry=registry)

    def call(self, hook: str, stage: str) -> None:
        if self.calls is not None:
            self.calls.labels(hook=hook, stage=stage).inc()

    def observe(self, hook: str, stage: str, seconds: float) -> None:
        if self.duration is not None:
            self.duration.labels(hook=hook, stage=stage).observe(seconds)

    def action(self, hook: str, stage: str, action: str) -> None:
        if self.actions is not None:
            self.actions.labels(hook=hook, stage=stage, action=action).inc()

    def failure(self, hook: str, stage: str, reason: str) -> None:
        if self.failures is not None:
            self.failures.labels(hook=hook, stage=stage, reason=reason).inc()

    def opened(self, hook: str, stage: str) -> None:
        if self.failed_open is not None:
            self.failed_open.labels(hook=hook, stage=stage).inc()


class MtaHooksPlugin:
    """The ``mtahooks`` plugin; one instance per server."""

    def __init__(self) -> None:
        self.settings = MtaHooksSettings()
        self._clients: dict[str, HookClient] = {}
        self._by_stage: dict[str, tuple[HookSettings, ...]] = {s: () for s in STAGES}
        self._hostname = "localhost"
        self._metrics = _Metrics()
        self._pending: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ lifecycle

    @hookimpl
    def register_config(self) -> dict[str, type[MtaHooksSettings]]:
        return {"mtahooks": MtaHooksSettings}

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self._metrics.register(registry)

    @hookimpl
    def auth_mechanisms(self) -> list[str]:
        # The auth stage hook only vetoes logins; it checks no password, so it must not
        # make Elemta offer AUTH PLAIN/LOGIN by itself.
        return []

    @hookimpl
    async def startup(self, app: App) -> None:
        self.settings = app.plugin_settings("mtahooks")
        if self.settings.hooks:
            try:
                protocol.load_schemas()
            except Exception as e:   # a damaged installation: say which file
                raise StartupError(f"[plugins.mtahooks]: the JSON Schemas shipped with the "
                                   f"plugin cannot be used ({e}); reinstall elemta-mtahooks"
                                   ) from None
        self._hostname = app.settings.server.hostname
        self._by_stage = {s: self.settings.for_stage(s) for s in STAGES}
        agent = f"elemta-mtahooks/{__version__}"
        listeners = {listener.name for listener in app.settings.listeners}
        for hook in self.settings.hooks:
            unknown = sorted(set(hook.listeners) - listeners)
            if unknown:
                raise StartupError(
                    f"[plugins.mtahooks] hook {hook.name}: listeners names "
                    f"{', '.join(unknown)}, but the [[listeners]] are "
                    f"{', '.join(sorted(listeners)) or 'none'}")
        clients: dict[str, HookClient] = {}
        try:
            for hook in self.settings.hooks:
                try:
                    ca_file = existing_ca_file(
                        hook.ca_file and app.settings.resolve(hook.ca_file), "the hook service")
                    clients[hook.name] = HookClient(hook, ca_file, agent)
                except ValueError as e:
                    raise StartupError(f"[plugins.mtahooks] hook {hook.name}: {e}") from None
                self._warn_plain_http(hook)
        except BaseException:
            for client in clients.values():
                await client.close()
            raise
        self._clients = clients
        plugin_timeout = app.settings.plugins.timeouts.get(
            "mtahooks", app.settings.plugins.timeout_seconds)
        for stage in STAGES:
            if stage in NOTIFY_STAGES or stage == "deliver":
                continue  # notifications run in the background; deliver has the delivery limit
            total = sum(h.timeout_seconds for h in self._by_stage[stage])
            if total >= plugin_timeout:
                log.warning("mtahooks: the hooks at %s may take %gs together, as long as the "
                            "plugin's timeout (%gs): Elemta would cut them off with 451 "
                            "4.3.0; lower timeout_seconds or raise [plugins] timeouts = "
                            "{ mtahooks = ... }", stage, total, plugin_timeout)
        if clients:
            log.info("mtahooks: %s", "; ".join(
                f"{h.name} at {', '.join(h.stages)} -> {h.url}" for h in self.settings.hooks))

    @staticmethod
    def _warn_plain_http(hook: HookSettings) -> None:
        host = plain_http_host(hook.url)
        if host is not None:
            log.warning("mtahooks: hook %s sends session and message data over plain HTTP to "
                        "%s; use https:// beyond this machine", hook.name, host)

    @hookimpl
    async def shutdown(self, app: App) -> None:
        pending = set(self._pending)
        if pending:
            _, late = await asyncio.wait(pending, timeout=DRAIN_SECONDS)
            for task in late:
                task.cancel()
            if late:
                log.warning("mtahooks: %d notification(s) still in flight at shutdown were "
                            "dropped", len(late))
                await asyncio.wait(late, timeout=1.0)
        for client in self._clients.values():
            await client.close()
        self._clients = {}

    # ------------------------------------------------------------ calling a hook

    def _doc(self, hook: HookSettings, stage: str) -> dict[str, Any]:
        return protocol.base_request(hook, stage, new_id(), int(time.time()), self._hostname)

    async def _call(self, hook: HookSettings, stage: str, doc: dict[str, Any], what: str,
                    *, large: bool = False) -> Decision:
        """Ask ``hook``; its decision, or on failure ``continue`` (``on_failure = accept``,
        and always at notify stages) or the internal action ``fail``."""
        client = self._clients.get(hook.name)
        if client is None:   # not started, or shut down
            return Decision("fail", reason="the plugin is not running")
        notify = stage in NOTIFY_STAGES
        body = await asyncio.to_thread(protocol.encode, doc) if large else protocol.encode(doc)
        m = self._metrics
        m.call(hook.name, stage)
        start = time.perf_counter()
        try:
            raw = await client.post(body, doc["timestamp"], doc["requestId"], stage,
                                    want_body=not notify)
            decision = Decision("continue") if notify else protocol.parse_response(raw, stage)
        except (HookError, InvalidResponse) as e:
            reason = e.kind if isinstance(e, HookError) else "invalid_response"
            m.failure(hook.name, stage, reason)
            if notify:
                log.warning("mtahooks: hook %s at %s for %s: %s", hook.name, stage, what, e)
                return Decision("continue", reason=str(e))
            if hook.on_failure == "accept":
                m.opened(hook.name, stage)
                log.warning("mtahooks: hook %s failed at %s for %s: %s; let through "
                            "(on_failure = accept)", hook.name, stage, what, e)
                return Decision("continue", reason=str(e))
            log.warning("mtahooks: hook %s failed at %s for %s: %s; answered with a "
                        "temporary failure (on_failure = tempfail)", hook.name, stage, what, e)
            return Decision("fail", reason=str(e))
        finally:
            m.observe(hook.name, stage, time.perf_counter() - start)
        m.action(hook.name, stage, "ok" if notify else decision.action)
        if decision.action != "continue":
            reply = decision.reply
            log.info("mtahooks: hook %s at %s for %s: %s%s%s", hook.name, stage, what,
                     decision.action,
                     f" {reply.code} {reply.enhanced} {reply.text}" if reply else "",
                     f" ({decision.reason})" if decision.reason else "")
        return decision

    def _inbound_hooks(self, stage: str, session: Session) -> tuple[HookSettings, ...]:
        hooks = self._by_stage.get(stage, ())
        if not hooks:
            return ()
        name = session.listener.name
        return tuple(h for h in hooks if not h.listeners or name in h.listeners)

    async def _before_data(self, stage: str, session: Session,
                           make: Callable[[HookSettings], dict[str, Any]], what: str,
                           tx: Transaction | None = None,
                           recipient: Recipient | None = None) -> Verdict | None:
        """connect, ehlo, auth, mail, rcpt: the first refusal or accept answers the
        command; a discard or quarantine is kept for the end of DATA."""
        for hook in self._inbound_hooks(stage, session):
            d = await self._call(hook, stage, make(hook), what)
            if d.action == "continue":
                continue
            if d.action == "fail":
                return failure_verdict(stage)
            if d.action in ("reject", "tempfail"):
                return d.verdict
            if d.action == "accept":
                # a hook never grants a login nor accepts a recipient the server refused
                if stage in ("auth", "rcpt"):
                    return None
                return d.verdict
            reason = d.reason or f"{d.action} by policy hook {hook.name}"
            if stage == "rcpt" and d.action == "discard" and tx is not None \
                    and recipient is not None:
                tx.stash.setdefault(DROPPED_RECIPIENTS, {})[recipient.address.lower()] = reason
            elif tx is not None:
                _remember(tx.stash, TX_DISPOSITION, d.action, reason)
            else:
                _remember(session.stash, SESSION_DISPOSITION, d.action, reason)
        return None

    # ------------------------------------------------------------ inbound stages

    @staticmethod
    def _what(session: Session, tx: Transaction | None = None) -> str:
        return (f"session {session.id} from {session.peer_ip}"
                + (f", queue id {tx.id}" if tx is not None else ""))

    @hookimpl
    async def connect(self, session: Session) -> Verdict | None:
        def make(hook: HookSettings) -> dict[str, Any]:
            doc = self._doc(hook, "connect")
            protocol.add_session(doc, session)
            return doc

        return await self._before_data("connect", session, make, self._what(session))

    @hookimpl
    async def helo(self, session: Session, hostname: str) -> Verdict | None:
        def make(hook: HookSettings) -> dict[str, Any]:
            doc = self._doc(hook, "ehlo")
            protocol.add_session(doc, session)
            doc["session"]["helo"] = protocol.safe_text(hostname)
            return doc

        return await self._before_data("ehlo", session, make, self._what(session))

    @hookimpl(tryfirst=True)
    async def auth(self, session: Session, mechanism: str,
                   credentials: Credentials) -> Verdict | None:
        def make(hook: HookSettings) -> dict[str, Any]:
            doc = self._doc(hook, "auth")
            protocol.add_session(doc, session)
            doc["sasl"] = {"mechanism": mechanism, "login": protocol.safe_text(credentials.login),
                           "authzid": protocol.safe_text(credentials.authzid or "")}
            return doc

        return await self._before_data("auth", session, make, self._what(session)
                                       + f", login {credentials.login!r}")

    @hookimpl
    async def mail(self, session: Session, tx: Transaction, sender: str,
                   params: dict[str, str | None]) -> Verdict | None:
        def make(hook: HookSettings) -> dict[str, Any]:
            doc = self._doc(hook, "mail")
            protocol.add_session(doc, session)
            protocol.add_transaction(doc, tx)
            doc["envelope"]["from"] = {"address": protocol.safe_text(sender),
                                       "params": protocol.params_doc(params)}
            return doc

        return await self._before_data("mail", session, make, self._what(session, tx), tx=tx)

    @hookimpl
    async def rcpt_ok(self, session: Session, tx: Transaction,
                      recipient: Recipient) -> Verdict | None:
        def make(hook: HookSettings) -> dict[str, Any]:
            doc = self._doc(hook, "rcpt")
            protocol.add_session(doc, session)
            protocol.add_transaction(doc, tx)
            doc["recipient"] = protocol.inbound_recipient(recipient)
            return doc

        return await self._before_data("rcpt", session, make,
                                       self._what(session, tx) + f", <{recipient.address}>",
                                       tx=tx, recipient=recipient)

    @hookimpl
    async def data(self, session: Session, tx: Transaction, message: Message,
                   auth_results: list[AuthResult]) -> Verdict | None:
        what = self._what(session, tx)
        disposition = session.stash.get(SESSION_DISPOSITION, None)
        later = tx.stash.get(TX_DISPOSITION, None)
        if later is not None and (disposition is None or later[0] == "discard"):
            disposition = later
        if disposition is not None and disposition[0] == "discard":
            log.info("mtahooks: %s discarded: %s", what, disposition[1])
            return Discard(disposition[1])
        dropped = tx.stash.get(DROPPED_RECIPIENTS, None)
        if dropped:
            for address, reason in dropped.items():
                if tx.remove_recipient(address):
                    log.info("mtahooks: %s: <%s> discarded: %s", what, address, reason)
            if not tx.recipients:
                return Discard("every recipient was discarded by a policy hook")
        quarantine = disposition[1] if disposition is not None else None
        accepted: Decision | None = None
        for hook in self._inbound_hooks("data", session):
            doc = self._doc(hook, "data")
            protocol.add_session(doc, session)
            protocol.add_transaction(doc, tx)
            doc["authResults"] = protocol.auth_results(auth_results)
            large = message.size > INLINE_BYTES
            doc["message"] = await self._message_doc(hook, message, large)
            d = await self._call(hook, "data", doc, what, large=large)
            if d.action == "continue" and not d.modifications:
                continue
            if d.action == "fail":
                return failure_verdict("data")
            if d.action in ("reject", "tempfail"):
                return d.verdict
            if d.action == "discard":
                return Discard(d.reason or f"discarded by policy hook {hook.name}")
            try:
                await protocol.apply_modifications(d.modifications, message, tx)
            except (ValueError, OSError) as e:
                log.error("mtahooks: hook %s at data for %s: a modification could not be "
                          "applied: %s; answered with a temporary failure", hook.name, what, e)
                self._metrics.failure(hook.name, "data", "invalid_response")
                return failure_verdict("data")
            if d.action == "quarantine":
                quarantine = d.reason or f"quarantined by policy hook {hook.name}"
            elif d.action == "accept":
                accepted = d
                break
        if quarantine is not None:
            return Quarantine(quarantine)
        if accepted is not None:
            return accepted.verdict
        return None

    async def _message_doc(self, hook: HookSettings, message: Message,
                           large: bool) -> dict[str, Any]:
        if hook.body == "none":
            return protocol.message_document(message.size, message.headers, None, "none")

        def build() -> dict[str, Any]:
            body = protocol.message_body(message, hook.max_body_bytes, hook.body_over_limit)
            return protocol.message_document(message.size, message.headers, body, hook.body)

        return await asyncio.to_thread(build) if large else build()

    # ------------------------------------------------------------ delivery

    @hookimpl(tryfirst=True)
    async def route(self, envelope: Envelope, recipient: RecipientState) -> Route | None:
        hooks = self._by_stage.get("route", ())
        what = f"queue id {envelope.id}, <{recipient.address}>"
        for hook in hooks:
            doc = self._doc(hook, "route")
            protocol.add_envelope(doc, envelope)
            doc["recipient"] = protocol.outbound_recipient(recipient)
            doc["delivery"] = protocol.delivery(envelope, [recipient.address])
            d = await self._call(hook, "route", doc, what)
            if d.action == "continue":
                continue
            if d.action == "accept":
                return None
            if d.action == "fail":
                return Route(TRANSPORT, destination=f"451 4.3.0 {UNAVAILABLE} ({hook.name})")
            assert d.reply is not None
            return Route(TRANSPORT, destination=f"{d.reply.code} {d.reply.enhanced} "
                                                f"{d.reply.text}")
        return None

    @hookimpl(tryfirst=True)
    async def deliver(self, envelope: Envelope, route: Route, recipients: list[RecipientState],
                      content_path: str) -> list[Outcome] | None:
        if route.transport == TRANSPORT:
            return [_route_outcome(route.destination, r.address) for r in recipients]
        hooks = self._by_stage.get("deliver", ())
        if not hooks:
            return None
        addresses = [r.address for r in recipients]
        what = f"queue id {envelope.id}, {len(addresses)} recipient(s) via {route.transport}"
        size, headers = await asyncio.to_thread(protocol.file_headers, content_path)
        for hook in hooks:
            doc = self._doc(hook, "deliver")
            protocol.add_envelope(doc, envelope)
            doc["delivery"] = protocol.delivery(envelope, addresses, route=route)
            body = None
            if hook.body != "none":
                body = await asyncio.to_thread(protocol.file_body, content_path,
                                               hook.max_body_bytes, hook.body_over_limit)
            doc["message"] = protocol.message_document(size, headers, body, hook.body)
            d = await self._call(hook, "deliver", doc, what, large=size > INLINE_BYTES)
            if d.action == "continue":
                continue
            if d.action == "accept":
                return None
            if d.action == "fail":
                return [Outcome(a, 451, "4.3.0", f"{UNAVAILABLE} ({hook.name})")
                        for a in addresses]
            assert d.reply is not None
            return [Outcome(a, d.reply.code, d.reply.enhanced, d.reply.text)
                    for a in addresses]
        return None

    def _notify(self, stage: str, envelope: Envelope, recipient: RecipientState,
                outcome: Outcome) -> None:
        hooks = self._by_stage.get(stage, ())
        what = f"queue id {envelope.id}, <{recipient.address}>"
        for hook in hooks:
            if len(self._pending) >= MAX_PENDING_NOTIFICATIONS:
                self._metrics.failure(hook.name, stage, "overflow")
                log.warning("mtahooks: %d notifications in flight; %s of %s to hook %s "
                            "dropped", len(self._pending), stage, what, hook.name)
                continue
            doc = self._doc(hook, stage)
            protocol.add_envelope(doc, envelope)
            doc["recipient"] = protocol.outbound_recipient(recipient)
            doc["delivery"] = protocol.delivery(envelope, [recipient.address], outcome=outcome)
            task = asyncio.create_task(self._call(hook, stage, doc, what),
                                       name=f"mtahooks-{hook.name}-{stage}")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    @hookimpl
    def delivered(self, envelope: Envelope, recipient: RecipientState,
                  outcome: Outcome) -> None:
        self._notify("delivered", envelope, recipient, outcome)

    @hookimpl
    def deferred(self, envelope: Envelope, recipient: RecipientState,
                 outcome: Outcome) -> None:
        self._notify("deferred", envelope, recipient, outcome)

    @hookimpl
    def bounced(self, envelope: Envelope, recipient: RecipientState, outcome: Outcome) -> None:
        self._notify("bounced", envelope, recipient, outcome)

