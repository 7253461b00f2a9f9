"""A running Elemta with the store and the sink: SMTP on loopback, the web UI on a free
loopback port, served by the plugin's own uvicorn."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from elemta.testing import RunningServer, free_port


@dataclass
class SinkServer:
    server: RunningServer
    base: str
    root: Any

    @property
    def smtp_port(self) -> int:
        return self.server.port("mx")

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=10.0, **kw)

    async def wait_total(self, n: int, timeout: float = 15.0, **kw: Any) -> dict[str, Any]:
        """Poll the API until it lists ``n`` messages; the last page."""
        deadline = time.monotonic() + timeout
        async with self.client(**kw) as client:
            while True:
                page = (await client.get("/api/v1/messages")).json()
                if page.get("total") == n:
                    return page
                if time.monotonic() > deadline:
                    raise AssertionError(f"expected {n} messages, the API lists {page}")
                await asyncio.sleep(0.05)


@pytest.fixture
def sink_server(elemta_server, tmp_path):
    """Factory: ``await sink_server(sink={...}, config={...})``."""

    async def start(sink: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                    store: dict[str, Any] | None = None) -> SinkServer:
        port = free_port()
        table = {"capture_all": True, "address": f"127.0.0.1:{port}", **(sink or {})}
        cfg: dict[str, Any] = {
            "delivery": {"enabled": True, "retry_intervals_seconds": [1]},
            "plugins": {"enabled": ["store", "sink"],
                        "store": {"path": str(tmp_path / "store" / "messages.db"),
                                  **(store or {})},
                        "sink": table},
        }
        if config:
            from elemta.testing import merge
            cfg = merge(cfg, config)
        server = await elemta_server(config=cfg)
        return SinkServer(server, f"http://127.0.0.1:{port}", tmp_path)

    return start
