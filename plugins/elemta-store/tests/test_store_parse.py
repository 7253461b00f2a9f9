"""Taking a message apart never fails: whatever the bytes, the store gets headers and text."""

from __future__ import annotations

import string

from elemta_store.message import decode, parse
from hypothesis import given, settings
from hypothesis import strategies as st

LINES = st.lists(st.one_of(
    st.sampled_from([b"Content-Type: multipart/mixed; boundary=b", b"--b", b"--b--",
                     b"Content-Type: text/plain; charset=x-unknown",
                     b"Content-Type: text/html; charset=utf-8",
                     b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: "
                     b"quoted-printable", b"Subject: =?utf-8?b?!!!?=", b"Subject: =?x?q?a?=",
                     b"Content-Disposition: attachment; filename*=bad''%ff", b"", b" folded",
                     b"From: \xff\xfe <a@b>", b"=\xc3", b"<p>a &amp; b</p>"]),
    st.binary(max_size=40)), max_size=30)


@settings(max_examples=1500, deadline=None)
@given(LINES)
def test_any_bytes_parse_without_an_error(lines):
    raw = b"\r\n".join(lines)
    p = parse(raw, 1000)
    assert isinstance(p.subject, str) and isinstance(p.body, str)
    assert len(p.body) <= 1000 and len(p.snippet) <= 200
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in p.headers)


@given(st.text(string.printable + "é€\x00", max_size=80))
def test_any_header_value_decodes(value):
    assert isinstance(decode(value), str)


def test_a_message_without_a_blank_line_is_all_headers_and_no_body():
    p = parse(b"Subject: only\r\nX-A: 1", 1000)
    assert p.subject == "only" and p.body == "" and p.snippet == ""


def test_an_unknown_charset_is_read_as_latin_1_and_the_html_loses_its_tags():
    raw = (b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/html; charset=x-nonsense\r\n\r\n"
           b"<html><style>p {}</style><p>caf\xe9 &amp; cr\xe8me</p></html>\r\n--b--\r\n")
    p = parse(raw, 1000)
    assert "caf\u00e9 & cr\u00e8me" in p.body and "<p>" not in p.body and "{}" not in p.body
    assert p.snippet == "caf\u00e9 & cr\u00e8me"
