"""Outbound SMTP client cost: Elemta's own client against aiosmtplib, on the same load.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/smtp_client.py [--rounds 3] [--messages 5000]
        [--concurrency 1,10] [--per-connection 0] [--size 4096] [--servers smtp-sink,aiosmtpd]
        [--clients elemta,aiosmtplib] [--tls] [--uvloop] [--json FILE]

Each client sends ``--messages`` messages of ``--size`` octets (one recipient)
over ``--concurrency`` connections at once, every connection sending one
message after the other; ``--per-connection N`` closes a connection after N
messages and opens a new one (0: connections stay open for the whole run).

* **elemta**: :class:`elemta.SMTPConnection`, with
  PIPELINING when the server offers it (smtp-sink does; aiosmtpd does not
  advertise it, so there it sends one command at a time, like aiosmtplib).
* **aiosmtplib**: ``aiosmtplib.SMTP`` connected and greeted once per connection,
  then ``sendmail(sender, [rcpt], bytes)`` per message. This is the least a
  wrapper would do: no long-line wrapping, no SMTPUTF8/BODY parameters, no
  per-recipient results. A real wrapper would only cost more.

The servers run in their own processes: Postfix's ``smtp-sink`` (C, the
ceiling of this machine) and a bare aiosmtpd 1.4.6 that discards every message.
The client runs in this process, so its CPU is this process's user+sys time
over the run (``time.process_time``), reported per message; the server's CPU
comes from ``/proc/PID/stat``. Every run must end with every message answered
250, or the benchmark stops. Rounds rotate the order of the clients so that
drift on a shared machine hits both; the table shows median [min-max].

``--tls``: STARTTLS to the aiosmtpd server (a trustme certificate, not
verified). smtp-sink has no TLS, so with ``--tls`` only aiosmtpd is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accept import free_port, proc_cpu  # noqa: E402  (bench/ is sys.path[0])
from elemta import SMTPConnection, Timeouts, TLSPolicy

SENDER = "sender@example.org"
RECIPIENT = "user@example.test"
HELO = "client.example.org"
MX_HOST = "mx.example.test"
BODY_LINE = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"

AIOSMTPD_SINK = textwrap.dedent('''
    import asyncio, os, signal, ssl, sys
    from pathlib import Path
    from aiosmtpd.smtp import SMTP

    host, port, ready, loop_name, cert, key = sys.argv[1:7]

    class Discard:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 OK"

    async def main():
        context = None
        if cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Discard(), hostname="mx.example.test", tls_context=context),
            host, int(port), reuse_address=True, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        Path(ready).write_text(str(os.getpid()))
        await stop.wait()
        server.close()

    if loop_name == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
''')


class BenchError(Exception):
    """A run did not deliver everything, or a server did not start; the figures would be wrong."""


@dataclass
class Run:
    client: str
    server: str
    concurrency: int
    messages: int
    seconds: float
    client_cpu_us: float   # per message
    server_cpu_us: float   # per message

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def make_message(size: int) -> bytes:
    head = (b"From: sender@example.org\r\nTo: user@example.test\r\nSubject: bench\r\n"
            b"Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    body = BODY_LINE * ((size - len(head)) // len(BODY_LINE) + 1)
    return (head + body)[:size - 2] + b"\r\n"


def wait_port(port: int, deadline_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"no server on port {port}")


class Server:
    def __init__(self, kind: str, loop_name: str, tls_files: tuple[str, str] | None,
                 workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        if kind == "smtp-sink":
            sink = shutil.which("smtp-sink") or shutil.which("smtp-sink", path="/usr/sbin:/sbin")
            if sink is None:
                raise BenchError("smtp-sink not found (apt-get install postfix)")
            # It refuses to run as root without -u; 1000 is the listen backlog.
            user = ["-u", pwd.getpwuid(os.geteuid()).pw_name] if os.geteuid() == 0 else []
            self.proc = subprocess.Popen([sink, *user, f"127.0.0.1:{self.port}", "1000"],
                                         stdout=subprocess.DEVNULL)
            wait_port(self.port)
        else:
            script = workdir / "aiosmtpd_sink.py"
            script.write_text(AIOSMTPD_SINK)
            ready = workdir / f"ready-{self.port}"
            cert, key = tls_files or ("", "")
            self.proc = subprocess.Popen([sys.executable, str(script), "127.0.0.1", str(self.port),
                                          str(ready), loop_name, cert, key])
            deadline = time.monotonic() + 20
            while not ready.exists():
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise BenchError("the aiosmtpd sink did not start")
                time.sleep(0.05)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------ clients

Sender = Callable[[int, int, bytes, bool], Awaitable[int]]


async def elemta_connection(port: int, count: int, message: bytes, tls: bool) -> int:
    policy = TLSPolicy("required" if tls else "none")
    conn = await SMTPConnection.open("127.0.0.1", port, mx_host=MX_HOST, helo=HELO, tls=policy,
                                     timeouts=Timeouts.uniform(30))
    sent = 0
    try:
        for _ in range(count):
            result = await conn.send(SENDER, [RECIPIENT], message)
            if not result.results[0].delivered:
                raise BenchError(f"elemta: not delivered: {result.results[0]}")
            sent += 1
    finally:
        await conn.close()
    return sent


async def aiosmtplib_connection(port: int, count: int, message: bytes, tls: bool) -> int:
    import aiosmtplib

    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname=HELO,
                           start_tls=False, use_tls=False, timeout=30)
    await smtp.connect()
    await smtp.ehlo()
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        await smtp.starttls(tls_context=context, server_hostname=MX_HOST)
    sent = 0
    try:
        for _ in range(count):
            errors, _response = await smtp.sendmail(SENDER, [RECIPIENT], message)
            if errors:
                raise BenchError(f"aiosmtplib: not delivered: {errors}")
            sent += 1
    finally:
        await smtp.quit()
    return sent


CLIENTS: dict[str, Sender] = {"elemta": elemta_connection, "aiosmtplib": aiosmtplib_connection}


async def drive(client: Sender, port: int, messages: int, concurrency: int, per_connection: int,
                message: bytes, tls: bool) -> int:
    shares = [messages // concurrency + (i < messages % concurrency) for i in range(concurrency)]

    async def worker(share: int) -> int:
        done = 0
        while done < share:
            done += await client(port, min(share - done, per_connection or share), message, tls)
        return done

    return sum(await asyncio.gather(*(worker(share) for share in shares if share)))


def one_run(client_name: str, server: Server, messages: int, concurrency: int, per_connection: int,
            message: bytes, tls: bool, loop_name: str) -> Run:
    client = CLIENTS[client_name]

    async def timed() -> tuple[float, float, float, int]:
        cpu0, server0, wall0 = time.process_time(), server.cpu(), time.perf_counter()
        sent = await drive(client, server.port, messages, concurrency, per_connection, message, tls)
        return (time.perf_counter() - wall0, time.process_time() - cpu0, server.cpu() - server0,
                sent)

    runner = asyncio.run
    if loop_name == "uvloop":
        import uvloop
        runner = uvloop.run
    # warm-up: imports, TLS contexts, the server's first connections
    runner(drive(client, server.port, min(200, messages), concurrency, per_connection, message, tls))
    wall, cpu, server_cpu, sent = runner(timed())
    if sent != messages:
        raise BenchError(f"{client_name}: sent {sent} of {messages}")
    return Run(client_name, server.kind, concurrency, messages, wall,
               cpu / messages * 1e6, server_cpu / messages * 1e6)


def fmt(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    return f"{med:,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,10")
    parser.add_argument("--per-connection", type=int, default=0)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--servers", default="smtp-sink,aiosmtpd")
    parser.add_argument("--clients", default="elemta,aiosmtplib")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    loop_name = "uvloop" if args.uvloop else "asyncio"
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    clients = args.clients.split(",")
    if args.tls:
        servers = [s for s in servers if s != "smtp-sink"]
    message = make_message(args.size)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-smtp-client-") as tmp:
        workdir = Path(tmp)
        tls_files = None
        if args.tls:
            import trustme
            ca = trustme.CA()
            leaf = ca.issue_cert(MX_HOST)
            cert, key = workdir / "cert.pem", workdir / "key.pem"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key.write_bytes(leaf.private_key_pem.bytes())
            tls_files = (str(cert), str(key))
        print(f"{args.messages} messages of {len(message)} octets per run, {args.rounds} rounds, "
              f"loop {loop_name}, {'STARTTLS' if args.tls else 'plaintext'}, "
              f"{args.per_connection or 'all'} messages per connection")
        for round_no in range(args.rounds):
            order = clients[round_no % len(clients):] + clients[:round_no % len(clients)]
            for server_kind in servers:
                for concurrency in concurrencies:
                    for client_name in order:
                        server = Server(server_kind, loop_name, tls_files, workdir)
                        try:
                            run = one_run(client_name, server, args.messages, concurrency,
                                          args.per_connection, message, args.tls, loop_name)
                        finally:
                            server.stop()
                        runs.append(run)
                        print(f"  round {round_no + 1} {server_kind:9} c={concurrency:<3} "
                              f"{client_name:10} {run.rate:8,.0f} msg/s  client "
                              f"{run.client_cpu_us:6.0f} us/msg  server {run.server_cpu_us:6.0f} us/msg",
                              flush=True)

    print()
    print("| server | conc. | client | msg/s | client CPU us/msg | server CPU us/msg |")
    print("|---|---|---|---|---|---|")
    medians: dict[tuple[str, int, str], float] = {}
    for server_kind in servers:
        for concurrency in concurrencies:
            for client_name in clients:
                mine = [r for r in runs if (r.server, r.concurrency, r.client)
                        == (server_kind, concurrency, client_name)]
                medians[server_kind, concurrency, client_name] = statistics.median(
                    r.client_cpu_us for r in mine)
                print(f"| {server_kind} | {concurrency} | {client_name} | "
                      f"{fmt([r.rate for r in mine])} | {fmt([r.client_cpu_us for r in mine])} | "
                      f"{fmt([r.server_cpu_us for r in mine])} |")
    if "elemta" in clients and "aiosmtplib" in clients:
        print()
        for server_kind in servers:
            for concurrency in concurrencies:
                ratio = (medians[server_kind, concurrency, "aiosmtplib"]
                         / medians[server_kind, concurrency, "elemta"])
                print(f"{server_kind} c={concurrency}: aiosmtplib costs {ratio:.2f}x the client "
                      f"CPU per message of elemta's client")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"rate": r.rate} for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        sys.exit(1)
