"""Metrics registry and the /metrics /healthz /readyz HTTP server, over real sockets."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from typing import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from elemta.metrics import Metrics, MetricsServer

StartServer = Callable[..., Awaitable[MetricsServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[MetricsServer] = []

    async def start(metrics: Metrics | None = None, ready=lambda: (True, "ready"),
                    **kwargs) -> MetricsServer:
        server = MetricsServer(metrics or Metrics(), "127.0.0.1", 0, ready, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


async def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_get, port, path, method)


async def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` as is and return everything until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_endpoint_exposes_smtp_metrics_after_increments(start_server):
    m = Metrics()
    m.connections_total.labels(listener="mx").inc()
    m.connections_active.labels(listener="mx").inc()
    m.connections_refused.labels(listener="mx", reason="per_ip_limit").inc()
    m.messages_received.labels(listener="mx", domain="example.test").inc(2)
    m.messages_rejected.labels(stage="rcpt", plugin="core", code="550", domain="other",
                               reason="relay_denied").inc()
    m.message_size.labels(domain="example.test").observe(3000)
    m.hook_duration.labels(hook="rcpt", plugin="greylist").observe(0.002)
    m.spool_commit.observe(0.004)
    server = await start_server(m)

    status, headers, body = await http(server.port, "/metrics")

    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    got = samples(body)
    assert got[("smtp_connections_total", (("listener", "mx"),))] == 1
    assert got[("smtp_connections_active", (("listener", "mx"),))] == 1
    assert got[("smtp_connections_refused_total",
                (("listener", "mx"), ("reason", "per_ip_limit")))] == 1
    assert got[("smtp_messages_received_total",
                (("domain", "example.test"), ("listener", "mx")))] == 2
    assert got[("smtp_messages_rejected_total",
                (("code", "550"), ("domain", "other"), ("plugin", "core"),
                 ("reason", "relay_denied"), ("stage", "rcpt")))] == 1
    size = (("domain", "example.test"),)
    assert got[("smtp_message_size_bytes_bucket", (*size, ("le", "4096.0")))] == 1
    assert got[("smtp_message_size_bytes_bucket", (*size, ("le", "1024.0")))] == 0
    assert got[("smtp_message_size_bytes_bucket", (*size, ("le", "6.7108864e+07")))] == 1
    assert got[("smtp_hook_duration_seconds_count",
                (("hook", "rcpt"), ("plugin", "greylist")))] == 1
    assert got[("smtp_spool_commit_seconds_count", ())] == 1
    assert b"# TYPE elemta_spool_messages gauge" in body


async def test_head_metrics_sends_headers_only(start_server):
    server = await start_server()
    response = await raw(server.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 0\r\n" not in head
    assert body == b""


async def test_spool_gauge_reads_bound_counts_at_every_scrape(start_server):
    m = Metrics()
    counts = {"ready": 3, "deferred": 1}
    m.bind_spool(lambda: counts)
    server = await start_server(m)

    first = samples((await http(server.port, "/metrics"))[2])
    counts["ready"] = 0
    counts["hold"] = 2
    second = samples((await http(server.port, "/metrics"))[2])

    assert first[("elemta_spool_messages", (("state", "ready"),))] == 3
    assert first[("elemta_spool_messages", (("state", "deferred"),))] == 1
    assert second[("elemta_spool_messages", (("state", "ready"),))] == 0
    assert second[("elemta_spool_messages", (("state", "hold"),))] == 2


async def test_failing_spool_counts_leave_the_rest_of_the_scrape_intact(start_server):
    m = Metrics()
    m.messages_received.labels(listener="mx", domain="none").inc()

    def broken() -> dict[str, int]:
        raise RuntimeError("spool gone")

    m.bind_spool(broken)
    server = await start_server(m)

    status, _, body = await http(server.port, "/metrics")

    assert status == 200
    assert samples(body)[("smtp_messages_received_total",
                          (("domain", "none"), ("listener", "mx")))] == 1


async def test_healthz_is_ok_while_running(start_server):
    server = await start_server()
    status, headers, body = await http(server.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Connection"] == "close"


async def test_readyz_follows_the_readiness_callable(start_server):
    state = {"ok": False, "reason": "spool recovery running"}
    server = await start_server(ready=lambda: (state["ok"], state["reason"]))

    not_ready = await http(server.port, "/readyz")
    state.update(ok=True, reason="ready")
    ready = await http(server.port, "/readyz")

    assert (not_ready[0], not_ready[2]) == (503, b"spool recovery running\n")
    assert (ready[0], ready[2]) == (200, b"ready\n")


async def test_readyz_accepts_an_async_readiness_callable(start_server):
    async def ready() -> tuple[bool, str]:
        await asyncio.sleep(0)
        return True, "ready"

    server = await start_server(ready=ready)
    assert (await http(server.port, "/readyz"))[0] == 200


async def test_readyz_is_503_when_the_readiness_callable_raises(start_server):
    def ready() -> tuple[bool, str]:
        raise RuntimeError("boom")

    server = await start_server(ready=ready)
    status, _, body = await http(server.port, "/readyz")
    assert status == 503
    assert b"RuntimeError" in body


async def test_query_string_is_ignored_for_routing(start_server):
    server = await start_server()
    assert (await http(server.port, "/healthz?verbose=1"))[0] == 200


async def test_unknown_path_is_404(start_server):
    server = await start_server()
    assert (await http(server.port, "/metrics/extra"))[0] == 404
    assert (await http(server.port, "/"))[0] == 404


async def test_post_is_405_with_allow_header(start_server):
    server = await start_server()
    status, headers, _ = await http(server.port, "/metrics", method="POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("request_bytes", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /metrics SMTP/1.0\r\n\r\n",
    b"GET metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
])
async def test_garbage_request_is_400(start_server, request_bytes):
    server = await start_server()
    response = await raw(server.port, request_bytes)
    assert response.startswith(b"HTTP/1.1 400 ")


async def test_oversized_request_header_is_431(start_server):
    server = await start_server()
    request = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"
    response = await raw(server.port, request)
    assert response.startswith(b"HTTP/1.1 431 ")


async def test_many_small_headers_over_the_limit_are_431(start_server):
    server = await start_server()
    request = (b"GET /metrics HTTP/1.1\r\n"
               + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(100)) + b"\r\n")
    response = await raw(server.port, request)
    assert response.startswith(b"HTTP/1.1 431 ")


async def test_silent_client_is_closed_after_the_read_timeout(start_server):
    server = await start_server(read_timeout_seconds=0.3)
    started = time.monotonic()

    response = await raw(server.port, b"", timeout=5)

    assert time.monotonic() - started < 3
    assert response.startswith(b"HTTP/1.1 408 ")


async def test_slow_client_dribbling_headers_is_cut_off_at_the_read_timeout(start_server):
    server = await start_server(read_timeout_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()

    async def dribble() -> None:
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        try:
            while True:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass

    sender = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        sender.cancel()
        writer.close()
    assert time.monotonic() - started < 3
    assert response.startswith(b"HTTP/1.1 408 ")


async def test_stop_returns_promptly_with_an_idle_client_connected():
    server = MetricsServer(Metrics(), "127.0.0.1", 0, lambda: (True, "ready"),
                           read_timeout_seconds=60)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await asyncio.sleep(0.05)  # let the server accept it

    started = time.monotonic()
    await server.stop()
    stopped = time.monotonic() - started

    async with asyncio.timeout(2):
        leftover = await reader.read()
    writer.close()
    assert stopped < 1
    assert leftover == b""


async def test_stop_twice_and_before_start_is_harmless():
    server = MetricsServer(Metrics(), "127.0.0.1", 0, lambda: (True, "ready"))
    await server.stop()
    await server.start()
    await server.stop()
    await server.stop()


async def test_connections_over_the_limit_are_dropped(start_server):
    server = await start_server(max_connections=1, read_timeout_seconds=5)
    _, idle = await asyncio.open_connection("127.0.0.1", server.port)
    await asyncio.sleep(0.05)
    try:
        try:
            refused = await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n", timeout=2)
        except ConnectionResetError:
            refused = b""
        assert refused == b""
    finally:
        idle.close()
    await asyncio.sleep(0.05)
    assert (await http(server.port, "/healthz"))[0] == 200


async def test_port_zero_gives_a_real_bound_port(start_server):
    server = await start_server()
    assert server.port > 0


def test_port_before_start_is_an_error():
    server = MetricsServer(Metrics(), "127.0.0.1", 0, lambda: (True, "ready"))
    with pytest.raises(RuntimeError):
        server.port


async def test_two_metrics_instances_in_one_process_do_not_collide(start_server):
    a, b = Metrics(), Metrics()
    a.messages_received.labels(listener="mx", domain="other").inc(5)
    a.bind_spool(lambda: {"ready": 7})
    b.bind_spool(lambda: {"ready": 1})
    server_a, server_b = await start_server(a), await start_server(b)

    got_a = samples((await http(server_a.port, "/metrics"))[2])
    got_b = samples((await http(server_b.port, "/metrics"))[2])

    series = ("smtp_messages_received_total", (("domain", "other"), ("listener", "mx")))
    assert got_a[series] == 5
    assert series not in got_b
    assert got_a[("elemta_spool_messages", (("state", "ready"),))] == 7
    assert got_b[("elemta_spool_messages", (("state", "ready"),))] == 1


def test_cached_label_children_are_the_registry_series():
    m = Metrics()
    received = m.messages_received.labels(listener="mx", domain="other")
    observe = m.hook_duration.labels(hook="data", plugin="spf").observe
    for _ in range(3):
        received.inc()
        observe(0.01)
    got = samples(m.render())
    assert got[("smtp_messages_received_total", (("domain", "other"), ("listener", "mx")))] == 3
    assert got[("smtp_hook_duration_seconds_count", (("hook", "data"), ("plugin", "spf")))] == 3


def test_plugins_can_register_their_own_metrics_in_the_registry():
    from prometheus_client import Counter

    m = Metrics()
    Counter("greylist_deferred", "Deferred by greylisting.", registry=m.registry).inc()
    assert samples(m.render())[("greylist_deferred_total", ())] == 1


def test_bounded_labels_fold_unknown_values_into_other():
    from elemta import BoundedLabels

    labels = BoundedLabels(["Example.org."])
    assert labels("EXAMPLE.org") == "example.org"
    assert labels("example.org.") == "example.org"
    assert labels("stranger.example") == "other"
    assert labels("") == labels(None) == "other"
    assert BoundedLabels([], other="-")("x.example") == "-"
