"""The challenge responders, spoken to by real HTTP and TLS clients."""

from __future__ import annotations

import asyncio
import hashlib
import ssl

import pytest
from cryptography import x509

from elemta.testing import free_port

from elemta_acme.certs import ACME_IDENTIFIER_OID
from elemta_acme.responders import (ResponderError, Responders, parse_client_hello)
from elemta_acme.settings import AcmeSettings
from elemta_acme.store import Store

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHORIZATION = f"{TOKEN}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def client_hello(server_name: str | None, alpn: list[str] | None) -> bytes:
    """The ClientHello OpenSSL sends, captured through memory BIOs."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_client_hello_sni_and_alpn_are_read():
    hello = client_hello("mx.example.test", ["acme-tls/1", "h2"])

    parsed = parse_client_hello(hello)

    assert parsed.server_name == "mx.example.test"
    assert parsed.alpn == ("acme-tls/1", "h2")
    assert parse_client_hello(client_hello("mx.example.test", None)).alpn == ()


def test_client_hello_split_over_records_and_reads():
    hello = client_hello("mx.example.test", ["acme-tls/1"])
    body = hello[5:]
    half = len(body) // 2
    split = (bytes([22, 3, 1]) + half.to_bytes(2, "big") + body[:half]
             + bytes([22, 3, 1]) + (len(body) - half).to_bytes(2, "big") + body[half:])

    assert parse_client_hello(split).alpn == ("acme-tls/1",)
    for cut in (1, 5, 40, len(hello) - 1):
        assert parse_client_hello(hello[:cut]) is None        # more bytes are needed
    with pytest.raises(ValueError):
        parse_client_hello(b"GET / HTTP/1.1\r\n\r\n")


def settings(**overrides):
    return AcmeSettings(names=["mx.example.test"], http_address=f"127.0.0.1:{free_port()}",
                        tls_alpn_address=f"127.0.0.1:{free_port()}", **overrides)


async def http_get(port: int, request: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_http01_answers_only_the_challenge_path(tmp_path):
    responders = Responders(settings(), Store(tmp_path))
    await responders.start(["http-01"])
    port = responders.settings.http_bind[1]
    responders.add_http(TOKEN, KEY_AUTHORIZATION)
    try:
        path = f"/.well-known/acme-challenge/{TOKEN}"
        assert await http_get(port, f"GET {path} HTTP/1.1\r\nHost: mx.example.test\r\n\r\n") \
            == (200, KEY_AUTHORIZATION.encode())
        assert (await http_get(port, f"HEAD {path} HTTP/1.1\r\n\r\n"))[0] == 200
        for request in (f"POST {path} HTTP/1.1\r\n\r\n",
                        "GET / HTTP/1.1\r\n\r\n",
                        "GET /.well-known/acme-challenge/unknown HTTP/1.1\r\n\r\n",
                        "GET /.well-known/acme-challenge/../etc/passwd HTTP/1.1\r\n\r\n",
                        f"GET /x{path} HTTP/1.1\r\n\r\n"):
            assert (await http_get(port, request))[0] == 404, request
        responders.remove_http(TOKEN)
        assert (await http_get(port, f"GET {path} HTTP/1.1\r\n\r\n"))[0] == 404
    finally:
        await responders.stop()


async def tls_client(port: int, server_name: str, alpn: list[str] | None):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name), 5)
    ssl_object = writer.get_extra_info("ssl_object")
    certificate = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
    protocol = ssl_object.selected_alpn_protocol()
    writer.close()
    return certificate, protocol


async def test_tls_alpn01_serves_the_challenge_certificate_to_acme_tls_clients_only(tmp_path):
    responders = Responders(settings(challenges=["tls-alpn-01"]), Store(tmp_path))
    await responders.start(["tls-alpn-01"])
    port = responders.settings.tls_alpn_bind[1]
    await responders.add_alpn("mx.example.test", KEY_AUTHORIZATION)
    try:
        certificate, protocol = await tls_client(port, "mx.example.test", ["acme-tls/1"])
        assert protocol == "acme-tls/1"
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.value.get_values_for_type(x509.DNSName) == ["mx.example.test"]
        ext = certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        assert ext.critical
        assert ext.value.value == b"\x04\x20" + hashlib.sha256(KEY_AUTHORIZATION.encode()).digest()

        # a client that does not offer acme-tls/1 never sees the certificate
        for alpn in (None, ["h2", "http/1.1"]):
            with pytest.raises(ssl.SSLError, match="no application protocol"):
                await tls_client(port, "mx.example.test", alpn)
        # nor one asking for a name that is not being validated
        with pytest.raises(ssl.SSLError, match="unrecognized name"):
            await tls_client(port, "other.example.test", ["acme-tls/1"])
    finally:
        await responders.stop()


async def test_shared_responders_answer_the_challenges_another_node_wrote(tmp_path):
    store = Store(tmp_path / "acme")
    store.ensure()
    responders = Responders(settings(challenges=["http-01", "tls-alpn-01"]), store,
                            shared=True)
    await responders.start(["http-01", "tls-alpn-01"])
    try:
        # another node, ordering, wrote its challenges into the shared state directory
        store.put_challenge(TOKEN, "http-01", "mx.example.test", KEY_AUTHORIZATION)
        store.put_challenge("tok2", "tls-alpn-01", "mx.example.test", KEY_AUTHORIZATION)
        port = responders.settings.http_bind[1]
        assert await http_get(port, f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\n\r\n") \
            == (200, KEY_AUTHORIZATION.encode())
        certificate, _ = await tls_client(responders.settings.tls_alpn_bind[1],
                                          "mx.example.test", ["acme-tls/1"])
        assert certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).critical
        store.drop_challenge(TOKEN)
        assert (await http_get(port, f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1"
                                     "\r\n\r\n"))[0] == 404
    finally:
        await responders.stop()


async def test_a_port_in_use_is_named_with_the_fix(tmp_path):
    blocker = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    responders = Responders(AcmeSettings(names=["mx.example.test"],
                                         http_address=f"127.0.0.1:{port}"), Store(tmp_path))
    try:
        with pytest.raises(ResponderError) as e:
            await responders.start(["http-01"])
        assert f"cannot listen on 127.0.0.1:{port} (http_address) for the http-01" in str(e.value)
        assert "another program uses it" in str(e.value)
    finally:
        blocker.close()
        await blocker.wait_closed()
