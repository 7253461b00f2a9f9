"""elemta-greylist on both state stores (embedded SQLite and a real redis-server), through
real servers and real SMTP sessions from several loopback addresses."""

from __future__ import annotations

import asyncio

import pytest

from elemta import Accept, Reject, hookimpl
from elemta.testing import RawSMTP, run_cli
from elemta_greylist.policy import Greylist, network_of
from elemta_greylist.settings import GreylistSettings

DELAY = 0.6


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Directory:
    """A recipient check: nobody@ does not exist."""

    @hookimpl
    def rcpt(self, recipient):
        if recipient.address.startswith("nobody@"):
            return Reject(550, "5.1.1", "User unknown")
        return Accept()


@pytest.fixture
def state(state_config: dict) -> dict:
    """``[state]`` for one server (or several sharing it), once for each store
    (``state_config`` of Elemta's test kit)."""
    return state_config


async def start(elemta_server, state: dict, **greylist):
    config = {"state": state,
              "plugins": {"enabled": ["greylist"],
                          "greylist": {"delay_seconds": DELAY, "retry_window_seconds": 60,
                                       **greylist}}}
    return await elemta_server(config, plugins=[("directory", Directory())])


async def rcpt(server, recipient: str, source: str = "127.0.0.2",
               sender: str = "s@origin.example", listener: str = "mx"):
    async with RawSMTP(server.port(listener), source=source) as c:
        await c.cmd("EHLO client.example")
        await c.cmd(f"MAIL FROM:<{sender}>")
        return await c.cmd(f"RCPT TO:<{recipient}>")


# ------------------------------------------------------------------ the rules


def test_networks_of_clients():
    s = GreylistSettings()
    assert network_of("192.0.2.77", s) == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3::4", s) == "2001:db8:1:2::/64"
    assert network_of("::ffff:192.0.2.9", s) == "192.0.2.0/24"


async def test_first_try_waits_a_retry_passes_and_a_network_is_allowed(tmp_path):
    from elemta import Settings, state_store

    clock = Clock()
    store = state_store(Settings(source=tmp_path / "elemta.toml"), clock=clock)
    grey = Greylist(store, GreylistSettings(delay_seconds=300, retry_window_seconds=3600,
                                            auto_allow_after=2), clock)
    d = await grey.check("192.0.2.1", "a@x.example", "u@example.test")
    assert (d.outcome, d.wait) == ("greylisted", 300)
    clock.now += 100
    d = await grey.check("192.0.2.1", "A@X.example", "u@example.test")
    assert (d.outcome, d.wait) == ("greylisted", 200), "case does not make a new triplet"
    clock.now += 200
    assert (await grey.check("192.0.2.200", "a@x.example", "u@example.test")).outcome == \
        "passed", "another address of the /24, after the delay"
    clock.now += 86_400
    assert (await grey.check("192.0.2.1", "a@x.example", "u@example.test")).outcome == "passed"
    # a second triplet of the network passes: the network is allowed from then on
    await grey.check("192.0.2.1", "b@x.example", "u@example.test")
    clock.now += 301
    d = await grey.check("192.0.2.1", "b@x.example", "u@example.test")
    assert d.outcome == "passed" and d.auto_allowed
    assert (await grey.check("192.0.2.9", "new@y.example", "v@example.test")).outcome == \
        "allowed"
    # a first try not retried within the window is forgotten
    await grey.check("198.51.100.1", "c@x.example", "u@example.test")
    clock.now += 3601
    assert (await grey.check("198.51.100.1", "c@x.example", "u@example.test")).wait == 300
    await store.close()


def test_the_window_must_outlast_the_delay():
    with pytest.raises(ValueError, match=r"retry_window_seconds \(60\) must be longer than "
                                         r"delay_seconds \(300\)"):
        GreylistSettings(delay_seconds=300, retry_window_seconds=60)


# ------------------------------------------------------------------ through a server


async def test_unknown_recipients_get_550_and_known_ones_are_greylisted_then_pass(
        elemta_server, state):
    server = await start(elemta_server, state)
    reply = await rcpt(server, "nobody@example.test")
    assert (reply.code, reply.enhanced) == (550, "5.1.1"), "validation first: no delay"
    reply = await rcpt(server, "user@example.test")
    assert str(reply) == "451 4.7.1 Greylisted, please try again in 1 minute"
    assert (await rcpt(server, "user@example.test")).code == 451, "too early"
    await asyncio.sleep(DELAY + 0.1)
    assert (await rcpt(server, "user@example.test")).code == 250
    assert (await rcpt(server, "user@example.test", source="127.0.0.3")).code == 250, \
        "the same /24"
    text = server.app.metrics.render().decode()
    assert 'smtp_greylist_results_total{result="greylisted"} 2.0' in text
    assert 'smtp_greylist_results_total{result="passed"} 2.0' in text


async def test_exemptions(elemta_server, state):
    server = await start(elemta_server, state, exempt_networks=["127.0.5.0/24"],
                         exempt_sender_domains=["trusted.example"])
    assert (await rcpt(server, "user@example.test", source="127.0.5.9")).code == 250
    assert (await rcpt(server, "postmaster@example.test")).code == 250
    assert (await rcpt(server, "abuse@example.test")).code == 250
    assert (await rcpt(server, "user@example.test", sender="x@trusted.example")).code == 250
    assert (await rcpt(server, "user@example.test")).code == 451


async def test_authenticated_submissions_are_not_greylisted(elemta_server, state):
    import base64

    from elemta.testing import unverified_context

    class Users:
        @hookimpl
        def auth(self, credentials):
            return Accept()

    server = await elemta_server(
        {"state": state, "plugins": {"greylist": {"delay_seconds": DELAY,
                                                  "retry_window_seconds": 60}}},
        enabled=["greylist"], plugins=[("users", Users())])
    async with RawSMTP(server.port("submission")) as c:
        await c.cmd("EHLO client.example")
        await c.starttls(unverified_context())
        await c.cmd("EHLO client.example")
        token = base64.b64encode(b"\0me\0pw").decode()
        assert (await c.cmd(f"AUTH PLAIN {token}")).code == 235
        await c.cmd("MAIL FROM:<me@example.test>")
        assert (await c.cmd("RCPT TO:<friend@elsewhere.example>")).code == 250


async def test_two_servers_share_the_greylist_through_redis(elemta_server, redis_server):
    state = {"backend": "redis", "redis_url": redis_server.url}
    one = await start(elemta_server, state)
    two = await start(elemta_server, state)
    assert (await rcpt(one, "user@example.test")).code == 451
    await asyncio.sleep(DELAY + 0.1)
    assert (await rcpt(two, "user@example.test")).code == 250, "passed on the other server"


async def test_the_embedded_greylist_survives_a_restart(elemta_server, tmp_path):
    state = {"backend": "embedded", "path": str(tmp_path / "state.sqlite3")}
    first = await start(elemta_server, state)
    assert (await rcpt(first, "user@example.test")).code == 451
    await first.app.stop(grace=1)
    await asyncio.sleep(DELAY + 0.1)
    second = await start(elemta_server, state)
    assert (await rcpt(second, "user@example.test")).code == 250, "the first try was kept"


async def test_redis_gone_tempfails_by_default_and_comes_back(elemta_server, redis_server,
                                                               caplog):
    server = await start(elemta_server, {"backend": "redis", "redis_url": redis_server.url,
                                         "timeout_seconds": 0.3})
    redis_server.stop()
    reply = await rcpt(server, "user@example.test")
    assert (reply.code, reply.enhanced) == (451, "4.3.0"), "never a silent pass"
    assert "greylisting unavailable" in caplog.text
    redis_server.start()
    assert (await rcpt(server, "user@example.test")).code == 451, "greylisting again"


async def test_fail_open_is_explicit_logged_and_counted(elemta_server, redis_server, caplog):
    server = await start(elemta_server, {"backend": "redis", "redis_url": redis_server.url,
                                         "timeout_seconds": 0.3}, on_store_failure="accept")
    redis_server.stop()
    assert (await rcpt(server, "user@example.test")).code == 250
    assert "let through (on_store_failure = accept)" in caplog.text
    assert 'smtp_greylist_results_total{result="failed_open"} 1.0' in \
        server.app.metrics.render().decode()


async def test_commands_on_a_running_server(elemta_server, state):
    server = await start(elemta_server, state)
    assert (await rcpt(server, "user@example.test")).code == 451

    def cli(*args):
        result = run_cli("greylist", *args, config=server.config_path)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    listed = await asyncio.to_thread(cli, "list")
    assert "pending\t127.0.0.0/24|s@origin.example|user@example.test\tfirst try" in listed
    out = await asyncio.to_thread(cli, "allow", "127.0.0.9", "--days", "1")
    assert out.strip() == "127.0.0.0/24 allowed for 1 days"
    assert (await rcpt(server, "other@example.test")).code == 250, "allowed at once"
    assert "allowed\t127.0.0.0/24\tmanual" in await asyncio.to_thread(cli, "list", "--what",
                                                                      "allowed")
    out = await asyncio.to_thread(cli, "clear", "127.0.0.0/24")
    assert out.strip() == "2 entries removed"
    assert (await rcpt(server, "other@example.test")).code == 451
    result = await asyncio.to_thread(run_cli, "greylist", "clear", config=server.config_path)
    assert result.exit_code == 2 and "give a NETWORK, or --all" in result.stderr


async def test_a_sender_whose_spf_passes_for_a_listed_domain_is_not_greylisted(
        elemta_server, dns_server, tmp_path):
    """With elemta-spf enabled before it: SPF pass for a listed domain skips greylisting."""
    dns_server.zone("bigmail.example")
    dns_server.add("bigmail.example", "TXT", "v=spf1 ip4:127.0.0.2 -all")
    dns_server.zone("small.example")
    dns_server.add("small.example", "TXT", "v=spf1 ip4:127.0.0.2 -all")
    server = await elemta_server(
        {"dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1, "attempts": 1},
         "state": {"backend": "embedded", "path": str(tmp_path / "state.sqlite3")},
         "plugins": {"enabled": ["spf", "greylist"],
                     "greylist": {"delay_seconds": DELAY, "retry_window_seconds": 60,
                                  "spf_pass_domains": ["bigmail.example"]}}},
        plugins=[("directory", Directory())])
    assert (await rcpt(server, "user@example.test", sender="a@bigmail.example")).code == 250
    assert (await rcpt(server, "user@example.test", sender="a@small.example")).code == 451, \
        "SPF passes, but the domain is not listed"
    assert (await rcpt(server, "user@example.test", sender="b@bigmail.example",
                       source="127.0.0.3")).code == 451, "listed, but SPF fails from here"
