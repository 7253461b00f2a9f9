"""Delivery into elemta-store (SQLite) against delivery into maildir, in one run.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/store.py [--messages 3000] [--rounds 3]
        [--mailboxes 10] [--dir /var/tmp] [--json FILE]
    .venv/bin/python bench/store.py --api [--messages 3000] [--concurrency 50]

**Delivery** (the default). ``bench/local_delivery.py``'s queue and clock:
``--messages`` messages of 4096 bytes to ``user0..userN@example.test``, queued
once with delivery off (its ``Bench.fill``), then emptied from a fresh copy of
that spool by ``elemta serve`` with delivery on, once per mode and round, in an
order that rotates from round to round. The clock runs from the server's spawn
to an empty ``ready/`` and ``deferred/``.

* ``maildir``: ``bench/local_delivery.py``'s ``maildir`` mode, run by that
  script's own code (fsync on).
* ``store``: ``[plugins] enabled = ["store"]`` with ``[plugins.store] path =
  "<run>/store/messages.db"`` (WAL, ``synchronous = FULL``, FTS5 indexing, no
  bound). Delivered is counted from the store's totals row (read-only, every
  10 ms). A run counts only if the store holds exactly ``--messages`` messages,
  one per queued message, and the queue is empty.

It prints both rates, the ratio store / maildir (of the medians, and per round)
and the server's CPU per message.

**--api**: the store alone, without a server: ``--messages`` puts through
``Store.put`` from ``--concurrency`` tasks, with the writer committing up to 64
writes together (the default) and one at a time, and the same puts made
directly in the event loop's thread (what a store without a thread would do).
For each: messages/s and the event loop's worst lag (a 1 ms ticker's largest
delay), which is what a connection being served meanwhile would wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import local_delivery  # noqa: E402
from accept import (CLK_TCK, BenchError, box_times, code_version, compile_bytecode, count_files,  # noqa: E402
                    default_dir, proc_cpu, thread_cpu)
from deliver import MESSAGE_BYTES, elemta_command, elemta_env, fmt_range, queued, stop, tail  # noqa: E402
from local_delivery import LOCAL_DOMAIN, POLL_SECONDS, ModeRun  # noqa: E402

MODES = ("maildir", "store")

STORE_EXTRA = textwrap.dedent('''
    [plugins]
    enabled = ["store"]

    [plugins.store]
    path = "{workdir}/store/messages.db"
''')


class StoreCount:
    """Messages in the store, from its totals row; 0 until the file exists."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def __call__(self) -> int:
        if self.conn is None:
            if not self.path.exists():
                return 0
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            row = self.conn.execute("SELECT messages FROM totals WHERE k = 0").fetchone()
        except sqlite3.OperationalError:      # the schema is being made
            return 0
        return 0 if row is None else int(row[0])

    def distinct_queue_ids(self) -> int:
        assert self.conn is not None
        return self.conn.execute("SELECT count(DISTINCT queue_id) FROM messages").fetchone()[0]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Bench(local_delivery.Bench):
    def run(self, mode: str, rnd: int, profile: Path | None = None) -> ModeRun:
        if mode != "store":
            return super().run(mode, rnd, profile)
        workdir = Path(tempfile.mkdtemp(prefix=f"{mode}-{rnd}-", dir=self.root))
        spool = workdir / "spool"
        shutil.copytree(self.templates["local"], spool)
        os.sync()
        extra = (local_delivery.LOCAL_EXTRA.format(domain=LOCAL_DOMAIN)
                 + STORE_EXTRA.format(workdir=workdir))
        config, _ = self.config(workdir, spool, True, extra)
        if mode not in self.shown:
            print(f"  {mode} server: {' '.join(elemta_command(config))}")
            print(f"      [server] ... [delivery] as above, then:\n"
                  f"{textwrap.indent(extra.strip(), '      ')}")
            self.shown.add(mode)
        counter = StoreCount(workdir / "store" / "messages.db")
        ready_file, log = workdir / "ready", workdir / "server.log"
        proc = None
        try:
            with open(log, "wb") as log_out:
                box0, me0 = box_times(), time.process_time()
                t0 = time.perf_counter()
                proc = subprocess.Popen(elemta_command(config), cwd=workdir, stdout=log_out,
                                        stderr=subprocess.STDOUT, env=elemta_env(ready_file))
            marks: dict[str, float] = {}
            counts: dict[str, int] = {}
            lo, hi = self.messages // 10, self.messages - self.messages // 10
            limit = 300 + self.messages / 20
            while True:
                now = time.perf_counter()
                if "ready" not in marks and ready_file.exists():
                    marks["ready"] = now
                n = counter()
                for key, at in (("lo", lo), ("hi", hi)):
                    if n >= at and key not in marks:
                        marks[key], counts[key] = now, n
                if n >= self.messages and queued(spool) == 0:
                    break
                if proc.poll() is not None:
                    raise BenchError(f"store: elemta exited with {proc.returncode}:\n{tail(log)}")
                if now > t0 + limit:
                    raise BenchError(f"store: not delivered within {limit:.0f} s: {n} stored, "
                                     f"{queued(spool)} queued:\n{tail(log)}")
                time.sleep(POLL_SECONDS)
            elapsed = time.perf_counter() - t0
            thr, cpu = thread_cpu(proc.pid), proc_cpu(proc.pid)
            box1, me1 = box_times(), time.process_time()
            code = stop(proc)
            if code != 0:
                raise BenchError(f"store: elemta exited with {code} on SIGTERM:\n{tail(log)}")
            got = counter()
            distinct = counter.distinct_queue_ids()
            failed = count_files(spool / "failed")
            if got != self.messages or distinct != self.messages or failed or queued(spool):
                raise BenchError(f"store: {got} stored ({distinct} queue ids) of "
                                 f"{self.messages}, {failed} failed, {queued(spool)} queued:\n"
                                 f"{tail(log)}")
            return ModeRun(rnd, self.messages, elapsed, marks.get("ready", t0 + elapsed) - t0,
                           (counts["hi"] - counts["lo"]) / max(1e-9, marks["hi"] - marks["lo"]),
                           cpu, 0.0, (box1[0] - box0[0]) / max(1, box1[1] - box0[1]),
                           (box1[0] - box0[0]) / CLK_TCK, thr, got, mode, me1 - me0)
        finally:
            counter.close()
            stop(proc)


# ----------------------------------------------------------------------------- --api


def api_message(n: int) -> bytes:
    body = (f"line {n} of a message about invoices, deliveries and the weather\r\n" * 60)
    head = (f"From: sender@example.org\r\nTo: user{n % 10}@example.test\r\n"
            f"Subject: message {n}\r\nMessage-ID: <{n}@example.org>\r\n\r\n")
    return (head + body)[:MESSAGE_BYTES].encode()


async def api_run(root: Path, messages: int, concurrency: int, how: str) -> dict:
    from elemta_store import Store, StoreSettings
    from elemta_store import sqlite as backend
    from elemta_store.message import Incoming

    folder = Path(tempfile.mkdtemp(prefix=f"api-{how}-", dir=root))
    settings = StoreSettings(path=str(folder / "messages.db"))
    saved = backend.GROUP
    backend.GROUP = 1 if how == "thread, one commit per write" else saved
    store = await Store.open(settings)
    inline = None
    if how == "in the event loop":
        inline = backend.connect(folder / "messages.db", 30)
    worst = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t - 0.001)

    def item(n: int) -> Incoming:
        return Incoming(f"Q{n}", "sender@example.org", [(f"user{n % 10}@example.test", {}, None)],
                        api_message(n), datetime.now(timezone.utc))

    queue = iter(range(messages))

    async def worker() -> None:
        for n in queue:
            if inline is not None:
                inline.execute("BEGIN IMMEDIATE")
                store._backend._put(inline, item(n))      # type: ignore[attr-defined]
                inline.execute("COMMIT")
                await asyncio.sleep(0)
            else:
                await store.put(item(n))

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    stop.set()
    await tick
    count = await store.count()
    if inline is not None:
        inline.close()
    await store.close()
    backend.GROUP = saved
    if count != messages:
        raise BenchError(f"--api {how}: {count} stored of {messages}")
    return {"how": how, "rate": messages / elapsed, "worst_lag_ms": worst * 1000}


def run_api(args: argparse.Namespace, root: Path) -> list[dict]:
    hows = ["thread, group commit", "thread, one commit per write", "in the event loop"]
    results = []
    for rnd in range(args.rounds):
        for how in hows[rnd % 3:] + hows[:rnd % 3]:
            r = asyncio.run(api_run(root, args.messages, args.concurrency, how))
            r["round"] = rnd
            results.append(r)
            print(f"  round {rnd + 1} {how:<30} {r['rate']:6.0f} msgs/s, event loop worst "
                  f"lag {r['worst_lag_ms']:.1f} ms", flush=True)
    print("\n| writes | msgs/s | worst event-loop lag, ms |\n|---|---|---|")
    for how in hows:
        g = [r for r in results if r["how"] == how]
        print(f"| {how} | {fmt_range([r['rate'] for r in g])} | "
              f"{fmt_range([r['worst_lag_ms'] for r in g], 1)} |")
    return results


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mailboxes", type=int, default=10)
    ap.add_argument("--api", action="store_true", help="the store alone: writer-thread modes")
    ap.add_argument("--concurrency", type=int, default=50, help="--api: concurrent writers")
    ap.add_argument("--dir", type=Path, default=default_dir())
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    compile_bytecode()
    if args.messages < 10 or args.rounds < 1 or args.mailboxes < 1:
        ap.error("--messages must be at least 10, --rounds and --mailboxes at least 1")
    if not args.api:
        for tool in ("smtp-source",):
            if not (shutil.which(tool) or os.access(f"/usr/sbin/{tool}", os.X_OK)):
                print(f"{tool} not found: apt-get install postfix", file=sys.stderr)
                return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"store benchmark{' (--api)' if args.api else ''}, {started}: {args.messages} "
          f"messages of {MESSAGE_BYTES} B, {args.rounds} rounds, {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.2f}, elemta at {code_version()}")
    out: dict = {"started": started, "code": code_version(), "messages": args.messages}
    with tempfile.TemporaryDirectory(prefix="elemta-store-", dir=args.dir) as tmp:
        try:
            if args.api:
                out["api"] = run_api(args, Path(tmp))
                last = "api: see the table"
            else:
                bench = Bench(Path(tmp), args.messages, args.mailboxes, "warning", {}, set())
                bench.templates["local"] = bench.fill(LOCAL_DOMAIN)
                runs: list[ModeRun] = []
                for rnd in range(args.rounds):
                    for mode in MODES[rnd % 2:] + MODES[:rnd % 2]:
                        run = bench.run(mode, rnd)
                        runs.append(run)
                        print(f"  round {rnd + 1} {mode:<8} {run.rate:6.0f} msgs/s "
                              f"({run.delivered} in {run.seconds:.2f} s, steady "
                              f"{run.steady_rate:.0f}), server {run.cpu_us:.0f} µs CPU/msg "
                              f"(loop / other threads: {run.thread_us()}), others "
                              f"{run.others:.2f} cores", flush=True)
                by = {m: sorted((r for r in runs if r.mode == m), key=lambda r: r.round)
                      for m in MODES}
                med = {m: statistics.median(r.rate for r in by[m]) for m in MODES}
                cpu = {m: statistics.median(r.cpu_us for r in by[m]) for m in MODES}
                per_round = [s.rate / m.rate for s, m in zip(by["store"], by["maildir"])]
                print("\n| mode | msgs/s | server µs CPU/msg |\n|---|---|---|")
                for m in MODES:
                    print(f"| {m} | {fmt_range([r.rate for r in by[m]])} | {cpu[m]:.0f} |")
                ratio = med["store"] / med["maildir"]
                print(f"\nstore / maildir: **{ratio:.2f}** "
                      f"[{', '.join(f'{p:.2f}' for p in per_round)}]")
                out["runs"] = [{**asdict(r), "rate": r.rate, "cpu_us": r.cpu_us} for r in runs]
                out["ratio"] = ratio
                last = (f"delivered {args.messages} messages: maildir {med['maildir']:.0f} "
                        f"msg/s, store {med['store']:.0f} msg/s, store/maildir {ratio:.2f}")
        except BenchError as e:
            print(f"\nbenchmark aborted: {e}", file=sys.stderr)
            return 1
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average "
          f"{os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
