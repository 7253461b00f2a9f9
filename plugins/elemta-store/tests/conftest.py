"""Fixtures of elemta-store's tests: a store on each backend (SQLite, a real PostgreSQL)."""

from __future__ import annotations

import pytest
import pytest_asyncio
from elemta_store import Store

from store_support import BACKENDS, settings_for


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest_asyncio.fixture
async def open_store(backend, request, tmp_path):
    """``await open_store(**settings)``: a store on the test's backend, closed at the end."""
    opened: list[Store] = []
    dsn = request.getfixturevalue("postgresql") if backend == "postgresql" else None

    async def make(**more) -> Store:
        store = await Store.open(settings_for(backend, tmp_path, dsn, **more))
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
