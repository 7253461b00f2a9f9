"""The helpers for plugins that call web services (``elemta.webservice``)."""

from __future__ import annotations

import hashlib
import hmac
import ssl

import pytest

from elemta import (check_secret, check_service_url, existing_ca_file, plain_http_host,
                    service_origin, service_tls_context, sign_body)


@pytest.mark.parametrize("url, says", [
    ("ftp://example.net/x", "not an http:// or https:// URL"),
    ("https:///path", "not an http:// or https:// URL"),
    ("https://user:pw@example.net/", "no credentials"),
    ("https://example.net/#frag", "fragment"),
    ("https://example.net:99999/", "port"),
])
def test_a_bad_service_url_says_what_to_write(url, says):
    with pytest.raises(ValueError, match=says) as e:
        check_service_url(url, "https://hooks.example.com/in")
    if "URL with a host" in str(e.value):
        assert "https://hooks.example.com/in" in str(e.value)


def test_a_good_url_and_secret_pass():
    assert check_service_url("http://127.0.0.1:8080/hook?t=1", "x") == "http://127.0.0.1:8080/hook?t=1"
    check_secret("0123456789abcdef")
    with pytest.raises(ValueError, match="at least 16"):
        check_secret("short")


def test_the_signature_is_the_hmac_of_timestamp_dot_body():
    body = b'{"a":1}'
    want = hmac.new(b"k" * 16, b"1767225600." + body, hashlib.sha256).hexdigest()
    assert sign_body(b"k" * 16, 1767225600, body) == "sha256=" + want


def test_the_origin_hides_path_and_query():
    assert service_origin("https://h.example/tok/en?k=secret") == "https://h.example:443"
    assert service_origin("http://[::1]:81/x") == "http://[::1]:81"


def test_tls_always_verifies_and_a_bad_ca_file_is_named(tmp_path):
    ctx = service_tls_context(None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match=f"ca_file {bad}.*the receiver's certificate"):
        service_tls_context(bad, "the receiver")


def test_plain_http_is_named_only_beyond_this_machine():
    assert plain_http_host("http://hooks.example.net/in") == "hooks.example.net"
    for url in ("https://hooks.example.net/in", "http://127.0.0.1:8080/",
                "http://[::1]/", "http://localhost/"):
        assert plain_http_host(url) is None, url


def test_a_missing_ca_file_says_what_it_should_be(tmp_path):
    assert existing_ca_file(None) is None
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert existing_ca_file(ca) == ca
    with pytest.raises(ValueError, match=r"nope\.pem does not exist .*signed the receiver's"):
        existing_ca_file(tmp_path / "nope.pem", "the receiver")
