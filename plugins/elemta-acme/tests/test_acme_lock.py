"""The order lock: renewals on one state directory never order twice at once."""

from __future__ import annotations

import asyncio
import os
import subprocess

from elemta.testing import elemta_command

from elemta_acme.store import Store

from acme_support import acme_table, served_serial, server_config, status_json, wait_for


async def test_two_renewals_at_once_order_once(elemta_config, faulty_ca, dns_server, tmp_path):
    state = tmp_path / "acme-state"
    config = elemta_config(server_config(acme_table(
        faulty_ca.pebble, directory=faulty_ca.directory, state_dir=str(state))))
    store = Store(state)
    store.ensure()
    # hold the lock while both commands start, so that both want the same renewal
    lock = store.order_lock()
    assert lock.acquire()
    assert f"pid {os.getpid()}" in Store(state).order_lock().holder()
    commands = [subprocess.Popen(elemta_command("--config", str(config), "acme", "renew",
                                                "--force"),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
    try:
        for command in commands:
            line = await asyncio.to_thread(command.stdout.readline)
            assert "ordering from here" in line, line
        assert faulty_ca.orders() == 0
        lock.release()
        outputs = [await asyncio.to_thread(c.communicate, timeout=60) for c in commands]
    finally:
        lock.release()
        for command in commands:
            if command.poll() is None:
                command.kill()
    texts = [out for out, _ in outputs]
    assert [c.returncode for c in commands] == [0, 0], texts
    assert faulty_ca.orders() == 1, texts
    assert sum("issued a certificate" in t for t in texts) == 1, texts
    assert sum("another process renewed the certificate meanwhile" in t for t in texts) == 1
    assert len(list((state / "certificates").iterdir())) == 1


async def test_two_servers_sharing_a_state_directory_order_once_and_serve_the_same(
        elemta_server, faulty_ca, dns_server, tmp_path):
    table = acme_table(faulty_ca.pebble, directory=faulty_ca.directory,
                       state_dir=str(tmp_path / "acme-state"))
    # the second starts while the first is ordering (or has just finished)
    first = await elemta_server(config=server_config(table))
    second = await elemta_server(config=server_config(table))
    status = await wait_for(lambda: (s := status_json(first.config_path))["certificate"] and s,
                            30, "a certificate is issued")
    serial = int(status["certificate"]["serial"], 16)

    async def both_serve():
        return (await served_serial(first.port("mx")) == serial
                and await served_serial(second.port("mx")) == serial)
    await wait_for(both_serve, 10, "both servers serve the certificate")
    await asyncio.sleep(1)
    assert faulty_ca.orders() == 1


async def test_two_renewals_at_once_through_a_running_server_order_once(
        elemta_server, faulty_ca, dns_server, tmp_path):
    table = acme_table(faulty_ca.pebble, directory=faulty_ca.directory,
                       state_dir=str(tmp_path / "acme-state"))
    server = await elemta_server(config=server_config(table))
    await wait_for(lambda: status_json(server.config_path)["certificate"], 30,
                   "the first certificate is issued")
    orders = faulty_ca.orders()

    commands = [subprocess.Popen(elemta_command("--config", str(server.config_path), "acme",
                                                "renew", "--force"),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
    try:
        outputs = [await asyncio.to_thread(c.communicate, timeout=60) for c in commands]
    finally:
        for command in commands:
            if command.poll() is None:
                command.kill()
    texts = [out for out, _ in outputs]
    assert [c.returncode for c in commands] == [0, 0], texts
    assert all("asked the running server" in t for t in texts), texts
    # both asked while the same certificate was in service: one renewal answers both
    assert faulty_ca.orders() == orders + 1, texts
    assert sum("issued a certificate" in t for t in texts) == 1, texts
    assert sum("another process renewed the certificate meanwhile" in t for t in texts) == 1
