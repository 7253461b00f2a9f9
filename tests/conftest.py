"""Shared helpers for the core tests."""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterator

import pytest

from .serverproc import ServerProcess, server_factory

# Debian installs Postfix's tools (smtp-source, smtp-sink) in /usr/sbin, which
# is often not on an unprivileged user's PATH.
_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_tool(name: str) -> str | None:
    """The path of an external program, looking in the sbin folders too."""
    found = shutil.which(name)
    if found is None:
        found = shutil.which(name, path=os.pathsep.join(_EXTRA_DIRS))
    return found


def require_tool_or_skip(name: str) -> str:
    """The path of ``name``; skip the test if it is missing, or fail under ``CI=true``."""
    path = find_tool(name)
    if path is not None:
        return path
    reason = (f"{name} is not installed (install it with `make test-tools`, or "
              f"`apt-get install {'postfix' if name.startswith('smtp-') else name}`)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a required tool is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """``require_tool("swaks")`` → the tool's path (skips, or fails under CI=true)."""
    return require_tool_or_skip


@pytest.fixture
def start_server(tmp_path) -> "Iterator[Callable[..., ServerProcess]]":
    """Factory: ``start_server(config_path, env=None)`` → a ready ``elemta serve`` process."""
    yield from server_factory(tmp_path)
