"""Spool commit throughput: the journaled group commit against one fsync'd commit per message.

    .venv/bin/python bench/spool_commit.py [--messages 2000] [--concurrency 50] [--dir DIR]
        [--variants naive,visible,journal] [--per-file-sync]

Every variant commits from ``--concurrency`` coroutines sharing one event
loop, as SMTP sessions would:

* ``naive``: content and envelope written to tmp/, fsynced, renamed into
  place, directories fsynced, inline on the loop, one message at a time;
* ``visible``: :class:`Spool` as the server uses it: a batch is appended to
  the journal and fdatasynced once, and a commit returns when its files are in
  place too (``visible_on_commit``, the default);
* ``journal``: the same, but a commit returns as soon as the journal is synced
  and the files follow in the background.

Checkpoints (one syncfs per second, off the commit path) run during the
measurement and are reported; ``--per-file-sync`` makes them fdatasync each
file instead, as on systems without syncfs. Put ``--dir`` on the file system
the spool will live on: fsync on tmpfs costs nothing and proves nothing. Runs
shorter than a few seconds do not reach the steady state, in which commits
write over reused journal segments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from elemta.models import new_id
from elemta.spool import replay
from elemta.spool.envelope import Envelope, RecipientState
from elemta.spool.store import Spool

BODY_LINE = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"


def make_message(size: int) -> bytes:
    head = b"From: sender@example.org\r\nTo: rcpt@example.com\r\nSubject: bench\r\n\r\n"
    body = BODY_LINE * ((size - len(head)) // len(BODY_LINE) + 1)
    return (head + body)[:size - 2] + b"\r\n"


def make_envelope(queue_id: str, size: int) -> Envelope:
    return Envelope(id=queue_id, sender="sender@example.org",
                    recipients=[RecipientState("rcpt@example.com")], received_at=time.time(),
                    size=size, peer={"ip": "192.0.2.1", "port": 40000}, helo="client.example.org",
                    listener="mx")


async def run_spool(root: Path, content: bytes, messages: int, concurrency: int,
                    threads: int, visible: bool) -> tuple[float, list[float], Spool]:
    spool = Spool(root, commit_threads=threads, visible_on_commit=visible)
    spool.recover()
    latencies: list[float] = []
    per_worker = messages // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            qid = new_id()
            incoming = spool.incoming(qid)
            incoming.write(content)
            t = time.perf_counter()
            await spool.commit(incoming, make_envelope(qid, len(content)),
                               prepend=b"Received: from bench\r\n")
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await spool.close()  # the final checkpoint is not part of the measurement
    return elapsed, latencies, spool


def naive_commit(root: Path, queue_id: str, content: bytes, envelope: bytes) -> None:
    tmp = root / "tmp"
    for data, tmp_path, final in ((content, tmp / f"{queue_id}.content", root / "messages" / queue_id),
                                  (envelope, tmp / f"{queue_id}.envelope",
                                   root / "ready" / f"{queue_id}.json")):
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, final)
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


async def run_naive(root: Path, content: bytes, messages: int,
                    concurrency: int) -> tuple[float, list[float]]:
    Spool(root).recover()
    latencies: list[float] = []
    per_worker = messages // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            qid = new_id()
            t = time.perf_counter()
            naive_commit(root, qid, b"Received: from bench\r\n" + content,
                         make_envelope(qid, len(content)).to_json())
            latencies.append(time.perf_counter() - t)
            await asyncio.sleep(0)  # let the other sessions run, as a server would

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def cpu_seconds() -> float:
    # the whole process, commit threads included
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def describe(name: str, messages: int, elapsed: float, cpu: float, latencies: list[float]) -> str:
    q = statistics.quantiles(latencies, n=100)
    return (f"{name:<10} {messages / elapsed:6.0f} msgs/s  CPU {cpu / messages * 1e6:4.0f} us/msg  "
            f"commit latency p50 {q[49] * 1e3:6.2f} ms  p99 {q[98] * 1e3:6.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes")
    ap.add_argument("--threads", type=int, default=8, help="spool commit_threads")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="naive,visible,journal")
    ap.add_argument("--per-file-sync", action="store_true",
                    help="checkpoints fdatasync every file instead of one syncfs")
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="where to create the test spools")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop
        runner = lambda coro: asyncio.Runner(loop_factory=uvloop.new_event_loop).run(coro)  # noqa: E731
    else:
        runner = asyncio.run
    if args.per_file_sync:
        replay.USE_SYNCFS = False
    variants = args.variants.split(",")
    content = make_message(args.size)
    messages = args.messages - args.messages % args.concurrency
    print(f"{messages} messages of {len(content)} bytes, {args.concurrency} concurrent "
          f"committers, {'uvloop' if args.uvloop else 'asyncio'}, checkpoints by "
          f"{'fdatasync per file' if args.per_file_sync else 'syncfs'}")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    # One directory for all rounds, removed at the end: on a file system mounted
    # with -o discard, deleting a round's files slows the next round's fsyncs.
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="spool-bench-") as d:
        for r in range(args.rounds):
            # rotate the order so that drift in the disk's speed hits all alike
            for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
                root = Path(d) / f"{variant}{r}"
                cpu = cpu_seconds()
                extra = ""
                if variant == "naive":
                    elapsed, lat = runner(run_naive(root, content, messages, args.concurrency))
                else:
                    elapsed, lat, spool = runner(run_spool(root, content, messages,
                                                           args.concurrency, args.threads,
                                                           variant == "visible"))
                    st = spool.stats
                    extra = (f"  {st.batches} batches, largest {st.largest_batch}; "
                             f"{st.checkpoints} checkpoints, last {st.checkpoint_seconds * 1e3:.0f} ms")
                cpu = cpu_seconds() - cpu
                rates[variant].append(messages / elapsed)
                print(describe(f"{variant} [{r + 1}]", messages, elapsed, cpu, lat) + extra,
                      flush=True)
    print("median: " + ", ".join(f"{v} {statistics.median(rates[v]):.0f} msgs/s" for v in variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
