"""The shared state store: the same cases on the embedded store and on a real redis-server."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elemta import StateUnavailable
from elemta.config import Settings, StateSettings
from elemta.state import gcra, state_store
from elemta.state.embedded import EmbeddedStore
from elemta.state.redis import RedisStore


@pytest.fixture(params=["embedded", "redis"])
async def store(request, tmp_path: Path):
    if request.param == "embedded":
        s = EmbeddedStore(tmp_path / "state.sqlite3")
    else:
        s = RedisStore(request.getfixturevalue("redis_server").url, timeout=1.0)
    await s.open()
    yield s
    await s.close()


# ------------------------------------------------------------------ GCRA


def test_gcra_allows_a_burst_of_the_limit_then_one_per_interval():
    tat, now = None, 1000.0
    answers = []
    for _ in range(6):
        allowed, new, remaining, retry = gcra(tat, now, 5, 60.0, 1)
        answers.append((allowed, remaining, round(retry, 6)))
        tat = new if new is not None else tat
    assert answers == [(True, 4, 0), (True, 3, 0), (True, 2, 0), (True, 1, 0), (True, 0, 0),
                       (False, 0, 12.0)]
    allowed, _, remaining, _ = gcra(tat, now + 12.0, 5, 60.0, 1)   # one interval later
    assert allowed and remaining == 0
    allowed, new, remaining, _ = gcra(tat, now, 5, 60.0, -1)       # a refund
    assert allowed and remaining == 1 and new == pytest.approx(now + 48.0)


# ------------------------------------------------------------------ both stores


async def test_rate_limits_and_refunds(store):
    got = [await store.rate("r:alice", 3, 3600) for _ in range(4)]
    assert [r.allowed for r in got] == [True, True, True, False]
    assert [r.remaining for r in got[:3]] == [2, 1, 0]
    assert got[3].retry_after == pytest.approx(1200, abs=2)
    assert (await store.rate("r:alice", 3, 3600, cost=-1)).remaining == 1
    assert (await store.rate("r:alice", 3, 3600)).allowed
    assert not (await store.rate("r:alice", 3, 3600)).allowed
    assert (await store.rate("r:bob", 3, 3600)).allowed, "keys are separate"


async def test_rate_is_exact_under_concurrency(store):
    """200 callers at once against a limit of 50: exactly 50 get through."""
    answers = await asyncio.gather(*(store.rate("r:flood", 50, 3600) for _ in range(200)))
    assert sum(r.allowed for r in answers) == 50


async def test_rate_recovers_with_time(store):
    assert (await store.rate("r:fast", 2, 0.4)).allowed
    assert (await store.rate("r:fast", 2, 0.4)).allowed
    assert not (await store.rate("r:fast", 2, 0.4)).allowed
    await asyncio.sleep(0.25)
    assert (await store.rate("r:fast", 2, 0.4)).allowed


async def test_leases(store):
    results = await asyncio.gather(*(store.acquire("c:192.0.2.1", f"conn{i}", 5, 60)
                                     for i in range(20)))
    assert sum(results) == 5
    holders = [f"conn{i}" for i, ok in enumerate(results) if ok]
    assert await store.acquire("c:192.0.2.1", holders[0], 5, 60), "a holder holds again"
    assert not await store.acquire("c:192.0.2.1", "newcomer", 5, 60)
    await store.release("c:192.0.2.1", holders[0])
    assert await store.acquire("c:192.0.2.1", "newcomer", 5, 60)
    # a lease not released (a node that died) expires
    assert await store.acquire("c:short", "a", 1, 0.2)
    assert not await store.acquire("c:short", "b", 1, 0.2)
    await asyncio.sleep(0.3)
    assert await store.acquire("c:short", "b", 1, 0.2)


async def test_values_counters_and_lifetimes(store):
    assert await store.get("g:x") is None
    await store.put("g:x", "first", 60)
    assert await store.get("g:x") == "first"
    assert not await store.add("g:x", "second", 60), "add keeps an existing value"
    assert await store.add("g:y", "new", 0.2)
    assert [await store.incr("n:c", 60) for _ in range(3)] == [1, 2, 3]
    assert await store.incr("n:c", 60, by=10) == 13
    await asyncio.sleep(0.3)
    assert await store.get("g:y") is None, "expired"
    assert await store.add("g:y", "again", 60), "an expired key can be added again"
    assert await store.delete("g:x") and not await store.delete("g:x")
    counters = await asyncio.gather(*(store.incr("n:many", 60) for _ in range(100)))
    assert sorted(counters) == list(range(1, 101))


async def test_scan_and_clear_by_prefix(store):
    for i in range(5):
        await store.put(f"grey:t:{i}", f"v{i}", 60)
    await store.put("grey:allow:192.0.2.0/24", "1", 60)
    await store.put("other:x", "y", 60)
    await store.rate("grey:r:1", 5, 60)
    entries = await store.scan("grey:t:")
    assert [(e.key, e.value) for e in entries] == [(f"grey:t:{i}", f"v{i}") for i in range(5)]
    assert all(50 < e.expires_in <= 60 for e in entries)
    assert len(await store.scan("grey:", limit=3)) == 3
    [rate] = await store.scan("grey:r:")
    assert 11 < rate.expires_in <= 12 and float(rate.value) > time.time()
    await store.acquire("grey:l", "a", 5, 60)
    await store.acquire("grey:l", "b", 5, 60)
    assert [(e.key, e.value) for e in await store.scan("grey:l")] == [("grey:l", "2")]
    assert await store.clear("grey:") == 8
    assert await store.scan("grey:") == [] and await store.get("other:x") == "y"
    # glob characters in a prefix are literal
    await store.put("a*b", "1", 60)
    await store.put("axb", "2", 60)
    assert [e.key for e in await store.scan("a*")] == ["a*b"]


# ------------------------------------------------------------------ each store


async def test_embedded_state_survives_a_restart_and_is_seen_by_another_process(tmp_path):
    path = tmp_path / "state.sqlite3"
    first = EmbeddedStore(path)
    await first.put("grey:t:1", "seen", 3600)
    await first.rate("r:k", 2, 3600)
    for sidecar in ("-wal", "-shm"):  # while it is open, SQLite's own files too
        assert stat.S_IMODE((tmp_path / f"state.sqlite3{sidecar}").stat().st_mode) == 0o600
    await first.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = EmbeddedStore(path)
    assert await second.get("grey:t:1") == "seen"
    assert (await second.rate("r:k", 2, 3600)).remaining == 0, "the count carried over"
    # another process (a command line) writes while this one is open
    code = ("import asyncio; from elemta.state.embedded import EmbeddedStore;"
            f"s = EmbeddedStore({str(path)!r});"
            "asyncio.run(s.put('grey:allow:x', 'yes', 60))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert await second.get("grey:allow:x") == "yes"
    await second.close()


async def test_embedded_store_that_cannot_open_says_where(tmp_path):
    (tmp_path / "file").write_text("")
    s = EmbeddedStore(tmp_path / "file" / "state.sqlite3")
    with pytest.raises(StateUnavailable, match=r"state database .*file/state.sqlite3"):
        await s.open()
    await s.close()


async def test_redis_down_is_unavailable_quickly_and_comes_back(redis_server):
    s = RedisStore(redis_server.url, timeout=0.5)
    assert (await s.rate("r:k", 5, 60)).allowed
    redis_server.stop()
    started = time.monotonic()
    for call in (s.rate("r:k", 5, 60), s.get("x"), s.acquire("c", "h", 1, 5), s.incr("n", 5)):
        with pytest.raises(StateUnavailable, match=r"Redis redis://127\.0\.0\.1:\d+/0"):
            await call
    assert time.monotonic() - started < 4
    redis_server.start()
    assert (await s.rate("r:k", 5, 60)).allowed, "the client reconnects by itself"
    await s.close()


async def test_redis_password_stays_out_of_messages(tmp_path):
    from elemta.testing import RedisServer

    server = RedisServer(password="s3cret-pw").start()
    try:
        wrong = RedisStore(f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
        with pytest.raises(StateUnavailable) as caught:
            await wrong.open()
        assert "wrong-pw" not in str(caught.value)
        await wrong.close()
        right = RedisStore(f"redis://127.0.0.1:{server.port}/0", password="s3cret-pw")
        await right.open()
        assert (await right.rate("k", 1, 60)).allowed
        await right.close()
    finally:
        server.close()


def test_state_store_follows_the_config(tmp_path):
    settings = Settings(source=tmp_path / "elemta.toml")
    store = state_store(settings)
    assert isinstance(store, EmbeddedStore)
    assert store.path == (tmp_path / ".elemta" / "state.sqlite3").absolute()
    redis = state_store(Settings(source=tmp_path / "elemta.toml", state=StateSettings(
        backend="redis", redis_url="redis://127.0.0.1:6379/2", key_prefix="mx1:")))
    assert isinstance(redis, RedisStore) and redis.prefix == "mx1:"
    with pytest.raises(ValueError, match='backend = "redis" needs redis_url'):
        StateSettings(backend="redis")


async def test_the_server_opens_the_store_and_a_broken_path_stops_start_up(elemta_server,
                                                                          tmp_path):
    from elemta import StartupError

    server = await elemta_server()
    assert (await server.app.state.rate("k", 1, 60)).allowed
    (tmp_path / "afile").write_text("")
    with pytest.raises(StartupError, match=r"\[state\] path: state database"):
        await elemta_server({"state": {"path": str(tmp_path / "afile" / "s.sqlite3")}})


async def test_redis_down_at_start_up_does_not_stop_the_server(elemta_server, redis_server,
                                                               caplog):
    redis_server.stop()
    server = await elemta_server({"state": {"backend": "redis", "redis_url": redis_server.url,
                                            "timeout_seconds": 0.3}})
    assert "policy plugins apply their failure mode until it answers" in caplog.text
    redis_server.start()
    assert (await server.app.state.rate("k", 1, 60)).allowed


async def test_several_rates_at_once_all_or_none(store):
    items = [("m:ip", 10, 3600), ("m:sender", 2, 3600), ("m:recipient", 10, 3600)]
    assert all(r.allowed for r in await store.rates(items))
    assert all(r.allowed for r in await store.rates(items))
    third = await store.rates(items)
    assert [r.allowed for r in third] == [True, False, True], "the sender's limit refuses"
    # nothing was taken from the others: 8 left of 10
    assert (await store.rate("m:ip", 10, 3600)).remaining == 7
    assert all(r.allowed for r in await store.rates(items, cost=-1))
    answers = await asyncio.gather(*(store.rates([("m:a", 30, 3600), ("m:b", 50, 3600)])
                                     for _ in range(100)))
    assert sum(all(r.allowed for r in a) for a in answers) == 30


async def test_get_many(store):
    await store.put("x:1", "one", 60)
    await store.put("x:3", "three", 60)
    assert await store.get_many(["x:1", "x:2", "x:3"]) == ["one", None, "three"]
    assert await store.get_many([]) == []
