"""The RFC 7208 test suite (openspf.org, release 2014.04), every case, over real DNS.

``rfc7208-tests.yml`` is vendored from pyspf's source distribution (its
licence is in ``rfc7208-tests.LICENSE``). Each scenario's zone data is served
by a :class:`elemta.testing.ZoneServer` on loopback, and each case runs
through :class:`elemta_spf.checker.SpfChecker` exactly as the plugin runs it:
pyspf in a worker thread, every DNS question answered by an
:class:`elemta.Resolver` (the class of ``app.resolver``) asking that server.
Nothing stands in for DNS.

How the suite's zone data becomes DNS (the conventions of pyspf's
``testspf.py``, the suite's reference driver):

- ``SPF`` records are also published as ``TXT`` when the name has no ``TXT``
  entry at all (a ``TXT: NONE`` entry suppresses that) and no ``TIMEOUT``
  (the driver would reach them after it, so never). RFC 7208 §3.1 removed
  the ``SPF`` RR type; the checker never asks for it, which every case asserts.
- ``TIMEOUT`` makes every question about the name time out, except those of a
  type listed before it: the server stays silent (fault mode ``timeout``).
- A ``TXT`` given as a list is one record of several character-strings, and
  strings are sent as UTF-8 (``"\\x80"`` in the YAML is U+0080). The one
  record of no strings at all (``null-text``: "illegal, but SPF should not
  crash") cannot be sent in a well-formed DNS message, so it is sent as one
  empty string.

One server serves the whole module and is cleared between cases; each case
gets a fresh resolver, so no answer is cached from one case to the next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elemta_spf.checker import SpfChecker

from elemta.testing import ZoneServer

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None

SUITE = Path(__file__).with_name("rfc7208-tests.yml")
EXPECTED_CASES = 203

# every record type pyspf could ask for, and the SPF type it must not ask for
QUESTION_TYPES = ("A", "AAAA", "MX", "PTR", "TXT", "SPF", "CNAME")
# the suite's driver answers a timed-out question at once; our server stays
# silent, so keep the resolver's wait short in the scenarios that have one
# (loopback answers take a millisecond). Elsewhere wait long: a busy machine can
# delay an answer past a quarter of a second, and a lost answer changes results
# (a PTR lookup that times out is no match, RFC 7208 §5.5)
DNS_TIMEOUT_SECONDS = 0.25
ANSWERED_TIMEOUT_SECONDS = 5.0

# Cases whose expected result this checker cannot produce, and why. Each one is
# run anyway (strict xfail), so the day it passes the test says to move it out.
KNOWN_FAILURES: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    id: str
    scenario: str
    spec: str
    helo: str
    host: str
    mailfrom: str
    results: tuple[str, ...]
    explanation: str | None
    zonedata: dict[str, list[Any]]


def load_cases() -> list[Case]:
    if yaml is None:
        return []
    cases = []
    with SUITE.open("rb") as f:
        for scenario in yaml.safe_load_all(f):
            for case_id, t in scenario["tests"].items():
                result = t["result"]
                cases.append(Case(
                    id=case_id, scenario=scenario["description"], spec=str(t["spec"]),
                    helo=t["helo"], host=t["host"], mailfrom=t["mailfrom"],
                    results=tuple(result) if isinstance(result, list) else (result,),
                    explanation=t.get("explanation"),
                    zonedata=scenario.get("zonedata") or {}))
    return cases


CASES = load_cases()


def serve(zone: ZoneServer, zonedata: dict[str, list[Any]]) -> None:
    """Publish one scenario's zone data on ``zone`` (see the module docstring)."""
    for owner, entries in zonedata.items():
        name = zone_file_name(owner)
        # SPF records become TXT ones only for a name with no TXT entry (even
        # "NONE"); the driver adds them after TIMEOUT, where they are never reached
        make_txt = not any(isinstance(e, dict) and "TXT" in e for e in entries) \
            and "TIMEOUT" not in entries
        answered: set[str] = set()
        timeout = False
        for entry in entries:
            if entry == "TIMEOUT":
                timeout = True
                continue
            if timeout:
                raise ValueError(f"{name}: records after TIMEOUT are never answered; "
                                 "the suite has none, so this is a new suite format")
            [(rdtype, value)] = entry.items()
            if value == "NONE":
                # no record of this type, and no TXT made from SPF records either
                continue
            answered.add(rdtype)
            if rdtype in ("TXT", "SPF"):
                strings = [value] if isinstance(value, str) else list(value)
                # a record of no strings cannot travel in a well-formed message
                # (RFC 1035 §3.3.14; dnspython refuses the whole answer): one
                # empty string is the nearest record DNS can carry
                data = [s.encode("utf-8") for s in strings] or [b""]
                if rdtype == "TXT" or make_txt:
                    zone.add(name, "TXT", data)
                    answered.add("TXT")
            elif rdtype == "MX":
                preference, host = value
                zone.add(name, "MX", f"{preference} {absolute(host)}")
            elif rdtype in ("PTR", "CNAME"):
                zone.add(name, rdtype, absolute(value))
            elif rdtype in ("A", "AAAA"):
                zone.add(name, rdtype, value)
            else:
                raise ValueError(f"{name}: record type {rdtype} is new to this driver")
        if timeout:
            for rdtype in QUESTION_TYPES:
                if rdtype not in answered:
                    zone.fail(name, "timeout", rdtype)


def absolute(host: str) -> str:
    return host if host.endswith(".") else (host + "." if host else ".")


def zone_file_name(name: str) -> str:
    """``name`` in zone-file syntax: a space (legal in a DNS label) as ``\\032``."""
    return "".join(f"\\{ord(c):03d}" if c.isspace() else c for c in name)


@pytest.fixture(scope="module")
def zone():
    with ZoneServer() as server:
        yield server


def test_the_suite_is_complete():
    if yaml is None:
        message = "the RFC 7208 suite needs PyYAML: pip install -e 'plugins/elemta-spf[test]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    assert len(CASES) == EXPECTED_CASES
    assert len({c.id for c in CASES}) == EXPECTED_CASES, "case ids must be unique"
    assert set(KNOWN_FAILURES) <= {c.id for c in CASES}


def params() -> list[Any]:
    out = []
    for case in CASES:
        marks = []
        if case.id in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[case.id], strict=True))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@pytest.mark.parametrize("case", params())
async def test_rfc7208(case: Case, zone: ZoneServer):
    zone.clear()
    serve(zone, case.zonedata)
    silent = any("TIMEOUT" in entries for entries in case.zonedata.values())
    timeout = DNS_TIMEOUT_SECONDS if silent else ANSWERED_TIMEOUT_SECONDS
    checker = SpfChecker(zone.resolver(timeout_seconds=timeout), time_limit=20,
                         workers=2, default_explanation="DEFAULT")
    try:
        outcome = await checker.check(case.host, case.mailfrom, case.helo)
        # again, with the answers now in the resolver's cache: evaluated at once
        # (check_now, no task) wherever nothing is left to wait for, and the same
        now = checker.check_now(case.host, case.mailfrom, case.helo)
        again = await checker.check(case.host, case.mailfrom, case.helo)
    finally:
        checker.close()
    for other in (again, now):
        if other is not None:
            assert (other.result, other.explanation) == (outcome.result, outcome.explanation)

    assert outcome.result in case.results, (
        f"{case.id} ({case.scenario}, RFC 7208 {case.spec}): got {outcome.result} "
        f"({outcome.comment}), expected {' or '.join(case.results)}")
    if case.explanation is not None:
        assert outcome.explanation == case.explanation
    assert zone.count(rdtype="SPF") == 0, "RFC 7208 §3.1: never ask for the SPF RR type"
