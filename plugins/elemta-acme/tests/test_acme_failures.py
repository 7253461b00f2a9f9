"""Failure paths: in each, the server keeps serving the certificate it has, and
``elemta acme status`` and the metrics show the error."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import josepy as jose
from acme import client, messages
from cryptography.hazmat.primitives import serialization

from elemta.testing import run_cli

from acme_support import (acme_table, metric_value, metrics, served_serial, server_config,
                          status_json, wait_for)


async def start_with_certificate(elemta_server, table):
    """A server that has obtained its certificate; and that certificate's serial."""
    server = await elemta_server(config=server_config(table))
    status = await wait_for(lambda: (s := status_json(server.config_path))["certificate"] and s,
                            30, "the first certificate is issued")
    serial = int(status["certificate"]["serial"], 16)
    await wait_for(lambda: _serves(server, serial), 10, "the certificate is in service")
    return server, serial


async def _serves(server, serial):
    return all([await served_serial(server.port("mx")) == serial,
                await served_serial(server.port("smtps"), implicit=True) == serial])


async def renew_force(server):
    return await asyncio.to_thread(run_cli, "acme", "renew", "--force",
                                   config=server.config_path)


async def still_serving(server, serial):
    assert await served_serial(server.port("mx")) == serial
    assert await served_serial(server.port("smtps"), implicit=True) == serial


def counted(server, result):
    return metric_value(metrics(server.metrics_port), "elemta_acme_renewals_total",
                        result=result)


async def test_an_unreachable_ca_keeps_the_certificate_in_service(
        elemta_server, faulty_ca, dns_server, tmp_path):
    server, serial = await start_with_certificate(
        elemta_server, acme_table(faulty_ca.pebble, directory=faulty_ca.directory))
    faulty_ca.stop()     # the directory URL now names a closed port

    result = await renew_force(server)

    assert result.exit_code == 1
    assert "cannot reach the ACME server" in result.stdout
    await still_serving(server, serial)
    status = status_json(server.config_path)
    assert status["last_error_kind"] == "unreachable"
    assert faulty_ca.directory in status["last_error"]
    assert status["failures"] == 1 and status["next_attempt_at"] > time.time()
    assert await asyncio.to_thread(counted, server, "failure") == 1
    text = await asyncio.to_thread(metrics, server.metrics_port)
    assert metric_value(text, "elemta_acme_renewal_failures") == 1
    human = run_cli("acme", "status", config=server.config_path)
    assert "last error" in human.stdout and "cannot reach" in human.stdout


async def test_a_failed_challenge_keeps_the_certificate_in_service(
        elemta_server, pebble, dns_server, tmp_path):
    state = tmp_path / "acme-state"
    server, serial = await start_with_certificate(
        elemta_server, acme_table(pebble, state_dir=str(state)))
    dns_server.remove("smtp.example.test", "A")
    dns_server.add("smtp.example.test", "A", "127.0.0.2")   # points elsewhere
    # pebble reuses a valid authorization of the same account 1 time in 100 even with
    # PEBBLE_AUTHZREUSE=0 (it creates a new one when rand.Intn(100) > 0): a new account
    # has none, so the name is validated again for sure
    (state / "account.key").unlink()
    (state / "account.json").unlink()

    result = await renew_force(server)

    assert result.exit_code == 1
    assert "could not validate smtp.example.test with http-01" in result.stdout
    assert "A/AAAA records" in result.stdout
    await still_serving(server, serial)
    status = status_json(server.config_path)
    assert status["last_error_kind"] == "validation"
    assert await asyncio.to_thread(counted, server, "failure") == 1


def deactivate_account(directory: str, ca_file: Path, state: Path) -> None:
    """Deactivate the plugin's account at the CA, as its holder would (RFC 8555, 7.3.6)."""
    key = serialization.load_pem_private_key((state / "account.key").read_bytes(), None)
    account = json.loads((state / "account.json").read_text())
    for _ in range(5):      # pebble rejects 5% of nonces
        try:
            net = client.ClientNetwork(jose.JWKEC(key=key), alg=jose.ES256,
                                       verify_ssl=str(ca_file))
            acme = client.ClientV2(client.ClientV2.get_directory(directory, net), net)
            regr = acme.query_registration(messages.RegistrationResource(
                uri=account["uri"], body=messages.Registration()))
            acme.deactivate_registration(regr)
            return
        except messages.Error as e:
            if e.code != "badNonce":
                raise
    raise AssertionError("could not deactivate the account")


async def test_a_deactivated_account_keeps_the_certificate_in_service(
        elemta_server, pebble, dns_server, tmp_path):
    state = tmp_path / "acme-state"
    server, serial = await start_with_certificate(
        elemta_server, acme_table(pebble, state_dir=str(state)))
    await asyncio.to_thread(deactivate_account, pebble.directory, pebble.api_ca, state)

    result = await renew_force(server)

    assert result.exit_code == 1, result.stdout
    assert "account" in result.stdout and "deactivated" in result.stdout
    assert "account.key" in result.stdout      # what to remove to start afresh
    await still_serving(server, serial)
    status = status_json(server.config_path)
    assert status["last_error_kind"] == "account"
    assert await asyncio.to_thread(counted, server, "failure") == 1


async def test_a_rate_limit_is_waited_out_even_across_restarts(
        elemta_server, faulty_ca, dns_server, tmp_path, caplog):
    table = acme_table(faulty_ca.pebble, directory=faulty_ca.directory,
                       state_dir=str(tmp_path / "acme-state"))
    server, serial = await start_with_certificate(elemta_server, table)
    faulty_ca.rate_limit_seconds = 3600
    orders = faulty_ca.order_attempts()

    result = await renew_force(server)

    assert result.exit_code == 1
    assert "rate-limits this account" in result.stdout
    assert faulty_ca.order_attempts() == orders + 1
    await still_serving(server, serial)
    status = status_json(server.config_path)
    assert status["last_error_kind"] == "rate_limited"
    assert time.time() + 3500 < status["rate_limited_until"] <= time.time() + 3600
    assert status["next_attempt_at"] >= status["rate_limited_until"] - 1
    assert await asyncio.to_thread(counted, server, "rate_limited") == 1

    # no retry storm: forcing again does not send an order before the CA allows one
    again = await renew_force(server)
    assert again.exit_code == 1 and "rate-limited this account until" in again.stdout
    assert faulty_ca.order_attempts() == orders + 1

    # the wait survives a restart
    await server.app.stop(grace=1)
    caplog.clear()
    restarted = await elemta_server(config=server_config(table))
    assert await served_serial(restarted.port("mx")) == serial
    await asyncio.sleep(1.5)
    assert faulty_ca.order_attempts() == orders + 1
    assert status_json(restarted.config_path)["rate_limited_until"] == \
        status["rate_limited_until"]
    assert any("the last order failed" in r.getMessage() for r in caplog.records)
