"""When to renew and when to try again: plain functions of times, tested without a CA.

- The **threshold**: renew when less than ``renew_share`` of the certificate's
  lifetime is left, or ``renew_days`` days when that is set (and shorter than
  the lifetime).
- **ACME Renewal Information** (RFC 9773): when the CA publishes a suggested
  window for the certificate, renew at a random time inside it; a window that
  is already open means now.
- **Backoff**: after a failure, wait ``initial × 2^(failures-1)`` seconds, at
  most ``maximum``, with jitter (between half and all of it), and never less
  than what the CA asked for (``Retry-After``).
"""

from __future__ import annotations

import datetime
import email.utils
import random
from dataclasses import dataclass
from typing import Any, Mapping

from .certs import CertInfo

UTC = datetime.timezone.utc

ARI_DEFAULT_RECHECK = datetime.timedelta(hours=6)
"""How soon to ask for renewal information again when the CA gives no Retry-After."""
ARI_MIN_RECHECK = datetime.timedelta(minutes=1)
ARI_MAX_RECHECK = datetime.timedelta(days=1)


def threshold_time(info: CertInfo, share: float,
                   days: float | None) -> tuple[datetime.datetime, str]:
    """When ``info`` is due by the configured threshold, and the reason in words."""
    lifetime = info.lifetime
    if days is not None:
        before = datetime.timedelta(days=days)
        if before < lifetime:
            return info.not_after - before, f"{days:g} days before expiry (renew_days)"
        reason = (f"renew_days ({days:g}) is not shorter than the certificate's lifetime "
                  f"({lifetime.total_seconds() / 86400:.1f} days); using renew_share")
    else:
        reason = ""
    when = info.not_after - lifetime * share
    text = f"{share:.0%} of the lifetime left (renew_share)"
    return when, f"{reason}: {text}" if reason else text


@dataclass(frozen=True)
class RenewalWindow:
    """A suggested renewal window from the CA (RFC 9773, section 4.2)."""

    start: datetime.datetime
    end: datetime.datetime
    explanation_url: str | None
    recheck_at: datetime.datetime

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start.timestamp(), "end": self.end.timestamp(),
                "explanation_url": self.explanation_url,
                "recheck_at": self.recheck_at.timestamp()}


def _rfc3339(value: Any, what: str) -> datetime.datetime:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a timestamp: {value!r}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # RFC 3339 allows more fractional digits than fromisoformat on 3.11 takes
    if "." in text:
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = head + "." + rest[:min(digits, 6)].ljust(6, "0") + rest[digits:]
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what} is not an RFC 3339 timestamp: {value!r}") from None
    if when.tzinfo is None:
        raise ValueError(f"{what} has no time zone: {value!r}")
    return when.astimezone(UTC)


def parse_retry_after(value: str | None, now: datetime.datetime) -> float | None:
    """Seconds from ``now`` that a ``Retry-After`` header asks for (delta or HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def parse_renewal_info(document: Mapping[str, Any], retry_after: str | None,
                       now: datetime.datetime) -> RenewalWindow:
    """A RenewalInfo response → its window; ``ValueError`` when it is malformed.

    ``recheck_at`` follows the ``Retry-After`` header, kept between a minute
    and a day (six hours without one), as section 4.3 asks.
    """
    window = document.get("suggestedWindow")
    if not isinstance(window, Mapping):
        raise ValueError("renewal information without a suggestedWindow")
    start = _rfc3339(window.get("start"), "suggestedWindow.start")
    end = _rfc3339(window.get("end"), "suggestedWindow.end")
    if end <= start:
        raise ValueError(f"suggestedWindow ends ({end.isoformat()}) before it starts "
                         f"({start.isoformat()})")
    explanation = document.get("explanationURL")
    seconds = parse_retry_after(retry_after, now)
    delay = ARI_DEFAULT_RECHECK if seconds is None else datetime.timedelta(seconds=seconds)
    delay = min(max(delay, ARI_MIN_RECHECK), ARI_MAX_RECHECK)
    return RenewalWindow(start, end, explanation if isinstance(explanation, str) else None,
                         now + delay)


def time_in_window(window: RenewalWindow, now: datetime.datetime,
                   rng: random.Random | None = None) -> datetime.datetime:
    """A uniformly random time in the window (section 4.2); ``now`` once it has begun
    so that a window the CA moved into the past (a revocation) means renew now."""
    if window.start <= now:
        return now
    spread = (window.end - window.start).total_seconds()
    return window.start + datetime.timedelta(seconds=(rng or random).uniform(0, spread))


def renewal_time(info: CertInfo, share: float, days: float | None,
                 window: RenewalWindow | None, chosen: datetime.datetime | None,
                 ) -> tuple[datetime.datetime, str]:
    """When to renew ``info`` and why: the time chosen in the CA's window when there is
    one (a window past the certificate's expiry is ignored), else the threshold."""
    if window is not None and chosen is not None and window.end <= info.not_after:
        return chosen, (f"in the CA's renewal window {window.start:%Y-%m-%d %H:%M} to "
                        f"{window.end:%Y-%m-%d %H:%M} UTC (ARI)")
    return threshold_time(info, share, days)


def backoff_seconds(failures: int, initial: float, maximum: float,
                    rng: random.Random | None = None) -> float:
    """The wait after ``failures`` failures in a row: exponential, capped, with jitter
    between half and all of it so that nodes that failed together spread out."""
    if failures < 1:
        return 0.0
    base = min(maximum, initial * 2 ** min(failures - 1, 62))
    return (rng or random).uniform(base / 2, base)


def next_attempt_delay(failures: int, initial: float, maximum: float,
                       retry_after: float | None, rng: random.Random | None = None) -> float:
    """Seconds until the next attempt: the backoff, or what the CA asked for when longer."""
    delay = backoff_seconds(failures, initial, maximum, rng)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
