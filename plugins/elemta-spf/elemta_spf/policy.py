"""What an SPF result means for a transaction: exemptions, refusals, and the record of it.

Plain functions over plain values, tested without a server. The plugin
(:mod:`elemta_spf`) calls them from its hooks.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from elemta import AuthResult, Reject, TempFail

from .checker import SpfResult
from .settings import SpfSettings

__all__ = ["REPLIES", "Outcome", "auth_result", "clean", "client_exemption", "decide",
           "in_networks", "parse_networks", "received_spf", "recipient_is_exempt"]

# the reply of each (result, action): code, enhanced status code (RFC 7372, RFC 3463)
REPLIES: dict[tuple[str, str], tuple[int, str]] = {
    ("fail", "reject"): (550, "5.7.23"),       # SPF validation failed
    ("fail", "tempfail"): (451, "4.7.23"),
    ("softfail", "reject"): (550, "5.7.1"),    # not a "fail": delivery not authorized
    ("softfail", "tempfail"): (451, "4.7.1"),
    ("temperror", "tempfail"): (451, "4.4.3"),  # directory server (DNS) failure
    ("permerror", "reject"): (550, "5.7.24"),  # SPF validation error
    ("permerror", "tempfail"): (451, "4.7.24"),
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# reply text: what a client may be shown of text that came from DNS or the client
_REPLY_TEXT_CHARS = 200


@dataclass(frozen=True, slots=True)
class Outcome:
    """The SPF record of one transaction.

    ``helo`` is the HELO identity's result (always evaluated); ``mailfrom``
    the MAIL FROM identity's, or ``None`` for the null sender, whose
    MAIL FROM identity is the HELO identity (RFC 7208 §2.4). ``refusal`` is
    what ``rcpt`` answers for a recipient that is not exempt.
    """

    helo: SpfResult
    mailfrom: SpfResult | None
    refusal: Reject | TempFail | None = None

    @property
    def governing(self) -> SpfResult:
        """The result that stands for the message: MAIL FROM's, or HELO's for ``<>``."""
        return self.mailfrom if self.mailfrom is not None else self.helo


# ------------------------------------------------------------ exemptions


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """``exempt_networks`` or ``[server] relay_networks`` as networks (already validated)."""
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    """Whether ``ip`` (IPv4-mapped IPv6 counts as IPv4) is in one of ``networks``."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def client_exemption(*, peer_ip: str, auth_user: str | None, relay_allowed: bool,
                     settings: SpfSettings,
                     exempt_networks: Iterable[Network], relay_networks: Iterable[Network]
                     ) -> str | None:
    """Why this session is not SPF-checked at all, or ``None`` when it is.

    Authenticated sessions never are: SPF tells whether a host may send for a
    domain, and a submission client is not a host of the domain. Clients that
    may relay (``session.relay_allowed``, ``[server] relay_networks``) are
    our own and are not checked while ``exempt_relay_clients`` is on; nor
    are clients in ``exempt_networks`` (a backup MX, a forwarder).
    """
    if auth_user is not None:
        return "authenticated session"
    if settings.exempt_relay_clients and (relay_allowed or in_networks(peer_ip, relay_networks)):
        return "client may relay"
    if in_networks(peer_ip, exempt_networks):
        return "client in exempt_networks"
    return None


def recipient_is_exempt(address: str, exempt: Iterable[str]) -> bool:
    """Whether a refusal spares ``address``: its local part or the whole address is listed."""
    lowered = address.lower()
    local = lowered.rpartition("@")[0] if "@" in lowered else lowered
    return any(entry == lowered if "@" in entry else entry == local for entry in exempt)


# ------------------------------------------------------------ refusals


def clean(text: str, limit: int = _REPLY_TEXT_CHARS) -> str:
    """``text`` as one line of printable ASCII, at most ``limit`` characters."""
    out = " ".join(text.split())
    if not (out.isascii() and out.isprintable()):   # printable ASCII: kept as it is
        out = "".join(c if " " <= c <= "~" else "?" for c in out)
    return out if len(out) <= limit else out[:limit - 3] + "..."


def _refusal(r: SpfResult, action: str) -> Reject | TempFail | None:
    reply = REPLIES.get((r.result, action))
    if reply is None:
        return None
    code, enhanced = reply
    who = f"<{r.sender}>" if r.identity == "mailfrom" else f"HELO {r.helo}"
    domain, ip = clean(r.domain, 100), r.client_ip
    if r.result == "fail":
        text = f"SPF fail: {domain} does not allow {ip} to send as {clean(who, 120)}"
        if r.explained_by_domain:
            text += f"; {domain} explains: {clean(r.explanation)}"
    elif r.result == "softfail":
        text = (f"SPF softfail: {domain} discourages mail from {ip} "
                f"as {clean(who, 120)}")
    elif r.result == "temperror":
        text = f"SPF temporary error checking {domain} (DNS lookup failed); try again later"
    else:
        problem = r.comment.split(": ", 1)[-1] if r.comment else "invalid record"
        if r.mechanism:
            problem = f"{problem}: {r.mechanism}"
        problem = clean(problem, 160)
        text = f"SPF permanent error in the policy of {domain}: {problem}"
    text = clean(text, 400)
    return Reject(code, enhanced, text) if code >= 500 else TempFail(code, enhanced, text)


def _action(result: str, settings: SpfSettings) -> str:
    return {"fail": settings.on_fail, "softfail": settings.on_softfail,
            "temperror": settings.on_temperror,
            "permerror": settings.on_permerror}.get(result, "annotate")


def decide(helo: SpfResult, mailfrom: SpfResult | None, settings: SpfSettings) -> Outcome:
    """The transaction's :class:`Outcome`: its results and the refusal they call for.

    The actions (``on_fail``…) apply to the governing identity: MAIL FROM, or
    HELO for the null sender. With ``enforce_helo`` they also apply to the
    HELO identity of a non-null sender, and the harder refusal wins (a
    permanent one over a temporary one).
    """
    governing = mailfrom if mailfrom is not None else helo
    refusal = _refusal(governing, _action(governing.result, settings))
    if mailfrom is not None and settings.enforce_helo:
        helo_refusal = _refusal(helo, _action(helo.result, settings))
        if helo_refusal is not None and (refusal is None or (
                isinstance(helo_refusal, Reject) and not isinstance(refusal, Reject))):
            refusal = helo_refusal
    return Outcome(helo, mailfrom, refusal)


# ------------------------------------------------------------ the record


def auth_result(outcome: Outcome) -> AuthResult:
    """The ``spf`` clause of Authentication-Results (RFC 8601 §2.7.2).

    The result is the governing identity's. ``smtp.mailfrom`` is the sender
    (absent for ``<>``: then the result is the HELO identity's), and
    ``smtp.helo`` the HELO name. The core's writer quotes any value that is
    not a plain token or address, so a crafted local part stays one value.
    """
    governing = outcome.governing
    properties = {}
    if outcome.mailfrom is not None:
        properties["smtp.mailfrom"] = outcome.mailfrom.sender
    if outcome.helo.helo:
        properties["smtp.helo"] = outcome.helo.helo
    return AuthResult("spf", governing.result, properties=properties)


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


def _value(text: str, *, quote: bool = False) -> str:
    """A key-value-pair value (RFC 7208 §9.1): a dot-atom, else a quoted-string."""
    if not quote and _DOT_ATOM.match(text):
        return text
    printable = text if text.isprintable() else "".join(c for c in text if c.isprintable())
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """``text`` as the inside of an RFC 5322 comment: one ASCII line, parentheses escaped."""
    return clean(text, 300).replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def received_spf(r: SpfResult, receiver: str, envelope_from: str) -> str:
    """The value of a ``Received-SPF:`` field (RFC 7208 §9.1) for one identity, folded.

    ``envelope_from`` is the transaction's sender (``""`` for ``<>``), also
    in the field of the HELO identity.
    """
    comment = _comment(f"{receiver}: {r.comment}" if r.comment else receiver)
    pairs = [("receiver", _value(receiver)), ("client-ip", _value(r.client_ip)),
             ("envelope-from", _value(envelope_from, quote=True)), ("helo", _value(r.helo)),
             ("identity", r.identity)]
    if r.mechanism and r.result not in ("permerror", "temperror"):
        pairs.append(("mechanism", _value(r.mechanism)))
    if r.result in ("permerror", "temperror") and r.mechanism:
        pairs.append(("problem", _value(r.mechanism)))
    lines = [f"{r.result} ({comment})"]
    line = ""
    for key, value in pairs:
        item = f"{key}={value};"
        if line and len(line) + len(item) > 72:
            lines.append(line)
            line = ""
        line = f"{line} {item}" if line else item
    lines.append(line)
    return "\r\n\t".join(lines)
