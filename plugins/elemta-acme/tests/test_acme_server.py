"""End to end: an Elemta server with the plugin, pebble as its CA, verifying SMTP clients."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest

from elemta.testing import run_cli

from acme_support import (NAMES, TLSClient, acme_table, metric_value, metrics, served_serial,
                          server_config, status_json, wait_for)

LISTENERS = (("mx", False), ("submission", False), ("smtps", True))


async def test_the_server_starts_self_signed_then_serves_and_renews_the_acme_certificate(
        elemta_server, pebble, dns_server, caplog):
    # the names do not resolve yet: the first order fails, and the server serves its
    # self-signed certificate meanwhile
    for name in NAMES:
        dns_server.remove(name, "A")
    server = await elemta_server(config=server_config(acme_table(pebble)))
    status = await wait_for(lambda: status_json(server.config_path).get("last_error"), 20,
                            "the first attempt fails")
    assert "could not validate" in status or "DNS" in status or "dns" in status
    self_signed = await served_serial(server.port("mx"))
    with pytest.raises(ssl.SSLCertVerificationError):
        await TLSClient.open(server.port("mx"), "mx.example.test", pebble.root, implicit=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no certificate for" in m for m in warnings)             # at start
    assert any("could not obtain a certificate" in m for m in warnings)  # at each failure

    # the names resolve: the next attempt (after a backoff of at most a second) succeeds
    for name in NAMES:
        dns_server.add(name, "A", "127.0.0.1")

    async def issued():
        return await served_serial(server.port("mx")) != self_signed
    await wait_for(issued, 30, "the ACME certificate is served")

    sessions = {}
    for (listener, implicit), name in zip(LISTENERS, ["mx.example.test", "smtp.example.test",
                                                        "smtp.example.test"]):
        # pebble's root is the only trust anchor; chain and host name are verified
        sessions[listener] = await TLSClient.open(server.port(listener), name, pebble.root,
                                                  implicit=implicit)
    first = {c.serial for c in sessions.values()}
    assert len(first) == 1
    [first_serial] = first

    text = await asyncio.to_thread(metrics, server.metrics_port)
    for name in NAMES:
        expiry = metric_value(text, "elemta_acme_certificate_expiry_timestamp_seconds",
                              name=name)
        assert expiry is not None and expiry > time.time() + 86400 * 365
    assert metric_value(text, "elemta_acme_renewals_total", result="success") == 1
    assert metric_value(text, "elemta_acme_renewals_total", result="failure") >= 1
    assert metric_value(text, "elemta_acme_renewal_failures") == 0

    # the renewal task then asks the CA for renewal information, and falls back
    status = await wait_for(lambda: (s := status_json(server.config_path)).get("ari") and s,
                            10, "the renewal schedule is decided")
    assert status["certificate"]["serial"] == format(first_serial, "x")
    assert status["ari"]["offered"] is False              # pebble 2.4 has no renewalInfo
    assert "renew_share" in status["next_renewal_reason"]
    assert status["server_running"] is True
    assert "last_error" not in status

    # a forced renewal through the running server: new connections get the new certificate
    result = await asyncio.to_thread(run_cli, "acme", "renew", "--force",
                                     config=server.config_path)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "asked the running server" in result.stdout
    assert "issued a certificate" in result.stdout

    for (listener, implicit), name in zip(LISTENERS, ["mx.example.test", "smtp.example.test",
                                                        "smtp.example.test"]):
        fresh = await TLSClient.open(server.port(listener), name, pebble.root,
                                     implicit=implicit)
        assert fresh.serial != first_serial, listener
        fresh.close()
    # the sessions opened before go on undisturbed, on the old certificate
    for listener, client in sessions.items():
        assert client.serial == first_serial
        assert (await client.cmd("NOOP"))[0] == 250, listener
        assert (await client.cmd("QUIT"))[0] == 221, listener
        client.close()

    text = await asyncio.to_thread(metrics, server.metrics_port)
    assert metric_value(text, "elemta_acme_renewals_total", result="success") == 2

    # not forced, and not due: nothing is ordered
    result = await asyncio.to_thread(run_cli, "acme", "renew", config=server.config_path)
    assert result.exit_code == 0
    assert "not due" in result.stdout

    human = run_cli("acme", "status", config=server.config_path)
    assert human.exit_code == 0
    for expected in ("mx.example.test", "Pebble Intermediate", "not after", "next renewal",
                     "running"):
        assert expected in human.stdout, human.stdout


async def test_renew_without_a_running_server_orders_from_the_command(
        elemta_config, pebble, dns_server):
    config = elemta_config(server_config(acme_table(pebble, challenges=["tls-alpn-01"])))

    first = await asyncio.to_thread(run_cli, "acme", "renew", config=config)
    again = await asyncio.to_thread(run_cli, "acme", "renew", config=config)

    assert first.exit_code == 0, first.stdout + first.stderr
    assert "no server is running" in first.stdout and "issued a certificate" in first.stdout
    assert again.exit_code == 0 and "not due" in again.stdout
    status = status_json(config)
    assert status["certificate"]["names"] == NAMES
    assert status["server_running"] is False


async def http_status(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: mx.example.test\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(data.split()[1])


async def test_always_on_responders_listen_from_start_to_shutdown(elemta_server, pebble,
                                                                  dns_server):
    table = acme_table(pebble, responders="always", challenges=["tls-alpn-01", "http-01"])
    server = await elemta_server(config=server_config(table))
    assert await http_status(pebble.http_port) == 404     # listening before any order

    await wait_for(lambda: status_json(server.config_path)["certificate"], 30,
                   "a certificate is issued")

    assert await http_status(pebble.http_port) == 404     # and after it
    await server.app.stop(grace=1)
    for port in (pebble.http_port, pebble.tls_port):
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
