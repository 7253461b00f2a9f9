"""Elemta beside Postfix 3.7: durable acceptance, relay end to end, delivery of a held queue.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/relay.py [--rounds 3] [--messages 5000]
        [--sessions 10,100] [--scenarios accept,relay,queue] [--warmup 500]
        [--allow-load] [--max-load 0.15] [--retries 1] [--syscalls] [--profile DIR]
        [--postconf NAME=VALUE] [--workers N] [--max-per-destination N]
        [--no-transport-process] [--json FILE]

Needs root (Postfix's master daemon runs as root; its daemons run as ``postfix``),
Debian's ``postfix`` package (``postfix``, ``smtp-source``, ``smtp-sink``), and for
``--syscalls`` ``strace`` (``apt-get install strace``). The system's own Postfix
is neither used nor touched: each Postfix run gets a private instance (its own
``main.cf``, ``master.cf``, queue and log) in the benchmark's folder.

**Isolation.** As root the benchmark re-executes itself in a private network
namespace (``unshare -n``, only ``lo`` up): the servers and the sink listen on
127.0.0.1 ports that nobody else on a shared machine can take, and no message can
leave the machine. ``--no-netns`` runs in the machine's namespace on free ports.

**Both servers, same load.** Messages of 4096 bytes from ``smtp-source -s S -m N -l
4096 -f sender@example.org -t user@remote.example``, one message per connection,
no TLS; 127.0.0.1 may relay on both servers. Each run starts its server afresh on
an empty spool/queue under ``--dir`` (default ``/var/tmp``, the disk: both fsync
there), sends ``--warmup`` unrecorded messages, then times ``--messages`` ones.

* **Elemta**: ``elemta serve`` with one plain listener, built-in plugins only,
  ``[log] level = "info"``, metrics off, ``max_connections_per_ip = 2000`` (every
  session comes from 127.0.0.1), and for relaying ``[delivery.routes."*"] host =
  "127.0.0.1:SINK", tls = "none"``; everything else at its defaults (20 delivery
  workers, 10 connections per destination, connections kept 10 s for reuse, the SMTP
  transport in its helper process).
* **Postfix**: ``master -d`` of Debian's Postfix with Debian's ``master.cf``
  (chroot off), ``relayhost = [127.0.0.1]:SINK``, DNS off, logging to a file
  through postlogd; everything else at Postfix's defaults (destination concurrency
  20, connection cache on demand, 100 uses per daemon process).

**Scenarios** (``--scenarios``):

a. ``accept``: durable acceptance with delivery held, at each ``--sessions``. Elemta
   runs with ``[delivery] enabled = false`` (a 250 means the message is in the
   fsynced journal); Postfix's smtpd puts every message on hold
   (``check_client_access static:HOLD``: cleanup fsyncs the queue file into
   ``hold/`` before the 250, and the queue manager never sees it). Rate = N / the
   wall time of smtp-source. Checked: the server's queue holds warm-up + N messages
   once it has stopped.
b. ``relay``: accept and relay end to end into ``smtp-sink -c``, at each
   ``--sessions``. Time from smtp-source's start (its first connection) until the
   sink has counted all N messages and the server's queue is empty again; the rate
   of acceptance alone (smtp-source's wall time) is shown beside it. Checked: the
   sink counted exactly warm-up + N, the queue is empty (Elemta: ``ready/``,
   ``deferred/``, ``hold/``, ``failed/``, ``messages/``; Postfix: every queue folder,
   and its log shows warm-up + N ``status=sent`` and nothing deferred or bounced).
c. ``queue``: delivery of a full queue. N messages are accepted (``-s 10``) while
   delivery is held (as in a), the server is stopped (Postfix: then ``postsuper -H
   ALL`` makes them deferred and due), and the clock starts when the server process
   is spawned again with delivery on (Elemta: ``elemta serve``; Postfix: its master
   daemon). It stops when the sink has N messages and the queue is empty:
   interpreter start-up, spool recovery and the queue scan are inside the time, for
   both. Also shown: the steady rate (messages the sink received between 10% and 90%
   of N, over the time that took) and the time from spawn to the first delivery.

**Rounds.** ``--rounds`` rounds; in each, every scenario and session count runs both
servers one after the other, and which server goes first alternates from round to
round, so drift on a shared machine hits both. Tables show the median and [min-max]
over rounds; the ratio is Elemta / Postfix of the medians (> 1: Elemta is faster),
each round's own ratio in brackets.

**CPU.** Server CPU is user+sys of the whole process tree from ``/proc/PID/stat``
over the timed window, including children that exited and were reaped (Postfix:
the sum over master, smtpd, cleanup, trivial-rewrite, qmgr, smtp, postlogd, anvil...;
its smtpd processes exit after 100 uses and are counted through the master's
cutime); per message, with Postfix's share per program in ``--json``. In c the
window starts at the spawn, so start-up is in it. smtp-source's and the sink's CPU
are shown separately.

**Interference.** Before starting, the machine is watched for ``--preflight``
seconds: if processes other than this benchmark use more than ``--max-load`` cores
(counted as below), it refuses to run and names the busiest ones, unless
``--allow-load``. During every timed window, "foreign" is the CPU used by every
process outside this benchmark's tree (everything it started) and the kernel's
threads, with the children they reaped meanwhile, plus steal, in cores. A run above
``--max-load`` is re-run up to ``--retries`` times (the least disturbed attempt is
kept); if it is still above, the benchmark stops unless ``--allow-load``, in which
case the figure is kept and flagged. The summary reports the interference of every
scenario.

**Checks.** A run whose count or queue check fails, or whose smtp-source exits
non-zero or prints anything, stops the benchmark with what was found: a failed
check fails the run, never a figure.

``--syscalls``: after the rounds, one short run per server of a and b at ``-s 10``
(``--syscall-messages``, 500) with ``strace -c -f`` attached to the server's
processes (for Postfix: the master and every daemon it has or forks) after the
warm-up; prints system calls per message, the most frequent first. strace slows
the servers down, so these runs give no rates. ``--profile DIR``: one more Elemta
run of b at ``-s 10`` under ``py-spy record --gil`` (summarized as in
``bench/accept.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accept import (CLK_TCK, BenchError, children_cpu, code_version, compile_bytecode,
                    count_files, default_dir, descendants, fmt_range, free_port, probe_disk,
                    proc_table, py_spy, send, summarize_profile, tree_cpu)
from deliver import Sink, elemta_command, elemta_env, listening, stop, tail
from postfix_instance import PostfixError, PostfixInstance
from postfix_instance import version as postfix_version

SENDER = "sender@example.org"
RECIPIENT = "user@remote.example"
MESSAGE_BYTES = 4096
QUEUE_SESSIONS = 10          # smtp-source sessions that fill the queue of scenario c
POLL_SECONDS = 0.01
NETNS_ENV = "ELEMTA_BENCH_NETNS"

ELEMTA_CONFIG = textwrap.dedent('''
    [server]
    hostname = "mx.example.test"
    state_dir = "state"
    relay_networks = ["127.0.0.0/8"]
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
    path = "spool"

    [metrics]
    enabled = false

    [log]
    level = "{log_level}"

    [delivery]
    enabled = {enabled}{delivery_extra}

    [delivery.routes."*"]
    host = "127.0.0.1:{sink_port}"
    tls = "none"
''')


# ----------------------------------------------------------------------------- CPU accounting


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


@dataclass
class Snap:
    """The machine's and every process's CPU at one moment."""

    t: float
    stat: list[int]
    table: dict

    @classmethod
    def take(cls) -> "Snap":
        with open("/proc/stat") as f:
            stat = [int(x) for x in f.readline().split()[1:9]]
        return cls(time.perf_counter(), stat, proc_table())


def window(s0: Snap, s1: Snap) -> dict[str, float]:
    """Machine busy (fraction of all CPUs), and cores used by other processes ("foreign":
    the user+system time of every process outside this benchmark's tree and the kernel's
    threads, their reaped children included, plus steal) and by kernel threads, between
    two snapshots.

    Foreign load is counted process by process rather than as the machine's time minus
    this benchmark's: the two accountings differ by up to a third of a core when a
    server switches between many processes (Postfix at 100 sessions: ``/proc/stat``
    shows 0.3 cores more system time than its processes' own counters, with nothing
    else running), which would flag every such run as disturbed."""
    wall = max(1e-9, s1.t - s0.t)
    d = [(b - a) / CLK_TCK for a, b in zip(s0.stat, s1.stat)]
    total = sum(d)
    busy = total - d[3] - d[4]
    kern, others = _outside(s0, s1)
    foreign = sum(used for _, used in others) / CLK_TCK + d[7]
    return {"busy": busy / total if total else 0.0, "foreign_cores": foreign / wall,
            "kthread_cores": kern / CLK_TCK / wall, "steal_cores": d[7] / wall,
            "others": _busiest(others, s1.t - s0.t, 3)}


def _outside(s0: Snap, s1: Snap) -> tuple[int, list[tuple[int, int]]]:
    """Ticks used between the snapshots outside this benchmark's tree: by the kernel's
    threads, and by every other process (pid, ticks with the children it reaped)."""
    mine = descendants(s1.table, [os.getpid()]) | descendants(s0.table, [os.getpid()])
    kthreads = descendants(s1.table, [2])
    kern, others = 0, []
    for pid, (_ppid, ticks, start, reaped) in s1.table.items():
        if pid in mine:
            continue
        old = s0.table.get(pid)
        same = old is not None and old[2] == start
        if pid in kthreads:
            kern += ticks - (old[1] if same else 0)
        else:
            used = ticks + reaped - ((old[1] + old[3]) if same else 0)
            if used > 0:
                others.append((pid, used))
    return kern, others


def _busiest(others: list[tuple[int, int]], wall: float,
             n: int) -> list[tuple[str, int, float]]:
    top = sorted(others, key=lambda x: -x[1])[:n]
    return [(comm(pid), pid, used / CLK_TCK / wall) for pid, used in top]


def busiest_others(s0: Snap, s1: Snap, n: int = 5) -> list[tuple[str, int, float]]:
    """The processes outside this benchmark that used the most CPU between the snapshots
    (with their children reaped meanwhile)."""
    return _busiest(_outside(s0, s1)[1], s1.t - s0.t, n)


def fmt_others(others: list) -> str:
    return ", ".join(f"{name} ({pid}) {cores:.2f}" for name, pid, cores in others) or "none"


def by_program(s0: Snap, s1: Snap, root: int) -> dict[str, float]:
    """CPU seconds of a process tree per program name; processes that exited during the
    window are under "exited" (their parent's cutime grew by that much)."""
    out: dict[str, float] = {}
    for pid in descendants(s1.table, [root]):
        st1, st0 = s1.table[pid], s0.table.get(pid)
        same = st0 is not None and st0[2] == st1[2]
        name = comm(pid)
        out[name] = out.get(name, 0.0) + (st1[1] - (st0[1] if same else 0)) / CLK_TCK
        out["exited"] = out.get("exited", 0.0) + (st1[3] - (st0[3] if same else 0)) / CLK_TCK
    return {k: round(v, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


# ----------------------------------------------------------------------------- servers


def wait_until(what: str, check, timeout: float, alive=None, log=None) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # bounded by the deadline
        if alive is not None and not alive():
            raise BenchError(f"{what}: the server exited" + (":\n" + log() if log else ""))
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not done within {timeout:.0f} s"
                             + (":\n" + log() if log else ""))
        time.sleep(POLL_SECONDS)


class ElemtaServer:
    name = "elemta"

    def __init__(self, workdir: Path, opts: argparse.Namespace, sink_port: int) -> None:
        self.workdir = workdir
        self.opts = opts
        self.sink_port = sink_port
        self.port = free_port()
        self.config = workdir / "elemta.toml"
        self.spool = workdir / "spool"
        self.ready_file = workdir / "ready"
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self, delivery: bool) -> None:
        extra = ""
        if self.opts.workers is not None:
            extra += f"\nworkers = {self.opts.workers}"
        if self.opts.max_per_destination is not None:
            extra += f"\nmax_per_destination = {self.opts.max_per_destination}"
        if not self.opts.transport_process:
            extra += "\ntransport_process = false"
        self.config.write_text(ELEMTA_CONFIG.format(
            loop=self.opts.loop, port=self.port, log_level=self.opts.log_level,
            enabled="true" if delivery else "false", delivery_extra=extra,
            sink_port=self.sink_port))

    def command(self) -> list[str]:
        return elemta_command(self.config)

    def spawn(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=elemta_env(self.ready_file))

    def is_ready(self) -> bool:
        return self.ready_file.exists()

    def wait_ready(self) -> None:
        wait_until("elemta start", self.is_ready, 60, self.alive, self.log_tail)
        time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        code = stop(self.proc, 60)
        if code not in (0, None):
            raise BenchError(f"elemta exited with {code} on SIGTERM:\n{self.log_tail()}")

    def _count(self, sub: str) -> int:
        try:
            return count_files(self.spool / sub)
        except FileNotFoundError:
            return 0

    def held(self) -> int:
        return self._count("ready")

    def queued(self) -> int:
        return self._count("ready") + self._count("deferred") + self._count("hold")

    def leftovers(self) -> dict[str, int]:
        """What is left in the spool once the queue should be empty."""
        left = {s: self._count(s) for s in ("ready", "deferred", "hold", "failed", "messages")}
        return {k: v for k, v in left.items() if v}

    def delivery_log_problems(self, expected: int) -> str:
        return ""

    def log_tail(self) -> str:
        return tail(self.log)


class PostfixServer:
    name = "postfix"

    def __init__(self, workdir: Path, opts: argparse.Namespace, sink_port: int) -> None:
        self.workdir = workdir
        self.port = free_port()
        os.chmod(workdir, 0o755)  # the daemons run as postfix and must reach their queue
        self.inst = PostfixInstance(workdir / "postfix", self.port, sink_port, hold=False,
                                    extra_main=opts.postconf)
        self.inst.create()

    def configure(self, delivery: bool) -> None:
        self.inst.set_hold(not delivery)

    def command(self) -> list[str]:
        return self.inst.command()

    def spawn(self) -> None:
        self.inst.spawn()

    def is_ready(self) -> bool:
        return listening(self.port)

    def wait_ready(self) -> None:
        wait_until("postfix start", self.is_ready, 60, self.alive, self.log_tail)

    def alive(self) -> bool:
        return self.inst.proc is not None and self.inst.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.inst.pid

    def stop(self) -> None:
        self.inst.stop()

    def held(self) -> int:
        return self.inst.held()

    def queued(self) -> int:
        return self.inst.queued()

    def leftovers(self) -> dict[str, int]:
        return {k: v for k, v in self.inst.queue_counts().items() if v}

    def delivery_log_problems(self, expected: int) -> str:
        """Postfix's own account: every message logged status=sent, none deferred or
        bounced (postlogd writes a moment after the delivery: a bounded wait)."""
        deadline = time.monotonic() + 10
        sent, other = self.inst.log_counts()
        while sent < expected and time.monotonic() < deadline:
            time.sleep(0.1)
            sent, other = self.inst.log_counts()
        if sent != expected or other:
            return f"postfix logged {sent} status=sent (expected {expected}), {other} other"
        return ""

    def log_tail(self) -> str:
        return self.inst.log_tail()


SERVERS = {"elemta": ElemtaServer, "postfix": PostfixServer}


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    scenario: str
    server: str
    sessions: int
    round: int
    messages: int
    seconds: float                    # the scenario's figure: see the module's docstring
    server_cpu_s: float
    busy: float
    foreign_cores: float
    kthread_cores: float
    steal_cores: float = 0.0          # of foreign_cores: taken by the hypervisor
    others: list = field(default_factory=list)  # the busiest other processes: name, pid, cores
    accept_seconds: float | None = None
    client_cpu_s: float | None = None
    sink_cpu_s: float | None = None
    steady_rate: float | None = None
    first_delivery_s: float | None = None
    ready_s: float | None = None
    sink_sessions: int | None = None  # connections the server opened to the sink
    attempts: int = 1
    disturbed: bool = False
    programs: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def accept_rate(self) -> float | None:
        return self.messages / self.accept_seconds if self.accept_seconds else None

    @property
    def cpu_us(self) -> float:
        return self.server_cpu_s / self.messages * 1e6


class Bench:
    def __init__(self, opts: argparse.Namespace, root: Path) -> None:
        self.opts = opts
        self.root = root
        self.smtp_source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
        self.shown: set[str] = set()

    def load(self, port: int, messages: int, sessions: int) -> list[list[str]]:
        return [[self.smtp_source, "-s", str(sessions), "-m", str(messages),
                 "-l", str(MESSAGE_BYTES), "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]]

    def send(self, srv, messages: int, sessions: int) -> None:
        """smtp-source's load; a failure comes with the end of the server's log."""
        try:
            send(self.load(srv.port, messages, sessions))
        except BenchError as e:
            raise BenchError(f"{e}\n{srv.name}'s log ends with:\n{srv.log_tail()}") from None

    def workdir(self, scenario: str, kind: str, sessions: int, rnd: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{scenario}-{kind}-s{sessions}-r{rnd}-",
                                     dir=self.root))

    def show(self, kind: str, srv, sessions: int) -> None:
        if kind not in self.shown:
            self.shown.add(kind)
            print(f"  server {kind}: {' '.join(srv.command())}")
            if kind == "elemta":
                print(textwrap.indent(srv.config.read_text().strip(), "      "))
            else:
                print(f"      main.cf and master.cf: {srv.inst.conf}/ (see bench/postfix_instance.py)"
                      + "".join(f"\n      + {x}" for x in self.opts.postconf))
        if f"load-{sessions}" not in self.shown:
            self.shown.add(f"load-{sessions}")
            print(f"  load: {' '.join(self.load(srv.port, self.opts.messages, sessions)[0])}")

    # -- a: durable acceptance with delivery held
    def accept(self, kind: str, sessions: int, rnd: int) -> Run:
        o = self.opts
        srv = SERVERS[kind](self.workdir("accept", kind, sessions, rnd), o, 9)
        try:
            srv.configure(delivery=False)
            srv.spawn()
            srv.wait_ready()
            self.show(kind, srv, sessions)
            if o.warmup:
                self.send(srv, o.warmup, sessions)
                wait_until(f"{kind}: warm-up in the queue", lambda: srv.held() >= o.warmup, 30,
                           srv.alive, srv.log_tail)
            os.sync()
            cli0 = children_cpu()
            s0 = Snap.take()
            self.send(srv, o.messages, sessions)
            s1 = Snap.take()
            cli1 = children_cpu()
            cpu = tree_cpu(s1.table, [srv.pid]) - tree_cpu(s0.table, [srv.pid])
            programs = by_program(s0, s1, srv.pid) if kind == "postfix" else {}
            srv.stop()  # Elemta writes out what its journal holds before it exits
            held = srv.held()
            if held != o.warmup + o.messages:
                raise BenchError(f"accept {kind} s={sessions}: {held} messages held after the "
                                 f"run, sent {o.warmup} + {o.messages}:\n{srv.log_tail()}")
            return Run("accept", kind, sessions, rnd, o.messages, s1.t - s0.t, cpu,
                       client_cpu_s=cli1 - cli0, programs=programs, **window(s0, s1))
        finally:
            srv.stop()

    # -- b: accept and relay to the sink, end to end
    def relay(self, kind: str, sessions: int, rnd: int, strace: Path | None = None,
              profile: Path | None = None, messages: int | None = None) -> Run:
        o = self.opts
        n = messages or o.messages
        workdir = self.workdir("relay", kind, sessions, rnd)
        sink = Sink("smtp-sink", workdir)
        srv = None
        tracer = None
        try:
            sink.start()
            srv = SERVERS[kind](workdir, o, sink.port)
            srv.configure(delivery=True)
            srv.spawn()
            srv.wait_ready()
            self.show(kind, srv, sessions)
            if o.warmup:
                self.send(srv, o.warmup, sessions)
                wait_until(f"{kind}: warm-up delivered",
                           lambda: sink.count() >= o.warmup and srv.queued() == 0, 60,
                           srv.alive, srv.log_tail)
            os.sync()
            if strace is not None:
                tracer = attach_strace(strace, srv.pid)
            if profile is not None:
                tracer = attach_py_spy(profile, srv.pid, workdir)
            base, sess0 = sink.count(), sink_sessions(sink)
            goal = base + n
            cli0, sink0 = children_cpu(), proc_cpu_tree(sink.proc.pid)
            s0 = Snap.take()
            self.send(srv, n, sessions)
            t_acc = time.perf_counter()
            deadline = time.monotonic() + o.drain_timeout
            # the queue is listed only once the sink has everything: a scan of a large
            # folder every few ms would cost the servers CPU
            while not (sink.count() >= goal and srv.queued() == 0):
                if not srv.alive():
                    raise BenchError(f"relay {kind}: the server exited:\n{srv.log_tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"relay {kind} s={sessions}: the sink has "
                                     f"{sink.count() - base} of {n} after "
                                     f"{o.drain_timeout:.0f} s, {srv.queued()} queued:\n"
                                     f"{srv.log_tail()}")
                time.sleep(POLL_SECONDS)
            s1 = Snap.take()
            cli1, sink1 = children_cpu(), proc_cpu_tree(sink.proc.pid)
            cpu = tree_cpu(s1.table, [srv.pid]) - tree_cpu(s0.table, [srv.pid])
            programs = by_program(s0, s1, srv.pid) if kind == "postfix" else {}
            if tracer is not None:
                finish_tracer(tracer)
                tracer = None
            problems = srv.delivery_log_problems(goal)
            srv.stop()
            time.sleep(0.1)  # the sink updates its counters when the sessions end
            got = sink.count() - base
            sessions_used = sink_sessions(sink) - sess0
            left = srv.leftovers()
            if got != n or left or problems:
                raise BenchError(f"relay {kind} s={sessions}: the sink counted {got} of {n}; "
                                 f"left in the queue: {left or 'nothing'}; {problems}\n"
                                 f"{srv.log_tail()}")
            return Run("relay", kind, sessions, rnd, n, s1.t - s0.t, cpu,
                       accept_seconds=t_acc - s0.t, client_cpu_s=cli1 - cli0,
                       sink_cpu_s=sink1 - sink0, sink_sessions=sessions_used, programs=programs,
                       **window(s0, s1))
        finally:
            if tracer is not None:
                finish_tracer(tracer)
            if srv is not None:
                srv.stop()
            sink.stop()

    # -- c: delivery of a full queue, from the spawn
    def queue(self, kind: str, rnd: int) -> Run:
        o = self.opts
        n = o.messages
        workdir = self.workdir("queue", kind, QUEUE_SESSIONS, rnd)
        sink = Sink("smtp-sink", workdir)
        srv = None
        try:
            sink.start()
            srv = SERVERS[kind](workdir, o, sink.port)
            srv.configure(delivery=False)
            srv.spawn()
            srv.wait_ready()
            self.send(srv, n, QUEUE_SESSIONS)
            wait_until(f"{kind}: queue filled", lambda: srv.held() >= n, 30, srv.alive,
                       srv.log_tail)
            srv.stop()
            if srv.held() != n:
                raise BenchError(f"queue {kind}: {srv.held()} messages held, sent {n}")
            if kind == "postfix":
                srv.inst.release_hold()
                counts = srv.inst.queue_counts()
                if counts["deferred"] != n:
                    raise BenchError(f"queue postfix: after postsuper -H ALL: {counts}")
            srv.configure(delivery=True)
            os.sync()  # the fill's write-back must not land in the timed part
            time.sleep(0.5)
            sink0 = proc_cpu_tree(sink.proc.pid)
            lo, hi = n // 10, n - n // 10
            marks: dict[str, float] = {}
            counts_at: dict[str, int] = {}
            s0 = Snap.take()
            srv.spawn()
            deadline = time.monotonic() + o.drain_timeout
            while True:  # bounded by the deadline
                now = time.perf_counter()
                # Elemta's ready file costs nothing to look at; a probe of Postfix's
                # port would make its master start an smtpd in the timed window
                if kind == "elemta" and "ready" not in marks and srv.is_ready():
                    marks["ready"] = now
                got = sink.count()
                for name, goal in (("first", 1), ("lo", lo), ("hi", hi)):
                    if got >= goal and name not in marks:
                        marks[name] = now
                        counts_at[name] = got
                if got >= n and srv.queued() == 0:
                    break
                if not srv.alive():
                    raise BenchError(f"queue {kind}: the server exited:\n{srv.log_tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"queue {kind}: the sink has {got} of {n} after "
                                     f"{o.drain_timeout:.0f} s, {srv.queued()} queued:\n"
                                     f"{srv.log_tail()}")
                time.sleep(POLL_SECONDS)
            s1 = Snap.take()
            sink1 = proc_cpu_tree(sink.proc.pid)
            cpu = tree_cpu(s1.table, [srv.pid])  # spawned inside the window: all of it
            programs = by_program(s0, s1, srv.pid) if kind == "postfix" else {}
            problems = srv.delivery_log_problems(n)
            srv.stop()
            time.sleep(0.1)
            got = sink.count()
            sessions_used = sink_sessions(sink)
            left = srv.leftovers()
            if got != n or left or problems:
                raise BenchError(f"queue {kind}: the sink counted {got} of {n}; left in the "
                                 f"queue: {left or 'nothing'}; {problems}\n{srv.log_tail()}")
            steady = ((counts_at["hi"] - counts_at["lo"]) / max(1e-9, marks["hi"] - marks["lo"])
                      if "lo" in marks and "hi" in marks and marks["hi"] > marks["lo"] else None)
            return Run("queue", kind, QUEUE_SESSIONS, rnd, n, s1.t - s0.t, cpu,
                       sink_cpu_s=sink1 - sink0, steady_rate=steady, sink_sessions=sessions_used,
                       first_delivery_s=marks["first"] - s0.t,
                       ready_s=marks["ready"] - s0.t if "ready" in marks else None,
                       programs=programs, **window(s0, s1))
        finally:
            if srv is not None:
                srv.stop()
            sink.stop()

    def run(self, scenario: str, kind: str, sessions: int, rnd: int) -> Run:
        """One run, re-run while other processes disturb it (bounded by --retries)."""
        attempts: list[Run] = []
        for _ in range(1 + self.opts.retries):
            if scenario == "accept":
                r = self.accept(kind, sessions, rnd)
            elif scenario == "relay":
                r = self.relay(kind, sessions, rnd)
            else:
                r = self.queue(kind, rnd)
            attempts.append(r)
            if r.foreign_cores <= self.opts.max_load or len(attempts) > self.opts.retries:
                break
            print(f"    ({scenario} {kind} s={sessions}: other processes used "
                  f"{r.foreign_cores:.2f} cores, {r.steal_cores:.2f} of them stolen by the "
                  f"hypervisor; busiest: {fmt_others(r.others)}: run again)", flush=True)
            time.sleep(2)
        best = min(attempts, key=lambda x: x.foreign_cores)
        best.attempts = len(attempts)
        if best.foreign_cores > self.opts.max_load:
            if not self.opts.allow_load:
                raise BenchError(
                    f"{scenario} {kind} s={sessions}: other processes used "
                    f"{best.foreign_cores:.2f} cores (limit --max-load {self.opts.max_load}) in "
                    f"each of {len(attempts)} attempts; run on a quiet machine, or pass "
                    "--allow-load to keep disturbed figures (they are flagged)")
            best.disturbed = True
        return best


def sink_sessions(sink: Sink) -> int:
    """SMTP sessions the sink has counted (``sess=N`` of ``smtp-sink -c``): the connections
    a server opened to deliver, so connection reuse shows."""
    with open(sink.out_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 256))
        data = f.read()
    for part in reversed(data.split(b"\r")):
        if b"sess=" in part:
            return int(part.split(b"sess=", 1)[1].split()[0])
    return 0


def proc_cpu_tree(pid: int) -> float:
    return tree_cpu(proc_table(), [pid])


# ----------------------------------------------------------------------------- tracers


def attach_strace(out: Path, pid: int) -> subprocess.Popen:
    """``strace -c -f`` on a server's process and all its current descendants (a
    multi-threaded process's threads are all attached by -f)."""
    pids = sorted(descendants(proc_table(), [pid]))
    cmd = ["strace", "-c", "-f", "-qq", "-o", str(out)]
    for p in pids:
        cmd += ["-p", str(p)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # attaching takes a moment; the load starts after it
    return proc


def attach_py_spy(out: Path, pid: int, workdir: Path) -> subprocess.Popen:
    with open(workdir / "py-spy.log", "wb") as log:
        proc = subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--rate", "500",
                                 "--format", "raw", "--threads", "--gil", "--output", str(out)],
                                stdout=log, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    return proc


def finish_tracer(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # both write their summary on SIGINT
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_strace_summary(path: Path) -> tuple[int, list[tuple[str, int]]]:
    """(total calls, [(syscall, calls)] most frequent first) from ``strace -c`` output."""
    calls: list[tuple[str, int]] = []
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0].replace(".", "").isdigit():
            continue
        # % time, seconds, usecs/call, calls, [errors], syscall|total
        name = parts[-1]
        count = int(parts[3])
        if name == "total":
            total = count
        else:
            calls.append((name, count))
    return total, sorted(calls, key=lambda c: -c[1])


# ----------------------------------------------------------------------------- report


def ratio_cells(mine: list[Run], theirs: list[Run], value) -> tuple[float, list[float]]:
    e = statistics.median(value(r) for r in mine)
    p = statistics.median(value(r) for r in theirs)
    per_round = [value(a) / value(b) for a, b in zip(sorted(mine, key=lambda r: r.round),
                                                        sorted(theirs, key=lambda r: r.round))]
    return e / p, per_round


def report(runs: list[Run], settings: list[tuple[str, int]], rounds: int) -> dict:
    by: dict[tuple[str, int, str], list[Run]] = {}
    for r in runs:
        by.setdefault((r.scenario, r.sessions, r.server), []).append(r)
    names = {"accept": "a. durable acceptance (delivery held)",
             "relay": "b. accept + relay to smtp-sink, end to end",
             "queue": "c. delivery of a held queue, spawn -> empty"}
    summary: dict = {}
    print(f"\nmsgs/s, median [min-max] over {rounds} round(s); ratio = Elemta / Postfix of the "
          "medians [per round]; CPU = server user+sys per message, whole process tree\n")
    print("| scenario | s | Elemta msgs/s | Postfix msgs/s | **ratio** | Elemta CPU µs/msg | "
          "Postfix CPU µs/msg | CPU ratio | foreign cores (max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for scenario, s in settings:
        e, p = by.get((scenario, s, "elemta")), by.get((scenario, s, "postfix"))
        if not e or not p:
            continue
        ratio, per = ratio_cells(e, p, lambda r: r.rate)
        cpu_ratio, _ = ratio_cells(e, p, lambda r: r.cpu_us)
        foreign = max(r.foreign_cores for r in e + p)
        flag = " (disturbed)" if any(r.disturbed for r in e + p) else ""
        print(f"| {names[scenario]} | {s} | {fmt_range([r.rate for r in e])} | "
              f"{fmt_range([r.rate for r in p])} | **{ratio:.2f}** "
              f"[{', '.join(f'{x:.2f}' for x in per)}] | {fmt_range([r.cpu_us for r in e])} | "
              f"{fmt_range([r.cpu_us for r in p])} | {cpu_ratio:.2f} | {foreign:.2f}{flag} |")
        summary[f"{scenario}_s{s}"] = {"ratio": ratio, "per_round": per, "cpu_ratio": cpu_ratio,
                                       "foreign_max": foreign}
    extra = [(sc, s) for sc, s in settings if sc in ("relay", "queue")]
    if extra:
        print("\n| scenario | s | server | acceptance msgs/s (b) / steady msgs/s (c) | "
              "spawn -> first delivery, s (c) | spawn -> ready file, s (c, Elemta) | "
              "smtp-source CPU µs/msg | sink CPU µs/msg | connections to the sink | "
              "machine busy |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for scenario, s in extra:
        for kind in ("elemta", "postfix"):
            g = by.get((scenario, s, kind))
            if not g:
                continue
            if scenario == "relay":
                second = fmt_range([r.accept_rate for r in g if r.accept_rate])
                first = ready = "-"
            else:
                steady = [r.steady_rate for r in g if r.steady_rate]
                second = fmt_range(steady) if steady else "-"
                first = fmt_range([r.first_delivery_s for r in g if r.first_delivery_s], 2)
                ready_v = [r.ready_s for r in g if r.ready_s is not None]
                ready = fmt_range(ready_v, 2) if ready_v else "-"
            cli = [r.client_cpu_s / r.messages * 1e6 for r in g if r.client_cpu_s is not None]
            snk = [r.sink_cpu_s / r.messages * 1e6 for r in g if r.sink_cpu_s is not None]
            cli_cell = f"{statistics.median(cli):.0f}" if cli else "-"
            snk_cell = f"{statistics.median(snk):.0f}" if snk else "-"
            conns = [r.sink_sessions for r in g if r.sink_sessions is not None]
            conn_cell = f"{statistics.median(conns):.0f}" if conns else "-"
            print(f"| {scenario} | {s} | {kind} | {second} | {first} | {ready} | {cli_cell} | "
                  f"{snk_cell} | {conn_cell} | {statistics.median(r.busy for r in g) * 100:.0f}% |")
    pf = [r for r in runs if r.server == "postfix" and r.programs]
    if pf:
        print("\nPostfix CPU per message by program (median run of each setting; µs; "
              "'exited' = daemons that exited during the run, mostly smtpd after max_use):")
        for scenario, s in settings:
            g = sorted(by.get((scenario, s, "postfix"), []), key=lambda r: r.cpu_us)
            if not g:
                continue
            m = g[len(g) // 2]
            parts = ", ".join(f"{k} {v / m.messages * 1e6:.0f}" for k, v in m.programs.items()
                              if v / m.messages * 1e6 >= 5)
            print(f"  {scenario} s={s}: {parts}")
    return summary


# ----------------------------------------------------------------------------- preflight


def preflight(seconds: float) -> tuple[float, list[tuple[str, int, float]]]:
    s0 = Snap.take()
    time.sleep(seconds)
    s1 = Snap.take()
    return window(s0, s1)["foreign_cores"], busiest_others(s0, s1)


def in_private_netns() -> bool:
    with open("/proc/self/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]] == ["lo"]


def enter_netns() -> None:
    """Re-execute this script in a new network namespace with only loopback up."""
    if os.environ.get(NETNS_ENV):
        raise SystemExit("could not set up a private network namespace; --no-netns runs "
                         "without one")
    os.environ[NETNS_ENV] = "1"
    os.execvp("unshare", ["unshare", "-n", "/bin/sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                          sys.executable, os.path.abspath(__file__), *sys.argv[1:]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--messages", "-m", type=int, default=5000,
                    help="timed messages per run (default 5000)")
    ap.add_argument("--warmup", type=int, default=500,
                    help="unrecorded messages before each timed run of a and b (default 500)")
    ap.add_argument("--sessions", default="10,100",
                    help="smtp-source sessions for a and b, comma-separated (default 10,100)")
    ap.add_argument("--scenarios", default="accept,relay,queue",
                    help="any of accept (a), relay (b), queue (c); comma-separated")
    ap.add_argument("--servers", default="elemta,postfix", help=argparse.SUPPRESS)
    ap.add_argument("--max-load", type=float, default=0.15,
                    help="cores other processes may use before and during a run (default 0.15)")
    ap.add_argument("--allow-load", action="store_true",
                    help="run and keep figures even when other processes load the machine "
                         "(the figures are flagged)")
    ap.add_argument("--preflight", type=float, default=3.0,
                    help="seconds the machine is watched before starting (default 3)")
    ap.add_argument("--retries", type=int, default=1,
                    help="re-runs of a run disturbed by other processes (default 1)")
    ap.add_argument("--drain-timeout", type=float, default=300.0,
                    help="longest wait for a queue to empty, s (default 300)")
    ap.add_argument("--workers", type=int, default=None, help="Elemta [delivery] workers")
    ap.add_argument("--max-per-destination", type=int, default=None,
                    help="Elemta [delivery] max_per_destination")
    ap.add_argument("--no-transport-process", dest="transport_process", action="store_false",
                    help="Elemta [delivery] transport_process = false (the SMTP transport in "
                         "the server's event loop)")
    ap.add_argument("--postconf", action="append", default=[], metavar="NAME=VALUE",
                    help="extra main.cf line for Postfix, e.g. "
                         "default_destination_concurrency_limit=10 (repeatable)")
    ap.add_argument("--uvloop", action="store_true", help="run Elemta on uvloop")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning"),
                    help="Elemta's [log] level (default info; Postfix logs every message)")
    ap.add_argument("--dir", type=Path, default=default_dir(),
                    help="where spools and queues go (default /var/tmp: on the disk)")
    ap.add_argument("--no-netns", action="store_true",
                    help="stay in the machine's network namespace")
    ap.add_argument("--syscalls", action="store_true",
                    help="after the rounds: strace -c -f a short run of a and b per server")
    ap.add_argument("--syscall-messages", type=int, default=500)
    ap.add_argument("--profile", type=Path, default=None,
                    help="after the rounds: one Elemta run of b (s=10) under py-spy, into DIR")
    ap.add_argument("--json", type=Path, default=None, help="write every run here")
    o = ap.parse_args()
    compile_bytecode()
    o.loop = "uvloop" if o.uvloop else "asyncio"
    o.postconf = [x.replace("=", " = ", 1) for x in o.postconf]
    sessions = [int(x) for x in o.sessions.split(",") if x.strip()]
    scenarios = [x for x in o.scenarios.split(",") if x]
    kinds = [x for x in o.servers.split(",") if x]
    for sc in scenarios:
        if sc not in ("accept", "relay", "queue"):
            ap.error(f"unknown scenario {sc!r}")
    if o.rounds < 0 or o.messages < 10 or o.warmup < 0:
        ap.error("--rounds >= 0, --messages >= 10, --warmup >= 0")

    if os.geteuid() != 0:
        print("needs root: Postfix's master daemon runs as root", file=sys.stderr)
        return 2
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if not (shutil.which(tool) or os.access(f"/usr/sbin/{tool}", os.X_OK)):
            print(f"{tool} not found: apt-get install postfix (it is in /usr/sbin)",
                  file=sys.stderr)
            return 2
    if o.syscalls and shutil.which("strace") is None:
        print("--syscalls needs strace: apt-get install strace", file=sys.stderr)
        return 2
    if o.profile is not None and shutil.which(py_spy()) is None:
        print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    if not o.no_netns and not in_private_netns():
        enter_netns()
    os.environ["PATH"] += ":/usr/sbin"

    foreign, busiest = preflight(o.preflight)
    load_note = ", ".join(f"{name}[{pid}] {c:.2f}" for name, pid, c in busiest if c >= 0.01)
    print(f"relay benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {o.messages} messages of "
          f"{MESSAGE_BYTES} B per run (+{o.warmup} warm-up), {o.rounds} rounds, sessions "
          f"{sessions}, scenarios {scenarios}; elemta at {code_version()} ({o.loop}), Postfix "
          f"{postfix_version()}; {os.cpu_count()} CPUs; "
          f"{'private network namespace' if in_private_netns() else 'host network'}")
    print(f"before starting, other processes used {foreign:.2f} cores over {o.preflight:.0f} s"
          + (f" (busiest: {load_note})" if load_note else ""))
    if foreign > o.max_load and not o.allow_load:
        print(f"refusing to run: the machine is not quiet ({foreign:.2f} cores in use by other "
              f"processes, limit --max-load {o.max_load}). Figures would measure the neighbours. "
              "Wait for a quiet machine, or pass --allow-load to run anyway (figures flagged).",
              file=sys.stderr)
        return 3

    if o.dir is not None:
        o.dir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    settings = [(sc, s) for sc in scenarios for s in (sessions if sc != "queue"
                                                      else [QUEUE_SESSIONS])]
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    extras: dict = {}
    with tempfile.TemporaryDirectory(prefix="elemta-relay-", dir=o.dir) as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # the Postfix daemons (user postfix) reach their queue through it
        create_us, durable_us = probe_disk(root)
        print(f"spools and queues under {tmp}: creating a file takes {create_us:.0f} us, "
              f"creating, writing {MESSAGE_BYTES} B and fdatasync {durable_us:.0f} us (medians)")
        bench = Bench(o, root)
        try:
            for rnd in range(o.rounds):
                for scenario, s in settings:
                    order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
                    for kind in order:
                        r = bench.run(scenario, kind, s, rnd)
                        runs.append(r)
                        more = ""
                        if r.accept_rate:
                            more += f", acceptance {r.accept_rate:.0f} msgs/s"
                        if r.steady_rate:
                            more += (f", steady {r.steady_rate:.0f} msgs/s, first delivery "
                                     f"{r.first_delivery_s:.2f} s")
                        print(f"  round {rnd + 1} {scenario:6} s={s:<3} {kind:7} {r.rate:6.0f} "
                              f"msgs/s ({r.seconds:.2f} s{more}) {r.cpu_us:5.0f} us CPU/msg, "
                              f"busy {r.busy * 100:3.0f}%, foreign {r.foreign_cores:.2f} cores"
                              + (" DISTURBED" if r.disturbed else ""), flush=True)
            summary = report(runs, settings, o.rounds) if runs else {}
            if o.syscalls:
                extras["syscalls"] = syscalls(bench, o, kinds)
            if o.profile is not None:
                o.profile.mkdir(parents=True, exist_ok=True)
                out = o.profile / "elemta-relay-s10.txt"
                r = bench.relay("elemta", 10, o.rounds, profile=out)
                print(f"\n  profiled run (b, s=10): {r.rate:.0f} msgs/s under py-spy")
                summarize_profile(out)
        except (BenchError, PostfixError) as e:
            print(f"\nbenchmark aborted: {e}", file=sys.stderr)
            return 1
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if o.json is not None:
        o.json.write_text(json.dumps({
            "started": started, "code": code_version(), "postfix": postfix_version(),
            "messages": o.messages, "warmup": o.warmup, "rounds": o.rounds,
            "preflight_foreign_cores": foreign, "summary": summary, **extras,
            "runs": [{**asdict(r), "rate": r.rate, "cpu_us": r.cpu_us} for r in runs]},
            indent=1))
    return 0


def syscalls(bench: Bench, o: argparse.Namespace, kinds: list[str]) -> dict:
    """strace -c -f of a short a and b run per server: system calls per message."""
    n = o.syscall_messages
    out: dict = {}
    print(f"\nsystem calls per message (strace -c -f, {n} messages at -s 10, after the "
          "warm-up; no rates: strace slows the servers)")
    for scenario in ("accept", "relay"):
        for kind in kinds:
            path = bench.root / f"strace-{scenario}-{kind}.txt"
            if scenario == "relay":
                bench.relay(kind, 10, -1, strace=path, messages=n)
            else:
                strace_accept(bench, kind, path, n)
            total, calls = parse_strace_summary(path)
            top = ", ".join(f"{name} {c / n:.1f}" for name, c in calls[:10])
            print(f"  {scenario:6} {kind:7} {total / n:6.1f} calls/msg: {top}")
            out[f"{scenario}_{kind}"] = {"per_message": round(total / n, 2),
                                         "calls": {k: round(v / n, 2) for k, v in calls}}
    return out


def strace_accept(bench: Bench, kind: str, path: Path, n: int) -> None:
    o = bench.opts
    srv = SERVERS[kind](bench.workdir("strace-accept", kind, 10, 0), o, 9)
    tracer = None
    try:
        srv.configure(delivery=False)
        srv.spawn()
        srv.wait_ready()
        if o.warmup:
            bench.send(srv, min(o.warmup, 200), 10)
        tracer = attach_strace(path, srv.pid)
        bench.send(srv, n, 10)
        time.sleep(0.5)  # Elemta's write-out of the last files
        finish_tracer(tracer)
        tracer = None
    finally:
        if tracer is not None:
            finish_tracer(tracer)
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
