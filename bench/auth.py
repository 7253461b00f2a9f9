"""Acceptance with SPF, DKIM and DMARC on, and the cost of DKIM signing.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/auth.py [--rounds 3] [--messages 3000]
        [--concurrency 10] [--json FILE]

``elemta serve`` takes the same load from Postfix's ``smtp-source -F``: one
4 KiB message, DKIM-signed (RSA-2048, relaxed/relaxed) by ``example.org``,
sent by ``sender@example.org`` from 127.0.0.1. A local authoritative DNS
server (``elemta.testing.ZoneServer``, in this process) publishes the domain's
SPF (``ip4:127.0.0.1 -all``), DKIM key and DMARC policy (``p=reject``), so
every message passes all three; the warm-up fills the server's DNS cache. In
one run, rounds alternating and rotating their order:

* **none**: no plugin (the baseline of this run);
* **auth**: elemta-spf, elemta-dkim (verifying) and elemta-dmarc (with its
  report store) — the issue's target is at least 0.5 of **none**;
* **sign-rsa**, **sign-ed25519**: elemta-dkim only, signing every message
  (the client is in ``relay_networks``, ``sign_relay = true``) with an
  RSA-2048 or an Ed25519 key: the signing rate of the whole server.

Reported: messages per second (median of rounds, with the range) and the
ratio to **none**; and the server's CPU time per message (all its threads,
from ``/proc``) with its ratio, which depends less on what else the machine
is running than the throughput does.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.abuse import Configured  # noqa: E402
from bench.accept import RECIPIENT, SENDER, send  # noqa: E402

DOMAIN = SENDER.rpartition("@")[2]

PLUGINS = {
    "auth": """
[plugins]
enabled = ["spf", "dkim", "dmarc"]
""",
    "sign-rsa": """
[plugins]
enabled = ["dkim"]

[plugins.dkim]
verify = false
sign_relay = true

[[plugins.dkim.keys]]
domain = "{domain}"
selector = "rsa"
key_file = "{dir}/rsa.key"
""",
    "sign-ed25519": """
[plugins]
enabled = ["dkim"]

[plugins.dkim]
verify = false
sign_relay = true

[[plugins.dkim.keys]]
domain = "{domain}"
selector = "ed"
algorithm = "ed25519"
key_file = "{dir}/ed.key"
""",
}


def keys(folder: Path) -> dict[str, str]:
    """An RSA-2048 and an Ed25519 key in ``folder`` (0600); their DNS records."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    records = {}
    for name, key in (("rsa", rsa_key), ("ed", ed_key)):
        path = folder / f"{name}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        os.chmod(path, 0o600)
    rsa_pub = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    ed_pub = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)
    records["rsa"] = f"v=DKIM1; k=rsa; p={base64.b64encode(rsa_pub).decode()}"
    records["ed"] = f"v=DKIM1; k=ed25519; p={base64.b64encode(ed_pub).decode()}"
    return records


def signed_message(folder: Path) -> Path:
    """The message smtp-source sends (LF line ends: it adds the CR), signed by rsa."""
    import dkim

    body = "".join(f"line {i} of the benchmark message, long enough to look like mail\r\n"
                   for i in range(55))
    message = (f"From: Sender <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\n"
               f"Message-ID: <bench@{DOMAIN}>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
               f"\r\n{body}").encode()
    signature = dkim.sign(message, b"rsa", DOMAIN.encode(), (folder / "rsa.key").read_bytes(),
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    path = folder / "message.txt"
    path.write_bytes((signature + message).replace(b"\r\n", b"\n"))
    return path


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid``, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(kind: str, workdir: Path, smtp_source: str, message: Path, messages: int,
            concurrency: int, nameserver: str, keydir: Path) -> tuple[float, float]:
    """(messages per second, CPU milliseconds of the server per message)."""
    server = Configured(workdir, "asyncio")
    server.tail = f'\n[dns]\nnameservers = ["{nameserver}"]\n'
    if kind != "none":
        server.tail += PLUGINS[kind].format(domain=DOMAIN, dir=keydir)
    server.relay = kind.startswith("sign")
    server.start()
    try:
        command = [smtp_source, "-F", str(message), "-s", str(concurrency), "-f", SENDER,
                   "-t", RECIPIENT, f"127.0.0.1:{server.port}"]
        send([command[:1] + ["-m", "300"] + command[1:]])         # warm-up, DNS cache
        cpu = cpu_seconds(server.proc.pid)
        started = time.perf_counter()
        send([command[:1] + ["-m", str(messages)] + command[1:]])
        elapsed = time.perf_counter() - started
        return messages / elapsed, (cpu_seconds(server.proc.pid) - cpu) / messages * 1e3
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    smtp_source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    from elemta.testing import ZoneServer

    kinds = ["none", "auth", "sign-rsa", "sign-ed25519"]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="elemta-auth-bench-") as d, ZoneServer() as zone:
        folder = Path(d)
        records = keys(folder)
        zone.zone(DOMAIN)
        zone.add(DOMAIN, "TXT", "v=spf1 ip4:127.0.0.1 -all")
        zone.add(f"_dmarc.{DOMAIN}", "TXT", "v=DMARC1; p=reject")
        zone.add(f"rsa._domainkey.{DOMAIN}", "TXT", records["rsa"])
        zone.add(f"ed._domainkey.{DOMAIN}", "TXT", records["ed"])
        message = signed_message(folder)
        for r in range(args.rounds):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                rate, cpu = run_one(kind, folder / f"{kind}-{r}", smtp_source, message,
                                    args.messages, args.concurrency, zone.nameserver, folder)
                rates[kind].append(rate)
                cpus[kind].append(cpu)
                print(f"round {r + 1} {kind}: {rate:.0f} msg/s, {cpu:.3f} ms CPU/msg",
                      flush=True)
    base = statistics.median(rates["none"])
    base_cpu = statistics.median(cpus["none"])
    print(f"\n{args.messages} messages of 4 KiB per run, {args.concurrency} sessions, "
          f"{args.rounds} rounds")
    print("| configuration | msg/s (median) | range | ratio to none | ratios by round "
          "| server CPU ms/msg (median) | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        med = statistics.median(rates[kind])
        by_round = ", ".join(f"{r / n:.2f}" for r, n in zip(rates[kind], rates["none"]))
        cpu = statistics.median(cpus[kind])
        print(f"| {kind} | {med:.0f} | {min(rates[kind]):.0f}-{max(rates[kind]):.0f} | "
              f"{med / base:.2f} | {by_round} | {cpu:.3f} | {base_cpu / cpu:.2f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "cpu_ms": cpus}, indent=1))


if __name__ == "__main__":
    main()
