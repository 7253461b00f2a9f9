"""The static TOML backend: the whole directory in one file, for small sites.

::

    [domains."example.org"]
    reject_unknown = true                  # the default
    catch_all = "postmaster@example.org"   # optional
    max_message_bytes = 26214400           # optional
    mailboxes = ["alice", "bob"]           # local parts

    [domains."example.org".aliases]
    team = ["alice@example.org", "bob@example.org", "carol@partner.example"]

    [rules."sales@example.org"]
    action = "redirect"
    targets = ["alice@example.org"]

The file is read at start-up (a mistake stops the server with the file and the
key) and again whenever it changes; a change that does not parse is logged and
the previous contents stay in use. The ``elemta domains|mailboxes|aliases``
commands edit it with tomlkit, so comments and layout survive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import tomlkit

from .directory import (BackendUnavailable, DirectoryError, Domain, Lookup, Rule, check_rule,
                        normalize_address, normalize_domain, normalize_target)

log = logging.getLogger("elemta.datasource")

_DOMAIN_KEYS = {"reject_unknown", "catch_all", "max_message_bytes", "mailboxes", "aliases"}
_RULE_KEYS = {"action", "targets", "code", "enhanced", "text"}


def _check_table(where: str, table: Any, keys: set[str]) -> None:
    if not isinstance(table, dict):
        raise DirectoryError(f"{where}: must be a table")
    extra = set(table) - keys
    if extra:
        raise DirectoryError(f"{where}.{sorted(extra)[0]}: unknown key (one of "
                             f"{', '.join(sorted(keys))})")


def _address_in(entry: str, domain: str) -> str:
    """A mailbox or alias entry of a domain table (a local part, or a whole address)."""
    return normalize_address(entry if "@" in entry else f"{entry}@{domain}")


def _key_for(table: Any, wanted: str, normalize: Any) -> str | None:
    """The key of ``table`` that means ``wanted`` once normalized, as written in the file."""
    return next((k for k in table if normalize(k) == wanted), None)


class StaticData:
    def __init__(self) -> None:
        self.domains: dict[str, Domain] = {}
        self.mailboxes: set[str] = set()
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.rules: dict[str, Rule] = {}


def parse(doc: dict[str, Any], source: str) -> StaticData:
    """Validate a directory document; :class:`DirectoryError` names the key at fault."""
    data = StaticData()
    unknown = set(doc) - {"domains", "rules"}
    if unknown:
        raise DirectoryError(f"{source}: unknown top-level key {sorted(unknown)[0]!r} "
                             "(expected [domains.\"…\"] and [rules.\"…\"] tables)")
    for raw_name, table in (doc.get("domains") or {}).items():
        where = f'{source}: domains."{raw_name}"'
        _check_table(where, table, _DOMAIN_KEYS)
        try:
            name = normalize_domain(raw_name)
            catch_all = table.get("catch_all")
            max_bytes = table.get("max_message_bytes")
            if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
                raise DirectoryError("max_message_bytes must be a positive integer")
            reject_unknown = table.get("reject_unknown", True)
            if not isinstance(reject_unknown, bool):
                raise DirectoryError("reject_unknown must be true or false")
            data.domains[name] = Domain(name, reject_unknown,
                                        normalize_target(catch_all) if catch_all else None,
                                        max_bytes)
            for local in table.get("mailboxes", []):
                data.mailboxes.add(_address_in(local, name))
            for local, targets in (table.get("aliases") or {}).items():
                address = _address_in(local, name)
                if isinstance(targets, str):
                    targets = [targets]
                data.aliases[address] = tuple(normalize_target(t) for t in targets)
        except DirectoryError as e:
            raise DirectoryError(f"{where}: {e}") from None
    for pattern, table in (doc.get("rules") or {}).items():
        where = f'{source}: rules."{pattern}"'
        _check_table(where, table, _RULE_KEYS)
        try:
            rule = check_rule(Rule(pattern, table.get("action", ""),
                                   tuple(table.get("targets", ())), table.get("code"),
                                   table.get("enhanced"), table.get("text")))
        except DirectoryError as e:
            raise DirectoryError(f"{where}: {e}") from None
        data.rules[rule.pattern] = rule
    return data


class StaticBackend:
    """Lookups from memory; the file is re-read when its modification time changes."""

    RECHECK_SECONDS = 1.0

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._data = StaticData()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    async def open(self) -> None:
        self._load(strict=True)

    async def close(self) -> None:
        pass

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _load(self, strict: bool) -> None:
        stamp = self._stat()
        if stamp is None:
            if strict:
                log.warning("datasource: %s does not exist yet; no domains are hosted until "
                            "it is created (`elemta domains add` creates it)", self.path)
            self._data, self._stamp = StaticData(), None
            return
        try:
            doc = tomlkit.parse(self.path.read_text(encoding="utf-8")).unwrap()
            data = parse(doc, str(self.path))
        except (DirectoryError, tomlkit.exceptions.TOMLKitError, OSError, ValueError) as e:
            if strict:
                raise DirectoryError(str(e)) from None
            log.error("datasource: cannot reload %s: %s; still using the previous contents",
                      self.path, e)
            self._stamp = stamp
            return
        self._data, self._stamp = data, stamp

    def _fresh(self) -> StaticData:
        now = time.monotonic()
        if now - self._checked >= self.RECHECK_SECONDS:
            self._checked = now
            if self._stat() != self._stamp:
                self._load(strict=False)
        return self._data

    async def lookup(self, address: str, base: str, domain: str) -> Lookup:
        data = self._fresh()
        d = data.domains.get(domain)
        if d is None:
            return Lookup(None)
        aliases = data.aliases.get(address) or data.aliases.get(base) or ()
        rules = tuple(data.rules[p] for p in dict.fromkeys((address, base, domain))
                      if p in data.rules)
        return Lookup(d, base in data.mailboxes, aliases, rules)

    async def get_domain(self, name: str) -> Domain | None:
        return self._fresh().domains.get(name)

    # -------------------------------------------------------------- editing

    def _edit(self, change) -> Any:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = "# The Elemta directory: hosted domains, mailboxes, aliases and rules.\n"
        except OSError as e:
            raise BackendUnavailable(f"{self.path}: {e.strerror or e}") from None
        doc = tomlkit.parse(text)
        result = change(doc)
        parse(doc.unwrap(), str(self.path))  # never write a file that would not load
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(tomlkit.dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._load(strict=True)
        return result

    async def _run_edit(self, change) -> Any:
        return await asyncio.to_thread(self._edit, change)

    @staticmethod
    def _domains(doc) -> Any:
        if "domains" not in doc:
            doc["domains"] = tomlkit.table(is_super_table=True)
        return doc["domains"]

    @classmethod
    def _domain_table(cls, doc, name: str) -> Any:
        domains = cls._domains(doc)
        key = _key_for(domains, name, normalize_domain)
        if key is not None:
            return domains[key]
        raise DirectoryError(f"{name} is not a hosted domain; add it first with "
                             f"`elemta domains add {name}`")

    async def add_domain(self, domain: Domain, *, replace: bool = False) -> None:
        def change(doc) -> None:
            domains = self._domains(doc)
            existing = _key_for(domains, domain.name, normalize_domain)
            if existing is not None and not replace:
                raise DirectoryError(f"domain {domain.name} exists already "
                                     "(use --update to change its settings)")
            table = domains[existing] if existing is not None else tomlkit.table()
            table["reject_unknown"] = domain.reject_unknown
            for key, value in (("catch_all", domain.catch_all),
                               ("max_message_bytes", domain.max_message_bytes)):
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
            if existing is None:
                table["mailboxes"] = tomlkit.array()
                domains[domain.name] = table

        await self._run_edit(change)

    async def remove_domain(self, name: str) -> bool:
        def change(doc) -> bool:
            domains = self._domains(doc)
            key = _key_for(domains, name, normalize_domain)
            if key is None:
                return False
            del domains[key]
            return True

        return await self._run_edit(change)

    async def list_domains(self) -> list[Domain]:
        return sorted(self._fresh().domains.values(), key=lambda d: d.name)

    async def add_mailbox(self, address: str) -> None:
        local, _, domain = address.rpartition("@")

        def change(doc) -> None:
            table = self._domain_table(doc, domain)
            boxes = table.setdefault("mailboxes", tomlkit.array())
            if any(_address_in(m, domain) == address for m in boxes):
                raise DirectoryError(f"mailbox {address} exists already")
            boxes.append(local)

        await self._run_edit(change)

    async def remove_mailbox(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")

        def change(doc) -> bool:
            try:
                table = self._domain_table(doc, domain)
            except DirectoryError:
                return False
            boxes = table.get("mailboxes", [])
            for i, m in enumerate(list(boxes)):
                if _address_in(m, domain) == address:
                    del boxes[i]
                    return True
            return False

        return await self._run_edit(change)

    async def list_mailboxes(self, domain: str | None = None) -> list[str]:
        boxes = self._fresh().mailboxes
        return sorted((m for m in boxes if domain is None or m.endswith("@" + domain)),
                      key=lambda a: (a.rpartition("@")[2], a))

    async def add_alias(self, address: str, targets: list[str]) -> None:
        local, _, domain = address.rpartition("@")

        def change(doc) -> None:
            table = self._domain_table(doc, domain)
            aliases = table.setdefault("aliases", tomlkit.table())
            # the entry as the file spells it, if there is one
            key = _key_for(aliases, address, lambda k: _address_in(k, domain)) or local
            current = aliases.get(key)
            if current is None:
                aliases[key] = tomlkit.array()
                current = aliases[key]
            elif isinstance(current, str):
                aliases[key] = tomlkit.array([current])
                current = aliases[key]
            for t in targets:
                if t not in [normalize_target(c) for c in current]:
                    current.append(t)

        await self._run_edit(change)

    async def remove_alias(self, address: str, target: str | None = None) -> int:
        local, _, domain = address.rpartition("@")

        def change(doc) -> int:
            try:
                table = self._domain_table(doc, domain)
            except DirectoryError:
                return 0
            aliases = table.get("aliases", {})
            key = _key_for(aliases, address, lambda k: _address_in(k, domain))
            if key is None:
                return 0
            current = aliases[key]
            if isinstance(current, str):
                current = [current]
            if target is None:
                del aliases[key]
                return len(current)
            keep = [c for c in current if normalize_target(c) != target]
            removed = len(current) - len(keep)
            if keep:
                aliases[key] = tomlkit.array(keep)
            else:
                del aliases[key]
            return removed

        return await self._run_edit(change)

    async def list_aliases(self, domain: str | None = None) -> list[tuple[str, str]]:
        out = [(a, t) for a, ts in self._fresh().aliases.items() for t in ts
               if domain is None or a.endswith("@" + domain)]
        return sorted(out)

    async def set_rule(self, rule: Rule) -> None:
        def change(doc) -> None:
            if "rules" not in doc:
                doc["rules"] = tomlkit.table(is_super_table=True)
            table = tomlkit.table()
            table["action"] = rule.action
            if rule.targets:
                table["targets"] = list(rule.targets)
            for key in ("code", "enhanced", "text"):
                value = getattr(rule, key)
                if value is not None:
                    table[key] = value
            rules = doc["rules"]
            for key in list(rules):
                if key == rule.pattern:
                    del rules[key]
            rules[rule.pattern] = table

        await self._run_edit(change)

    async def remove_rule(self, pattern: str) -> bool:
        def change(doc) -> bool:
            rules = doc.get("rules", {})
            if pattern in rules:
                del rules[pattern]
                return True
            return False

        return await self._run_edit(change)

    async def list_rules(self) -> list[Rule]:
        return sorted(self._fresh().rules.values(), key=lambda r: r.pattern)
