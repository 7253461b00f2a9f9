"""Password hashes: the schemes of existing user tables, re-hashing, and the bounds on work."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
import time

import argon2
import bcrypt
import crypt_r
import pytest

from elemta_datasource.hashing import Argon2Params, Busy, Check, Hasher, Verifier, scheme_of

FAST = Argon2Params(time_cost=1, memory_kib=8192)


@pytest.fixture(scope="module")
def hasher() -> Hasher:
    return Hasher(FAST)


def ssha(name: str, password: str) -> str:
    salt = os.urandom(8)
    return base64.b64encode(hashlib.new(name, password.encode() + salt).digest() + salt).decode()


def test_new_hashes_are_argon2id_with_the_configured_cost(hasher):
    h = hasher.hash("pässword")
    assert h.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
    assert hasher.verify(h, "pässword") == Check(True, False)
    assert hasher.verify(h, "password") == Check(False, False)
    assert scheme_of(h) == "ARGON2ID"


@pytest.mark.parametrize("stored", [
    lambda p: "{SHA512-CRYPT}" + crypt_r.crypt(p, crypt_r.mksalt(crypt_r.METHOD_SHA512)),
    lambda p: crypt_r.crypt(p, crypt_r.mksalt(crypt_r.METHOD_SHA512)),
    lambda p: "{SHA256-CRYPT}" + crypt_r.crypt(p, crypt_r.mksalt(crypt_r.METHOD_SHA256)),
    lambda p: "{MD5-CRYPT}" + crypt_r.crypt(p, crypt_r.mksalt(crypt_r.METHOD_MD5)),
    lambda p: "{BLF-CRYPT}" + bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()
    .replace("$2b$", "$2y$"),
    lambda p: bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode(),
    lambda p: "{ARGON2ID}" + argon2.PasswordHasher(memory_cost=8192, time_cost=1).hash(p),
    lambda p: "{SSHA512}" + ssha("sha512", p),
    lambda p: "{SSHA256}" + ssha("sha256", p),
    lambda p: "{SSHA}" + ssha("sha1", p),
    lambda p: "{SHA256}" + base64.b64encode(hashlib.sha256(p.encode()).digest()).decode(),
    lambda p: "{PLAIN}" + p,
], ids=["sha512-crypt", "bare-$6$", "sha256-crypt", "md5-crypt", "blf-crypt", "bare-$2b$",
        "dovecot-argon2id", "ssha512", "ssha256", "ssha", "sha256", "plain"])
def test_old_schemes_verify_and_ask_to_be_rehashed(hasher, stored):
    hashed = stored("correct horse")
    assert hasher.verify(hashed, "correct horse") == Check(True, True)
    assert hasher.verify(hashed, "wrong horse") == Check(False, False)


def test_bcrypt_compares_the_first_72_bytes_as_every_bcrypt_did(hasher):
    long = "x" * 72
    hashed = bcrypt.hashpw(long.encode(), bcrypt.gensalt(4)).decode()
    assert hasher.verify(hashed, long + "anything after").ok


def test_unknown_scheme_and_missing_hash_fail(hasher, caplog):
    assert hasher.verify("{NTLM}abcdef", "x") == Check(False)
    assert "unknown scheme {NTLM}" in caplog.text
    assert hasher.verify(None, "x") == Check(False)
    assert hasher.verify("{SSHA512}not base64!", "x") == Check(False)


def test_weaker_argon2_parameters_ask_to_be_rehashed():
    weak = Hasher(Argon2Params(time_cost=1, memory_kib=8192)).hash("pw")
    stronger = Hasher(Argon2Params(time_cost=2, memory_kib=8192))
    assert stronger.verify(weak, "pw") == Check(True, True)


def test_a_hash_asking_for_too_much_memory_is_refused_not_computed(caplog):
    greedy = argon2.PasswordHasher(memory_cost=65536, time_cost=1).hash("pw")
    bounded = Hasher(FAST, max_memory_kib=32768)
    started = time.perf_counter()
    assert bounded.verify(greedy, "pw") == Check(False)
    assert time.perf_counter() - started < 0.05
    assert "asks for 65536 KiB of memory, more than max_memory_kib" in caplog.text


async def test_verifications_run_on_at_most_max_concurrent_threads_off_the_loop(hasher):
    """A login flood: bounded threads, the event loop keeps ticking, the excess is Busy."""
    slow = Hasher(Argon2Params(time_cost=2, memory_kib=8192))
    stored = slow.hash("pw")
    verifier = Verifier(slow, max_concurrent=2, max_waiting=30)
    running = peak = 0
    lock = threading.Lock()
    original = slow.verify

    def counted(s, p):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return original(s, p)
        finally:
            with lock:
                running -= 1

    slow.verify = counted  # type: ignore[method-assign]
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - before - 0.005)

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(*(verifier.verify(stored, "pw") for _ in range(32)),
                                   return_exceptions=True)
    tick.cancel()
    verifier.close()
    assert all(isinstance(r, Check) and r.ok for r in results), "32 fit: 2 run, 30 wait"
    assert peak <= 2
    assert max(lags) < 0.1, f"the event loop stalled for {max(lags):.3f} s"


async def test_beyond_the_waiting_room_a_login_is_told_busy_at_once():
    slow = Hasher(Argon2Params(time_cost=3, memory_kib=8192))
    stored = slow.hash("pw")
    verifier = Verifier(slow, max_concurrent=1, max_waiting=2)
    results = await asyncio.gather(*(verifier.verify(stored, "pw") for _ in range(6)),
                                   return_exceptions=True)
    verifier.close()
    assert sum(isinstance(r, Busy) for r in results) == 3
    assert sum(isinstance(r, Check) and r.ok for r in results) == 3
