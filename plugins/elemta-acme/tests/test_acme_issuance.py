"""Issuance against a real pebble, with real HTTP-01 and TLS-ALPN-01 validation."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store as TrustStore

from elemta_acme.renewer import Renewer
from elemta_acme.settings import AcmeSettings
from elemta_acme.store import Store

from acme_support import NAMES


def verify_chain(fullchain: bytes, root_pem: bytes, name: str) -> None:
    chain = x509.load_pem_x509_certificates(fullchain)
    root = x509.load_pem_x509_certificate(root_pem)
    verifier = PolicyBuilder().store(TrustStore([root])).build_server_verifier(x509.DNSName(name))
    verifier.verify(chain[0], chain[1:])


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_issuance_validates_each_name_for_real(pebble, dns_server, tmp_path, acme_settings,
                                                     challenge):
    settings = AcmeSettings.model_validate(acme_settings(challenges=[challenge]))
    store = Store(tmp_path / "acme")
    store.ensure()
    renewer = Renewer(settings, store)

    result = await renewer.renew_now(force=False, generation=None)

    assert result.ok and result.ordered, result.message
    current = store.load_current()
    assert set(current.info.names) == set(NAMES)
    assert current.info.key_type == "ecdsa-p256"
    for name in NAMES:
        verify_chain(current.fullchain.read_bytes(), pebble.root.read_bytes(), name)
        assert dns_server.count(name, "A") > 0     # pebble looked the name up
    served = {n for typ, n in renewer.responders.served if typ == challenge}
    assert served                                  # and connected to our responder
    if challenge == "tls-alpn-01":
        assert served == set(NAMES)


async def test_a_changed_key_type_renews_with_an_rsa_key(pebble, dns_server, tmp_path,
                                                         acme_settings):
    store = Store(tmp_path / "acme")
    store.ensure()
    first = Renewer(AcmeSettings.model_validate(acme_settings()), store)
    assert (await first.renew_now(force=False, generation=None)).ordered

    rsa = Renewer(AcmeSettings.model_validate(acme_settings(key_type="rsa-2048")), store)
    await rsa.refresh()
    due, _, reason = await rsa.due(store.read_status())
    assert due and "rsa-2048" in reason
    result = await rsa.renew_now(force=False, generation=store.current_generation())

    assert result.ordered, result.message
    current = store.load_current()
    assert current.info.key_type == "rsa-2048"
    # the account key stays the one made first (ECDSA); the certificate key is new each time
    assert b"BEGIN PRIVATE KEY" in store.account_key.read_bytes()
    assert oct(current.privkey.stat().st_mode & 0o777) == "0o600"
    assert oct(store.account_key.stat().st_mode & 0o777) == "0o600"
    verify_chain(current.fullchain.read_bytes(), pebble.root.read_bytes(), NAMES[0])


async def test_external_account_binding_is_sent_and_checked(pebble, dns_server, tmp_path,
                                                            acme_settings):
    from acme_support import EAB_HMAC, EAB_KID

    good = Store(tmp_path / "good")
    good.ensure()
    renewer = Renewer(AcmeSettings.model_validate(acme_settings(
        eab={"kid": EAB_KID, "hmac_key": EAB_HMAC})), good)
    result = await renewer.renew_now(force=False, generation=None)
    assert result.ordered, result.message

    bad = Store(tmp_path / "bad")
    bad.ensure()
    wrong = EAB_HMAC[:-4] + ("AAAA" if not EAB_HMAC.endswith("AAAA") else "BBBB")
    renewer = Renewer(AcmeSettings.model_validate(acme_settings(
        eab={"kid": EAB_KID, "hmac_key": wrong})), bad)
    result = await renewer.renew_now(force=False, generation=None)
    assert not result.ok
    assert "[plugins.acme.eab]" in result.message
    assert bad.read_status()["last_error_kind"] == "eab"


async def test_terms_of_service_must_be_agreed_to(pebble, dns_server, tmp_path, acme_settings):
    store = Store(tmp_path / "acme")
    store.ensure()
    renewer = Renewer(AcmeSettings.model_validate(acme_settings(agree_terms=False)), store)

    result = await renewer.renew_now(force=False, generation=None)

    assert not result.ok
    assert "terms of service" in result.message and "agree_terms = true" in result.message
    assert store.read_status()["last_error_kind"] == "terms"


async def test_an_untrusted_ca_certificate_says_to_set_ca_file(pebble, dns_server, tmp_path,
                                                               acme_settings):
    store = Store(tmp_path / "acme")
    store.ensure()
    renewer = Renewer(AcmeSettings.model_validate(acme_settings(ca_file=None)), store)

    result = await renewer.renew_now(force=False, generation=None)

    assert not result.ok and "ca_file" in result.message, result.message
    assert store.read_status()["last_error_kind"] == "tls"


async def test_a_changed_directory_orders_from_the_new_ca(faulty_ca, dns_server, tmp_path,
                                                          acme_settings):
    """Going from staging to production: the staging certificate is replaced at once."""
    store = Store(tmp_path / "acme")
    store.ensure()
    staging = Renewer(AcmeSettings.model_validate(acme_settings()), store)
    assert (await staging.renew_now(force=False, generation=None)).ordered

    production = Renewer(AcmeSettings.model_validate(acme_settings(
        directory=faulty_ca.directory)), store)
    await production.refresh()
    due, _, reason = await production.due(store.read_status())
    assert due and "the directory changed" in reason
    result = await production.renew_now(force=False, generation=store.current_generation())
    assert result.ordered, result.message
    assert faulty_ca.orders() == 1
    assert store.read_status()["directory"] == faulty_ca.directory
