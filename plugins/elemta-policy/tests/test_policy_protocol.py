"""The protocol and the settings as plain functions, without a server."""

from __future__ import annotations

import pytest

from elemta_policy.protocol import (Action, ProtocolError, encode_request, parse_action,
                                    parse_reply)
from elemta_policy.settings import Endpoint, parse_endpoint


def test_a_request_is_name_value_lines_and_an_empty_line_without_stray_newlines():
    data = encode_request({"request": "smtpd_access_policy",
                           "helo_name": "evil\r\nrecipient=x@y.example", "sender": "",
                           "size": 12})
    assert data == (b"request=smtpd_access_policy\nhelo_name=evil  recipient=x@y.example\n"
                    b"sender=\nsize=12\n\n")
    assert encode_request({"sender": "j\u00f6rg@example.org"}) == \
        "sender=j\u00f6rg@example.org\n\n".encode()


def test_a_reply_needs_name_value_lines_and_an_action():
    assert parse_reply([b"action=DUNNO", b"extra=1"]) == {"action": "DUNNO", "extra": "1"}
    assert parse_reply([b"action=REJECT a=b c"]) == {"action": "REJECT a=b c"}
    with pytest.raises(ProtocolError, match="not a name=value line"):
        parse_reply([b"hello there"])
    with pytest.raises(ProtocolError, match="no action= line"):
        parse_reply([b"foo=bar"])


@pytest.mark.parametrize("value,expected", [
    ("OK", Action("ok", raw="OK")),
    ("dunno", Action("dunno", raw="dunno")),
    ("1234", Action("ok", raw="1234")),
    ("REJECT", Action("reject", raw="REJECT")),
    ("REJECT 5.1.1 no such user", Action("reject", "no such user", enhanced="5.1.1",
                                         raw="REJECT 5.1.1 no such user")),
    ("DEFER_IF_PERMIT 4.2.0 Greylisted", Action("defer_if_permit", "Greylisted",
                                                enhanced="4.2.0",
                                                raw="DEFER_IF_PERMIT 4.2.0 Greylisted")),
    ("DEFER 5.7.1 wrong class", Action("defer", "wrong class", enhanced="4.7.1",
                                       raw="DEFER 5.7.1 wrong class")),
    ("450 4.2.0 Greylisted, see x", Action("reply", "Greylisted, see x", 450, "4.2.0",
                                           raw="450 4.2.0 Greylisted, see x")),
    ("550 no", Action("reply", "no", 550, "5.7.1", raw="550 no")),
    ("451 5.3.0 mixed", Action("reply", "mixed", 451, "4.3.0", raw="451 5.3.0 mixed")),
    ("PREPEND X-Tag: a: b", Action("prepend", header=("X-Tag", "a: b"),
                                   raw="PREPEND X-Tag: a: b")),
    ("REDIRECT <a@b.example>", Action("redirect", address="a@b.example",
                                      raw="REDIRECT <a@b.example>")),
    ("BCC c@d.example", Action("bcc", address="c@d.example", raw="BCC c@d.example")),
    ("HOLD why", Action("hold", "why", raw="HOLD why")),
    ("FILTER smtp:[::1]:10025", Action("filter", "smtp:[::1]:10025",
                                       raw="FILTER smtp:[::1]:10025")),
    ("250 fine", Action("unknown", raw="250 fine")),
    ("reject_unknown_client_hostname", Action("unknown", raw="reject_unknown_client_hostname")),
    ("", Action("unknown", raw="")),
])
def test_action_words(value, expected):
    assert parse_action(value) == expected


@pytest.mark.parametrize("value,problem", [
    ("PREPEND no colon", "PREPEND needs 'Header-Name: value'"),
    ("PREPEND Bad Name: x", "PREPEND needs 'Header-Name: value'"),
    ("PREPEND X-Bad: a\rb", "PREPEND needs 'Header-Name: value'"),
    ("REDIRECT nobody", "REDIRECT needs a mail address"),
    ("BCC", "BCC needs a mail address"),
])
def test_unusable_arguments_are_protocol_errors(value, problem):
    with pytest.raises(ProtocolError, match=problem):
        parse_action(value)


def test_metric_labels_of_reply_codes():
    assert parse_action("450 x").label == "4xx" and parse_action("554 x").label == "5xx"
    assert parse_action("DEFER_IF_PERMIT x").label == "defer_if_permit"


@pytest.mark.parametrize("text,endpoint", [
    ("inet:127.0.0.1:10023", Endpoint(host="127.0.0.1", port=10023)),
    ("localhost:10023", Endpoint(host="localhost", port=10023)),
    ("inet:[::1]:10023", Endpoint(host="::1", port=10023)),
    ("unix:/run/postgrey.sock", Endpoint(path="/run/postgrey.sock")),
    ("/run/policyd-spf.sock", Endpoint(path="/run/policyd-spf.sock")),
])
def test_addresses_in_postfix_notation(text, endpoint):
    assert parse_endpoint(text) == endpoint
    assert parse_endpoint(str(endpoint)) == endpoint


def test_the_readme_examples_are_valid_settings():
    import re
    import tomllib
    from pathlib import Path

    from elemta_policy.settings import PolicySettings

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"^```toml\n(.*?)^```", readme, re.M | re.S)
    services = []
    for block in blocks:
        table = tomllib.loads(block).get("plugins", {})
        assert set(table) <= {"enabled", "policy"}
        services += table.get("policy", {}).get("services", [])
        if "policy" in table:
            PolicySettings.model_validate(table["policy"])
    by_name = {s["name"]: s for s in services}
    assert set(by_name) == {"postgrey", "spf", "mine"}
    PolicySettings.model_validate({"services": list(by_name.values())})
