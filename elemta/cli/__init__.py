"""The ``elemta`` command line: serve, check-config, plugins, queue, plugin commands.

``main.py`` holds the top-level commands, ``queue*.py`` the ``queue`` group,
``context.py`` what they share (``--config``, the settings), ``output.py`` how
spool data is printed, ``scaffold.py`` ``elemta plugin new``.

:func:`run`, the console script, catches SIGTERM and SIGINT before it imports
anything heavy, so that a stop asked for while the server starts is honoured
(``serve`` stops cleanly as soon as it can) rather than killing the process.
It also turns the cyclic garbage collector off until the command starts: the
imports allocate some hundred thousand objects that live as long as the
process, and the collections they would set off find next to nothing (see
``main.run``; ``serve`` keeps it off until the server has started).
"""

from __future__ import annotations

import gc
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import current_settings, plugin_settings
    from .main import main

__all__ = ["current_settings", "main", "plugin_settings", "run"]

#: The signal that asked the process to stop before the server could listen for it.
early_stop: int | None = None


def _stop_early(signum: int, frame: object) -> None:
    global early_stop
    early_stop = signum


def run(argv: list[str] | None = None) -> Any:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_early)
    gc.disable()
    from .main import run as run_main

    return run_main(argv)


def __getattr__(name: str) -> Any:
    if name in ("current_settings", "plugin_settings"):
        from . import context
        return getattr(context, name)
    if name == "main":
        from .main import main
        return main
    raise AttributeError(f"module 'elemta.cli' has no attribute {name!r}")
