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

    [users."alice@example.org"]
    password = "$argon2id$v=19$m=19456,t=2,p=1$…"   # `elemta users add` writes these
    scram = "SCRAM-SHA-256$4096:…"
    send_as = ["sales@example.org"]                  # optional; also disabled,
                                                     # max_message_bytes, daily_quota

The file is read at start-up (a mistake stops the server with the file and the
key) and again whenever it changes; a change that does not parse is logged and
the previous contents stay in use. The ``elemta domains|mailboxes|aliases|users``
commands edit it with tomlkit, so comments and layout survive. The file is
configuration, not a place to write on every message: the messages each user
sent per day are counted in a small SQLite database next to the server's state
(``usage``, an :class:`~.sql.SQLiteBackend` of its own), one per server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import tomlkit
from elemta import DkimKey

from .dkim import ALGORITHMS, check_key, check_selector, timestamp
from .directory import (DOMAIN_LIMITS, USER_FIELDS, BackendUnavailable, DirectoryError, Domain,
                        Lookup, Rule, User, check_rule, normalize_address, normalize_domain,
                        normalize_grant, normalize_login, normalize_target)

log = logging.getLogger("elemta.datasource")

_DOMAIN_KEYS = {"reject_unknown", "catch_all", "max_message_bytes", "mailboxes", "aliases",
                *DOMAIN_LIMITS}
_RULE_KEYS = {"action", "targets", "code", "enhanced", "text"}
_USER_KEYS = {*USER_FIELDS, "send_as"}
_DOMAIN_KEYS.add("dkim")    # [domains."…".dkim."<selector>"]: signing keys (dkim_keys)


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
        self.users: dict[str, User] = {}
        self.dkim: dict[str, list[DkimKey]] = {}


def parse(doc: dict[str, Any], source: str) -> StaticData:
    """Validate a directory document; :class:`DirectoryError` names the key at fault."""
    data = StaticData()
    unknown = set(doc) - {"domains", "rules", "users"}
    if unknown:
        raise DirectoryError(f"{source}: unknown top-level key {sorted(unknown)[0]!r} "
                             "(expected [domains.\"…\"], [rules.\"…\"] and [users.\"…\"] "
                             "tables)")
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
            for key in DOMAIN_LIMITS:
                _check_limit(key, table.get(key))
            data.domains[name] = Domain(name, reject_unknown,
                                        normalize_target(catch_all) if catch_all else None,
                                        max_bytes, table.get("messages_per_hour"),
                                        table.get("messages_per_day"))
            for local in table.get("mailboxes", []):
                data.mailboxes.add(_address_in(local, name))
            for local, targets in (table.get("aliases") or {}).items():
                address = _address_in(local, name)
                if isinstance(targets, str):
                    targets = [targets]
                data.aliases[address] = tuple(normalize_target(t) for t in targets)
            for selector, key in (table.get("dkim") or {}).items():
                data.dkim.setdefault(name, []).append(_parse_dkim(name, selector, key))
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
    for login, table in (doc.get("users") or {}).items():
        where = f'{source}: users."{login}"'
        _check_table(where, table, _USER_KEYS)
        try:
            data.users[normalize_login(login)] = _parse_user(normalize_login(login), table)
        except DirectoryError as e:
            raise DirectoryError(f"{where}: {e}") from None
    return data


_DKIM_KEYS = {"algorithm", "key_file", "private_key", "not_before", "not_after"}


def _parse_dkim(domain: str, selector: str, table: Any) -> DkimKey:
    _check_table(f"dkim.{selector}", table, _DKIM_KEYS)
    where = f"dkim.{selector}"
    algorithm = table.get("algorithm", "rsa")
    if algorithm not in ALGORITHMS:
        raise DirectoryError(f'{where}.algorithm must be "rsa" or "ed25519"')
    private_key, key_file = table.get("private_key"), table.get("key_file")
    if (private_key is None) == (key_file is None) \
            or not isinstance(private_key or key_file, str):
        raise DirectoryError(f"{where}: give exactly one of key_file (the path of a 0600 file) "
                             "and private_key (the PEM text)")
    return check_key(DkimKey(domain, check_selector(selector), algorithm, private_key, key_file,
                             timestamp(table.get("not_before"), f"{where}.not_before"),
                             timestamp(table.get("not_after"), f"{where}.not_after")))


def _parse_user(login: str, table: dict[str, Any]) -> User:
    for key in ("password", "scram"):
        if not isinstance(table.get(key, ""), str):
            raise DirectoryError(f"{key} must be a string")
    if not isinstance(table.get("disabled", False), bool):
        raise DirectoryError("disabled must be true or false")
    value = table.get("max_message_bytes")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value <= 0):
        raise DirectoryError("max_message_bytes must be a positive integer")
    for key in ("daily_quota", "messages_per_hour"):
        _check_limit(key, table.get(key))
    send_as = table.get("send_as", [])
    if isinstance(send_as, str):
        send_as = [send_as]
    return User(login, table.get("password"), table.get("scram"), table.get("disabled", False),
                table.get("max_message_bytes"), table.get("daily_quota"),
                tuple(normalize_grant(p) for p in send_as), table.get("messages_per_hour"))


def _check_limit(key: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        raise DirectoryError(f"{key} must be a number of messages (0: no limit)")


class StaticBackend:
    """Lookups from memory; the file is re-read when its modification time changes."""

    RECHECK_SECONDS = 1.0

    def __init__(self, path: Path, usage_path: Path | None = None) -> None:
        from .sql import SQLiteBackend

        self.path = Path(path)
        self.usage = SQLiteBackend(usage_path or
                                   self.path.with_name(f".{self.path.name}.usage.sqlite3"))
        self._usage_open = False
        self._data = StaticData()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    async def open(self) -> None:
        self._load(strict=True)

    async def close(self) -> None:
        if self._usage_open:
            await self.usage.close()
            self._usage_open = False

    async def _counts(self) -> Any:
        """The usage database, opened on first use (the commands never need it)."""
        if not self._usage_open:
            await self.usage.open()
            self._usage_open = True
        return self.usage

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

    # -------------------------------------------------------------- DKIM keys

    async def dkim_keys(self, domain: str) -> list[DkimKey]:
        return sorted(self._fresh().dkim.get(domain, ()), key=lambda k: k.selector)

    async def list_dkim_keys(self, domain: str | None = None) -> list[DkimKey]:
        data = self._fresh()
        return [k for d in sorted(data.dkim) if domain is None or d == domain
                for k in sorted(data.dkim[d], key=lambda k: k.selector)]

    async def add_dkim_key(self, key: DkimKey) -> None:
        import datetime as dt

        def change(doc) -> None:
            table = self._domain_table(doc, key.domain)
            keys = table.setdefault("dkim", tomlkit.table())
            if key.selector in keys:
                raise DirectoryError(f"selector {key.selector} of {key.domain} exists already; "
                                     "a new key needs a new selector (mail signed with the old "
                                     "one may still be in transit)")
            entry = tomlkit.table()
            entry["algorithm"] = key.algorithm
            if key.key_file is not None:
                entry["key_file"] = key.key_file
            else:
                entry["private_key"] = tomlkit.string(key.private_key or "", multiline=True)
            for name in ("not_before", "not_after"):
                value = getattr(key, name)
                if value is not None:
                    entry[name] = dt.datetime.fromtimestamp(value, dt.timezone.utc)
            keys[key.selector] = entry

        await self._run_edit(change)

    async def remove_dkim_key(self, domain: str, selector: str) -> bool:
        def change(doc) -> bool:
            try:
                table = self._domain_table(doc, domain)
            except DirectoryError:
                return False
            keys = table.get("dkim", {})
            if selector not in keys:
                return False
            del keys[selector]
            return True

        return await self._run_edit(change)

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

    async def set_domain_limits(self, name: str, **limits: int | None) -> bool:
        unknown = set(limits) - set(DOMAIN_LIMITS)
        if unknown:
            raise TypeError(f"not domain limits: {sorted(unknown)}")

        def change(doc) -> bool:
            domains = self._domains(doc)
            key = _key_for(domains, name, normalize_domain)
            if key is None:
                return False
            for field, value in limits.items():
                if value is None:
                    domains[key].pop(field, None)
                else:
                    domains[key][field] = value
            return True

        return await self._run_edit(change)

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

    # -------------------------------------------------------------- users

    async def get_user(self, login: str) -> User | None:
        return self._fresh().users.get(login)

    @staticmethod
    def _users(doc) -> Any:
        if "users" not in doc:
            doc["users"] = tomlkit.table(is_super_table=True)
        return doc["users"]

    def _user_table(self, doc, login: str) -> Any:
        users = self._users(doc)
        key = _key_for(users, login, normalize_login)
        return None if key is None else users[key]

    async def add_user(self, user: User) -> None:
        def change(doc) -> None:
            if self._user_table(doc, user.address) is not None:
                raise DirectoryError(f"user {user.address} exists already (change it with "
                                     "`elemta users passwd`, `disable`, `enable`, `set`)")
            table = tomlkit.table()
            for key in USER_FIELDS:
                value = getattr(user, key)
                if value is not None and value is not False:
                    table[key] = value
            if user.send_as:
                table["send_as"] = list(user.send_as)
            self._users(doc)[user.address] = table

        await self._run_edit(change)

    async def update_user(self, login: str, **changes: object) -> bool:
        unknown = set(changes) - set(USER_FIELDS)
        if unknown:
            raise TypeError(f"not user fields: {sorted(unknown)}")

        def change(doc) -> bool:
            table = self._user_table(doc, login)
            if table is None:
                return False
            for key, value in changes.items():
                if value is None or value is False:
                    table.pop(key, None)
                else:
                    table[key] = value
            return True

        return await self._run_edit(change)

    async def remove_user(self, login: str) -> bool:
        def change(doc) -> bool:
            users = self._users(doc)
            key = _key_for(users, login, normalize_login)
            if key is None:
                return False
            del users[key]
            return True

        return await self._run_edit(change)

    async def list_users(self, domain: str | None = None) -> list[User]:
        return sorted((u for u in self._fresh().users.values()
                       if domain is None or u.address.endswith("@" + domain)),
                      key=lambda u: u.address)

    async def grant(self, login: str, pattern: str) -> None:
        def change(doc) -> None:
            table = self._user_table(doc, login)
            if table is None:
                raise DirectoryError(f"no user {login} (add it with `elemta users add {login}`)")
            grants = table.setdefault("send_as", tomlkit.array())
            if pattern not in [normalize_grant(g) for g in grants]:
                grants.append(pattern)

        await self._run_edit(change)

    async def revoke(self, login: str, pattern: str) -> bool:
        def change(doc) -> bool:
            table = self._user_table(doc, login)
            grants = [] if table is None else list(table.get("send_as", []))
            keep = [g for g in grants if normalize_grant(g) != pattern]
            if len(keep) == len(grants):
                return False
            if keep:
                table["send_as"] = keep
            else:
                del table["send_as"]
            return True

        return await self._run_edit(change)

    async def aliases_to(self, address: str) -> list[str]:
        return sorted(a for a, targets in self._fresh().aliases.items() if address in targets)

    async def count_sent(self, login: str, day: str) -> int:
        return await (await self._counts()).count_sent(login, day)

    async def add_sent(self, login: str, day: str) -> int:
        return await (await self._counts()).add_sent(login, day)
