"""Keys of domains the configuration has none for, from the ``dkim_keys`` hook (a key
store such as elemta-datasource), kept a short while."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elemta import DkimKey

from .keys import KeyFileError, SigningKey, load_stored_key
from .settings import normalize_domain
from .sign import choose

if TYPE_CHECKING:
    from . import DkimPlugin

log = logging.getLogger("elemta.dkim")


def signing_domains(domain: str, subdomains: bool) -> list[str]:
    """The domains whose keys may sign for ``domain``: itself, then (with
    ``sign_subdomains``) its parents, nearest first, down to two labels."""
    if not subdomains:
        return [domain]
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)]


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
        records: list[_Stored] = []
        for name in signing_domains(domain, self.plugin.settings.sign_subdomains):
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
