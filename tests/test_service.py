"""``elemta serve`` as a system service: privilege drop, systemd readiness, log files.

Each test runs the real ``elemta serve`` process, as systemd or an init script would.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import tomlkit

from elemta.checks import check_config
from elemta.sockets import probe_bind
from elemta.testing.process import ServerProcess, free_port, wait_until

MESSAGE = (b"From: a@example.org\r\nTo: b@example.test\r\nSubject: service\r\n\r\n"
           b"hello\r\n")


def write(root: Path, port: int, **tables: dict) -> Path:
    config = {"server": {"hostname": "mx.example.test", "state_dir": str(root / "state"),
                         "shutdown_grace_seconds": 1.0},
              "listeners": [{"name": "mx", "address": f"127.0.0.1:{port}", "tls": "none"}],
              "spool": {"path": str(root / "queue")}, "metrics": {"enabled": False},
              "domains": {"example.test": {}}, "delivery": {"enabled": False}}
    for name, values in tables.items():
        config.setdefault(name, {}).update(values)
    path = root / "elemta.toml"
    path.write_text(tomlkit.dumps(config))
    return path


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.org", ["b@example.test"], MESSAGE)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


# ------------------------------------------------------------------ privilege drop


def privileged_port() -> int:
    for port in (25, *range(1023, 1000, -1)):
        if probe_bind("127.0.0.1", port) is None:
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


def ids_of(pid: int) -> tuple[list[int], list[int]]:
    """Real, effective, saved and file-system uids and gids of a process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
    return [int(u) for u in uids], [int(g) for g in gids]


@pytest.mark.skipif(os.geteuid() != 0, reason="binding port 25 and changing user needs root")
def test_root_binds_port_25_then_runs_as_the_configured_user(servers) -> None:
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="elemta-user-"))
    try:
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        root.chmod(0o755)
        # a spool left by an earlier run as root is handed over with its contents
        (root / "queue" / "old").mkdir(parents=True, mode=0o700)
        (root / "queue" / "old" / "file").write_text("x")
        (root / "queue" / "old" / "file").chmod(0o600)
        port = privileged_port()
        config = write(root, port, server={"user": "nobody", "group": "nogroup"})
        server = ServerProcess(config, root, None, 0)
        servers.append(server)
        uids, gids = ids_of(server.pid)
        assert uids == [nobody.pw_uid] * 4 and gids == [nobody.pw_gid] * 4
        send(port)
        files = wait_until(lambda: [p for p in (root / "queue").rglob("*")
                                    if p.is_file() and p.stat().st_size > 100],
                           what="the message written into the spool")
        for path in [root / "queue", root / "state", *(root / "queue").rglob("*")]:
            st = path.lstat()
            assert st.st_uid == nobody.pw_uid, f"{path} belongs to uid {st.st_uid}"
            assert not st.st_mode & stat.S_IRWXO, f"{path} is open to others"
        assert files
        assert "running as user nobody" in server.output()
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0, server.output()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_become_the_configured_one() -> None:
    root = Path(tempfile.mkdtemp(prefix="elemta-user-"))
    try:
        root.chmod(0o755)
        config = write(root, free_port(), server={"user": "nobody"})
        assert check_config(config).errors == []   # root can become nobody
        daemon = pwd.getpwnam("daemon")
        os.seteuid(daemon.pw_uid)
        try:
            errors = check_config(config).errors
        finally:
            os.seteuid(0)
        assert any("elemta runs as daemon, and only root can become 'nobody'" in e
                   for e in errors), errors
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ systemd notifications


class NotifySocket:
    """The ``$NOTIFY_SOCKET`` systemd listens on for a ``Type=notify`` service."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(15)

    def next(self) -> str:
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()


def test_readiness_reload_and_stop_are_told_to_systemd(tmp_path: Path, servers) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        port = free_port()
        server = ServerProcess(write(tmp_path, port), tmp_path,
                               {"NOTIFY_SOCKET": str(notify.path)}, 0, wait_ready=False)
        servers.append(server)
        ready = notify.next()
        # told only once the listener accepts (and the spool was recovered before it)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            assert conn.recv(100).startswith(b"220 ")
        assert ready.startswith("READY=1\n"), ready
        assert f"STATUS=accepting mail on mx 127.0.0.1:{port}" in ready
        server.send_signal(signal.SIGHUP)
        assert notify.next() == "RELOADING=1"
        assert notify.next() == "READY=1"
        server.send_signal(signal.SIGTERM)
        assert notify.next() == "STOPPING=1"
        assert server.wait(20) == 0, server.output()
    finally:
        notify.close()


def test_readiness_is_not_told_before_the_spool_is_recovered(tmp_path: Path, servers) -> None:
    """A server that cannot start never says READY=1."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = ServerProcess(write(tmp_path, taken.getsockname()[1]), tmp_path,
                                   {"NOTIFY_SOCKET": str(notify.path)}, 0, wait_ready=False)
            servers.append(server)
            assert server.wait(30) == 1
        notify.sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            notify.next()
        assert "the port is in use" in server.output()
    finally:
        notify.close()


# ------------------------------------------------------------------ log file


def test_sigusr1_reopens_the_log_file_after_rotation(tmp_path: Path, servers) -> None:
    port = free_port()
    server = ServerProcess(write(tmp_path, port, log={"file": "elemta.log"}), tmp_path, None, 0)
    servers.append(server)
    log_file = tmp_path / "elemta.log"
    assert "elemta started" in log_file.read_text()
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o640
    log_file.rename(tmp_path / "elemta.log.1")   # what logrotate does
    server.send_signal(signal.SIGUSR1)
    wait_until(log_file.exists, what="the log file opened again")
    send(port)
    wait_until(lambda: ": queued from=<a@example.org>" in log_file.read_text(),
               what="the message's line in the new file")
    rotated = (tmp_path / "elemta.log.1").read_text()
    assert "queued from=" not in rotated
    assert "log file" in log_file.read_text() and "reopened" in log_file.read_text()
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert "elemta stopped" in log_file.read_text()
    assert "elemta started" not in server.output()  # the file, not stderr
