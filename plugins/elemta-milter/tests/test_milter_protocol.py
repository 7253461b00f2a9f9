"""The codec, the settings and the macros, on their own (no server, no milter)."""

from __future__ import annotations

import struct

import pytest
from pydantic import ValidationError

from elemta_milter import protocol as p
from elemta_milter.edits import Edit, header_value
from elemta_milter.settings import MilterPluginSettings, MilterSettings, parse_address
from elemta_milter.source import split_fields


def unpack(packet: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack("!I", packet[:4])
    assert length == len(packet) - 4
    return packet[4:5], packet[5:]


# ---------------------------------------------------------------- encoding


def test_optneg_offers_version_6_every_action_and_every_step_but_rcpt_rej():
    command, data = unpack(p.optneg())
    assert command == b"O"
    version, actions, protocol = struct.unpack("!III", data)
    assert (version, actions) == (6, 0x1FF)
    assert protocol == 0x1FFFFF & ~p.SMFIP_RCPT_REJ


def test_connect_carries_name_family_port_and_address():
    assert unpack(p.connect("unknown", p.FAMILY_INET, 2525, "192.0.2.1")) == (
        b"C", b"unknown\x004\x09\xdd192.0.2.1\x00")
    assert unpack(p.connect("[x]", p.FAMILY_UNKNOWN)) == (b"C", b"[x]\x00U")


def test_mail_and_rcpt_carry_the_address_in_brackets_then_esmtp_arguments():
    assert unpack(p.envelope(p.MAIL, "a@example.org", {"SIZE": "10", "SMTPUTF8": None})) == (
        b"M", b"<a@example.org>\x00SIZE=10\x00SMTPUTF8\x00")
    assert unpack(p.envelope(p.MAIL, "", {})) == (b"M", b"<>\x00")


def test_macros_name_their_command():
    assert unpack(p.macros(p.RCPT, [("i", "Q1"), ("{rcpt_addr}", "b@x")])) == (
        b"D", b"Ri\x00Q1\x00{rcpt_addr}\x00b@x\x00")


def test_a_nul_byte_cannot_be_sent():
    with pytest.raises(ValueError, match="NUL"):
        p.helo("bad\0name")


def test_body_chunks_are_at_most_65535_bytes():
    assert unpack(p.body(b"x" * 65535))[1] == b"x" * 65535
    with pytest.raises(ValueError):
        p.body(b"x" * 65536)


# ---------------------------------------------------------------- decoding


def test_optneg_reply_with_macro_lists():
    data = struct.pack("!III", 6, 0x1FF | 0x1000, p.SMFIP_NOHELO | p.SMFIP_MDS_1M)
    data += struct.pack("!I", 2) + b"i {mail_addr}\0" + struct.pack("!I", 3) + b"rcpt_addr\0"
    n = p.parse_optneg(data)
    assert (n.version, n.actions, n.ignored_actions) == (6, 0x1FF, 0x1000)
    assert n.protocol == p.SMFIP_NOHELO           # the size bits are the MTA's business
    assert n.symbols == {2: ("i", "{mail_addr}"), 3: ("{rcpt_addr}",)}


@pytest.mark.parametrize("version,implied", [(2, p.SMFIP_NOUNKNOWN | p.SMFIP_NODATA),
                                             (3, p.SMFIP_NODATA), (6, 0)])
def test_old_protocol_versions_imply_the_steps_they_did_not_have(version, implied):
    n = p.parse_optneg(struct.pack("!III", version, 0, 0))
    assert n.protocol == implied


@pytest.mark.parametrize("data,message", [
    (b"\0\0\0\6", "12"),
    (struct.pack("!III", 1, 0, 0), "version 1"),
    (struct.pack("!III", 7, 0, 0), "version 7"),
    (struct.pack("!III", 6, 0, 0) + struct.pack("!I", 9) + b"i\0", "stage 9"),
    (struct.pack("!III", 6, 0, 0) + struct.pack("!I", 2) + b"i", "NUL"),
])
def test_bad_negotiation_replies_are_protocol_errors(data, message):
    with pytest.raises(p.ProtocolError, match=message):
        p.parse_optneg(data)


@pytest.mark.parametrize("data,expected", [
    (b"554 5.7.1 Spam message rejected\0", (554, "5.7.1", "Spam message rejected")),
    (b"451 4.7.1 Greylisted, 50%% off\0", (451, "4.7.1", "Greylisted, 50% off")),
    (b"550 No such user\0", (550, "5.7.1", "No such user")),
    (b"450 5.7.1 class mismatch\0", (450, "4.7.1", "class mismatch")),
    (b"550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 last\0",
     (550, "5.7.1", "first line second line last")),
    (b"421 4.3.2 going down\0", (421, "4.3.2", "going down")),
    (b"550\0", (550, "5.7.1", "default")),
])
def test_replycode(data, expected):
    rc = p.parse_replycode(data, "default")
    assert (rc.code, rc.enhanced, rc.text) == expected


@pytest.mark.parametrize("data", [b"250 ok\0", b"hello\0", b"55 x\0", b"\0"])
def test_malformed_replycode(data):
    assert p.parse_replycode(data, "default") is None


def test_modifications_decode():
    assert p.header_edit(b"X-A\0v\0", False, "h") == (0, "X-A", "v")
    assert p.header_edit(struct.pack("!I", 2) + b"Subject\0\0", True, "m") == (2, "Subject", "")
    assert p.address_edit(b"<a@b.example>\0", "+", False) == ("a@b.example", {})
    assert p.address_edit(b"<a@b.example>\0NOTIFY=NEVER RET\0", "2", True) == (
        "a@b.example", {"NOTIFY": "NEVER", "RET": None})
    assert p.address_edit(b"<>\0", "e", True) == ("", {})
    with pytest.raises(p.ProtocolError):
        p.header_edit(b"X-A\0v", False, "h")
    with pytest.raises(p.ProtocolError):
        p.header_edit(b"\0v\0", False, "h")


def test_header_edits_are_checked_before_any_is_carried_out():
    assert header_value("X-A", "one\n\ttwo", False) == "one\r\n\ttwo"
    assert header_value("X-A", " lead", True) == "lead"
    for name, value, message in [("X-A", "one\nTwo: injected", "continuation"),
                                 ("X-A", "bare\rcr", "bare CR"),
                                 ("X A", "v", "not a field name"),
                                 ("X-Ä", "v", "not a field name")]:
        with pytest.raises(Edit, match=message):
            header_value(name, value, False)


def test_header_fields_keep_their_folding():
    head = b"Subject: one\r\n  two\r\nX-Empty:\r\nFrom:  a@b\r\n"
    assert split_fields(head) == [("Subject", " one\r\n  two"), ("X-Empty", ""),
                                  ("From", "  a@b")]


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("text,expected", [
    ("inet:127.0.0.1:8891", "inet:127.0.0.1:8891"),
    ("inet:8891@127.0.0.1", "inet:127.0.0.1:8891"),
    ("inet:localhost:11332", "inet:localhost:11332"),
    ("inet6:[::1]:8891", "inet:[::1]:8891"),
    ("unix:/run/opendkim/opendkim.sock", "unix:/run/opendkim/opendkim.sock"),
    ("local:/run/x.sock", "unix:/run/x.sock"),
])
def test_addresses_in_postfix_and_sendmail_form(text, expected):
    assert str(parse_address(text)) == expected


@pytest.mark.parametrize("text,message", [
    ("127.0.0.1:8891", "not a milter socket"),
    ("inet:127.0.0.1", "needs a host and a port"),
    ("inet:127.0.0.1:0", "needs a host and a port"),
    ("unix:run/x.sock", "absolute path"),
    ("inet:*:8891", "where a milter listens"),
])
def test_bad_addresses_say_what_to_write(text, message):
    with pytest.raises(ValidationError, match=message):
        MilterSettings(name="m", address=text)


def test_settings_errors_are_clear():
    with pytest.raises(ValidationError, match="extra"):
        MilterSettings(name="m", address="inet:127.0.0.1:1", timeout=3)
    with pytest.raises(ValidationError, match="at least as long"):
        MilterSettings(name="m", address="inet:127.0.0.1:1", command_timeout_seconds=30,
                       end_timeout_seconds=10)
    with pytest.raises(ValidationError, match="on_failure"):
        MilterSettings(name="m", address="inet:127.0.0.1:1", on_failure="ignore")
    with pytest.raises(ValidationError, match="two milters are called"):
        MilterPluginSettings(milters=[{"name": "a", "address": "inet:127.0.0.1:1"},
                                      {"name": "a", "address": "inet:127.0.0.1:2"}])
    with pytest.raises(ValidationError, match="name"):
        MilterSettings(name="two words", address="inet:127.0.0.1:1")


async def test_a_misspelled_key_stops_the_server(elemta_server):
    from elemta import ConfigError

    with pytest.raises(ConfigError) as e:
        await elemta_server(config={"plugins": {"enabled": ["milter"], "milter": {
            "milters": [{"name": "x", "address": "inet:127.0.0.1:1", "on_fail": "accept"}]}}})
    assert "on_fail" in str(e.value.problems)
