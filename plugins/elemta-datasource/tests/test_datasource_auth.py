"""Authenticated submission with the datasource: real clients against a real server.

Users are made with the real command line (``elemta users``) in the SQLite
directory the server reads; swaks logs in with PLAIN over STARTTLS on the
submission port and with LOGIN over implicit TLS; scramp's client speaks
SCRAM-SHA-256. What is relayed is captured by the test outbox.
"""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
from pathlib import Path

import bcrypt
import pytest
from scramp import ScramClient

from elemta.testing import RawSMTP, run_cli, unverified_context

PASSWORDS = {"alice@example.test": "alice's long secret", "bob@example.test": "bob's old secret",
             "dave@example.test": "dave's long secret", "quota@example.test": "quota secret!",
             "small@example.test": "small secret!!"}


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def plain(login: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{login}\0{password}")


async def run(server, *args: str, input: str | None = None):
    """The command line, in a thread: its commands run their own event loop."""
    return await asyncio.to_thread(run_cli, *args, config=server.config_path, input=input)


async def cli(server, *args: str, input: str | None = None) -> str:
    result = await run(server, *args, input=input)
    assert result.exit_code == 0, result.stdout + result.stderr
    return result.stdout


async def start(elemta_server, elemta_outbox, config: dict | None = None, users: bool = True):
    """A server with the datasource (SQLite in its state_dir) and an outbox; the users added."""
    base = {"domains": {}, "plugins": {"enabled": ["datasource"],
                                       "datasource": {"cache_seconds": 0.1,
                                                      "auth": {"cache_seconds": 0}}}}
    if config:
        base["plugins"]["datasource"].update(config)
    server = await elemta_server(base, outbox=elemta_outbox)
    await cli(server, "domains", "add", "example.test")
    if not users:
        return server
    for login in ("alice@example.test", "dave@example.test"):
        await cli(server, "users", "add", login, "--password-stdin",
                  input=PASSWORDS[login] + "\n")
    await cli(server, "users", "add", "quota@example.test", "--password-stdin",
              "--daily-quota", "2", input=PASSWORDS["quota@example.test"] + "\n")
    await cli(server, "users", "add", "small@example.test", "--password-stdin",
              "--max-message-bytes", "400", input=PASSWORDS["small@example.test"] + "\n")
    await cli(server, "aliases", "add", "sales@example.test", "alice@example.test")
    await cli(server, "users", "grant", "alice@example.test", "@brand.example")
    await cli(server, "users", "disable", "dave@example.test")
    return server


async def session(server, listener: str = "submission", source: str | None = None) -> RawSMTP:
    if listener == "smtps":
        c = RawSMTP(server.port(listener), tls=unverified_context(), source=source)
        await c.connect()
    else:
        c = RawSMTP(server.port(listener), source=source)
        await c.connect()
        await c.cmd("EHLO client.example")
        await c.starttls(unverified_context())
    await c.cmd("EHLO client.example")
    return c


async def logged_in(server, login: str = "alice@example.test") -> RawSMTP:
    c = await session(server)
    reply = await c.cmd(f"AUTH PLAIN {plain(login, PASSWORDS[login])}")
    assert reply.code == 235, reply
    return c


def message(sender: str, to: str = "friend@outside.example", size: int = 0) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: hello\r\n\r\n"
            + "x" * size + "\r\nbye\r\n.\r\n").encode()


def swaks(path: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([path, "--server", "127.0.0.1", "--port", str(port),
                           "--ehlo", "client.example", "--from", "alice@example.test",
                           "--to", "friend@outside.example", "--timeout", "15", *args],
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------ real clients


async def test_swaks_plain_over_starttls_is_relayed_through_the_runner(
        elemta_server, elemta_outbox, require_tool):
    server = await start(elemta_server, elemta_outbox)
    result = await asyncio.to_thread(
        swaks, require_tool("swaks"), server.port("submission"), "--tls", "--auth", "PLAIN",
        "--auth-user", "Alice@Example.TEST", "--auth-password", PASSWORDS["alice@example.test"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["friend@outside.example"]
    assert delivered.envelope.auth == "alice@example.test", "the canonical login"
    assert delivered.route.transport == "smtp"


async def test_swaks_login_over_implicit_tls(elemta_server, elemta_outbox, require_tool):
    server = await start(elemta_server, elemta_outbox)
    result = await asyncio.to_thread(
        swaks, require_tool("swaks"), server.port("smtps"), "--tls-on-connect", "--auth",
        "LOGIN", "--auth-user", "alice@example.test",
        "--auth-password", PASSWORDS["alice@example.test"])
    assert result.returncode == 0, result.stdout + result.stderr
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.envelope.tls["implicit"] is True


async def test_swaks_wrong_password_gets_535(elemta_server, elemta_outbox, require_tool):
    server = await start(elemta_server, elemta_outbox)
    result = await asyncio.to_thread(
        swaks, require_tool("swaks"), server.port("submission"), "--tls", "--auth", "PLAIN",
        "--auth-user", "alice@example.test", "--auth-password", "wrong")
    assert result.returncode != 0
    assert "535 5.7.8" in result.stdout


async def test_scram_sha_256_with_keys_made_by_the_command_line(elemta_server, elemta_outbox):
    server = await start(elemta_server, elemta_outbox)
    c = await session(server)
    assert "AUTH SCRAM-SHA-256 PLAIN LOGIN" in (await c.cmd("EHLO client.example")).lines
    client = ScramClient(["SCRAM-SHA-256"], "alice@example.test", PASSWORDS["alice@example.test"])
    reply = await c.cmd(f"AUTH SCRAM-SHA-256 {b64(client.get_client_first())}")
    client.set_server_first(base64.b64decode(reply.text).decode())
    reply = await c.cmd(b64(client.get_client_final()))
    assert reply.code == 334, reply
    client.set_server_final(base64.b64decode(reply.text).decode())
    assert (await c.cmd("")).code == 235
    assert (await c.send_message("alice@example.test", ["friend@outside.example"],
                                 message("alice@example.test"))).code == 250
    c.close()
    await elemta_outbox.wait(1)


async def test_tls_first_then_auth_then_mail(elemta_server, elemta_outbox):
    server = await start(elemta_server, elemta_outbox)
    async with RawSMTP(server.port("submission")) as c:
        assert "AUTH" not in " ".join((await c.cmd("EHLO client.example")).lines)
        reply = await c.cmd(f"AUTH PLAIN {plain('alice@example.test', 'x')}")
        assert reply.code in (530, 538), reply
        assert (await c.cmd("MAIL FROM:<alice@example.test>")).code == 530
    c = await session(server)
    assert str(await c.cmd("MAIL FROM:<alice@example.test>")).startswith("530 5.7.0")
    c.close()


# ------------------------------------------------------------------ what a login may send


@pytest.mark.parametrize("sender", [
    "alice@example.test", "alice+lists@example.test", "ALICE@example.test",
    "sales@example.test",              # an alias that delivers to alice
    "news@brand.example",              # granted: @brand.example
    "",                                # the null sender
])
async def test_a_user_sends_as_their_own_addresses(elemta_server, elemta_outbox, sender):
    server = await start(elemta_server, elemta_outbox)
    c = await logged_in(server)
    header_from = sender or "alice@example.test"
    reply = await c.send_message(sender, ["friend@outside.example"], message(header_from))
    assert reply.code == 250, reply
    c.close()


async def test_sending_as_someone_else_gets_553(elemta_server, elemta_outbox):
    server = await start(elemta_server, elemta_outbox)
    c = await logged_in(server)
    reply = await c.cmd("MAIL FROM:<bob@example.test>")
    assert str(reply) == ("553 5.7.1 <bob@example.test>: Sender address rejected: not owned by "
                          "user alice@example.test")
    # the envelope is hers, the header From: is not
    reply = await c.send_message("alice@example.test", ["friend@outside.example"],
                                 message("Bob <bob@example.test>"))
    assert (reply.code, reply.enhanced) == (553, "5.7.1"), reply
    assert "From: <bob@example.test>" in reply.text
    c.close()
    assert elemta_outbox.messages == []


async def test_plain_authzid_is_allowed_by_a_send_as_grant(elemta_server, elemta_outbox):
    server = await start(elemta_server, elemta_outbox)
    await cli(server, "users", "add", "shared@example.test", "--password-stdin",
              input="the shared secret\n")
    await cli(server, "users", "grant", "alice@example.test", "shared@example.test")
    c = await session(server)
    reply = await c.cmd("AUTH PLAIN " + plain("alice@example.test", PASSWORDS["alice@example.test"],
                                              "shared@example.test"))
    assert reply.code == 235, reply
    assert (await c.cmd("MAIL FROM:<shared@example.test>")).code == 250
    c.close()
    c = await session(server)
    reply = await c.cmd("AUTH PLAIN " + plain("alice@example.test", PASSWORDS["alice@example.test"],
                                              "dave@example.test"))
    assert (reply.code, reply.enhanced) == (535, "5.7.8")
    c.close()


# ------------------------------------------------------------------ accounts and limits


async def test_a_disabled_user_cannot_log_in_but_still_gets_mail(elemta_server, elemta_outbox):
    server = await start(elemta_server, elemta_outbox)
    c = await session(server)
    reply = await c.cmd(f"AUTH PLAIN {plain('dave@example.test', PASSWORDS['dave@example.test'])}")
    assert (reply.code, reply.enhanced) == (535, "5.7.8")
    c.close()
    async with RawSMTP(server.port("mx")) as mx:
        await mx.cmd("EHLO outside.example")
        reply = await mx.send_message("someone@outside.example", ["dave@example.test"],
                                      message("someone@outside.example"))
        assert reply.code == 250, reply
    await cli(server, "users", "enable", "dave@example.test")
    await asyncio.sleep(0.15)           # the directory cache
    await (await logged_in(server, "dave@example.test")).cmd("QUIT")


async def test_daily_quota_and_message_size_per_user(elemta_server, elemta_outbox):
    server = await start(elemta_server, elemta_outbox)
    c = await logged_in(server, "quota@example.test")
    for _ in range(2):
        assert (await c.send_message("quota@example.test", ["friend@outside.example"],
                                     message("quota@example.test"))).code == 250
    reply = await c.cmd("MAIL FROM:<quota@example.test>")
    assert str(reply).startswith("450 4.7.1 Daily limit of 2 messages reached for "
                                 "quota@example.test")
    c.close()
    c = await logged_in(server, "small@example.test")
    reply = await c.cmd("MAIL FROM:<small@example.test> SIZE=5000")
    assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
    reply = await c.send_message("small@example.test", ["friend@outside.example"],
                                 message("small@example.test", size=1000))
    assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
    assert (await c.send_message("small@example.test", ["friend@outside.example"],
                                 message("small@example.test"))).code == 250
    c.close()


async def test_an_imported_bcrypt_hash_logs_in_and_is_upgraded(elemta_server, elemta_outbox):
    """A Dovecot {BLF-CRYPT} hash works as it is; the first login stores argon2id and SCRAM."""
    server = await start(elemta_server, elemta_outbox)
    await cli(server, "users", "add", "bob@example.test", "--no-password")
    plugin = server.app.pm.get_plugin("datasource")
    hashed = bcrypt.hashpw(PASSWORDS["bob@example.test"].encode(), bcrypt.gensalt(5)).decode()
    await plugin.backend.update_user("bob@example.test",
                                     password="{BLF-CRYPT}" + hashed.replace("$2b$", "$2y$"))
    assert "BLF-CRYPT no-scram" in await cli(server, "users", "list")
    await (await logged_in(server, "bob@example.test")).cmd("QUIT")
    listed = await cli(server, "users", "list")
    assert re.search(r"^bob@example\.test\tenabled ARGON2ID scram$", listed, re.M), listed


async def test_users_commands_never_take_a_password_on_the_command_line(elemta_server,
                                                                         elemta_outbox):
    server = await start(elemta_server, elemta_outbox)
    result = await run(server, "users", "add", "x@example.test", "--password", "oops")
    assert result.exit_code == 2 and "No such option '--password'" in result.stderr
    result = await run(server, "users", "passwd", "alice@example.test", "--password-stdin",
                       input="\n")
    assert result.exit_code == 2 and "the password is empty" in result.stderr
    result = await run(server, "users", "passwd", "nobody@example.test", "--password-stdin",
                       input="a fine password\n")
    assert result.exit_code == 1 and "there is no user nobody@example.test" in result.stderr
    # the file holds no password
    db = server.root / "state" / "datasource.sqlite3"
    assert PASSWORDS["alice@example.test"].encode() not in db.read_bytes()


async def test_no_start_up_warning_when_the_datasource_checks_logins(elemta_server,
                                                                     elemta_outbox, caplog):
    await start(elemta_server, elemta_outbox)
    assert "requires AUTH, but no enabled plugin" not in caplog.text


# ------------------------------------------------------------------ other password sources


async def test_a_dovecot_passwd_file_logs_in_unchanged(elemta_server, elemta_outbox, tmp_path,
                                                       require_tool):
    """Hashes made by Dovecot's own doveadm, in Dovecot's passwd-file format."""
    doveadm = require_tool("doveadm", "dovecot-core")
    users = {"crypt@example.test": ("SHA512-CRYPT", "sha512 secret"),
             "blf@example.test": ("BLF-CRYPT", "bcrypt secret"),
             "argon@example.test": ("ARGON2ID", "argon2 secret"),
             "ssha@example.test": ("SSHA512", "ssha secret")}
    lines = ["# user:password:uid:gid:gecos:home:shell:extra"]
    for login, (scheme, password) in users.items():
        hashed = subprocess.run([doveadm, "pw", "-s", scheme, "-p", password], check=True,
                                capture_output=True, text=True).stdout.strip()
        assert hashed.startswith("{" + scheme + "}"), hashed
        lines.append(f"{login}:{hashed}:1000:1000::/home/x::")
    passwd = tmp_path / "users"
    passwd.write_text("\n".join(lines) + "\n")
    server = await start(elemta_server, elemta_outbox,
                         {"auth": {"source": "passwd-file", "passwd_file": str(passwd),
                                   "cache_seconds": 0}}, users=False)
    c = await session(server)
    assert "AUTH PLAIN LOGIN" in (await c.cmd("EHLO client.example")).lines, "no SCRAM keys here"
    c.close()
    for login, (_, password) in users.items():
        c = await session(server)
        assert (await c.cmd(f"AUTH PLAIN {plain(login, password)}")).code == 235, login
        c.close()
        c = await session(server)
        assert (await c.cmd(f"AUTH PLAIN {plain(login, 'wrong')}")).code == 535, login
        c.close()
    # read-only: the file is never rewritten, and `users passwd` says why
    assert passwd.read_text() == "\n".join(lines) + "\n"
    result = await run(server, "users", "passwd", "crypt@example.test", "--password-stdin",
                       input="new secret for crypt\n")
    assert result.exit_code == 2 and "checked by the 'passwd-file' source" in result.stderr


async def test_a_missing_passwd_file_stops_start_up_with_the_path(elemta_server, tmp_path):
    from elemta import StartupError

    with pytest.raises(StartupError, match=r"passwd-file .*nothing-here: No such file"):
        await elemta_server({"domains": {}, "plugins": {"enabled": ["datasource"], "datasource": {
            "auth": {"source": "passwd-file", "passwd_file": str(tmp_path / "nothing-here")}}}})


async def test_users_in_postgresql(elemta_server, elemta_outbox, postgresql):
    server = await start(elemta_server, elemta_outbox,
                         {"backend": "postgresql", "postgresql_dsn": postgresql})
    c = await logged_in(server)
    assert (await c.send_message("sales@example.test", ["friend@outside.example"],
                                 message("alice@example.test"))).code == 250
    assert (await c.cmd("MAIL FROM:<bob@example.test>")).code == 553
    c.close()
    c = await logged_in(server, "quota@example.test")
    for _ in range(2):
        assert (await c.send_message("quota@example.test", ["friend@outside.example"],
                                     message("quota@example.test"))).code == 250
    assert (await c.cmd("MAIL FROM:<quota@example.test>")).code == 450
    c.close()
    import psycopg

    with psycopg.connect(postgresql) as conn:
        assert conn.execute("SELECT login, count FROM user_sent").fetchall() == [
            ("quota@example.test", 2)]


# ------------------------------------------------------------------ defects of the directory


async def test_a_bounce_to_an_unknown_mailbox_creates_no_mailbox(elemta_server, tmp_path):
    """Mail that never passed RCPT (a bounce) for an address nobody has fails (and, as a
    bounce, is dropped); for an alias it reaches the alias's members."""
    from elemta.testing import Sink

    async with Sink(rcpt_replies={"gone@outside.example": "550 5.1.1 no such user"}) as sink:
        server = await elemta_server({
            "domains": {},
            "delivery": {"enabled": True, "retry_intervals_seconds": [0.2],
                         "routes": {"outside.example": {"host": sink.address, "tls": "none"}}},
            "plugins": {"enabled": ["datasource", "maildir"],
                        "datasource": {"cache_seconds": 0},
                        "maildir": {"path": str(tmp_path / "mail/{domain}/{user}/Maildir"),
                                    "create_mailboxes": True}}})
        await cli(server, "domains", "add", "example.test")
        await cli(server, "mailboxes", "add", "alice@example.test")
        await cli(server, "aliases", "add", "team@example.test", "alice@example.test")
        async with RawSMTP(server.port("mx")) as c:
            await c.cmd("EHLO client.example")
            await c.cmd("QUIT")
        # a message relayed for a (forged) local sender, to an outside address that refuses
        for sender in ("ghost@example.test", "team@example.test"):
            await server.app.queue_message(sender, ["gone@outside.example"],
                                           message(sender).removesuffix(b".\r\n"))
        await server.flush()
        box = tmp_path / "mail" / "example.test"
        for _ in range(200):
            if list((box / "alice" / "Maildir" / "new").glob("*")) if box.exists() else []:
                break
            await asyncio.sleep(0.05)
        [bounce] = list((box / "alice" / "Maildir" / "new").iterdir())
        assert b"Delivery Status Notification" in bounce.read_bytes() \
            or b"delivery-status" in bounce.read_bytes()
        await asyncio.sleep(0.5)
        assert sorted(p.name for p in box.iterdir()) == ["alice"], "no mailbox for ghost@"


async def test_the_same_config_by_a_relative_and_an_absolute_path(tmp_path, monkeypatch):
    from elemta.testing import write_config

    config = write_config(tmp_path / "sub", {"domains": {},
                                             "plugins": {"enabled": ["datasource"]}})
    monkeypatch.chdir(tmp_path)

    def cli_at(path: str, *args: str) -> str:
        result = run_cli(*args, config=path)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    await asyncio.to_thread(cli_at, "sub/elemta.toml", "domains", "add", "example.test")
    assert "example.test" in await asyncio.to_thread(cli_at, str(config), "domains", "list")
    dbs = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("datasource.sqlite3"))
    assert dbs == [Path("sub/state/datasource.sqlite3")], dbs
