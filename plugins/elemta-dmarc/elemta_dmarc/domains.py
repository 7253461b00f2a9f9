"""Domain names for DMARC: normalization, the Organizational Domain, the Author Domain.

Pure functions, no I/O except reading a Public Suffix List file when asked to.

- :func:`normalize_domain`: the form every comparison uses: lower-case A-labels
  (IDNA 2008, UTS #46), no final dot.
- :class:`OrganizationalDomains`: RFC 7489 §3.2 on the Public Suffix List that
  the ``publicsuffixlist`` package bundles (or a file the operator keeps fresher).
- :func:`author_domains`: RFC 7489 §6.6.1, the domain(s) of the ``From:`` header.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path

import idna
from publicsuffixlist import PSLFILE, PublicSuffixList

__all__ = ["AuthorDomains", "OrganizationalDomains", "PSLError", "author_domains",
           "normalize_domain"]

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_MAX_NAME = 253


@functools.lru_cache(maxsize=4096)   # the same few domains, message after message
def normalize_domain(value: str) -> str | None:
    """``value`` as lower-case A-labels without the final dot, or ``None`` when it is
    not a domain name (empty, a ``[domain literal]``, an IP address, bad labels).

    ``"Example.COM."`` → ``"example.com"``; ``"Bücher.example"`` → ``"xn--bcher-kva.example"``.
    """
    name = value.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name or name.startswith("[") or name.startswith("."):
        return None
    if name.isascii():
        name = name.lower()
    else:
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    if len(name) > _MAX_NAME:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():
        return None  # an IPv4 address, not a domain
    return name


class PSLError(Exception):
    """The Public Suffix List file cannot be used."""


class OrganizationalDomains:
    """The Organizational Domain of RFC 7489 §3.2, from the Public Suffix List.

    The Organizational Domain is the longest public suffix that matches the
    domain plus one more label (``mail.example.co.uk`` → ``example.co.uk``). A
    TLD the list does not know (``.test``) counts as a public suffix of one label,
    as the list's default rule ``*`` says, so ``mail.example.test`` →
    ``example.test``. A domain that *is* a public suffix (``co.uk``) has no
    Organizational Domain in RFC 7489's sense; it is its own, so that it aligns
    only with itself.

    :param private: honour the list's PRIVATE section (the package's default):
        ``alice.github.io`` and ``bob.github.io`` are then different
        organizations, as their owners are. With ``False`` only ICANN suffixes
        count, and both would have the Organizational Domain ``github.io``.
    :param path: a Public Suffix List file to read instead of the bundled one.
    """

    def __init__(self, *, private: bool = True, path: Path | None = None) -> None:
        source = path if path is not None else Path(PSLFILE)
        try:
            data = source.read_bytes()
        except OSError as e:
            raise PSLError(f"cannot read the Public Suffix List {source}: {e.strerror or e}; "
                           "set public_suffix_list to a readable copy of "
                           "https://publicsuffix.org/list/public_suffix_list.dat, or remove "
                           "it to use the list bundled with publicsuffixlist") from None
        if not private and b"===BEGIN ICANN DOMAINS===" not in data:
            raise PSLError(f"{source} has no '// ===BEGIN ICANN DOMAINS===' marker, so its "
                           "ICANN section cannot be told from the private one; use the "
                           "published list, or set psl_private_domains = true")
        self._psl = PublicSuffixList(data, only_icann=not private)
        # a file that is not the list parses as a list of junk suffixes: check
        # a few entries every copy of the list has had for twenty years
        if self._psl.publicsuffix("example.co.uk") != "co.uk" \
                or self._psl.publicsuffix("example.com") != "com":
            raise PSLError(f"{source} does not look like the Public Suffix List (it has no "
                           "entry for com or co.uk)")
        self.private = private
        self.version = _version(data)
        self.path = source
        self._of = functools.lru_cache(maxsize=4096)(self._organizational)

    def of(self, domain: str) -> str:
        """The Organizational Domain of a normalized ``domain`` (itself for a public suffix)."""
        return self._of(domain)

    def _organizational(self, domain: str) -> str:
        return self._psl.privatesuffix(domain) or domain

    def is_public_suffix(self, domain: str) -> bool:
        return self._psl.privatesuffix(domain) is None


def _version(data: bytes) -> str:
    for line in data[:2000].splitlines():
        if line.startswith(b"// VERSION:"):
            return line.split(b":", 1)[1].strip().decode("ascii", "replace")
    return "unknown"


@dataclass(frozen=True, slots=True)
class AuthorDomains:
    """What the ``From:`` header says about the author (RFC 7489 §6.6.1).

    ``domains`` are the distinct normalized domains of its addresses, in order.
    ``problem`` is ``None`` when there is exactly one Author Domain; otherwise it
    says what is wrong: no ``From:`` field, several fields, an address that is
    not one, or addresses in several domains.
    """

    domains: tuple[str, ...]
    problem: str | None = None

    @property
    def single(self) -> str | None:
        return self.domains[0] if self.problem is None else None


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ADDRESS = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# the usual From: fields, "Name <local@domain>" and "local@domain", with a display name
# of atoms only: no quotes, comments, groups, encoded commas or second mailbox
_SIMPLE_FROM = re.compile(
    rf"[ \t]*(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~ \t-]*<({_ADDRESS})>|({_ADDRESS}))[ \t]*")


def author_domains(from_fields: Sequence[str]) -> AuthorDomains:
    """The Author Domain(s) of a message whose ``From:`` fields are ``from_fields``.

    RFC 5322 §3.6 allows exactly one ``From:`` field; it may hold several
    mailboxes. Several mailboxes of *one* domain have one Author Domain, and
    are fine for DMARC. Everything else (no field, several fields, an address
    without a usable domain, mailboxes of several domains) comes back with a
    ``problem``, and with the domains that could be read, for the RFC 7489
    §6.6.1 "strictest policy" evaluation.
    """
    if not from_fields:
        return AuthorDomains((), "the message has no From: header field")
    simple = _SIMPLE_FROM.fullmatch(from_fields[0]) if len(from_fields) == 1 else None
    if simple is not None:   # what getaddresses answers for it, without its parser
        mailboxes = [("", simple.group(1) or simple.group(2))]
    else:
        mailboxes = getaddresses(list(from_fields))
    domains: list[str] = []
    bad: list[str] = []
    for _, address in mailboxes:
        local, at, host = address.rpartition("@")
        domain = normalize_domain(host) if at and local else None
        if domain is None:
            bad.append(address)
        elif domain not in domains:
            domains.append(domain)
    if len(from_fields) > 1:
        return AuthorDomains(tuple(domains),
                             f"the message has {len(from_fields)} From: header fields")
    if not mailboxes or (bad and not domains):
        return AuthorDomains(tuple(domains), "the From: header field has no address with a "
                             "domain name")
    if bad:
        return AuthorDomains(tuple(domains), "the From: header field holds something that is "
                             f"not an address with a domain name ({_shown(bad)})")
    if len(domains) > 1:
        return AuthorDomains(tuple(domains), "the From: header field has addresses in "
                             f"{len(domains)} domains ({', '.join(domains)})")
    return AuthorDomains(tuple(domains))


def _shown(values: Iterable[str]) -> str:
    shown = ", ".join(ascii(v[:64]) for v in list(values)[:3])
    return shown or "''"
