"""Acceptance throughput: Elemta against a bare aiosmtpd server, with smtp-source as client.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/accept.py [--rounds 3] [--messages 5000]
        [--concurrency 10,100] [--per-session 1,10] [--uvloop] [--profile DIR] [--json FILE]

Two servers take the same load from Postfix's ``smtp-source`` (``-l 4096``, one
recipient, HELO, no TLS):

* **aiosmtpd**: a bare aiosmtpd 1.4.6 ``SMTP`` whose ``handle_DATA`` counts the
  message, discards it and answers ``250 OK``. Nothing is written to disk.
* **elemta**: ``elemta serve`` with one plain ``smtp`` listener, the built-in
  plugins only, and a durable spool (every 250 comes after fsync) in a
  temporary folder.

Each server runs in its own process, started afresh for every run, so it has a
core to itself and a fresh spool. A run is ``--warmup`` unrecorded messages,
then ``--messages`` timed ones. Rounds alternate the servers (the order
rotates each round) so that drift on a shared machine hits both; the table
shows the median and range over rounds. A run only counts if smtp-source
exits 0 and the server accepted exactly what was sent (aiosmtpd: its own
count, written on exit; Elemta: the envelopes added to ``<spool>/ready/``,
counted once it has stopped, since a 250 means "in the journal" and the files
follow).
Anything else aborts the benchmark.

Server CPU per message is user+sys of the server process (all its threads,
from ``/proc/PID/stat``) over the timed part. "busy" is the whole machine
(``/proc/stat``), so the load generator's own CPU is in it; smtp-source's CPU
per message is shown separately, and "others" is what every other process used
meanwhile, in cores: on a shared machine, the interference to look at before
trusting a round. The server's CPU is also split by thread (``/proc/PID/task``):
the event-loop thread against the rest (Elemta's spool commit threads).

``--per-session 10``: smtp-source has no "messages per session" switch (``-r``
is recipients), so it is run as consecutive batches of ``-d -s S -m S*10``:
each session sends about ten messages, then quits, and the next batch starts.
Each batch start costs a few milliseconds of dead time, so that column is a
slight lower bound.

``--servers elemta-data,elemta-bdat``: Elemta loaded by a small Python client
(a subprocess, so its CPU is counted as smtp-source's is) that sends the same
4 KiB messages either with DATA (MAIL, RCPT and DATA pipelined, then the
content after the 354) or with BDAT (MAIL, RCPT and ``BDAT <n> LAST`` with the
content, all in one write: one round trip fewer). The same client for both
makes the two columns comparable; neither is comparable with the smtp-source
rows. ``--servers elemta-data,elemta-bdat --concurrency 10 --rounds 3`` is the
BDAT against DATA comparison.

``--profile DIR``: after the rounds, one more Elemta run per setting
(``--profile-messages`` messages) under ``py-spy record --gil`` at 500 Hz
writes ``DIR/elemta-s<S>-r<R>.txt`` (raw collapsed stacks) and prints where the
samples went. A sample is taken of whichever thread holds the GIL, so it shows
where Python's CPU goes, not time in system calls that release it (fsync,
send, epoll); the per-thread user/sys split of the table covers those. Its
throughput is not part of the table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SENDER = "sender@example.org"
RECIPIENT = "user@example.test"
LOCAL_DOMAIN = "example.test"
MESSAGE_BYTES = 4096
CLK_TCK = os.sysconf("SC_CLK_TCK")

BASELINE_SERVER = textwrap.dedent('''
    import asyncio, os, signal, sys
    from pathlib import Path
    from aiosmtpd.smtp import SMTP

    host, port, ready, stats, loop_name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

    class Discard:
        def __init__(self):
            self.count = 0

        async def handle_DATA(self, server, session, envelope):
            self.count += 1
            return "250 OK"

    async def main():
        handler = Discard()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler, hostname="bench.example.test"),
                                          host, port, reuse_address=True, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        Path(ready).write_text(str(os.getpid()))
        await stop.wait()
        server.close()
        Path(stats).write_text(str(handler.count))

    if loop_name == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
''')

ELEMTA_CONFIG = textwrap.dedent('''
    [server]
    hostname = "mx.example.test"
    state_dir = "state"
    max_connections = 2000
    max_connections_per_ip = 2000     # every smtp-source session comes from 127.0.0.1
    shutdown_grace_seconds = 5
    event_loop = "{loop}"

    [[listeners]]
    name = "mx"
    address = "127.0.0.1:{port}"
    mode = "smtp"
    tls = "none"

    [spool]
    path = "spool"{spool_extra}

    [metrics]
    enabled = false

    [delivery]
    enabled = false                   # acceptance only: the runner would move what we count

    [log]
    level = "warning"

    [domains."{domain}"]
''')


class BenchError(Exception):
    """A run was not fully accepted, or a server did not start; the figures would be wrong."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """user+sys seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_table() -> dict[int, tuple[int, int, int, int]]:
    """pid -> (ppid, utime+stime ticks, start time, cutime+cstime ticks) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2:].split()
        table[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19]),
                            int(rest[13]) + int(rest[14]))
    return table


def descendants(table: dict, roots: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, st in table.items():
        children.setdefault(st[0], []).append(pid)
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        p = stack.pop()
        if p in seen or p not in table:
            continue
        seen.add(p)
        stack.extend(children.get(p, []))
    return seen


def tree_cpu(table: dict, roots: list[int]) -> float:
    """CPU seconds of roots and their descendants, with their reaped children (cutime)."""
    return sum(table[p][1] + table[p][3] for p in descendants(table, roots)) / CLK_TCK


def proc_tree_cpu(pid: int) -> float:
    """user+sys seconds of a process and its live descendants: Elemta's spool starts a
    helper process that deletes the files of delivered messages."""
    return tree_cpu(proc_table(), [pid])


def thread_cpu(pid: int) -> tuple[float, float, float, float]:
    """(user, sys) seconds of the main thread, then of all other threads together."""
    main_u = main_s = rest_u = rest_s = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        u, s = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
        if int(tid) == pid:
            main_u, main_s = u, s
        else:
            rest_u += u
            rest_s += s
    return main_u, main_s, rest_u, rest_s


def box_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    idle = cpu[3] + cpu[4]  # idle + iowait
    total = sum(cpu[:8])    # guest time is already in user
    return total - idle, total


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def probe_disk(folder: Path, n: int = 100) -> tuple[float, float]:
    """Median microseconds to create an empty file, and to create+write 4 KiB+fdatasync one."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=folder))
    create, durable = [], []
    for i in range(n):  # the files stay until the benchmark's folder is removed
        t = time.perf_counter()
        os.close(os.open(probe / f"e{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        create.append(time.perf_counter() - t)
        t = time.perf_counter()
        fd = os.open(probe / f"d{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x" * MESSAGE_BYTES)
        os.fdatasync(fd)
        os.close(fd)
        durable.append(time.perf_counter() - t)
    return statistics.median(create) * 1e6, statistics.median(durable) * 1e6


def code_version() -> str:
    """The commit of the checkout being measured, with "+changes" if elemta/ is modified."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "elemta"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" +changes in elemta/" if dirty else "")


def compile_bytecode() -> None:
    """Byte-compile Elemta and the plugins in this checkout, as installing a wheel does.

    A development shell often sets ``PYTHONDONTWRITEBYTECODE`` (and an editable
    install compiles nothing), so every server start would compile Elemta's
    modules from source again: about 0.15 s of a 0.6 s start on this machine,
    which an installed server does not pay. Done once, before anything is timed.
    """
    import compileall

    import elemta
    repo = Path(__file__).resolve().parent.parent
    for folder in {Path(elemta.__file__).resolve().parent, repo / "elemta", repo / "plugins"}:
        if folder.is_dir():
            compileall.compile_dir(str(folder), quiet=1)


def default_dir() -> Path | None:
    # /tmp is often tmpfs (fsync is free there) or, on a shared build box, the most
    # churned part of the disk; /var/tmp is on the disk a spool would use.
    var_tmp = Path("/var/tmp")
    return var_tmp if os.access(var_tmp, os.W_OK) else None


def py_spy() -> str:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else (shutil.which("py-spy") or "py-spy")


def count_files(path: Path) -> int:
    with os.scandir(path) as it:
        return sum(1 for _ in it)


# ----------------------------------------------------------------------------- servers


class Server:
    name = ""

    def __init__(self, workdir: Path, loop: str) -> None:
        self.workdir = workdir
        self.loop = loop
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_file = workdir / "ready"
        self.stderr_path = workdir / "stderr.log"
        self._stderr = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=self._stderr, env=self.env(), cwd=self.workdir)
        deadline = time.monotonic() + 60
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at start:\n"
                                 + self.stderr_path.read_text(errors="replace"))
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{self.name} did not become ready within 60 s")
            time.sleep(0.02)
        # the ready file is written once the listeners are open
        time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr is not None:
            self._stderr.close()

    def accepted(self) -> int | None:
        """Messages accepted so far, if the server can tell while it runs."""
        return None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            return ""


class Baseline(Server):
    name = "aiosmtpd"

    def __init__(self, workdir: Path, loop: str) -> None:
        super().__init__(workdir, loop)
        self.stats_file = workdir / "count"
        self.script = workdir / "baseline_server.py"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.script.write_text(BASELINE_SERVER)
        super().start()

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), "127.0.0.1", str(self.port),
                str(self.ready_file), str(self.stats_file), self.loop]

    def final_count(self) -> int:
        return int(self.stats_file.read_text())


class Elemta(Server):
    name = "elemta"

    commit_threads: int | None = None

    def __init__(self, workdir: Path, loop: str) -> None:
        super().__init__(workdir, loop)
        self.config = workdir / "elemta.toml"
        self.ready_dir = workdir / "spool" / "ready"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        extra = ("" if self.commit_threads is None
                 else f"\ncommit_threads = {self.commit_threads}")
        self.config.write_text(ELEMTA_CONFIG.format(loop=self.loop, port=self.port,
                                                    domain=LOCAL_DOMAIN, spool_extra=extra))
        super().start()

    def command(self) -> list[str]:
        exe = Path(sys.executable).parent / "elemta"
        base = [str(exe)] if exe.exists() else [sys.executable, "-m", "elemta"]
        return [*base, "serve", "--config", str(self.config)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("ELEMTA_LOAD_PLUGINS", None)  # built-in plugins only
        env["ELEMTA_READY_FILE"] = str(self.ready_file)
        return env

    def accepted(self) -> int:
        return count_files(self.ready_dir)


class ElemtaData(Elemta):
    name = "elemta-data"


class ElemtaBdat(Elemta):
    name = "elemta-bdat"


SERVERS = {"aiosmtpd": Baseline, "elemta": Elemta, "elemta-data": ElemtaData,
           "elemta-bdat": ElemtaBdat}

LOAD_CLIENT = textwrap.dedent('''
    import asyncio, sys

    port, messages, sessions, per_session, mode = (int(sys.argv[1]), int(sys.argv[2]),
                                                   int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    sender, rcpt, size = sys.argv[6], sys.argv[7], int(sys.argv[8])
    line = b"x" * 76 + b"\\r\\n"
    head = b"Subject: load\\r\\nFrom: <" + sender.encode() + b">\\r\\n\\r\\n"
    body = head + line * ((size - len(head)) // len(line))
    envelope = f"MAIL FROM:<{sender}>\\r\\nRCPT TO:<{rcpt}>\\r\\n".encode()

    async def reply(reader, expect):
        while True:
            got = await reader.readline()
            if got[3:4] != b"-":
                break
        if not got.startswith(expect):
            raise SystemExit(f"expected {expect!r}, got {got!r}")

    async def session(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reply(reader, b"220")
        writer.write(b"EHLO load.example\\r\\n")
        await reply(reader, b"250")
        for _ in range(count):
            if mode == "bdat":
                writer.write(envelope + b"BDAT %d LAST\\r\\n" % len(body) + body)
                for code in (b"250", b"250", b"250"):
                    await reply(reader, code)
            else:
                writer.write(envelope + b"DATA\\r\\n")
                for code in (b"250", b"250", b"354"):
                    await reply(reader, code)
                writer.write(body + b".\\r\\n")
                await reply(reader, b"250")
        writer.write(b"QUIT\\r\\n")
        await reply(reader, b"221")
        writer.close()

    async def worker(share):
        per = max(1, per_session)
        while share > 0:
            n = min(per, share)
            await session(n)
            share -= n

    async def main():
        shares = [messages // sessions + (i < messages % sessions) for i in range(sessions)]
        await asyncio.gather(*(worker(n) for n in shares if n))

    asyncio.run(main())
''')


def load_client_commands(kind: str, port: int, messages: int, sessions: int,
                         per_session: int) -> list[list[str]]:
    """The Python client's command line for ``elemta-data`` and ``elemta-bdat``."""
    mode = "bdat" if kind == "elemta-bdat" else "data"
    return [[sys.executable, "-c", LOAD_CLIENT, str(port), str(messages), str(sessions),
             str(per_session), mode, SENDER, RECIPIENT, str(MESSAGE_BYTES)]]


# ----------------------------------------------------------------------------- load


def smtp_source_batches(exe: str, port: int, messages: int, sessions: int,
                        per_session: int) -> list[list[str]]:
    """The smtp-source command lines that send ``messages`` as asked."""
    common = ["-l", str(MESSAGE_BYTES), "-f", SENDER, "-t", RECIPIENT]
    target = f"127.0.0.1:{port}"
    if per_session <= 1:
        return [[exe, "-s", str(sessions), "-m", str(messages), *common, target]]
    batches = []
    left = messages
    while left > 0:
        m = min(left, sessions * per_session)
        s = min(sessions, m)
        batches.append([exe, "-d", "-s", str(s), "-m", str(m), *common, target])
        left -= m
    return batches


def send(commands: list[list[str]]) -> None:
    for cmd in commands:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out = (res.stdout + res.stderr).decode(errors="replace").strip()
        if res.returncode != 0 or out:
            raise BenchError(f"smtp-source failed (exit {res.returncode}): {' '.join(cmd)}\n"
                             f"{out[:2000]}")


class PerMessage:
    """Per-message figures of a run with ``messages``, ``seconds``, ``server_cpu_s``, ``threads_s``."""

    messages: int
    seconds: float
    server_cpu_s: float
    threads_s: tuple[float, float, float, float]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.server_cpu_s / self.messages * 1e6

    def thread_us(self) -> str:
        """Event-loop thread user+sys / other threads user+sys, us per message."""
        mu, ms, ru, rs = (x / self.messages * 1e6 for x in self.threads_s)
        return f"{mu:.0f}+{ms:.0f} / {ru:.0f}+{rs:.0f}"


@dataclass
class Run(PerMessage):
    server: str
    sessions: int
    per_session: int
    round: int
    messages: int
    seconds: float
    server_cpu_s: float
    client_cpu_s: float
    box_busy: float
    box_cpu_s: float
    accepted: int
    threads_s: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def client_us(self) -> float:
        return self.client_cpu_s / self.messages * 1e6

    @property
    def others(self) -> float:
        """Cores used by everything but this server and smtp-source (other load on the box)."""
        return max(0.0, self.box_cpu_s - self.server_cpu_s - self.client_cpu_s) / self.seconds


@dataclass
class Bench:
    smtp_source: str
    messages: int
    warmup: int
    loop: str
    root: Path
    shown: set[str] = field(default_factory=set)

    def run(self, kind: str, sessions: int, per_session: int, rnd: int,
            profile: Path | None = None, messages: int | None = None) -> Run:
        messages = self.messages if messages is None else messages
        workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root))
        server = SERVERS[kind](workdir, self.loop)
        sampler = None
        try:
            server.start()
            self._show(kind, server, sessions, per_session)
            load = (smtp_source_batches if kind in ("aiosmtpd", "elemta") else
                    (lambda _exe, *a: load_client_commands(kind, *a)))
            if self.warmup:
                send(load(self.smtp_source, server.port, self.warmup, sessions, per_session))
            commands = load(self.smtp_source, server.port, messages, sessions, per_session)
            before_accepted = server.accepted()
            deadline = time.monotonic() + 10  # Elemta writes files out just after the 250
            while (self.warmup and before_accepted is not None
                   and before_accepted < self.warmup and time.monotonic() < deadline):
                time.sleep(0.05)
                before_accepted = server.accepted()
            if self.warmup and before_accepted is not None and before_accepted != self.warmup:
                raise BenchError(f"{kind}: {before_accepted} messages in the spool after a "
                                 f"warm-up of {self.warmup}")
            if profile is not None:
                sampler_log = open(workdir / "py-spy.log", "wb")
                sampler = subprocess.Popen(
                    [py_spy(), "record", "--pid", str(server.pid), "--rate", "500",
                     "--format", "raw", "--threads", "--gil", "--output", str(profile)],
                    stdout=sampler_log, stderr=subprocess.STDOUT)
                sampler_log.close()
                time.sleep(1.0)  # let py-spy attach before the load starts
            thr0 = thread_cpu(server.pid)
            cpu0, box0, cli0 = proc_cpu(server.pid), box_times(), children_cpu()
            t0 = time.perf_counter()
            send(commands)
            elapsed = time.perf_counter() - t0
            cpu1, box1, cli1 = proc_cpu(server.pid), box_times(), children_cpu()
            thr1 = thread_cpu(server.pid)
            if sampler is not None:
                sampler.send_signal(signal.SIGINT)
                sampler.wait(60)
                if not profile.exists():  # type: ignore[union-attr]
                    raise BenchError("py-spy wrote no profile:\n" + (workdir / "py-spy.log")
                                     .read_text(errors="replace")[-2000:])
            server.stop()  # Elemta writes out what its journal holds before it exits
            after_accepted = server.accepted()
            if kind == "aiosmtpd":
                total = server.final_count()  # type: ignore[attr-defined]
                accepted = total - self.warmup
                if total != self.warmup + messages:
                    raise BenchError(f"aiosmtpd counted {total} messages, sent "
                                     f"{self.warmup} + {messages}")
            else:
                accepted = after_accepted - (before_accepted or 0)
                if accepted != messages:
                    raise BenchError(f"elemta: ready/ grew by {accepted}, sent {messages}")
            noise = server.stderr_text()
            if noise:
                print(f"  [{kind} stderr] {noise[:500]}", file=sys.stderr)
            busy = (box1[0] - box0[0]) / max(1, box1[1] - box0[1])
            box_cpu = (box1[0] - box0[0]) / CLK_TCK
            return Run(kind, sessions, per_session, rnd, messages, elapsed, cpu1 - cpu0,
                       cli1 - cli0, busy, box_cpu, accepted,
                       tuple(b - a for a, b in zip(thr0, thr1)))  # type: ignore[arg-type]
        finally:
            if sampler is not None and sampler.poll() is None:
                sampler.kill()
                sampler.wait()
            server.stop()
            # The spool stays until the benchmark ends: deleting thousands of files
            # makes the next run's file creations slower on some file systems
            # (ext4 without a journal skips recently freed inodes one by one).

    def _show(self, kind: str, server: Server, sessions: int, per_session: int) -> None:
        key = f"{kind}-{sessions}-{per_session}"
        if key in self.shown:
            return
        if not any(k.startswith(kind + "-") for k in self.shown):
            print(f"  server {kind}: {' '.join(server.command())}")
            if isinstance(server, Elemta):
                print(textwrap.indent(server.config.read_text().strip(), "      "))
        if kind in ("aiosmtpd", "elemta"):
            cmds = smtp_source_batches(self.smtp_source, server.port, self.messages,
                                       sessions, per_session)
        else:
            cmds = [[*load_client_commands(kind, server.port, self.messages, sessions,
                                           per_session)[0][:2], "<LOAD_CLIENT>",
                     *load_client_commands(kind, server.port, self.messages, sessions,
                                           per_session)[0][3:]]]
        more = f"  (and {len(cmds) - 1} more batches like it)" if len(cmds) > 1 else ""
        print(f"  load s={sessions} r={per_session}: {' '.join(cmds[0])}{more}")
        self.shown.add(key)


# ----------------------------------------------------------------------------- report


def fmt_range(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def report(runs: list[Run], settings: list[tuple[int, int]], kinds: list[str]) -> dict:
    cols = [f"s={s} r={r}" for s, r in settings]
    by: dict[tuple[str, int, int], list[Run]] = collections.defaultdict(list)
    for run in runs:
        by[(run.server, run.sessions, run.per_session)].append(run)

    def header(title: str) -> None:
        print(f"\n{title}\n")
        print("| server | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))

    summary: dict = {}
    header(f"Throughput, msgs/s: median [min-max] over {max(r.round for r in runs) + 1} rounds")
    for kind in kinds:
        cells = []
        for s, r in settings:
            rates = [x.rate for x in by[(kind, s, r)]]
            cells.append(fmt_range(rates))
            summary.setdefault(kind, {})[f"s{s}_r{r}"] = {
                "rate_median": statistics.median(rates), "rates": rates,
                "cpu_us_median": statistics.median(x.cpu_us for x in by[(kind, s, r)]),
                "box_busy_median": statistics.median(x.box_busy for x in by[(kind, s, r)]),
                "client_us_median": statistics.median(x.client_us for x in by[(kind, s, r)]),
                "others_cores_median": statistics.median(x.others for x in by[(kind, s, r)])}
        print(f"| {kind} | " + " | ".join(cells) + " |")

    if "elemta" in kinds and "aiosmtpd" in kinds:
        header("Ratio elemta / aiosmtpd (of the medians; in brackets: per round)")
        cells = []
        for s, r in settings:
            e = summary["elemta"][f"s{s}_r{r}"]["rate_median"]
            a = summary["aiosmtpd"][f"s{s}_r{r}"]["rate_median"]
            e_runs = sorted(by[("elemta", s, r)], key=lambda x: x.round)
            a_runs = sorted(by[("aiosmtpd", s, r)], key=lambda x: x.round)
            per_round = [x.rate / y.rate for x, y in zip(e_runs, a_runs)]
            summary.setdefault("ratio", {})[f"s{s}_r{r}"] = e / a
            cells.append(f"**{e / a:.2f}** [{', '.join(f'{p:.2f}' for p in per_round)}]")
        print("| elemta / aiosmtpd | " + " | ".join(cells) + " |")

    header("Server CPU per message, us / machine busy (2 cores) / smtp-source CPU per message, us "
           "/ cores used by other processes (medians)")
    for kind in kinds:
        cells = []
        for s, r in settings:
            g = by[(kind, s, r)]
            cells.append(f"{statistics.median(x.cpu_us for x in g):.0f} / "
                         f"{statistics.median(x.box_busy for x in g) * 100:.0f}% / "
                         f"{statistics.median(x.client_us for x in g):.0f} / "
                         f"{statistics.median(x.others for x in g):.2f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    header("Server CPU per message split by thread, us (median run): event-loop thread "
           "user+sys / other threads user+sys")
    for kind in kinds:
        cells = []
        for s, r in settings:
            g = sorted(by[(kind, s, r)], key=lambda x: x.cpu_us)
            cells.append(g[len(g) // 2].thread_us())
        print(f"| {kind} | " + " | ".join(cells) + " |")
    return summary


# ----------------------------------------------------------------------------- profile


def summarize_profile(path: Path, top: int = 20) -> None:
    """Print where py-spy's samples went: per thread, per area, per function."""
    main_self: collections.Counter[str] = collections.Counter()
    main_incl: collections.Counter[str] = collections.Counter()
    main_areas: collections.Counter[str] = collections.Counter()
    other_leaves: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = main = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        threads[thread.rstrip("_0123456789") or thread] += n
        total += n
        if thread != "MainThread":
            other_leaves[_func(frames[-1])] += n
            continue
        main += n
        main_self[_func(frames[-1])] += n
        main_areas[_area(frames[-1])] += n
        seen: set[str] = set()
        for f in frames[1:]:
            key = _func(f)
            if key.startswith("elemta/") and key not in seen:
                main_incl[key] += n
                seen.add(key)
    if not total:
        print(f"  {path}: no samples")
        return

    def pct(n: int, of: int) -> str:
        return f"{n * 100 / of:5.1f}%"

    print(f"\n  {path}: {total} samples of the GIL holder; by thread: "
          + ", ".join(f"{t} {pct(n, total).strip()}" for t, n in threads.most_common()))
    if main:
        print(f"  event-loop thread, self time by area ({main} samples = 100%):")
        for a, n in main_areas.most_common():
            print(f"    {pct(n, main)}  {a}")
        print(f"  event-loop thread, top {top} functions by self time:")
        for f, n in main_self.most_common(top):
            print(f"    {pct(n, main)}  {f}")
        print("  event-loop thread, elemta functions by inclusive time:")
        for f, n in main_incl.most_common(top):
            print(f"    {pct(n, main)}  {f}")
    if total > main:
        print(f"  other threads, top functions by self time (% of all {total} samples):")
        for f, n in other_leaves.most_common(10):
            print(f"    {pct(n, total)}  {f}")


def _func(frame: str) -> str:
    """``name (path/to/file.py:123)`` → ``file.py:name``."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0]
    parts = file.split("/")
    if "elemta" in parts:
        file = "/".join(parts[parts.index("elemta"):])
    else:
        file = parts[-1]
    return f"{file}:{name}"


def _area(frame: str) -> str:
    """The package or module a frame is in: ``elemta``, ``aiosmtpd``, ``asyncio``, ``json``…"""
    where = frame.partition(" (")[2].rsplit(":", 1)[0]
    parts = where.split("/")
    for anchor in ("elemta", "aiosmtpd", "asyncio", "uvloop"):
        if anchor in parts:
            return anchor
    top = parts[-2] if len(parts) > 1 and parts[-2] not in ("", "lib") else parts[-1]
    return top.removesuffix(".py")


# ----------------------------------------------------------------------------- main


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every server once per setting")
    ap.add_argument("--messages", type=int, default=5000, help="timed messages per run")
    ap.add_argument("--warmup", type=int, default=1000, help="unrecorded messages per run")
    ap.add_argument("--concurrency", type=parse_ints, default=[10, 100],
                    help="smtp-source sessions (-s), comma-separated")
    ap.add_argument("--per-session", type=parse_ints, default=[1],
                    help="messages per session, comma-separated (1, 10)")
    ap.add_argument("--servers", default="aiosmtpd,elemta", help="servers to run, comma-separated")
    ap.add_argument("--uvloop", action="store_true", help="run both servers on uvloop")
    ap.add_argument("--commit-threads", type=int, default=None,
                    help="Elemta's [spool] commit_threads (default: Elemta's default)")
    ap.add_argument("--dir", type=Path, default=default_dir(),
                    help="where the temporary spools go (default /var/tmp); put it on the disk "
                         "a spool would use")
    ap.add_argument("--profile", type=Path, default=None,
                    help="after the rounds, profile one Elemta run per setting with py-spy "
                         "into this folder")
    ap.add_argument("--profile-messages", type=int, default=10000,
                    help="timed messages of a profiled run")
    ap.add_argument("--json", type=Path, default=None, help="write every run here")
    args = ap.parse_args()
    compile_bytecode()

    smtp_source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.access(smtp_source, os.X_OK):
        print("smtp-source not found: apt-get install postfix (it is in /usr/sbin)",
              file=sys.stderr)
        return 2
    if args.profile is not None and shutil.which(py_spy()) is None:
        print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    kinds = [k for k in args.servers.split(",") if k]
    for k in kinds:
        if k not in SERVERS:
            ap.error(f"unknown server {k!r}; choose from {', '.join(SERVERS)}")
    loop = "uvloop" if args.uvloop else "asyncio"
    Elemta.commit_threads = args.commit_threads
    settings = [(s, r) for r in args.per_session for s in args.concurrency]

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"accept benchmark, {started}: {args.messages} messages of {MESSAGE_BYTES} B per run "
          f"(+{args.warmup} warm-up), {args.rounds} rounds, event loop {loop}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, elemta at "
          f"{code_version()}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="elemta-accept-", dir=args.dir) as tmp:
        create_us, durable_us = probe_disk(Path(tmp))
        print(f"spools under {tmp}: creating a file takes {create_us:.0f} us, creating, "
              f"writing {MESSAGE_BYTES} B and fdatasync {durable_us:.0f} us (medians)")
        if create_us > 100:
            print("  warning: creating a file is slow on this file system; Elemta creates two "
                  "per message, so its figures depend on it (see docs/performance.md)")
        bench = Bench(smtp_source, args.messages, args.warmup, loop, Path(tmp))
        try:
            for rnd in range(args.rounds):
                for s, r in settings:
                    order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
                    for kind in order:
                        run = bench.run(kind, s, r, rnd)
                        runs.append(run)
                        print(f"  round {rnd + 1} s={s} r={r} {kind:<8} {run.rate:7.0f} msgs/s "
                              f"{run.cpu_us:6.0f} us CPU/msg  busy {run.box_busy * 100:3.0f}%  "
                              f"others {run.others:.2f} cores  "
                              f"({run.accepted} accepted in {run.seconds:.2f} s)", flush=True)
        except BenchError as e:
            print(f"\nbenchmark aborted: {e}", file=sys.stderr)
            return 1
        summary = report(runs, settings, kinds)

        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for s, r in settings:
                out = args.profile / f"elemta-s{s}-r{r}.txt"
                run = bench.run("elemta", s, r, args.rounds, profile=out,
                                messages=args.profile_messages)
                print(f"\n  profiled run s={s} r={r}: {run.rate:.0f} msgs/s under py-spy")
                summarize_profile(out)

    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average "
          f"{os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "started": started, "code": code_version(), "loop": loop, "messages": args.messages,
            "warmup": args.warmup, "rounds": args.rounds, "summary": summary,
            "runs": [{**asdict(r), "rate": r.rate, "cpu_us": r.cpu_us, "others": r.others}
                     for r in runs]},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
