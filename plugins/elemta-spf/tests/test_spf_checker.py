"""The checker over a real local DNS server: DNS failures, limits, time, threads.

Every lookup goes to the test's :class:`~elemta.testing.ZoneServer` through an
:class:`elemta.Resolver`, as the plugin's go through ``app.resolver``; the
server's fault modes make it fail the way real nameservers do.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import spf
from elemta_spf.checker import SpfChecker, _dispatch

CLIENT = "192.0.2.10"
SENDER = "someone@example.org"
HELO = "mail.example.org"
POLICY = f"v=spf1 ip4:{CLIENT} -all"

# (sender, helo, the name whose TXT record decides): both identities
IDENTITIES = {
    "mailfrom": (SENDER, "client.example.net", "example.org"),
    "helo": ("", HELO, HELO),
}


def publish(dns_server) -> None:
    dns_server.zone("example.org")
    dns_server.add("example.org", "TXT", POLICY)
    dns_server.add(HELO, "TXT", POLICY)


# a resolver wait long enough for a busy machine, short enough for the timeout cases
@pytest.fixture
def checker(dns_server):
    publish(dns_server)
    c = SpfChecker(dns_server.resolver(timeout_seconds=1.0), time_limit=5, workers=4,
                   receiver="mx.example.test")
    yield c
    c.close()


@pytest.mark.parametrize("identity", IDENTITIES)
async def test_both_identities_pass_from_the_policy(checker, identity):
    sender, helo, domain = IDENTITIES[identity]

    r = await checker.check(CLIENT, sender, helo)

    assert (r.result, r.identity, r.domain) == ("pass", identity, domain)
    assert r.mechanism == f"ip4:{CLIENT}"


@pytest.mark.parametrize("fault", ["timeout", "SERVFAIL", "REFUSED", "garbage", "wrong-type"])
@pytest.mark.parametrize("identity", IDENTITIES)
async def test_a_dns_failure_of_the_policy_is_temperror(checker, dns_server, identity, fault):
    sender, helo, domain = IDENTITIES[identity]
    dns_server.fail(domain, fault, "TXT")

    r = await checker.check(CLIENT, sender, helo)

    assert r.result == "temperror", r
    assert r.identity == identity
    assert domain in r.comment and "DNS lookup failed" in r.comment


@pytest.mark.parametrize("identity", IDENTITIES)
async def test_a_truncated_answer_is_asked_again_over_tcp(checker, dns_server, identity):
    sender, helo, domain = IDENTITIES[identity]
    dns_server.fail(domain, "truncate", "TXT", transport="udp")

    r = await checker.check(CLIENT, sender, helo)

    assert r.result == "pass", r
    assert dns_server.count(domain, "TXT", "udp") >= 1
    assert dns_server.count(domain, "TXT", "tcp") >= 1


@pytest.mark.parametrize("fault", ["timeout", "SERVFAIL", "garbage"])
async def test_a_dns_failure_deep_in_the_evaluation_is_temperror(checker, dns_server, fault):
    dns_server.add("deep.example.org", "TXT", "v=spf1 include:inc.example.org -all")
    dns_server.add("inc.example.org", "TXT", "v=spf1 a:host.example.org -all")
    dns_server.add("host.example.org", "A", "192.0.2.99")
    dns_server.fail("host.example.org", fault, "A")

    r = await checker.check(CLIENT, "x@deep.example.org", HELO)

    assert r.result == "temperror", r


async def test_a_large_policy_comes_over_tcp(checker, dns_server):
    terms = " ".join(f"ip4:198.51.100.{n}" for n in range(100))
    dns_server.add("big.example.org", "TXT", f"v=spf1 {terms} ip4:{CLIENT} -all")

    r = await checker.check(CLIENT, "x@big.example.org", HELO)

    assert r.result == "pass"
    assert dns_server.count("big.example.org", "TXT", "tcp") >= 1


async def test_no_record_is_none_and_ipv6_and_mapped_clients_work(checker, dns_server):
    dns_server.add("six.example.org", "TXT", "v=spf1 ip6:2001:db8::/32 ip4:192.0.2.0/24 -all")

    assert (await checker.check(CLIENT, "x@nothing.example.org", HELO)).result == "none"
    assert (await checker.check("2001:db8::25", "x@six.example.org", HELO)).result == "pass"
    assert (await checker.check("2001:db9::25", "x@six.example.org", HELO)).result == "fail"
    mapped = await checker.check(f"::ffff:{CLIENT}", "x@six.example.org", HELO)
    assert (mapped.result, mapped.client_ip) == ("pass", f"::ffff:{CLIENT}")


@pytest.mark.parametrize("helo", ["[192.0.2.10]", "localhost", "A2345678"])
async def test_a_name_that_cannot_have_a_policy_is_none_without_a_lookup(checker, dns_server,
                                                                         helo):
    r = await checker.check(CLIENT, "", helo)

    assert (r.result, r.identity) == ("none", "helo")
    assert dns_server.queries == []


async def test_the_domain_follows_the_last_at_sign(checker, dns_server):
    r = await checker.check(CLIENT, '"a@evil.example"@example.org', HELO)

    assert (r.result, r.domain) == ("pass", "example.org")


async def test_ten_dns_querying_terms_at_most(checker, dns_server):
    hosts = [f"h{n}.example.org" for n in range(11)]
    for host in hosts:
        dns_server.add(host, "A", "198.51.100.1")
    dns_server.add("many.example.org", "TXT",
                   "v=spf1 " + " ".join(f"a:{h}" for h in hosts) + " -all")

    r = await checker.check(CLIENT, "x@many.example.org", HELO)

    assert r.result == "permerror"
    assert sum(dns_server.count(h, "A") for h in hosts) == 10


async def test_two_void_lookups_at_most(checker, dns_server):
    dns_server.add("void.example.org", "TXT",
                   "v=spf1 a:v1.example.org a:v2.example.org a:v3.example.org "
                   "a:v4.example.org -all")

    r = await checker.check(CLIENT, "x@void.example.org", HELO)

    assert r.result == "permerror"
    assert "Void lookup limit" in r.comment
    assert dns_server.count("v4.example.org") == 0


async def test_a_fail_carries_the_domains_explanation(checker, dns_server):
    dns_server.add("exp.example.org", "TXT", "v=spf1 -all exp=why.example.org")
    dns_server.add("why.example.org", "TXT", "%{i} may not send for %{d}")

    r = await checker.check(CLIENT, "x@exp.example.org", HELO)

    assert (r.result, r.explanation) == ("fail", f"{CLIENT} may not send for exp.example.org")
    assert r.explained_by_domain
    plain = await checker.check("198.51.100.7", SENDER, HELO)
    assert (plain.result, plain.explained_by_domain) == ("fail", False)


async def test_answers_come_from_the_resolvers_cache(checker, dns_server):
    for _ in range(3):
        assert (await checker.check(CLIENT, SENDER, HELO)).result == "pass"

    assert dns_server.count("example.org", "TXT") == 1


# ------------------------------------------------------------------ time and threads


async def test_the_time_limit_ends_a_check_with_temperror(dns_server):
    publish(dns_server)
    dns_server.fail("example.org", "timeout")
    checker = SpfChecker(dns_server.resolver(timeout_seconds=5), time_limit=0.5)
    try:
        started = time.monotonic()
        r = await checker.check(CLIENT, SENDER, HELO)
        elapsed = time.monotonic() - started
    finally:
        checker.close()

    assert r.result == "temperror"
    assert "time limit of 0.5 s" in r.comment
    assert 0.4 < elapsed < 1.5


async def test_a_waiting_check_does_not_block_the_event_loop(dns_server):
    publish(dns_server)
    dns_server.fail("example.org", "timeout")
    checker = SpfChecker(dns_server.resolver(timeout_seconds=0.6), time_limit=5)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        r = await checker.check(CLIENT, SENDER, HELO)
    finally:
        ticker.cancel()
        checker.close()

    assert r.result == "temperror"
    assert ticks >= 20  # about 60 in 0.6 s; a blocked loop would give 0


async def test_queued_checks_keep_to_the_time_limit(dns_server):
    publish(dns_server)
    dns_server.fail("example.org", "timeout")
    checker = SpfChecker(dns_server.resolver(timeout_seconds=5), time_limit=0.5, workers=2)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(checker.check(CLIENT, SENDER, HELO) for _ in range(8)))
        elapsed = time.monotonic() - started
    finally:
        checker.close()

    assert {r.result for r in results} == {"temperror"}
    # 8 checks on 2 threads: the deadline starts at submission, not in the thread
    assert elapsed < 1.5


async def test_closing_the_checker_ends_the_checks_under_way(dns_server):
    publish(dns_server)
    dns_server.fail("example.org", "timeout")
    checker = SpfChecker(dns_server.resolver(timeout_seconds=10), time_limit=10)
    task = asyncio.create_task(checker.check(CLIENT, SENDER, HELO))
    await asyncio.sleep(0.2)

    started = time.monotonic()
    checker.close()
    r = await asyncio.wait_for(task, 3)

    assert r.result == "temperror"
    assert time.monotonic() - started < 1.0
    assert (await checker.check(CLIENT, SENDER, HELO)).result == "temperror"


async def test_a_cancelled_check_lets_its_thread_go(dns_server):
    publish(dns_server)
    dns_server.fail("example.org", "timeout")
    checker = SpfChecker(dns_server.resolver(timeout_seconds=10), time_limit=10, workers=1)
    try:
        task = asyncio.create_task(checker.check(CLIENT, SENDER, HELO))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the one worker thread is free again at once (another name: the resolver
        # still waits for the silent server's answer about example.org)
        r = await asyncio.wait_for(checker.check(CLIENT, "", HELO), 2)
    finally:
        checker.close()

    assert r.result == "pass"


def test_pyspf_asks_through_the_dispatcher(checker):
    # installed once per process; a thread running no check gets pyspf's own lookups
    assert spf.DNSLookup is _dispatch


async def test_the_spf_rr_type_is_never_asked_for(checker, dns_server):
    await checker.check(CLIENT, SENDER, HELO)

    assert dns_server.count(rdtype="SPF") == 0


async def test_checks_queued_when_the_checker_closes_end_with_temperror(dns_server):
    publish(dns_server)
    dns_server.fail("example.org", "timeout")
    checker = SpfChecker(dns_server.resolver(timeout_seconds=10), time_limit=10, workers=1)
    tasks = [asyncio.create_task(checker.check(CLIENT, SENDER, HELO)) for _ in range(3)]
    await asyncio.sleep(0.2)

    checker.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 3)

    assert [r.result for r in results] == ["temperror"] * 3
