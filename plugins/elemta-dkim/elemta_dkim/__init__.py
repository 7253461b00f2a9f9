"""elemta-dkim: DKIM verification of inbound mail and signing of outbound mail.

Enabled as ``dkim``; the core makes one :class:`DkimPlugin` per server. This
module holds only the hooks: verification is :mod:`elemta_dkim.verify`,
signing :mod:`elemta_dkim.sign`, keys :mod:`elemta_dkim.keys` (and those of a
key store, :mod:`elemta_dkim.stored`), the command line :mod:`elemta_dkim.cli`
and what it asks the running server, :mod:`elemta_dkim.served`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elemta import (AuthResult, BoundedLabels, Message, Reject, Session, StartupError, TempFail,
                    hookimpl)

from .keys import KeyFileError, SigningKey, load_key
from .settings import DkimSettings, KeySettings
from .sign import SIGNATURE_FIELD, SignError, Signer, added_bytes, from_domain
from .stored import KeyUnavailable, StoredKeys
from .verify import Verifier

if TYPE_CHECKING:
    import click
    from elemta import App
    from prometheus_client import CollectorRegistry, Counter

__all__ = ["DkimPlugin", "DkimSettings", "KeySettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.dkim")


def load_keys(settings: DkimSettings, keys_dir: Path) -> tuple[list[SigningKey], list[str]]:
    """Every configured key, loaded; and the problems, one line per unusable key file."""
    keys: list[SigningKey] = []
    problems: list[str] = []
    for entry in settings.keys:
        try:
            keys.append(load_key(entry, keys_dir))
        except KeyFileError as e:
            problems.append(f"key {entry.selector} of {entry.domain}: {e}")
    return keys, problems


class DkimPlugin:
    """The ``dkim`` plugin: verifies in ``message_auth``, signs in ``data``."""

    def __init__(self) -> None:
        self.settings = DkimSettings()
        self.signer: Signer | None = None
        self.verifier: Verifier | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.labels = BoundedLabels(())
        self.results: Counter | None = None
        self.signatures: Counter | None = None
        self.app: App | None = None
        self.keys_dir = Path()
        self.stored = StoredKeys(self)

    @hookimpl
    def register_config(self) -> Mapping[str, type[DkimSettings]]:
        return {"dkim": DkimSettings}

    @hookimpl
    def register_metrics(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self.results = Counter(
            "smtp_dkim_results", "DKIM verification results, one per signature (none: the "
            "message had no signature), by signing domain.", ["domain", "result"],
            registry=registry)
        self.signatures = Counter(
            "smtp_dkim_signatures", "DKIM signatures added to outbound mail.",
            ["domain", "algorithm"], registry=registry)

    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        from .cli import dkim_group

        if dkim_group.name not in cli.commands:
            cli.add_command(dkim_group)

    @hookimpl
    def startup(self, app: App) -> None:
        """Load every key (a key file that cannot be used stops the server) and start the
        worker threads."""
        self.settings = settings = app.plugin_settings("dkim")
        self.app = app
        self.stored = StoredKeys(self)
        self.keys_dir = app.settings.resolve(Path(settings.keys_dir))
        keys, problems = load_keys(settings, self.keys_dir)
        if problems:
            raise StartupError("dkim: cannot use the signing keys:\n  " + "\n  ".join(problems))
        self.labels = BoundedLabels(settings.metrics_domains)
        self.executor = ThreadPoolExecutor(settings.threads, thread_name_prefix="elemta-dkim")
        self.signer = Signer(keys, settings)
        self.verifier = Verifier(app.resolver.dkim_dnsfunc, self.executor,
                                 max_signatures=settings.max_signatures,
                                 partial_body_result=settings.partial_body_result)
        for domain in sorted(self.signer.by_domain):
            log.info("dkim: signing for %s with %s", domain, self.in_service(domain))

    def in_service(self, domain: str) -> str:
        """The configured selectors that sign ``domain``'s mail now, for the log."""
        assert self.signer is not None
        now = dt.datetime.now(dt.timezone.utc)
        return ", ".join(f"{k.selector} ({k.a_tag})"
                         for k in self.signer.keys_for(domain, now)) or "none valid now"

    @hookimpl
    async def reload(self) -> None:
        """SIGHUP: forget the key store's keys (the next message asks again) and read the
        configured key files again; if one cannot be used now, keep the keys in service."""
        if self.signer is None:
            return
        self.stored = StoredKeys(self)  # lookups under way finish with the old one
        loop = asyncio.get_running_loop()
        keys, problems = await loop.run_in_executor(self.executor, load_keys, self.settings,
                                                    self.keys_dir)
        if problems:
            log.error("dkim: reload: the signing keys in service are kept, cannot use the "
                      "key files: %s", "; ".join(problems))
            return
        self.signer = Signer(keys, self.settings)
        signing = "; ".join(f"{d} with {self.in_service(d)}" for d in sorted(self.signer.by_domain))
        log.info("dkim: reloaded: %s; keys of the key store are asked for again",
                 f"signing for {signing}" if signing else "no configured keys")

    @hookimpl
    def control_commands(self) -> dict[str, Any]:
        from .served import keys_answer

        async def dkim_keys(args: dict[str, Any]) -> dict[str, Any]:
            return await keys_answer(self, args)

        return {"dkim.keys": dkim_keys}

    @hookimpl
    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    @hookimpl
    async def message_auth(self, session: Session, message: Message) -> list[AuthResult] | None:
        """One ``dkim`` result per signature, or ``dkim=none``."""
        verifier = self.verifier
        if verifier is None or not self.settings.verify:
            return None
        if session.auth_user is not None and not self.settings.verify_authenticated:
            return None
        checked = await verifier.verify(message.open, message.size)
        if self.results is not None:
            for c in checked:
                domain = c.domain if c.result != "none" else from_domain(message.get_all("From"))
                self.results.labels(self.labels(domain), c.result).inc()
        return [c.auth_result() for c in checked]

    def should_sign(self, session: Session) -> bool:
        s = self.settings
        return ((s.sign_authenticated and session.auth_user is not None)
                or (s.sign_relay and session.relay_allowed))

    @hookimpl
    async def data(self, session: Session, message: Message) -> Reject | None:
        """Sign the message of an authenticated (or relaying) client with the keys of its
        From: domain; add the signatures and let the later plugins decide."""
        signer, executor = self.signer, self.executor
        if signer is None or executor is None or not self.should_sign(session):
            return None
        domain = from_domain(message.get_all("From"))
        if domain is None:
            log.info("dkim: session %s: not signed: the message has no From: field with "
                     "one domain", session.id)
            return None
        now = time.time()
        when = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        keys = signer.keys_for(domain, when)
        if not keys and not signer.configured(domain):
            # not a domain of the configuration: a key store (dkim_keys) may hold its keys
            try:
                keys = await self.stored.keys_for(domain, when)
            except KeyUnavailable as e:
                log.error("dkim: session %s: not signed, the message is refused for now "
                          "(451): %s", session.id, e)
                return TempFail(451, "4.3.0", "The DKIM signing key is unavailable, "
                                "try again later")
        if not keys:
            log.debug("dkim: session %s: no key valid now signs for %s", session.id, domain)
            return None
        # what the core will write above the received message, as it is now; headers
        # added after this (by later plugins) must not be signed fields
        added = added_bytes(message.added)
        loop = asyncio.get_running_loop()
        try:
            values = await loop.run_in_executor(executor, _sign, signer, message, added,
                                                keys, now)
        except SignError as e:
            log.info("dkim: session %s: cannot sign for %s: %s", session.id, domain, e)
            return Reject(550, "5.6.0", f"The message cannot be DKIM-signed: {e}")
        for key, value in zip(keys, values):
            message.add_header(SIGNATURE_FIELD, value)
            if self.signatures is not None:
                self.signatures.labels(self.labels(key.domain), key.a_tag).inc()
        return None


def _sign(signer: Signer, message: Message, added: bytes, keys: list[SigningKey],
          now: float) -> list[str]:
    with message.open() as f:
        return signer.sign(added, f, keys, now)
