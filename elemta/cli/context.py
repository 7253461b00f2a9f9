"""What every ``elemta`` command shares: the ``--config`` option, the settings, errors.

``--config PATH`` is accepted before or after any command name. Settings are
loaded once, when a command first asks for them; a mistake in the file exits
with the same message ``elemta check-config`` gives.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..config import DEFAULT_CONFIG, ConfigError, Settings, load_settings
from ..plugins import PluginLoadError

if TYPE_CHECKING:
    from ..spool.store import Spool


@dataclass
class CLIState:
    config_path: Path = Path(DEFAULT_CONFIG)
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_or_exit(self.config_path)
        return self._settings


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"elemta: {message}", err=True)
    sys.exit(code)


def config_problems(problems: list[str]) -> str:
    return "configuration error:\n  " + "\n  ".join(problems)


def load_or_exit(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as e:
        fail(config_problems(e.problems))


def _set_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        state = ctx.ensure_object(CLIState)
        state.config_path = value
        state._settings = None


config_option = click.option(
    "--config", type=click.Path(path_type=Path), default=None, expose_value=False,
    callback=_set_config, help=f"Configuration file (default: ./{DEFAULT_CONFIG}).")
"""``--config`` accepted before or after any command name."""


def state() -> CLIState:
    return click.get_current_context().ensure_object(CLIState)


def current_settings() -> Settings:
    """For plugin commands: the server settings of the configuration in use (``--config``).

    Exits with a message saying what is wrong when the file is missing or invalid.
    """
    return state().settings


def plugin_settings(name: str) -> Any:
    """For plugin commands: the validated ``[plugins.<name>]`` settings of the configuration.

    The enabled plugins declare their schemas as at start-up; a mistake in the
    file exits with the same message ``elemta check-config`` gives.
    """
    from ..hookcall import HookCaller
    from ..plugins import enabled_names, make_plugin_manager, validated_plugin_settings

    settings = state().settings
    try:
        pm, order = make_plugin_manager(enabled_names(settings.plugins.enabled),
                                        source=str(settings.source), settings=settings)
        validated = validated_plugin_settings(
            HookCaller(pm, order, settings.plugins.timeout_for), settings)
    except PluginLoadError as e:
        fail(str(e))
    except ConfigError as e:
        fail(config_problems(e.problems))
    if name not in validated:
        fail(f"{settings.source}: plugin {name!r} is not enabled; add it to [plugins] enabled")
    return validated[name]


def queue_settings() -> Settings:
    """The settings ``elemta queue`` works on (also when its group is run on its own)."""
    obj = click.get_current_context().obj
    settings = getattr(obj, "settings", None)
    if settings is None:
        try:
            settings = load_settings(getattr(obj, "config_path", None) or DEFAULT_CONFIG)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    return settings


def config_spool() -> Spool:
    """The spool named by the configuration in use; a click error when there is none."""
    from ..spool.lock import SpoolFormatError, spool_format
    from ..spool.store import Spool

    settings = queue_settings()
    root = settings.resolve(settings.spool.path)
    if not root.is_dir():
        raise click.ClickException(f"no spool at {root} (check [spool] path in {settings.source})")
    try:
        spool_format(root)
    except SpoolFormatError as e:
        raise click.ClickException(str(e)) from None
    return Spool(root)
