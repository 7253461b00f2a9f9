"""Parse the arguments of MAIL and RCPT (RFC 5321 §4.1.2, RFC 6531).

This runs once per MAIL and once per RCPT, so it sticks to compiled regexes and
``str`` methods: a typical ASCII address takes one regex match on a fast path.
It only parses; which ESMTP parameters are supported is the server's decision
(it answers ``555 5.5.4`` for the ones it does not know).

Every rejection is a :class:`PathError`. The rule for the code: ``501`` when the
command line cannot be split into ``<path>`` and parameters, ``553`` when the
path was found but the mailbox in it is unacceptable.

=====================================================  =====  =======================
Condition                                              Code   Enhanced code
=====================================================  =====  =======================
no argument, no ``FROM:``/``TO:``, more than one       501    5.5.4
space after the colon, no ``<``, no closing ``>``,
text glued to the ``>`` without a space
parameter that is not ``KEYWORD[=VALUE]`` (empty       501    5.5.4
value, control character, bad keyword) or repeated
non-ASCII address or parameter value without SMTPUTF8  553    5.6.7
any problem with the mailbox itself: bad local part    553    5.1.7 in MAIL,
or domain (spaces, control characters, ``<``, dots),          5.1.3 in RCPT
no domain, local part > 64 octets, domain > 255
octets, label > 63 characters, address > 254 octets,
bad or general address literal, bad source route,
null path ``<>`` in RCPT
=====================================================  =====  =======================

Lengths are counted in UTF-8 octets, except domain labels: without IDNA
conversion the DNS length of a U-label is unknown, so labels are counted in
characters. 254 octets for the address is the 256-octet path limit of RFC 5321
§4.5.3.1.3 minus the angle brackets.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Container
from typing import Any

from .replies import Reply, path_error

__all__ = [
    "MAX_ADDRESS_OCTETS",
    "MAX_DOMAIN_OCTETS",
    "MAX_LABEL_CHARS",
    "MAX_LOCAL_PART_OCTETS",
    "PathError",
    "is_postmaster",
    "parse_mail_from",
    "parse_rcpt_to",
    "split_address",
]

MAX_LOCAL_PART_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_LABEL_CHARS = 63
MAX_ADDRESS_OCTETS = 254

Params = dict[str, str | None]


class PathError(Exception):
    """A MAIL or RCPT argument the server must refuse, with the reply to send."""

    __slots__ = ("code", "enhanced", "text")

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def reply(self) -> Reply:
        return path_error(self.code, self.enhanced, self.text)

    def __str__(self) -> str:
        return str(self.reply())


# RFC 6531 UTF8-non-ascii, minus C1 controls, lone surrogates (aiosmtpd decodes
# with surrogateescape, so invalid UTF-8 arrives as U+DC80..U+DCFF) and Unicode
# spaces, which would make addresses that look identical but are not.
_NON_ASCII = (
    "\u00a1-\u167f\u1681-\u1fff\u200b-\u2027\u202a-\u202e\u2030-\u205e"
    "\u2060-\u2fff\u3001-\ud7ff\ue000-\U0010ffff"
)
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"  # escaped: more characters are appended
_QTEXT = r" !#-\[\]-~"  # qtextSMTP: 32-33, 35-91, 93-126
_LDH_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_U_LABEL = rf"[A-Za-z0-9{_NON_ASCII}](?:[A-Za-z0-9{_NON_ASCII}-]*[A-Za-z0-9{_NON_ASCII}])?"


class _Lazy:
    """A regular expression compiled on first use. The Unicode classes of the SMTPUTF8
    patterns take tens of milliseconds to compile, which every start-up would pay
    although most servers never see a non-ASCII address."""

    __slots__ = ("_pattern", "_compiled")

    def __init__(self, pattern: str) -> None:
        self._pattern = pattern
        self._compiled: re.Pattern[str] | None = None

    def __getattr__(self, name: str) -> Any:
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = re.compile(self._pattern)
        return getattr(compiled, name)


def _dot_string(atext: str) -> str:
    return rf"[{atext}]+(?:\.[{atext}]+)*"


def _quoted_string(qtext: str) -> str:
    return rf'"(?:[{qtext}]|\\[ -~])*"'


# Labels are capped at 63 here so that one match settles the common case; a
# longer label falls through to the slow path, which names the limit.
_FAST_ASCII = re.compile(
    _dot_string(_ATEXT)
    + r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    + r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_DOT_STRING = re.compile(_dot_string(_ATEXT))
_DOT_STRING_UTF8: Any = _Lazy(_dot_string(_ATEXT + _NON_ASCII))
_QUOTED_STRING = re.compile(_quoted_string(_QTEXT))
_QUOTED_STRING_UTF8: Any = _Lazy(_quoted_string(_QTEXT + _NON_ASCII))
_DOMAIN = re.compile(rf"{_LDH_LABEL}(?:\.{_LDH_LABEL})*")
_DOMAIN_UTF8: Any = _Lazy(rf"{_U_LABEL}(?:\.{_U_LABEL})*")
# Source routes name domains only, never address literals (RFC 5321 At-domain).
_ROUTE: Any = _Lazy(rf"@{_U_LABEL}(?:\.{_U_LABEL})*(?:,@{_U_LABEL}(?:\.{_U_LABEL})*)*")
# RFC 5321 General-address-literal: Standardized-tag ":" 1*dcontent.
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[!-Z^-~]+")
_IPV4_LITERAL = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")

_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~]+))?")
_PARAM_UTF8: Any = _Lazy(rf"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~{_NON_ASCII}]+))?")

_MAIL_SYNTAX = "Syntax: MAIL FROM:<address>"
_RCPT_SYNTAX = "Syntax: RCPT TO:<address>"


def parse_mail_from(arg: str | None, *, smtputf8_allowed: bool) -> tuple[str, Params, bool]:
    """Parse what follows ``MAIL``: ``FROM:<address> [KEYWORD[=VALUE] ...]``.

    Returns ``(address, params, utf8)``: the address without brackets and
    without any source route (``""`` for the null reverse-path ``<>``), the
    parameters keyed by upper-cased keyword (``None`` for a keyword without a
    value), and whether the address contains non-ASCII characters.

    ``smtputf8_allowed`` says that the server advertises SMTPUTF8. A non-ASCII
    address or parameter value also needs ``SMTPUTF8`` among the parameters of
    this same command (RFC 6531 §3.4), so a caller cannot let one through by
    mistake.

    :raises PathError: with the reply to send.
    """
    path, params = _split_argument(arg, "FROM:", _MAIL_SYNTAX, smtputf8_allowed)
    if smtputf8_allowed and "SMTPUTF8" not in params:
        _reject_non_ascii_values(params)
        smtputf8_allowed = False
    if not path:
        return "", params, False
    address, utf8 = _check_path(path, "5.1.7", "sender", smtputf8_allowed, postmaster_ok=False)
    return address, params, utf8


def parse_rcpt_to(arg: str | None, *, smtputf8_allowed: bool) -> tuple[str, Params, bool]:
    """Parse what follows ``RCPT``: ``TO:<address> [KEYWORD[=VALUE] ...]``.

    Returns ``(address, params, utf8)`` like :func:`parse_mail_from`. The null
    path ``<>`` is refused; ``<Postmaster>`` without a domain is accepted (RFC
    5321 §4.1.1.3) and returned as ``"Postmaster"`` whatever its case, so that
    routing can compare it directly.

    ``smtputf8_allowed`` says that SMTPUTF8 was requested on this transaction's
    MAIL and is advertised.

    :raises PathError: with the reply to send.
    """
    path, params = _split_argument(arg, "TO:", _RCPT_SYNTAX, smtputf8_allowed)
    if not path:
        raise PathError(553, "5.1.3", "bad recipient address: null path not allowed")
    address, utf8 = _check_path(path, "5.1.3", "recipient", smtputf8_allowed, postmaster_ok=True)
    return address, params, utf8


def split_address(address: str) -> tuple[str, str]:
    """Split a parsed address into ``(local_part, domain)``.

    The local part is returned as written, quotes included. An address without
    a domain (``"Postmaster"``, or ``""`` for the null path) gives an empty
    domain. Neither a domain nor an address literal contains ``@``, so the last
    one separates them even when a quoted local part holds another.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def is_postmaster(address: str, domains: Container[str] = ()) -> bool:
    """Tell whether ``address`` is a postmaster mailbox we must accept.

    ``Postmaster`` without a domain always is (RFC 5321 §4.1.1.3). With a
    domain, the local part ``postmaster`` (any case, quoted or not) counts only
    when the lower-cased domain is in ``domains``: a bare ``is_postmaster()``
    check that took ``postmaster@<anywhere>`` would let anyone relay to it.
    """
    local, domain = split_address(address)
    if domain and domain.lower() not in domains:
        return False
    if local.startswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local.lower() == "postmaster"


def _split_argument(
    arg: str | None, keyword: str, usage: str, utf8_allowed: bool
) -> tuple[str, Params]:
    """Cut ``FROM:<path> params`` into the text between the brackets and the params."""
    if arg is None:
        raise PathError(501, "5.5.4", usage)
    n = len(keyword)
    if arg[:n].upper() != keyword:
        raise PathError(501, "5.5.4", usage)
    # Many clients send "FROM: <a@b>"; one space is tolerated, as by Postfix.
    start = n + 1 if arg[n : n + 1] == " " else n
    if arg[start : start + 1] != "<":
        raise PathError(501, "5.5.4", usage)
    end = arg.find(">", start)
    quote = arg.find('"', start)
    if quote != -1 and (end == -1 or quote < end):
        # A quoted local part may hold ">"; a stray quote that never closes is
        # a bad mailbox, left for the mailbox check to name.
        end = _closing_bracket(arg, quote, end)
    if end == -1:
        raise PathError(501, "5.5.4", usage)
    path = arg[start + 1 : end]
    rest = arg[end + 1 :]
    if not rest:
        return path, {}
    if rest[0] != " ":
        raise PathError(501, "5.5.4", usage)
    return path, _parse_params(rest, utf8_allowed)


def _closing_bracket(arg: str, quote: int, first_bracket: int) -> int:
    """Find the ``>`` that closes the path when a quoted local part may hold one."""
    i = quote + 1
    n = len(arg)
    while i < n:
        c = arg[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return arg.find(">", i + 1)
        i += 1
    return first_bracket


def _parse_params(text: str, utf8_allowed: bool) -> Params:
    pattern = _PARAM_UTF8 if utf8_allowed else _PARAM
    params: Params = {}
    # Runs of spaces are harmless and some clients send them.
    for token in text.split(" "):
        if not token:
            continue
        m = pattern.fullmatch(token)
        if m is None:
            if not utf8_allowed and not token.isascii() and _PARAM_UTF8.fullmatch(token):
                raise PathError(553, "5.6.7", "non-ASCII parameter requires SMTPUTF8")
            raise PathError(501, "5.5.4", "bad parameter syntax")
        key = m.group(1).upper()
        if key in params:
            raise PathError(501, "5.5.4", f"duplicate parameter {key}")
        params[key] = m.group(2)
    return params


def _reject_non_ascii_values(params: Params) -> None:
    for value in params.values():
        if value is not None and not value.isascii():
            raise PathError(553, "5.6.7", "non-ASCII parameter requires SMTPUTF8")


def _check_path(
    path: str, enhanced: str, role: str, utf8_allowed: bool, *, postmaster_ok: bool
) -> tuple[str, bool]:
    """Validate the text between the brackets; return the mailbox and whether it is UTF-8."""
    if path[0] == "@":
        # RFC 5321 §4.1.1.3 and Appendix C: a source route MUST be accepted and
        # SHOULD be ignored.
        colon = path.find(":")
        if colon == -1 or _ROUTE.fullmatch(path, 0, colon) is None:
            raise PathError(553, enhanced, f"bad {role} address: invalid source route")
        path = path[colon + 1 :]
        if not path:
            raise PathError(553, enhanced, f"bad {role} address: missing mailbox")
        postmaster_ok = False

    if path.isascii():
        utf8 = False
        if _FAST_ASCII.fullmatch(path) is not None and len(path) <= MAX_ADDRESS_OCTETS:
            if path.find("@") <= MAX_LOCAL_PART_OCTETS:
                return path, False
    elif not utf8_allowed:
        raise PathError(553, "5.6.7", "non-ASCII address requires SMTPUTF8")
    else:
        utf8 = True

    def bad(reason: str) -> PathError:
        return PathError(553, enhanced, f"bad {role} address: {reason}")

    if path[0] == '"':
        m = (_QUOTED_STRING_UTF8 if utf8 else _QUOTED_STRING).match(path)
        if m is None:
            raise bad("invalid local part")
        at = m.end()
        if at == len(path):
            raise bad("no domain")
        if path[at] != "@":
            raise bad("invalid local part")
    else:
        at = path.rfind("@")
        if at == -1:
            if postmaster_ok and not utf8 and path.lower() == "postmaster":
                return "Postmaster", False
            raise bad("no domain")
        if (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).fullmatch(path, 0, at) is None:
            raise bad("invalid local part")
    if _octets(path[:at], utf8) > MAX_LOCAL_PART_OCTETS:
        raise bad(f"local part exceeds {MAX_LOCAL_PART_OCTETS} octets")

    domain = path[at + 1 :]
    if domain.startswith("["):
        _check_address_literal(domain, bad)
    else:
        if (_DOMAIN_UTF8 if utf8 else _DOMAIN).fullmatch(domain) is None:
            raise bad("invalid domain")
        if max(map(len, domain.split("."))) > MAX_LABEL_CHARS:
            raise bad(f"domain label exceeds {MAX_LABEL_CHARS} characters")
        if _octets(domain, utf8) > MAX_DOMAIN_OCTETS:
            raise bad(f"domain exceeds {MAX_DOMAIN_OCTETS} octets")
    if _octets(path, utf8) > MAX_ADDRESS_OCTETS:
        raise bad(f"address exceeds {MAX_ADDRESS_OCTETS} octets")
    return path, utf8


def _check_address_literal(domain: str, bad: Callable[[str], PathError]) -> None:
    if not domain.endswith("]"):
        raise bad("invalid address literal")
    content = domain[1:-1]
    if _IPV4_LITERAL.fullmatch(content):
        try:
            ipaddress.IPv4Address(content)
        except ValueError:
            raise bad("invalid address literal") from None
        return
    if content[:5].lower() == "ipv6:":
        ip6 = content[5:]
        # The character check keeps out what ipaddress would also take, such
        # as "%zone" scope suffixes.
        if _IPV6_CHARS.fullmatch(ip6) is None:
            raise bad("invalid address literal")
        try:
            ipaddress.IPv6Address(ip6)
        except ValueError:
            raise bad("invalid address literal") from None
        return
    if _GENERAL_LITERAL.fullmatch(content):
        raise bad("unsupported address literal")
    raise bad("invalid address literal")


def _octets(text: str, utf8: bool) -> int:
    return len(text.encode()) if utf8 else len(text)
