"""Per-domain metrics, scraped from a running server's /metrics after real SMTP sessions.

The domain label takes the local domains, ``[metrics] domains``, ``other`` and
``none``; smtp_queue_size follows queued, deferred, delivered, bounced and the
queue commands, and is counted from the spool at start-up.
"""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from elemta import Outcome, Route, hookimpl
from elemta.testing.client import RawSMTP

MSG = b"Subject: metrics\r\n\r\nhello\r\n.\r\n"
RELAY_CLIENT = "127.0.0.2"   # in relay_networks; 127.0.0.1 is not

CONFIG = {
    "server": {"relay_networks": [f"{RELAY_CLIENT}/32"]},
    "metrics": {"domains": ["Partner.Example."]},
}


async def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def series(got, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def queue(got, domain: str, status: str) -> float:
    return series(got, "smtp_queue_size", domain=domain, status=status)


def domain_values(got, name: str) -> set[str]:
    return {dict(labels)["domain"] for n, labels in got if n == name and dict(labels).get("domain")}


async def send(server, rcpts: list[str], *, source: str | None = RELAY_CLIENT,
               sender: str = "a@example.test") -> str:
    async with RawSMTP(server.port("mx"), source=source) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message(sender, rcpts, MSG)
    assert reply.code == 250, str(reply)
    await server.app.spool.checkpoint()
    return reply.text.rsplit(" ", 1)[1]


class Transport:
    """A transport plugin: ``defer@`` is retried later, ``bounce@`` refused, others taken."""

    def __init__(self) -> None:
        self.delivered: list[str] = []

    @hookimpl(tryfirst=True)
    def route(self, recipient):
        return Route(transport="test-transport", destination=recipient.address.split("@")[1])

    @hookimpl(tryfirst=True)
    async def deliver(self, route, recipients):
        if route.transport != "test-transport":
            return None
        await asyncio.sleep(0.01)
        out = []
        for r in recipients:
            local = r.address.split("@")[0]
            if local == "defer":
                out.append(Outcome(r.address, 451, "4.2.0", "try later"))
            elif local == "bounce":
                out.append(Outcome(r.address, 550, "5.1.1", "no such user"))
            else:
                self.delivered.append(r.address)
                out.append(Outcome(r.address, 250, "2.0.0", "taken"))
        return out


async def settle(server, check, timeout: float = 10.0):
    """Scrape until ``check(got)`` holds; the last scrape."""
    async with asyncio.timeout(timeout):
        while True:
            got = await scrape(server)
            if check(got):
                return got
            await asyncio.sleep(0.05)


def agrees_with_spool(server, got) -> None:
    """The event-kept gauge equals a count made from the spool's files."""
    server.app.spool.wait_written()
    fold = server.app.metrics.domain_label
    expected: dict[tuple[str, str], int] = {}
    for state, env in server.app.spool.iter_envelopes():
        if state in ("ready", "deferred", "hold"):
            for domain in {fold(r.address.rpartition("@")[2]) for r in env.pending()}:
                expected[(domain, state)] = expected.get((domain, state), 0) + 1
    gauge = {(dict(labels)["domain"], dict(labels)["status"]): value
             for (name, labels), value in got.items() if name == "smtp_queue_size" and value}
    assert gauge == expected


async def test_received_size_and_rejected_are_labelled_by_bounded_domain(elemta_server):
    server = await elemta_server(CONFIG)
    await send(server, ["u@example.test", "v@EXAMPLE.test"], source=None)
    await send(server, ["u@example.test", "p@partner.example", "x@elsewhere.example",
                        "y@another.example"])
    async with RawSMTP(server.port("mx")) as c:          # not in relay_networks
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        assert (await c.cmd("RCPT TO:<x@stranger.example>")).code == 550
        assert (await c.cmd("RCPT TO:<p@partner.example>")).code == 550
        assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: x\r\n\r\nnul \x00 here\r\n.\r\n")
        assert (await c.read_reply()).code == 554
        assert (await c.cmd("MAIL FROM:<a@b.example> SIZE=999999999999")).code == 552
    got = await scrape(server)

    received = "smtp_messages_received_total"
    assert series(got, received, listener="mx", domain="example.test") == 2
    assert series(got, received, listener="mx", domain="partner.example") == 1
    # two strangers' domains in one message: one "other", counted once
    assert series(got, received, listener="mx", domain="other") == 1
    assert domain_values(got, received) == {"example.test", "partner.example", "other"}
    assert series(got, "smtp_message_size_bytes_count", domain="example.test") == 2
    assert series(got, "smtp_message_size_bytes_count", domain="other") == 1
    assert series(got, "smtp_message_size_bytes_sum", domain="partner.example") > 20

    rejected = "smtp_messages_rejected_total"
    denied = {"stage": "rcpt", "plugin": "elemta.default_relay", "code": "550",
              "reason": "relay_denied"}
    assert series(got, rejected, domain="other", **denied) == 1
    assert series(got, rejected, domain="partner.example", **denied) == 1
    # refused content: the domains of the transaction's recipients
    assert series(got, rejected, stage="data", plugin="core", code="554",
                  domain="example.test", reason="protocol") == 1
    # refused before any recipient
    assert series(got, rejected, stage="mail", plugin="core", code="552",
                  domain="none", reason="size") == 1


async def test_rejections_before_any_recipient_are_domain_none(elemta_server):
    class Refuse:
        @hookimpl
        def mail(self, sender):
            from elemta import Reject
            return Reject(550, "5.7.1", "not you")

    server = await elemta_server(CONFIG, plugins=[("refuse", Refuse())])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 550
    got = await scrape(server)
    assert series(got, "smtp_messages_rejected_total", stage="mail", plugin="refuse",
                  code="550", domain="none", reason="policy") == 1


async def test_queue_size_follows_each_event_and_sent_and_delivery_duration_too(elemta_server):
    transport = Transport()
    config = {**CONFIG, "delivery": {"enabled": True, "workers": 2,
                                     "retry_intervals_seconds": [3600]}}
    server = await elemta_server(config, plugins=[("transport", transport)])
    queue_id = await send(server, ["ok@example.test", "defer@example.test",
                                   "bounce@partner.example", "x@elsewhere.example"])
    # one delivered, one deferred, one bounced (its DSN goes to a@example.test), one delivered
    got = await settle(server, lambda g: "a@example.test" in transport.delivered
                       and queue(g, "example.test", "deferred") == 1
                       and queue(g, "example.test", "ready") == 0)
    assert queue(got, "partner.example", "deferred") == 0    # bounced: not waiting
    assert queue(got, "other", "deferred") == 0              # delivered
    assert series(got, "smtp_messages_sent_total", domain="example.test") == 2  # ok@, the DSN
    assert series(got, "smtp_messages_sent_total", domain="other") == 1
    assert series(got, "smtp_messages_sent_total", domain="partner.example") == 0
    duration = "smtp_delivery_duration_seconds_count"
    assert series(got, duration, domain="example.test", type="test-transport") == 2
    assert series(got, duration, domain="partner.example", type="test-transport") == 1
    assert series(got, duration, domain="other", type="test-transport") == 1
    assert series(got, "smtp_delivery_duration_seconds_sum", domain="other",
                  type="test-transport") >= 0.01
    agrees_with_spool(server, got)

    admin = server.app.queue_admin
    assert (await admin.hold([queue_id])).ok
    got = await scrape(server)
    assert (queue(got, "example.test", "hold"), queue(got, "example.test", "deferred")) == (1, 0)
    agrees_with_spool(server, got)

    assert (await admin.release([queue_id])).ok             # due now: tried again, deferred
    got = await settle(server, lambda g: queue(g, "example.test", "deferred") == 1
                       and queue(g, "example.test", "hold") == 0
                       and queue(g, "example.test", "ready") == 0)
    agrees_with_spool(server, got)

    assert (await admin.delete([queue_id])).ok
    got = await scrape(server)
    assert queue(got, "example.test", "deferred") == 0
    agrees_with_spool(server, got)
    assert len(server.app.metrics.queue_size) == 0


async def test_queue_size_is_counted_from_the_spool_at_start_up(elemta_server):
    first = await elemta_server(CONFIG)
    await send(first, ["u@example.test", "p@partner.example"])
    await send(first, ["v@example.test"])
    await send(first, ["w@faraway.example"])
    got = await scrape(first)
    assert queue(got, "example.test", "ready") == 2
    assert queue(got, "partner.example", "ready") == 1
    assert queue(got, "other", "ready") == 1
    spool = first.spool_path
    await first.app.stop(grace=1)

    second = await elemta_server({**CONFIG, "spool": {"path": str(spool)}})
    await second.app.queue_counted          # counted in the background after start-up
    got = await scrape(second)
    assert queue(got, "example.test", "ready") == 2
    assert queue(got, "partner.example", "ready") == 1
    assert queue(got, "other", "ready") == 1
    agrees_with_spool(second, got)


async def test_without_the_metrics_endpoint_the_queue_is_not_read_again_at_start_up(
        elemta_server, monkeypatch):
    from elemta.spool.store import Spool

    first = await elemta_server(CONFIG)
    await send(first, ["u@example.test"])
    spool = first.spool_path
    await first.app.stop(grace=1)

    read: list[str] = []
    real = Spool.iter_envelopes

    def spying(self, *args, **kwargs):
        read.append("scan")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Spool, "iter_envelopes", spying)
    second = await elemta_server({**CONFIG, "spool": {"path": str(spool)},
                                  "metrics": {"enabled": False}})
    assert second.app.queue_counted is None and read == []
    assert second.app.spool.counts()["ready"] == 1, "recovery still found the message"


async def test_domain_label_values_are_bounded_whatever_clients_send(elemta_server):
    server = await elemta_server(CONFIG)
    for i in range(30):
        await send(server, [f"x@random{i}.example"])
    got = await scrape(server)
    for name in ("smtp_messages_received_total", "smtp_queue_size"):
        assert domain_values(got, name) <= {"example.test", "partner.example", "other", "none"}
    assert queue(got, "other", "ready") == 30


# ------------------------------------------------------------------ the pieces, without a server


def test_every_reject_reason_has_its_case():
    from elemta.domain_metrics import REJECT_REASONS, reject_reason
    cases = {("auth", "datasource", 535): "auth", ("mail", None, 552): "size",
             ("rcpt", None, 452): "resources", ("rcpt", "greylist", 451): "tempfail",
             ("rcpt", "elemta.default_relay", 550): "relay_denied",
             ("rcpt", None, 550): "relay_denied", ("data", "dmarc", 550): "policy",
             ("data", None, 554): "protocol"}
    assert {reject_reason(*c) for c in cases} == set(REJECT_REASONS)
    for case, reason in cases.items():
        assert reject_reason(*case) == reason, case


def test_queue_size_sets_rather_than_adds_so_repeated_events_change_nothing():
    from elemta.metrics import Metrics
    m = Metrics(process_metrics=False, domains=["example.test"])
    q = m.queue_size

    def value(domain, status):
        return m.registry.get_sample_value("smtp_queue_size",
                                           {"domain": domain, "status": status}) or 0

    q.set("A", "ready", ["a@example.test", "b@Example.Test", "c@x.example"])
    q.set("A", "ready", ["a@example.test", "c@x.example"])         # the same again
    q.set("B", "ready", ["d@y.example"])
    assert (value("example.test", "ready"), value("other", "ready")) == (1, 2)
    q.moved("A", "hold")
    assert (value("example.test", "hold"), value("other", "hold")) == (1, 1)
    assert (value("example.test", "ready"), value("other", "ready")) == (0, 1)
    q.set("A", "deferred", [])                                     # nothing pending: gone
    q.remove("B")
    q.remove("B")
    assert len(q) == 0
    assert all(value(d, s) == 0 for d in ("example.test", "other")
               for s in ("ready", "deferred", "hold"))


async def test_mail_the_server_queues_itself_is_counted_once_durable(elemta_server):
    server = await elemta_server(CONFIG)
    queue_id = await server.app.queue_message(
        "postmaster@example.test", ["n@partner.example", "m@example.test"],
        b"Subject: notice\r\n\r\nfrom the server\r\n", note="test notice")
    await server.app.spool.checkpoint()
    got = await settle(server, lambda g: queue(g, "partner.example", "ready") == 1)
    assert queue(got, "example.test", "ready") == 1
    assert queue_id in server.app.metrics.queue_size
    agrees_with_spool(server, got)


async def test_quarantined_message_waits_in_hold(elemta_server):
    class Quarantining:
        @hookimpl
        def data(self):
            from elemta import Quarantine
            return Quarantine("suspicious")

    server = await elemta_server(CONFIG, plugins=[("q", Quarantining())])
    await send(server, ["u@example.test", "x@faraway.example"])
    got = await scrape(server)
    assert (queue(got, "example.test", "hold"), queue(got, "other", "hold")) == (1, 1)
    assert queue(got, "example.test", "ready") == 0
    agrees_with_spool(server, got)


def test_the_start_up_count_leaves_what_events_changed_meanwhile():
    """The spool is counted in the background: a message delivered, moved or changed by
    an event while it is counted keeps what the event said."""
    from prometheus_client import CollectorRegistry, Gauge

    from elemta.domain_metrics import QueueSize

    gauge = Gauge("q", "q", ["domain", "status"], registry=CollectorRegistry())
    queue = QueueSize(gauge, lambda d: d or "none")
    queue.begin_count()
    queue.remove("DELIVERED")                       # delivered before the count saw it
    queue.set("CHANGED", "deferred", ["a@b.example"])
    queue.counted("DELIVERED", "ready", ["x@b.example"])
    queue.counted("CHANGED", "ready", ["a@b.example", "c@d.example"])
    queue.counted("UNTOUCHED", "hold", ["e@f.example"])
    queue.end_count()
    assert "DELIVERED" not in queue and len(queue) == 2
    assert gauge.labels(domain="b.example", status="deferred")._value.get() == 1
    assert gauge.labels(domain="b.example", status="ready")._value.get() == 0
    assert gauge.labels(domain="f.example", status="hold")._value.get() == 1
