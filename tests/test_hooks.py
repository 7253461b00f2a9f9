"""Every hook of the contract, exercised through a real server, and the dispatcher's rules."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request

import prometheus_client
import pydantic
import pytest

from elemta import (Accept, AuthResult, Discard, Disconnect, Quarantine, Reject, TempFail,
                    hookimpl)
from elemta.app import App, StartupError
from elemta.config import ConfigError, load_settings
from elemta.plugins import PluginLoadError
from elemta.testing.client import RawSMTP, unverified_context
from elemta.testing.fixtures import write_config

from .test_smtp import MSG, content, plain, spooled


async def send(server, sender="a@b.example", rcpts=("u@example.test",), data=MSG,
               listener="mx"):
    async with RawSMTP(server.port(listener)) as c:
        await c.cmd("EHLO client.example")
        return await c.send_message(sender, list(rcpts), data)


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


# ------------------------------------------------------------------ SMTP stages


async def test_hook_connect(elemta_server):
    class Gate:
        @hookimpl
        def connect(self, session):
            if session.listener.name == "mx":
                return Reject(554, "5.7.1", "You are not welcome")
            return Accept(headers=(("X-Connect", session.peer_ip),))

    server = await elemta_server(plugins=[("gate", Gate())])
    async with RawSMTP(server.port("mx")) as c:
        assert str(c.greeting) == "554 5.7.1 You are not welcome"
        assert str(await c.cmd("EHLO client.example")).startswith("503 5.5.1")
        assert (await c.cmd("NOOP")).code == 250
        assert (await c.cmd("QUIT")).code == 221
    c = RawSMTP(server.port("submission"))
    assert (await c.connect()).code == 220
    c.close()


async def test_connect_accept_headers_reach_every_message(elemta_server):
    class Tag:
        @hookimpl
        async def connect(self, session):
            return Accept(headers=(("X-Connect", session.peer_ip),))

    server = await elemta_server(plugins=[("tag", Tag())])
    assert (await send(server)).code == 250
    [env] = spooled(server)
    assert b"\r\nX-Connect: 127.0.0.1\r\n" in header_block(content(server, env["id"]))


async def test_connect_disconnect_and_tempfail_close_the_connection(elemta_server):
    answers = iter([Disconnect(421, "4.7.0", "Go away"), TempFail(451, "4.7.1", "Busy")])

    class Gate:
        @hookimpl
        def connect(self):
            return next(answers)

    server = await elemta_server(plugins=[("gate", Gate())])
    for expected in ("421 4.7.0 Go away", "421 4.7.1 Busy"):
        c = RawSMTP(server.port("mx"))
        assert str(await c.connect()) == expected
        assert await c.closed()


async def test_hook_helo(elemta_server):
    seen = []

    class HeloCheck:
        @hookimpl
        def helo(self, session, hostname):
            seen.append((hostname, session.esmtp))
            if hostname == "localhost":
                return Reject(550, "5.7.1", "Liar")
            return None

    server = await elemta_server(plugins=[("helo", HeloCheck())])
    async with RawSMTP(server.port("mx")) as c:
        assert str(await c.cmd("EHLO localhost")) == "550 5.7.1 Liar"
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 503, "no HELO name recorded"
        assert (await c.cmd("HELO honest.example")).code == 250
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 250
    assert seen == [("localhost", True), ("honest.example", False)]


async def test_hook_auth(elemta_server):
    calls = []

    class Datasource:
        @hookimpl
        async def auth(self, session, mechanism, credentials):
            calls.append((mechanism, credentials.login, session.tls is not None))
            if credentials.password == "down":
                return TempFail(454, "4.7.0", "Directory unavailable")
            return Accept() if credentials.password == "secret" else Reject(535, "5.7.8", "no")

    server = await elemta_server(plugins=[("ds", Datasource())])
    async with RawSMTP(server.port("smtps"), tls=unverified_context()) as c:
        await c.cmd("EHLO client.example")
        assert str(await c.cmd(f"AUTH PLAIN {plain('bob', 'down')}")).startswith("454 4.7.0")
        assert str(await c.cmd(f"AUTH PLAIN {plain('bob', 'bad')}")).startswith("535 5.7.8")
        assert (await c.cmd(f"AUTH PLAIN {plain('bob', 'secret')}")).code == 235
    assert calls == [("PLAIN", "bob", True)] * 3


async def test_credentials_repr_hides_the_password():
    from elemta import Credentials

    assert "hunter2" not in repr(Credentials("PLAIN", "bob", "hunter2"))


async def test_hook_mail(elemta_server):
    class SenderPolicy:
        @hookimpl
        def mail(self, session, tx, sender, params):
            assert tx.sender == sender
            if sender.endswith("@spam.example"):
                return Reject(550, "5.7.1", "Sender refused")
            if sender == "":
                return TempFail(451, "4.7.1", "Bounces later please")
            if "SIZE" in params:
                return Accept(headers=(("X-Declared-Size", params["SIZE"]),))
            return None

    server = await elemta_server(plugins=[("sender", SenderPolicy())])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert str(await c.cmd("MAIL FROM:<x@spam.example>")) == "550 5.7.1 Sender refused"
        assert str(await c.cmd("MAIL FROM:<>")) == "451 4.7.1 Bounces later please"
        assert (await c.send_message("a@b.example", ["u@example.test"], MSG)).code == 250
        await c.cmd("MAIL FROM:<a@b.example> SIZE=40")
        await c.cmd("RCPT TO:<u@example.test>")
        await c.cmd("DATA")
        await c.send(MSG)
        assert (await c.read_reply()).code == 250
    heads = [header_block(content(server, e["id"])) for e in spooled(server)]
    assert sum(b"X-Declared-Size: 40" in h for h in heads) == 1


async def test_hook_rcpt(elemta_server):
    class Directory:
        @hookimpl
        def rcpt(self, session, tx, recipient, params):
            if recipient.address == "partner@elsewhere.example":
                return Accept()
            if recipient.domain == "example.test" and recipient.address.startswith("ghost"):
                return Reject(550, "5.1.1", "No such user")
            return None

    server = await elemta_server(plugins=[("dir", Directory())])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        assert (await c.cmd("RCPT TO:<partner@elsewhere.example>")).code == 250
        assert str(await c.cmd("RCPT TO:<ghost@example.test>")) == "550 5.1.1 No such user"
        assert str(await c.cmd("RCPT TO:<other@elsewhere.example>")) == "550 5.7.1 Relaying denied"
        assert (await c.cmd("RCPT TO:<real@example.test>")).code == 250


async def test_rcpt_rewrite_spools_the_final_recipients(elemta_server):
    class Aliases:
        @hookimpl
        def rcpt(self, recipient):
            if recipient.address == "team@example.test":
                recipient.rewrite(["alice@example.test", "bob@example.test",
                                   "carol@partner.example"])
                return Accept()
            if recipient.address == "broken@example.test":
                recipient.rewrite(["not an address"])
            return None

    server = await elemta_server(plugins=[("aliases", Aliases())])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        assert (await c.cmd("RCPT TO:<Alice@example.test>")).code == 250
        assert (await c.cmd("RCPT TO:<team@example.test>")).code == 250
        r = await c.cmd("RCPT TO:<broken@example.test>")
        assert (r.code, r.enhanced) == (451, "4.3.0"), "a bad rewrite is a plugin failure"
        assert (await c.cmd("RCPT TO:<alice@example.test>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(MSG)
        assert (await c.read_reply()).code == 250
    [env] = spooled(server)
    assert [(r["address"], r["original"]) for r in env["recipients"]] == [
        ("Alice@example.test", None),           # the second alice is the same mailbox
        ("bob@example.test", "team@example.test"),
        ("carol@partner.example", "team@example.test"),
    ]


async def test_hook_message_auth(elemta_server):
    class SPF:
        @hookimpl
        async def message_auth(self, session, tx, message):
            await asyncio.sleep(0.3)
            return AuthResult("spf", "pass", properties={"smtp.mailfrom": tx.sender_domain})

    class DKIM:
        @hookimpl
        async def message_auth(self, message):
            await asyncio.sleep(0.3)
            return [AuthResult("dkim", "fail", reason="signature did not verify",
                               properties={"header.d": "b.example"}),
                    AuthResult("dkim", "none")]

    server = await elemta_server(plugins=[("spf", SPF()), ("dkim", DKIM())])
    start = time.monotonic()
    assert (await send(server)).code == 250
    assert time.monotonic() - start < 0.55, "message_auth implementations run concurrently"
    [env] = spooled(server)
    head = header_block(content(server, env["id"])).decode()
    assert ("Authentication-Results: mx.example.test;\r\n\tspf=pass smtp.mailfrom=b.example;"
            "\r\n\tdkim=fail reason=\"signature did not verify\" header.d=b.example;"
            "\r\n\tdkim=none") in head


async def test_message_auth_answers_keep_plugin_order_whether_or_not_they_wait(elemta_server):
    """Calls that answer at once (a plain def, an async def that never waits) and calls
    that wait are collected in plugin order; the waiting ones still overlap."""
    class Plain:
        @hookimpl
        def message_auth(self):
            return AuthResult("arc", "none")

    class Cached:
        @hookimpl
        async def message_auth(self):
            return AuthResult("spf", "pass")

    def waiting(method, seconds):
        class Waits:
            @hookimpl
            async def message_auth(self):
                await asyncio.sleep(seconds)
                return AuthResult(method, "pass")
        return Waits()

    server = await elemta_server(plugins=[("w1", waiting("dkim", 0.3)), ("plain", Plain()),
                                          ("cached", Cached()), ("w2", waiting("iprev", 0.3))])
    start = time.monotonic()
    assert (await send(server)).code == 250
    assert time.monotonic() - start < 0.55
    [env] = spooled(server)
    head = header_block(content(server, env["id"])).decode()
    assert ("mx.example.test;\r\n\tdkim=pass;\r\n\tarc=none;\r\n\tspf=pass;"
            "\r\n\tiprev=pass") in head


async def test_a_plugin_failing_at_once_lets_the_waiting_ones_finish(elemta_server, caplog):
    finished = []

    class Fails:
        @hookimpl
        async def message_auth(self):
            raise ValueError("parser bug")

    class Waits:
        @hookimpl
        async def message_auth(self):
            await asyncio.sleep(0.1)
            finished.append(True)
            return AuthResult("spf", "pass")

    server = await elemta_server(plugins=[("waits", Waits()), ("fails", Fails())])
    assert str(await send(server)).startswith("451 4.3.0")
    assert finished == [True] and spooled(server) == []
    assert "plugin fails raised in hook message_auth: ValueError: parser bug" in caplog.text


async def test_a_plugin_that_waits_twice_is_still_under_its_time_limit(elemta_server, caplog):
    class Hangs:
        @hookimpl
        async def message_auth(self):
            await asyncio.sleep(0)      # its first step ends here; the limit still holds
            await asyncio.sleep(60)

    server = await elemta_server({"plugins": {"timeouts": {"bad": 0.3}}},
                                 plugins=[("bad", Hangs())])
    start = time.monotonic()
    assert str(await send(server)).startswith("451 4.3.0")
    assert time.monotonic() - start < 5
    assert "plugin bad timed out in hook message_auth after 0.3s" in caplog.text


async def test_hook_data(elemta_server):
    seen = []

    class Filter:
        @hookimpl
        def message_auth(self):
            return AuthResult("spf", "softfail")

        @hookimpl
        def data(self, session, tx, message, auth_results):
            seen.append([r.result for r in auth_results])
            subject = message.header("Subject")
            if subject == "reject":
                return Reject(554, "5.7.1", "Content refused")
            if subject == "discard":
                return Discard("silently dropped")
            if subject == "hold":
                return Quarantine("looks odd")
            auth_results.append(AuthResult("dmarc", "none", properties={"header.from": "b.example"}))
            return Accept(headers=(("X-Filter", "clean"),))

    server = await elemta_server(plugins=[("filter", Filter())])
    assert str(await send(server, data=b"Subject: reject\r\n\r\nx\r\n.\r\n")) == \
        "554 5.7.1 Content refused"
    assert (await send(server, data=b"Subject: discard\r\n\r\nx\r\n.\r\n")).code == 250
    assert (await send(server, data=b"Subject: hold\r\n\r\nx\r\n.\r\n")).code == 250
    assert (await send(server, data=b"Subject: fine\r\n\r\nx\r\n.\r\n")).code == 250
    assert seen == [["softfail"]] * 4
    [held] = spooled(server, "hold")
    assert held["hold_reason"] == "looks odd"
    [ready] = spooled(server)
    head = header_block(content(server, ready["id"])).decode()
    assert "X-Filter: clean" in head
    assert "dmarc=none header.from=b.example" in head
    assert len(list((server.spool_path / "messages").iterdir())) == 2


async def test_hook_received_header(elemta_server):
    class Private:
        @hookimpl
        def received_header(self, session, tx, message):
            return "" if session.listener.name == "mx" else f"by private id {tx.id}"

    server = await elemta_server(plugins=[("private", Private())])
    assert (await send(server)).code == 250
    [env] = spooled(server)
    assert not content(server, env["id"]).startswith(b"Received:")


async def test_hook_authentication_results_header(elemta_server):
    class Custom:
        @hookimpl
        def authentication_results_header(self, session, tx, message, auth_results):
            return f"{session.listener.name}.example.test; none"

    server = await elemta_server(plugins=[("custom", Custom())])
    forged = (b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.example\r\n"
              b"Authentication-Results: (comment) MX.example.test;\r\n spf=pass\r\n"
              b"Authentication-Results: upstream.example; spf=fail\r\n"
              b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert (await send(server, data=forged)).code == 250
    [env] = spooled(server)
    head = header_block(content(server, env["id"])).decode()
    assert "Authentication-Results: mx.example.test; none" in head
    assert "bank.example" not in head and "spf=pass" not in head, "forgeries removed"
    assert "Authentication-Results: upstream.example; spf=fail" in head, "others kept"


async def test_hook_queued(elemta_server):
    seen = []

    class Watcher:
        @hookimpl
        async def queued(self, session, tx, envelope):
            # durable in the journal already; the files may still be on their way
            seen.append((envelope.id == tx.id, server.app.spool.awaiting_checkpoint(envelope.id),
                         envelope.sender))
            raise RuntimeError("a failing notifier does not undo the acceptance")

    server = await elemta_server(plugins=[("watch", Watcher())])
    assert (await send(server)).code == 250
    assert seen == [(True, True, "a@b.example")]
    [env] = spooled(server)
    assert env["sender"] == "a@b.example"


async def test_hook_disconnect(elemta_server):
    gone = asyncio.Event()
    seen = []

    class Watcher:
        @hookimpl
        def disconnect(self, session):
            seen.append((session.helo, session.transactions))
            gone.set()

    server = await elemta_server(plugins=[("watch", Watcher())])
    assert (await send(server)).code == 250
    await asyncio.wait_for(gone.wait(), 5)
    assert seen == [("client.example", 1)]


# ------------------------------------------------------------------ lifecycle


class GreylistSettings(pydantic.BaseModel):
    delay_seconds: int = 300
    networks: list[str] = []


class Configured:
    def __init__(self) -> None:
        self.app = None

    @hookimpl
    def register_config(self):
        return {"greylist": GreylistSettings}

    @hookimpl
    def startup(self, app):
        self.app = app


async def test_hook_register_config(elemta_server, tmp_path):
    plugin = Configured()
    server = await elemta_server({"plugins": {"greylist": {"delay_seconds": 5}}},
                                 plugins=[("greylist", plugin)])
    assert plugin.app is server.app
    assert server.app.plugin_settings("greylist").delay_seconds == 5

    bad = load_settings(write_config(tmp_path / "bad", {"plugins": {"greylist": {"delay": 5}}}))
    with pytest.raises(ConfigError) as e:
        App(bad, extra_plugins=[("greylist", Configured())])
    assert 'plugins.greylist.delay: unknown key; did you mean "delay_seconds"?' in str(e.value)
    orphan = load_settings(write_config(tmp_path / "orphan", {"plugins": {"greylst": {"x": 1}}}))
    with pytest.raises(ConfigError) as e:
        App(orphan, extra_plugins=[("greylist", Configured())])
    assert "[plugins.greylst]: unknown plugin table; did you mean [plugins.greylist]?" in str(e.value)


def test_hook_register_commands(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "site" / "sampleplugins"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "hello.py").write_text(
        "import click\nfrom elemta import hookimpl\n\n"
        "@click.command()\n@click.argument('name')\n"
        "def hello(name):\n    click.echo(f'hello {name}')\n\n"
        "@hookimpl\ndef register_commands(cli):\n    cli.add_command(hello)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    config = write_config(tmp_path / "cfg", {"plugins": {"enabled": ["sampleplugins.hello"]}})
    from elemta.cli import run

    with pytest.raises(SystemExit) as e:
        run(["--config", str(config), "hello", "world"])
    assert e.value.code == 0
    assert capsys.readouterr().out == "hello world\n"
    sys.modules.pop("sampleplugins.hello", None)


async def test_hook_register_metrics(elemta_server):
    class Counting:
        def __init__(self):
            self.counter = None

        @hookimpl
        def register_metrics(self, registry):
            self.counter = prometheus_client.Counter("greylist_deferred", "Deferred by greylist",
                                                     registry=registry)

        @hookimpl
        def rcpt(self):
            self.counter.inc()

    server = await elemta_server(plugins=[("count", Counting())])
    assert (await send(server)).code == 250
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
    assert "greylist_deferred_total 1.0" in body
    assert 'smtp_messages_received_total{domain="example.test",listener="mx"} 1.0' in body
    assert 'elemta_spool_messages{state="ready"} 1.0' in body
    assert 'smtp_hook_duration_seconds_count{hook="rcpt",plugin="count"} 1.0' in body


async def test_hook_startup(tmp_path):
    order = []

    class A:
        @hookimpl
        async def startup(self, app):
            order.append(("a", app.servers == {}))

    class Broken:
        @hookimpl
        def startup(self, app):
            raise OSError("cannot reach redis")

    settings = load_settings(write_config(tmp_path / "s"))
    app = App(settings, extra_plugins=[("a", A())])
    await app.start()
    await app.stop(grace=1)
    assert order == [("a", True)], "startup runs before the listeners open"
    app = App(settings, extra_plugins=[("broken", Broken())])
    with pytest.raises(StartupError, match="plugin broken failed to start: OSError: cannot reach redis"):
        await app.start()


async def test_hook_shutdown(tmp_path):
    order = []

    class P:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def shutdown(self, app):
            order.append((self.name, app.smtp.sessions == set()))

    settings = load_settings(write_config(tmp_path / "s"))
    app = App(settings, extra_plugins=[("one", P("one")), ("two", P("two"))])
    await app.start()
    await app.stop(grace=1)
    assert order[:2] == [("two", True), ("one", True)], "reverse order, after sessions ended"


# ------------------------------------------------------------------ dispatcher rules


class Raises:
    @hookimpl
    def rcpt(self, recipient):
        raise KeyError("boom")


class Hangs:
    @hookimpl
    async def rcpt(self):
        await asyncio.sleep(60)


class WrongType:
    @hookimpl
    def rcpt(self):
        return "OK"


@pytest.mark.parametrize("plugin, logged", [
    (Raises(), "plugin bad raised in hook rcpt: KeyError: 'boom'"),
    (Hangs(), "plugin bad timed out in hook rcpt after 0.3s"),
    (WrongType(), "plugin bad returned 'OK' from hook rcpt"),
])
async def test_a_failing_plugin_is_a_temporary_failure_never_a_pass(elemta_server, caplog,
                                                                     plugin, logged):
    server = await elemta_server({"plugins": {"timeouts": {"bad": 0.3}}}, plugins=[("bad", plugin)])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        reply = await c.cmd("RCPT TO:<u@example.test>")
        assert reply.code == 451 and reply.enhanced == "4.3.0"
        assert (await c.cmd("NOOP")).code == 250
    assert logged in caplog.text
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
    assert ('smtp_messages_rejected_total{code="451",domain="none",plugin="bad",'
            'reason="tempfail",stage="rcpt"} 1.0') in body


async def test_a_failing_data_plugin_spools_nothing(elemta_server):
    class Crash:
        @hookimpl
        async def message_auth(self, message):
            raise ValueError("parser bug")

    server = await elemta_server(plugins=[("crash", Crash())])
    reply = await send(server)
    assert str(reply).startswith("451 4.3.0")
    assert spooled(server) == []
    assert list((server.spool_path / "messages").iterdir()) == []


async def test_first_verdict_wins_in_configured_order(elemta_server):
    calls = []

    def plugin(name, verdict):
        class P:
            @hookimpl
            def mail(self):
                calls.append(name)
                return verdict
        return P()

    server = await elemta_server(plugins=[("one", plugin("one", None)),
                                          ("two", plugin("two", TempFail(450, "4.2.0", "Two"))),
                                          ("three", plugin("three", Reject()))])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert str(await c.cmd("MAIL FROM:<a@b.example>")) == "450 4.2.0 Two"
    assert calls == ["one", "two"]


def test_misspelled_hook_is_an_error_at_start_up(tmp_path):
    class Typo:
        @hookimpl
        def rcpt_to(self, recipient):
            return None

    settings = load_settings(write_config(tmp_path / "s"))
    with pytest.raises(PluginLoadError, match="rcpt_to"):
        App(settings, extra_plugins=[("typo", Typo())])


def test_enabled_plugin_not_installed_names_the_fix(tmp_path):
    settings = load_settings(write_config(tmp_path / "s",
                                          {"plugins": {"enabled": ["virusscan"]}}))
    with pytest.raises(PluginLoadError) as e:
        App(settings)
    msg = str(e.value)
    assert "[plugins] enabled" in msg and "'virusscan' is not installed" in msg
    assert "pip install elemta-virusscan" in msg


def test_load_plugins_environment_overrides_the_list(tmp_path, monkeypatch):
    settings = load_settings(write_config(tmp_path / "s",
                                          {"plugins": {"enabled": ["virusscan"]}}))
    monkeypatch.setenv("ELEMTA_LOAD_PLUGINS", "")
    app = App(settings)
    assert app.plugin_order[0] == "elemta.default_relay"


def test_verdicts_validate_their_reply_codes():
    with pytest.raises(ValueError):
        Reject(450, "4.7.1", "x")
    with pytest.raises(ValueError):
        TempFail(451, "5.7.1", "x")
    with pytest.raises(ValueError):
        Reject(550, "5.7.1", "two\r\nlines")


def test_verdict_headers_cannot_inject_fields():
    with pytest.raises(ValueError):
        Accept(headers=(("X-Test", "a\r\nBcc: victim@example.test"),))
    with pytest.raises(ValueError):
        Quarantine("x", headers=(("Bad Name", "v"),))
    assert Accept(headers=(("X-Test", "folded\r\n\tcontinuation"),)).headers


async def test_an_async_hook_call_is_timed_once(elemta_server):
    class Slow:
        @hookimpl
        async def mail(self):
            await asyncio.sleep(0.05)

    server = await elemta_server(plugins=[("slow", Slow())])
    assert (await send(server)).code == 250
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
    assert 'smtp_hook_duration_seconds_count{hook="mail",plugin="slow"} 1.0' in body
    total = float(body.split('smtp_hook_duration_seconds_sum{hook="mail",plugin="slow"} ')[1]
                  .split()[0])
    assert total >= 0.05


async def test_hook_rcpt_ok(elemta_server):
    """Asked only for recipients the rcpt stage accepted, whatever the plugin order."""
    from elemta import Accept, Reject, TempFail, hookimpl
    from elemta.testing import RawSMTP

    seen: list[str] = []

    class Greylistish:
        @hookimpl
        def rcpt_ok(self, recipient):
            seen.append(recipient.address)
            if recipient.address.startswith("later@"):
                return TempFail(451, "4.7.1", "Greylisted, try again later")
            return None

    class Directory:
        @hookimpl
        def rcpt(self, recipient):
            if recipient.address.startswith("nobody@"):
                return Reject(550, "5.1.1", "User unknown")
            return Accept()

    server = await elemta_server(plugins=[("greylistish", Greylistish()),
                                          ("directory", Directory())])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<s@origin.example>")
        assert (await c.cmd("RCPT TO:<nobody@example.test>")).code == 550
        assert str(await c.cmd("RCPT TO:<later@example.test>")).startswith("451 4.7.1 Greylisted")
        assert (await c.cmd("RCPT TO:<now@example.test>")).code == 250
        assert (await c.cmd("RCPT TO:<Postmaster>")).code == 250
    assert seen == ["later@example.test", "now@example.test"], "never the unknown, never postmaster"
