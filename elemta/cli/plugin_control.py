"""``elemta.control_request``: a plugin's command line asks the running server one of the
commands a plugin registered (``control_commands``) over its control socket."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import Settings
from ..control import ControlError, ServerNotRunning, Unreachable, request, socket_path
from .context import current_settings


def control_request(name: str, args: Mapping[str, Any] | None = None, *,
                    settings: Settings | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """The answer of the running server's plugin command ``name`` to ``args``.

    The server is the one of ``settings``, by default the command line's
    configuration (:func:`~elemta.current_settings`), reached on
    ``<state_dir>/control.sock``.

    :raises ServerNotRunning: no server runs with this configuration.
    :raises ControlError: the server answered with an error, or could not be asked.
    """
    if settings is None:
        settings = current_settings()
    path = socket_path(settings)
    payload = {"cmd": "plugin", "name": name, "args": dict(args or {})}
    try:
        answer = request(path, payload, timeout=timeout)
    except Unreachable:
        raise ServerNotRunning(f"no Elemta server is running with {settings.source} (nothing "
                               f"answers on {path}); start it with `elemta serve`, or check "
                               "[server] state_dir") from None
    if not answer.get("ok"):
        raise ControlError(f"the server refused: {answer.get('error', 'no reason given')}")
    result = answer.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"unreadable answer to {name} on {path}: {str(answer)[:200]}")
    return result
