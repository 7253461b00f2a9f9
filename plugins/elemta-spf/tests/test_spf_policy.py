"""What results mean: settings, refusals, exemptions and the header fields, without a server."""

from __future__ import annotations

import ipaddress

import pydantic
import pytest
from elemta_spf.checker import RESULTS, SpfResult
from elemta_spf.policy import (auth_result, clean, client_exemption, decide, received_spf,
                               recipient_is_exempt)
from elemta_spf.settings import SpfSettings

from elemta import Reject, TempFail

IP = "192.0.2.10"


def result(res: str, identity: str = "mailfrom", **kw) -> SpfResult:
    sender = "" if identity == "helo" else "a@example.org"
    domain = "mail.example.org" if identity == "helo" else "example.org"
    return SpfResult(res, identity, domain, IP, sender, "mail.example.org", **kw)


# ------------------------------------------------------------------ settings


def test_the_defaults_only_annotate():
    s = SpfSettings()
    assert (s.on_fail, s.on_softfail, s.on_temperror, s.on_permerror) == ("annotate",) * 4
    for res in RESULTS:
        assert decide(result("pass", "helo"), result(res), s).refusal is None


@pytest.mark.parametrize(("values", "key", "words"), [
    ({"exempt_networks": ["192.0.2.0/33"]}, "exempt_networks", "CIDR network"),
    ({"exempt_networks": ["office"]}, "exempt_networks", "192.0.2.0/24"),
    ({"exempt_recipients": ["ab use"]}, "exempt_recipients", "local part"),
    ({"metrics_domains": ["exa mple.org"]}, "metrics_domains", "not a domain"),
    ({"metrics_domains": ["other"]}, "metrics_domains", "cannot be listed"),
    ({"on_temperror": "reject"}, "on_temperror", "annotate"),
    ({"time_limit_seconds": 0}, "time_limit_seconds", "greater than 0"),
    ({"max_concurrent_checks": 0}, "max_concurrent_checks", "greater than or equal to 1"),
    ({"on_fial": "reject"}, "on_fial", "Extra inputs"),
])
def test_a_bad_setting_says_what_is_wrong(values, key, words):
    with pytest.raises(pydantic.ValidationError) as e:
        SpfSettings(**values)
    [error] = e.value.errors()
    assert error["loc"][0] == key
    assert words in str(e.value)


def test_settings_are_normalised():
    s = SpfSettings(exempt_networks=["192.0.2.7/24", "2001:DB8::/32"],
                    exempt_recipients=["Abuse", "Security@Example.COM"],
                    metrics_domains=["Example.ORG."])
    assert s.exempt_networks == ("192.0.2.0/24", "2001:db8::/32")
    assert s.exempt_recipients == ("abuse", "security@example.com")
    assert s.metrics_domains == ("example.org",)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("res", "action", "kind", "code", "enhanced"), [
    ("fail", "reject", Reject, 550, "5.7.23"),
    ("fail", "tempfail", TempFail, 451, "4.7.23"),
    ("softfail", "reject", Reject, 550, "5.7.1"),
    ("softfail", "tempfail", TempFail, 451, "4.7.1"),
    ("temperror", "tempfail", TempFail, 451, "4.4.3"),
    ("permerror", "reject", Reject, 550, "5.7.24"),
    ("permerror", "tempfail", TempFail, 451, "4.7.24"),
])
def test_each_action_has_its_reply(res, action, kind, code, enhanced):
    s = SpfSettings(**{f"on_{res}": action})
    refusal = decide(result("pass", "helo"), result(res, comment="x: y"), s).refusal
    assert isinstance(refusal, kind)
    assert (refusal.code, refusal.enhanced) == (code, enhanced)


@pytest.mark.parametrize("res", ["none", "neutral", "pass"])
def test_none_neutral_and_pass_are_never_refused(res):
    s = SpfSettings(on_fail="reject", on_softfail="reject", on_temperror="tempfail",
                    on_permerror="reject", enforce_helo=True)
    assert decide(result(res, "helo"), result(res), s).refusal is None


def test_the_null_sender_is_judged_by_its_helo_result():
    s = SpfSettings(on_fail="reject")
    outcome = decide(result("fail", "helo"), None, s)
    assert outcome.governing.identity == "helo"
    assert outcome.refusal is not None and "HELO mail.example.org" in outcome.refusal.text


def test_enforce_helo_takes_the_harder_refusal():
    s = SpfSettings(on_fail="reject", on_temperror="tempfail", enforce_helo=True)
    assert isinstance(decide(result("fail", "helo"), result("temperror"), s).refusal, Reject)
    assert isinstance(decide(result("temperror", "helo"), result("fail"), s).refusal, Reject)
    only_helo = decide(result("temperror", "helo"), result("pass"), s).refusal
    assert isinstance(only_helo, TempFail) and only_helo.enhanced == "4.4.3"
    relaxed = SpfSettings(on_fail="reject")
    assert decide(result("fail", "helo"), result("none"), relaxed).refusal is None


def test_the_domains_explanation_is_shown_cleaned():
    s = SpfSettings(on_fail="reject")
    r = result("fail", explanation="Go away\r\n550 5.7.1 injected \x00 \u00e9t\u00e9",
               explained_by_domain=True)
    refusal = decide(result("pass", "helo"), r, s).refusal
    assert refusal.text == ("SPF fail: example.org does not allow 192.0.2.10 to send as "
                            "<a@example.org>; example.org explains: Go away 550 5.7.1 "
                            "injected ? ?t?")


def test_clean_makes_one_bounded_line():
    assert clean("a\r\nb\tc") == "a b c"
    assert clean("x" * 500, 20) == "x" * 17 + "..."


# ------------------------------------------------------------------ exemptions


def exemption(peer="192.0.2.10", auth=None, relay=False, settings=SpfSettings(),
              exempt=(), relay_networks=()):
    return client_exemption(peer_ip=peer, auth_user=auth, relay_allowed=relay,
                            settings=settings,
                            exempt_networks=[ipaddress.ip_network(n) for n in exempt],
                            relay_networks=[ipaddress.ip_network(n) for n in relay_networks])


def test_who_is_not_checked():
    assert exemption() is None
    assert exemption(auth="alice@example.com") == "authenticated session"
    assert exemption(relay=True) == "client may relay"
    assert exemption(relay_networks=["192.0.2.0/24"]) == "client may relay"
    assert exemption(relay=True, settings=SpfSettings(exempt_relay_clients=False)) is None
    assert exemption(exempt=["192.0.2.0/28"]) == "client in exempt_networks"
    assert exemption(peer="::ffff:192.0.2.10", exempt=["192.0.2.0/28"]) is not None
    assert exemption(peer="2001:db8::1", exempt=["2001:db8::/32"]) is not None
    assert exemption(peer="2001:db9::1", exempt=["2001:db8::/32"]) is None


def test_exempt_recipients_by_local_part_or_address():
    exempt = ("abuse", "security@example.com")
    assert recipient_is_exempt("Abuse@example.test", exempt)
    assert recipient_is_exempt("security@EXAMPLE.com", exempt)
    assert not recipient_is_exempt("security@example.net", exempt)
    assert not recipient_is_exempt("abuse-reports@example.test", exempt)


# ------------------------------------------------------------------ the record


def test_the_authentication_result_names_both_identities():
    outcome = decide(result("none", "helo"), result("pass"), SpfSettings())
    r = auth_result(outcome)
    assert (r.method, r.result) == ("spf", "pass")
    assert r.properties == {"smtp.mailfrom": "a@example.org", "smtp.helo": "mail.example.org"}
    null = auth_result(decide(result("fail", "helo"), None, SpfSettings()))
    assert (null.result, null.properties) == ("fail", {"smtp.helo": "mail.example.org"})


def test_received_spf_quotes_and_escapes_what_it_was_given():
    r = SpfResult("permerror", "mailfrom", "example.org", "2001:db8::1",
                  '"x;y"@example.org', "bad (helo)",
                  comment="permanent error in processing domain of example.org: "
                          "Unknown mechanism found (see \\ here)", mechanism="moo")
    value = received_spf(r, "mx.example.test", '"x;y"@example.org')
    first, *rest = value.split("\r\n\t")
    assert first == ("permerror (mx.example.test: permanent error in processing domain of "
                     "example.org: Unknown mechanism found \\(see \\\\ here\\))")
    pairs = " ".join(rest)
    assert 'client-ip="2001:db8::1";' in pairs
    assert 'envelope-from="\\"x;y\\"@example.org";' in pairs
    assert 'helo="bad (helo)";' in pairs
    assert "identity=mailfrom;" in pairs and "problem=moo;" in pairs
    assert all(len(line) <= 78 for line in rest)
