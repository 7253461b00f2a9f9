"""Domain names: normalization, the Organizational Domain (RFC 7489 §3.2), the Author
Domain (RFC 7489 §6.6.1)."""

from __future__ import annotations

import pytest

from elemta_dmarc.domains import (OrganizationalDomains, PSLError, author_domains,
                                  normalize_domain)

ORG = OrganizationalDomains()


@pytest.mark.parametrize("value, expected", [
    ("example.org", "example.org"),
    ("Example.ORG", "example.org"),
    ("example.org.", "example.org"),
    (" MAIL.Example.Org. ", "mail.example.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("localhost", "localhost"),
    ("_spf.example.org", "_spf.example.org"),
    ("", None),
    (".", None),
    ("[192.0.2.1]", None),
    ("192.0.2.1", None),
    ("a..b.example", None),
    (".example.org", None),
    ("exa mple.org", None),
    ("-bad.example", None),
    ("a" * 64 + ".example", None),
    (("a" * 60 + ".") * 5 + "example", None),
])
def test_domains_are_compared_as_lower_case_a_labels_without_the_final_dot(value, expected):
    assert normalize_domain(value) == expected


@pytest.mark.parametrize("domain, org", [
    ("example.com", "example.com"),
    ("a.b.example.com", "example.com"),
    ("mail.example.co.uk", "example.co.uk"),
    ("example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),                       # a public suffix is its own
    ("com", "com"),
    ("mail.example.test", "example.test"),    # unlisted TLD: the "*" rule
    ("example.test", "example.test"),
    ("deep.er.example.test", "example.test"),
    ("www.example.xn--p1ai", "example.xn--p1ai"),
])
def test_rfc7489_3_2_organizational_domain_is_the_public_suffix_plus_one_label(domain, org):
    assert ORG.of(domain) == org


def test_rfc7489_3_2_private_psl_entries_count_by_default():
    assert ORG.private
    assert ORG.of("alice.github.io") == "alice.github.io"
    assert ORG.of("www.alice.github.io") == "alice.github.io"
    icann_only = OrganizationalDomains(private=False)
    assert icann_only.of("alice.github.io") == "github.io"


def test_the_bundled_list_has_a_version():
    assert ORG.version != "unknown"


def test_a_psl_file_can_replace_the_bundled_list(tmp_path):
    psl = tmp_path / "psl.dat"
    psl.write_text("// ===BEGIN ICANN DOMAINS===\ncom\nuk\nco.uk\nexample\n"
                   "// ===END ICANN DOMAINS===\n// ===BEGIN PRIVATE DOMAINS===\n"
                   "hosted.example\n// ===END PRIVATE DOMAINS===\n")
    org = OrganizationalDomains(path=psl)
    assert org.of("a.b.hosted.example") == "b.hosted.example"
    assert OrganizationalDomains(path=psl, private=False).of("a.b.hosted.example") \
        == "hosted.example"


def test_a_missing_psl_file_says_what_to_do(tmp_path):
    with pytest.raises(PSLError, match="cannot read the Public Suffix List .*public_suffix_list"):
        OrganizationalDomains(path=tmp_path / "nope.dat")


def test_a_file_that_is_not_the_psl_is_refused(tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_text("hello\nworld\n")
    with pytest.raises(PSLError, match="does not look like the Public Suffix List"):
        OrganizationalDomains(path=junk)


def test_icann_only_needs_the_section_markers(tmp_path):
    bare = tmp_path / "bare.dat"
    bare.write_text("com\nuk\nco.uk\n")
    assert OrganizationalDomains(path=bare).of("x.example.co.uk") == "example.co.uk"
    with pytest.raises(PSLError, match="ICANN DOMAINS"):
        OrganizationalDomains(path=bare, private=False)


# ------------------------------------------------------------------ RFC 7489 §6.6.1


@pytest.mark.parametrize("fields, domain", [
    (["alice@example.org"], "example.org"),
    (['"Alice" <alice@Example.ORG.>'], "example.org"),
    (["=?utf-8?q?Al=C3=AFce?= <alice@example.org>"], "example.org"),
    (['"bob@bank.example" <alice@example.org>'], "example.org"),
    (["alice@example.org (comment)"], "example.org"),
    (["alice@bücher.example"], "xn--bcher-kva.example"),
    (["a@example.org, b@EXAMPLE.org"], "example.org"),   # several mailboxes, one domain
])
def test_rfc7489_6_6_1_the_author_domain_is_the_domain_of_the_from_address(fields, domain):
    authors = author_domains(fields)
    assert authors.problem is None
    assert authors.single == domain


def test_rfc7489_6_6_1_no_from_field_is_a_problem():
    authors = author_domains([])
    assert authors.problem == "the message has no From: header field"
    assert authors.domains == () and authors.single is None


def test_rfc7489_6_6_1_two_from_fields_are_a_problem_even_in_one_domain():
    authors = author_domains(["a@example.org", "b@example.org"])
    assert authors.problem == "the message has 2 From: header fields"
    assert authors.domains == ("example.org",)


def test_rfc7489_6_6_1_addresses_in_several_domains_are_a_problem():
    authors = author_domains(["a@example.org, b@example.net"])
    assert authors.problem is not None and "2 domains" in authors.problem
    assert authors.domains == ("example.org", "example.net")


@pytest.mark.parametrize("value", ["", "undisclosed-recipients:;", "<>", "alice",
                                   "alice@", "@example.org", "a@b@c.example",
                                   "alice@[192.0.2.1]"])
def test_rfc7489_6_6_1_a_from_without_a_usable_domain_is_a_problem(value):
    authors = author_domains([value])
    assert authors.problem is not None
    assert authors.single is None


def test_rfc7489_6_6_1_an_unusable_address_next_to_a_good_one_is_a_problem():
    authors = author_domains(["alice@example.org, garbage"])
    assert authors.problem is not None and "garbage" in authors.problem
    assert authors.domains == ("example.org",)


def test_the_usual_from_fields_read_as_the_email_parser_reads_them():
    """The fast reading of "Name <a@b>" and "a@b" gives what getaddresses gives, and
    anything else still goes to getaddresses."""
    import random
    from email.utils import getaddresses

    from elemta_dmarc.domains import _SIMPLE_FROM

    rng = random.Random(7489)
    chars = list("aZ09 \t.-+=?'_\"(),;:\\<>@[]") + ["é", "=?utf-8?q?x?=", ".."]

    def word(n):
        return "".join(rng.choice(chars) if rng.random() < 0.3 else rng.choice("abcXY")
                       for _ in range(rng.randrange(n)))

    matched = 0
    for _ in range(30000):
        address = f"{word(6)}@{word(6)}"
        value = rng.choice([f"{word(8)}<{address}>{word(2)}", address,
                            f" {address} ", f"{word(3)} <{address}>"])
        m = _SIMPLE_FROM.fullmatch(value)
        if m is None:
            continue
        matched += 1
        assert [a for _, a in getaddresses([value])] == [m.group(1) or m.group(2)], value
    assert matched > 300
    for value in ["Sender <sender@example.org>", "sender@example.org", " <a@b.example> ",
                  "Dr. Who <who@example.org>", '"a@evil.example" <b@good.example>',
                  "a@b.example, c@d.example", "(comment) a@b.example"]:
        m = _SIMPLE_FROM.fullmatch(value)
        if m is not None:
            assert [a for _, a in getaddresses([value])] == [m.group(1) or m.group(2)]
    assert _SIMPLE_FROM.fullmatch('"a@evil.example" <b@good.example>') is None
    assert _SIMPLE_FROM.fullmatch("a@b.example, c@d.example") is None
