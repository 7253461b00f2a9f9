"""Real milters for the tests: processes started from the distribution's binaries, plus
the faults (a milter that hangs, one that closes mid-message, one that sends garbage)
and a TCP proxy that counts the connections a milter gets.

Every process runs in a session of its own (``start_new_session``) in a temporary
folder, listens on 127.0.0.1 or a unix socket there, and is stopped by its own
process group id when the fixture ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from elemta.testing import free_port, require_tool_or_skip

HERE = Path(__file__).resolve().parent

# a message OpenDKIM signs (From: example.org), with a folded header field
SIGNED = (
    "From: Alice <alice@example.org>\r\n"
    "To: Bob <bob@remote.example>\r\n"
    "Subject: Quarterly numbers, a subject long enough\r\n"
    "  to be folded onto a second line\r\n"
    "Date: Mon, 07 Dec 2020 10:00:00 +0000\r\n"
    "Message-ID: <q1@example.org>\r\n"
    "\r\n"
    "The numbers  are in.\r\n"
    "\r\n"
    "-- \r\n"
    "Alice\r\n"
)

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

HAM = (
    "From: Alice <alice@example.org>\r\n"
    "To: Bob <bob@example.test>\r\n"
    "Subject: Lunch on Thursday\r\n"
    "Date: Mon, 07 Dec 2020 10:00:00 +0000\r\n"
    "Message-ID: <lunch-1@example.org>\r\n"
    "\r\n"
    "Hi Bob,\r\n\r\nare we still on for lunch on Thursday at noon?\r\n\r\nAlice\r\n"
)


class Process:
    """A milter (or spamd) process; ``output()`` is what it printed, for failures."""

    def __init__(self, argv: list[str], folder: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = folder / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=folder, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_tcp(self, port: int, timeout: float) -> None:
        self._wait(lambda: _can_connect(("127.0.0.1", port)), timeout,
                   f"{self.name} did not listen on 127.0.0.1:{port}")

    def wait_unix(self, path: Path, timeout: float) -> None:
        self._wait(lambda: path.exists() and _can_connect(str(path), socket.AF_UNIX), timeout,
                   f"{self.name} did not listen on {path}")

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{what} within {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(1.5)        # libmilter waits for its sessions: no need
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        else:
            # workers a master left behind (rspamd forks): same process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _can_connect(address: Any, family: int = socket.AF_INET) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        try:
            s.connect(address)
        except OSError:
            return False
    return True


# ---------------------------------------------------------------- OpenDKIM


class OpenDKIM:
    """``opendkim -f`` signing for ``domain`` with a key made by ``opendkim-genkey``."""

    def __init__(self, folder: Path, domain: str = "example.org", selector: str = "milter",
                 canonicalization: str = "simple/simple",
                 internal_hosts: str = "127.0.0.1") -> None:
        binary = require_tool_or_skip("opendkim")
        genkey = require_tool_or_skip("opendkim-genkey", "opendkim-tools")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([genkey, "-D", str(folder), "-d", domain, "-s", selector, "-b", "1024"],
                       check=True, capture_output=True, timeout=60)
        self.domain, self.selector = domain, selector
        self.key_path = folder / f"{selector}.private"
        self.port = free_port()
        self.address = f"inet:127.0.0.1:{self.port}"
        conf = folder / "opendkim.conf"
        conf.write_text(textwrap.dedent(f"""\
            Mode                    s
            Domain                  {domain}
            Selector                {selector}
            KeyFile                 {self.key_path}
            Socket                  inet:{self.port}@127.0.0.1
            PidFile                 {folder}/opendkim.pid
            Canonicalization        {canonicalization}
            InternalHosts           {internal_hosts}
            Background              no
            Syslog                  no
            RequireSafeKeys         false
            UserID                  root
            """))
        self.process = Process([binary, "-f", "-x", str(conf)], folder, "opendkim")
        self.process.wait_tcp(self.port, 20)

    def public_key_record(self) -> str:
        """The TXT record ``opendkim-genkey`` wrote, as one string."""
        text = (self.key_path.parent / f"{self.selector}.txt").read_text()
        return "".join(part for part in text.split('"')[1::2])

    def stop(self) -> None:
        self.process.stop()


# ---------------------------------------------------------------- rspamd


class Rspamd:
    """rspamd's proxy worker in milter mode, scanning by itself (``self_scan``), with the
    Debian rule set, no Redis, DNS pointed at a port where nothing answers."""

    def __init__(self, folder: Path) -> None:
        binary = require_tool_or_skip("rspamd")
        for sub in ("db", "run", "log", "local.d"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"inet:127.0.0.1:{self.port}"
        (folder / "rspamd.conf").write_text(textwrap.dedent(f"""\
            .include "$CONFDIR/common.conf"
            options {{
                pidfile = "$RUNDIR/rspamd.pid";
                .include "$CONFDIR/options.inc"
                .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
            }}
            logging {{
                type = "file";
                filename = "$LOGDIR/rspamd.log";
                level = "info";
            }}
            worker "rspamd_proxy" {{
                bind_socket = "127.0.0.1:{self.port}";
                milter = yes;
                timeout = 60s;
                count = 1;
                upstream "local" {{
                    default = yes;
                    self_scan = yes;
                }}
                reject_message = "Spam message rejected";
            }}
            """))
        (folder / "local.d" / "options.inc").write_text(textwrap.dedent("""\
            dns {
                nameserver = ["127.0.0.1:9"];
                timeout = 0.1s;
                retransmits = 1;
            }
            local_addrs = [];
            """))
        (folder / "local.d" / "milter_headers.conf").write_text(textwrap.dedent("""\
            use = ["x-spamd-result", "x-spam-status"];
            skip_local = false;           # the tests' client is 127.0.0.1
            skip_authenticated = false;
            """))
        self.process = Process(
            [binary, "-f", "-i", "-c", str(folder / "rspamd.conf"),
             f"--var=LOCAL_CONFDIR={folder}", f"--var=DBDIR={folder}/db",
             f"--var=RUNDIR={folder}/run", f"--var=LOGDIR={folder}/log"], folder, "rspamd")
        self.log = folder / "log" / "rspamd.log"
        self.process.wait_tcp(self.port, 60)

    def stop(self) -> None:
        self.process.stop()


# ---------------------------------------------------------------- spamd + spamass-milter


class SpamAssassin:
    """``spamd`` on a loopback port (local tests only, no DNS) and ``spamass-milter`` on a
    unix socket, calling ``spamc`` against it; it rejects at ``reject_score``."""

    def __init__(self, folder: Path, reject_score: int = 15) -> None:
        spamd = require_tool_or_skip("spamd")
        milter = require_tool_or_skip("spamass-milter")
        require_tool_or_skip("spamc")
        folder.mkdir(parents=True, exist_ok=True)
        self.spamd_port = free_port()
        self.spamd = Process(
            [spamd, "--listen", f"127.0.0.1:{self.spamd_port}", "--local",
             "--nouser-config", "--max-children", "2", "--min-children", "1",
             "--syslog", "stderr", "--pidfile", str(folder / "spamd.pid"),
             "--username", "nobody", "--helper-home-dir", str(folder)],
            folder, "spamd")
        self.socket = folder / "spamass.sock"
        self.address = f"unix:{self.socket}"
        try:
            self.spamd.wait_tcp(self.spamd_port, 90)
            self.milter = Process(
                [milter, "-p", str(self.socket), "-r", str(reject_score), "-P",
                 str(folder / "spamass-milter.pid"), "--", "-d", "127.0.0.1",
                 "-p", str(self.spamd_port)], folder, "spamass-milter")
            self.milter.wait_unix(self.socket, 20)
        except BaseException:
            self.spamd.stop()
            raise

    def stop(self) -> None:
        self.milter.stop()
        self.spamd.stop()


# ---------------------------------------------------------------- purepythonmilter


class EditMilter:
    """``edit_milter.py``: a milter written with purepythonmilter (an independent,
    filter-side implementation of the protocol), run as a process of its own."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"inet:127.0.0.1:{self.port}"
        self.process = Process([sys.executable, str(HERE / "edit_milter.py"), str(self.port)],
                               folder, "edit-milter")
        self.process.wait_tcp(self.port, 20)

    def stop(self) -> None:
        self.process.stop()


# ---------------------------------------------------------------- faults and a counter


class FaultMilter:
    """A listener on loopback that breaks the protocol in one way (not a milter):

    * ``hang``: accepts and never answers;
    * ``garbage``: answers the option negotiation with an HTTP error (the address of a
      web server, not of a milter);
    * ``garbage_at_end``: negotiates and answers "continue" like a real milter, then
      answers the end of the message with a reply code that does not exist;
    * ``bad_edit``: the same, but at the end of the message asks for a good header, then
      for one whose second line is not a continuation line, then "continue";
    * ``close_in_message``: negotiates and answers "continue" like a real milter, then
      closes the connection when the message's first header arrives;
    * ``hang_at_end``: the same, but never answers the end of the message;
    * ``progress_forever``: answers the end of the message with SMFIR_PROGRESS every
      0.1 s, and never with an answer.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    async def start(self) -> "FaultMilter":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            if self.mode == "hang":
                await reader.read()            # until the MTA gives up and closes
                return
            while True:
                head = await reader.readexactly(4)
                data = await reader.readexactly(struct.unpack("!I", head)[0])
                command = data[:1]
                if self.mode == "garbage":
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if command == b"O":            # negotiate: version 6, may add headers
                    writer.write(struct.pack("!IcIII", 13, b"O", 6, 0x01, 0))
                elif command == b"E" and self.mode == "garbage_at_end":
                    writer.write(struct.pack("!Ic", 6, b"z") + b"junk\0")
                elif command == b"E" and self.mode == "bad_edit":
                    for name, value in ((b"X-Fine", b"yes"), (b"X-Bad", b"one\nTwo: injected")):
                        data = b"h" + name + b"\0" + value + b"\0"
                        writer.write(struct.pack("!I", len(data)) + data)
                    writer.write(struct.pack("!Ic", 1, b"c"))
                elif command == b"L" and self.mode == "close_in_message":
                    writer.close()             # the first header: give up mid-message
                    return
                elif command == b"E" and self.mode == "hang_at_end":
                    await reader.read()
                    return
                elif command == b"E" and self.mode == "progress_forever":
                    while True:
                        writer.write(struct.pack("!Ic", 1, b"p"))
                        await writer.drain()
                        await asyncio.sleep(0.1)
                elif command in (b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E"):
                    writer.write(struct.pack("!Ic", 1, b"c"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


class CountingProxy:
    """A TCP proxy in front of a milter (a port on 127.0.0.1, or a unix socket path) that
    counts the connections through it."""

    def __init__(self, target: int | Path) -> None:
        self.target = target
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    async def start(self) -> "CountingProxy":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if isinstance(self.target, int):
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        else:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for coro in (pump(reader, up_writer), pump(up_reader, writer)):
            task = asyncio.ensure_future(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


def milter_config(*milters: dict[str, Any], **plugin: Any) -> dict[str, Any]:
    """Server configuration with ``[plugins.milter]`` listing ``milters`` (name, address…);
    127.0.0.1 may relay (``[server] relay_networks``)."""
    return {"server": {"relay_networks": ["127.0.0.1/32"]},
            "plugins": {"enabled": ["milter"], "milter": {"milters": list(milters), **plugin}}}


async def metric(server: Any, name: str, **labels: str) -> float:
    """A sample of the server's ``/metrics`` (0 when absent), as Prometheus would scrape it."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> str:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    text = await asyncio.to_thread(scrape)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def spooled(server: Any) -> list[Path]:
    """The messages in the server's spool (call ``await server.flush()`` first)."""
    return sorted(p for p in (Path(server.spool_path) / "messages").rglob("*") if p.is_file())
