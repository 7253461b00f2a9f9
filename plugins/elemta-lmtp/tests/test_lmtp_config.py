"""``[plugins.lmtp]``: the address forms, the errors an operator sees, and the transport name."""

from __future__ import annotations

import pytest

from elemta import App, ConfigError, Envelope, RecipientState, Route, load_settings
from elemta_lmtp import LMTPAddress, LMTPSettings, parse_address


@pytest.mark.parametrize("value, expected", [
    ("unix:/var/run/dovecot/lmtp", LMTPAddress(path="/var/run/dovecot/lmtp")),
    ("unix:lmtp.sock", LMTPAddress(path="lmtp.sock")),
    ("127.0.0.1:24", LMTPAddress(host="127.0.0.1", port=24)),
    ("[::1]:2424", LMTPAddress(host="::1", port=2424)),
    ("dovecot:24", LMTPAddress(host="dovecot", port=24)),
])
def test_lmtp_address_forms(value, expected):
    assert parse_address(value) == expected


def test_lmtp_remote_names_the_protocol_and_the_address():
    assert parse_address("unix:/run/dovecot/lmtp").remote == "lmtp:unix:/run/dovecot/lmtp"
    assert parse_address("127.0.0.1:24").remote == "lmtp:127.0.0.1:24"
    assert parse_address("[::1]:24").remote == "lmtp:[::1]:24"


@pytest.mark.parametrize("value, hint", [
    ("unix:", "the unix socket path is missing"),
    ("/run/dovecot/lmtp", 'write "unix:/run/dovecot/lmtp"'),
    ("localhost", "got 'localhost'"),
    ("127.0.0.1:0", "got '127.0.0.1:0'"),
    ("127.0.0.1:lmtp", "got '127.0.0.1:lmtp'"),
    (":24", "got ':24'"),
])
def test_lmtp_bad_address_says_which_forms_are_accepted(value, hint):
    with pytest.raises(ValueError) as caught:
        parse_address(value)
    assert hint in str(caught.value)
    assert '"unix:PATH"' in str(caught.value) and '"host:port"' in str(caught.value)


def test_lmtp_settings_defaults():
    settings = LMTPSettings(address="unix:/run/dovecot/lmtp")
    assert (settings.transport, settings.lhlo_name, settings.connect_timeout_seconds,
            settings.command_timeout_seconds, settings.max_connections,
            settings.reuse_connections) == ("local", None, 30, 300, 10, True)


def config(elemta_config, table):
    return load_settings(elemta_config({"plugins": {"lmtp": table}}))


def test_lmtp_config_error_names_the_key_and_the_two_forms(elemta_config):
    settings = config(elemta_config, {"address": "/var/run/dovecot/lmtp"})
    with pytest.raises(ConfigError) as caught:
        App(settings, enabled=["lmtp"])
    [problem] = caught.value.problems
    assert "plugins.lmtp.address" in problem
    assert '"unix:/var/run/dovecot/lmtp"' in problem and '"host:port"' in problem


def test_lmtp_config_needs_an_address(elemta_config):
    with pytest.raises(ConfigError) as caught:
        App(config(elemta_config, {"transport": "local"}), enabled=["lmtp"])
    assert "plugins.lmtp.address: this key is required" in str(caught.value)


def test_lmtp_config_refuses_unknown_keys_with_a_suggestion(elemta_config):
    with pytest.raises(ConfigError) as caught:
        App(config(elemta_config, {"address": "127.0.0.1:24", "max_conections": 5}),
            enabled=["lmtp"])
    assert 'plugins.lmtp.max_conections: unknown key; did you mean "max_connections"?' in str(
        caught.value)


async def test_lmtp_answers_only_for_its_transport(elemta_config, tmp_path):
    settings = config(elemta_config, {"address": "unix:lmtp.sock", "transport": "dovecot"})
    app = App(settings, enabled=["lmtp"])
    plugin = app.pm.get_plugin("lmtp")
    plugin.startup(app)
    try:
        assert plugin.transport.target.path == str(settings.source.parent / "lmtp.sock")
        assert plugin.transport.lhlo == settings.server.hostname
        env = Envelope(id="Q1", sender="a@origin.example",
                       recipients=[RecipientState("bob@example.test")], received_at=0, size=1)
        for transport in ("local", "smtp"):
            route = Route(transport=transport, destination="example.test")
            assert await plugin.deliver(env, route, env.recipients, str(tmp_path / "m")) is None
    finally:
        await plugin.shutdown()
