"""Fixtures of the elemta-dkim tests: signing keys on disk, published in the test DNS."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from dkim_support import Keys, ed_key, publish, rsa_key, unshare_problem

from elemta_dkim.keys import write_private_key


@pytest.fixture
def signing_keys(tmp_path: Path, dns_server: Any) -> Keys:
    """An RSA-2048 and an Ed25519 key for example.com in files of mode 0600, published
    in the test DNS as rsa2026 and ed2026."""
    folder = tmp_path / "dkim-keys"
    folder.mkdir(mode=0o700)
    keys = Keys(folder, rsa_key(2048), ed_key())
    write_private_key(folder / "example.com.rsa2026.key", keys.rsa)
    write_private_key(folder / "example.com.ed2026.key", keys.ed)
    assert os.stat(folder / "example.com.ed2026.key").st_mode & 0o777 == 0o600
    publish(dns_server, "example.com", "rsa2026", keys.rsa)
    publish(dns_server, "example.com", "ed2026", keys.ed)
    return keys


@pytest.fixture
def testmsg(require_tool: Any) -> str:
    """The path of opendkim-testmsg (skipped when missing, failed under CI=true)."""
    return require_tool("opendkim-testmsg", "opendkim-tools")


@pytest.fixture
def namespace(testmsg: str) -> str:
    """opendkim-testmsg, where a private mount+network namespace can be made for it
    (``dkim_support.opendkim_verify``); skipped with the reason where not. As root it
    always can."""
    problem = unshare_problem()
    if problem is not None:
        pytest.skip(problem)
    return testmsg
