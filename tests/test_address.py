"""MAIL and RCPT argument parsing, case by case against RFC 5321 §4.1.2 and RFC 6531."""

from __future__ import annotations

import string
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elemta.smtp.address import (
    PathError,
    is_postmaster,
    parse_mail_from,
    parse_rcpt_to,
    split_address,
)

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"


def label(n: int, ch: str = "a") -> str:
    return ch * n


def domain_of(octets: int) -> str:
    """A valid domain of exactly ``octets`` characters, in labels of at most 63."""
    labels = []
    left = octets
    while left > 0:
        size = min(63, left)
        if size < left and left - size == 1:
            size -= 1  # never leave room for only the dot
        labels.append(label(size, "d"))
        left -= size + 1
    result = ".".join(labels)
    assert len(result) == octets
    return result


def mail_error(arg: str | None, *, utf8: bool = False) -> PathError:
    with pytest.raises(PathError) as info:
        parse_mail_from(arg, smtputf8_allowed=utf8)
    return info.value


def rcpt_error(arg: str | None, *, utf8: bool = False) -> PathError:
    with pytest.raises(PathError) as info:
        parse_rcpt_to(arg, smtputf8_allowed=utf8)
    return info.value


# --- accepted --------------------------------------------------------------------

VALID_MAIL = [
    pytest.param("FROM:<user@example.com>", ("user@example.com", {}, False), id="simple"),
    pytest.param("from:<user@example.com>", ("user@example.com", {}, False), id="verb-case-insensitive"),
    pytest.param("FROM: <user@example.com>", ("user@example.com", {}, False), id="one-space-after-colon"),
    pytest.param("FROM:<>", ("", {}, False), id="null-reverse-path"),
    pytest.param("FROM:<> SIZE=0", ("", {"SIZE": "0"}, False), id="null-reverse-path-with-params"),
    pytest.param("FROM:<User.Name@Example.COM>", ("User.Name@Example.COM", {}, False), id="case-preserved"),
    pytest.param(
        "FROM:<a@b.c> SIZE=100 BODY=8BITMIME",
        ("a@b.c", {"SIZE": "100", "BODY": "8BITMIME"}, False),
        id="params-with-values",
    ),
    pytest.param(
        "FROM:<a@b.c> size=100 smtputf8",
        ("a@b.c", {"SIZE": "100", "SMTPUTF8": None}, False),
        id="keywords-upper-cased-value-less-keyword",
    ),
    pytest.param(
        "FROM:<a@b.c>  SIZE=1   BODY=7BIT",
        ("a@b.c", {"SIZE": "1", "BODY": "7BIT"}, False),
        id="runs-of-spaces-between-params",
    ),
    pytest.param("FROM:<a@b.c> junk junk2", ("a@b.c", {"JUNK": None, "JUNK2": None}, False), id="junk-is-params"),
    pytest.param(
        "FROM:<a@b.c> ENVID=QQ+2Bx<y>",
        ("a@b.c", {"ENVID": "QQ+2Bx<y>"}, False),
        id="value-any-printable-but-equals",
    ),
    pytest.param("FROM:<a@b.c> X-Y-Z=1", ("a@b.c", {"X-Y-Z": "1"}, False), id="keyword-with-hyphens"),
    pytest.param(
        "FROM:<@relay.example,@other.example:user@example.com>",
        ("user@example.com", {}, False),
        id="source-route-discarded",
    ),
    pytest.param("FROM:<@relay.example:u@x.y> SIZE=1", ("u@x.y", {"SIZE": "1"}, False), id="source-route-params"),
    pytest.param('FROM:<"john doe"@example.com>', ('"john doe"@example.com', {}, False), id="quoted-with-space"),
    pytest.param(
        r'FROM:<"say \"hi\""@example.com>', (r'"say \"hi\""@example.com', {}, False), id="quoted-escaped-quotes"
    ),
    pytest.param(r'FROM:<"a\\b"@example.com>', (r'"a\\b"@example.com', {}, False), id="quoted-escaped-backslash"),
    pytest.param('FROM:<"a>b"@example.com> X=1', ('"a>b"@example.com', {"X": "1"}, False), id="quoted-bracket"),
    pytest.param('FROM:<"a@b"@example.com>', ('"a@b"@example.com', {}, False), id="quoted-at-sign"),
    pytest.param('FROM:<"a<b"@example.com>', ('"a<b"@example.com', {}, False), id="quoted-less-than"),
    pytest.param('FROM:<""@example.com>', ('""@example.com', {}, False), id="quoted-empty"),
    pytest.param("FROM:<a@[192.0.2.1]>", ("a@[192.0.2.1]", {}, False), id="ipv4-literal"),
    pytest.param("FROM:<a@[IPv6:2001:db8::1]>", ("a@[IPv6:2001:db8::1]", {}, False), id="ipv6-literal"),
    pytest.param("FROM:<a@[ipv6:2001:DB8::1]>", ("a@[ipv6:2001:DB8::1]", {}, False), id="ipv6-tag-case-insensitive"),
    pytest.param(
        "FROM:<a@[IPv6:::ffff:192.0.2.1]>", ("a@[IPv6:::ffff:192.0.2.1]", {}, False), id="ipv6v4-literal"
    ),
    pytest.param("FROM:<a@localhost>", ("a@localhost", {}, False), id="single-label-domain"),
    pytest.param("FROM:<a@123.example>", ("a@123.example", {}, False), id="numeric-label"),
    pytest.param("FROM:<a@x-y.example>", ("a@x-y.example", {}, False), id="hyphen-inside-label"),
    pytest.param(f"FROM:<{ATEXT[:40]}@example.com>", (f"{ATEXT[:40]}@example.com", {}, False), id="atext-1"),
    pytest.param(f"FROM:<{ATEXT[40:]}@example.com>", (f"{ATEXT[40:]}@example.com", {}, False), id="atext-2"),
]


@pytest.mark.parametrize(("arg", "expected"), VALID_MAIL)
def test_mail_from_accepts(arg: str, expected: tuple) -> None:
    assert parse_mail_from(arg, smtputf8_allowed=False) == expected


VALID_RCPT = [
    pytest.param("TO:<user@example.com>", ("user@example.com", {}, False), id="simple"),
    pytest.param("to: <user@example.com>", ("user@example.com", {}, False), id="one-space-after-colon"),
    pytest.param("TO:<a@b.c> NOTIFY=NEVER", ("a@b.c", {"NOTIFY": "NEVER"}, False), id="param"),
    pytest.param(
        "TO:<a@b.c> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b.c",
        ("a@b.c", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b.c"}, False),
        id="dsn-params",
    ),
    pytest.param("TO:<Postmaster>", ("Postmaster", {}, False), id="postmaster-without-domain"),
    pytest.param("TO:<postmaster>", ("Postmaster", {}, False), id="postmaster-lower-case"),
    pytest.param("TO:<POSTMASTER> NOTIFY=NEVER", ("Postmaster", {"NOTIFY": "NEVER"}, False), id="postmaster-params"),
    pytest.param("TO:<postmaster@example.com>", ("postmaster@example.com", {}, False), id="postmaster-with-domain"),
    pytest.param("TO:<@a.example:u@b.example>", ("u@b.example", {}, False), id="source-route-discarded"),
]


@pytest.mark.parametrize(("arg", "expected"), VALID_RCPT)
def test_rcpt_to_accepts(arg: str, expected: tuple) -> None:
    assert parse_rcpt_to(arg, smtputf8_allowed=False) == expected


# --- RFC 6531: UTF-8 addresses ---------------------------------------------------

VALID_UTF8 = [
    pytest.param("δοκιμή@παράδειγμα.δοκιμή", id="greek"),
    pytest.param("用户@例子.广告", id="chinese"),
    pytest.param("jörg@bücher.example", id="latin"),
    pytest.param("ü@[192.0.2.1]", id="utf8-local-ipv4-literal"),
    pytest.param('"jö rg"@example.com', id="utf8-quoted"),
    pytest.param("📧@example.com", id="astral-plane"),
]


@pytest.mark.parametrize("address", VALID_UTF8)
def test_rcpt_to_utf8_address_accepted_with_smtputf8(address: str) -> None:
    assert parse_rcpt_to(f"TO:<{address}>", smtputf8_allowed=True) == (address, {}, True)


@pytest.mark.parametrize("address", VALID_UTF8)
def test_mail_from_utf8_address_accepted_with_smtputf8_param(address: str) -> None:
    assert parse_mail_from(f"FROM:<{address}> SMTPUTF8", smtputf8_allowed=True) == (
        address,
        {"SMTPUTF8": None},
        True,
    )


@pytest.mark.parametrize("address", VALID_UTF8)
def test_rcpt_to_utf8_address_without_smtputf8_is_553_5_6_7(address: str) -> None:
    e = rcpt_error(f"TO:<{address}>")
    assert (e.code, e.enhanced, e.text) == (553, "5.6.7", "non-ASCII address requires SMTPUTF8")


def test_mail_from_utf8_address_without_smtputf8_param_is_refused_even_if_server_allows() -> None:
    e = mail_error("FROM:<jörg@example.com>", utf8=True)
    assert (e.code, e.enhanced) == (553, "5.6.7")


def test_mail_from_utf8_address_when_server_does_not_advertise_is_refused() -> None:
    e = mail_error("FROM:<jörg@example.com> SMTPUTF8", utf8=False)
    assert (e.code, e.enhanced) == (553, "5.6.7")


def test_ascii_address_reports_no_utf8_even_when_allowed() -> None:
    assert parse_rcpt_to("TO:<a@b.c>", smtputf8_allowed=True) == ("a@b.c", {}, False)


def test_utf8_parameter_value_needs_smtputf8() -> None:
    assert parse_rcpt_to("TO:<a@b.c> ORCPT=utf-8;jörg@x", smtputf8_allowed=True)[1] == {"ORCPT": "utf-8;jörg@x"}
    e = rcpt_error("TO:<a@b.c> ORCPT=utf-8;jörg@x")
    assert (e.code, e.enhanced, e.text) == (553, "5.6.7", "non-ASCII parameter requires SMTPUTF8")
    e = mail_error("FROM:<a@b.c> ENVID=jörg", utf8=True)
    assert (e.code, e.enhanced) == (553, "5.6.7")
    assert parse_mail_from("FROM:<a@b.c> ENVID=jörg SMTPUTF8", smtputf8_allowed=True)[1]["ENVID"] == "jörg"


@pytest.mark.parametrize(
    "char",
    [
        pytest.param("\x85", id="C1-control-NEL"),
        pytest.param("\x9f", id="C1-control"),
        pytest.param("\xa0", id="no-break-space"),
        pytest.param("\u2003", id="em-space"),
        pytest.param("\u2028", id="line-separator"),
        pytest.param("\u3000", id="ideographic-space"),
        pytest.param("\udcff", id="lone-surrogate-from-invalid-utf8"),
    ],
)
def test_utf8_controls_spaces_and_surrogates_are_refused(char: str) -> None:
    for address in (f"a{char}b@example.com", f"ab@exa{char}mple.com", f'"a{char}b"@example.com'):
        e = rcpt_error(f"TO:<{address}>", utf8=True)
        assert (e.code, e.enhanced) == (553, "5.1.3"), address


# --- rejected --------------------------------------------------------------------

MAIL_SYNTAX = (501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = (501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_PARAM = (501, "5.5.4", "bad parameter syntax")

REJECTED_MAIL = [
    pytest.param(None, MAIL_SYNTAX, id="no-argument"),
    pytest.param("", MAIL_SYNTAX, id="empty-argument"),
    pytest.param("<a@b.c>", MAIL_SYNTAX, id="missing-FROM"),
    pytest.param("TO:<a@b.c>", MAIL_SYNTAX, id="wrong-keyword"),
    pytest.param("FROM <a@b.c>", MAIL_SYNTAX, id="missing-colon"),
    pytest.param("FROM:a@b.c", MAIL_SYNTAX, id="missing-brackets"),
    pytest.param("FROM:<a@b.c", MAIL_SYNTAX, id="missing-closing-bracket"),
    pytest.param("FROM:  <a@b.c>", MAIL_SYNTAX, id="two-spaces-after-colon"),
    pytest.param("FROM:\t<a@b.c>", MAIL_SYNTAX, id="tab-after-colon"),
    pytest.param("FROM:<a@b.c>SIZE=1", MAIL_SYNTAX, id="param-glued-to-bracket"),
    pytest.param("FROM:<a@b.c>\r", MAIL_SYNTAX, id="carriage-return-after-bracket"),
    pytest.param("FROM:<a@b.c> SIZE=", BAD_PARAM, id="empty-value"),
    pytest.param("FROM:<a@b.c> =1", BAD_PARAM, id="empty-keyword"),
    pytest.param("FROM:<a@b.c> -X=1", BAD_PARAM, id="keyword-starts-with-hyphen"),
    pytest.param("FROM:<a@b.c> X_Y=1", BAD_PARAM, id="underscore-in-keyword"),
    pytest.param("FROM:<a@b.c> X=1=2", BAD_PARAM, id="equals-in-value"),
    pytest.param("FROM:<a@b.c> X=a\x00", BAD_PARAM, id="nul-in-value"),
    pytest.param("FROM:<a@b.c> SIZE=1\tBODY=7BIT", BAD_PARAM, id="tab-between-params"),
    pytest.param("FROM:<a@b.c> SIZE=1 size=2", (501, "5.5.4", "duplicate parameter SIZE"), id="duplicate-param"),
    pytest.param("FROM:<a>", (553, "5.1.7", "bad sender address: no domain"), id="no-domain"),
    pytest.param("FROM:<Postmaster>", (553, "5.1.7", "bad sender address: no domain"), id="postmaster-only-rcpt"),
    pytest.param("FROM:<@b.c>", (553, "5.1.7", "bad sender address: invalid source route"), id="route-only"),
    pytest.param("FROM:<@b.c:>", (553, "5.1.7", "bad sender address: missing mailbox"), id="route-no-mailbox"),
    pytest.param(
        "FROM:<@[192.0.2.1]:a@b.c>", (553, "5.1.7", "bad sender address: invalid source route"), id="route-literal"
    ),
    pytest.param(
        "FROM:<@a.b;@c.d:a@b.c>", (553, "5.1.7", "bad sender address: invalid source route"), id="route-separator"
    ),
]


@pytest.mark.parametrize(("arg", "expected"), REJECTED_MAIL)
def test_mail_from_rejects(arg: str | None, expected: tuple[int, str, str]) -> None:
    e = mail_error(arg)
    assert (e.code, e.enhanced, e.text) == expected
    assert str(e.reply()) == "{} {} {}".format(*expected)


REJECTED_RCPT = [
    pytest.param(None, RCPT_SYNTAX, id="no-argument"),
    pytest.param("FROM:<a@b.c>", RCPT_SYNTAX, id="wrong-keyword"),
    pytest.param("TO:a@b.c", RCPT_SYNTAX, id="missing-brackets"),
    pytest.param("TO:<a@b.c", RCPT_SYNTAX, id="missing-closing-bracket"),
    pytest.param('TO:<"a>b"@c', RCPT_SYNTAX, id="bracket-inside-quotes-does-not-close"),
    pytest.param("TO:<>", (553, "5.1.3", "bad recipient address: null path not allowed"), id="null-path"),
    pytest.param("TO:<a>", (553, "5.1.3", "bad recipient address: no domain"), id="no-domain"),
    pytest.param("TO:<@x.y:Postmaster>", (553, "5.1.3", "bad recipient address: no domain"), id="routed-postmaster"),
    pytest.param('TO:<"Postmaster">', (553, "5.1.3", "bad recipient address: no domain"), id="quoted-postmaster"),
    pytest.param("TO:<a@b.c> X=", BAD_PARAM, id="empty-value"),
]


@pytest.mark.parametrize(("arg", "expected"), REJECTED_RCPT)
def test_rcpt_to_rejects(arg: str | None, expected: tuple[int, str, str]) -> None:
    e = rcpt_error(arg)
    assert (e.code, e.enhanced, e.text) == expected


# Mailbox syntax problems, each refused as "553 5.1.3" in RCPT and "553 5.1.7" in MAIL.
BAD_MAILBOXES = [
    pytest.param(".a@b.c", "invalid local part", id="leading-dot"),
    pytest.param("a.@b.c", "invalid local part", id="trailing-dot"),
    pytest.param("a..b@b.c", "invalid local part", id="double-dot"),
    pytest.param("a b@b.c", "invalid local part", id="space-unquoted"),
    pytest.param("a\x00b@b.c", "invalid local part", id="nul"),
    pytest.param("a\tb@b.c", "invalid local part", id="tab"),
    pytest.param("a\x7fb@b.c", "invalid local part", id="del"),
    pytest.param("a<b@b.c", "invalid local part", id="less-than"),
    pytest.param("a(b)@b.c", "invalid local part", id="parentheses"),
    pytest.param("a,b@b.c", "invalid local part", id="comma"),
    pytest.param("a@b@b.c", "invalid local part", id="two-at-signs"),
    pytest.param('a"b@b.c', "invalid local part", id="stray-quote"),
    pytest.param('"a"b@b.c', "invalid local part", id="text-after-quoted"),
    pytest.param('"a\x00"@b.c', "invalid local part", id="nul-in-quotes"),
    pytest.param('"a\\\x00"@b.c', "invalid local part", id="quoted-pair-nul"),
    pytest.param('"a"', "no domain", id="quoted-no-domain"),
    pytest.param("@b.c@d.e", "invalid source route", id="at-first"),
    pytest.param("a@", "invalid domain", id="empty-domain"),
    pytest.param("a@b.c.", "invalid domain", id="trailing-dot-domain"),
    pytest.param("a@.b.c", "invalid domain", id="leading-dot-domain"),
    pytest.param("a@b..c", "invalid domain", id="empty-label"),
    pytest.param("a@-b.c", "invalid domain", id="label-leading-hyphen"),
    pytest.param("a@b-.c", "invalid domain", id="label-trailing-hyphen"),
    pytest.param("a@b_c.d", "invalid domain", id="underscore"),
    pytest.param("a@b c.d", "invalid domain", id="space-in-domain"),
    pytest.param("a@b.c\x00", "invalid domain", id="nul-in-domain"),
    pytest.param("a@[192.0.2.256]", "invalid address literal", id="ipv4-octet-too-big"),
    pytest.param("a@[192.0.2]", "invalid address literal", id="ipv4-three-octets"),
    pytest.param("a@[192.0.2.1", "invalid address literal", id="literal-unclosed"),
    pytest.param("a@[IPv6:2001:db8::g]", "invalid address literal", id="ipv6-bad-hex"),
    pytest.param("a@[IPv6:fe80::1%eth0]", "invalid address literal", id="ipv6-zone"),
    pytest.param("a@[IPv6:192.0.2.1]", "invalid address literal", id="ipv6-tag-with-ipv4"),
    pytest.param("a@[2001:db8::1]", "unsupported address literal", id="ipv6-without-tag"),
    pytest.param("a@[x-400:c=us;a=;p=x]", "unsupported address literal", id="general-literal"),
    pytest.param("a@[]", "invalid address literal", id="empty-literal"),
]


@pytest.mark.parametrize(("mailbox", "reason"), BAD_MAILBOXES)
def test_bad_mailbox_is_553_5_1_3_for_recipient(mailbox: str, reason: str) -> None:
    e = rcpt_error(f"TO:<{mailbox}>")
    assert (e.code, e.enhanced, e.text) == (553, "5.1.3", f"bad recipient address: {reason}")


@pytest.mark.parametrize(("mailbox", "reason"), BAD_MAILBOXES)
def test_bad_mailbox_is_553_5_1_7_for_sender(mailbox: str, reason: str) -> None:
    e = mail_error(f"FROM:<{mailbox}>")
    assert (e.code, e.enhanced, e.text) == (553, "5.1.7", f"bad sender address: {reason}")


# --- RFC 5321 §4.5.3.1 size limits -----------------------------------------------


def test_local_part_of_64_octets_is_accepted_and_65_refused() -> None:
    assert parse_rcpt_to(f"TO:<{'l' * 64}@b.c>", smtputf8_allowed=False)[0] == f"{'l' * 64}@b.c"
    e = rcpt_error(f"TO:<{'l' * 65}@b.c>")
    assert (e.code, e.enhanced, e.text) == (553, "5.1.3", "bad recipient address: local part exceeds 64 octets")
    e = mail_error(f"FROM:<{'l' * 65}@b.c>")
    assert (e.code, e.enhanced) == (553, "5.1.7")


def test_quoted_local_part_counts_its_quotes() -> None:
    assert parse_rcpt_to(f'TO:<"{"q" * 62}"@b.c>', smtputf8_allowed=False)
    e = rcpt_error(f'TO:<"{"q" * 63}"@b.c>')
    assert "64 octets" in e.text


def test_utf8_local_part_is_counted_in_octets() -> None:
    # "é" is two octets in UTF-8: 32 of them fill the 64-octet limit.
    assert parse_rcpt_to(f"TO:<{'é' * 32}@b.c>", smtputf8_allowed=True)[2] is True
    e = rcpt_error(f"TO:<{'é' * 33}@b.c>", utf8=True)
    assert (e.code, e.enhanced, e.text) == (553, "5.1.3", "bad recipient address: local part exceeds 64 octets")


def test_address_of_254_octets_is_accepted_and_255_refused() -> None:
    ok = f"{'l' * 64}@{domain_of(189)}"
    assert len(ok) == 254
    assert parse_rcpt_to(f"TO:<{ok}>", smtputf8_allowed=False)[0] == ok
    too_long = f"{'l' * 64}@{domain_of(190)}"
    e = rcpt_error(f"TO:<{too_long}>")
    assert (e.code, e.enhanced, e.text) == (553, "5.1.3", "bad recipient address: address exceeds 254 octets")
    e = mail_error(f"FROM:<{too_long}>")
    assert (e.code, e.enhanced, e.text) == (553, "5.1.7", "bad sender address: address exceeds 254 octets")


def test_utf8_address_is_counted_in_octets() -> None:
    ok = f"{'é' * 32}@{domain_of(189)}"
    assert len(ok.encode()) == 254
    assert parse_rcpt_to(f"TO:<{ok}>", smtputf8_allowed=True)[0] == ok
    e = rcpt_error(f"TO:<{'é' * 32}@ü.{domain_of(187)}>", utf8=True)
    assert e.text == "bad recipient address: address exceeds 254 octets"


def test_source_route_does_not_count_towards_the_address_length() -> None:
    ok = f"{'l' * 64}@{domain_of(189)}"
    assert parse_rcpt_to(f"TO:<@{domain_of(100)}:{ok}>", smtputf8_allowed=False)[0] == ok


def test_label_of_63_characters_is_accepted_and_64_refused() -> None:
    assert parse_rcpt_to(f"TO:<a@{'x' * 63}.example>", smtputf8_allowed=False)
    e = rcpt_error(f"TO:<a@{'x' * 64}.example>")
    assert (e.code, e.enhanced, e.text) == (553, "5.1.3", "bad recipient address: domain label exceeds 63 characters")
    e = mail_error(f"FROM:<a@example.{'x' * 64}>")
    assert (e.code, e.enhanced) == (553, "5.1.7")


def test_domain_longer_than_255_octets_is_refused() -> None:
    e = rcpt_error(f"TO:<a@{domain_of(256)}>")
    assert (e.code, e.enhanced, e.text) == (553, "5.1.3", "bad recipient address: domain exceeds 255 octets")


# --- helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("user@example.com", ("user", "example.com")),
        ('"a@b"@example.com', ('"a@b"', "example.com")),
        ("a@[IPv6:2001:db8::1]", ("a", "[IPv6:2001:db8::1]")),
        ("Postmaster", ("Postmaster", "")),
        ("", ("", "")),
    ],
)
def test_split_address(address: str, parts: tuple[str, str]) -> None:
    assert split_address(address) == parts


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("Postmaster", True),
        ("POSTMASTER", True),
        ("postmaster@example.com", True),
        ("POSTMASTER@Example.COM", True),
        ('"postmaster"@example.com', True),
        ('"post\\master"@example.com', True),
        ("postmaster@foreign.example", False),
        ("postmaster.x@example.com", False),
        ("abuse@example.com", False),
        ("", False),
    ],
)
def test_is_postmaster(address: str, expected: bool) -> None:
    assert is_postmaster(address, {"example.com"}) is expected


def test_postmaster_at_a_domain_is_not_ours_unless_the_domain_is() -> None:
    # Otherwise a relay check that trusts is_postmaster() is open to postmaster@anywhere.
    assert is_postmaster("Postmaster")
    assert not is_postmaster("postmaster@foreign.example")


def test_path_error_reply_and_str() -> None:
    e = PathError(553, "5.1.3", "bad recipient address: no domain")
    assert str(e.reply()) == "553 5.1.3 bad recipient address: no domain"
    assert str(e) == str(e.reply())


# --- properties ------------------------------------------------------------------

dot_atom = st.lists(st.text(ATEXT, min_size=1, max_size=12), min_size=1, max_size=6).map(".".join)
ldh_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
domain = st.lists(ldh_label, min_size=1, max_size=5).map(".".join)


@given(local=dot_atom.filter(lambda s: len(s) <= 64), domain=domain)
def test_any_valid_dot_atom_address_round_trips(local: str, domain: str) -> None:
    address = f"{local}@{domain}"
    assert parse_rcpt_to(f"TO:<{address}>", smtputf8_allowed=False) == (address, {}, False)
    assert parse_mail_from(f"FROM:<{address}> SIZE=1", smtputf8_allowed=False) == (address, {"SIZE": "1"}, False)
    assert split_address(address) == (local, domain)


# Weighted towards the characters that structure a path, plus surrogates, which
# aiosmtpd produces from invalid UTF-8.
path_char = st.one_of(
    st.sampled_from('<>@".:,[]\\= \x00\xe9\udcff'),
    st.sampled_from("aZ0-"),
    st.characters(exclude_categories=[]),
)


@given(st.text(path_char, max_size=80))
def test_arbitrary_input_gives_an_address_or_a_path_error(junk: str) -> None:
    for parse, arg in ((parse_mail_from, f"FROM:<{junk}"), (parse_rcpt_to, f"TO:{junk}")):
        for utf8 in (False, True):
            try:
                address, _, is_utf8 = parse(arg, smtputf8_allowed=utf8)
            except PathError as e:
                assert e.code in (501, 553)
            else:
                assert is_utf8 == (not address.isascii())
                address.encode()  # never a lone surrogate
                if address:
                    assert parse_rcpt_to(f"TO:<{address}>", smtputf8_allowed=utf8)[0] == address


# --- speed -----------------------------------------------------------------------


def test_parsing_is_fast() -> None:
    calls = 10_000
    mail = "FROM:<sender.name@example.com> SIZE=12345 BODY=8BITMIME"
    rcpt = "TO:<recipient@mail.example.org> NOTIFY=NEVER"
    start = time.perf_counter()
    for _ in range(calls):
        parse_mail_from(mail, smtputf8_allowed=False)
        parse_rcpt_to(rcpt, smtputf8_allowed=False)
    per_call_us = (time.perf_counter() - start) / (2 * calls) * 1e6
    print(f"\naddress parsing: {per_call_us:.2f} us per call")
    # Generous so that a loaded CI box does not fail it; the real figure is far lower.
    assert per_call_us < 50
