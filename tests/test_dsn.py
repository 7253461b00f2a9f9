"""Delivery status notifications: RFC 3464 structure, RFC 3461 NOTIFY/ORCPT/ENVID, RFC 6533."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elemta.delivery import dsn
from elemta.delivery.dsn import RecipientOutcome, build_dsn, is_bounce, parse_dsn
from elemta.spool.envelope import Envelope, RecipientState

HEADERS = (b"Received: from client.example.org by mx.example.com;\r\n"
           b"\tThu, 1 Jan 2026 00:00:00 +0000\r\n"
           b"From: Alice <alice@example.org>\r\n"
           b"To: bob@example.com, carol@example.net\r\n"
           b"Subject: quarterly numbers\r\n"
           b"Message-ID: <m1.abc@example.org>\r\n")
BODY = b"The secret numbers are 1, 2, 3.\r\n"
MESSAGE = HEADERS + b"\r\n" + BODY
ARRIVAL = 1767225600.0  # Thu, 01 Jan 2026 00:00:00 +0000
# Surrogates included: replies are decoded with surrogateescape.
ANY_CHARACTER = st.characters(exclude_categories=())


def envelope(sender: str = "alice@example.org", *recipients: str | RecipientState,
             mail_params: dict[str, str | None] | None = None) -> Envelope:
    rcpts = [r if isinstance(r, RecipientState) else RecipientState(r)
             for r in recipients or ("bob@example.com", "carol@example.net", "dave@example.net")]
    return Envelope(id="Q1abc-Z", sender=sender, recipients=rcpts, received_at=ARRIVAL,
                    size=len(MESSAGE), mail_params=mail_params or {})


def failed(rcpt: str = "bob@example.com", **kw) -> RecipientOutcome:
    kw.setdefault("status", "5.1.1")
    kw.setdefault("diagnostic", f"550 5.1.1 <{rcpt}>: user unknown")
    kw.setdefault("remote_mta", "mx1.example.com")
    return RecipientOutcome(rcpt, "failed", **kw)


def delayed(rcpt: str = "carol@example.net", **kw) -> RecipientOutcome:
    kw.setdefault("status", "4.4.1")
    kw.setdefault("diagnostic", "connect to mx.example.net[192.0.2.1]:25: Connection timed out")
    kw.setdefault("last_attempt", ARRIVAL + 300)
    kw.setdefault("will_retry_until", ARRIVAL + 48 * 3600)
    return RecipientOutcome(rcpt, "delayed", **kw)


def build(outcomes: list[RecipientOutcome], env: Envelope | None = None, *,
          original: bytes | Path = MESSAGE, **kw) -> bytes:
    kw.setdefault("reporting_mta", "mail.example.com")
    kw.setdefault("now", ARRIVAL + 600)
    result = build_dsn(envelope=env or envelope(), outcomes=outcomes, original_headers=original,
                       **kw)
    assert result is not None
    sender, recipients, raw = result
    assert (sender, recipients) == ("", [(env or envelope()).sender])
    assert_wire_format(raw)
    return raw


def assert_wire_format(raw: bytes) -> None:
    """CRLF only, every line within RFC 5322's 998 octets, and parseable by the strict policy."""
    assert b"\r\n" in raw and raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert b"\x00" not in raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    email.message_from_bytes(raw, policy=email.policy.strict)


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def text_part(raw: bytes) -> str:
    """The human-readable part, decoded, with ``\n`` line ends."""
    return parse(raw).get_payload()[0].get_content().replace("\r\n", "\n")


def unwrapped(text: str) -> str:
    return " ".join(text.split())


def returned_headers(raw: bytes) -> str:
    return parse(raw).get_payload()[2].get_content().replace("\r\n", "\n")


def status_lines(raw: bytes) -> list[bytes]:
    boundary = parse(raw).get_param("boundary").encode()
    part = raw.split(b"--" + boundary)[2]
    return part.split(b"\r\n")


# ------------------------------------------------------------------ structure


def test_failure_dsn_is_multipart_report_with_three_parts():
    msg = parse(build([failed()]))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert msg.get_payload()[0].get_content_charset() == "utf-8"
    assert msg["MIME-Version"] == "1.0"


def test_dsn_headers_name_the_mailer_daemon_and_the_original_sender():
    raw = build([failed()])
    msg = parse(raw)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.com>"
    assert b"\r\nTo: <alice@example.org>\r\n" in raw
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"] == "Thu, 01 Jan 2026 00:10:00 +0000"
    assert re.fullmatch(r"<Q1abc-Z\.[0-9a-f]+@mail\.example\.com>", msg["Message-ID"])


def test_dsn_is_auto_submitted_per_rfc_3834():
    assert parse(build([failed()]))["Auto-Submitted"] == "auto-replied"


def test_message_id_is_unique_and_uses_the_message_id_domain():
    a = parse(build([failed()], message_id_domain="example.com"))["Message-ID"]
    b = parse(build([failed()], message_id_domain="example.com"))["Message-ID"]
    assert a != b
    assert a.endswith("@example.com>")


def test_dsn_replies_to_the_original_message_id():
    msg = parse(build([failed()]))
    assert msg["In-Reply-To"] == "<m1.abc@example.org>"
    assert msg["References"] == "<m1.abc@example.org>"


@pytest.mark.parametrize("headers", [
    b"Subject: no id\r\n",
    b"Message-ID: not-an-id\r\n",
    b"Message-ID: <a b@example.org>\r\n",
])
def test_no_in_reply_to_without_a_usable_original_message_id(headers):
    msg = parse(build([failed()], original=headers + b"\r\nbody\r\n"))
    assert "In-Reply-To" not in msg and "References" not in msg


def test_per_message_fields_name_the_reporting_mta_queue_id_and_arrival():
    raw = build([failed()])
    per_message = parse(raw).get_payload()[1].get_payload()[0]
    assert per_message["Reporting-MTA"] == "dns; mail.example.com"
    assert per_message["X-Elemta-Queue-ID"] == "Q1abc-Z"
    assert per_message["Arrival-Date"] == "Thu, 01 Jan 2026 00:00:00 +0000"
    assert "Original-Envelope-Id" not in per_message


def test_envid_becomes_original_envelope_id_xtext_decoded():
    raw = build([failed()], envelope(mail_params={"ENVID": "QQ314159+2Bx"}))
    per_message = parse(raw).get_payload()[1].get_payload()[0]
    assert per_message["Original-Envelope-Id"] == "QQ314159+x"


def test_blocks_are_separated_by_one_blank_line():
    lines = status_lines(build([failed(), failed("dave@example.net")]))
    text = b"\r\n".join(lines)
    assert text.count(b"\r\n\r\nFinal-Recipient:") == 2
    assert b"\r\n\r\n\r\n" not in text.strip(b"\r\n")


# ------------------------------------------------------------------ per-recipient fields


def test_failed_recipients_are_listed_in_one_dsn_with_their_fields():
    raw = build([
        failed(last_attempt=ARRIVAL + 60),
        failed("dave@example.net", status="5.2.2", diagnostic="552 5.2.2 mailbox full",
               remote_mta="mx2.example.net"),
    ])
    bob, dave = parse_dsn(raw)
    assert bob == {
        "Final-Recipient": "rfc822; bob@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.com>: user unknown",
        "Last-Attempt-Date": "Thu, 01 Jan 2026 00:01:00 +0000",
    }
    assert dave["Final-Recipient"] == "rfc822; dave@example.net"
    assert dave["Status"] == "5.2.2"
    assert dave["Remote-MTA"] == "dns; mx2.example.net"
    assert dave["Diagnostic-Code"] == "smtp; 552 5.2.2 mailbox full"
    text = text_part(raw)
    assert "<bob@example.com>" in text and "user unknown" in text
    assert "<dave@example.net>" in text and "mailbox full" in text
    assert "Q1abc-Z" in text


def test_delays_go_in_a_separate_dsn_with_will_retry_until():
    raw = build([delayed()])
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    (carol,) = parse_dsn(raw)
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"
    assert carol["Will-Retry-Until"] == "Sat, 03 Jan 2026 00:00:00 +0000"
    assert carol["Last-Attempt-Date"] == "Thu, 01 Jan 2026 00:05:00 +0000"
    assert "Remote-MTA" not in carol
    text = text_part(raw)
    assert "not yet been delivered" in text and "Sat, 03 Jan 2026" in text


def test_mixed_batch_reports_each_action_and_is_titled_by_the_failure():
    raw = build([delayed(), failed()])
    assert parse(raw)["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Action"] for b in parse_dsn(raw)] == ["delayed", "failed"]
    assert "Will-Retry-Until" not in parse_dsn(raw)[1]


def test_will_retry_until_only_for_delayed():
    (block,) = parse_dsn(build([failed(will_retry_until=ARRIVAL + 3600)]))
    assert "Will-Retry-Until" not in block


def test_local_error_has_a_non_smtp_diagnostic_type():
    (block,) = parse_dsn(build([delayed()]))
    assert block["Diagnostic-Code"] == (
        "X-Elemta; connect to mx.example.net[192.0.2.1]:25: Connection timed out")


def test_multi_line_reply_is_kept_on_one_field():
    reply = ("550-5.1.1 The email account that you tried to reach does not exist.\r\n"
             "550 5.1.1 Try again")
    (block,) = parse_dsn(build([failed(diagnostic=reply)]))
    assert block["Diagnostic-Code"] == (
        "smtp; 550-5.1.1 The email account that you tried to reach does not exist. "
        "550 5.1.1 Try again")
    assert "\n      550 5.1.1 Try again\n" in text_part(build([failed(diagnostic=reply)]))


def test_orcpt_becomes_original_recipient_xtext_decoded():
    env = envelope("alice@example.org",
                   RecipientState("bob@example.com", {"ORCPT": "rfc822;Bob+2BLists@Example.COM"}))
    (block,) = parse_dsn(build([failed()], env))
    assert block["Original-Recipient"] == "rfc822; Bob+Lists@Example.COM"


def test_a_local_delivery_agent_is_no_dns_name():
    (block,) = parse_dsn(build([failed(remote_mta="lmtp:unix:/run/dovecot/lmtp")]))
    assert block["Remote-MTA"] == "x-local; lmtp:unix:/run/dovecot/lmtp"


def test_a_rewritten_recipient_reports_the_address_the_sender_wrote():
    env = envelope("alice@example.org",
                   RecipientState("bob@example.com", original="team@example.com"))
    (block,) = parse_dsn(build([failed()], env))
    assert block["Original-Recipient"] == "rfc822; team@example.com"
    assert block["Final-Recipient"] == "rfc822; bob@example.com"


def test_original_recipient_given_in_the_outcome_wins():
    (block,) = parse_dsn(build([failed(original_recipient="rfc822;alias@example.com")]))
    assert block["Original-Recipient"] == "rfc822; alias@example.com"


def test_orcpt_cannot_inject_a_field_through_xtext():
    env = envelope("alice@example.org", RecipientState(
        "bob@example.com", {"ORCPT": "rfc822;a@b+0D+0AAction:+20delivered"}))
    raw = build([failed()], env)
    (block,) = parse_dsn(raw)
    assert block["Action"] == "failed"
    assert block["Original-Recipient"].startswith("rfc822; a@b??Action:")


# ------------------------------------------------------------------ RFC 3461 NOTIFY


def test_null_sender_never_gets_a_dsn():
    env = envelope("")
    assert is_bounce(env)
    assert build_dsn(envelope=env, outcomes=[failed()], reporting_mta="mail.example.com",
                     original_headers=MESSAGE) is None


def test_no_outcomes_no_dsn():
    assert not is_bounce(envelope())
    assert build_dsn(envelope=envelope(), outcomes=[], reporting_mta="mail.example.com",
                     original_headers=MESSAGE) is None


def test_notify_never_suppresses_the_dsn():
    env = envelope("alice@example.org", RecipientState("bob@example.com", {"NOTIFY": "NEVER"}))
    assert build_dsn(envelope=env, outcomes=[failed()], reporting_mta="mail.example.com",
                     original_headers=MESSAGE) is None


def test_notify_failure_only_drops_delay_reports():
    env = envelope("alice@example.org",
                   RecipientState("bob@example.com", {"NOTIFY": "FAILURE"}),
                   RecipientState("carol@example.net", {"NOTIFY": "FAILURE"}))
    assert build_dsn(envelope=env, outcomes=[delayed()], reporting_mta="mail.example.com",
                     original_headers=MESSAGE) is None
    assert [b["Action"] for b in parse_dsn(build([delayed(), failed()], env))] == ["failed"]


def test_success_is_reported_only_when_asked_for():
    delivered = RecipientOutcome("bob@example.com", "delivered", "2.0.0",
                                 "250 2.0.0 Ok: queued as 4XyZ", "mx1.example.com")
    assert build_dsn(envelope=envelope(), outcomes=[delivered], reporting_mta="mail.example.com",
                     original_headers=MESSAGE) is None
    env = envelope("alice@example.org",
                   RecipientState("bob@example.com", {"NOTIFY": "SUCCESS,FAILURE"}))
    raw = build([delivered], env)
    assert parse(raw)["Subject"] == "Successful Mail Delivery Report"
    (block,) = parse_dsn(raw)
    assert block["Action"] == "delivered" and block["Status"] == "2.0.0"


@pytest.mark.parametrize("outcome", [
    RecipientOutcome("bob@example.com", "bounced", "5.0.0"),
    RecipientOutcome("bob@example.com", "failed", "550"),
    RecipientOutcome("bob@example.com", "failed", "5.1.1\r\nX: y"),
])
def test_unknown_action_or_malformed_status_is_a_caller_bug(outcome):
    with pytest.raises(ValueError):
        build_dsn(envelope=envelope(), outcomes=[outcome], reporting_mta="mail.example.com",
                  original_headers=MESSAGE)


@pytest.mark.parametrize("host", [
    "mail example.com", "mail.example.com\r\nBcc: x", "", "é.example"])
def test_reporting_mta_must_be_a_host_name(host):
    with pytest.raises(ValueError):
        build_dsn(envelope=envelope(), outcomes=[failed()], reporting_mta=host,
                  original_headers=MESSAGE)


# ------------------------------------------------------------------ hostile remote text


def test_diagnostic_code_keeps_the_remote_text():
    reply = "554 5.7.1 Service unavailable; Client host [192.0.2.9] blocked using zen.spamhaus.org"
    raw = build([failed(status="5.7.1", diagnostic=reply)])
    (block,) = parse_dsn(raw)
    assert block["Diagnostic-Code"] == f"smtp; {reply}"
    assert reply in unwrapped(text_part(raw))


def test_long_diagnostic_is_folded_within_the_line_limit():
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(250))
    raw = build([failed(diagnostic=reply)])
    assert all(len(line) <= 78 for line in status_lines(raw))
    (block,) = parse_dsn(raw)
    assert block["Diagnostic-Code"] == f"smtp; {reply}"


def test_diagnostic_without_spaces_is_broken_within_the_line_limit():
    token = "x" * 1500
    raw = build([failed(diagnostic=f"550 {token}")])
    assert all(len(line) <= 78 for line in status_lines(raw))
    (block,) = parse_dsn(raw)
    assert block["Diagnostic-Code"].replace(" ", "") == f"smtp;550{token}"
    assert token in "".join(text_part(raw).split())


def test_huge_diagnostic_is_truncated():
    raw = build([failed(diagnostic="550 " + "spam " * 100_000)])
    assert len(raw) < 20_000
    (block,) = parse_dsn(raw)
    assert block["Diagnostic-Code"].endswith("[...]")


def test_control_characters_in_diagnostic_cannot_inject_fields_or_parts():
    reply = ("550 no\r\nX-Injected: yes\r\n\r\nFinal-Recipient: rfc822; evil@example.com\r\n"
             "Action: delivered\n\n--=_elemta_0--\r\nContent-Type: text/html\r\n\r\n<b>hi</b>"
             "\x00\x1b[31m\u202etxt.exe\u2028\x85end")
    raw = build([failed(diagnostic=reply, remote_mta="mx.example.com\r\nAction: delivered")])
    msg = parse(raw)
    assert len(msg.get_payload()) == 3
    (block,) = parse_dsn(raw)
    assert block["Action"] == "failed"
    assert "X-Injected" not in block
    assert block["Remote-MTA"] == "x-local; mx.example.com Action: delivered"
    assert block["Diagnostic-Code"].startswith("smtp; 550 no X-Injected: yes Final-Recipient:")
    text = text_part(raw)
    for bad in ("\x00", "\x1b", "\u202e", "\u2028", "\x85", "\r"):
        assert bad not in text
    assert "txt.exe" in text


def test_non_ascii_and_undecodable_reply_text_is_ascii_in_the_report_and_kept_in_the_text():
    raw = build([failed(diagnostic="550 5.1.1 Empfänger unbekannt \udcff")])
    (block,) = parse_dsn(raw)
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf?nger unbekannt ?"
    assert "550 5.1.1 Empfänger unbekannt ?" in text_part(raw)


def test_boundary_never_occurs_in_the_content(monkeypatch):
    taken = "aa" * 12
    headers = f"Subject: --=_elemta_{taken}\r\n".encode()
    tokens = iter([taken, "bb" * 12])
    real = dsn.secrets.token_hex
    monkeypatch.setattr(dsn.secrets, "token_hex", lambda n: next(tokens, None) or real(n))
    msg = parse(build([failed()], original=headers))
    assert msg.get_param("boundary") == "=_elemta_" + "bb" * 12
    assert len(msg.get_payload()) == 3


@settings(max_examples=200, deadline=None)
@given(diagnostic=st.text(ANY_CHARACTER, max_size=3000),
       remote_mta=st.text(ANY_CHARACTER, max_size=100))
def test_any_remote_text_yields_one_well_formed_block(diagnostic, remote_mta):
    raw = build([failed(diagnostic=diagnostic or None, remote_mta=remote_mta or None)])
    (block,) = parse_dsn(raw)
    assert block["Final-Recipient"] == "rfc822; bob@example.com"
    assert block["Action"] == "failed"
    assert len(parse(raw).get_payload()) == 3


@settings(max_examples=200, deadline=None)
@given(original=st.binary(max_size=3000) | st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"\x00", b"Subject: x", b"\xc3\xa9", b"\xff", b"--=_elemta_", b"a" * 999])).map(b"".join))
def test_any_original_bytes_yield_a_well_formed_dsn(original):
    raw = build([failed()], original=original)
    (block,) = parse_dsn(raw)
    assert block["Action"] == "failed"
    assert 2 <= len(parse(raw).get_payload()) <= 3


# ------------------------------------------------------------------ the original headers


def test_original_headers_are_attached_and_the_body_is_not():
    raw = build([failed()])
    assert b"quarterly numbers" in raw
    assert b"secret numbers" not in raw
    assert returned_headers(raw) == HEADERS.decode().replace("\r\n", "\n")


def test_original_headers_can_be_read_from_the_spooled_file(tmp_path):
    path = tmp_path / "Q1abc-Z"
    path.write_bytes(MESSAGE + b"more body\r\n" * 10_000)
    raw = build([failed()], original=path)
    assert b"quarterly numbers" in raw and b"secret numbers" not in raw
    assert raw == raw.replace(b"more body", b"")


def test_lf_only_spooled_file_is_read_up_to_the_blank_line(tmp_path):
    path = tmp_path / "Q1abc-Z"
    path.write_bytes(MESSAGE.replace(b"\r\n", b"\n"))
    assert returned_headers(build([failed()], original=path)) == (
        HEADERS.decode().replace("\r\n", "\n"))


def test_header_section_alone_is_accepted():
    raw = build([failed()], original=HEADERS)
    assert returned_headers(raw) == HEADERS.decode().replace("\r\n", "\n")


def test_lf_only_original_is_returned_with_crlf():
    raw = build([failed()], original=MESSAGE.replace(b"\r\n", b"\n"))
    assert b"Subject: quarterly numbers\r\n" in raw and b"secret" not in raw


def test_long_original_header_line_is_split_into_continuation_lines():
    headers = b"Subject: " + b"z" * 3000 + b"\r\nFrom: alice@example.org\r\n"
    raw = build([failed()], original=headers + b"\r\nbody\r\n")
    returned = returned_headers(raw)
    assert returned.replace("\n ", "").startswith("Subject: " + "z" * 3000 + "\nFrom:")


def test_returned_headers_are_capped_at_a_field_boundary():
    one = b"X-Filler: " + b"f" * 70 + b"\r\n" + b" continued\r\n"
    headers = one * 2000 + b"Subject: last\r\n"
    raw = build([failed()], original=headers + b"\r\nbody\r\n")
    returned = returned_headers(raw)
    assert len(returned) <= dsn.MAX_RETURNED_HEADER_BYTES
    assert returned.endswith(" continued\n") and "Subject: last" not in returned


def test_no_headers_part_for_an_empty_header_section():
    msg = parse(build([failed()], original=b"\r\njust a body\r\n"))
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain", "message/delivery-status"]


# ------------------------------------------------------------------ RFC 6533 (SMTPUTF8)


def test_non_ascii_recipient_uses_the_utf8_address_type():
    env = envelope("alice@example.org", "jürgen@bücher.example")
    raw = build([failed("jürgen@bücher.example")], env)
    (block,) = parse_dsn(raw)
    assert block["Final-Recipient"] == r"utf-8; j\x{FC}rgen@b\x{FC}cher.example"
    assert "<jürgen@bücher.example>" in text_part(raw)
    status_part = raw.split(b"message/delivery-status")[1]
    assert status_part.split(b"text/rfc822-headers")[0].isascii()


def test_utf8_orcpt_is_normalised_to_the_7bit_form():
    env = envelope("alice@example.org", RecipientState(
        "jürgen@bücher.example", {"ORCPT": r"utf-8;j\x{FC}rgen@b\x{FC}cher.example"}))
    (block,) = parse_dsn(build([failed("jürgen@bücher.example")], env))
    assert block["Original-Recipient"] == r"utf-8; j\x{FC}rgen@b\x{FC}cher.example"


def test_utf8_orcpt_may_carry_raw_utf8_under_smtputf8():
    env = envelope("alice@example.org", RecipientState(
        "jürgen@bücher.example", {"ORCPT": "utf-8;jürgen@bücher.example"}))
    (block,) = parse_dsn(build([failed("jürgen@bücher.example")], env))
    assert block["Original-Recipient"] == r"utf-8; j\x{FC}rgen@b\x{FC}cher.example"


def test_non_ascii_remote_mta_is_given_as_a_labels():
    (block,) = parse_dsn(build([failed(remote_mta="mx.bücher.example.")]))
    assert block["Remote-MTA"] == "dns; mx.xn--bcher-kva.example"


def test_non_ascii_original_headers_go_in_message_global_headers():
    headers = "From: Jürgen <jürgen@bücher.example>\r\nSubject: Grüße\r\n".encode()
    env = envelope("jürgen@bücher.example", "bob@example.com",
                   mail_params={"SMTPUTF8": None})
    raw = build([failed()], env, original=headers + "\r\nKörper\r\n".encode())
    msg = parse(raw)
    assert "\r\nTo: <jürgen@bücher.example>\r\n".encode() in raw
    assert msg["Content-Transfer-Encoding"] == "8bit"
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/global-headers"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert returned.get_payload()[0]["Subject"] == "Grüße"
    assert "Körper".encode() not in raw


def test_invalid_utf8_in_original_headers_is_replaced():
    raw = build([failed()], original=b"Subject: caf\xe9\r\n\r\nbody\r\n")
    returned = parse(raw).get_payload()[2]
    assert returned.get_content_type() == "message/global-headers"
    assert returned.get_payload()[0]["Subject"] == "caf\ufffd"


def test_parse_dsn_rejects_a_message_that_is_not_a_dsn():
    with pytest.raises(ValueError):
        parse_dsn(MESSAGE)
