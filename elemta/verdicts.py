"""Verdicts: what a hook implementation answers to stop a stage.

``None`` means "no opinion, ask the next plugin". Any other value must be one of
the classes below; anything else is a plugin bug and is answered ``451 4.3.0``.
Every verdict may carry headers that the core prepends to the message when it is
accepted (``headers=(("X-Spam-Score", "3.1"),)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Base class of all verdicts; never returned itself."""

    headers: Headers = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        if self.headers:
            from .models import check_header

            for name, value in self.headers:
                check_header(name, value)


@dataclass(frozen=True, slots=True)
class Accept(Verdict):
    """Stop the stage with success (``250``; ``235`` at AUTH).

    At AUTH only, ``identity`` is the name the session is authenticated as
    when it differs from the login the client typed (its canonical case, the
    ``mail`` attribute of an LDAP entry…).
    """

    text: str | None = None
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Reject(Verdict):
    """Permanent failure: a 5xx reply. The session goes on."""

    code: int = 550
    enhanced: str = "5.7.1"
    text: str = "Rejected"

    def __post_init__(self) -> None:
        Verdict.__post_init__(self)
        _check_reply(self, 500, 599)


@dataclass(frozen=True, slots=True)
class TempFail(Verdict):
    """Temporary failure: a 4xx reply. The client should try again later."""

    code: int = 451
    enhanced: str = "4.7.1"
    text: str = "Try again later"

    def __post_init__(self) -> None:
        Verdict.__post_init__(self)
        _check_reply(self, 400, 499)


@dataclass(frozen=True, slots=True)
class Disconnect(Verdict):
    """Answer with the given reply, then close the connection."""

    code: int = 421
    enhanced: str = "4.7.0"
    text: str = "Closing connection"

    def __post_init__(self) -> None:
        Verdict.__post_init__(self)
        _check_reply(self, 400, 599)


@dataclass(frozen=True, slots=True)
class Discard(Verdict):
    """DATA only: answer 250 but drop the message (it is never spooled)."""

    reason: str = "discarded"


@dataclass(frozen=True, slots=True)
class Quarantine(Verdict):
    """DATA only: answer 250 and spool the message in the ``hold`` state."""

    reason: str = "quarantined"


REPLY_VERDICTS = (Reject, TempFail, Disconnect)


def _check_reply(v: Reject | TempFail | Disconnect, low: int, high: int) -> None:
    if not low <= v.code <= high:
        raise ValueError(f"{type(v).__name__} code must be {low}..{high}, got {v.code}")
    first = str(v.code)[0]
    parts = v.enhanced.split(".")
    if len(parts) != 3 or parts[0] != first or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"{type(v).__name__} enhanced status must look like {first}.x.y "
            f"(matching the code {v.code}), got {v.enhanced!r}"
        )
    if "\r" in v.text or "\n" in v.text:
        raise ValueError("reply text must be a single line")


def reply_line(v: Reject | TempFail | Disconnect) -> str:
    """The SMTP reply a reply verdict produces, e.g. ``550 5.7.1 Rejected``."""
    return f"{v.code} {v.enhanced} {v.text}"
