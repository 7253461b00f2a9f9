"""elemta.toml: typed settings, and errors that say what is wrong, where, and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from elemta.config import (ConfigError, Secret, load_settings, parse_settings,
                           validate_plugin_tables)

REPO = Path(__file__).resolve().parent.parent


def problems(text: str, name: str = "elemta.toml") -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_settings(text, Path(name))
    return e.value.problems


def test_shipped_config_is_valid_and_runnable_on_loopback():
    settings = load_settings(REPO / "elemta.toml")
    assert [(lst.name, lst.port) for lst in settings.listeners] == [
        ("mx", 2525), ("submission", 2587), ("smtps", 2465)]
    assert all(lst.host == "127.0.0.1" for lst in settings.listeners)
    # example.test is hosted by the datasource, which the shipped file enables with maildir
    assert settings.plugins.enabled == ("datasource", "maildir")
    assert settings.postmaster_address == "postmaster@example.test"
    assert settings.resolve(settings.spool.path) == REPO / "queue"
    assert settings.tls.min_version == "1.2"


def test_submission_listener_requires_tls_and_auth_by_default():
    s = parse_settings('[[listeners]]\nname = "sub"\naddress = "127.0.0.1:587"\n'
                       'mode = "submission"\n', Path("e.toml"))
    assert s.listeners[0].require_auth and s.listeners[0].require_tls
    s = parse_settings('[[listeners]]\nname = "mx"\naddress = "127.0.0.1:25"\n', Path("e.toml"))
    assert not s.listeners[0].require_auth and not s.listeners[0].require_tls


def test_unknown_key_names_file_key_and_suggestion():
    assert problems("[server]\nhostnme = \"mx\"\n") == [
        'elemta.toml: server.hostnme: unknown key; did you mean "hostname"?']
    assert problems("[spool]\ncommit = 3\n") == [
        'elemta.toml: spool.commit: unknown key; did you mean "commit_threads"?']
    assert problems("[bogus]\nx = 1\n")[0].startswith("elemta.toml: bogus: unknown key; valid keys")


@pytest.mark.parametrize("text, expected", [
    ("[server]\nmax_message_bytes = \"big\"\n", 'server.max_message_bytes: got "big"; write a whole number such as 25'),
    ("[server]\nmax_message_bytes = -1\n", "server.max_message_bytes: got -1; it must be greater than 0"),
    ("[server]\nhostname = \"has space\"\n", "server.hostname: hostname must be a DNS name"),
    ("[server]\nrelay_networks = [\"10.0.0.0/33\"]\n", "is not a network"),
    ("[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:99999\"\n", "port must be 0..65535"),
    ("[[listeners]]\nname = \"mx\"\naddress = \"localhost\"\n", 'address must be "host:port"'),
    ("[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:25\"\ntls = \"sometimes\"\n",
     "listeners[0].tls: got 'sometimes'; input should be 'none', 'starttls' or 'implicit'"),
    ("[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:25\"\ntls = \"none\"\nrequire_tls = true\n",
     'require_tls = true needs tls = "starttls" or "implicit"'),
    ("[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:25\"\n"
     "[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:26\"\n", "two listeners are called 'a'"),
    ("[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:25\"\n"
     "[[listeners]]\nname = \"b\"\naddress = \"127.0.0.1:25\"\n", "two listeners use 127.0.0.1:25"),
    ("[tls]\ncert_file = \"c.pem\"\n", "set both cert_file and key_file, or neither"),
    ("[plugins]\nenabled = [\"a\", \"a\"]\n", "plugin listed twice: a"),
    ("[plugins]\ntimeouts = { spf = -1 }\n", "plugins.timeouts.spf: got -1; it must be greater than 0"),
])
def test_wrong_values_are_explained(text, expected):
    found = problems(text)
    assert any(expected in p for p in found), found
    assert all(p.startswith("elemta.toml: ") for p in found)


def test_toml_syntax_error_gives_line_and_column():
    [problem] = problems("[server]\nhostname = \n")
    assert problem.startswith("elemta.toml:2:")
    assert "TOML syntax error" in problem


def test_missing_file_says_how_to_fix_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_settings(tmp_path / "nope.toml")
    assert "no such file" in str(e.value) and "--config" in str(e.value)


def test_local_domains_are_case_insensitive():
    s = parse_settings('[domains."Example.TEST."]\n', Path("e.toml"))
    assert s.local_domains == frozenset({"example.test"})


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "etc" / "elemta.toml"
    path.parent.mkdir()
    path.write_text('[spool]\npath = "spool"\n')
    s = load_settings(path)
    assert s.resolve(s.spool.path) == tmp_path / "etc" / "spool"


class DatasourceSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    password: Secret
    url: str = "sqlite:///users.db"


def plugin_settings(tmp_path: Path, table: str) -> DatasourceSettings:
    path = tmp_path / "elemta.toml"
    path.write_text(f"[plugins.datasource]\n{table}\n")
    return validate_plugin_tables(load_settings(path),
                                  {"datasource": DatasourceSettings})["datasource"]


def test_secret_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ELEMTA_TEST_DB_PASSWORD", "s3cret")
    s = plugin_settings(tmp_path, 'password = { env = "ELEMTA_TEST_DB_PASSWORD" }')
    assert s.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)


def test_secret_from_a_file_relative_to_the_config(tmp_path):
    (tmp_path / "db.secret").write_text("from-file\n")
    s = plugin_settings(tmp_path, 'password = { file = "db.secret" }')
    assert s.password.get_secret_value() == "from-file"


def test_secret_inline(tmp_path):
    assert plugin_settings(tmp_path, 'password = "inline"').password.get_secret_value() == "inline"


@pytest.mark.parametrize("table, expected", [
    ('password = { env = "ELEMTA_TEST_UNSET_VARIABLE" }',
     "plugins.datasource.password: environment variable ELEMTA_TEST_UNSET_VARIABLE is not set"),
    ('password = { file = "missing.secret" }', "cannot read secret file"),
    ('password = { vault = "x" }', 'a secret is a string, { env = "NAME" } or { file = "path" }'),
])
def test_secret_mistakes_are_explained(tmp_path, table, expected):
    with pytest.raises(ConfigError) as e:
        plugin_settings(tmp_path, table)
    assert expected in str(e.value)


def test_auth_lock_out_must_not_come_before_slowing_down():
    with pytest.raises(ConfigError, match=r"e\.toml: auth: lock_after_failures \(2\) must not "
                                          r"be below slow_after_failures \(3\)"):
        parse_settings("[auth]\nlock_after_failures = 2\n", Path("e.toml"))
