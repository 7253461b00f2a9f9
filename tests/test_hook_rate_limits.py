"""The ``rate_limits`` lookup hook: one plugin keeps limits, another asks for them through
``App.rate_limits``, over real SMTP sessions."""

from __future__ import annotations

from elemta import HookFailure, TempFail, hookimpl
from elemta.testing import RawSMTP


class Asker:
    """Tells the client, at MAIL, what ``app.rate_limits`` answered for the sender's domain."""

    def __init__(self) -> None:
        self.app = None

    @hookimpl
    def startup(self, app):
        self.app = app

    @hookimpl
    async def mail(self, session, sender):
        domain = sender.rpartition("@")[2]
        try:
            found = await self.app.rate_limits("domain", domain)
        except HookFailure as e:
            return TempFail(451, "4.3.0", f"unknown: {e}")
        if found is None:
            return None
        return TempFail(451, "4.7.1", f"limits {dict(found)}")


class Silent:
    asked: list[tuple[str, str]] = []

    @hookimpl
    def rate_limits(self, kind, key):
        Silent.asked.append((kind, key))
        return None


class Directory:
    @hookimpl
    async def rate_limits(self, kind, key):
        if kind == "domain" and key == "small.example":
            return {"per_hour": 2, "per_day": 0}
        if key == "broken.example":
            raise RuntimeError("database down")
        if key == "odd.example":
            return ["per_hour", 2]
        return None


async def test_hook_rate_limits(elemta_server):
    server = await elemta_server(plugins=[("asker", Asker()), ("silent", Silent()),
                                          ("directory", Directory())])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.cmd("MAIL FROM:<a@Small.Example>")
        assert str(reply) == "451 4.7.1 limits {'per_hour': 2, 'per_day': 0}", \
            "the first answer, asked with the key in lower case"
        assert (await c.cmd("MAIL FROM:<a@big.example>")).code == 250, "no limits of its own"
        await c.cmd("RSET")
        reply = await c.cmd("MAIL FROM:<a@broken.example>")
        assert str(reply).startswith("451 4.3.0 unknown: plugin directory failed in hook "
                                     "rate_limits: RuntimeError: database down"), reply
        reply = await c.cmd("MAIL FROM:<a@odd.example>")
        assert str(reply).startswith("451 4.3.0 unknown: plugin directory failed in hook "
                                     "rate_limits"), "a list is no answer of this hook"
    assert ("domain", "small.example") in Silent.asked, "a plugin's None asks the next one"
