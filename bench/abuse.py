"""Acceptance with greylisting and rate limiting on: the cost of the shared state store.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/abuse.py [--rounds 3] [--messages 3000]
        [--concurrency 10] [--json FILE]

Three configurations of ``elemta serve`` take the same load from Postfix's
``smtp-source`` (4 KiB messages, one recipient, one message per session, no
TLS), in one run, rounds alternating and rotating their order:

* **none**: no plugin (the baseline of this run);
* **embedded**: elemta-greylist and elemta-ratelimit on the embedded store
  (SQLite in ``state_dir``);
* **redis**: the same plugins on a ``redis-server`` started for the run on
  loopback.

The plugins do their full work per message: the triplet was greylisted and
passed before the run (so each recipient reads the allow list, reads and
refreshes its passed triplet), and the rate limiter has limits that are
never reached on the connection rate, a connection slot, the client address
and the sender (per hour and per day) and the recipient (per hour): about a
dozen store operations per message. Reported: messages per second (median
of rounds, with the range) and the ratio to **none**.
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.accept import (ELEMTA_CONFIG, LOCAL_DOMAIN, RECIPIENT, SENDER, Elemta,  # noqa: E402
                          send, smtp_source_batches)

PLUGINS = """
[state]
{state}

[plugins]
enabled = ["greylist", "ratelimit"]

[plugins.greylist]
delay_seconds = 0
retry_window_seconds = 3600
auto_allow_after = 0

[plugins.ratelimit]
connections_concurrent = 100000
connections_per_minute = 100000000

[plugins.ratelimit.ip]
per_hour = 1000000000
per_day = 1000000000

[plugins.ratelimit.sender]
per_hour = 1000000000
per_day = 1000000000

[plugins.ratelimit.recipient]
per_hour = 1000000000
"""


class Configured(Elemta):
    """``elemta serve`` as bench/accept.py runs it, plus a configuration tail."""

    tail = ""
    relay = False        # the client (127.0.0.1) is in relay_networks

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = ELEMTA_CONFIG.format(loop="asyncio", port=self.port, domain=LOCAL_DOMAIN,
                                    spool_extra="")
        if self.relay:
            text = text.replace("shutdown_grace_seconds = 5",
                                'shutdown_grace_seconds = 5\nrelay_networks = ["127.0.0.0/8"]')
        self.config.write_text(text + self.tail)
        import subprocess

        process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                   stderr=open(self.stderr_path, "wb"), env=self.env(),
                                   cwd=self.workdir)
        self.proc = process
        deadline = time.monotonic() + 60
        while not self.ready_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"elemta did not start:\n{self.stderr_text()}")
            time.sleep(0.02)
        time.sleep(0.05)

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("ELEMTA_LOAD_PLUGINS", None)
        return env

    def prime(self) -> None:
        """Greylist the benchmark's triplet once, then pass it."""
        for attempt in range(2):
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                c.ehlo("client.example")
                c.mail(SENDER)
                code, _ = c.rcpt(RECIPIENT)
                if attempt == 1 and code != 250:
                    raise SystemExit(f"the triplet did not pass: {code}")


def run_one(kind: str, workdir: Path, smtp_source: str, messages: int, concurrency: int,
            redis_url: str | None) -> float:
    server = Configured(workdir, "asyncio")
    if kind == "embedded":
        server.tail = PLUGINS.format(state='backend = "embedded"')
    elif kind == "redis":
        server.tail = PLUGINS.format(state=f'backend = "redis"\nredis_url = "{redis_url}"')
    server.start()
    try:
        if kind != "none":
            server.prime()
        send(smtp_source_batches(smtp_source, server.port, 300, concurrency, 1))   # warm-up
        started = time.perf_counter()
        send(smtp_source_batches(smtp_source, server.port, messages, concurrency, 1))
        return messages / (time.perf_counter() - started)
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
    from elemta.testing import RedisServer

    redis = RedisServer().start()
    kinds = ["none", "embedded", "redis"]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        with tempfile.TemporaryDirectory(prefix="elemta-abuse-") as d:
            for r in range(args.rounds):
                order = kinds[r % 3:] + kinds[:r % 3]
                for kind in order:
                    redis.flush()
                    rate = run_one(kind, Path(d) / f"{kind}-{r}", smtp_source, args.messages,
                                   args.concurrency, redis.url)
                    rates[kind].append(rate)
                    print(f"round {r + 1} {kind}: {rate:.0f} msg/s", flush=True)
    finally:
        redis.close()
    base = statistics.median(rates["none"])
    print(f"\n{args.messages} messages of 4 KiB per run, {args.concurrency} sessions, "
          f"{args.rounds} rounds")
    print("| configuration | msg/s (median) | range | ratio to none |")
    print("|---|---|---|---|")
    for kind in kinds:
        med = statistics.median(rates[kind])
        print(f"| {kind} | {med:.0f} | {min(rates[kind]):.0f}-{max(rates[kind]):.0f} | "
              f"{med / base:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rates, indent=1))


if __name__ == "__main__":
    main()
