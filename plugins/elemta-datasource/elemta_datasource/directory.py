"""The directory's data and how a recipient address is resolved against it.

Backends (``sql.py``, ``static.py``) store domains, mailboxes, aliases and
rules and answer one :meth:`Backend.lookup` per address; this module decides
what that means for the ``rcpt`` stage (:func:`resolve`), independently of
where the data lives.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

Action = Literal["forward", "redirect", "reject", "quarantine"]
ACTIONS: tuple[str, ...] = ("forward", "redirect", "reject", "quarantine")

_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class DirectoryError(Exception):
    """A directory edit that cannot be made; ``str()`` says why and how to fix it."""


class BackendUnavailable(Exception):
    """The backend cannot answer now (database down, file unreadable): a temporary failure."""


@dataclass(frozen=True, slots=True)
class Domain:
    """A hosted domain. ``messages_per_hour``/``messages_per_day`` are the limits of mail
    sent from it, for a rate limiter (the ``rate_limits`` hook): ``None`` leaves the
    limiter's configuration in force, ``0`` lifts its limit."""

    name: str
    reject_unknown: bool = True
    catch_all: str | None = None
    max_message_bytes: int | None = None
    messages_per_hour: int | None = None
    messages_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A routing rule for a domain (``pattern`` = ``example.org``) or one address.

    ``forward``: deliver as usual and send a copy to ``targets``; ``redirect``:
    deliver to ``targets`` instead; ``reject``: refuse at RCPT with ``code``,
    ``enhanced`` and ``text``; ``quarantine``: accept and hold the message in
    the spool (``elemta queue release`` lets it go). A target ``@other.example``
    keeps the local part and changes the domain.
    """

    pattern: str
    action: Action
    targets: tuple[str, ...] = ()
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class User:
    """Someone who logs in: their hashes (``password`` ``None`` when another source
    checks it) and what they may do.

    ``send_as`` grants addresses beyond their own and their aliases: an
    address (``sales@example.org``), a whole domain (``@example.org``) or
    ``*`` (any sender: for a trusted application).
    """

    address: str
    password: str | None = field(default=None, repr=False)
    scram: str | None = field(default=None, repr=False)
    disabled: bool = False
    max_message_bytes: int | None = None
    daily_quota: int | None = None             # messages per day; 0: no limit
    send_as: tuple[str, ...] = ()
    messages_per_hour: int | None = None       # for a rate limiter; 0: no limit


USER_FIELDS = ("password", "scram", "disabled", "max_message_bytes", "daily_quota",
               "messages_per_hour")
DOMAIN_LIMITS = ("messages_per_hour", "messages_per_day")


@dataclass(frozen=True, slots=True)
class Lookup:
    """Everything the directory holds about one address, in one backend call."""

    domain: Domain | None
    mailbox: bool = False                                  # the base address is a mailbox
    aliases: tuple[str, ...] = ()                          # targets of the address (or its base)
    rules: tuple[Rule, ...] = ()                           # address, base address, then domain


class Backend(Protocol):
    """What a storage backend provides. Every method may raise :class:`BackendUnavailable`."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def lookup(self, address: str, base: str, domain: str) -> Lookup: ...
    async def get_domain(self, name: str) -> Domain | None: ...

    async def add_domain(self, domain: Domain, *, replace: bool = False) -> None: ...
    async def remove_domain(self, name: str) -> bool: ...
    async def list_domains(self) -> list[Domain]: ...
    async def set_domain_limits(self, name: str, **limits: int | None) -> bool: ...
    async def add_mailbox(self, address: str) -> None: ...
    async def remove_mailbox(self, address: str) -> bool: ...
    async def list_mailboxes(self, domain: str | None = None) -> list[str]: ...
    async def add_alias(self, address: str, targets: list[str]) -> None: ...
    async def remove_alias(self, address: str, target: str | None = None) -> int: ...
    async def list_aliases(self, domain: str | None = None) -> list[tuple[str, str]]: ...
    async def set_rule(self, rule: Rule) -> None: ...
    async def remove_rule(self, pattern: str) -> bool: ...
    async def list_rules(self) -> list[Rule]: ...

    # users: who logs in, and what they may send
    async def get_user(self, login: str) -> User | None: ...
    async def add_user(self, user: User) -> None: ...
    async def update_user(self, login: str, **changes: object) -> bool: ...
    async def remove_user(self, login: str) -> bool: ...
    async def list_users(self, domain: str | None = None) -> list[User]: ...
    async def grant(self, login: str, pattern: str) -> None: ...
    async def revoke(self, login: str, pattern: str) -> bool: ...
    async def aliases_to(self, address: str) -> list[str]: ...
    async def count_sent(self, login: str, day: str) -> int: ...
    async def add_sent(self, login: str, day: str) -> int: ...


# ---------------------------------------------------------------- normalizing


def normalize_domain(name: str) -> str:
    d = name.strip().lower().rstrip(".")
    try:
        d = d.encode("idna").decode("ascii") if not d.isascii() else d
    except UnicodeError:
        raise DirectoryError(f"{name!r} is not a valid domain name") from None
    if not _DOMAIN.match(d):
        raise DirectoryError(f"{name!r} is not a valid domain name (such as example.org)")
    return d


def normalize_address(address: str) -> str:
    """``Local@Example.ORG`` → ``local@example.org`` (local parts compare case-insensitively here)."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or not local:
        raise DirectoryError(f"{address!r} is not a mail address (such as alice@example.org)")
    if not _LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise DirectoryError(f"{address!r}: the local part {local!r} is not valid "
                             "(letters, digits and !#$%&'*+/=?^_`{|}~.- only, at most 64)")
    return f"{local.lower()}@{normalize_domain(domain)}"


_LOGIN = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")


def normalize_login(login: str) -> str:
    """A login: an address (``Alice@Example.org`` → ``alice@example.org``), or a plain
    user name (letters, digits and ``._+-``, as Dovecot's are)."""
    if "@" in login:
        return normalize_address(login)
    name = login.strip().lower()
    if not _LOGIN.match(name):
        raise DirectoryError(f"{login!r} is not a login (an address such as "
                             "alice@example.org, or a user name of letters, digits and ._+-)")
    return name


def normalize_grant(pattern: str) -> str:
    """A ``send_as`` entry: an address, ``@domain``, or ``*`` (any sender)."""
    p = pattern.strip()
    if p == "*":
        return p
    return normalize_target(p)


def normalize_target(target: str) -> str:
    """An alias or rule target: an address, or ``@domain`` (same local part, other domain)."""
    if target.strip().startswith("@"):
        return "@" + normalize_domain(target.strip()[1:])
    return normalize_address(target)


def normalize_pattern(pattern: str) -> str:
    """A rule's pattern: a domain or an address."""
    return normalize_address(pattern) if "@" in pattern else normalize_domain(pattern)


def check_rule(rule: Rule) -> Rule:
    """Validate and normalize a rule; raises :class:`DirectoryError`."""
    if rule.action not in ACTIONS:
        raise DirectoryError(f"unknown rule action {rule.action!r} (one of {', '.join(ACTIONS)})")
    targets = tuple(normalize_target(t) for t in rule.targets)
    if rule.action in ("forward", "redirect") and not targets:
        raise DirectoryError(f"a {rule.action} rule needs at least one target address")
    if rule.action not in ("forward", "redirect") and targets:
        raise DirectoryError(f"a {rule.action} rule takes no targets")
    code, enhanced, text = rule.code, rule.enhanced, rule.text
    if rule.action == "reject":
        code = code or 550
        enhanced = enhanced or f"{str(code)[0]}.7.1"
        text = text or "Recipient address rejected"
        if not (400 <= code <= 599):
            raise DirectoryError(f"a reject rule's code must be 4xx or 5xx, not {code}")
        parts = enhanced.split(".")
        if len(parts) != 3 or parts[0] != str(code)[0] or not all(p.isdigit() for p in parts):
            raise DirectoryError(f"enhanced status {enhanced!r} must look like "
                                 f"{str(code)[0]}.x.y to match code {code}")
        if "\r" in text or "\n" in text:
            raise DirectoryError("reply text must be one line")
    elif rule.action == "quarantine":
        text = text or "quarantined by a routing rule"
    return Rule(normalize_pattern(rule.pattern), rule.action, targets, code, enhanced, text)


def split_detail(address: str, delimiter: str) -> tuple[str, str | None]:
    """``alice+lists@example.org`` → (``alice@example.org``, ``lists``)."""
    local, _, domain = address.rpartition("@")
    if delimiter and delimiter in local:
        user, _, detail = local.partition(delimiter)
        if user:
            return f"{user}@{domain}", detail
    return address, None


# ---------------------------------------------------------------- resolution


@dataclass(slots=True)
class Resolution:
    """What the ``rcpt`` stage does with one recipient."""

    kind: Literal["foreign", "accept", "reject"]
    deliver_to: tuple[str, ...] | None = None   # rewritten recipients, or None: as given
    quarantine: str | None = None               # hold the message with this reason
    code: int = 250
    enhanced: str = "2.1.5"
    text: str = ""
    max_message_bytes: int | None = None
    trace: list[str] = field(default_factory=list)


async def resolve(backend_lookup, address: str, delimiter: str, max_depth: int) -> Resolution:
    """Resolve a RCPT address against the directory.

    ``backend_lookup(address, base, domain)`` returns a :class:`Lookup`
    (cached by the caller). The order, as in Postfix's virtual maps: rules
    (address, base address, domain), then the mailbox, then aliases, then the
    domain's catch-all, then ``reject_unknown``. Alias and catch-all targets
    are resolved again (to ``max_depth``), so an alias naming another alias or
    a redirected address ends at real mailboxes; a loop is cut and logged.
    """
    try:
        original = normalize_address(address)
    except DirectoryError:
        return Resolution("foreign")
    domain = original.rpartition("@")[2]
    first = await _lookup(backend_lookup, original, delimiter)
    if first.domain is None:
        return Resolution("foreign")
    out = Resolution("accept", max_message_bytes=first.domain.max_message_bytes)
    final: list[str] = []
    unknown: list[str] = []
    await _expand(backend_lookup, address, original, first, delimiter, max_depth, 0,
                  set(), final, unknown, out)
    if out.kind == "reject":
        return out
    if not final:
        out.kind = "reject"
        out.code, out.enhanced = 550, "5.1.1"
        out.text = f"<{address}>: Recipient address rejected: User unknown in {domain}"
        return out
    if final == [address]:
        out.deliver_to = None
    else:
        out.deliver_to = tuple(dict.fromkeys(final))
    return out


async def _lookup(backend_lookup, address: str, delimiter: str) -> Lookup:
    base, _ = split_detail(address, delimiter)
    return await backend_lookup(address, base, address.rpartition("@")[2])


async def _expand(backend_lookup, given: str, address: str, look: Lookup, delimiter: str,
                  max_depth: int, depth: int, seen: set[str], final: list[str],
                  unknown: list[str], out: Resolution) -> None:
    """Add the final recipients of ``address`` to ``final``; may set ``out`` to a reject."""
    if address in seen:
        out.trace.append(f"alias loop at {address}")
        return
    seen.add(address)
    if look.domain is None:
        final.append(given)           # not ours: delivered by the runner as it is
        return
    if depth > max_depth:
        out.trace.append(f"alias chain deeper than {max_depth} at {address}")
        return
    if look.domain.max_message_bytes is not None and (
            out.max_message_bytes is None or look.domain.max_message_bytes < out.max_message_bytes):
        out.max_message_bytes = look.domain.max_message_bytes
    keep_self = True
    extra: list[str] = []
    for rule in look.rules:   # the most specific rule decides
        if rule.action == "reject":
            if depth == 0:
                out.kind, out.code = "reject", rule.code or 550
                out.enhanced, out.text = rule.enhanced or "5.7.1", rule.text or "Rejected"
            else:
                out.trace.append(f"{address} is rejected by a rule; dropped from the expansion")
            return
        if rule.action == "quarantine":
            out.quarantine = rule.text or "quarantined by a routing rule"
        elif rule.action in ("redirect", "forward"):
            extra = [_apply_target(t, address) for t in rule.targets]
            keep_self = rule.action == "forward"
        break
    if keep_self:
        await _expand_self(backend_lookup, given, address, look, delimiter, max_depth, depth,
                           seen, final, unknown, out)
    for target in extra:
        await _expand(backend_lookup, target, target,
                      await _lookup(backend_lookup, target, delimiter), delimiter, max_depth,
                      depth + 1, seen, final, unknown, out)


async def _expand_self(backend_lookup, given: str, address: str, look: Lookup, delimiter: str,
                       max_depth: int, depth: int, seen: set[str], final: list[str],
                       unknown: list[str], out: Resolution) -> None:
    """The address itself: its mailbox, else its alias targets, else the catch-all."""
    assert look.domain is not None
    if look.mailbox:
        final.append(given if depth == 0 else address)
        return
    targets = list(look.aliases)
    if not targets and look.domain.catch_all:
        targets = [_apply_target(look.domain.catch_all, address)]
    if targets:
        for target in targets:
            await _expand(backend_lookup, target, target,
                          await _lookup(backend_lookup, target, delimiter), delimiter,
                          max_depth, depth + 1, seen, final, unknown, out)
        return
    if not look.domain.reject_unknown:
        final.append(given if depth == 0 else address)
        return
    unknown.append(address)
    if depth > 0:
        out.trace.append(f"{address} (from an alias) is no mailbox; dropped from the expansion")


def _apply_target(target: str, address: str) -> str:
    if target.startswith("@"):
        return address.rpartition("@")[0] + target
    return target


class TTLCache:
    """A small time-to-live cache for lookups (positive and negative alike)."""

    def __init__(self, seconds: float, max_entries: int = 50_000) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._data: dict[object, tuple[float, object]] = {}

    def get(self, key: object) -> object | None:
        hit = self._data.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None   # an expired entry stays for get_stale() until evicted
        return hit[1]

    def get_stale(self, key: object) -> object | None:
        """The last answer for ``key``, however old (for when the backend is down)."""
        hit = self._data.get(key)
        return None if hit is None else hit[1]

    def put(self, key: object, value: object) -> None:
        if self.seconds <= 0:
            return
        if len(self._data) >= self.max_entries:
            now = time.monotonic()
            self._data = {k: v for k, v in self._data.items() if v[0] >= now}
            if len(self._data) >= self.max_entries:
                self._data.clear()
        self._data[key] = (time.monotonic() + self.seconds, value)

    def clear(self) -> None:
        self._data.clear()
