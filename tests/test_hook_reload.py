"""The ``reload`` hook: SIGHUP (``App.reload()``) asks TLS contexts again, then every plugin
reloads; one that fails is logged and does not stop the others."""

from __future__ import annotations

import logging

from elemta import hookimpl


class Recorder:
    def __init__(self, name: str, order: list[tuple[str, object]]) -> None:
        self.name = name
        self.order = order

    @hookimpl
    def tls_context(self, listener):
        self.order.append(("tls", listener.name))

    @hookimpl
    async def reload(self, app):
        self.order.append((self.name, app))


class Broken:
    @hookimpl
    def reload(self):
        raise OSError("the key folder is gone")


async def test_hook_reload(elemta_server, caplog):
    order: list[tuple[str, object]] = []
    server = await elemta_server(plugins=[("first", Recorder("first", order)),
                                          ("broken", Broken()),
                                          ("last", Recorder("last", order))])
    order.clear()

    with caplog.at_level(logging.INFO):
        assert await server.app.reload() is True

    # TLS first (both recorders answer None, the built-in answers), then reload in order,
    # past the plugin that failed
    assert order == [("tls", "mx"), ("tls", "mx"), ("tls", "submission"),
                     ("tls", "submission"), ("tls", "smtps"), ("tls", "smtps"),
                     ("first", server.app), ("last", server.app)]
    assert "plugin broken raised in hook reload: OSError: the key folder is gone" in caplog.text
    assert "reload done" in caplog.text


async def test_reload_tls_alone_does_not_reload_plugins(elemta_server):
    order: list[tuple[str, object]] = []
    server = await elemta_server(plugins=[("one", Recorder("one", order))])
    order.clear()

    assert await server.app.reload_tls() is True

    assert [what for what, _ in order] == ["tls", "tls", "tls"]
