"""AUTH in the core: SCRAM-SHA-256, authorization identities, failed-login protection.

The plugins here are ordinary hook implementations holding a user table;
the clients are real: scramp's SCRAM client over a raw SMTP session, and
sessions from several loopback addresses for the lock-outs.
"""

from __future__ import annotations

import base64
import logging
import re
import time

import pytest
from scramp import ScramClient, ScramMechanism

from elemta import Accept, Reject, ScramKeys, hookimpl
from elemta.config import AuthSettings
from elemta.smtp.guard import AuthGuard, client_key
from elemta.testing import RawSMTP, unverified_context

USERS = {"alice@example.test": "correct horse", "bob@example.test": "battery staple"}


class Users:
    """Passwords for PLAIN and LOGIN, SCRAM keys derived once; alice may act as sales@."""

    def __init__(self) -> None:
        self.keys = {u: ScramKeys.derive(p) for u, p in USERS.items()}
        self.asked: list[str] = []

    @hookimpl
    def auth(self, credentials):
        if USERS.get(credentials.login) == credentials.password:
            return Accept()
        return Reject(535, "5.7.8", "no")

    @hookimpl
    def scram_keys(self, login):
        self.asked.append(login)
        return self.keys.get(login)

    @hookimpl
    def authorize(self, login, authzid):
        return login == "alice@example.test" and authzid == "sales@example.test"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(login: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{login}\0{password}")


async def session(server, source: str | None = None, listener: str = "submission") -> RawSMTP:
    c = RawSMTP(server.port(listener), source=source)
    await c.connect()
    await c.cmd("EHLO client.example")
    await c.starttls(unverified_context())
    await c.cmd("EHLO client.example")
    return c


async def scram_login(c: RawSMTP, login: str, password: str, initial: bool = True):
    """A SCRAM-SHA-256 exchange driven by scramp's client; the last reply and the client."""
    client = ScramClient(["SCRAM-SHA-256"], login, password)
    first = client.get_client_first()
    if initial:
        reply = await c.cmd(f"AUTH SCRAM-SHA-256 {b64(first)}")
    else:
        assert (await c.cmd("AUTH SCRAM-SHA-256")).code == 334
        reply = await c.cmd(b64(first))
    if reply.code != 334:
        return reply, client
    client.set_server_first(base64.b64decode(reply.text).decode())
    reply = await c.cmd(b64(client.get_client_final()))
    if reply.code != 334:
        return reply, client
    client.set_server_final(base64.b64decode(reply.text).decode())  # checks the server's proof
    return await c.cmd(""), client


# ------------------------------------------------------------------ SCRAM-SHA-256


def test_scram_keys_match_rfc_7677():
    """RFC 7677 §3: user "user", password "pencil"; the exchange proves the same keys."""
    keys = ScramKeys.derive("pencil", salt=base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    assert keys.iterations == 4096
    server = ScramMechanism("SCRAM-SHA-256").make_server(
        lambda _: (keys.salt, keys.stored_key, keys.server_key, keys.iterations),
        s_nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    server.set_client_first("n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    assert server.get_server_first() == (
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    server.set_client_final("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert server.get_server_final() == "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_keys_round_trip_and_refuse_garbage():
    keys = ScramKeys.derive("pencil", iterations=5000)
    assert ScramKeys.parse(keys.to_string()) == keys
    assert keys.to_string().startswith("SCRAM-SHA-256$5000:")
    assert "pencil" not in repr(keys) and keys.stored_key.hex() not in repr(keys)
    for bad in ("", "SCRAM-SHA-1$4096:abc$def:ghi", "SCRAM-SHA-256$x:AAAA$AAAA:AAAA",
                "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA"):
        with pytest.raises(ValueError, match="SCRAM-SHA-256"):
            ScramKeys.parse(bad)


async def test_hook_scram_keys(elemta_server):
    """SCRAM-SHA-256 succeeds, and the server proves it knows the keys."""
    server = await elemta_server(plugins=[("users", Users())])
    c = await session(server)
    ehlo = await c.cmd("EHLO client.example")
    assert "AUTH SCRAM-SHA-256 PLAIN LOGIN" in ehlo.lines
    reply, _ = await scram_login(c, "alice@example.test", "correct horse")
    assert str(reply).startswith("235 2.7.0"), reply
    assert (await c.cmd("MAIL FROM:<alice@example.test>")).code == 250
    c.close()
    c = await session(server)
    reply, _ = await scram_login(c, "bob@example.test", "battery staple", initial=False)
    assert reply.code == 235, reply
    c.close()


async def test_scram_wrong_password_and_unknown_login_fail_alike(elemta_server):
    users = Users()
    server = await elemta_server(plugins=[("users", users)])
    c = await session(server)
    wrong, _ = await scram_login(c, "alice@example.test", "wrong")
    assert str(wrong).startswith("535 5.7.8"), wrong
    # an unknown login gets a salt and an iteration count like anyone's, and the same end
    client = ScramClient(["SCRAM-SHA-256"], "nobody@example.test", "x")
    first = await c.cmd(f"AUTH SCRAM-SHA-256 {b64(client.get_client_first())}")
    assert first.code == 334
    server_first = base64.b64decode(first.text).decode()
    assert ",s=" in server_first and server_first.endswith(",i=4096")
    client.set_server_first(server_first)
    assert str(await c.cmd(b64(client.get_client_final()))).startswith("535 5.7.8")
    c.close()
    assert users.asked == ["alice@example.test", "nobody@example.test"]


@pytest.mark.parametrize("first", [
    "p=tls-exporter,,n=alice@example.test,r=abc",      # insists on channel binding
    "n,,m=ext,n=alice@example.test,r=abc",             # a mandatory extension
    "n,,n=alice=2Gexample,r=abc",                      # a bad saslname escape
    "x,,n=alice@example.test,r=abc",
    "n,,n=alice@example.test",                         # no nonce
])
async def test_malformed_scram_messages_get_501(elemta_server, first):
    server = await elemta_server(plugins=[("users", Users())])
    c = await session(server)
    assert str(await c.cmd(f"AUTH SCRAM-SHA-256 {b64(first)}")).startswith("501 5.5.2")
    assert (await c.cmd("NOOP")).code == 250, "the session goes on"
    c.close()


async def test_scram_cancelled_midway(elemta_server):
    server = await elemta_server(plugins=[("users", Users())])
    c = await session(server)
    client = ScramClient(["SCRAM-SHA-256"], "alice@example.test", "correct horse")
    assert (await c.cmd(f"AUTH SCRAM-SHA-256 {b64(client.get_client_first())}")).code == 334
    assert (await c.cmd("*")).code == 501
    reply, _ = await scram_login(c, "alice@example.test", "correct horse")
    assert reply.code == 235
    c.close()


async def test_scram_is_not_offered_without_a_plugin_that_has_keys(elemta_server):
    class PasswordsOnly:
        @hookimpl
        def auth(self, credentials):
            return None

    server = await elemta_server(plugins=[("passwords", PasswordsOnly())])
    c = await session(server)
    assert "AUTH PLAIN LOGIN" in (await c.cmd("EHLO client.example")).lines
    assert (await c.cmd("AUTH SCRAM-SHA-256")).code == 504
    c.close()


# ------------------------------------------------------------------ authorization identity


async def test_hook_authorize(elemta_server):
    """A PLAIN authorization identity other than the login needs the hook's consent."""
    server = await elemta_server(plugins=[("users", Users())])
    c = await session(server)
    # alice may act as sales@, and the session is then sales@
    alice = plain("alice@example.test", "correct horse", "sales@example.test")
    reply = await c.cmd(f"AUTH PLAIN {alice}")
    assert reply.code == 235, reply
    c.close()
    c = await session(server)
    bob = plain("bob@example.test", "battery staple", "alice@example.test")
    reply = await c.cmd(f"AUTH PLAIN {bob}")
    assert str(reply) == "535 5.7.8 Not authorized to act as that identity"
    # the same as the login is no authorization identity at all
    bob = plain("bob@example.test", "battery staple", "bob@example.test")
    reply = await c.cmd(f"AUTH PLAIN {bob}")
    assert reply.code == 235
    c.close()


async def test_authzid_is_refused_when_no_plugin_allows_it(elemta_server):
    class NoAuthorize:
        @hookimpl
        def auth(self, credentials):
            return Accept()

    server = await elemta_server(plugins=[("any", NoAuthorize())])
    c = await session(server)
    reply = await c.cmd(f"AUTH PLAIN {plain('bob', 'x', 'root')}")
    assert (reply.code, reply.enhanced) == (535, "5.7.8")
    c.close()


async def test_scram_with_an_authzid_is_refused_clearly(elemta_server):
    server = await elemta_server(plugins=[("users", Users())])
    c = await session(server)
    first = "n,a=sales@example.test,n=alice@example.test,r=abcdefgh"
    assert str(await c.cmd(f"AUTH SCRAM-SHA-256 {b64(first)}")).startswith(
        "504 5.5.4 No authorization identity with SCRAM-SHA-256")
    c.close()


# ------------------------------------------------------------------ failed logins


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_guard_slows_then_locks_an_address_and_forgets_with_time():
    clock = Clock()
    guard = AuthGuard(AuthSettings(slow_after_failures=2, lock_after_failures=5,
                                   max_delay_seconds=4, lock_seconds=60, window_seconds=300),
                      clock)
    delays = []
    for _ in range(5):
        delays.append(guard.delay("192.0.2.1"))
        guard.failed("192.0.2.1", "alice")
    assert delays == [0, 0, 1, 2, 4]
    assert guard.client_locked("192.0.2.1") == 60
    assert guard.client_locked("192.0.2.2") == 0
    clock.now += 61
    assert guard.client_locked("192.0.2.1") == 0
    assert guard.delay("192.0.2.1") == 4          # still in the window: slow
    clock.now += 300
    assert guard.delay("192.0.2.1") == 0          # aged out


def test_guard_counts_an_ipv6_client_by_its_64():
    assert client_key("2001:db8:1:2::5") == client_key("2001:db8:1:2:ffff::1") \
        == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::5") != client_key("2001:db8:1:2::5")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_guard_locks_a_login_except_from_addresses_it_used():
    clock = Clock()
    guard = AuthGuard(AuthSettings(user_lock_after_failures=3, lock_after_failures=100,
                                   slow_after_failures=50), clock)
    guard.succeeded("198.51.100.9", "Alice")
    for n in range(3):
        guard.failed(f"203.0.113.{n}", "alice")
    assert guard.login_locked("alice", "203.0.113.77")
    assert not guard.login_locked("ALICE", "198.51.100.9"), "its owner still gets in"
    assert not guard.login_locked("bob", "203.0.113.77")


async def test_brute_force_from_one_address_locks_it_and_not_another(elemta_server):
    server = await elemta_server({"auth": {"slow_after_failures": 2, "max_delay_seconds": 0.2,
                                           "lock_after_failures": 4, "lock_seconds": 120}},
                                 plugins=[("users", Users())])
    started = time.monotonic()
    for _ in range(2):                          # max_auth_failures is 3 per session
        c = await session(server, source="127.0.0.2")
        for _ in range(2):
            reply = await c.cmd(f"AUTH PLAIN {plain('alice@example.test', 'guess')}")
            assert reply.code == 535, reply
        c.close()
    assert time.monotonic() - started >= 0.3, "the 3rd and 4th failures were slowed"
    c = await session(server, source="127.0.0.2")
    # locked: refused without looking at the password, even the right one
    reply = await c.cmd(f"AUTH PLAIN {plain('alice@example.test', 'correct horse')}")
    assert str(reply).startswith("454 4.7.0 Too many failed logins; try again in 2 minutes")
    reply, _ = await scram_login(c, "alice@example.test", "correct horse")
    assert reply.code == 454
    c.close()
    # the owner, from elsewhere, is not affected
    c = await session(server, source="127.0.0.3")
    reply = await c.cmd(f"AUTH PLAIN {plain('alice@example.test', 'correct horse')}")
    assert reply.code == 235, reply
    c.close()
    text = server.app.metrics.render().decode()
    assert ('smtp_auth_attempts_total{listener="submission",mechanism="PLAIN",'
            'result="failure"} 4.0') in text
    assert ('smtp_auth_attempts_total{listener="submission",mechanism="PLAIN",'
            'result="locked"} 1.0') in text
    assert ('smtp_auth_attempts_total{listener="submission",mechanism="PLAIN",'
            'result="success"} 1.0') in text


async def test_a_login_guessed_from_many_addresses_is_locked_but_not_for_its_owner(
        elemta_server):
    server = await elemta_server({"auth": {"user_lock_after_failures": 3,
                                           "slow_after_failures": 50,
                                           "lock_after_failures": 50}},
                                 plugins=[("users", Users())])
    c = await session(server, source="127.0.0.10")
    assert (await c.cmd(f"AUTH PLAIN {plain('bob@example.test', 'battery staple')}")).code == 235
    c.close()
    for n in range(3):
        c = await session(server, source=f"127.0.1.{n + 1}")
        assert (await c.cmd(f"AUTH PLAIN {plain('bob@example.test', 'guess')}")).code == 535
        c.close()
    c = await session(server, source="127.0.2.1")
    reply = await c.cmd(f"AUTH PLAIN {plain('bob@example.test', 'battery staple')}")
    assert (reply.code, reply.enhanced) == (454, "4.7.0"), reply
    c.close()
    c = await session(server, source="127.0.0.10")
    assert (await c.cmd(f"AUTH PLAIN {plain('bob@example.test', 'battery staple')}")).code == 235
    c.close()


async def test_no_password_reaches_the_log(elemta_server, caplog):
    caplog.set_level(logging.INFO)
    server = await elemta_server(plugins=[("users", Users())])
    c = await session(server)
    await c.cmd(f"AUTH PLAIN {plain('alice@example.test', 'hunter2-secret')}")
    await c.cmd("AUTH LOGIN")
    await c.cmd(b64("alice@example.test"))
    await c.cmd(b64("another-secret"))
    c.close()
    assert "hunter2-secret" not in caplog.text and "another-secret" not in caplog.text
    assert "authentication failed for alice@example.test (PLAIN" in caplog.text


# ------------------------------------------------------------------ start-up


async def test_start_up_warns_when_listeners_require_auth_nobody_checks(elemta_server, caplog):
    await elemta_server()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("submission", "smtps"):
        assert any(m.startswith(f"listener {name} requires AUTH, but no enabled plugin checks "
                                "logins") and "elemta users add" in m for m in warnings)
    assert not any(m.startswith("listener mx requires AUTH") for m in warnings)


async def test_start_up_is_quiet_when_a_plugin_checks_logins(elemta_server, caplog):
    await elemta_server(plugins=[("users", Users())])
    assert "requires AUTH, but" not in caplog.text


async def test_start_up_warns_about_plaintext_auth(elemta_server, caplog):
    server = await elemta_server({"listeners": [
        {"name": "plain", "address": "127.0.0.1:0", "mode": "submission", "tls": "none",
         "allow_plaintext_auth": True}]}, plugins=[("users", Users())])
    assert "listener plain offers AUTH before TLS (allow_plaintext_auth = true)" in caplog.text
    async with RawSMTP(server.port("plain")) as c:
        assert "AUTH SCRAM-SHA-256 PLAIN LOGIN" in (await c.cmd("EHLO c.example")).lines
        alice = plain("alice@example.test", "correct horse")
        assert (await c.cmd(f"AUTH PLAIN {alice}")).code == 235


# ------------------------------------------------------------------ submission headers


def _spooled_content(server) -> bytes:
    [path] = (server.spool_path / "messages").iterdir()
    return path.read_bytes()


async def _submit(server, listener: str, data: bytes) -> bytes:
    if listener == "mx":
        c = RawSMTP(server.port("mx"))
        await c.connect()
        await c.cmd("EHLO client.example")
    else:
        c = await session(server, listener=listener)
        alice = plain("alice@example.test", "correct horse")
        assert (await c.cmd(f"AUTH PLAIN {alice}")).code == 235
    reply = await c.send_message("alice@example.test", ["bob@example.test"], data)
    assert reply.code == 250, reply
    c.close()
    server.app.spool.wait_written()
    return _spooled_content(server)


BARE = b"From: alice@example.test\r\nSubject: no id\r\n\r\nhello\r\n.\r\n"


async def test_submission_adds_a_missing_message_id_and_date(elemta_server):
    server = await elemta_server(plugins=[("users", Users())])
    raw = await _submit(server, "submission", BARE)
    head = raw.split(b"\r\n\r\n")[0].decode().replace("\r\n", "\n")
    assert re.search(r"^Message-ID: <[0-9A-Z]{20}@mx\.example\.test>$", head, re.M), head
    assert re.search(r"^Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$", head, re.M), head


async def test_submission_keeps_the_message_id_and_date_it_has(elemta_server):
    server = await elemta_server(plugins=[("users", Users())])
    data = (b"From: alice@example.test\r\nMessage-ID: <own@client>\r\n"
            b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\nhello\r\n.\r\n")
    head = (await _submit(server, "submission", data)).split(b"\r\n\r\n")[0]
    assert head.count(b"Message-ID:") == 1 and head.count(b"Date:") == 1


async def test_an_mx_passes_mail_on_as_it_came(elemta_server):
    server = await elemta_server()
    head = (await _submit(server, "mx", BARE)).split(b"\r\n\r\n")[0]
    assert b"Message-ID:" not in head and b"\r\nDate:" not in head


async def test_received_can_hide_the_submitting_client(elemta_server):
    server = await elemta_server({"listeners": [
        {"name": "hidden", "address": "127.0.0.1:0", "mode": "submission",
         "received_hide_client": True}]}, plugins=[("users", Users())])
    raw = await _submit(server, "hidden", BARE)
    received = raw.split(b"\r\n\t")[0]
    assert received == b"Received: from authenticated-user (hidden)", received
    assert b"127.0.0.1" not in raw.split(b"\r\n\r\n")[0]


# ------------------------------------------------------------------ which mechanisms


class LdapLike:
    """Checks passwords, has SCRAM keys in some configurations only: not in this one."""

    @hookimpl
    def auth_mechanisms(self):
        return ["PLAIN", "LOGIN"]

    @hookimpl
    def auth(self, credentials):
        if credentials.password == "correct horse":
            return Accept(identity=credentials.login.lower())
        return None

    @hookimpl
    def scram_keys(self, login):
        raise AssertionError("never asked: SCRAM-SHA-256 is not offered")


async def test_hook_auth_mechanisms(elemta_server):
    server = await elemta_server(plugins=[("ldaplike", LdapLike())])
    c = await session(server)
    assert "AUTH PLAIN LOGIN" in (await c.cmd("EHLO client.example")).lines
    assert (await c.cmd("AUTH SCRAM-SHA-256")).code == 504
    # Accept(identity=...) names the session
    assert (await c.cmd(f"AUTH PLAIN {plain('Alice@Example.TEST', 'correct horse')}")).code == 235
    [proto] = server.app.smtp.sessions
    assert proto.conn.auth_user == "alice@example.test"
    c.close()


async def test_plugins_add_up_their_mechanisms(elemta_server):
    server = await elemta_server(plugins=[("ldaplike", LdapLike()), ("users", Users())])
    c = await session(server)
    assert "AUTH SCRAM-SHA-256 PLAIN LOGIN" in (await c.cmd("EHLO client.example")).lines
    c.close()


async def test_a_mechanism_elemta_does_not_speak_is_logged_and_ignored(elemta_server, caplog):
    class Fancy:
        @hookimpl
        def auth_mechanisms(self):
            return ["CRAM-MD5", "PLAIN"]

        @hookimpl
        def auth(self, credentials):
            return None

    server = await elemta_server(plugins=[("fancy", Fancy())])
    assert "plugin fancy names SASL mechanisms Elemta does not speak: CRAM-MD5" in caplog.text
    c = await session(server)
    assert "AUTH PLAIN" in (await c.cmd("EHLO client.example")).lines
    c.close()


async def test_mail_from_with_auth_parameter_is_accepted(elemta_server):
    """RFC 4954 §5: AUTH=<> (or an address) on MAIL FROM is accepted and not trusted."""
    server = await elemta_server(plugins=[("users", Users())])
    c = await session(server)
    assert (await c.cmd(f"AUTH PLAIN {plain('alice@example.test', 'correct horse')}")).code == 235
    assert (await c.cmd("MAIL FROM:<alice@example.test> AUTH=<>")).code == 250
    assert (await c.cmd("RSET")).code == 250
    assert (await c.cmd("MAIL FROM:<alice@example.test> AUTH=alice@example.test")).code == 250
    c.close()
