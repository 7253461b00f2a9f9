"""Fixtures of the elemta-ratelimit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def state(state_config: dict) -> dict:
    """The ``[state]`` table, once for each store: the embedded one, a real redis-server
    (``state_config`` of Elemta's test kit)."""
    return state_config
