"""The ``elemta`` command line: serve, check-config, plugins, queue, plugin commands."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from ..config import DEFAULT_CONFIG, ConfigError, Settings, load_settings
from ..plugins import PluginLoadError
from .context import config_option, config_problems, fail
from .context import state as cli_state

log = logging.getLogger("elemta")
T = TypeVar("T")

#: How long a thread waits for the interpreter lock before it asks the holder to let go
#: (Python's default: 5 ms). The spool's journal thread must win the lock back from the
#: busy event loop after each system call of a commit; at 1 ms, acceptance at ten
#: sessions ran 4-10% faster with 6-10% less CPU on the loop (docs/architecture.md).
SWITCH_INTERVAL = 0.001


@click.group()
@click.version_option(package_name="elemta")
@config_option
def main() -> None:
    """Elemta: a plugin-driven mail filter pipeline server."""


@main.command()
@config_option
def serve() -> None:
    """Run the server until SIGTERM/SIGINT (SIGHUP reloads TLS certificates and what
    plugins read from files and datasources, such as DKIM keys)."""
    from ..checks import check_config
    from ..log import setup_logging

    state = cli_state()
    # the same checks as check-config, before anything (spool, database, certificate)
    # is created; binding is tried for real below
    report = check_config(state.config_path, probe_listeners=False)
    if report.errors or report.settings is None:
        fail(config_problems(report.errors))
    settings = state._settings = report.settings
    log_file = settings.resolve(settings.log.file) if settings.log.file else None
    try:
        handler = setup_logging(settings.log, path=log_file)
    except OSError as e:
        fail(f"{settings.source}: [log] file: cannot open {log_file}: {e.strerror}; create its "
             "folder, writable by the user elemta runs as")
    for warning in report.warnings:
        log.warning("%s", warning)
    run_event_loop(settings, _serve(settings, handler))


def run_event_loop(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """Run the server's ``main`` on the event loop ``[server] event_loop`` names."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    if settings.server.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            fail('[server] event_loop = "uvloop" but uvloop is not installed '
                 "(pip install uvloop, or set event_loop = \"asyncio\")")
        return uvloop.run(main)
    return asyncio.run(main)


def start_collecting() -> None:
    """Turn the cyclic garbage collector back on, with what start-up made left out of it.

    ``elemta.cli.run`` turns it off before the imports: with a full spool, start-up
    to the first delivery took about a tenth less time. Everything allocated so far
    (modules, classes, settings, plugins, the recovered queue) lives as long as the
    server, so it is frozen (``gc.freeze``) rather than collected: no later full
    collection walks it again. The little cyclic garbage among it (about a
    thousand objects) stays; a full collection to find it would cost 20-30 ms.
    """
    gc.freeze()
    gc.enable()


async def _serve(settings: Settings, log_handler: logging.Handler) -> None:
    from .. import cli
    from ..app import App, StartupError
    from ..log import reopen
    from ..service import account_to_become, drop_privileges, notify, own_folders

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Signal handlers before anything listens: a SIGTERM while the server starts
    # (recovering a big spool, a plugin connecting) stops it cleanly.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, reopen, log_handler)
    if cli.early_stop is not None:
        stop.set()
    try:
        app = App(settings)
    except (ConfigError, PluginLoadError) as e:
        fail(str(e) if isinstance(e, PluginLoadError) else config_problems(e.problems))
    account = account_to_become(settings)
    if account is not None:
        # what needs root, then never root again: nothing is opened or created before
        try:
            app.bind()
            own_folders(settings, account, log_handler)
            drop_privileges(account)
        except StartupError as e:
            fail(f"cannot start: {e}", 1)
        except OSError as e:
            fail(f"cannot start: cannot become user {account.name}: {e}", 1)
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stopping (signal received during start-up)")
        starting.cancel()
        try:
            await starting  # a start cut short closes what it opened
        except (asyncio.CancelledError, StartupError):
            pass
        return
    stopping.cancel()
    try:
        starting.result()
    except StartupError as e:
        fail(f"cannot start: {e}", 1)
    start_collecting()
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        notify("RELOADING=1")
        await app.reload()
        notify("READY=1")

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    notify("READY=1\nSTATUS=accepting mail on " + ", ".join(
        f"{lst.name} {lst.address}" for lst in settings.listeners))
    ready = os.environ.get("ELEMTA_READY_FILE")
    if ready:
        Path(ready).write_text(str(os.getpid()))
    await stop.wait()
    log.info("stopping (signal received)")
    notify("STOPPING=1")
    await app.stop()


@main.command("check-config")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@config_option
def check_config(path: Path | None) -> None:
    """Check a configuration file, the plugins it enables and this machine, without starting.

    Every problem is listed at once; exit status 2 if there is an error, 0 otherwise
    (warnings are printed, and do not fail the check).
    """
    from ..checks import check_config as check

    state = cli_state()
    if path is not None:
        state.config_path = path
    report = check(state.config_path)
    for warning in report.warnings:
        click.echo(f"elemta: warning: {warning}", err=True)
    if report.errors or report.settings is None:
        fail(config_problems(report.errors))
    settings = report.settings
    click.echo(f"{state.config_path}: OK ({len(settings.listeners)} listeners, "
               f"{len(settings.domains)} local domains, "
               f"{len(settings.plugins.enabled)} plugins enabled"
               f"{f', {len(report.warnings)} warnings' if report.warnings else ''})")


@main.command()
@config_option
def plugins() -> None:
    """List installed and enabled plugins, their hooks and the call order per hook."""
    from rich.console import Console
    from rich.table import Table

    from ..hookcall import HookCaller
    from ..hookspecs import hook_names
    from ..plugins import enabled_names, installed_plugins, make_plugin_manager, plugin_hooks

    settings = cli_state().settings
    installed = installed_plugins()
    enabled = enabled_names(settings.plugins.enabled)
    try:
        pm, order = make_plugin_manager(enabled, source=str(settings.source), settings=settings)
    except PluginLoadError as e:
        fail(str(e))
    console = Console(width=max(100, Console().width))
    table = Table(title="Plugins")
    for col in ("name", "version", "enabled", "hooks"):
        table.add_column(col)
    for name in sorted(set(installed) | set(order)):
        info = installed.get(name)
        builtin = name.startswith("elemta.default_")
        version = info.version if info else ("built-in" if builtin else "module")
        state = ("yes" if name in enabled else "built-in" if builtin else "no")
        hooks = ", ".join(plugin_hooks(pm, name)) if name in order else ""
        table.add_row(name, version or "?", state, hooks)
    console.print(table)
    caller = HookCaller(pm, order, settings.plugins.timeout_for)
    calls = Table(title="Call order per hook")
    calls.add_column("hook")
    calls.add_column("plugins, in call order")
    for hook in hook_names():
        calls.add_row(hook, " → ".join(i.plugin for i in caller.impls(hook)) or "-")
    console.print(calls)


def _add_builtin_groups() -> None:
    from .queue import queue_group
    from .scaffold import plugin_group

    main.add_command(queue_group)
    main.add_command(plugin_group)


def _add_plugin_commands(argv: list[str]) -> None:
    """Let enabled plugins add their commands (``register_commands``)."""
    path = Path(DEFAULT_CONFIG)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = Path(argv[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
    if not path.exists():
        return
    from ..hookcall import HookCaller, HookFailure
    from ..plugins import enabled_names, make_plugin_manager

    try:
        settings = load_settings(path)
        pm, order = make_plugin_manager(enabled_names(settings.plugins.enabled),
                                        source=str(path), settings=settings)
        HookCaller(pm, order, settings.plugins.timeout_for).call_at_startup(
            "register_commands", cli=main)
    except (ConfigError, PluginLoadError, HookFailure):
        return  # the command itself reports the problem


def command_line(args: list[str]) -> click.Group:
    """The ``elemta`` group ready for ``args``: built-in groups, and plugin commands if needed."""
    name = _command_name(args)
    if name in main.commands:
        # a command of this module (`serve`, `check-config`, `plugins`): the groups' imports
        # would only delay it (`serve` starts 0.1 s sooner without them)
        _accept_config(main)
        return main
    _add_builtin_groups()
    if name not in main.commands:
        # only a plugin's command (or --help, which lists them) needs the
        # plugins loaded; `serve` loads them itself, once
        _add_plugin_commands(args)
    _accept_config(main)
    return main


def _accept_config(command: click.Command) -> None:
    """``--config`` after any command name, a plugin's too (``elemta users list --config
    FILE``), as before it."""
    if not any(p.name == "config" for p in command.params):
        config_option(command)
    for sub in getattr(command, "commands", {}).values():
        _accept_config(sub)


def run(argv: list[str] | None = None) -> Any:
    args = sys.argv[1:] if argv is None else argv
    command = command_line(args)
    if _command_name(args) != "serve":
        gc.enable()  # off while importing (elemta.cli.run); serve turns it on once started
    return command.main(args=args, prog_name="elemta")


def _command_name(args: list[str]) -> str | None:
    """The first argument that is not an option (or ``--config``'s value)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


if __name__ == "__main__":
    run()
