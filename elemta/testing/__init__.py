"""Elemta's test kit for plugin authors: the public testing API.

The pytest fixtures (``elemta_server``, ``elemta_outbox``, ``dns_server``,
``postgresql``, ``start_server``, ``require_tool``…) are registered through
the ``pytest11`` entry point and need no import. These helpers are imported
from here::

    from elemta.testing import RawSMTP, Sink, send_mail, run_cli

``docs/plugins.md`` ("Testing") is the recipe. Each name loads its module when
first used, so that a helper whose library is missing (``ZoneServer`` needs
dnslib) fails only where it is used, with the ``pip install`` to run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..delivery.dsn import parse_dsn
    from .client import RawSMTP, Reply, unverified_context
    from .dns import ZoneServer
    from .fixtures import (DOMAIN, HOSTNAME, LISTENERS, RunningServer, default_config, merge,
                           write_config)
    from .mail import CliResult, Sent, data_bytes, run_cli, send_mail
    from .outbox import CapturedMessage, Outbox
    from .postgres import PostgresServer
    from .redis import RedisServer
    from .process import (ServerProcess, elemta_command, find_tool, free_port, listener,
                          require_tool_or_skip, wait_until)
    from .sink import Received, Sink

_LAZY = {
    "RawSMTP": "client", "Reply": "client", "unverified_context": "client",
    "ZoneServer": "dns",
    "DOMAIN": "fixtures", "HOSTNAME": "fixtures", "LISTENERS": "fixtures",
    "RunningServer": "fixtures", "default_config": "fixtures", "merge": "fixtures",
    "write_config": "fixtures",
    "CliResult": "mail", "Sent": "mail", "data_bytes": "mail", "run_cli": "mail",
    "send_mail": "mail",
    "CapturedMessage": "outbox", "Outbox": "outbox",
    "PostgresServer": "postgres",
    "RedisServer": "redis",
    "ServerProcess": "process", "elemta_command": "process", "find_tool": "process",
    "free_port": "process", "listener": "process", "require_tool_or_skip": "process",
    "wait_until": "process",
    "Received": "sink", "Sink": "sink",
    "parse_dsn": "..delivery.dsn",
}
_EXTRAS = {"dns": "dnslib"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'elemta.testing' has no attribute {name!r}")
    try:
        loaded = importlib.import_module(module if module.startswith(".") else f".{module}",
                                         __name__)
    except ImportError as e:
        needed = _EXTRAS.get(module)
        if needed is None:
            raise
        raise ImportError(f"elemta.testing.{name} needs {needed}: "
                          f"pip install 'elemta[test]'") from e
    value = getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
