"""Local policy on top of the evaluation (RFC 7489 §6.7, overrides reported as in
Appendix C), the Authentication-Results entry (RFC 7489 §11.2, RFC 8601) and the settings."""

from __future__ import annotations

import pydantic
import pytest

from elemta_dmarc.evaluator import DkimIdentifier, Evaluation, SpfIdentifier
from elemta_dmarc.policy import Decision, auth_result, decide, exempt, report_row, strictest
from elemta_dmarc.record import parse_record
from elemta_dmarc.settings import DmarcSettings

REJECT = parse_record("v=DMARC1; p=reject; sp=quarantine; np=reject; pct=100; "
                      "rua=mailto:dmarc@example.org")


def failing(disposition="reject", **kw) -> Evaluation:
    values = dict(result="fail", from_domain="example.org", org_domain="example.org",
                  record=REJECT, policy_domain="example.org", policy="reject", policy_tag="p",
                  disposition=disposition)
    values.update(kw)
    return Evaluation(**values)


def test_rfc7489_6_6_2_a_fail_gets_the_policy_disposition():
    assert decide(failing(), DmarcSettings()).action == "reject"
    assert decide(failing("quarantine", policy="quarantine"), DmarcSettings()).action \
        == "quarantine"
    assert decide(failing("none", policy="none"), DmarcSettings()).action == "none"


@pytest.mark.parametrize("result", ["pass", "none", "permerror"])
def test_results_other_than_fail_and_temperror_do_nothing(result):
    assert decide(failing(result=result), DmarcSettings()).action == "none"


def test_rfc7489_6_6_3_temperror_is_accepted_or_tempfailed_as_configured():
    e = failing(result="temperror", disposition="none", record=None, policy=None)
    assert decide(e, DmarcSettings()).action == "none"
    assert decide(e, DmarcSettings(on_temperror="tempfail")).action == "tempfail"
    exempted = DmarcSettings(on_temperror="tempfail", exempt_domains=("example.org",))
    assert decide(e, exempted).action == "none"


def test_rfc7489_6_7_never_reject_turns_reject_into_quarantine():
    decision = decide(failing(), DmarcSettings(never_reject=True))
    assert (decision.action, decision.override, decision.comment) == \
        ("quarantine", "local_policy", "never_reject")
    assert decide(failing("quarantine"), DmarcSettings(never_reject=True)).override is None


def test_rfc7489_6_7_an_exempt_domain_and_its_subdomains_are_not_acted_on():
    settings = DmarcSettings(exempt_domains=("Example.ORG.",))
    assert settings.exempt_domains == ("example.org",)
    decision = decide(failing(), settings)
    assert (decision.action, decision.override) == ("none", "local_policy")
    assert decide(failing(from_domain="news.example.org"), settings).action == "none"
    assert decide(failing(from_domain="badexample.org"), settings).action == "reject"
    assert exempt("example.org", ["example.org"]) and not exempt("org", ["example.org"])


def test_rfc7489_appendix_c_sampled_out_is_reported_as_such():
    decision = decide(failing("quarantine", sampled_out=True), DmarcSettings())
    assert (decision.action, decision.override) == ("quarantine", "sampled_out")


def test_rfc7489_6_6_1_the_strictest_decision_wins():
    e = failing()
    decisions = [Decision(e, "none"), Decision(e, "reject"), Decision(e, "quarantine"),
                 Decision(e, "tempfail")]
    assert strictest(decisions).action == "reject"
    assert strictest(decisions[2:]).action == "tempfail"
    assert strictest(decisions[:1] + decisions[2:3]).action == "quarantine"


def test_rfc7489_11_2_the_dmarc_result_names_the_from_domain_and_the_policy():
    result = auth_result(decide(failing(), DmarcSettings()))
    assert (result.method, result.result, result.reason) == ("dmarc", "fail", None)
    assert result.properties == {"header.from": "example.org", "policy.dmarc": "reject"}


def test_the_dmarc_result_says_when_the_action_differs_from_the_policy():
    result = auth_result(decide(failing(), DmarcSettings(never_reject=True)))
    assert result.reason == "p=reject applied as quarantine (never_reject)"
    sampled = failing("quarantine", sampled_out=True, reason="pct=10: not sampled",
                      record=parse_record("v=DMARC1; p=reject; pct=10"))
    assert auth_result(decide(sampled, DmarcSettings())).reason == \
        "p=reject applied as quarantine (pct=10: not sampled)"


def test_a_result_without_a_policy_has_no_policy_property():
    none = Evaluation("none", "example.org", "example.org", reason="no DMARC record")
    result = auth_result(decide(none, DmarcSettings()))
    assert result.properties == {"header.from": "example.org"}
    assert result.reason == "no DMARC record"


def test_rfc7489_7_2_a_report_row_holds_what_aggregate_reports_need():
    e = failing(spf=(SpfIdentifier("helo.example.net", "pass", "helo"),
                     SpfIdentifier("bounce.example.net", "fail", "mfrom")),
                dkim=(DkimIdentifier("example.net", "pass", "s1"),))
    row = report_row(decide(e, DmarcSettings(never_reject=True)), received_at=1.5,
                     queue_id="Q1", source_ip="192.0.2.9", envelope_from="example.net",
                     envelope_to=["b.example", "a.example", "b.example"], helo="mx.example.net")
    assert row is not None
    assert (row.spf_domain, row.spf_scope, row.spf_result) == \
        ("bounce.example.net", "mfrom", "fail")
    assert row.dkim == ({"domain": "example.net", "selector": "s1", "result": "pass"},)
    assert (row.disposition, row.override, row.override_comment) == \
        ("quarantine", "local_policy", "never_reject")
    assert (row.p, row.sp, row.np, row.pct, row.adkim, row.aspf) == \
        ("reject", "quarantine", "reject", 100, "r", "r")
    assert row.envelope_to == "a.example b.example"
    assert row.rua == ("mailto:dmarc@example.org",)


def test_no_report_row_without_a_record():
    none = Evaluation("none", "example.org", "example.org")
    assert report_row(decide(none, DmarcSettings()), received_at=0, queue_id="Q",
                      source_ip="192.0.2.1", envelope_from="", envelope_to=[], helo="") is None
    temp = failing(result="temperror", record=None)
    assert report_row(decide(temp, DmarcSettings()), received_at=0, queue_id="Q",
                      source_ip="192.0.2.1", envelope_from="", envelope_to=[], helo="") is None


# ------------------------------------------------------------------ settings


def test_settings_refuse_unknown_keys():
    with pytest.raises(pydantic.ValidationError, match="never_rejct"):
        DmarcSettings.model_validate({"never_rejct": True})


@pytest.mark.parametrize("key", ["exempt_domains", "metrics_domains"])
def test_settings_refuse_what_is_not_a_domain_and_say_how_to_write_it(key):
    with pytest.raises(pydantic.ValidationError,
                       match="'user@example.org' is not a domain name; write it as"):
        DmarcSettings.model_validate({key: ["example.org", "user@example.org"]})


@pytest.mark.parametrize("table, message", [
    ({"bad_from": "drop"}, "reject"),
    ({"on_temperror": "ignore"}, "tempfail"),
    ({"reports": {"retention_days": 0}}, "greater than or equal to 1"),
    ({"reports": {"max_rows": 10}}, "greater than or equal to 1000"),
    ({"reports": {"keep": 1}}, "keep"),
])
def test_settings_errors_name_the_allowed_values(table, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        DmarcSettings.model_validate(table)
