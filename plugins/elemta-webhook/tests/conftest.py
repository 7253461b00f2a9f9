"""Fixtures of the elemta-webhook tests: receivers on loopback, and an SMTP sink that
stands in for the senders' MX (where bounces go)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
from webhook_receiver import Receiver

from elemta.testing import Sink

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture
async def receiver():
    """Factory: ``await receiver(secret=SECRET)``; stopped when the test ends."""
    async with AsyncExitStack() as stack:
        async def start(secret: str = SECRET) -> Receiver:
            return await stack.enter_async_context(Receiver(secret))

        yield start


@pytest.fixture
async def sender_mx():
    """The MX of every remote domain (``[delivery.routes."*"]``): bounces arrive here."""
    async with Sink() as sink:
        yield sink
