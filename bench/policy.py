"""Acceptance with a milter: Elemta's milter client against Postfix's, on the same milter.

    PATH="$PATH:/usr/sbin" .venv/bin/python bench/policy.py [--milter opendkim|rspamd]
        [--rounds 3] [--messages 2000] [--concurrency 10] [--json FILE]

Four servers take the same load from Postfix's ``smtp-source`` (4 KiB messages, one
recipient, one message per session, no TLS), in one run, rounds alternating and
rotating their order:

* **elemta-none**: ``elemta serve`` with no plugin, as bench/accept.py runs it (durable
  spool, delivery off);
* **elemta-milter**: the same with elemta-milter (``[plugins] enabled = ["milter"]``)
  calling the milter;
* **postfix-none**: a throw-away Postfix (its own ``main.cf``/``master.cf`` and queue
  in a temporary folder; ``postfix -c DIR start``), smtpd on a free loopback port,
  ``default_transport = discard``: what is accepted goes through cleanup into the
  queue (fsync'd, like Elemta's spool) and is then discarded by the queue manager;
* **postfix-milter**: the same with ``smtpd_milters = inet:127.0.0.1:PORT``.

The milter is one process started for the whole run and shared by both MTAs:
**opendkim** (default) signs every message (``Mode s``, a 2048-bit key from
``opendkim-genkey``, the client 127.0.0.1 is an internal host), or **rspamd** (its proxy
worker in milter mode, scanning by itself, the Debian rules, no Redis, DNS pointed where
nothing answers). Each run is checked, not only timed: smtp-source must exit 0 and
print nothing, Elemta's spool must hold every message (with OpenDKIM, every one
signed), Postfix must have discarded every message (with OpenDKIM, each with a
``DKIM-Signature`` its ``milter_header_checks`` saw). Reported: messages per second
(median of rounds, with the range); the CPU time per message of the MTA (Elemta's
process, or every process of the Postfix instance) and of the milter during the timed
part; how busy the whole machine was (other work included); and the ratios
elemta-milter / postfix-milter, elemta-milter / elemta-none and postfix-milter /
postfix-none, as a ratio of the medians and per round (the four runs of a round follow
each other closely, so a per-round ratio is less exposed to other work on the machine).

Needs root (Postfix's master) and the Debian packages postfix, opendkim,
opendkim-tools and rspamd.
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
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# smtp-source sends From: sender@example.org (bench.accept.SENDER): OpenDKIM signs
# for example.org
from bench.accept import (CLK_TCK, ELEMTA_CONFIG, LOCAL_DOMAIN, BenchError,  # noqa: E402
                          Elemta, box_times, free_port, send, smtp_source_batches)
from elemta.testing import postfix  # noqa: E402
KINDS = ["elemta-none", "elemta-milter", "postfix-none", "postfix-milter"]


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} at start")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


# ----------------------------------------------------------------------------- milters


class Milter:
    """A milter process in a session of its own, stopped by its process group."""

    name = ""
    signs = False

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], timeout: float) -> None:
        log = open(self.folder / f"{self.name}.out", "wb")
        self.proc = subprocess.Popen(argv, cwd=self.folder, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        wait_port(self.port, self.proc, self.name, timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class OpenDKIM(Milter):
    name = "opendkim"
    signs = True

    def start(self) -> None:
        subprocess.run(["opendkim-genkey", "-D", str(self.folder), "-d", "example.org",
                        "-s", "bench", "-b", "2048"], check=True)
        conf = self.folder / "opendkim.conf"
        conf.write_text(textwrap.dedent(f"""\
            Mode                    s
            Domain                  example.org
            Selector                bench
            KeyFile                 {self.folder}/bench.private
            Socket                  inet:{self.port}@127.0.0.1
            PidFile                 {self.folder}/opendkim.pid
            Canonicalization        relaxed/simple
            Background              no
            Syslog                  no
            RequireSafeKeys         false
            UserID                  root
            """))
        self.spawn([shutil.which("opendkim") or "/usr/sbin/opendkim", "-f", "-x", str(conf)],
                   20)


class Rspamd(Milter):
    name = "rspamd"

    def start(self) -> None:
        for sub in ("db", "run", "log", "local.d"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "rspamd.conf").write_text(textwrap.dedent(f"""\
            .include "$CONFDIR/common.conf"
            options {{
                pidfile = "$RUNDIR/rspamd.pid";
                .include "$CONFDIR/options.inc"
                .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
            }}
            logging {{ type = "file"; filename = "$LOGDIR/rspamd.log"; level = "warning"; }}
            worker "rspamd_proxy" {{
                bind_socket = "127.0.0.1:{self.port}";
                milter = yes;
                timeout = 60s;
                count = 4;
                upstream "local" {{ default = yes; self_scan = yes; }}
            }}
            """))
        (self.folder / "local.d" / "options.inc").write_text(
            'dns { nameserver = ["127.0.0.1:9"]; timeout = 0.1s; retransmits = 1; }\n'
            "local_addrs = [];\n")
        (self.folder / "local.d" / "milter_headers.conf").write_text(
            'use = ["x-spamd-result"];\nskip_local = false;\nskip_authenticated = false;\n')
        f = self.folder
        self.spawn([shutil.which("rspamd") or "/usr/bin/rspamd", "-f", "-i", "-c",
                    str(f / "rspamd.conf"), f"--var=LOCAL_CONFDIR={f}", f"--var=DBDIR={f}/db",
                    f"--var=RUNDIR={f}/run", f"--var=LOGDIR={f}/log"], 90)


MILTERS = {"opendkim": OpenDKIM, "rspamd": Rspamd}


# ----------------------------------------------------------------------------- Elemta


class ElemtaServer(Elemta):
    """``elemta serve`` as bench/accept.py runs it, optionally with elemta-milter."""

    def __init__(self, workdir: Path, milter: Milter | None) -> None:
        super().__init__(workdir, "asyncio")
        self.milter = milter
        self.name = "elemta-milter" if milter else "elemta-none"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = ELEMTA_CONFIG.format(loop="asyncio", port=self.port, domain=LOCAL_DOMAIN,
                                    spool_extra="")
        if self.milter is not None:
            reuse = "always" if self.milter.name == "rspamd" else "auto"
            text += textwrap.dedent(f"""
                [plugins]
                enabled = ["milter"]

                [[plugins.milter.milters]]
                name = "{self.milter.name}"
                address = "inet:127.0.0.1:{self.milter.port}"
                reuse_connections = "{reuse}"
                """)
        self.config.write_text(text)
        super(Elemta, self).start()   # Server.start: spawn, wait for the ready file

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("ELEMTA_LOAD_PLUGINS", None)
        return env

    def pgid(self) -> int:
        return os.getpgid(self.pid)

    def check(self, expected: int, signed: bool) -> None:
        accepted = self.accepted()
        if accepted != expected:
            raise BenchError(f"{self.name}: {accepted} messages in ready/, sent {expected}")
        if signed:
            found = subprocess.run(["grep", "-rl", "^DKIM-Signature:",
                                    str(self.workdir / "spool")], capture_output=True,
                                   text=True).stdout.split()
            if len(found) < expected:
                raise BenchError(f"{self.name}: {len(found)} of {expected} spooled messages "
                                 "carry a DKIM-Signature")


# ----------------------------------------------------------------------------- Postfix


# what differs from the private instance of elemta.testing.postfix: relays nothing,
# discards what it accepts, and as many smtpd processes as the sessions need
BENCH_CF = {"relay_domains": "", "smtpd_recipient_restrictions": "permit_mynetworks, reject",
            "default_transport": "discard:bench", "default_process_limit": "200"}


def milter_cf(port: int, conf: Path) -> dict[str, str]:
    return {"smtpd_milters": f"inet:127.0.0.1:{port}", "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "milter_header_checks": f"regexp:{conf}/milter_header_checks"}

class Postfix:
    """A throw-away Postfix instance: ``postfix -c DIR start`` / ``stop``."""

    def __init__(self, workdir: Path, milter: Milter | None) -> None:
        self.workdir = workdir
        self.milter = milter
        self.port = free_port()
        self.name = "postfix-milter" if milter else "postfix-none"
        self.conf = workdir / "conf"

    def postfix(self, *args: str) -> None:
        run = subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True,
                             text=True)
        if run.returncode != 0:
            raise BenchError(f"postfix {' '.join(args)} failed: {run.stderr}\n"
                             f"{self.maillog()[-2000:]}")

    def maillog(self) -> str:
        try:
            return (self.workdir / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        postfix.prepare(self.workdir, self.conf)
        settings = dict(BENCH_CF)
        if self.milter is not None:
            settings.update(milter_cf(self.milter.port, self.conf))
            (self.conf / "milter_header_checks").write_text(
                "/^DKIM-Signature:/ WARN milter-signed\n")
        (self.conf / "main.cf").write_text(postfix.main_cf(
            self.conf, self.workdir, hostname="bench.example.test", **settings))
        (self.conf / "master.cf").write_text(postfix.master_cf(self.port))
        self.postfix("start")
        deadline = time.monotonic() + 30
        import socket

        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not listen within 30 s:\n{self.maillog()[-2000:]}")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)
        pid_file = self.workdir / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def pgid(self) -> int:
        """The master's process group: every Postfix daemon of this instance."""
        pid = int((self.workdir / "queue" / "pid" / "master.pid").read_text().split()[0])
        return os.getpgid(pid)

    def check(self, expected: int, signed: bool) -> None:
        """Every message accepted was discarded (the queue manager runs behind smtpd)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            log = self.maillog()
            done = log.count("status=sent (bench)")
            if done >= expected:
                break
            time.sleep(0.2)
        else:
            raise BenchError(f"{self.name}: {done} of {expected} messages went through")
        if signed and log.count("milter-signed") < expected:
            raise BenchError(f"{self.name}: {log.count('milter-signed')} of {expected} "
                             "messages got a DKIM-Signature")




# ----------------------------------------------------------------------------- runs


def group_cpu(pgid: int) -> float:
    """user+sys seconds of every process of a process group, with the children its
    leader has reaped (Postfix's master restarts smtpd after max_use sessions)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) != pgid:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        if int(entry.name) == pgid:
            total += (int(fields[13]) + int(fields[14])) / CLK_TCK
    return total


@dataclass
class Run:
    kind: str
    rate: float                 # messages per second seen by smtp-source
    server_cpu_ms: float        # the MTA's CPU per message during the timed part
    milter_cpu_ms: float        # the milter's CPU per message (0 without a milter)
    busy: float                 # share of the machine's CPUs busy, everything included


def run_one(kind: str, workdir: Path, smtp_source: str, milter: Milter, messages: int,
            concurrency: int, warmup: int) -> Run:
    server: ElemtaServer | Postfix
    use = milter if kind.endswith("-milter") else None
    server = ElemtaServer(workdir, use) if kind.startswith("elemta") else Postfix(workdir, use)
    server.start()
    try:
        send(smtp_source_batches(smtp_source, server.port, warmup, concurrency, 1))
        commands = smtp_source_batches(smtp_source, server.port, messages, concurrency, 1)
        assert milter.proc is not None
        pgid = server.pgid()
        cpu0, mcpu0, box0 = group_cpu(pgid), group_cpu(milter.proc.pid), box_times()
        started = time.perf_counter()
        send(commands)
        seconds = time.perf_counter() - started
        cpu1, mcpu1, box1 = group_cpu(pgid), group_cpu(milter.proc.pid), box_times()
        if isinstance(server, Postfix):
            # while it runs: its queue manager discards what smtpd took, after the timing
            server.check(warmup + messages, signed=use is not None and use.signs)
    finally:
        server.stop()
    if isinstance(server, ElemtaServer):
        # once stopped: the spool's journal is written out into ready/
        server.check(warmup + messages, signed=use is not None and use.signs)
    busy = (box1[0] - box0[0]) / max(box1[1] - box0[1], 1)
    return Run(kind, messages / seconds, (cpu1 - cpu0) * 1000 / messages,
               (mcpu1 - mcpu0) * 1000 / messages if use else 0.0, busy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--milter", choices=sorted(MILTERS), default="opendkim")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/policy.py runs a Postfix master: run it as root")
    smtp_source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not Path(smtp_source).exists() or not shutil.which("postfix"):
        raise SystemExit("needs Postfix (smtp-source, postfix): apt-get install postfix")
    runs: dict[str, list[Run]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="elemta-policy-", dir="/var/tmp") as d:
        os.chmod(d, 0o755)            # Postfix's daemons run as the postfix user
        milter = MILTERS[args.milter](Path(d))
        milter.start()
        try:
            for r in range(args.rounds):
                order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
                for kind in order:
                    workdir = Path(d) / f"{kind}-{r}"
                    run = run_one(kind, workdir, smtp_source, milter, args.messages,
                                  args.concurrency, args.warmup)
                    shutil.rmtree(workdir, ignore_errors=True)
                    runs[kind].append(run)
                    print(f"round {r + 1} {kind}: {run.rate:.0f} msg/s, server "
                          f"{run.server_cpu_ms:.2f} ms CPU/msg, milter {run.milter_cpu_ms:.2f} "
                          f"ms CPU/msg, machine {run.busy:.0%} busy", flush=True)
        finally:
            milter.stop()
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[str, list[Run]]) -> None:
    def med(kind: str, attr: str) -> float:
        return statistics.median(getattr(run, attr) for run in runs[kind])

    print(f"\nmilter: {args.milter}; {args.messages} messages of 4 KiB per run, "
          f"{args.concurrency} sessions, one message per session, {args.rounds} rounds")
    print("| server | msg/s (median) | range | MTA CPU ms/msg | milter CPU ms/msg | machine busy |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        rates = [run.rate for run in runs[kind]]
        print(f"| {kind} | {med(kind, 'rate'):.0f} | {min(rates):.0f}-{max(rates):.0f} | "
              f"{med(kind, 'server_cpu_ms'):.2f} | {med(kind, 'milter_cpu_ms'):.2f} | "
              f"{med(kind, 'busy'):.0%} |")
    print()
    for a, b in (("elemta-milter", "postfix-milter"), ("elemta-milter", "elemta-none"),
                 ("postfix-milter", "postfix-none")):
        per_round = [x.rate / y.rate for x, y in zip(runs[a], runs[b])]
        print(f"{a} / {b}: {med(a, 'rate') / med(b, 'rate'):.2f} (ratio of medians); "
              f"per round {', '.join(f'{x:.2f}' for x in per_round)}, "
              f"median {statistics.median(per_round):.2f}")
    if args.json:
        args.json.write_text(json.dumps(
            {"milter": args.milter, "messages": args.messages, "concurrency": args.concurrency,
             "runs": {k: [asdict(run) for run in v] for k, v in runs.items()}}, indent=1))

if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        raise SystemExit(f"benchmark aborted: {e}")
