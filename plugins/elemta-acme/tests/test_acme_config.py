"""The ``[plugins.acme]`` table: what it accepts, and what it says about mistakes."""

from __future__ import annotations

import pytest

from elemta import ConfigError
from elemta.testing import run_cli

from elemta_acme.settings import DIRECTORIES, AcmeSettings


def problems(elemta_config, table) -> str:
    config = elemta_config({"plugins": {"enabled": ["acme"], "acme": table}})
    result = run_cli("check-config", config=config)
    assert result.exit_code != 0, result.stdout
    return result.stdout + result.stderr


def test_defaults_are_lets_encrypt_production_ecdsa_and_http01():
    settings = AcmeSettings(names=["MX.Example.COM.", "mx.example.com", "smtp.example.com"])

    assert settings.names == ("mx.example.com", "smtp.example.com")
    assert settings.directory_url == DIRECTORIES["production"]
    assert settings.key_type == "ecdsa-p256"
    assert settings.challenges == ("http-01",)
    assert settings.http_bind == (None, 80) and settings.tls_alpn_bind == (None, 443)
    assert settings.renew_share == pytest.approx(1 / 3) and settings.renew_days is None
    assert settings.agree_terms is False and settings.ari is True


def test_staging_by_name_and_any_https_directory():
    assert AcmeSettings(names=["a.example.com"], directory="staging").directory_url == \
        DIRECTORIES["staging"]
    url = "https://acme.internal.example:9000/acme/directory"
    assert AcmeSettings(names=["a.example.com"], directory=url).directory_url == url


def test_an_internationalized_name_is_written_with_a_labels():
    assert AcmeSettings(names=["mail.bücher.example"]).names == ("mail.xn--bcher-kva.example",)


async def test_without_names_the_server_does_not_start(elemta_server):
    with pytest.raises(ConfigError) as e:
        await elemta_server(config={"plugins": {"enabled": ["acme"]}})
    assert "plugins.acme.names" in str(e.value)


@pytest.mark.parametrize("table,expected", [
    ({}, 'names = ["mx.example.com"]'),
    ({"names": "mx.example.com"}, "must be a list of host names"),
    ({"names": ["*.example.com"]}, "wildcard names need the DNS-01 challenge"),
    ({"names": ["192.0.2.25"]}, "is an IP address"),
    ({"names": ["localhost"]}, "not a fully-qualified name"),
    ({"names": ["mx_1.example.com"]}, "not a valid host name label"),
    ({"names": ["mx.example.com"], "email": "mailto:postmaster@example.com"},
     'without "mailto:"'),
    ({"names": ["mx.example.com"], "email": "postmaster"}, "is not an e-mail address"),
    ({"names": ["mx.example.com"], "directory": "http://acme.example/dir"},
     "runs over HTTPS only"),
    ({"names": ["mx.example.com"], "directory": "prod"}, '"production" or "staging"'),
    ({"names": ["mx.example.com"], "key_type": "rsa-1024"}, "key_type"),
    ({"names": ["mx.example.com"], "challenges": ["dns-01"]}, "challenges"),
    ({"names": ["mx.example.com"], "challenges": []}, "at least one challenge type"),
    ({"names": ["mx.example.com"], "http_address": "80"}, 'must be "host:port"'),
    ({"names": ["mx.example.com"], "tls_alpn_address": ":70000"}, "port must be 1..65535"),
    ({"names": ["mx.example.com"], "challenges": ["http-01", "tls-alpn-01"],
      "http_address": ":8443", "tls_alpn_address": ":8443"}, "the same address"),
    ({"names": ["mx.example.com"], "renew_share": 1.5}, "renew_share"),
    ({"names": ["mx.example.com"], "retry_initial_seconds": 600, "retry_max_seconds": 60},
     "retry_max_seconds (60) is below retry_initial_seconds (600)"),
    ({"names": ["mx.example.com"], "ca_file": "no-such-ca.pem"}, "no-such-ca.pem: no such file"),
    ({"names": ["mx.example.com"], "eab": {"kid": "k", "hmac_key": "not base64!"}},
     "base64url-encoded HMAC key"),
    ({"names": ["mx.example.com"], "eab": {"hmac_key": "c2VjcmV0"}}, "plugins.acme.eab.kid"),
    ({"names": ["mx.example.com"], "renew_before_days": 30}, "unknown key"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_mistakes_are_named_with_the_key_and_the_fix(elemta_config, table, expected):
    assert expected in problems(elemta_config, table)


def test_eab_hmac_key_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ACME_EAB_HMAC", "c2VjcmV0LWtleQ")
    settings = AcmeSettings.model_validate(
        {"names": ["mx.example.com"],
         "eab": {"kid": "kid-1", "hmac_key": {"env": "ACME_EAB_HMAC"}}})
    assert settings.eab.hmac_key.get_secret_value() == "c2VjcmV0LWtleQ"
    assert "c2VjcmV0" not in repr(settings)


def test_relative_paths_are_relative_to_the_config_file(elemta_config, tmp_path):
    config = elemta_config({"plugins": {"enabled": ["acme"], "acme": {
        "names": ["mx.example.com"], "state_dir": "acme-here"}}})
    assert run_cli("check-config", config=config).exit_code == 0
    result = run_cli("acme", "status", config=config)
    assert result.exit_code == 1
    assert f"no state directory at {config.parent / 'acme-here'}" in result.stderr
