"""Limits of a domain's or a user's own, from the datasource (SQLite, TOML, PostgreSQL) or
another plugin's ``rate_limits`` hook, over both state stores, through real SMTP sessions.
The directory is edited with the real command line (``elemta domains set``,
``elemta users set``) while the server runs."""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest

from elemta import hookimpl
from elemta.testing import RawSMTP, run_cli, unverified_context

from test_ratelimit import send, session


@pytest.fixture(params=["sqlite", "toml", "postgresql"])
def directory(request) -> dict:
    table: dict = {"backend": request.param, "cache_seconds": 0.1,
                   "auth": {"cache_seconds": 0}}
    if request.param == "postgresql":
        table["postgresql_dsn"] = request.getfixturevalue("postgresql")
    return table


async def cli(server, *args: str, input: str | None = None) -> str:
    result = await asyncio.to_thread(run_cli, *args, config=server.config_path, input=input)
    assert result.exit_code == 0, result.stdout + result.stderr
    return result.stdout


async def start(elemta_server, state: dict, directory: dict, outbox=None, **limits):
    config = {"server": {"max_connections_per_ip": 1000, "max_connections": 2000},
              "state": state,
              "plugins": {"enabled": ["datasource", "ratelimit"], "datasource": directory,
                          "ratelimit": limits}}
    return await elemta_server(config, outbox=outbox)


async def test_a_domain_with_its_own_hourly_limit_in_the_datasource(elemta_server, state,
                                                                     directory, caplog):
    caplog.set_level(logging.INFO)
    server = await start(elemta_server, state, directory,
                         domain={"per_hour": 100, "per_day": 3})
    for name in ("small.example", "big.example", "burst.example"):
        await cli(server, "domains", "add", name)
    assert await cli(server, "domains", "set", "small.example", "--messages-per-hour", "2") \
        == "domain small.example: messages-per-hour=2\n"
    await cli(server, "domains", "set", "big.example", "--messages-per-day", "0")
    await cli(server, "domains", "set", "burst.example", "--messages-per-hour", "5",
              "--messages-per-day", "0")
    assert "small.example\tmessages-per-hour=2" in await cli(server, "domains", "list")

    c = await session(server)
    for _ in range(2):
        assert (await send(c, "x@small.example", ["u@example.test"])).code == 250
    reply = await send(c, "y@Small.example", ["u@example.test"])
    assert str(reply).startswith("451 4.7.1 Rate limit reached (2 messages per hour for domain "
                                 "small.example)"), reply
    for _ in range(4):   # per_day = 0 in the directory: the configured 3 a day do not apply
        assert (await send(c, "x@big.example", ["u@example.test"])).code == 250, \
            "another domain is unaffected"
    for _ in range(3):   # not in the directory: the configuration
        assert (await send(c, "x@other.example", ["u@example.test"])).code == 250
    reply = await send(c, "x@other.example", ["u@example.test"])
    assert "3 messages per day for domain other.example" in reply.text
    c.close()
    assert "2 messages per hour for domain small.example reached" in caplog.text

    # exact under concurrency: 20 sessions at once against the directory's 5 an hour
    async def one() -> int:
        c = await session(server, "127.0.0.3")
        try:
            return (await send(c, "x@burst.example", ["u@example.test"])).code
        finally:
            c.close()

    codes = await asyncio.gather(*(one() for _ in range(20)))
    assert sorted(codes) == [250] * 5 + [451] * 15, codes

    await asyncio.sleep(0.3)             # the server notes the limits in the background
    out = await cli(server, "ratelimit", "status", "domain", "small.example")
    assert "domain\tsmall.example\thour\t2 of 2 used" in out, out
    assert "domain\tsmall.example\tday\t2 of 3 used" in out, out


async def test_a_user_with_a_raised_daily_limit_gets_through(elemta_server, elemta_outbox,
                                                             state, directory):
    server = await start(elemta_server, state, directory, elemta_outbox,
                         user={"per_hour": 100, "per_day": 2})
    await cli(server, "domains", "add", "example.test")
    for login in ("alice", "bob", "carol"):
        await cli(server, "users", "add", f"{login}@example.test", "--password-stdin",
                  input=f"{login}'s long secret\n")
    await cli(server, "users", "set", "alice@example.test", "--messages-per-day", "4")
    await cli(server, "users", "set", "carol@example.test", "--messages-per-hour", "1")
    listed = await cli(server, "users", "list")
    assert "daily-quota=4" in listed and "messages-per-hour=1" in listed

    async def submit(login: str, n: int):
        async with RawSMTP(server.port("submission")) as c:
            await c.cmd("EHLO client.example")
            await c.starttls(unverified_context())
            await c.cmd("EHLO client.example")
            token = base64.b64encode(f"\0{login}\0{login.split('@')[0]}'s long secret"
                                     .encode()).decode()
            assert (await c.cmd(f"AUTH PLAIN {token}")).code == 235
            return [await send(c, login, ["f@elsewhere.example"]) for _ in range(n)]

    replies = await submit("alice@example.test", 5)
    assert [r.code for r in replies[:4]] == [250] * 4, "her own 4 a day, not the configured 2"
    assert (replies[4].code, replies[4].enhanced) == (450, "4.7.1"), replies[4]
    assert "Daily limit of 4 messages" in replies[4].text
    replies = await submit("bob@example.test", 3)
    assert [r.code for r in replies[:2]] == [250, 250]
    assert "2 messages per day for user bob@example.test" in replies[2].text
    replies = await submit("carol@example.test", 2)
    assert replies[0].code == 250
    assert "1 messages per hour for user carol@example.test" in replies[1].text
    assert len(await elemta_outbox.wait(7)) >= 7, "what was accepted is delivered"


class Provider:
    """A third-party source of limits that can be switched off."""

    def __init__(self) -> None:
        self.down = False
        self.asked = 0

    @hookimpl
    async def rate_limits(self, kind, key):
        self.asked += 1
        if self.down:
            raise ConnectionError("limits database unreachable")
        if kind == "domain" and key == "vip.example":
            return {"per_hour": 3}
        return None


async def test_another_plugin_provides_limits_cached_and_failures_tempfail(elemta_server,
                                                                            tmp_path, caplog):
    provider = Provider()

    async def server_with(cache_seconds: float, **more):
        config = {"state": {"backend": "embedded",
                            "path": str(tmp_path / f"state-{cache_seconds}.sqlite3")},
                  "plugins": {"enabled": ["ratelimit"],
                              "ratelimit": {"domain": {"per_hour": 1},
                                            "lookup_cache_seconds": cache_seconds, **more}}}
        return await elemta_server(config, plugins=[("limits", provider)])

    server = await server_with(30)
    c = await session(server)
    for _ in range(3):
        assert (await send(c, "a@vip.example", ["u@example.test"])).code == 250
    assert "3 messages per hour for domain vip.example" in \
        (await send(c, "a@vip.example", ["u@example.test"])).text
    assert provider.asked == 1, "the answer is reused for lookup_cache_seconds"
    assert (await send(c, "a@plain.example", ["u@example.test"])).code == 250, \
        "the configured limit for a domain the provider does not name"
    provider.down = True
    reply = await send(c, "b@unknown.example", ["u@example.test"])
    assert str(reply) == "451 4.3.0 Temporary lookup failure, please try again later", \
        "limits that cannot be known are never a pass"
    assert "own limits unknown" in caplog.text and "limits database unreachable" in caplog.text
    c.close()

    provider.down = False
    server = await server_with(0)        # asked for every message
    c = await session(server)
    assert (await send(c, "a@vip.example", ["u@example.test"])).code == 250
    provider.down = True
    asked = provider.asked
    assert (await send(c, "a@vip.example", ["u@example.test"])).code == 250, \
        "the provider is down: its last answer (3 an hour) still applies"
    assert provider.asked == asked + 1
    assert "are the last known" in caplog.text
    c.close()

    server = await server_with(1, on_store_failure="accept")   # asked to: configured limits
    c = await session(server)
    assert (await send(c, "a@unknown.example", ["u@example.test"])).code == 250
    reply = await send(c, "b@unknown.example", ["u@example.test"])
    assert "1 messages per hour for domain unknown.example" in reply.text, \
        "the configured limits still apply"
    c.close()
    assert "the configured ones apply" in caplog.text
    assert "smtp_ratelimit_failed_open_total 2.0" in server.app.metrics.render().decode()
