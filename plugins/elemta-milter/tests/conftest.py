"""Fixtures of the elemta-milter tests: real milters, started once per test run.

OpenDKIM, rspamd and spamass-milter (with spamd) come from the distribution and are
skipped (failed under ``CI=true``) when missing; the purepythonmilter milter is a
process of its own; the fault milters and the counting proxy run in the test's loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from milter_support import (CountingProxy, EditMilter, FaultMilter, OpenDKIM, Rspamd,
                            SpamAssassin)


@pytest.fixture(scope="session")
def opendkim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenDKIM]:
    milter = OpenDKIM(tmp_path_factory.mktemp("opendkim"))
    yield milter
    milter.stop()


@pytest.fixture(scope="session")
def opendkim_auth_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenDKIM]:
    """OpenDKIM for which no client address is internal: it signs only what an
    authenticated client sent (the {auth_type} macro)."""
    milter = OpenDKIM(tmp_path_factory.mktemp("opendkim-auth"), internal_hosts="192.0.2.1")
    yield milter
    milter.stop()


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    milter = Rspamd(tmp_path_factory.mktemp("rspamd"))
    yield milter
    milter.stop()


@pytest.fixture(scope="session")
def spamassassin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpamAssassin]:
    milter = SpamAssassin(tmp_path_factory.mktemp("spamassassin"))
    yield milter
    milter.stop()


@pytest.fixture(scope="session")
def edit_milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditMilter]:
    pytest.importorskip("purepythonmilter", reason="pip install -e 'plugins/elemta-milter[test]'")
    milter = EditMilter(tmp_path_factory.mktemp("edit-milter"))
    yield milter
    milter.stop()


@pytest.fixture
async def fault_milter() -> AsyncIterator[Any]:
    """``await fault_milter("hang" | "garbage" | "close_in_message")``."""
    started: list[FaultMilter] = []

    async def start(mode: str) -> FaultMilter:
        milter = await FaultMilter(mode).start()
        started.append(milter)
        return milter

    yield start
    for milter in started:
        await milter.stop()


@pytest.fixture
async def counting_proxy() -> AsyncIterator[Any]:
    """``await counting_proxy(port or unix socket path)``: a TCP proxy to the milter there,
    counting connections."""
    started: list[CountingProxy] = []

    async def start(target: Any) -> CountingProxy:
        proxy = await CountingProxy(target).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()
