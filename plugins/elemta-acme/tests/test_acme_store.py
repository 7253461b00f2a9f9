"""The state directory: file modes, atomic replacement, locks, requests."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from elemta_acme.certs import check_pair
from elemta_acme.store import KEEP_GENERATIONS, Store, StoreError

from acme_support import make_chain


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_are_0600_and_the_directory_0700(tmp_path):
    os.umask(0o022)
    store = Store(tmp_path / "acme")
    store.ensure()
    fullchain, key = make_chain(["mx.example.test"])
    store.save_account_key(key)
    current = store.install(key, fullchain)

    assert mode(store.root) == 0o700
    assert mode(store.account_key) == 0o600
    assert mode(current.privkey) == 0o600
    assert mode(current.folder) == 0o700
    for name in ("fullchain.pem", "cert.pem", "chain.pem"):
        assert mode(current.folder / name) == 0o644
    assert (current.folder / "cert.pem").read_bytes() + (current.folder / "chain.pem") \
        .read_bytes() == fullchain
    # no temporary file is left behind
    assert not [p for p in store.root.rglob(".*tmp")]


def test_a_replaced_file_is_never_seen_partly_written(tmp_path):
    store = Store(tmp_path / "acme")
    store.ensure()
    target = store.root / "status.json"
    contents = [json.dumps({"n": i, "pad": "x" * (i * 997 % 20000)}).encode() for i in range(200)]
    store.write(target, contents[0])
    stop = threading.Event()
    seen: list[bytes] = []
    bad: list[bytes] = []

    def read() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            seen.append(data)
            if data not in contents:
                bad.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for data in contents[1:]:
            store.write(target, data)
    finally:
        stop.set()
        reader.join()
    assert not bad and len(seen) > 10


def test_the_current_certificate_and_its_key_always_belong_together(tmp_path):
    store = Store(tmp_path / "acme")
    store.ensure()
    pairs = [make_chain(["mx.example.test"]) for _ in range(12)]
    store.install(pairs[0][1], pairs[0][0])
    stop = threading.Event()
    errors: list[Exception] = []
    loads = 0

    def read() -> None:
        nonlocal loads
        while not stop.is_set():
            try:
                current = store.load_current()
                check_pair(current.fullchain.read_bytes(), current.privkey.read_bytes())
                loads += 1
            except FileNotFoundError:
                pass    # a generation pruned between readlink and open: read again
            except StoreError as e:
                if "is missing" not in str(e):
                    errors.append(e)
            except Exception as e:   # a mismatched pair would land here
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for fullchain, key in pairs[1:]:
            store.install(key, fullchain)
    finally:
        stop.set()
        reader.join()
    assert not errors and loads > 0
    assert len(list(store.certificates.iterdir())) == KEEP_GENERATIONS
    assert store.load_current().info.serial == check_pair(*pairs[-1])[0].serial_number


def test_a_key_that_is_not_the_certificates_is_refused_before_anything_changes(tmp_path):
    store = Store(tmp_path / "acme")
    store.ensure()
    fullchain, _ = make_chain(["a.example.test"])
    _, other_key = make_chain(["a.example.test"])
    with pytest.raises(ValueError, match="does not belong"):
        store.install(other_key, fullchain)
    assert store.load_current() is None


def test_a_broken_current_certificate_says_how_to_recover(tmp_path):
    store = Store(tmp_path / "acme")
    store.ensure()
    current = store.install(*reversed(make_chain(["a.example.test"])))
    current.privkey.unlink()
    with pytest.raises(StoreError, match="renew --force"):
        store.load_current()


def test_the_order_lock_is_exclusive_and_names_its_holder(tmp_path):
    store = Store(tmp_path / "acme")
    store.ensure()
    first, second = store.order_lock(), store.order_lock()

    assert first.acquire()
    assert not second.acquire()        # another open file: refused, without waiting
    assert f"pid {os.getpid()}" in second.holder()
    first.release()
    assert second.holder() is None
    assert second.acquire()
    second.release()


def test_a_request_is_taken_by_exactly_one_server(tmp_path):
    store = Store(tmp_path / "acme")
    store.ensure()
    first, second = store.write_request(force=True), store.write_request(force=False)
    assert [r["id"] for r in store.pending_requests()] == [first["id"], second["id"]]

    taken = [store.claim_request(), Store(store.root).claim_request(), store.claim_request()]

    assert [t["id"] if t else None for t in taken] == [first["id"], second["id"], None]
    assert store.pending_requests() == []
    assert not store.withdraw_request(first["id"])


def test_a_running_server_is_seen_by_its_shared_lock(tmp_path):
    server, other, command = Store(tmp_path / "acme"), Store(tmp_path / "acme"), \
        Store(tmp_path / "acme")
    server.ensure()
    assert not command.server_running()
    server.hold_server_lock()
    other.hold_server_lock()          # a second node on the same directory
    assert command.server_running()
    server.release_server_lock()
    assert command.server_running()
    other.release_server_lock()
    assert not command.server_running()


def test_an_unwritable_state_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create the ACME state directory"):
        Store(blocker / "acme").ensure()
