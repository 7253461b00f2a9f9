"""The ``dkim_keys`` hook: a key store answers, a signer asks through ``App.dkim_keys``."""

from __future__ import annotations

import pytest

from elemta import DkimKey, hookimpl


class Elsewhere:
    """Holds no key for the domains asked here: answers ``None``, so the next one is asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def dkim_keys(self, domain):
        self.asked.append(domain)
        return None


class Store:
    KEYS = [DkimKey("example.org", "2027a", "ed25519", key_file="/etc/elemta/dkim/a.key",
                    not_before=1798761600.0),
            DkimKey("example.org", "2026r", "rsa", private_key="-----BEGIN PRIVATE KEY-----")]

    @hookimpl
    async def dkim_keys(self, domain):
        return list(self.KEYS) if domain == "example.org" else None


class Broken:
    @hookimpl
    def dkim_keys(self, domain):
        raise ConnectionError("database down")


async def test_hook_dkim_keys(elemta_server):
    elsewhere = Elsewhere()
    server = await elemta_server(plugins=[("elsewhere", elsewhere), ("store", Store())])

    keys = await server.app.dkim_keys("Example.ORG")

    assert keys == Store.KEYS
    assert elsewhere.asked == ["example.org"], "asked first, in lower case"
    assert await server.app.dkim_keys("other.example") is None


async def test_dkim_keys_failure_raises_for_the_signer_to_decide(elemta_server):
    server = await elemta_server(plugins=[("broken", Broken())])
    with pytest.raises(Exception, match="plugin broken failed in hook dkim_keys"):
        await server.app.dkim_keys("example.org")


async def test_dkim_keys_answer_must_be_a_list_of_dkim_keys(elemta_server):
    class Wrong:
        @hookimpl
        def dkim_keys(self, domain):
            return ["-----BEGIN PRIVATE KEY-----"]

    server = await elemta_server(plugins=[("wrong", Wrong())])
    with pytest.raises(Exception, match="allowed: list of DkimKey or None"):
        await server.app.dkim_keys("example.org")


def test_a_dkim_key_has_exactly_one_private_key_and_a_known_algorithm():
    with pytest.raises(ValueError, match="exactly one of private_key and key_file"):
        DkimKey("example.org", "s", "rsa")
    with pytest.raises(ValueError, match="exactly one"):
        DkimKey("example.org", "s", "rsa", private_key="x", key_file="/k")
    with pytest.raises(ValueError, match='"rsa" or "ed25519"'):
        DkimKey("example.org", "s", "dsa", key_file="/k")
    assert "BEGIN" not in repr(DkimKey("example.org", "s", private_key="-----BEGIN"))
