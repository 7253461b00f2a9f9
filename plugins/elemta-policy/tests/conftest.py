"""Fixtures of elemta-policy's tests: policy services of the test's own, and a real postgrey."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

from policy_support import Postgrey, PolicyServer, start_postgrey


@pytest_asyncio.fixture
async def policy_server() -> AsyncIterator[Callable[..., Any]]:
    """``await policy_server(decide, unix=False, one_request_per_connection=False)``: a
    started :class:`PolicyServer`, stopped when the test ends."""
    started: list[PolicyServer] = []

    async def start(decide: Callable[[dict[str, str]], Any], **options: Any) -> PolicyServer:
        server = await PolicyServer(decide, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture(scope="module")
def postgrey() -> Iterator[Postgrey]:
    """A real postgrey (Debian's /usr/sbin/postgrey) with a 2 s delay, for the module."""
    server, stop = start_postgrey(delay=2)
    try:
        yield server
    finally:
        stop()
