"""The LDAP password source against a real OpenLDAP ``slapd`` on 127.0.0.1.

The fixture builds a throw-away server under a tmp folder: slapd.conf with the
core, cosine and inetorgperson schemas, an mdb database for
``dc=example,dc=test`` loaded offline with ``slapadd``, passwords hashed by
``slappasswd`` as ``{SSHA}``, and a certificate from a ``trustme`` CA for
StartTLS. Tests that stop or freeze the server get a private one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pydantic
import pytest

from elemta.testing import free_port, require_tool_or_skip
from elemta_datasource.directory import BackendUnavailable
from elemta_datasource.ldap import LdapPasswords, LdapSettings

SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
SERVICE_DN = f"cn=elemta,ou=services,{SUFFIX}"
PASSWORDS = {
    "alice": "alice-secret",
    "bob": "bøb pässwörd",     # not ASCII: sent as its UTF-8 bytes, as slappasswd hashed it
    "twin1": "twin-secret",
    "twin2": "twin-secret",
    "carol": "carol-secret",   # two mail values
}
SERVICE_PASSWORD = "service-secret"
START_SECONDS = 10.0


@dataclass
class Slapd:
    root: Path
    conf: Path
    port: int
    proc: subprocess.Popen
    ca_file: Path
    log: Path

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Stop, and start again on the same port with the same database."""
        self.stop()
        self.proc = _start(self.root, self.conf, self.ca_file, self.port).proc


def _entries(hashes: dict[str, str]) -> str:
    ldif = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
            "o: Example\ndc: example\n",
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
            f"dn: {SERVICE_DN}\nobjectClass: person\nobjectClass: simpleSecurityObject\n"
            f"cn: elemta\nsn: service\nuserPassword: {hashes['service']}\n"]
    mails = {"alice": ["alice@example.test"], "bob": ["bob@example.test"],
             "twin1": ["shared@example.test"], "twin2": ["shared@example.test"],
             "carol": ["carol@example.test", "c.smith@example.test"]}
    for uid, addresses in mails.items():
        ldif.append(f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\n"
                    f"cn: {uid}\nsn: {uid}\n"
                    + "".join(f"mail: {m}\n" for m in addresses)
                    + f"userPassword: {hashes[uid]}\n")
    return "\n".join(ldif)


def _prepare(root: Path, ca: Any, hashes: dict[str, str]) -> Path:
    """slapd.conf, the certificate and the loaded database under ``root``."""
    slapadd = require_tool_or_skip("slapadd", "slapd")
    root.mkdir(parents=True)
    (root / "db").mkdir()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    conf = root / "slapd.conf"
    conf.write_text(f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
TLSCertificateFile {root}/cert.pem
TLSCertificateKeyFile {root}/key.pem
database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "cn=admin,{SUFFIX}"
directory {root}/db
access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by dn.exact="{SERVICE_DN}" read
    by self read
    by anonymous auth
    by * none
""")
    (root / "data.ldif").write_text(_entries(hashes), encoding="utf-8")
    done = subprocess.run([slapadd, "-q", "-f", str(conf), "-l", str(root / "data.ldif")],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.fail(f"slapadd failed ({done.returncode}): {done.stderr}", pytrace=False)
    return conf


def _start(root: Path, conf: Path, ca_file: Path, port: int | None = None) -> Slapd:
    slapd = require_tool_or_skip("slapd", "slapd")
    port = port or free_port()
    log = root / "slapd.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([slapd, "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/",
                                 "-d", "0"], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    server = Slapd(root, conf, port, proc, ca_file, log)
    deadline = time.monotonic() + START_SECONDS
    while True:
        if proc.poll() is not None:
            pytest.fail(f"slapd exited with status {proc.returncode}: {server.output()}",
                        pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                # an anonymous LDAPv3 bind request: answered once slapd serves
                s.sendall(bytes.fromhex("300c020101600702010304008000"))
                if s.recv(64)[:1] == b"\x30":
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"slapd did not answer on port {port} within {START_SECONDS} s: "
                        f"{server.output()}", pytrace=False)
        time.sleep(0.02)


@pytest.fixture(scope="module")
def directory_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What every slapd of this module is built from: the CA and the password hashes."""
    import trustme

    require_tool_or_skip("slapd", "slapd")
    slappasswd = require_tool_or_skip("slappasswd", "slapd")
    root = tmp_path_factory.mktemp("ldap-ca")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    hashes = {}
    for uid, password in {**PASSWORDS, "service": SERVICE_PASSWORD}.items():
        done = subprocess.run([slappasswd, "-h", "{SSHA}", "-s", password], capture_output=True,
                              text=True, timeout=10, check=True)
        hashes[uid] = done.stdout.strip()
        assert hashes[uid].startswith("{SSHA}")
    return {"ca": ca, "ca_file": root / "ca.pem", "hashes": hashes,
            "root": tmp_path_factory.mktemp("slapd")}


def _new_slapd(data: dict[str, Any], name: str) -> Slapd:
    root = data["root"] / name
    conf = _prepare(root, data["ca"], data["hashes"])
    return _start(root, conf, data["ca_file"])


@pytest.fixture(scope="module")
def slapd(directory_data: dict[str, Any]) -> Iterator[Slapd]:
    """The module's shared server; tests must leave it running."""
    server = _new_slapd(directory_data, "shared")
    yield server
    server.stop()


@pytest.fixture
def private_slapd(directory_data: dict[str, Any], request: pytest.FixtureRequest
                  ) -> Iterator[Slapd]:
    """A server of the test's own, to stop or freeze."""
    server = _new_slapd(directory_data, request.node.name)
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


def direct(server: Slapd, **extra: Any) -> LdapSettings:
    return LdapSettings(url=server.url, bind_dn=f"uid={{user}},{PEOPLE}", **extra)


def searching(server: Slapd, **extra: Any) -> LdapSettings:
    extra.setdefault("service_dn", SERVICE_DN)
    extra.setdefault("service_password", SERVICE_PASSWORD)
    return LdapSettings(url=server.url, search_base=PEOPLE, **extra)


@pytest.fixture
async def source_factory():
    opened: list[LdapPasswords] = []

    async def make(settings: LdapSettings, open_: bool = True) -> LdapPasswords:
        source = LdapPasswords(settings)
        if open_:
            await source.open()
        opened.append(source)
        return source

    yield make
    for source in opened:
        await source.close()


async def check(source: LdapPasswords, login: str, password: str) -> str | None:
    return await source.verify(login, password, peer_ip="192.0.2.7", secured=True)


# ------------------------------------------------------------------ settings


def test_settings_need_exactly_one_way_to_find_the_entry():
    with pytest.raises(pydantic.ValidationError, match="set either bind_dn .* or search_base"):
        LdapSettings(url="ldap://127.0.0.1")
    with pytest.raises(pydantic.ValidationError, match="not both"):
        LdapSettings(url="ldap://127.0.0.1", bind_dn=f"uid={{user}},{PEOPLE}",
                     search_base=PEOPLE)


@pytest.mark.parametrize("fields, message", [
    ({"url": "http://127.0.0.1", "search_base": PEOPLE}, "ldap://host"),
    ({"url": "ldap://", "search_base": PEOPLE}, "names no host"),
    ({"url": "ldap://127.0.0.1/dc=x", "search_base": PEOPLE}, "only scheme://host"),
    ({"url": "ldaps://h", "search_base": PEOPLE, "start_tls": True}, "encrypted already"),
    ({"url": "ldap://h", "bind_dn": "uid={name},dc=x"}, "unknown placeholder {name}"),
    ({"url": "ldap://h", "bind_dn": "uid=alice,dc=x"}, "must contain {login}"),
    ({"url": "ldap://h", "search_base": PEOPLE, "search_filter": "mail={login}"},
     "not an LDAP filter"),
    ({"url": "ldap://h", "search_base": PEOPLE, "service_dn": SERVICE_DN},
     "both service_dn and service_password"),
    ({"url": "ldap://h", "bind_dn": "uid={user},dc=x", "service_dn": SERVICE_DN,
      "service_password": "x"}, "only used with search_base"),
    ({"url": "ldap://h", "search_base": PEOPLE, "nope": 1}, "Extra inputs"),
])
def test_settings_errors_say_what_to_fix(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        LdapSettings(**fields)


def test_login_attribute():
    base = {"url": "ldap://h", "search_base": PEOPLE}
    assert LdapSettings(**base).login_attribute == "mail"
    assert LdapSettings(**base, login_attribute="").login_attribute is None   # TOML has no null
    assert LdapSettings(**base, login_attribute="uid").login_attribute == "uid"
    with pytest.raises(pydantic.ValidationError, match="not an attribute name"):
        LdapSettings(**base, login_attribute="mail)(uid=*")


def test_service_password_never_prints():
    s = LdapSettings(url="ldap://h", search_base=PEOPLE, service_dn=SERVICE_DN,
                     service_password=SERVICE_PASSWORD)
    assert SERVICE_PASSWORD not in repr(s) and SERVICE_PASSWORD not in str(s)


# ------------------------------------------------------------------ direct bind


async def test_direct_bind(slapd, source_factory, caplog):
    caplog.set_level(logging.INFO, logger="elemta.datasource")
    source = await source_factory(direct(slapd))
    assert source.writable is False
    assert await check(source, "alice@example.test", PASSWORDS["alice"]) == "alice@example.test"
    assert await check(source, "bob@example.test", PASSWORDS["bob"]) == "bob@example.test"
    assert await check(source, "alice@example.test", "not-the-password") is None
    assert await check(source, "alice@example.test", PASSWORDS["bob"]) is None
    assert await check(source, "nobody@example.test", "whatever") is None
    # DN injection: the value is escaped, so this is uid "alice,ou=people…", which is nobody
    assert await check(source, f"alice,{PEOPLE}@x", PASSWORDS["alice"]) is None
    assert await check(source, "alice+cn=alice@example.test", PASSWORDS["alice"]) is None
    # {user} needs a local part
    assert await check(source, "@example.test", PASSWORDS["alice"]) is None
    assert "accepted as alice@example.test" in caplog.text
    assert "refused: wrong password" in caplog.text
    for password in (*PASSWORDS.values(), "whatever", "not-the-password"):
        assert password not in caplog.text


async def test_empty_password_never_binds(slapd, source_factory):
    # against the real server: an empty simple bind would be an anonymous bind that succeeds
    source = await source_factory(direct(slapd))
    assert await check(source, "alice@example.test", "") is None
    searching_source = await source_factory(searching(slapd))
    assert await check(searching_source, "alice@example.test", "") is None
    # refused before any server is asked: there is none here
    nowhere = await source_factory(LdapSettings(url=f"ldap://127.0.0.1:{free_port()}",
                                                bind_dn=f"uid={{user}},{PEOPLE}"),
                                   open_=False)
    assert await check(nowhere, "alice@example.test", "") is None
    with pytest.raises(BackendUnavailable, match="Connection refused"):
        await check(nowhere, "alice@example.test", "x")


@pytest.mark.parametrize("login", ["alice\x00@example.test", "alice@example.test\r\n",
                                   "alice\x7f@example.test", "alice\udcff@example.test",
                                   "", "a" * 300 + "@example.test"])
async def test_bad_logins_are_refused(slapd, source_factory, login):
    for settings in (direct(slapd), searching(slapd)):
        source = await source_factory(settings)
        assert await check(source, login, PASSWORDS["alice"]) is None


# ------------------------------------------------------------------ search, then bind


async def test_search_then_bind_returns_the_mail_attribute(slapd, source_factory):
    source = await source_factory(searching(slapd))
    assert await check(source, "alice@example.test", PASSWORDS["alice"]) == "alice@example.test"
    # mail matches case-insensitively; the canonical login is the stored value
    assert await check(source, "ALICE@Example.TEST", PASSWORDS["alice"]) == "alice@example.test"
    assert await check(source, "bob@example.test", PASSWORDS["bob"]) == "bob@example.test"
    assert await check(source, "alice@example.test", "not-the-password") is None
    assert await check(source, "nobody@example.test", "whatever") is None
    # several mail values: the one that was typed
    assert await check(source, "C.Smith@example.test", PASSWORDS["carol"]) == \
        "c.smith@example.test"


async def test_search_by_uid_logs_in_as_the_mail(slapd, source_factory, caplog):
    caplog.set_level(logging.INFO, logger="elemta.datasource")
    source = await source_factory(searching(slapd, search_filter="(uid={login})"))
    assert await check(source, "alice", PASSWORDS["alice"]) == "alice@example.test"
    # two mail values and none was typed: which one is meant is unknown
    assert await check(source, "carol", PASSWORDS["carol"]) is None
    assert "more than one mail attribute" in caplog.text
    as_typed = await source_factory(searching(slapd, search_filter="(uid={login})",
                                              login_attribute=None))
    assert await check(as_typed, "alice", PASSWORDS["alice"]) == "alice"
    by_part = await source_factory(searching(slapd, search_filter="(uid={user})"))
    assert await check(by_part, "alice@anything.example", PASSWORDS["alice"]) == \
        "alice@example.test"


@pytest.mark.parametrize("login", ["*", "*)(uid=*", "*)(|(uid=*", "alice@example.test)(uid=*",
                                   "a*", "\\2a", "shared@example.test)(uid=twin1"])
async def test_filter_injection_finds_nobody(slapd, source_factory, login):
    source = await source_factory(searching(slapd))
    for password in (PASSWORDS["alice"], PASSWORDS["twin1"]):
        assert await check(source, login, password) is None


async def test_ambiguous_search_is_refused(slapd, source_factory, caplog):
    caplog.set_level(logging.INFO, logger="elemta.datasource")
    source = await source_factory(searching(slapd))
    assert await check(source, "shared@example.test", PASSWORDS["twin1"]) is None
    assert "more than one entry" in caplog.text
    assert any(r.levelno == logging.WARNING and "shared@example.test" in r.getMessage()
               for r in caplog.records)


async def test_wrong_service_password_fails_open(slapd, source_factory):
    source = LdapPasswords(searching(slapd, service_password="not-it"))
    with pytest.raises(BackendUnavailable) as e:
        await source.open()
    message = str(e.value)
    assert SERVICE_DN in message and "check service_dn and service_password" in message
    assert "not-it" not in message
    # every check says so too, until the settings are fixed
    with pytest.raises(BackendUnavailable, match="check service_dn and service_password"):
        await check(source, "alice@example.test", PASSWORDS["alice"])
    await source.close()


async def test_search_base_that_cannot_be_read_fails_open(slapd, source_factory):
    # anonymous users may only bind here: the search base is invisible to them
    with pytest.raises(BackendUnavailable, match="check search_base, and that anonymous users"):
        await source_factory(searching(slapd, service_dn=None, service_password=None))
    with pytest.raises(BackendUnavailable, match="No such object|noSuchObject"):
        await source_factory(LdapSettings(url=slapd.url, search_base=f"ou=nowhere,{SUFFIX}",
                                          service_dn=SERVICE_DN,
                                          service_password=SERVICE_PASSWORD))


# ------------------------------------------------------------------ failures


async def test_nothing_listening(source_factory):
    port = free_port()
    for settings in (LdapSettings(url=f"ldap://127.0.0.1:{port}", bind_dn="uid={user},dc=x",
                                  timeout_seconds=2),
                     LdapSettings(url=f"ldap://127.0.0.1:{port}", search_base=PEOPLE,
                                  timeout_seconds=2)):
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}"):
            await source_factory(settings)
        assert time.monotonic() - started < 2


async def test_server_stopped(private_slapd, source_factory):
    timeout = 2.0
    by_dn = await source_factory(direct(private_slapd, timeout_seconds=timeout))
    by_search = await source_factory(searching(private_slapd, timeout_seconds=timeout))
    for source, login in ((by_dn, "alice@example.test"), (by_search, "alice@example.test")):
        assert await check(source, login, PASSWORDS["alice"]) == "alice@example.test"
    private_slapd.stop()
    for source in (by_dn, by_search):   # by_search holds a service connection the server closed
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as e:
            await check(source, "alice@example.test", PASSWORDS["alice"])
        assert time.monotonic() - started < timeout
        assert "\n" not in str(e.value) and PASSWORDS["alice"] not in str(e.value)
        # a wrong password is not reported as wrong: the server could not be asked
        with pytest.raises(BackendUnavailable):
            await check(source, "alice@example.test", "not-the-password")


async def test_server_down_at_open_then_back(private_slapd, source_factory):
    # the plugin starts even so (logins get 454); checks reach the server once it is back
    private_slapd.stop()
    source = LdapPasswords(searching(private_slapd))
    try:
        with pytest.raises(BackendUnavailable, match="Connection refused"):
            await source.open()
        with pytest.raises(BackendUnavailable, match="Connection refused"):
            await check(source, "alice@example.test", PASSWORDS["alice"])
        private_slapd.restart()
        assert await check(source, "alice@example.test", PASSWORDS["alice"]) == \
            "alice@example.test"
    finally:
        await source.close()


async def test_server_restarted(private_slapd, source_factory):
    # the kept service connection dies with the server: a new one is opened and bound
    source = await source_factory(searching(private_slapd, max_connections=1))
    assert await check(source, "alice@example.test", PASSWORDS["alice"]) == "alice@example.test"
    assert len(source._idle) == 1
    kept = source._idle[0]
    private_slapd.restart()
    assert await check(source, "alice@example.test", PASSWORDS["alice"]) == "alice@example.test"
    assert source._idle and source._idle[0] is not kept
    assert await check(source, "bob@example.test", PASSWORDS["bob"]) == "bob@example.test"


async def test_server_that_does_not_answer_times_out(private_slapd, source_factory):
    source = await source_factory(searching(private_slapd, timeout_seconds=1))
    assert await check(source, "alice@example.test", PASSWORDS["alice"]) == "alice@example.test"
    os.kill(private_slapd.proc.pid, signal.SIGSTOP)   # accepts TCP, answers nothing
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="no answer within 1 s"):
            await check(source, "alice@example.test", PASSWORDS["alice"])
        assert time.monotonic() - started < 1.5
    finally:
        os.kill(private_slapd.proc.pid, signal.SIGCONT)
    # once it answers again, so does the source
    deadline = time.monotonic() + 5
    while True:
        try:
            assert await check(source, "alice@example.test", PASSWORDS["alice"]) == \
                "alice@example.test"
            break
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_closed_source_is_unavailable(slapd, source_factory):
    source = await source_factory(searching(slapd))
    assert await check(source, "alice@example.test", PASSWORDS["alice"]) == "alice@example.test"
    await source.close()
    await source.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        await check(source, "alice@example.test", PASSWORDS["alice"])
    await source.open()   # and it opens again
    assert await check(source, "alice@example.test", PASSWORDS["alice"]) == "alice@example.test"


# ------------------------------------------------------------------ concurrency


@pytest.mark.parametrize("mode", ["direct", "search"])
async def test_concurrent_verifications_stay_within_max_connections(slapd, source_factory,
                                                                    mode):
    limit = 3
    settings = (direct(slapd, max_connections=limit) if mode == "direct"
                else searching(slapd, max_connections=limit))
    # threads of sources other tests closed may still be winding down: not counted
    before = {t.ident for t in threading.enumerate()}
    source = await source_factory(settings)
    most = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal most
        while not done.is_set():
            running = [t for t in threading.enumerate()
                       if t.name.startswith("datasource-ldap") and t.ident not in before]
            most = max(most, len(running))
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    users = ["alice", "bob"] * 10
    loop = asyncio.get_running_loop()
    ticks = 0

    def tick() -> None:   # the event loop keeps running while LDAP works
        nonlocal ticks
        ticks += 1
        if not done.is_set():
            loop.call_later(0.001, tick)

    tick()
    results = await asyncio.gather(*(check(source, f"{u}@example.test", PASSWORDS[u])
                                     for u in users))
    done.set()
    await watcher
    assert results == [f"{u}@example.test" for u in users]
    assert 1 <= most <= limit
    assert ticks > 1
    assert len(source._idle) <= limit


# ------------------------------------------------------------------ TLS


async def test_start_tls_verified_with_ca_file(slapd, source_factory):
    source = await source_factory(searching(slapd, start_tls=True, ca_file=slapd.ca_file))
    assert await check(source, "ALICE@example.test", PASSWORDS["alice"]) == "alice@example.test"
    bound = await source_factory(direct(slapd, start_tls=True, ca_file=slapd.ca_file))
    assert await check(bound, "bob@example.test", PASSWORDS["bob"]) == "bob@example.test"
    assert await check(bound, "bob@example.test", "not-the-password") is None


async def test_start_tls_refuses_an_unverified_certificate(slapd, source_factory):
    # the system's CAs do not know the test CA: verification fails, it is never skipped
    with pytest.raises(BackendUnavailable, match="TLS failed.*CERTIFICATE_VERIFY_FAILED"):
        await source_factory(direct(slapd, start_tls=True))
    with pytest.raises(BackendUnavailable, match="TLS failed.*CERTIFICATE_VERIFY_FAILED"):
        await source_factory(searching(slapd, start_tls=True))
    # the certificate names 127.0.0.1, not localhost
    with pytest.raises(BackendUnavailable, match="TLS failed"):
        await source_factory(LdapSettings(url=f"ldap://localhost:{slapd.port}",
                                          bind_dn=f"uid={{user}},{PEOPLE}", start_tls=True,
                                          ca_file=slapd.ca_file))


async def test_missing_ca_file(slapd, source_factory, tmp_path):
    with pytest.raises(BackendUnavailable, match="ca_file .*missing.pem"):
        await source_factory(direct(slapd, start_tls=True, ca_file=tmp_path / "missing.pem"))


async def test_ldaps_to_a_plain_port_fails_cleanly(slapd, source_factory):
    with pytest.raises(BackendUnavailable, match="TLS|SSL|ssl"):
        await source_factory(LdapSettings(url=f"ldaps://127.0.0.1:{slapd.port}",
                                          bind_dn=f"uid={{user}},{PEOPLE}", timeout_seconds=2,
                                          ca_file=slapd.ca_file))


# ------------------------------------------------------------------ through a server


async def test_submission_with_ldap_passwords_and_directory_limits(slapd, elemta_server,
                                                                   elemta_outbox):
    """swaks-like: AUTH PLAIN over STARTTLS, checked by slapd; the login is the entry's mail;
    limits come from the directory (`elemta users add --no-password`)."""
    import base64

    from elemta.testing import RawSMTP, run_cli, unverified_context

    server = await elemta_server({"domains": {}, "plugins": {
        "enabled": ["datasource"],
        "datasource": {"cache_seconds": 0, "auth": {
            "source": "ldap", "cache_seconds": 0,
            "ldap": {"url": slapd.url, "search_base": PEOPLE, "service_dn": SERVICE_DN,
                     "service_password": SERVICE_PASSWORD}}}}}, outbox=elemta_outbox)
    result = await asyncio.to_thread(run_cli, "users", "add", "alice@example.test",
                                     "--no-password", "--daily-quota", "1",
                                     config=server.config_path)
    assert result.exit_code == 0, result.stderr

    async def login(user: str, password: str) -> tuple[RawSMTP, int]:
        c = RawSMTP(server.port("submission"))
        await c.connect()
        await c.cmd("EHLO client.example")
        await c.starttls(unverified_context())
        ehlo = await c.cmd("EHLO client.example")
        assert "AUTH PLAIN LOGIN" in ehlo.lines, "LDAP has no SCRAM keys: not offered"
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return c, (await c.cmd(f"AUTH PLAIN {token}")).code

    c, code = await login("ALICE@example.test", PASSWORDS["alice"])
    assert code == 235
    assert (await c.cmd("MAIL FROM:<bob@example.test>")).code == 553
    assert (await c.send_message("alice@example.test", ["friend@outside.example"],
                                 b"From: alice@example.test\r\n\r\nhi\r\n.\r\n")).code == 250
    assert (await c.cmd("MAIL FROM:<alice@example.test>")).code == 450, "daily quota of 1"
    c.close()
    c, code = await login("alice@example.test", "wrong")
    assert code == 535
    c.close()
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.envelope.auth == "alice@example.test"
