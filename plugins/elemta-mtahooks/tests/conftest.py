"""Fixtures of the elemta-mtahooks tests: hook services on loopback, over HTTP or HTTPS."""

from __future__ import annotations

import ssl
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme
from mtahooks_service import HookService
from mtahooks_support import SECRET


@pytest.fixture
async def hook_service():
    """Factory: ``await hook_service(secret=SECRET, tls=None)``; every service started is
    stopped when the test ends, and every request it got must match request.json."""
    started: list[HookService] = []
    async with AsyncExitStack() as stack:
        async def start(secret: str = SECRET, tls: ssl.SSLContext | None = None) -> HookService:
            service = await stack.enter_async_context(HookService(secret, tls=tls))
            started.append(service)
            return service

        yield start
    problems = [p for s in started for p in s.invalid]
    assert problems == [], "requests that do not match schema/request.json"


@pytest.fixture(scope="session")
def hook_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def hook_tls(hook_ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    """A server context for 127.0.0.1 and the CA file that verifies it."""
    cert = hook_ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "hook-ca.pem"
    hook_ca.cert_pem.write_to_path(str(ca_file))
    return {"context": context, "ca_file": ca_file}
