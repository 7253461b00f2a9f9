"""The DMARC policy record: ``v=DMARC1; p=...`` (RFC 7489 §6.3, grammar in §6.4; RFC 9091 ``np``).

:func:`parse_record` reads one TXT record. It returns ``None`` for a record that
is not a DMARC record at all (its first tag is not ``v=DMARC1``: RFC 7489
§6.6.3 steps 2 and 4 discard it), and a :class:`DmarcRecord` otherwise, with
every syntax problem it met in ``problems``. How a broken policy tag is handled
is the evaluator's business (§6.6.3 step 6); this module only reads.

Tag names are case-insensitive and the value keywords too (the ABNF's quoted
strings are); ``DMARC1`` must be exact (``%x44 %x4d %x41 %x52 %x43 %x31``).
Unknown tags are ignored (§6.3), and so is ``t=`` of DMARCbis. A tag given
twice keeps its first value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["POLICIES", "DmarcRecord", "Policy", "parse_record", "stricter", "weaker"]

Policy = Literal["none", "quarantine", "reject"]
POLICIES: tuple[Policy, ...] = ("none", "quarantine", "reject")

# RFC 3986 scheme, then something; an optional "!size[kmgt]" suffix (§6.4 dmarc-uri)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s,;!]+(?:![0-9]+[kmgtKMGT]?)?\Z")
_WSP = " \t"
DEFAULT_RI = 86400


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed ``v=DMARC1`` record.

    ``p`` is ``None`` when the tag is missing or its value is not a policy, and
    ``sp_invalid``/``np_invalid`` are set when ``sp``/``np`` is present with a
    value that is not one; RFC 7489 §6.6.3 step 6 (RFC 9989 §4.10.1 adds ``np``)
    then decides (see :attr:`usable`). An invalid ``pct`` means 100, an invalid
    ``adkim``/``aspf`` means ``r``; each problem is listed in ``problems``.
    """

    text: str
    p: Policy | None = None
    sp: Policy | None = None
    np: Policy | None = None
    sp_invalid: bool = False
    np_invalid: bool = False
    pct: int = 100
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    ri: int = DEFAULT_RI
    fo: str = "0"
    rf: str = "afrf"
    problems: tuple[str, ...] = field(default=())

    @property
    def usable(self) -> Literal["yes", "as-none", "no"]:
        """RFC 7489 §6.6.3 step 6 (with ``np``, RFC 9989 §4.10.1): ``"yes"`` when
        ``p`` is valid and ``sp`` and ``np`` are absent or valid. Otherwise
        ``"as-none"`` when ``rua`` holds a valid URI (act as if the record said
        ``p=none``), else ``"no"`` (no DMARC processing)."""
        if self.p is not None and not self.sp_invalid and not self.np_invalid:
            return "yes"
        return "as-none" if self.rua else "no"


def parse_record(text: str) -> DmarcRecord | None:
    """One TXT record (its strings already joined): a :class:`DmarcRecord`, or
    ``None`` when it does not start with ``v=DMARC1``."""
    parts = text.split(";")
    name, eq, value = parts[0].partition("=")
    # the record starts with the v tag (§6.6.3 step 2); blanks around it are tolerated
    if not eq or name.strip(_WSP).lower() != "v" or value.strip(_WSP) != "DMARC1":
        return None
    seen: dict[str, str] = {}
    problems: list[str] = []
    for raw in parts[1:]:
        part = raw.strip(_WSP)
        if not part:
            continue
        tag, eq, val = part.partition("=")
        tag = tag.strip(_WSP).lower()
        if not eq or not tag:
            problems.append(f"{part[:40]!r} is not a tag=value pair")
            continue
        if tag in seen:
            problems.append(f"tag {tag} appears twice; the first value counts")
            continue
        seen[tag] = val.strip(_WSP)
    values: dict[str, object] = {}

    def policy(tag: str) -> Policy | None:
        raw = seen.get(tag)
        if raw is None:
            return None
        lowered = raw.lower()
        if lowered in POLICIES:
            return lowered  # type: ignore[return-value]
        problems.append(f"{tag}={raw[:40]!r} is not none, quarantine or reject")
        return None

    if "p" in seen:
        values["p"] = policy("p")
    else:
        problems.append("the p tag is missing")
    if "sp" in seen:
        values["sp"] = policy("sp")
        values["sp_invalid"] = values["sp"] is None
    if "np" in seen:
        values["np"] = policy("np")
        values["np_invalid"] = values["np"] is None
    if "pct" in seen:
        raw = seen["pct"]
        if re.fullmatch(r"[0-9]{1,3}", raw) and int(raw) <= 100:
            values["pct"] = int(raw)
        else:
            problems.append(f"pct={raw[:40]!r} is not a number from 0 to 100; 100 applies")
    for tag in ("adkim", "aspf"):
        if tag in seen:
            raw = seen[tag].lower()
            if raw in ("r", "s"):
                values[tag] = raw
            else:
                problems.append(f"{tag}={seen[tag][:40]!r} is not r or s; r applies")
    for tag in ("rua", "ruf"):
        if tag in seen:
            uris = tuple(u.strip(_WSP) for u in seen[tag].split(","))
            good = tuple(u for u in uris if _URI.match(u))
            if len(good) != len(uris):
                problems.append(f"{tag} has URIs that are not valid: "
                                + ", ".join(repr(u[:60]) for u in uris if u not in good))
            values[tag] = good
    if "ri" in seen:
        if re.fullmatch(r"[0-9]{1,10}", seen["ri"]):
            values["ri"] = int(seen["ri"])
        else:
            problems.append(f"ri={seen['ri'][:40]!r} is not a number of seconds")
    if "fo" in seen:
        values["fo"] = seen["fo"]
    if "rf" in seen:
        values["rf"] = seen["rf"]
    return DmarcRecord(text=text, problems=tuple(problems), **values)  # type: ignore[arg-type]


def weaker(policy: Policy) -> Policy:
    """The next less strict policy: ``reject`` → ``quarantine`` → ``none`` (RFC 7489 §6.3 pct)."""
    return POLICIES[max(POLICIES.index(policy) - 1, 0)]


def stricter(a: Policy, b: Policy) -> Policy:
    return a if POLICIES.index(a) >= POLICIES.index(b) else b
