"""Fixtures of the elemta-webhook tests: receivers on loopback, and an SMTP sink that
stands in for the senders' MX (where bounces go)."""

from __future__ import annotations

import ssl
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme
from webhook_receiver import Receiver

from elemta.testing import Sink

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture
async def receiver():
    """Factory: ``await receiver(secret=SECRET)``; stopped when the test ends."""
    async with AsyncExitStack() as stack:
        async def start(secret: str = SECRET, tls: ssl.SSLContext | None = None) -> Receiver:
            return await stack.enter_async_context(Receiver(secret, tls=tls))

        yield start


@pytest.fixture
async def sender_mx():
    """The MX of every remote domain (``[delivery.routes."*"]``): bounces arrive here."""
    async with Sink() as sink:
        yield sink


@pytest.fixture
def receiver_tls(tmp_path: Path) -> dict[str, Any]:
    """A server context for 127.0.0.1 from a private CA, and that CA's certificate file."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "receiver-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return {"context": context, "ca_file": ca_file}
