"""Memory of TLS sessions: the server's RSS with many idle TLS sessions, and after they close.

    .venv/bin/python bench/tls_memory.py [--sessions 1000] [--rounds 2] [--json FILE]

``elemta serve`` runs in its own process with an implicit-TLS listener and a
STARTTLS one (self-signed certificate, connection limits raised out of the
way). The client opens ``--sessions`` sessions, half of them implicit TLS and
half STARTTLS after EHLO, each left idle after its TLS handshake and a
greeting or EHLO reply; then the same number of *stalled* handshakes (TCP
connected, no ClientHello sent). The server's RSS (``/proc/PID/status``
VmRSS) is read before, with the sessions open, and a few seconds after they
all closed; each phase repeats ``--rounds`` times on the same server, so that
memory not given back shows as growth from round to round.

The figures are RSS above the baseline, in MiB, and per session in KiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.accept import free_port  # noqa: E402
from bench.serve import serving  # noqa: E402

CONFIG = """
[server]
hostname = "mx.example.test"
state_dir = "{dir}/state"
max_connections = {limit}
max_connections_per_ip = {limit}
command_timeout_seconds = 300
shutdown_grace_seconds = 1

[[listeners]]
name = "smtps"
address = "127.0.0.1:{implicit}"
mode = "smtp"
tls = "implicit"

[[listeners]]
name = "mx"
address = "127.0.0.1:{starttls}"
mode = "smtp"
tls = "starttls"

[spool]
path = "{dir}/queue"

[metrics]
enabled = false

[log]
level = "warning"

[delivery]
enabled = false
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def implicit_session(port: int, ctx: ssl.SSLContext):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="mx.example.test")
    line = await reader.readline()
    assert line.startswith(b"220"), line
    return writer


async def starttls_session(port: int, ctx: ssl.SSLContext):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"220")
    writer.write(b"EHLO client.example\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    writer.write(b"STARTTLS\r\n")
    assert (await reader.readline()).startswith(b"220")
    await writer.start_tls(ctx, server_hostname="mx.example.test")
    writer.write(b"EHLO client.example\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    return writer


async def stalled(port: int):
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    return writer


async def open_all(factories) -> list:
    writers = []
    for i in range(0, len(factories), 50):  # 50 at a time: no SYN flood of the backlog
        writers += await asyncio.gather(*(f() for f in factories[i:i + 50]))
    return writers


async def close_all(writers) -> None:
    for w in writers:
        w.transport.abort()
    await asyncio.sleep(0)


async def measure(pid: int, sessions: int, implicit: int, starttls: int,
                  rounds: int) -> list[dict[str, float]]:
    ctx = client_context()
    out = []
    for _ in range(rounds):
        base = rss_kib(pid)
        half = sessions // 2
        writers = await open_all([lambda: implicit_session(implicit, ctx)] * half
                                 + [lambda: starttls_session(starttls, ctx)] * (sessions - half))
        await asyncio.sleep(2)
        idle = rss_kib(pid)
        await close_all(writers)
        await asyncio.sleep(3)
        after_idle = rss_kib(pid)
        writers = await open_all([lambda: stalled(implicit)] * sessions)
        await asyncio.sleep(2)
        stall = rss_kib(pid)
        await close_all(writers)
        await asyncio.sleep(3)
        after = rss_kib(pid)
        out.append({"base_kib": base, "idle_kib": idle, "after_idle_kib": after_idle,
                    "stalled_kib": stall, "after_kib": after})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    with tempfile.TemporaryDirectory(prefix="elemta-tls-mem-") as d:
        implicit, starttls = free_port(), free_port()
        config = Path(d) / "elemta.toml"
        config.write_text(CONFIG.format(dir=d, implicit=implicit, starttls=starttls,
                                        limit=args.sessions * 3))
        with serving(config) as proc:
            results = asyncio.run(measure(proc.pid, args.sessions, implicit, starttls,
                                          args.rounds))
    n = args.sessions
    print(f"{n} sessions (half implicit TLS, half STARTTLS), then {n} stalled handshakes; "
          "server RSS above the round's baseline:")
    print("| round | baseline MiB | idle TLS sessions | after they closed | stalled handshakes "
          "| after they closed |")
    print("|---|---|---|---|---|---|")
    first = results[0]["base_kib"]
    for i, r in enumerate(results, 1):
        def above(key: str) -> str:
            extra = r[key] - r["base_kib"]
            return f"{extra / 1024:.0f} MiB ({extra / n:.0f} KiB/session)"
        print(f"| {i} | {r['base_kib'] / 1024:.0f} (+{(r['base_kib'] - first) / 1024:.0f} "
              f"since round 1) | {above('idle_kib')} | {(r['after_idle_kib'] - r['base_kib']) / 1024:.0f} MiB "
              f"| {above('stalled_kib')} | {(r['after_kib'] - r['base_kib']) / 1024:.0f} MiB |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
