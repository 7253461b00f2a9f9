"""The DMARC record parser: RFC 7489 §6.3 (tags), §6.4 (grammar), §6.6.3 step 6 (broken
policies), RFC 9989 §4.10.1 (an invalid np counts like an invalid sp)."""

from __future__ import annotations

import pytest

from elemta_dmarc.record import parse_record, stricter, weaker


def test_rfc7489_6_3_a_minimal_record_has_the_defaults():
    record = parse_record("v=DMARC1; p=reject")
    assert record is not None
    assert (record.p, record.sp, record.np, record.pct) == ("reject", None, None, 100)
    assert (record.adkim, record.aspf, record.rua, record.ri, record.fo) == \
        ("r", "r", (), 86400, "0")
    assert record.problems == () and record.usable == "yes"


@pytest.mark.parametrize("text", [
    "p=reject; v=DMARC1",              # v is not the first tag
    "v=DMARC2; p=reject",              # another version
    "v=dmarc1; p=reject",              # DMARC1 is case-sensitive (%x44 %x4d ...)
    "v=DMARC1p=reject",                # no separator: the v value is "DMARC1p=reject"
    "v=spf1 -all",
    "DMARC1; p=reject",
    "",
])
def test_rfc7489_6_6_3_step_2_records_not_starting_with_v_dmarc1_are_discarded(text):
    assert parse_record(text) is None


@pytest.mark.parametrize("text", [
    "V=DMARC1; P=Reject",                      # tag names and keywords: ABNF quoted strings
    "v = DMARC1 ;\tp = reject ;",              # *WSP around "=" and ";", a final ";"
    "v=DMARC1;p=reject;;",
])
def test_rfc7489_6_4_grammar_allows_whitespace_case_and_a_final_separator(text):
    record = parse_record(text)
    assert record is not None and record.p == "reject"


def test_rfc7489_6_3_unknown_tags_are_ignored():
    record = parse_record("v=DMARC1; p=quarantine; future=yes; t=y; psd=n")
    assert record is not None
    assert record.p == "quarantine" and record.problems == () and record.usable == "yes"


def test_rfc7489_6_3_every_tag_is_read():
    record = parse_record("v=DMARC1; p=none; sp=quarantine; np=reject; pct=20; adkim=s; "
                          "aspf=S; rua=mailto:agg@example.org,mailto:x@example.net!10m; "
                          "ruf=mailto:f@example.org; ri=3600; fo=1:d; rf=afrf")
    assert record is not None
    assert (record.p, record.sp, record.np, record.pct) == ("none", "quarantine", "reject", 20)
    assert (record.adkim, record.aspf, record.ri, record.fo, record.rf) == \
        ("s", "s", 3600, "1:d", "afrf")
    assert record.rua == ("mailto:agg@example.org", "mailto:x@example.net!10m")
    assert record.ruf == ("mailto:f@example.org",)
    assert record.problems == ()


@pytest.mark.parametrize("text, p", [
    ("v=DMARC1; p=bogus", None),
    ("v=DMARC1; sp=reject", None),
    ("v=DMARC1; p=", None),
])
def test_rfc7489_6_6_3_step_6_an_invalid_p_without_rua_means_no_processing(text, p):
    record = parse_record(text)
    assert record is not None and record.p is p
    assert record.usable == "no"
    assert record.problems


def test_rfc7489_6_6_3_step_6_an_invalid_p_with_a_valid_rua_reads_as_p_none():
    record = parse_record("v=DMARC1; p=rejekt; rua=mailto:dmarc@example.org")
    assert record is not None and record.usable == "as-none"


def test_rfc7489_6_6_3_step_6_an_invalid_sp_counts_like_an_invalid_p():
    assert parse_record("v=DMARC1; p=reject; sp=maybe").usable == "no"
    assert parse_record("v=DMARC1; p=reject; sp=maybe; rua=mailto:a@example.org").usable \
        == "as-none"


def test_rfc9989_4_10_1_an_invalid_np_counts_like_an_invalid_sp():
    record = parse_record("v=DMARC1; p=reject; np=sometimes")
    assert record is not None and record.np is None and record.np_invalid
    assert record.usable == "no"
    assert parse_record("v=DMARC1; p=reject; np=x; rua=mailto:a@example.org").usable \
        == "as-none"


def test_rfc7489_6_6_3_step_6_a_rua_with_only_invalid_uris_is_no_valid_rua():
    record = parse_record("v=DMARC1; p=bad; rua=not a uri, also-not")
    assert record is not None and record.rua == () and record.usable == "no"
    assert any("rua" in problem for problem in record.problems)


@pytest.mark.parametrize("pct", ["101", "-1", "50%", "abc", "1000", ""])
def test_rfc7489_6_3_an_invalid_pct_is_ignored_and_100_applies(pct):
    record = parse_record(f"v=DMARC1; p=reject; pct={pct}")
    assert record is not None and record.pct == 100 and record.usable == "yes"
    assert any("pct" in problem for problem in record.problems)


def test_rfc7489_6_3_pct_0_and_pct_100_are_valid():
    assert parse_record("v=DMARC1; p=reject; pct=0").pct == 0
    assert parse_record("v=DMARC1; p=reject; pct=100").pct == 100


def test_rfc7489_6_3_invalid_alignment_modes_mean_relaxed():
    record = parse_record("v=DMARC1; p=reject; adkim=x; aspf=strict")
    assert record is not None and (record.adkim, record.aspf) == ("r", "r")
    assert len(record.problems) == 2


def test_a_tag_given_twice_keeps_its_first_value():
    record = parse_record("v=DMARC1; p=none; p=reject")
    assert record is not None and record.p == "none"
    assert any("twice" in problem for problem in record.problems)


def test_a_part_without_equals_sign_is_a_problem_not_a_failure():
    record = parse_record("v=DMARC1; p=reject; garbage")
    assert record is not None and record.p == "reject" and record.usable == "yes"
    assert record.problems


def test_rfc7489_6_3_pct_downgrade_goes_one_step():
    assert weaker("reject") == "quarantine"
    assert weaker("quarantine") == "none"
    assert weaker("none") == "none"
    assert stricter("none", "reject") == "reject"
    assert stricter("quarantine", "none") == "quarantine"
