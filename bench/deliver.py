"""Delivery throughput: the runner empties a queue of 4 KiB messages into Postfix's smtp-sink.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/deliver.py [--messages 5000] [--rounds 3]
        [--workers N] [--max-per-destination N] [--uvloop] [--sink smtp-sink|aiosmtpd]
        [--log-level info] [--profile DIR] [--json FILE]

**Filling the queue.** ``elemta serve`` runs once with ``[delivery] enabled =
false`` while ``smtp-source`` submits ``--messages`` messages of 4096 bytes (one
recipient, ``user@remote.example``, relayed because 127.0.0.1 is in
``relay_networks``). It is stopped with SIGTERM, which checkpoints the journal,
so the spool is left with every message in ``ready/`` and an empty
``journal/``. That spool is the template: each run delivers from a fresh copy.

**A run.** The sink starts on a free port. Then ``elemta serve`` starts on the
copy with delivery on and ``[delivery] routes."*" = { host = "127.0.0.1:PORT",
tls = "none" }``, so every message goes to the sink with no DNS. The clock
starts when the server process is spawned: start-up, spool recovery and the
rebuild of the schedule (which reads every envelope) are part of the time. It
stops when ``ready/`` and ``deferred/`` are both empty, i.e. when the last
envelope was removed after its 250. Start-up alone (spawn to ready file) and the
steady rate (between 10% and 90% of the messages at the sink) are shown too.

**The sink.** ``smtp-sink -c`` (Postfix's C test server: accepts, discards and
prints running counters) keeps up with anything a Python client sends, so the
figure is Elemta's. ``--sink aiosmtpd`` uses a counting aiosmtpd server
instead, as a second opinion; being Python, it takes a core's worth of CPU
itself and is then the limit.

**Verification.** A run counts only if the sink received exactly
``--messages`` messages, and ``ready/``, ``deferred/`` and ``failed/`` are empty
at the end. Anything else aborts the benchmark.

**CPU.** The server's user+sys (all threads, ``/proc/PID/stat``, and its helper process
that deletes delivered messages' files) over the run,
per message; the sink's likewise; "busy" is the whole machine, "others" what
every other process used meanwhile, in cores (a shared machine's interference).

The last line is the median run of the rounds, as
``delivered N messages in S s: R msg/s``.

``--profile DIR``: one more run under ``py-spy record --gil`` at 500 Hz (it
attaches right after the spawn, so most of the start-up is missed), written to
``DIR/elemta-deliver.txt`` as raw collapsed stacks and summarized. Its
throughput is not part of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from accept import (CLK_TCK, BenchError, PerMessage, box_times, code_version, compile_bytecode,
                    count_files, default_dir, fmt_range, free_port, probe_disk, proc_cpu,
                    proc_tree_cpu, py_spy, summarize_profile, thread_cpu)

SENDER = "sender@example.org"
RECIPIENT = "user@remote.example"
MESSAGE_BYTES = 4096
FILL_SESSIONS = 10
POLL_SECONDS = 0.01

CONFIG = textwrap.dedent('''
    [server]
    hostname = "mx.example.test"
    state_dir = "state"
    relay_networks = ["127.0.0.0/8"]
    shutdown_grace_seconds = 5
    event_loop = "{loop}"

    [[listeners]]
    name = "mx"
    address = "127.0.0.1:{port}"
    mode = "smtp"
    tls = "none"

    [spool]
    path = "{spool}"

    [metrics]
    enabled = false

    [log]
    level = "{log_level}"

    [delivery]
    enabled = {enabled}{delivery_extra}
''')

ROUTE_TO_SINK = textwrap.dedent('''
    [delivery.routes."*"]
    host = "127.0.0.1:{sink_port}"
    tls = "none"
''')

AIOSMTPD_SINK = textwrap.dedent('''
    import asyncio, os, signal, sys
    from pathlib import Path
    from aiosmtpd.smtp import SMTP

    port, ready = int(sys.argv[1]), sys.argv[2]

    class Count:
        def __init__(self):
            self.count = 0

        async def handle_DATA(self, server, session, envelope):
            self.count += 1
            # the same running counter as smtp-sink -c
            sys.stdout.write(f"mesg={self.count}\\r")
            sys.stdout.flush()
            return "250 2.0.0 Ok"

    async def main():
        loop = asyncio.get_running_loop()
        handler = Count()
        server = await loop.create_server(lambda: SMTP(handler, hostname="sink.example"),
                                          "127.0.0.1", port, reuse_address=True, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        Path(ready).write_text(str(os.getpid()))
        await stop.wait()
        server.close()

    asyncio.run(main())
''')


def elemta_command(config: Path) -> list[str]:
    exe = Path(sys.executable).parent / "elemta"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "elemta"]
    return [*base, "serve", "--config", str(config)]


def elemta_env(ready_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ELEMTA_LOAD_PLUGINS", None)  # built-in plugins only
    env["ELEMTA_READY_FILE"] = str(ready_file)
    return env


def queued(spool: Path) -> int:
    return count_files(spool / "ready") + count_files(spool / "deferred")


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with {proc.returncode}"
                             + (":\n" + tail(log) if log else ""))
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not done within {timeout:.0f} s"
                             + (":\n" + tail(log) if log else ""))
        time.sleep(POLL_SECONDS)


def tail(path: Path | None, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:] if path else ""
    except OSError:
        return ""


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen | None, timeout: float = 30) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# ----------------------------------------------------------------------------- the sink


class Sink:
    """A sink process that prints ``mesg=N`` counters; ``count()`` reads the latest one."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.out_path = workdir / f"{kind}.out"
        self.ready_file = workdir / f"{kind}.ready"
        self.script = workdir / "aiosmtpd_sink.py"
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = None

    def command(self) -> list[str]:
        if self.kind == "smtp-sink":
            exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
            user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
            return [exe, "-c", *user, f"127.0.0.1:{self.port}", "1024"]
        return [sys.executable, str(self.script), str(self.port), str(self.ready_file)]

    def start(self) -> None:
        if self.kind == "aiosmtpd":
            self.script.write_text(AIOSMTPD_SINK)
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(f"{self.kind} start", lambda: listening(self.port), 20, self.proc,
                 self.out_path)

    def count(self) -> int:
        """Messages received so far, from the last complete counter line."""
        with open(self.out_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256))
            data = f.read()
        for part in reversed(data.split(b"\r")[:-1]):
            if b"mesg=" in part:
                return int(part.rsplit(b"mesg=", 1)[1].split()[0])
        return 0

    def stop(self) -> None:
        stop(self.proc, 10)
        if self._out is not None:
            self._out.close()


# ----------------------------------------------------------------------------- runs


@dataclass
class Run(PerMessage):
    round: int
    messages: int
    seconds: float            # spawn → queue empty
    startup_seconds: float    # spawn → ready file
    steady_rate: float        # msgs/s between 10% and 90% at the sink
    server_cpu_s: float
    sink_cpu_s: float
    box_busy: float
    box_cpu_s: float
    threads_s: tuple[float, float, float, float]
    delivered: int

    @property
    def sink_us(self) -> float:
        return self.sink_cpu_s / self.messages * 1e6

    @property
    def others(self) -> float:
        return max(0.0, self.box_cpu_s - self.server_cpu_s - self.sink_cpu_s) / self.seconds


@dataclass
class Bench:
    root: Path
    messages: int
    loop: str
    sink_kind: str
    log_level: str
    workers: int | None
    max_per_destination: int | None
    template: Path | None = None
    shown: bool = False

    def config(self, workdir: Path, spool: Path, enabled: bool,
               sink_port: int) -> tuple[Path, int]:
        """The server's configuration file, and the port of its listener."""
        extra = ""
        if enabled and self.workers is not None:
            extra += f"\nworkers = {self.workers}"
        if enabled and self.max_per_destination is not None:
            extra += f"\nmax_per_destination = {self.max_per_destination}"
        path, port = workdir / "elemta.toml", free_port()
        path.write_text(CONFIG.format(
            loop=self.loop, port=port, spool=spool,
            log_level=self.log_level if enabled else "warning",
            enabled="true" if enabled else "false", delivery_extra=extra)
            + ROUTE_TO_SINK.format(sink_port=sink_port))
        return path, port

    def fill(self) -> Path:
        """Queue ``messages`` messages with delivery off; the spool left behind."""
        workdir = self.root / "fill"
        workdir.mkdir()
        spool = workdir / "spool"
        config, port = self.config(workdir, spool, False, 9)  # port 9: delivery is off
        ready_file, log = workdir / "ready", workdir / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(elemta_command(config), cwd=workdir, stdout=out,
                                    stderr=subprocess.STDOUT, env=elemta_env(ready_file))
        try:
            wait_for("filling server start", ready_file.exists, 60, proc, log)
            source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
            cmd = [source, "-s", str(FILL_SESSIONS), "-m", str(self.messages), "-l",
                   str(MESSAGE_BYTES), "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
            print(f"  fill: {' '.join(elemta_command(config))}  ([delivery] enabled = false)")
            print(f"  fill: {' '.join(cmd)}")
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, check=False)
            took = time.perf_counter() - t0
            out_text = (res.stdout + res.stderr).decode(errors="replace").strip()
            if res.returncode != 0 or out_text:
                raise BenchError(f"smtp-source failed (exit {res.returncode}): {out_text[:2000]}")
        finally:
            code = stop(proc)
        if code != 0:
            raise BenchError(f"the filling server exited with {code}:\n{tail(log)}")
        ready = count_files(spool / "ready")
        if ready != self.messages or os.listdir(spool / "journal"):
            raise BenchError(f"after filling: {ready} messages in ready/ (expected "
                             f"{self.messages}), journal/ {os.listdir(spool / 'journal')}")
        print(f"  fill: {self.messages} messages queued in {took:.1f} s "
              f"({self.messages / took:.0f} msgs/s accepted)")
        return spool

    def run(self, rnd: int, profile: Path | None = None) -> Run:
        assert self.template is not None
        workdir = Path(tempfile.mkdtemp(prefix=f"run{rnd}-", dir=self.root))
        spool = workdir / "spool"
        shutil.copytree(self.template, spool)
        os.sync()  # the copy's write-back must not land in the timed part
        sink = Sink(self.sink_kind, workdir)
        sampler = None
        proc = None
        try:
            sink.start()
            config, _ = self.config(workdir, spool, True, sink.port)
            if not self.shown:
                print(f"  sink: {' '.join(sink.command())}")
                print(f"  server: {' '.join(elemta_command(config))}")
                print(textwrap.indent(config.read_text().strip(), "      "))
                self.shown = True
            ready_file, log = workdir / "ready", workdir / "server.log"
            log_out = open(log, "wb")
            sink_cpu0 = proc_cpu(sink.proc.pid)  # type: ignore[union-attr]
            box0 = box_times()
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
            lo, hi = self.messages // 10, self.messages - self.messages // 10
            deadline = t0 + 300
            while True:
                now = time.perf_counter()
                if "ready" not in marks and ready_file.exists():
                    marks["ready"] = now
                n = sink.count()
                if n >= lo and "lo" not in marks:
                    marks["lo"] = now
                    lo_n = n
                if n >= hi and "hi" not in marks:
                    marks["hi"] = now
                    hi_n = n
                # the queue is listed only once the sink has everything: a scan of
                # a large directory every few ms would cost the server CPU
                if n >= self.messages and queued(spool) == 0:
                    break
                if proc.poll() is not None:
                    raise BenchError(f"elemta exited with {proc.returncode}:\n{tail(log)}")
                if now > deadline:
                    raise BenchError(f"not delivered within 300 s: sink has {n}, "
                                     f"{queued(spool)} queued:\n{tail(log)}")
                time.sleep(POLL_SECONDS)
            elapsed = time.perf_counter() - t0
            thr = thread_cpu(proc.pid)
            cpu = proc_tree_cpu(proc.pid)  # with the spool's helper process
            box1 = box_times()
            sink_cpu = proc_cpu(sink.proc.pid) - sink_cpu0  # type: ignore[union-attr]
            if sampler is not None:
                sampler.send_signal(signal.SIGINT)
                sampler.wait(60)
                if not profile.exists():  # type: ignore[union-attr]
                    raise BenchError("py-spy wrote no profile:\n" + tail(workdir / "py-spy.log"))
            code = stop(proc)
            if code != 0:
                raise BenchError(f"elemta exited with {code} on SIGTERM:\n{tail(log)}")
            time.sleep(0.1)  # the sink prints its counters when the sessions end
            delivered = sink.count()
            failed = count_files(spool / "failed")
            if delivered != self.messages or failed or queued(spool):
                raise BenchError(f"the sink received {delivered} of {self.messages} messages; "
                                 f"{failed} in failed/, {queued(spool)} still queued:\n"
                                 f"{tail(log)}")
            if "ready" not in marks:
                marks["ready"] = t0 + elapsed
            return Run(rnd, self.messages, elapsed, marks["ready"] - t0,
                       (hi_n - lo_n) / max(1e-9, marks["hi"] - marks["lo"]), cpu, sink_cpu,
                       (box1[0] - box0[0]) / max(1, box1[1] - box0[1]),
                       (box1[0] - box0[0]) / CLK_TCK, thr, delivered)
        finally:
            if sampler is not None and sampler.poll() is None:
                sampler.kill()
                sampler.wait()
            stop(proc)
            sink.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000, help="queued messages per run")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs")
    ap.add_argument("--workers", type=int, default=None,
                    help="[delivery] workers (default: Elemta's default)")
    ap.add_argument("--max-per-destination", type=int, default=None,
                    help="[delivery] max_per_destination (default: Elemta's default)")
    ap.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    ap.add_argument("--sink", choices=("smtp-sink", "aiosmtpd"), default="smtp-sink")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning"),
                    help="the server's [log] level while delivering (default info: one line "
                         "per delivery, as Postfix logs)")
    ap.add_argument("--dir", type=Path, default=default_dir(),
                    help="where the temporary spools go (default /var/tmp)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="after the rounds, profile one run with py-spy into this folder")
    ap.add_argument("--json", type=Path, default=None, help="write every run here")
    args = ap.parse_args()
    compile_bytecode()

    for tool in ("smtp-source", *(["smtp-sink"] if args.sink == "smtp-sink" else [])):
        if not (shutil.which(tool) or os.access(f"/usr/sbin/{tool}", os.X_OK)):
            print(f"{tool} not found: apt-get install postfix (it is in /usr/sbin)",
                  file=sys.stderr)
            return 2
    if args.profile is not None and shutil.which(py_spy()) is None:
        print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    loop = "uvloop" if args.uvloop else "asyncio"
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"delivery benchmark, {started}: {args.messages} queued messages of {MESSAGE_BYTES} B "
          f"per run, {args.rounds} rounds, sink {args.sink}, event loop {loop}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, elemta at "
          f"{code_version()}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="elemta-deliver-", dir=args.dir) as tmp:
        create_us, durable_us = probe_disk(Path(tmp))
        print(f"spools under {tmp}: creating a file takes {create_us:.0f} us, creating, "
              f"writing {MESSAGE_BYTES} B and fdatasync {durable_us:.0f} us (medians)")
        bench = Bench(Path(tmp), args.messages, loop, args.sink, args.log_level, args.workers,
                      args.max_per_destination)
        try:
            bench.template = bench.fill()
            for rnd in range(args.rounds):
                run = bench.run(rnd)
                runs.append(run)
                print(f"  round {rnd + 1}: {run.rate:6.0f} msgs/s ({run.delivered} delivered in "
                      f"{run.seconds:.2f} s, start-up {run.startup_seconds:.2f} s, steady "
                      f"{run.steady_rate:.0f} msgs/s)  server {run.cpu_us:.0f} us CPU/msg "
                      f"(loop u+s / other threads u+s: {run.thread_us()}), sink "
                      f"{run.sink_us:.0f} us/msg, busy {run.box_busy * 100:.0f}%, others "
                      f"{run.others:.2f} cores", flush=True)
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                out = args.profile / "elemta-deliver.txt"
                prof = bench.run(args.rounds, profile=out)
                print(f"\n  profiled run: {prof.rate:.0f} msgs/s under py-spy")
                summarize_profile(out)
        except BenchError as e:
            print(f"\nbenchmark aborted: {e}", file=sys.stderr)
            return 1

    print(f"\nover {len(runs)} rounds: {fmt_range([r.rate for r in runs])} msgs/s from spawn "
          f"to empty queue, steady {fmt_range([r.steady_rate for r in runs])} msgs/s, "
          f"start-up {fmt_range([r.startup_seconds for r in runs], 2)} s, server "
          f"{fmt_range([r.cpu_us for r in runs])} us CPU/msg")
    print(f"finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average "
          f"{os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "started": started, "code": code_version(), "loop": loop, "sink": args.sink,
            "messages": args.messages, "workers": args.workers,
            "max_per_destination": args.max_per_destination,
            "runs": [{**asdict(r), "rate": r.rate, "cpu_us": r.cpu_us, "others": r.others}
                     for r in runs]}, indent=1))
    median = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    print(f"delivered {median.messages} messages in {median.seconds:.2f} s: "
          f"{median.rate:.0f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
