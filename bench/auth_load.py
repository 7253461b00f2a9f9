"""Logins under load: do 50 concurrent argon2id logins stall the MX?

    .venv/bin/python bench/auth_load.py [--logins 50] [--seconds 10] [--json FILE]

``elemta serve`` runs in its own process with the datasource (SQLite, one
user with an argon2id hash made by ``elemta users add``, default cost: 19 MiB,
2 passes) and its login cache off, so that every login pays argon2id. One MX
client sends 2 KiB messages to a hosted mailbox, one transaction after the
other (MAIL, RCPT, DATA), and its latency per transaction is measured:

1. alone, for ``--seconds`` (the baseline of this run);
2. while ``--logins`` clients log in without pause on the submission port
   (STARTTLS, AUTH PLAIN with the right password, QUIT, again).

Reported: the MX transaction latency (median, 95th percentile, max) in both
phases and their ratio, the logins per second and their latency, and the
server's RSS before and at its peak (sampled every 50 ms) against the bound
the configuration sets (``max_concurrent_verifications`` × argon2 memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.accept import free_port  # noqa: E402
from bench.serve import elemta, serving  # noqa: E402
from bench.tls_memory import rss_kib  # noqa: E402

PASSWORD = "a password for the benchmark"

CONFIG = """
[server]
hostname = "mx.example.test"
state_dir = "{dir}/state"
max_connections_per_ip = 500
shutdown_grace_seconds = 1

[[listeners]]
name = "mx"
address = "127.0.0.1:{mx}"
mode = "smtp"
tls = "none"

[[listeners]]
name = "submission"
address = "127.0.0.1:{submission}"
mode = "submission"
tls = "starttls"

[spool]
path = "{dir}/queue"

[metrics]
enabled = false

[log]
level = "warning"

[delivery]
enabled = false

[plugins]
enabled = ["datasource"]

[plugins.datasource.auth]
cache_seconds = 0
{threads}
"""

MESSAGE = (b"From: sender@origin.example\r\nTo: rcpt@example.test\r\nSubject: load\r\n\r\n"
           + b"x" * 76 + b"\r\n") * 25


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def mx_client(port: int, stop: asyncio.Event, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_reply(reader)
    writer.write(b"EHLO client.example\r\n")
    await read_reply(reader)
    while not stop.is_set():
        started = time.perf_counter()
        writer.write(b"MAIL FROM:<sender@origin.example>\r\nRCPT TO:<rcpt@example.test>\r\n"
                     b"DATA\r\n")
        for _ in range(3):
            await read_reply(reader)
        writer.write(MESSAGE + b".\r\n")
        reply = await read_reply(reader)
        assert reply.startswith(b"250"), reply
        latencies.append(time.perf_counter() - started)
    writer.write(b"QUIT\r\n")
    writer.close()


async def login_client(port: int, stop: asyncio.Event, ctx: ssl.SSLContext,
                       latencies: list[float], busy: list[float]) -> None:
    import base64

    token = base64.b64encode(f"\0me@example.test\0{PASSWORD}".encode()).decode()
    while not stop.is_set():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(b"EHLO client.example\r\n")
        await read_reply(reader)
        writer.write(b"STARTTLS\r\n")
        await read_reply(reader)
        await writer.start_tls(ctx, server_hostname="mx.example.test")
        writer.write(b"EHLO client.example\r\n")
        await read_reply(reader)
        started = time.perf_counter()
        writer.write(f"AUTH PLAIN {token}\r\n".encode())
        reply = await read_reply(reader)
        if reply.startswith(b"454"):       # more logins waiting than the server lets wait
            busy.append(time.perf_counter() - started)
        else:
            assert reply.startswith(b"235"), reply
            latencies.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        writer.close()
        if busy and busy[-1] and reply.startswith(b"454"):
            await asyncio.sleep(1.0)          # a mail client shows the error; the user waits


async def sample_rss(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kib(pid))
        await asyncio.sleep(0.05)


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"n": len(values), "median_ms": statistics.median(values) * 1000,
            "p95_ms": values[int(len(values) * 0.95)] * 1000, "max_ms": values[-1] * 1000}


async def measure(pid: int, mx: int, submission: int, logins: int,
                  seconds: float) -> dict[str, object]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    base_rss = rss_kib(pid)

    alone: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(mx_client(mx, stop, alone))
    await asyncio.sleep(seconds)
    stop.set()
    await task

    loaded: list[float] = []
    login_times: list[float] = []
    busy: list[float] = []
    peak = [base_rss]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(login_client(submission, stop, ctx, login_times, busy))
             for _ in range(logins)]
    sampler = asyncio.create_task(sample_rss(pid, stop, peak))
    await asyncio.sleep(1.0)                      # the logins are under way
    task = asyncio.create_task(mx_client(mx, stop, loaded))
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - started
    await asyncio.gather(task, sampler, *tasks)
    return {"alone": summary(alone), "with_logins": summary(loaded),
            "logins": {**summary(login_times), "per_second": len(login_times) / (elapsed + 1),
                       "busy": len(busy)},
            "rss_base_mib": base_rss / 1024, "rss_peak_mib": peak[0] / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--logins", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=0,
                    help="[plugins.datasource.auth] max_concurrent_verifications "
                         "(default: the plugin's, every core but one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="elemta-auth-load-") as d:
        mx, submission = free_port(), free_port()
        config = Path(d) / "elemta.toml"
        config.write_text(CONFIG.format(
            dir=d, mx=mx, submission=submission,
            threads=f"max_concurrent_verifications = {args.threads}" if args.threads else ""))
        elemta(config, "domains", "add", "example.test")
        elemta(config, "mailboxes", "add", "rcpt@example.test")
        elemta(config, "users", "add", "me@example.test", "--password-stdin",
               stdin=PASSWORD + "\n")
        with serving(config) as proc:
            result = asyncio.run(measure(proc.pid, mx, submission, args.logins, args.seconds))
    a, b, lg = result["alone"], result["with_logins"], result["logins"]
    print(f"MX transaction latency, alone: median {a['median_ms']:.1f} ms, p95 "
          f"{a['p95_ms']:.1f} ms, max {a['max_ms']:.1f} ms ({a['n']} transactions)")
    print(f"... with {args.logins} clients logging in: median {b['median_ms']:.1f} ms, p95 "
          f"{b['p95_ms']:.1f} ms, max {b['max_ms']:.1f} ms ({b['n']} transactions); "
          f"p95 ratio {b['p95_ms'] / a['p95_ms']:.2f}")
    print(f"logins: {lg['per_second']:.1f}/s, median {lg['median_ms']:.0f} ms, p95 "
          f"{lg['p95_ms']:.0f} ms, max {lg['max_ms']:.0f} ms; {lg['busy']} answered 454 "
          "(more waiting than max_waiting_verifications)")
    print(f"server RSS: {result['rss_base_mib']:.0f} MiB before, peak "
          f"{result['rss_peak_mib']:.0f} MiB (bound of the hashing: "
          f"{args.threads or max(1, (os.cpu_count() or 2) - 1)} x 19 MiB)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
