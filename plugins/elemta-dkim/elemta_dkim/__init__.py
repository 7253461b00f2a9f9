"""elemta-dkim: DKIM verification of inbound mail and signing of outbound mail.

Enabled as ``dkim``; the core makes one :class:`DkimPlugin` per server. This
module holds only the hooks: verification is :mod:`elemta_dkim.verify`,
signing :mod:`elemta_dkim.sign`, keys :mod:`elemta_dkim.keys`, the command line
:mod:`elemta_dkim.cli`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from elemta import (AuthResult, BoundedLabels, DkimKey, Message, Reject, Session, StartupError,
                    TempFail, hookimpl)

from .keys import KeyFileError, SigningKey, load_key, load_stored_key
from .settings import DkimSettings, KeySettings, normalize_domain
from .sign import SIGNATURE_FIELD, SignError, Signer, added_bytes, choose, from_domain
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
        keys_dir = app.settings.resolve(Path(settings.keys_dir))
        keys, problems = load_keys(settings, keys_dir)
        if problems:
            raise StartupError("dkim: cannot use the signing keys:\n  " + "\n  ".join(problems))
        self.labels = BoundedLabels(settings.metrics_domains)
        self.executor = ThreadPoolExecutor(settings.threads, thread_name_prefix="elemta-dkim")
        self.signer = Signer(keys, settings)
        self.verifier = Verifier(app.resolver.dkim_dnsfunc, self.executor,
                                 max_signatures=settings.max_signatures,
                                 partial_body_result=settings.partial_body_result)
        now = dt.datetime.now(dt.timezone.utc)
        for domain in sorted(self.signer.by_domain):
            active = ", ".join(f"{k.selector} ({k.a_tag})"
                               for k in self.signer.keys_for(domain, now)) or "none valid now"
            log.info("dkim: signing for %s with %s", domain, active)

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


class KeyUnavailable(Exception):
    """The key store failed, or a key it gave cannot be used; ``str()`` says which and why."""


@dataclass(frozen=True, slots=True)
class _Stored:
    """A ``dkim_keys`` record with its validity as the signer compares it."""

    record: DkimKey
    algorithm: str
    not_before: dt.datetime | None
    not_after: dt.datetime | None

    def valid_at(self, now: dt.datetime) -> bool:
        return ((self.not_before is None or self.not_before <= now)
                and (self.not_after is None or now < self.not_after))


def _when(timestamp: float | None) -> dt.datetime | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


class StoredKeys:
    """Keys of domains the configuration has none for, asked of the ``dkim_keys`` hook
    (a datasource) and kept ``hook_keys_cache_seconds``; loaded keys are kept as long."""

    def __init__(self, plugin: DkimPlugin) -> None:
        self.plugin = plugin
        # domain -> (expires, records)
        self.answers: dict[str, tuple[float, list[_Stored]]] = {}
        self.loaded: dict[DkimKey, SigningKey] = {}

    def clear(self) -> None:
        self.answers.clear()
        self.loaded.clear()

    async def records(self, domain: str) -> list[_Stored]:
        now = time.monotonic()
        hit = self.answers.get(domain)
        if hit is not None and hit[0] > now:
            return hit[1]
        app = self.plugin.app
        if app is None:
            return []
        try:
            answer = await app.dkim_keys(domain)
        except Exception as e:  # the dispatcher has logged the plugin's failure
            raise KeyUnavailable(f"the key store failed to answer for {domain} ({e})") from None
        stored: list[_Stored] = []
        for record in answer or ():
            try:
                same = normalize_domain(record.domain) == domain
            except ValueError:
                same = False
            if not same:
                log.warning("dkim: the key store answered key %s of %s for %s; ignored",
                            record.selector, record.domain, domain)
                continue
            stored.append(_Stored(record, record.algorithm, _when(record.not_before),
                                  _when(record.not_after)))
        if hit is not None:  # a changed answer: load its keys again (a file may have changed)
            for old in hit[1]:
                self.loaded.pop(old.record, None)
        ttl = self.plugin.settings.hook_keys_cache_seconds
        if ttl > 0:
            self.answers[domain] = (now + ttl, stored)
        return stored

    async def keys_for(self, domain: str, now: dt.datetime) -> list[SigningKey]:
        """The stored keys that sign for ``domain`` at ``now`` (with ``sign_subdomains``,
        those of its nearest parent that has keys), loaded.

        :raises KeyUnavailable: the key store failed, or a chosen key cannot be used.
        """
        candidates = [domain]
        if self.plugin.settings.sign_subdomains:
            labels = domain.split(".")
            candidates += [".".join(labels[i:]) for i in range(1, len(labels) - 1)]
        records: list[_Stored] = []
        for name in candidates:
            records = await self.records(name)
            if records:
                break
        chosen: list[SigningKey] = []
        for entry in choose(records, now):
            key = self.loaded.get(entry.record)
            if key is None:
                try:
                    key = await asyncio.get_running_loop().run_in_executor(
                        self.plugin.executor, load_stored_key, entry.record)
                except KeyFileError as e:
                    raise KeyUnavailable(
                        f"key {entry.record.selector} of {entry.record.domain} from the key "
                        f"store: {e} (for the datasource's keys: `elemta domains dkim list "
                        f"{entry.record.domain}`)") from None
                if self.plugin.settings.hook_keys_cache_seconds > 0:
                    self.loaded[entry.record] = key
            chosen.append(key)
        return chosen
