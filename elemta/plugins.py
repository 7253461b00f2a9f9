"""The plugin manager factory: built-ins, entry points, the enabled list, order.

Plugins are installed packages exposing an entry point in the group ``elemta``
(``[project.entry-points.elemta] greylist = "elemta_greylist"``, a module, or
``"elemta_greylist:Greylist"``, a class instantiated once per server). Only those
named in ``[plugins] enabled`` are loaded, in that order; built-ins come last.
An entry may also be an importable module path (``"mysite.policy"``) for a
plugin that is not packaged.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pluggy

from . import hookspecs
from .config_errors import suggest
from .hookcall import HookCaller, HookFailure

if TYPE_CHECKING:
    from .config import Settings

ENTRY_POINT_GROUP = "elemta"
ENV_OVERRIDE = "ELEMTA_LOAD_PLUGINS"

DEFAULT_PLUGINS = (
    "elemta.default_relay",
    "elemta.default_received",
    "elemta.default_authres",
    "elemta.default_tls",
    "elemta.default_transport",
    "elemta.default_metrics",
)


class PluginLoadError(Exception):
    """An enabled plugin cannot be loaded; ``str()`` says why and how to fix it."""


@dataclass(frozen=True)
class InstalledPlugin:
    name: str
    module: str
    distribution: str | None
    version: str | None


def installed_plugins() -> dict[str, InstalledPlugin]:
    """Every plugin installed in this environment, by entry-point name.

    Reading the entry points scans every package's metadata (about 20 ms);
    ``elemta serve`` asks four times while starting (the configuration check,
    the plugins' tables, the server), so the answer is kept for as long as
    ``sys.path`` is the same.
    """
    key = tuple(sys.path)
    cached = _INSTALLED.get(key)
    if cached is None:
        cached = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            cached[ep.name] = InstalledPlugin(ep.name, ep.value, dist.name if dist else None,
                                              dist.version if dist else None)
        _INSTALLED.clear()
        _INSTALLED[key] = cached
    return dict(cached)


_INSTALLED: dict[tuple[str, ...], dict[str, InstalledPlugin]] = {}


def enabled_names(configured: Sequence[str]) -> list[str]:
    """The enabled list, or the ``ELEMTA_LOAD_PLUGINS`` override (comma-separated)."""
    env = os.environ.get(ENV_OVERRIDE)
    if env is not None:
        return [n.strip() for n in env.split(",") if n.strip()]
    return list(configured)


def load_plugin(name: str, installed: dict[str, InstalledPlugin] | None = None,
                source: str = "elemta.toml") -> object:
    """The plugin object an entry of ``[plugins] enabled`` names: an installed plugin's
    module or instance, or an importable module path.

    Raises :class:`PluginLoadError` saying what is wrong with this one entry.
    """
    if installed is None:
        installed = installed_plugins()
    if name in installed:
        target = installed[name].module
        modname, _, attr = target.partition(":")
        try:
            obj: object = importlib.import_module(modname)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
            if isinstance(obj, type):
                # a plugin class: one instance per server, so that two servers
                # in one process (tests, embedding) never share its state
                obj = obj()
        except Exception as e:
            raise PluginLoadError(
                f"{source}: [plugins] enabled: plugin {name!r} is installed but failed to "
                f"import ({type(e).__name__}: {e}); reinstall it or remove it from the list"
            ) from e
        return obj
    if "." in name:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise PluginLoadError(f"{source}: [plugins] enabled: cannot import module "
                                  f"{name!r}: {e}") from e
    raise PluginLoadError(f"{source}: [plugins] enabled: {_not_installed(name, installed)}")


def _not_installed(name: str, installed: dict[str, InstalledPlugin]) -> str:
    """Why ``name`` is not there, and the fix: a misspelling of an installed plugin is
    pointed at that plugin, never at a package name made from the misspelling."""
    known = ", ".join(sorted(installed)) or "none"
    close = suggest(name, list(installed))
    if close:
        return (f'plugin {name!r} is not installed; did you mean "{close[0]}"? '
                f"(installed: {known})")
    return (f"plugin {name!r} is not installed (installed: {known}). Install the package "
            f"that provides it (Elemta's own plugins are elemta-<name>: "
            f"`pip install elemta-{name}`, or `pip install -e plugins/elemta-{name}` from a "
            "checkout), or remove it from the list.")


def make_plugin_manager(enabled: Sequence[str], *, source: str = "elemta.toml",
                        extra: Iterable[tuple[str, object]] = (),
                        builtins: Sequence[str] = DEFAULT_PLUGINS,
                        settings: Settings | None = None) -> tuple[pluggy.PluginManager, list[str]]:
    """Build the manager. Returns it and the call order of plugin names.

    ``extra`` registers already-imported plugin objects (tests, embedding) after
    the enabled ones and before the built-ins. A built-in module that needs the
    server's settings defines ``make_plugin(settings)``; its result is registered
    instead of the module, so several servers in one process never share state.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    installed = installed_plugins()
    order: list[str] = []
    for name in enabled:
        _register(pm, load_plugin(name, installed, source), name)
        order.append(name)
    for name, obj in extra:
        _register(pm, obj, name)
        order.append(name)
    for modname in builtins:
        module = importlib.import_module(modname)
        factory = getattr(module, "make_plugin", None)
        if factory is not None and settings is not None:
            pm.register(factory(settings), name=modname)
        else:
            pm.register(module, name=modname)
        order.append(modname)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginLoadError(
            f"plugin {e.plugin!r} implements a hook that does not exist: {e}. "
            f"Hooks are: {', '.join(hookspecs.hook_names())}"
        ) from None
    return pm, order


def _register(pm: pluggy.PluginManager, obj: object, name: str) -> None:
    try:
        pm.register(obj, name=name)
    except pluggy.PluginValidationError as e:
        raise PluginLoadError(f"plugin {name!r} cannot be loaded: {e}") from None


def validated_plugin_settings(hooks: HookCaller, settings: Settings) -> dict[str, Any]:
    """Every ``[plugins.<name>]`` table validated against the schema its plugin registers.

    Raises :class:`~elemta.config.ConfigError` naming the file and key at fault,
    :class:`PluginLoadError` when a plugin cannot declare its schema.
    """
    from .config import validate_plugin_tables

    schemas: dict[str, Any] = {}
    try:
        answers = hooks.call_at_startup("register_config")
    except HookFailure as f:
        raise PluginLoadError(f"plugin {f.plugin!r} cannot declare its configuration: "
                              f"{f.reason}") from None
    for mapping in answers.values:
        schemas.update(mapping)
    return validate_plugin_tables(settings, schemas)


def plugin_hooks(pm: pluggy.PluginManager, name: str) -> list[str]:
    plugin = pm.get_plugin(name)
    if plugin is None:
        return []
    return sorted(c.name for c in pm.get_hookcallers(plugin) or ())

