"""The evaluator, rule by rule, against a real DNS server on loopback (``dns_server``).

Each test names the rule it checks: RFC 7489 (DMARC), RFC 9091 (``np``, non-existent
domains) and RFC 9989 (DMARCbis) where it settles what RFC 7489 left open.
"""

from __future__ import annotations

import pytest

from elemta import AuthResult
from elemta_dmarc.domains import OrganizationalDomains
from elemta_dmarc.evaluator import DkimIdentifier, Evaluator, SpfIdentifier, identifiers

ORG = OrganizationalDomains()
FAULTS = ["timeout", "SERVFAIL", "REFUSED", "garbage", "wrong-type"]


def spf(domain: str, result: str = "pass", scope: str = "mfrom") -> SpfIdentifier:
    return SpfIdentifier(domain, result, scope)  # type: ignore[arg-type]


def dkim(domain: str, result: str = "pass") -> DkimIdentifier:
    return DkimIdentifier(domain, result, "s1")


def evaluator(dns_server, sample=None, **resolver) -> Evaluator:
    resolver.setdefault("timeout_seconds", 0.3)
    return Evaluator(dns_server.resolver(**resolver), ORG, sample=sample)


def publish(dns_server, domain: str, *records) -> None:
    for record in records:
        dns_server.add(f"_dmarc.{domain}", "TXT", record)


@pytest.fixture
def org_zone(dns_server):
    """example.org: a zone; www.example.org exists (A); nothing else below it."""
    dns_server.zone("example.org")
    dns_server.add("example.org", "A", "192.0.2.1")
    dns_server.add("www.example.org", "A", "192.0.2.2")
    return dns_server


# ------------------------------------------------------------------ discovery, §6.6.3


async def test_rfc7489_6_6_3_no_record_anywhere_is_none(org_zone):
    outcome = await evaluator(org_zone).evaluate("www.example.org", [spf("example.net")])
    assert outcome.result == "none"
    assert outcome.disposition == "none" and outcome.record is None


async def test_rfc7489_6_6_3_p_reject_with_sp_none_applies_p_when_from_is_the_org_domain(
        org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; sp=none")
    outcome = await evaluator(org_zone).evaluate("example.org", [spf("example.net")])
    assert outcome.result == "fail"
    assert (outcome.policy_tag, outcome.policy, outcome.disposition) == ("p", "reject", "reject")
    assert outcome.policy_domain == "example.org"


async def test_rfc7489_6_6_3_from_domain_that_is_the_org_domain_is_looked_up_once(org_zone):
    outcome = await evaluator(org_zone).evaluate("example.org")
    assert outcome.result == "none"
    assert org_zone.count("_dmarc.example.org", "TXT") == 1
    assert sum(1 for q in org_zone.queries if q.name.startswith("_dmarc.")) == 1


async def test_rfc7489_6_6_3_existing_subdomain_without_a_record_gets_sp(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; sp=quarantine; np=reject")
    outcome = await evaluator(org_zone).evaluate("www.example.org", [spf("example.net")])
    assert outcome.result == "fail"
    assert (outcome.policy_tag, outcome.policy, outcome.disposition) == \
        ("sp", "quarantine", "quarantine")
    assert outcome.policy_domain == "example.org" and outcome.org_domain == "example.org"


async def test_rfc7489_6_6_3_subdomain_without_sp_gets_p(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=quarantine")
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert (outcome.result, outcome.policy_tag, outcome.disposition) == \
        ("fail", "p", "quarantine")


async def test_rfc7489_6_6_3_step_1_a_subdomain_with_its_own_record_uses_its_p(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=none; sp=none")
    publish(org_zone, "www.example.org", "v=DMARC1; p=reject; sp=none")
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert (outcome.policy_domain, outcome.policy_tag, outcome.disposition) == \
        ("www.example.org", "p", "reject")
    assert org_zone.count("_dmarc.example.org") == 0


async def test_rfc7489_6_6_3_step_5_two_dmarc_records_mean_no_policy(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject", "v=DMARC1; p=none")
    outcome = await evaluator(org_zone).evaluate("example.org", [spf("example.net")])
    assert outcome.result == "none"
    assert outcome.disposition == "none" and outcome.record is None
    assert "2 DMARC records" in (outcome.reason or "")


async def test_rfc7489_6_6_3_step_5_two_records_at_the_from_domain_skip_the_org_domain(
        org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    publish(org_zone, "www.example.org", "v=DMARC1; p=none", "v=DMARC1; p=quarantine")
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert outcome.result == "none"
    assert org_zone.count("_dmarc.example.org") == 0


async def test_rfc7489_6_6_3_step_2_other_txt_records_are_discarded(org_zone):
    publish(org_zone, "example.org", "v=spf1 -all", "google-site-verification=abc",
            "v=DMARC1; p=quarantine")
    outcome = await evaluator(org_zone).evaluate("example.org")
    assert (outcome.result, outcome.disposition) == ("fail", "quarantine")


async def test_rfc7489_6_6_3_step_3_only_non_dmarc_txt_at_the_from_domain_goes_to_the_org(
        org_zone):
    publish(org_zone, "www.example.org", "v=spf1 -all")
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert (outcome.policy_domain, outcome.disposition) == ("example.org", "reject")


async def test_rfc7489_6_1_a_record_split_into_several_strings_is_joined(org_zone):
    publish(org_zone, "example.org", ["v=DMARC1; p=re", "ject; rua=mailto:dmarc@exa",
                                      "mple.org"])
    outcome = await evaluator(org_zone).evaluate("example.org")
    assert outcome.disposition == "reject"
    assert outcome.record is not None and outcome.record.rua == ("mailto:dmarc@example.org",)


async def test_rfc7489_6_3_a_record_with_unknown_tags_still_applies(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; psd=n; t=n; x-future=1")
    outcome = await evaluator(org_zone).evaluate("example.org")
    assert (outcome.result, outcome.disposition) == ("fail", "reject")


async def test_rfc7489_6_6_3_step_6_invalid_p_with_valid_rua_is_evaluated_as_p_none(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=rejct; rua=mailto:dmarc@example.org")
    failing = await evaluator(org_zone).evaluate("example.org", [spf("example.net")])
    assert failing.result == "fail"
    assert (failing.policy, failing.disposition) == ("none", "none")
    assert "p=none" in (failing.reason or "")
    passing = await evaluator(org_zone).evaluate("example.org", [spf("example.org")])
    assert passing.result == "pass" and passing.disposition == "none"


async def test_rfc7489_6_6_3_step_6_invalid_p_without_rua_is_permerror_with_no_action(
        org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=rejct")
    outcome = await evaluator(org_zone).evaluate("example.org", [spf("example.net")])
    assert outcome.result == "permerror" and outcome.disposition == "none"


async def test_rfc7489_6_6_3_step_6_missing_p_does_not_fall_back_to_the_org_record(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    publish(org_zone, "www.example.org", "v=DMARC1; rua=mailto:d@example.org")
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert (outcome.result, outcome.policy_domain, outcome.disposition) == \
        ("fail", "www.example.org", "none")


async def test_rfc7489_6_6_3_step_6_invalid_sp_without_rua_is_permerror(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; sp=junk")
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert outcome.result == "permerror" and outcome.disposition == "none"


async def test_rfc9989_4_10_1_invalid_np_with_rua_reads_as_p_none(org_zone):
    publish(org_zone, "example.org",
            "v=DMARC1; p=reject; np=junk; rua=mailto:d@example.org")
    outcome = await evaluator(org_zone).evaluate("nx.example.org")
    assert (outcome.result, outcome.policy, outcome.disposition) == ("fail", "none", "none")


# ------------------------------------------------------------------ np, RFC 9091


async def test_rfc9091_np_reject_applies_to_a_non_existent_subdomain(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=none; sp=none; np=reject")
    outcome = await evaluator(org_zone).evaluate("nx.example.org", [spf("nx.example.org",
                                                                        "fail")])
    assert outcome.result == "fail"
    assert (outcome.policy_tag, outcome.policy, outcome.disposition) == ("np", "reject", "reject")


async def test_rfc9091_np_does_not_apply_to_an_existing_subdomain(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=none; sp=none; np=reject")
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert (outcome.policy_tag, outcome.disposition) == ("sp", "none")


async def test_rfc9091_np_does_not_apply_to_the_org_domain_itself(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=none; np=reject")
    outcome = await evaluator(org_zone).evaluate("example.org")
    assert (outcome.policy_tag, outcome.disposition) == ("p", "none")
    assert org_zone.count("example.org", "MX") == 0


async def test_rfc9091_nodata_for_a_aaaa_and_mx_is_non_existent_too(org_zone):
    org_zone.add("txtonly.example.org", "TXT", "v=spf1 -all")
    publish(org_zone, "example.org", "v=DMARC1; p=none; np=quarantine")
    outcome = await evaluator(org_zone).evaluate("txtonly.example.org")
    assert (outcome.policy_tag, outcome.disposition) == ("np", "quarantine")


@pytest.mark.parametrize("rdtype, value", [("A", "192.0.2.7"), ("AAAA", "2001:db8::7"),
                                           ("MX", "10 mx.example.net."), ("MX", "0 .")])
async def test_rfc9091_any_a_aaaa_or_mx_record_makes_the_subdomain_exist(org_zone, rdtype,
                                                                         value):
    org_zone.add("host.example.org", rdtype, value)
    publish(org_zone, "example.org", "v=DMARC1; p=none; sp=quarantine; np=reject")
    outcome = await evaluator(org_zone).evaluate("host.example.org")
    assert (outcome.policy_tag, outcome.disposition) == ("sp", "quarantine")


async def test_rfc9091_without_np_a_non_existent_subdomain_gets_sp_then_p(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; sp=quarantine")
    outcome = await evaluator(org_zone).evaluate("nx.example.org")
    assert (outcome.policy_tag, outcome.disposition) == ("sp", "quarantine")
    org_zone.remove("_dmarc.example.org")
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    outcome = await evaluator(org_zone).evaluate("nx2.example.org")
    assert (outcome.policy_tag, outcome.disposition) == ("p", "reject")
    # neither needed to know whether the name exists
    assert org_zone.count("nx.example.org") == 0 and org_zone.count("nx2.example.org") == 0


async def test_rfc9091_existence_is_not_asked_when_np_equals_the_subdomain_policy(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; sp=reject; np=reject")
    outcome = await evaluator(org_zone).evaluate("nx.example.org")
    assert outcome.disposition == "reject"
    assert org_zone.count("nx.example.org") == 0


async def test_rfc9091_existence_is_not_asked_for_a_pass(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=none; np=reject")
    outcome = await evaluator(org_zone).evaluate("nx.example.org", [],
                                                 [dkim("example.org")])
    assert outcome.result == "pass" and outcome.disposition == "none"
    assert org_zone.count("nx.example.org") == 0


async def test_rfc9091_an_nxdomain_answer_is_conclusive_even_if_another_lookup_fails(
        org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=none; np=reject")
    org_zone.fail("nx.example.org", "SERVFAIL", rdtype="MX")
    outcome = await evaluator(org_zone).evaluate("nx.example.org")
    assert (outcome.result, outcome.policy_tag) == ("fail", "np")


async def test_rfc9091_nodata_with_a_failed_lookup_is_temperror(org_zone):
    org_zone.add("txtonly.example.org", "TXT", "v=spf1 -all")
    org_zone.fail("txtonly.example.org", "SERVFAIL", rdtype="MX")
    publish(org_zone, "example.org", "v=DMARC1; p=none; np=reject")
    outcome = await evaluator(org_zone).evaluate("txtonly.example.org")
    assert outcome.result == "temperror" and outcome.disposition == "none"


# ------------------------------------------------------------------ alignment, §3.1


async def test_rfc7489_6_6_2_dmarc_fails_without_an_aligned_pass(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    outcome = await evaluator(org_zone).evaluate(
        "example.org", [spf("example.net")], [dkim("example.net"), dkim("example.org", "fail")])
    assert outcome.result == "fail"
    assert not outcome.spf_aligned and not outcome.dkim_aligned


async def test_rfc7489_3_1_2_spf_relaxed_alignment_uses_the_organizational_domain(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    outcome = await evaluator(org_zone).evaluate("www.example.org",
                                                 [spf("bounces.example.org")])
    assert outcome.result == "pass" and outcome.spf_aligned and not outcome.dkim_aligned


async def test_rfc7489_3_1_2_spf_strict_alignment_needs_the_same_domain(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; aspf=s")
    subdomain = await evaluator(org_zone).evaluate("example.org", [spf("bounces.example.org")])
    assert subdomain.result == "fail" and not subdomain.spf_aligned
    same = await evaluator(org_zone).evaluate("example.org", [spf("example.org")])
    assert same.result == "pass" and same.spf_aligned


async def test_rfc7489_3_1_1_dkim_relaxed_alignment_uses_the_organizational_domain(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    outcome = await evaluator(org_zone).evaluate("www.example.org", [], [dkim("example.org")])
    assert outcome.result == "pass" and outcome.dkim_aligned


async def test_rfc7489_3_1_1_dkim_strict_alignment_needs_the_same_domain(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; adkim=s")
    parent = await evaluator(org_zone).evaluate("example.org", [], [dkim("mail.example.org")])
    assert parent.result == "fail" and not parent.dkim_aligned
    same = await evaluator(org_zone).evaluate("example.org", [], [dkim("example.org")])
    assert same.result == "pass"


async def test_rfc7489_3_1_1_any_passing_aligned_signature_suffices(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    outcome = await evaluator(org_zone).evaluate(
        "example.org", [spf("example.org", "softfail")],
        [dkim("example.org", "fail"), dkim("example.net"), dkim("example.org")])
    assert outcome.result == "pass" and outcome.dkim_aligned and not outcome.spf_aligned


@pytest.mark.parametrize("result", ["fail", "softfail", "neutral", "none", "temperror",
                                    "permerror"])
async def test_rfc7489_4_2_only_an_spf_pass_counts(org_zone, result):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    outcome = await evaluator(org_zone).evaluate("example.org", [spf("example.org", result)])
    assert outcome.result == "fail"


async def test_rfc7489_3_2_dkim_of_a_public_suffix_does_not_align_with_a_domain_below_it(
        dns_server):
    dns_server.zone("example.co.uk")
    publish(dns_server, "example.co.uk", "v=DMARC1; p=reject")
    suffix = await evaluator(dns_server).evaluate("mail.example.co.uk", [], [dkim("co.uk")])
    assert (suffix.result, suffix.disposition) == ("fail", "reject")
    assert suffix.org_domain == "example.co.uk" and not suffix.dkim_aligned
    org = await evaluator(dns_server).evaluate("mail.example.co.uk", [], [dkim("example.co.uk")])
    assert org.result == "pass"


async def test_rfc7489_3_2_an_unlisted_tld_like_test_has_a_two_label_org_domain(dns_server):
    dns_server.zone("example.test")
    publish(dns_server, "example.test", "v=DMARC1; p=quarantine")
    outcome = await evaluator(dns_server).evaluate("mail.example.test", [spf("example.test")])
    assert outcome.org_domain == "example.test"
    assert (outcome.result, outcome.policy_domain) == ("pass", "example.test")
    failing = await evaluator(dns_server).evaluate("mail.example.test", [spf("other.test")])
    assert (failing.result, failing.disposition) == ("fail", "quarantine")
    assert dns_server.count("_dmarc.test") == 0


async def test_rfc7489_3_1_domains_compare_without_case_and_final_dot(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; adkim=s; aspf=s")
    outcome = await evaluator(org_zone).evaluate(
        "Example.ORG.", *identifiers([AuthResult("dkim", "pass",
                                                 properties={"header.d": "EXAMPLE.org."})],
                                     null_sender=False))
    assert outcome.from_domain == "example.org"
    assert outcome.result == "pass" and outcome.dkim_aligned
    spf_only = await evaluator(org_zone).evaluate(
        "EXAMPLE.ORG", [spf("example.org")])
    assert spf_only.result == "pass"


async def test_an_author_domain_that_is_not_a_domain_is_permerror(org_zone):
    outcome = await evaluator(org_zone).evaluate("[192.0.2.1]")
    assert outcome.result == "permerror"


async def test_rfc7489_3_2_a_from_domain_that_is_a_public_suffix_is_its_own_org_domain(
        dns_server):
    dns_server.zone("co.uk")
    outcome = await evaluator(dns_server).evaluate("co.uk")
    assert outcome.result == "none" and outcome.org_domain == "co.uk"
    assert dns_server.count("_dmarc.co.uk") == 1


# ------------------------------------------------------------------ pct, §6.6.4


async def test_rfc7489_6_6_4_pct_0_lowers_reject_to_quarantine(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; pct=0")
    outcome = await evaluator(org_zone, sample=lambda pct: pytest.fail("no draw for pct=0")
                              ).evaluate("example.org")
    assert outcome.result == "fail"
    assert (outcome.policy, outcome.disposition, outcome.sampled_out) == \
        ("reject", "quarantine", True)


async def test_rfc7489_6_6_4_pct_0_lowers_quarantine_to_none(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=quarantine; pct=0")
    outcome = await evaluator(org_zone).evaluate("example.org")
    assert (outcome.disposition, outcome.sampled_out) == ("none", True)


async def test_rfc7489_6_6_4_pct_draws_whether_the_policy_applies(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; pct=30")
    draws: list[int] = []

    def sample(pct: int) -> bool:
        draws.append(pct)
        return len(draws) == 1

    ev = evaluator(org_zone, sample=sample)
    selected = await ev.evaluate("example.org")
    assert (selected.disposition, selected.sampled_out) == ("reject", False)
    skipped = await ev.evaluate("example.org")
    assert (skipped.disposition, skipped.sampled_out) == ("quarantine", True)
    assert draws == [30, 30]


async def test_rfc7489_6_6_4_pct_is_not_drawn_for_a_pass_or_for_p_none(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=none; pct=50")
    ev = evaluator(org_zone, sample=lambda pct: pytest.fail("no draw expected"))
    assert (await ev.evaluate("example.org")).disposition == "none"
    org_zone.remove("_dmarc.example.org")
    publish(org_zone, "example.org", "v=DMARC1; p=reject; pct=50")
    ev = evaluator(org_zone, sample=lambda pct: pytest.fail("no draw expected"))
    assert (await ev.evaluate("example.org", [spf("example.org")])).result == "pass"


async def test_rfc7489_6_6_4_the_default_draw_is_random_but_bounded(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject; pct=50")
    ev = evaluator(org_zone)
    seen = {(await ev.evaluate("example.org")).disposition for _ in range(60)}
    assert seen == {"reject", "quarantine"}


# ------------------------------------------------------------------ DNS failures, §6.6.3


@pytest.mark.parametrize("fault", FAULTS)
async def test_rfc7489_6_6_3_a_failed_policy_lookup_is_temperror_never_a_pass(org_zone, fault):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    org_zone.fail("_dmarc.example.org", fault)
    outcome = await evaluator(org_zone).evaluate("example.org", [spf("example.org")],
                                                 [dkim("example.org")])
    assert outcome.result == "temperror"
    assert outcome.disposition == "none" and outcome.record is None
    assert "DMARC policy lookup failed" in (outcome.reason or "")


@pytest.mark.parametrize("fault", FAULTS)
async def test_rfc7489_6_6_3_a_failed_org_domain_lookup_is_temperror(org_zone, fault):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    org_zone.fail("_dmarc.example.org", fault)
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert outcome.result == "temperror"
    assert org_zone.count("_dmarc.www.example.org") >= 1


@pytest.mark.parametrize("fault", FAULTS)
async def test_rfc7489_6_6_3_a_failed_from_domain_lookup_does_not_fall_back_to_the_org(
        org_zone, fault):
    publish(org_zone, "example.org", "v=DMARC1; p=none")
    org_zone.fail("_dmarc.www.example.org", fault)
    outcome = await evaluator(org_zone).evaluate("www.example.org")
    assert outcome.result == "temperror"
    assert org_zone.count("_dmarc.example.org") == 0


@pytest.mark.parametrize("fault", FAULTS)
async def test_rfc9091_a_failed_existence_lookup_is_temperror(org_zone, fault):
    publish(org_zone, "example.org", "v=DMARC1; p=none; sp=none; np=reject")
    org_zone.fail("nx.example.org", fault)
    outcome = await evaluator(org_zone).evaluate("nx.example.org")
    assert outcome.result == "temperror"
    assert outcome.disposition == "none"
    assert "RFC 9091" in (outcome.reason or "")


async def test_a_truncated_udp_answer_is_asked_again_over_tcp(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    org_zone.fail("_dmarc.example.org", "truncate")
    outcome = await evaluator(org_zone).evaluate("example.org")
    assert (outcome.result, outcome.disposition) == ("fail", "reject")
    assert org_zone.count("_dmarc.example.org", transport="tcp") == 1


@pytest.mark.parametrize("fault", ["timeout", "SERVFAIL", "garbage"])
async def test_rfc7489_6_6_3_truncated_over_udp_and_failing_over_tcp_is_temperror(org_zone,
                                                                                  fault):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    org_zone.fail("_dmarc.example.org", "truncate", transport="udp")
    org_zone.fail("_dmarc.example.org", fault, transport="tcp")
    outcome = await evaluator(org_zone).evaluate("example.org", [], [dkim("example.org")])
    assert outcome.result == "temperror"


@pytest.mark.parametrize("fault", ["timeout", "SERVFAIL", "garbage"])
async def test_rfc9091_existence_truncated_over_udp_and_failing_over_tcp_is_temperror(
        org_zone, fault):
    publish(org_zone, "example.org", "v=DMARC1; p=none; np=reject")
    org_zone.fail("nx.example.org", "truncate", transport="udp")
    org_zone.fail("nx.example.org", fault, transport="tcp")
    outcome = await evaluator(org_zone).evaluate("nx.example.org")
    assert outcome.result == "temperror"


async def test_rfc9091_existence_truncated_over_udp_is_answered_over_tcp(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=none; np=reject")
    org_zone.fail("nx.example.org", "truncate")
    outcome = await evaluator(org_zone).evaluate("nx.example.org")
    assert (outcome.result, outcome.policy_tag, outcome.disposition) == ("fail", "np", "reject")


# ------------------------------------------------------------------ identifiers


def test_rfc7489_3_1_2_the_spf_identifier_is_the_mail_from_domain():
    spf_ids, dkim_ids = identifiers([
        AuthResult("spf", "PASS", properties={"smtp.mailfrom": "bounce@Mail.Example.org",
                                              "smtp.helo": "mx.example.net"}),
        AuthResult("dkim", "pass", properties={"header.d": "example.org", "header.s": "s1"}),
        AuthResult("dkim", "fail", properties={"header.d": "example.net"}),
        AuthResult("dkim", "pass", properties={}),
        AuthResult("arc", "pass"),
    ], null_sender=False)
    assert spf_ids == [SpfIdentifier("mail.example.org", "pass", "mfrom")]
    assert dkim_ids == [DkimIdentifier("example.org", "pass", "s1"),
                        DkimIdentifier("example.net", "fail", "")]


def test_rfc7208_2_4_a_null_mail_from_makes_helo_the_spf_identifier():
    result = AuthResult("spf", "pass", properties={"smtp.mailfrom": "", "smtp.helo": "mx.example.org"})
    assert identifiers([result], null_sender=True)[0] == \
        [SpfIdentifier("mx.example.org", "pass", "helo")]
    # postmaster@<helo>, as RFC 7208 §2.4 builds it, reads the same way
    postmaster = AuthResult("spf", "pass", properties={"smtp.mailfrom": "postmaster@mx.example.org"})
    assert identifiers([postmaster], null_sender=True)[0][0].domain == "mx.example.org"


def test_rfc7489_4_1_a_helo_result_is_not_dmarc_s_identifier_for_a_real_mail_from():
    result = AuthResult("spf", "pass", properties={"smtp.helo": "mx.example.org"})
    assert identifiers([result], null_sender=False) == ([], [])


async def test_rfc7208_2_4_helo_identity_aligns_for_a_bounce(org_zone):
    publish(org_zone, "example.org", "v=DMARC1; p=reject")
    result = AuthResult("spf", "pass", properties={"smtp.helo": "mx.example.org"})
    spf_ids, dkim_ids = identifiers([result], null_sender=True)
    outcome = await evaluator(org_zone).evaluate("example.org", spf_ids, dkim_ids)
    assert outcome.result == "pass" and outcome.spf_aligned
