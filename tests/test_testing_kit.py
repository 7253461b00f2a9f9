"""The plugin author's kit: ``elemta plugin new``, the outbox, send_mail, and the fixtures
without the test extras."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib

import pytest

from elemta import Accept, Reject, hookimpl
from elemta.cli.scaffold import write_package
from elemta.testing import Outbox, data_bytes, run_cli, send_mail

from .test_docs import readme_problems


# ------------------------------------------------------------------ elemta plugin new


def test_plugin_new_writes_a_package_in_the_house_shape(tmp_path):
    result = run_cli("plugin", "new", "spam_score", "--directory", str(tmp_path))

    assert result.exit_code == 0, result.stderr
    root = tmp_path / "elemta-spam-score"
    assert f"created {root}" in result.stdout
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "elemta-spam-score"
    assert meta["project"]["entry-points"]["elemta"] == {
        "spam_score": "elemta_spam_score:SpamScorePlugin"}
    assert sorted(p.name for p in (root / "elemta_spam_score").iterdir()) == [
        "__init__.py", "rules.py", "settings.py"]
    sys.path.insert(0, str(root))
    try:
        from elemta_spam_score import SpamScorePlugin
        assert readme_problems(root, SpamScorePlugin()) == []
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.startswith("elemta_spam_score")]:
            del sys.modules[name]


def test_the_scaffolds_own_tests_pass_once_it_is_installed(tmp_path):
    root = write_package("greeter", tmp_path, "0.1.0")
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(root)], capture_output=True, text=True, timeout=180)
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout


@pytest.mark.parametrize("name, says", [
    ("Greylist", "is not a plugin name"),
    ("spam-score", "is not a plugin name"),
    ("9lives", "is not a plugin name"),
])
def test_plugin_new_refuses_a_bad_name(tmp_path, name, says):
    result = run_cli("plugin", "new", name, "--directory", str(tmp_path))
    assert result.exit_code == 2 and says in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_plugin_new_does_not_overwrite_a_folder(tmp_path):
    (tmp_path / "elemta-greeter").mkdir()
    result = run_cli("plugin", "new", "greeter", "--directory", str(tmp_path))
    assert result.exit_code == 2 and "exists already" in result.stderr


# ------------------------------------------------------------------ outbox and send_mail


class Scanner:
    @hookimpl
    def data(self, message):
        message.add_header("X-Scanned", "yes")

    @hookimpl
    def rcpt(self, recipient):
        if recipient.address.startswith("nobody@"):
            return Reject(550, "5.1.1", "No such user")
        return None


async def test_the_outbox_captures_the_final_message_and_its_envelope(elemta_server,
                                                                      elemta_outbox):
    server = await elemta_server({"server": {"relay_networks": ["127.0.0.0/8"]}},
                                 plugins=[("scanner", Scanner())], outbox=elemta_outbox)

    sent = await send_mail(server, "a@example.org", ["user@example.test", "far@remote.example"],
                           "Subject: hi\n\n.leading dot\nbody\n")

    assert sent.accepted and sent.queue_id
    captured = await elemta_outbox.wait(2)
    by_route = {m.route.transport: m for m in captured}
    assert set(by_route) == {"local", "smtp"}
    assert by_route["local"].recipients == ["user@example.test"]
    for message in captured:
        assert message.envelope.id == sent.queue_id and message.sender == "a@example.org"
        assert message.header("X-Scanned") == "yes"
        assert message.header("Received") is not None
        assert message.content.endswith(b"\r\n\r\n.leading dot\r\nbody\r\n")
    assert elemta_outbox.to("far@remote.example") == [by_route["smtp"]]


async def test_send_mail_returns_a_refusal_instead_of_raising(elemta_server):
    server = await elemta_server(plugins=[("scanner", Scanner())])
    sent = await send_mail(server, "a@example.org", ["nobody@example.test"], "Subject: x\n\nx\n")
    assert sent.reply.code == 550 and sent.queue_id is None
    assert [r.code for r in sent.replies] == [220, 250, 250, 550]


async def test_send_mail_over_starttls_with_auth_and_over_implicit_tls(elemta_server):
    class Login:
        @hookimpl
        def auth(self, credentials):
            return Accept() if credentials.password == "secret" else None

    server = await elemta_server(plugins=[("login", Login())])
    sent = await send_mail(server, "me@example.test", ["far@remote.example"], "Subject: x\n\nx\n",
                           listener="submission", starttls=True, auth=("me", "secret"))
    assert sent.accepted, sent.replies
    sent = await send_mail(server, "me@example.test", ["far@remote.example"], "Subject: x\n\nx\n",
                           listener="smtps", implicit_tls=True, auth=("me", "wrong"))
    assert sent.reply.code == 535


def test_data_bytes_makes_crlf_and_dot_stuffs():
    assert data_bytes("a\n.b\nc") == b"a\r\n..b\r\nc\r\n.\r\n"
    assert data_bytes(b"a\r\n") == b"a\r\n.\r\n"


def test_an_outbox_is_a_valid_plugin():
    import pluggy

    from elemta import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(Outbox(), name="outbox")
    pm.check_pending()


# ------------------------------------------------------------------ without the test extras


BLOCKER = textwrap.dedent('''
    import sys

    # None in sys.modules: importing these raises ModuleNotFoundError, as if not installed
    for name in ("pytest_asyncio", "dnslib", "aiosmtplib", "trustme", "hypothesis"):
        sys.modules[name] = None

    import pytest
    sys.exit(pytest.main(sys.argv[1:]))
''')


def test_the_fixtures_load_without_the_test_extras(tmp_path):
    """pytest still runs; a test asking for a fixture that needs a missing library says
    which pip install to run, and the others pass."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent('''
        import elemta.testing

        def test_plain():
            assert elemta.testing.RawSMTP is not None

        def test_server(elemta_server):
            pass

        def test_dns(dns_server):
            pass

        def test_zone_server_import():
            try:
                elemta.testing.ZoneServer
            except ImportError as e:
                assert "pip install 'elemta[test]'" in str(e)
            else:
                raise AssertionError("dnslib is blocked in this run")
    '''))
    (tmp_path / "run.py").write_text(BLOCKER)
    # only Elemta's own pytest plugin, as in an environment where the others are missing
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = subprocess.run(
        [sys.executable, "run.py", "-q", "-p", "no:cacheprovider", "-p", "elemta.testing.fixtures",
         "test_sample.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert "2 passed" in out and "2 errors" in out, out
    assert "the elemta_server fixture needs pytest-asyncio, which is not installed: " \
           "pip install 'elemta[test]'" in out
    assert "the dns_server fixture needs dnslib, which is not installed" in out
