"""The shared resolver (elemta.dns) against a local authoritative server (elemta.testing.dns)."""

from __future__ import annotations

import asyncio
import base64
import random

import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from elemta.config import ConfigError, DNSSettings
from elemta.dns import (
    MX,
    InvalidName,
    NoData,
    NotFound,
    NullMX,
    NXDomain,
    Resolver,
    TempError,
)
from elemta.testing.dns import ZoneServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def zone(dns_server: ZoneServer) -> ZoneServer:
    """example.test as a zone whose negative answers may be cached for 60 s."""
    dns_server.zone("example.test", negative_ttl=60)
    return dns_server


# ------------------------------------------------------------------ record types


async def test_mx_hosts_come_most_preferred_first(zone):
    zone.add("example.test", "MX", "20 mx2.example.test.")
    zone.add("example.test", "MX", "10 MX1.example.test.")
    zone.add("example.test", "MX", "30 mx3.example.test")
    assert await zone.resolver().mx("example.test.") == [
        MX(10, "mx1.example.test"), MX(20, "mx2.example.test"), MX(30, "mx3.example.test")]


async def test_mx_hosts_of_equal_preference_come_in_random_order(zone):
    zone.add("example.test", "MX", "10 a.example.test.")
    zone.add("example.test", "MX", "10 b.example.test.")
    zone.add("example.test", "MX", "5 first.example.test.")
    resolver = Resolver(zone.settings(), rng=random.Random(7))
    orders = {tuple(h.host for h in await resolver.mx("example.test")) for _ in range(20)}
    assert orders == {("first.example.test", "a.example.test", "b.example.test"),
                      ("first.example.test", "b.example.test", "a.example.test")}
    assert zone.count("example.test", "MX") == 1


async def test_null_mx_means_the_domain_accepts_no_mail(zone):
    zone.add("example.test", "MX", "0 .")
    with pytest.raises(NullMX) as caught:
        await zone.resolver().mx("example.test")
    assert not isinstance(caught.value, NotFound)


async def test_dot_among_real_mx_hosts_is_ignored(zone):
    zone.add("example.test", "MX", "0 .")
    zone.add("example.test", "MX", "10 mx.example.test.")
    assert await zone.resolver().mx("example.test") == [MX(10, "mx.example.test")]


async def test_domain_without_mx_is_no_data_so_delivery_falls_back_to_addresses(zone):
    zone.add("example.test", "A", "192.0.2.1")
    with pytest.raises(NoData):
        await zone.resolver().mx("example.test")


async def test_a_aaaa_and_addresses(zone):
    zone.add("host.example.test", "A", "192.0.2.1")
    zone.add("host.example.test", "A", "192.0.2.2")
    zone.add("host.example.test", "AAAA", "2001:db8::1")
    resolver = zone.resolver()
    assert await resolver.a("host.example.test") == ["192.0.2.1", "192.0.2.2"]
    assert await resolver.aaaa("host.example.test") == ["2001:db8::1"]
    assert await resolver.addresses("host.example.test") == [
        "2001:db8::1", "192.0.2.1", "192.0.2.2"]


async def test_addresses_of_a_name_with_neither_family_is_no_data(zone):
    zone.add("mx.example.test", "MX", "10 other.example.test.")
    with pytest.raises(NoData):
        await zone.resolver().addresses("mx.example.test")
    with pytest.raises(NXDomain):
        await zone.resolver().addresses("missing.example.test")


async def test_addresses_keeps_the_family_that_answered(zone):
    zone.add("host.example.test", "A", "192.0.2.1")
    zone.fail("host.example.test", "SERVFAIL", "AAAA")
    resolver = zone.resolver()
    assert await resolver.addresses("host.example.test") == ["192.0.2.1"]
    zone.fail("host.example.test", "SERVFAIL")
    resolver.clear_cache()
    with pytest.raises(TempError):
        await resolver.addresses("host.example.test")


async def test_txt_strings_of_one_record_are_joined(zone):
    spf = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(40)) + " -all"
    assert len(spf) > 255
    zone.add("example.test", "TXT", spf)
    zone.add("example.test", "TXT", ["v=other ", "record"])
    assert sorted(await zone.resolver().txt("example.test")) == sorted([spf, "v=other record"])


async def test_cname_is_followed(zone):
    zone.add("alias.example.test", "CNAME", "host.example.test.")
    zone.add("host.example.test", "A", "192.0.2.7")
    assert await zone.resolver().a("alias.example.test") == ["192.0.2.7"]


async def test_ptr(zone):
    zone.add("192.0.2.25", "PTR", "mail.example.test.")
    zone.add("2001:db8::25", "PTR", "mail6.example.test.")
    resolver = zone.resolver()
    assert await resolver.ptr("192.0.2.25") == ["mail.example.test"]
    assert await resolver.ptr("2001:DB8:0::25") == ["mail6.example.test"]
    with pytest.raises(NXDomain):
        await resolver.ptr("192.0.2.26")


async def test_exists_tells_a_missing_name_from_one_with_other_records(zone):
    zone.add("mail.example.test", "MX", "10 mx.example.test.")
    zone.add("sel._domainkey.example.test", "TXT", "v=DKIM1; p=")
    resolver = zone.resolver()
    assert await resolver.exists("example.test")
    assert await resolver.exists("mail.example.test")
    assert await resolver.exists("_domainkey.example.test")  # an empty non-terminal
    assert not await resolver.exists("nowhere.example.test")
    zone.fail("broken.example.test", "SERVFAIL")
    with pytest.raises(TempError):
        await resolver.exists("broken.example.test")


async def test_query_any_type_for_plugins(zone):
    zone.add("example.test", "MX", "10 mx.example.test.")
    zone.add("2.0.2.192.bl.example.test", "A", "127.0.0.2")
    resolver = zone.resolver()
    assert await resolver.query("example.test", "MX") == ["10 mx.example.test."]
    assert await resolver.query("2.0.2.192.bl.example.test", "a") == ["127.0.0.2"]
    assert await resolver.query("example.test", 6) == [
        "ns.example.test. hostmaster.example.test. 1 3600 600 86400 60"]
    with pytest.raises(ValueError, match="unknown DNS record type"):
        await resolver.query("example.test", "BOGUS")
    with pytest.raises(ValueError, match="not a record type"):
        await resolver.query("example.test", "ANY")


async def test_names_are_asked_as_given_without_search_domains(dns_server):
    with pytest.raises(NXDomain):
        await dns_server.resolver().a("localhost-ish")
    assert [q.name for q in dns_server.queries] == ["localhost-ish"]


# ------------------------------------------------------------------ errors


async def test_nxdomain_and_nodata_are_told_apart(zone):
    zone.add("host.example.test", "A", "192.0.2.1")
    resolver = zone.resolver()
    with pytest.raises(NXDomain) as missing:
        await resolver.a("missing.example.test")
    with pytest.raises(NoData) as empty:
        await resolver.mx("host.example.test")
    assert (missing.value.name, missing.value.rdtype) == ("missing.example.test", "A")
    assert (empty.value.name, empty.value.rdtype) == ("host.example.test", "MX")
    assert isinstance(missing.value, NotFound) and isinstance(empty.value, NotFound)


@pytest.mark.parametrize("fault", ["SERVFAIL", "REFUSED", "wrong-type"])
async def test_failed_answer_is_temp_error(zone, fault):
    zone.add("example.test", "MX", "10 mx.example.test.")
    zone.fail("example.test", fault)
    with pytest.raises(TempError) as caught:
        await zone.resolver().mx("example.test")
    assert not isinstance(caught.value, NotFound)


@pytest.mark.parametrize("fault", ["timeout", "garbage"])
async def test_silent_or_unreadable_nameserver_is_temp_error(zone, fault):
    zone.add("example.test", "MX", "10 mx.example.test.")
    zone.fail("example.test", fault)
    with pytest.raises(TempError):
        await zone.resolver(timeout_seconds=0.2).mx("example.test")


async def test_garbage_over_tcp_is_temp_error(zone):
    zone.add("example.test", "TXT", "v=spf1 -all")
    zone.fail("example.test", "truncate", transport="udp")
    zone.fail("example.test", "garbage", transport="tcp")
    with pytest.raises(TempError):
        await zone.resolver().txt("example.test")
    assert zone.count("example.test", "TXT", "tcp") == 1


async def test_cname_loop_is_temp_error(zone):
    zone.add("a.example.test", "CNAME", "b.example.test.")
    zone.add("b.example.test", "CNAME", "a.example.test.")
    with pytest.raises(TempError):
        await zone.resolver().a("a.example.test")


async def test_unreachable_nameserver_is_temp_error():
    with ZoneServer() as server:
        settings = server.settings(timeout_seconds=0.2)
    with pytest.raises(TempError):
        await Resolver(settings).a("example.test")


async def test_truncated_udp_answer_is_asked_again_over_tcp(zone):
    zone.add("example.test", "MX", "10 mx.example.test.")
    zone.fail("example.test", "truncate")
    assert await zone.resolver().mx("example.test") == [MX(10, "mx.example.test")]
    assert zone.count("example.test", "MX", "udp") == 1
    assert zone.count("example.test", "MX", "tcp") == 1


async def test_answer_larger_than_the_edns_buffer_comes_over_tcp(zone):
    for i in range(8):
        zone.add("big.example.test", "TXT", f"record {i} " + "x" * 240)
    assert len(await zone.resolver().txt("big.example.test")) == 8
    assert zone.count("big.example.test", transport="tcp") == 1


@pytest.mark.parametrize("name", [
    "", "a..example.test", "with\ttab.example.test", "back\\slash.example.test",
    "x" * 64 + ".example.test", ".".join(["abcdefgh"] * 30), "☃.example.test", "@",
])
async def test_invalid_name_is_refused_before_asking(dns_server, name):
    """(A space is an octet like any other in a label: SPF macros expand to names with one.)"""
    with pytest.raises(InvalidName):
        await dns_server.resolver().mx(name)
    assert dns_server.queries == []


async def test_invalid_ip_for_ptr_is_invalid_name(dns_server):
    with pytest.raises(InvalidName, match="not an IP address"):
        await dns_server.resolver().ptr("192.0.2.300")


async def test_u_label_domain_is_asked_with_its_a_label(dns_server):
    dns_server.zone("xn--bcher-kva.example")
    dns_server.add("xn--bcher-kva.example", "MX", "10 mx.xn--bcher-kva.example.")
    assert await dns_server.resolver().mx("Bücher.example") == [
        MX(10, "mx.xn--bcher-kva.example")]
    assert dns_server.queries[0].name == "xn--bcher-kva.example"


# ------------------------------------------------------------------ cache


async def test_answer_is_cached_until_its_ttl_runs_out(zone):
    zone.add("host.example.test", "A", "192.0.2.1", ttl=30)
    clock = FakeClock()
    resolver = zone.resolver(clock=clock)
    assert await resolver.a("host.example.test") == ["192.0.2.1"]
    zone.remove("host.example.test", "A")
    zone.add("host.example.test", "A", "192.0.2.2", ttl=30)
    clock.now += 29
    assert await resolver.a("host.example.test") == ["192.0.2.1"]
    assert zone.count("host.example.test") == 1
    clock.now += 1
    assert await resolver.a("host.example.test") == ["192.0.2.2"]
    assert zone.count("host.example.test") == 2


async def test_ttl_is_held_between_min_and_max_ttl(zone):
    zone.add("short.example.test", "A", "192.0.2.1", ttl=1)
    zone.add("long.example.test", "A", "192.0.2.2", ttl=86400)
    clock = FakeClock()
    resolver = zone.resolver(clock=clock, min_ttl_seconds=10, max_ttl_seconds=100)
    await resolver.a("short.example.test")
    await resolver.a("long.example.test")
    clock.now += 9
    await resolver.a("short.example.test")
    assert zone.count("short.example.test") == 1
    clock.now += 91
    await resolver.a("long.example.test")
    assert zone.count("long.example.test") == 2


async def test_zero_ttl_answer_is_not_cached(zone):
    zone.add("host.example.test", "A", "192.0.2.1", ttl=0)
    resolver = zone.resolver()
    await resolver.a("host.example.test")
    await resolver.a("host.example.test")
    assert zone.count("host.example.test") == 2


@pytest.mark.parametrize("name,error", [("missing.example.test", NXDomain),
                                        ("example.test", NoData)])
async def test_negative_answer_is_cached_for_the_soa_minimum(zone, name, error):
    clock = FakeClock()
    resolver = zone.resolver(clock=clock)
    for _ in range(2):
        with pytest.raises(error):
            await resolver.a(name)
    assert zone.count(name, "A") == 1
    clock.now += 60
    with pytest.raises(error):
        await resolver.a(name)
    assert zone.count(name, "A") == 2


async def test_negative_ttl_is_capped(zone):
    clock = FakeClock()
    resolver = zone.resolver(clock=clock, negative_ttl_seconds=5)
    with pytest.raises(NXDomain):
        await resolver.a("missing.example.test")
    clock.now += 5
    zone.add("missing.example.test", "A", "192.0.2.1")
    assert await resolver.a("missing.example.test") == ["192.0.2.1"]


async def test_negative_answer_without_soa_is_not_cached(dns_server):
    resolver = dns_server.resolver()
    for _ in range(2):
        with pytest.raises(NXDomain):
            await resolver.a("nozone.test")
    assert dns_server.count("nozone.test") == 2


async def test_temp_error_is_not_cached(zone):
    zone.add("host.example.test", "A", "192.0.2.1")
    zone.fail("host.example.test", "SERVFAIL")
    resolver = zone.resolver()
    with pytest.raises(TempError):
        await resolver.a("host.example.test")
    zone.heal("host.example.test")
    assert await resolver.a("host.example.test") == ["192.0.2.1"]


async def test_concurrent_identical_lookups_share_one_query(zone):
    zone.add("host.example.test", "A", "192.0.2.1")
    resolver = zone.resolver()
    results = await asyncio.gather(*(resolver.a("HOST.example.test") for _ in range(20)))
    assert results == [["192.0.2.1"]] * 20
    assert zone.count("host.example.test") == 1


async def test_concurrent_identical_failures_share_one_query(zone):
    zone.fail("host.example.test", "SERVFAIL")
    resolver = zone.resolver()
    results = await asyncio.gather(*(resolver.a("host.example.test") for _ in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, TempError) for r in results)
    assert len({id(r) for r in results}) == 5
    assert zone.count("host.example.test") == 1


async def test_a_caller_giving_up_does_not_cancel_the_shared_lookup(zone):
    zone.add("host.example.test", "A", "192.0.2.1")
    resolver = zone.resolver()
    impatient = asyncio.create_task(resolver.a("host.example.test"))
    patient = asyncio.create_task(resolver.a("host.example.test"))
    await asyncio.sleep(0)
    impatient.cancel()
    assert await patient == ["192.0.2.1"]
    assert impatient.cancelled()


async def test_cache_drops_the_least_recently_used_answer(zone):
    for name in ("a", "b", "c"):
        zone.add(f"{name}.example.test", "A", "192.0.2.1")
    resolver = zone.resolver(cache_max_entries=2)
    await resolver.a("a.example.test")
    await resolver.a("b.example.test")
    await resolver.a("a.example.test")
    await resolver.a("c.example.test")  # drops b, used longest ago
    await resolver.a("a.example.test")
    await resolver.a("b.example.test")
    assert [zone.count(f"{n}.example.test") for n in "abc"] == [1, 2, 1]


async def test_cache_can_be_turned_off(zone):
    zone.add("host.example.test", "A", "192.0.2.1")
    resolver = zone.resolver(cache_max_entries=0)
    await resolver.a("host.example.test")
    await resolver.a("host.example.test")
    assert zone.count("host.example.test") == 2


# ------------------------------------------------------------------ DKIM


def rsa_key_record() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


async def test_dkim_dnsfunc_joins_a_split_rsa_key(zone):
    record = rsa_key_record()
    assert len(record) > 255
    zone.add("sel._domainkey.example.test", "TXT", record)
    got = await zone.resolver().dkim_dnsfunc(b"sel._domainkey.example.test.")
    assert got == record.encode()


async def test_dkim_dnsfunc_without_a_key_is_empty(zone):
    resolver = zone.resolver()
    assert await resolver.dkim_dnsfunc(b"missing._domainkey.example.test.") == b""
    assert await resolver.dkim_dnsfunc(b"bad label..example.test") == b""
    assert await resolver.dkim_dnsfunc(b"\xff._domainkey.example.test") == b""


async def test_dkim_dnsfunc_raises_temp_error_when_dns_fails(zone):
    zone.fail("sel._domainkey.example.test", "SERVFAIL")
    with pytest.raises(TempError):
        await zone.resolver().dkim_dnsfunc(b"sel._domainkey.example.test.")
    zone.fail("sel._domainkey.example.test", "timeout")
    with pytest.raises(TempError):
        await zone.resolver(timeout_seconds=5).dkim_dnsfunc(b"sel._domainkey.example.test.",
                                                            timeout=0.2)


# ------------------------------------------------------------------ settings


def test_nameserver_must_be_an_ip_address_with_a_port():
    assert DNSSettings(nameservers=("127.0.0.1:5353", "[::1]:53")).nameservers
    with pytest.raises(ValueError, match="host:port"):
        DNSSettings(nameservers=("127.0.0.1",))
    with pytest.raises(ValueError, match="must be an IP address"):
        DNSSettings(nameservers=("dns.example.com:53",))
    with pytest.raises(ValueError, match="min_ttl_seconds"):
        DNSSettings(min_ttl_seconds=10, max_ttl_seconds=5)


def test_without_nameservers_or_a_system_configuration_start_up_fails(monkeypatch):
    def no_configuration(*args, **kwargs):
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.resolver, "Resolver", no_configuration)
    with pytest.raises(ConfigError, match=r"\[dns\] nameservers is empty"):
        Resolver(DNSSettings())


async def test_zone_server_checks_what_a_test_adds(dns_server):
    with pytest.raises(ValueError, match="cannot read A record"):
        dns_server.add("host.example.test", "A", "not-an-address")
    with pytest.raises(ValueError, match="A-labels"):
        dns_server.add("bücher.example", "A", "192.0.2.1")
    with pytest.raises(ValueError, match="unknown fault"):
        dns_server.fail("example.test", "explode")
    dns_server.add("host.example.test", "A", "192.0.2.1")
    dns_server.add("host.example.test", "A", "192.0.2.2")
    assert dns_server.remove("host.example.test", "A", "192.0.2.1") == 1
    assert await dns_server.resolver().a("host.example.test") == ["192.0.2.2"]
    dns_server.clear()
    with pytest.raises(NXDomain):
        await dns_server.resolver().a("host.example.test")
