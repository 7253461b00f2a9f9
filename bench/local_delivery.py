"""Local delivery throughput: maildir and LMTP against SMTP delivery, in one run.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/local_delivery.py [--messages 3000]
        [--rounds 3] [--mailboxes 10] [--modes smtp,maildir,maildir-nofsync,lmtp]
        [--workers N] [--log-level info] [--dir /var/tmp] [--profile DIR] [--json FILE]
    PATH="$PATH:/usr/sbin" .venv/bin/python bench/local_delivery.py --accept [--messages 3000]
        [--rounds 3] [--mailboxes 10] [--json FILE]

Every mode empties the same kind of queue (``--messages`` messages of 4096
bytes, one recipient each, spread evenly over ``--mailboxes`` users
``user0..userN``), on the same machine in the same run, so that the ratios to
the SMTP baseline hold even when the machine is noisy. Each round runs every
mode once, in an order that rotates from round to round.

**Queues.** As in ``bench/deliver.py``: ``elemta serve`` runs with
``[delivery] enabled = false`` while one ``smtp-source -s 1`` per mailbox
(``-t userK@DOMAIN``, all at once: 10 sessions in all) submits the messages;
SIGTERM checkpoints the journal and the spool left behind is the template.
There are two templates: recipients ``@remote.example`` (relayed, since
127.0.0.1 is in ``relay_networks``) for the SMTP baseline, and
``@example.test`` (a ``[domains]`` entry, so routed to the ``local``
transport) for the local modes. Each run delivers from a fresh copy.

**Modes.**

* ``smtp``: the baseline, ``bench/deliver.py``'s setting: ``[delivery.routes]
  "*" = { host = "127.0.0.1:PORT", tls = "none" }`` to ``smtp-sink -c``.
* ``maildir``: ``[plugins] enabled = ["maildir"]``, ``[plugins.maildir] path =
  "<run>/mail/{domain}/{user}/Maildir"``, fsync on (the default: the message
  file and ``new/`` are fsynced before the 250).
* ``maildir-nofsync``: the same with ``fsync = false``.
* ``lmtp``: ``[plugins] enabled = ["lmtp"]``, ``[plugins.lmtp] address =
  "unix:<run>/lmtp.sock"``, to ``smtp-sink -c -L unix:<run>/lmtp.sock``
  (Postfix's sink speaking LMTP on a unix socket).

**Clock, verification, CPU**: as in ``bench/deliver.py``. The clock runs from
the server's spawn to an empty ``ready/`` and ``deferred/``; "steady" is the
rate between 10% and 90% of the messages delivered, and "first delivery" the
time from the spawn to the first (the sink's counter, or the
files renamed into the maildirs' ``new/``, seen through inotify; the mailboxes
are made before the server starts, as they would exist in production). A run
counts only if the sink received exactly ``--messages`` messages (maildir:
every mailbox holds exactly its share in ``new/`` and nothing in ``tmp/``) and
``ready/``, ``deferred/`` and ``failed/`` are empty. CPU is the server's user+sys per
message, its helper processes' included (the spool's, which deletes delivered messages'
files, and elemta-maildir's, which writes the mailboxes), split into the event-loop thread
and the others (the spool's threads; maildir's threads where no helper runs);
"others" is the CPU every other process used meanwhile, in cores (this
benchmark's own polling is left out of it).

**--accept**: the cost of elemta-datasource at RCPT. ``bench/accept.py``'s
Elemta run (fresh server per run, delivery off, ``--messages // 10`` warm-up
messages, then ``smtp-source -s 10 -m MESSAGES -l 4096 -t user@example.test``)
with (a) ``[domains."example.test"]`` only, and (b) no ``[domains]`` but
``[plugins] enabled = ["datasource"]`` with an SQLite directory holding
example.test and its mailboxes (made once with ``elemta domains add`` and
``elemta mailboxes add``; lookups are cached for the default 10 s). It prints
the acceptance ratio (b)/(a).

``--profile DIR``: after the rounds, one more run of each mode under ``py-spy
record --gil`` (``DIR/local-<mode>.txt``); its rate is not in the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accept  # noqa: E402
from accept import (CLK_TCK, BenchError, box_times, code_version, compile_bytecode, count_files,  # noqa: E402
                    default_dir, free_port, probe_disk, proc_cpu, proc_tree_cpu, py_spy,
                    summarize_profile, thread_cpu)
from deliver import (CONFIG, FILL_SESSIONS, MESSAGE_BYTES, ROUTE_TO_SINK, SENDER, Run, Sink,  # noqa: E402
                     elemta_command, elemta_env, fmt_range, queued, stop, tail, wait_for)

LOCAL_DOMAIN = "example.test"
REMOTE_DOMAIN = "remote.example"
MODES = ("smtp", "maildir", "maildir-nofsync", "lmtp")
POLL_SECONDS = 0.01
IN_CREATE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x100, 0x80, 0x4000

LOCAL_EXTRA = textwrap.dedent('''
    [domains."{domain}"]
''')

MAILDIR_EXTRA = textwrap.dedent('''
    [plugins]
    enabled = ["maildir"]

    [plugins.maildir]
    path = "{workdir}/mail/{{domain}}/{{user}}/Maildir"
    create_mailboxes = true{fsync}
''')

LMTP_EXTRA = textwrap.dedent('''
    [plugins]
    enabled = ["lmtp"]

    [plugins.lmtp]
    address = "unix:{socket}"
''')

DATASOURCE_EXTRA = textwrap.dedent('''
    [plugins]
    enabled = ["datasource"]

    [plugins.datasource]
    backend = "sqlite"
    sqlite_path = "{sqlite}"
''')


def mailbox_shares(messages: int, mailboxes: int) -> list[int]:
    """How many of the messages go to each of ``user0..``: as even as possible."""
    return [messages // mailboxes + (i < messages % mailboxes) for i in range(mailboxes)]


def smtp_source() -> str:
    return shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def run_smtp_source(cmd: list[str], timeout: float) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source not done within {timeout:.0f} s: {' '.join(cmd)}") from None
    out = (res.stdout + res.stderr).decode(errors="replace").strip()
    if res.returncode != 0 or out:
        raise BenchError(f"smtp-source failed (exit {res.returncode}): {' '.join(cmd)}\n"
                         f"{out[:2000]}")


# ----------------------------------------------------------------------------- the LMTP sink


class LMTPSink(Sink):
    """``smtp-sink -c -L`` on a unix socket: the same counters, spoken as LMTP."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("smtp-sink", workdir)
        self.socket = workdir / "lmtp.sock"
        self.out_path = workdir / "lmtp-sink.out"
        if len(str(self.socket)) > 100:
            raise BenchError(f"the socket path {self.socket} is too long for a unix socket; "
                             "use a shorter --dir")

    def command(self) -> list[str]:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        return [exe, "-c", "-L", *user, f"unix:{self.socket}", "1024"]

    def start(self) -> None:
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for("smtp-sink -L start", self._listening, 20, self.proc, self.out_path)

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(self.socket)) == 0


# ----------------------------------------------------------------------------- maildirs


class NewFiles:
    """Counts the files that appear in some folders, without listing.

    A file renamed in is ``IN_MOVED_TO``, one linked in (maildir's unnamed
    temporary files) ``IN_CREATE``.

    Listing 10 maildirs of up to 3,000 files every 10 ms took ~0.15 of a core
    away from the server; reading the events costs next to nothing. If the
    event queue overflows, the folders are listed instead.
    """

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        self.count = 0
        self.overflowed = False
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise BenchError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        for folder in folders:
            if libc.inotify_add_watch(self.fd, os.fsencode(folder),
                                      IN_CREATE | IN_MOVED_TO) < 0:
                err = os.strerror(ctypes.get_errno())
                os.close(self.fd)
                raise BenchError(f"inotify_add_watch {folder}: {err}")

    def __call__(self) -> int:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            off = 0
            while off < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, off)
                self.count += bool(mask & (IN_CREATE | IN_MOVED_TO))
                self.overflowed |= bool(mask & IN_Q_OVERFLOW)
                off += 16 + length
        if self.overflowed:
            return sum(count_files(f) for f in self.folders)
        return self.count

    def close(self) -> None:
        os.close(self.fd)


def make_maildirs(folders: list[Path]) -> None:
    """The mailboxes as the plugin makes them (``cur/``, ``new/``, ``tmp/``, mode 0700)."""
    for new in folders:
        for sub in ("cur", "new", "tmp"):
            (new.parent / sub).mkdir(mode=0o700, parents=True)


# ----------------------------------------------------------------------------- runs


@dataclass
class ModeRun(Run):
    mode: str = ""
    bench_cpu_s: float = 0.0  # this script's own CPU over the run (polling), kept out of others
    first_seconds: float = 0.0  # spawn → the first message delivered (at the sink or in new/)

    @property
    def others(self) -> float:
        used = self.server_cpu_s + self.sink_cpu_s + self.bench_cpu_s
        return max(0.0, self.box_cpu_s - used) / self.seconds


@dataclass
class Bench:
    root: Path
    messages: int
    mailboxes: int
    log_level: str
    templates: dict[str, Path]
    shown: set[str]
    workers: int | None = None   # [delivery] workers of the delivering server; None: default

    def config(self, workdir: Path, spool: Path, enabled: bool,
               extra: str = "") -> tuple[Path, int]:
        """The server's configuration file, and the port of its listener."""
        path, port = workdir / "elemta.toml", free_port()
        path.write_text(CONFIG.format(
            loop="asyncio", port=port, spool=spool,
            log_level=self.log_level if enabled else "warning",
            enabled="true" if enabled else "false",
            delivery_extra=f"\nworkers = {self.workers}" if enabled and self.workers else "")
            + extra)
        return path, port

    def fill(self, domain: str) -> Path:
        """Queue the messages to ``userK@domain`` with delivery off; the spool left behind."""
        workdir = self.root / f"fill-{domain}"
        workdir.mkdir()
        spool = workdir / "spool"
        extra = LOCAL_EXTRA.format(domain=domain) if domain == LOCAL_DOMAIN else ""
        config, port = self.config(workdir, spool, False, extra)
        ready_file, log = workdir / "ready", workdir / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(elemta_command(config), cwd=workdir, stdout=out,
                                    stderr=subprocess.STDOUT, env=elemta_env(ready_file))
        try:
            wait_for("filling server start", ready_file.exists, 60, proc, log)
            # one smtp-source per mailbox; FILL_SESSIONS sessions in all
            each = max(1, FILL_SESSIONS // self.mailboxes)
            cmds = [[smtp_source(), "-s", str(each), "-m", str(n), "-l", str(MESSAGE_BYTES),
                     "-f", SENDER, "-t", f"user{i}@{domain}", f"127.0.0.1:{port}"]
                    for i, n in enumerate(mailbox_shares(self.messages, self.mailboxes)) if n]
            print(f"  fill {domain}: {' '.join(cmds[0])}  (and {len(cmds) - 1} more like it "
                  f"for user1..user{len(cmds) - 1}, {max(1, FILL_SESSIONS // each)} at a time; "
                  "[delivery] enabled = false)")
            timeout = 120 + self.messages / 20
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max(1, FILL_SESSIONS // each)) as pool:
                for f in [pool.submit(run_smtp_source, cmd, timeout) for cmd in cmds]:
                    f.result()
            took = time.perf_counter() - t0
        finally:
            code = stop(proc)
        if code != 0:
            raise BenchError(f"the filling server exited with {code}:\n{tail(log)}")
        ready = count_files(spool / "ready")
        if ready != self.messages or os.listdir(spool / "journal"):
            raise BenchError(f"after filling: {ready} messages in ready/ (expected "
                             f"{self.messages}), journal/ {os.listdir(spool / 'journal')}")
        print(f"  fill {domain}: {self.messages} messages queued in {took:.1f} s "
              f"({self.messages / took:.0f} msgs/s accepted)")
        return spool

    def maildir_new(self, workdir: Path, sub: str = "new") -> list[Path]:
        return [workdir / "mail" / LOCAL_DOMAIN / f"user{i}" / "Maildir" / sub
                for i in range(self.mailboxes)]

    def run(self, mode: str, rnd: int, profile: Path | None = None) -> ModeRun:
        workdir = Path(tempfile.mkdtemp(prefix=f"{mode}-{rnd}-", dir=self.root))
        spool = workdir / "spool"
        shutil.copytree(self.templates["remote" if mode == "smtp" else "local"], spool)
        os.sync()  # the copy's write-back must not land in the timed part
        sink: Sink | None = None
        new_files: NewFiles | None = None
        sampler = proc = None
        try:
            if mode == "smtp":
                sink = Sink("smtp-sink", workdir)
                sink.start()
                extra = ROUTE_TO_SINK.format(sink_port=sink.port)
            elif mode == "lmtp":
                sink = LMTPSink(workdir)
                sink.start()
                extra = LOCAL_EXTRA.format(domain=LOCAL_DOMAIN) + LMTP_EXTRA.format(
                    socket=sink.socket)  # type: ignore[attr-defined]
            else:
                extra = LOCAL_EXTRA.format(domain=LOCAL_DOMAIN) + MAILDIR_EXTRA.format(
                    workdir=workdir, fsync="\nfsync = false" if mode == "maildir-nofsync" else "")
                # made beforehand so that they can be watched: a mailbox's creation
                # is a one-time cost, not part of a delivery rate
                make_maildirs(self.maildir_new(workdir))
                new_files = NewFiles(self.maildir_new(workdir))
            delivered: Callable[[], int] | None = sink.count if sink is not None else new_files
            assert delivered is not None

            config, _ = self.config(workdir, spool, True, extra)
            if mode not in self.shown:
                if sink is not None:
                    print(f"  {mode} sink: {' '.join(sink.command())}")
                print(f"  {mode} server: {' '.join(elemta_command(config))}")
                if not self.shown:
                    print(textwrap.indent(config.read_text().strip(), "      "))
                else:  # the common part was shown with the first mode
                    print(f"      [server] ... [delivery] as above, then:\n"
                          f"{textwrap.indent(extra.strip(), '      ')}")
                self.shown.add(mode)
            ready_file, log = workdir / "ready", workdir / "server.log"
            log_out = open(log, "wb")
            sink_cpu0 = proc_cpu(sink.proc.pid) if sink is not None else 0.0  # type: ignore[union-attr]
            box0, me0 = box_times(), time.process_time()
            t0 = time.perf_counter()
            proc = subprocess.Popen(elemta_command(config), cwd=workdir, stdout=log_out,
                                    stderr=subprocess.STDOUT, env=elemta_env(ready_file))
            log_out.close()
            if profile is not None:
                sampler_log = open(workdir / "py-spy.log", "wb")
                sampler = subprocess.Popen(
                    [py_spy(), "record", "--pid", str(proc.pid), "--rate", "500",
                     "--format", "raw", "--threads", "--gil", "--output", str(profile)],
                    stdout=sampler_log, stderr=subprocess.STDOUT)
                sampler_log.close()
            marks: dict[str, float] = {}
            counts: dict[str, int] = {}
            lo, hi = self.messages // 10, self.messages - self.messages // 10
            limit = 300 + self.messages / 20
            deadline = t0 + limit
            while True:
                now = time.perf_counter()
                if "ready" not in marks and ready_file.exists():
                    marks["ready"] = now
                n = delivered()
                for key, at in (("first", 1), ("lo", lo), ("hi", hi)):
                    if n >= at and key not in marks:
                        marks[key], counts[key] = now, n
                # the queue is listed only once everything has arrived: a scan of a
                # large directory every few ms would cost the server CPU
                if n >= self.messages and queued(spool) == 0:
                    break
                if proc.poll() is not None:
                    raise BenchError(f"{mode}: elemta exited with {proc.returncode}:\n"
                                     f"{tail(log)}")
                if now > deadline:
                    raise BenchError(f"{mode}: not delivered within {limit:.0f} s: {n} "
                                     f"delivered, {queued(spool)} queued, "
                                     f"{count_files(spool / 'failed')} failed:\n{tail(log)}")
                time.sleep(POLL_SECONDS)
            elapsed = time.perf_counter() - t0
            thr = thread_cpu(proc.pid)
            cpu = proc_tree_cpu(proc.pid)  # with the spool's and maildir's helper processes
            box1, me1 = box_times(), time.process_time()
            sink_cpu = (proc_cpu(sink.proc.pid) - sink_cpu0  # type: ignore[union-attr]
                        if sink is not None else 0.0)
            if sampler is not None:
                sampler.send_signal(signal.SIGINT)
                try:
                    sampler.wait(60)
                except subprocess.TimeoutExpired:
                    raise BenchError("py-spy did not write its profile within 60 s") from None
                if not profile.exists():  # type: ignore[union-attr]
                    raise BenchError("py-spy wrote no profile:\n" + tail(workdir / "py-spy.log"))
            code = stop(proc)
            if code != 0:
                raise BenchError(f"{mode}: elemta exited with {code} on SIGTERM:\n{tail(log)}")
            time.sleep(0.1)  # the sink prints its counters when the sessions end
            got = sink.count() if sink is not None else sum(
                count_files(d) for d in self.maildir_new(workdir))
            self.verify(mode, workdir, spool, got, log)
            return ModeRun(rnd, self.messages, elapsed, marks.get("ready", t0 + elapsed) - t0,
                           (counts["hi"] - counts["lo"]) / max(1e-9, marks["hi"] - marks["lo"]),
                           cpu, sink_cpu, (box1[0] - box0[0]) / max(1, box1[1] - box0[1]),
                           (box1[0] - box0[0]) / CLK_TCK, thr, got, mode, me1 - me0,
                           marks["first"] - t0)
        finally:
            if sampler is not None and sampler.poll() is None:
                sampler.kill()
                sampler.wait()
            stop(proc)
            if sink is not None:
                sink.stop()
            if new_files is not None:
                new_files.close()
            # the run's files stay until the end: deleting thousands of files slows
            # down the next run's file creations on this disk (docs/performance.md)

    def verify(self, mode: str, workdir: Path, spool: Path, got: int, log: Path) -> None:
        failed = count_files(spool / "failed")
        problems = []
        if got != self.messages:
            problems.append(f"{got} of {self.messages} messages delivered")
        if failed or queued(spool):
            problems.append(f"{failed} in failed/, {queued(spool)} still queued")
        if mode.startswith("maildir"):
            shares = mailbox_shares(self.messages, self.mailboxes)
            for i, (new, tmp) in enumerate(zip(self.maildir_new(workdir),
                                               self.maildir_new(workdir, "tmp"))):
                n = count_files(new) if new.exists() else 0
                t = count_files(tmp) if tmp.exists() else 0
                if n != shares[i] or t:
                    problems.append(f"user{i}: {n} files in new/ (expected {shares[i]}), "
                                    f"{t} in tmp/")
        if problems:
            raise BenchError(f"{mode}: " + "; ".join(problems) + ":\n" + tail(log))


# ----------------------------------------------------------------------------- report


def report(runs: list[ModeRun], modes: list[str]) -> dict:
    by = {m: sorted((r for r in runs if r.mode == m), key=lambda r: r.round) for m in modes}
    rounds = max(r.round for r in runs) + 1
    summary: dict = {}
    print(f"\nLocal delivery, msgs/s from spawn to empty queue: median [min-max] over {rounds} "
          "rounds\n")
    print("| mode | msgs/s | steady msgs/s | start-up s | first delivery s | server µs CPU/msg | "
          "loop u+s / other threads u+s, µs (median run) | sink µs/msg | busy | others, cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in modes:
        g = by[m]
        mid = sorted(g, key=lambda r: r.seconds)[len(g) // 2]
        summary[m] = {"rate_median": statistics.median(r.rate for r in g),
                      "rates": [r.rate for r in g],
                      "steady_median": statistics.median(r.steady_rate for r in g),
                      "cpu_us_median": statistics.median(r.cpu_us for r in g),
                      "others_cores": [r.others for r in g]}
        print(f"| {m} | {fmt_range([r.rate for r in g])} | "
              f"{fmt_range([r.steady_rate for r in g])} | "
              f"{fmt_range([r.startup_seconds for r in g], 2)} | "
              f"{fmt_range([r.first_seconds for r in g], 2)} | "
              f"{fmt_range([r.cpu_us for r in g])} | {mid.thread_us()} | "
              f"{statistics.median(r.sink_us for r in g):.0f} | "
              f"{statistics.median(r.box_busy for r in g) * 100:.0f}% | "
              f"{', '.join(f'{r.others:.2f}' for r in g)} |")
    if "smtp" in modes and len(modes) > 1:
        print("\nRatio to smtp, msgs/s (of the medians; in brackets: per round)\n")
        print("| mode | ratio | CPU ratio |")
        print("|---|---|---|")
        base = summary["smtp"]
        for m in modes:
            if m == "smtp":
                continue
            per_round = [x.rate / y.rate for x, y in zip(by[m], by["smtp"])]
            ratio = summary[m]["rate_median"] / base["rate_median"]
            summary[m]["ratio_to_smtp"] = ratio
            summary[m]["ratio_to_smtp_per_round"] = per_round
            cpu_ratio = summary[m]["cpu_us_median"] / base["cpu_us_median"]
            print(f"| {m} / smtp | **{ratio:.2f}** [{', '.join(f'{p:.2f}' for p in per_round)}]"
                  f" | {cpu_ratio:.2f} |")
    return summary


# ----------------------------------------------------------------------------- --accept


class DatasourceElemta(accept.Elemta):
    """``bench/accept.py``'s Elemta, with elemta-datasource instead of ``[domains]``."""

    name = "elemta+datasource"
    sqlite: Path | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(datasource_config(self.loop, self.port, self.sqlite))
        accept.Server.start(self)


def datasource_config(loop: str, port: int, sqlite: Path | None) -> str:
    base = accept.ELEMTA_CONFIG.format(loop=loop, port=port, domain=LOCAL_DOMAIN,
                                       spool_extra="")
    domains = f'[domains."{LOCAL_DOMAIN}"]\n'
    if not base.endswith(domains):
        raise BenchError("bench/accept.py's configuration no longer ends with [domains]")
    return base[:-len(domains)] + DATASOURCE_EXTRA.format(sqlite=sqlite).lstrip("\n")


def make_directory(root: Path, mailboxes: int) -> Path:
    """An SQLite directory with example.test, ``user`` and ``user0..``, made with the CLI."""
    folder = root / "directory"
    folder.mkdir()
    sqlite = folder / "directory.sqlite3"
    config = folder / "elemta.toml"
    config.write_text(datasource_config("asyncio", 9, sqlite))
    exe = elemta_command(config)[:-3]  # without "serve --config CFG"
    users = [accept.RECIPIENT.split("@")[0]] + [f"user{i}" for i in range(mailboxes)]
    cmds = [["domains", "add", LOCAL_DOMAIN]] + [["mailboxes", "add", f"{u}@{LOCAL_DOMAIN}"]
                                                 for u in users]
    print(f"  directory: {' '.join(exe)} --config {config} domains add {LOCAL_DOMAIN}, "
          f"then mailboxes add for {', '.join(users[:3])}...{users[-1]}@{LOCAL_DOMAIN}")
    env = dict(os.environ)
    env.pop("ELEMTA_LOAD_PLUGINS", None)
    for cmd in cmds:
        try:
            res = subprocess.run([*exe, "--config", str(config), *cmd], capture_output=True,
                                 text=True, timeout=60, env=env, cwd=folder)
        except subprocess.TimeoutExpired:
            raise BenchError(f"elemta {' '.join(cmd)}: not done within 60 s") from None
        if res.returncode != 0:
            raise BenchError(f"elemta {' '.join(cmd)} failed ({res.returncode}): "
                             f"{(res.stdout + res.stderr).strip()[:2000]}")
    return sqlite


def bounded_send(commands: list[list[str]]) -> None:
    """``accept.send`` with a time limit on each smtp-source."""
    for cmd in commands:
        run_smtp_source(cmd, 300)


def run_accept(args: argparse.Namespace, tmp: Path) -> tuple[list, dict]:
    accept.SERVERS["datasource"] = DatasourceElemta
    accept.send = bounded_send  # accept.Bench.run waits for smtp-source without a limit
    DatasourceElemta.sqlite = make_directory(tmp, args.mailboxes)
    kinds = ["elemta", "datasource"]
    labels = {"elemta": '(a) [domains."example.test"]', "datasource": "(b) datasource, SQLite"}
    bench = accept.Bench(smtp_source(), args.messages, args.messages // 10, "asyncio", tmp)
    runs = []
    for rnd in range(args.rounds):
        for kind in kinds[rnd % 2:] + kinds[:rnd % 2]:
            run = bench.run(kind, 10, 1, rnd)
            runs.append(run)
            print(f"  round {rnd + 1} {labels[kind]:<30} {run.rate:6.0f} msgs/s "
                  f"{run.cpu_us:5.0f} µs CPU/msg (loop u+s / other threads u+s: "
                  f"{run.thread_us()})  busy {run.box_busy * 100:3.0f}%  others "
                  f"{run.others:.2f} cores", flush=True)
    by = {k: sorted((r for r in runs if r.server == k), key=lambda r: r.round) for k in kinds}
    print(f"\nAcceptance with smtp-source -s 10, msgs/s: median [min-max] over {args.rounds} "
          "rounds\n")
    print("| server | msgs/s | server µs CPU/msg | loop u+s / other threads u+s, µs "
          "(median run) | busy | others, cores |")
    print("|---|---|---|---|---|---|")
    summary: dict = {}
    for k in kinds:
        g = by[k]
        mid = sorted(g, key=lambda r: r.cpu_us)[len(g) // 2]
        summary[k] = {"rate_median": statistics.median(r.rate for r in g),
                      "rates": [r.rate for r in g],
                      "cpu_us_median": statistics.median(r.cpu_us for r in g)}
        print(f"| {labels[k]} | {fmt_range([r.rate for r in g])} | "
              f"{fmt_range([r.cpu_us for r in g])} | {mid.thread_us()} | "
              f"{statistics.median(r.box_busy for r in g) * 100:.0f}% | "
              f"{', '.join(f'{r.others:.2f}' for r in g)} |")
    per_round = [b.rate / a.rate for a, b in zip(by["elemta"], by["datasource"])]
    ratio = summary["datasource"]["rate_median"] / summary["elemta"]["rate_median"]
    cpu_ratio = summary["datasource"]["cpu_us_median"] / summary["elemta"]["cpu_us_median"]
    summary["ratio"], summary["ratio_per_round"] = ratio, per_round
    print(f"\n(b)/(a): **{ratio:.2f}** [{', '.join(f'{p:.2f}' for p in per_round)}] msgs/s, "
          f"{cpu_ratio:.2f} CPU per message")
    return runs, summary


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000, help="queued messages per run")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of every mode")
    ap.add_argument("--workers", type=int, default=None,
                    help="Elemta's [delivery] workers for every mode (default: Elemta's "
                         "default)")
    ap.add_argument("--mailboxes", type=int, default=10,
                    help="recipients user0..userN-1 the messages are spread over")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, from {', '.join(MODES)} (default: all)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning"),
                    help="the server's [log] level while delivering (default info)")
    ap.add_argument("--accept", action="store_true",
                    help="instead: acceptance with [domains] against elemta-datasource")
    ap.add_argument("--dir", type=Path, default=default_dir(),
                    help="where the temporary spools and maildirs go (default /var/tmp)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="after the rounds, profile one run per mode with py-spy into DIR")
    ap.add_argument("--json", type=Path, default=None, help="write every run here")
    args = ap.parse_args()
    compile_bytecode()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if not modes:
        ap.error("--modes is empty")
    if args.messages < 10 or args.mailboxes < 1 or args.rounds < 1:
        ap.error("--messages must be at least 10, --mailboxes and --rounds at least 1")
    tools = ["smtp-source"] + ([] if args.accept else ["smtp-sink"])
    for tool in tools:
        if not (shutil.which(tool) or os.access(f"/usr/sbin/{tool}", os.X_OK)):
            print(f"{tool} not found: apt-get install postfix (it is in /usr/sbin)",
                  file=sys.stderr)
            return 2
    if args.profile is not None and shutil.which(py_spy()) is None:
        print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    what = "datasource acceptance" if args.accept else "local delivery"
    print(f"{what} benchmark, {started}: {args.messages} messages of {MESSAGE_BYTES} B per run "
          f"over {args.mailboxes} mailboxes, {args.rounds} rounds"
          f"{'' if args.accept else ', modes ' + ', '.join(modes)}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, elemta at {code_version()}")
    with tempfile.TemporaryDirectory(prefix="elemta-local-", dir=args.dir) as tmp:
        create_us, durable_us = probe_disk(Path(tmp))
        print(f"work under {tmp}: creating a file takes {create_us:.0f} µs, creating, "
              f"writing {MESSAGE_BYTES} B and fdatasync {durable_us:.0f} µs (medians)")
        if create_us > 100:
            print("  warning: creating a file is slow on this file system right now (see "
                  "docs/performance.md); the spool and maildir create files per message")
        try:
            if args.accept:
                runs, summary = run_accept(args, Path(tmp))
                a, b = summary["elemta"]["rate_median"], summary["datasource"]["rate_median"]
                last = (f"accepted {args.messages} messages: [domains] {a:.0f} msg/s, "
                        f"datasource {b:.0f} msg/s, ratio {summary['ratio']:.2f}")
            else:
                bench = Bench(Path(tmp), args.messages, args.mailboxes, args.log_level, {},
                              set(), args.workers)
                if "smtp" in modes:
                    bench.templates["remote"] = bench.fill(REMOTE_DOMAIN)
                if any(m != "smtp" for m in modes):
                    bench.templates["local"] = bench.fill(LOCAL_DOMAIN)
                runs = []
                for rnd in range(args.rounds):
                    for mode in modes[rnd % len(modes):] + modes[:rnd % len(modes)]:
                        run = bench.run(mode, rnd)
                        runs.append(run)
                        print(f"  round {rnd + 1} {mode:<15} {run.rate:6.0f} msgs/s "
                              f"({run.delivered} in {run.seconds:.2f} s, start-up "
                              f"{run.startup_seconds:.2f} s, first delivery "
                              f"{run.first_seconds:.2f} s, steady {run.steady_rate:.0f})  "
                              f"server {run.cpu_us:.0f} µs CPU/msg (loop u+s / other threads "
                              f"u+s: {run.thread_us()}), sink {run.sink_us:.0f}, busy "
                              f"{run.box_busy * 100:.0f}%, others {run.others:.2f} cores",
                              flush=True)
                summary = report(runs, modes)
                if args.profile is not None:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    for mode in modes:
                        out = args.profile / f"local-{mode}.txt"
                        prof = bench.run(mode, args.rounds, profile=out)
                        print(f"\n  profiled {mode} run: {prof.rate:.0f} msgs/s under py-spy")
                        summarize_profile(out)
                parts = []
                for m in modes:
                    s = summary[m]
                    ratio = f" ({s['ratio_to_smtp']:.2f}x smtp)" if "ratio_to_smtp" in s else ""
                    parts.append(f"{m} {s['rate_median']:.0f} msg/s{ratio}")
                last = (f"delivered {args.messages} messages to {args.mailboxes} mailboxes, "
                        f"medians: " + ", ".join(parts))
        except BenchError as e:
            print(f"\nbenchmark aborted: {e}", file=sys.stderr)
            return 1

    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average "
          f"{os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "started": started, "code": code_version(), "accept": args.accept,
            "messages": args.messages, "mailboxes": args.mailboxes, "rounds": args.rounds,
            "modes": None if args.accept else modes, "summary": summary,
            "runs": [{**asdict(r), "rate": r.rate, "cpu_us": r.cpu_us, "others": r.others}
                     for r in runs]}, indent=1))
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
