"""Fixtures of the elemta-ratelimit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["embedded", "redis"])
def state(request, tmp_path: Path) -> dict:
    """The ``[state]`` table, once for each store: the embedded one, a real redis-server."""
    if request.param == "embedded":
        return {"backend": "embedded", "path": str(tmp_path / "state.sqlite3")}
    return {"backend": "redis", "redis_url": request.getfixturevalue("redis_server").url,
            "timeout_seconds": 0.5}
