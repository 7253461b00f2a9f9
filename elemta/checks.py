"""Every problem of a configuration, found in one pass: ``elemta check-config`` and ``serve``.

Three layers are checked whether or not another failed, so that one run lists
everything: the core keys, each plugin named in ``[plugins] enabled`` (a
misspelling is pointed at the installed plugin it resembles), and each
``[plugins.<name>]`` table against the schema its plugin declares. When those
hold, the machine is checked against the file: the TLS certificate and key
(present, readable, a pair, not expired), the listeners (at least one; a host
this machine has; a port free to bind), the spool and state folders (creatable,
not writable by others; a spool format this version reads) and the ``[server]
user``/``group`` to run as.

``serve`` runs the same checks before it creates anything (a database, a
certificate, the spool), so it never finds a configuration mistake this module
missed. What can change between the check and the start (a port taken, an
address not up yet, a certificate about to expire) is a warning; the rest is an
error.
"""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tomlkit

from .config import ConfigError, PluginsSettings, Settings, load_settings
from .plugins import (InstalledPlugin, PluginLoadError, enabled_names, installed_plugins,
                      load_plugin, make_plugin_manager, validated_plugin_settings)
from .sockets import probe_bind
from .spool.lock import SpoolFormatError, spool_format

#: A certificate expiring sooner than this is worth a warning.
EXPIRY_WARNING = datetime.timedelta(days=14)


@dataclass(frozen=True)
class Finding:
    severity: Literal["error", "warning"]
    text: str


@dataclass
class Report:
    """What :func:`check_config` found; ``settings`` is None when the core keys are wrong."""

    source: Path
    settings: Settings | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [f.text for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[str]:
        return [f.text for f in self.findings if f.severity == "warning"]

    def error(self, text: str) -> None:
        self.findings.append(Finding("error", text))

    def warn(self, text: str) -> None:
        self.findings.append(Finding("warning", text))


def check_config(path: str | os.PathLike[str], *, probe_listeners: bool = True) -> Report:
    """Check the configuration at ``path`` and this machine against it.

    ``probe_listeners`` binds each listener's address for a moment to see that
    it is free (``serve`` binds for real instead).
    """
    report = Report(Path(path))
    try:
        report.settings = load_settings(path)
    except ConfigError as e:
        report.findings.extend(Finding("error", p) for p in e.problems)
    settings = report.settings or _plugins_only(Path(path))
    if settings is None:
        return report  # unreadable, or a TOML syntax error: nothing else can be read
    loaded = _check_plugins(report, settings)
    if loaded is not None:
        _check_plugin_tables(report, settings, loaded)
    if report.settings is not None and not report.errors:
        check_machine(report, report.settings, probe_listeners=probe_listeners)
    return report


def _plugins_only(path: Path) -> Settings | None:
    """When the core keys are wrong: the ``[plugins]`` part alone, so that the plugins and
    their tables are still checked in the same run."""
    try:
        doc = tomlkit.parse(path.read_text(encoding="utf-8")).unwrap()
        plugins = PluginsSettings.model_validate(doc.get("plugins", {}))
    except Exception:
        return None
    return Settings.model_construct(plugins=plugins, source=path)


def _check_plugins(report: Report, settings: Settings) -> list[str] | None:
    """Load each enabled plugin on its own; the names that load, or None when even those
    cannot be put together (a plugin implementing a hook that does not exist)."""
    installed: dict[str, InstalledPlugin] = installed_plugins()
    ok = []
    for name in enabled_names(settings.plugins.enabled):
        try:
            load_plugin(name, installed, str(settings.source))
        except PluginLoadError as e:
            report.error(str(e))
        else:
            ok.append(name)
    try:
        make_plugin_manager(ok, source=str(settings.source), settings=settings)
    except PluginLoadError as e:
        report.error(str(e))
        return None
    return ok


def _check_plugin_tables(report: Report, settings: Settings, loaded: list[str]) -> None:
    from .hookcall import HookCaller

    failed = set(enabled_names(settings.plugins.enabled)) - set(loaded)
    # the table of a plugin that failed to load is not "unknown": its load error says why
    tables = {k: v for k, v in settings.plugins.tables.items() if k not in failed}
    plugins = settings.plugins.model_copy(update={"tables": tables})
    settings = settings.model_copy(update={"plugins": plugins})
    pm, order = make_plugin_manager(loaded, source=str(settings.source), settings=settings)
    try:
        validated_plugin_settings(HookCaller(pm, order, settings.plugins.timeout_for), settings)
    except ConfigError as e:
        report.findings.extend(Finding("error", p) for p in e.problems)
    except PluginLoadError as e:
        report.error(str(e))


# ------------------------------------------------------------------ the machine


def check_machine(report: Report, settings: Settings, *, probe_listeners: bool = True) -> None:
    """What the file names on this machine: listeners, TLS files, folders, the user."""
    src = settings.source
    if not settings.listeners:
        report.error(f"{src}: no [[listeners]]: the server would take no mail; add one, for "
                     'example [[listeners]] name = "mx" address = "0.0.0.0:25" (see '
                     "docs/configuration.md)")
    for i, listener in enumerate(settings.listeners):
        if probe_listeners and listener.port:
            problem = probe_bind(listener.host, listener.port)
            if problem:
                report.warn(f"{src}: listeners[{i}].address: {listener.name}: cannot listen on "
                            f"{listener.address}: {problem}")
    if any(lst.tls != "none" for lst in settings.listeners):
        _check_tls_files(report, settings)
    owner = _check_user(report, settings)
    spool = settings.resolve(settings.spool.path)
    _check_folder(report, settings, "[spool] path", spool)
    try:
        spool_format(spool)
    except SpoolFormatError as e:
        report.error(f"{src}: [spool] path: {e}")
    _check_folder(report, settings, "[server] state_dir",
                  settings.resolve(settings.server.state_dir))
    privileged = any(0 < lst.port < 1024 for lst in settings.listeners)
    if owner is None and os.geteuid() == 0 and not settings.server.user and privileged:
        report.warn(f"{src}: [server] user is not set: elemta keeps running as root after it "
                    'binds its ports; set user = "elemta" (a system user) so that it drops '
                    "root once listening")


def _check_tls_files(report: Report, settings: Settings) -> None:
    from .smtp.tls import TLSConfigError, check_pair

    tls = settings.tls
    if tls.cert_file is None or tls.key_file is None:
        return  # a self-signed certificate is made at start-up, or a plugin provides one
    cert_file, key_file = settings.resolve(tls.cert_file), settings.resolve(tls.key_file)
    try:
        certificate = check_pair(cert_file, key_file)
    except TLSConfigError as e:
        report.error(f"{settings.source}: [tls]: {e}")
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    expires = certificate.not_valid_after_utc
    if expires < now:
        report.error(f"{settings.source}: [tls] cert_file: the certificate in {cert_file} "
                     f"expired on {expires:%Y-%m-%d %H:%M} UTC; renew it (clients that "
                     "verify certificates refuse it, and senders requiring TLS defer)")
    elif expires - now < EXPIRY_WARNING:
        report.warn(f"{settings.source}: [tls] cert_file: the certificate in {cert_file} "
                    f"expires on {expires:%Y-%m-%d %H:%M} UTC, in {(expires - now).days} "
                    "days; renew it soon")


def _check_user(report: Report, settings: Settings) -> tuple[int, int] | None:
    """The ``[server] user``/``group`` to run as (uid, gid), if set and usable."""
    server, src = settings.server, settings.source
    if server.user is None:
        if server.group is not None:
            report.error(f"{src}: [server] group needs [server] user as well")
        return None
    try:
        account = pwd.getpwnam(server.user)
    except KeyError:
        report.error(f"{src}: [server] user: there is no user {server.user!r} on this "
                     f"machine; create it (`useradd --system --home-dir /var/lib/elemta "
                     f"{server.user}`) or correct the name")
        return None
    gid = account.pw_gid
    if server.group is not None:
        try:
            gid = grp.getgrnam(server.group).gr_gid
        except KeyError:
            report.error(f"{src}: [server] group: there is no group {server.group!r} on this "
                         "machine; create it or correct the name")
            return None
    if os.geteuid() not in (0, account.pw_uid):
        report.error(f"{src}: [server] user = {server.user!r}: elemta runs as "
                     f"{pwd.getpwuid(os.geteuid()).pw_name}, and only root can become "
                     f"{server.user!r}; start it as root (it binds its ports, then becomes "
                     f"{server.user!r}) or as {server.user!r}")
        return None
    return account.pw_uid, gid


def _check_folder(report: Report, settings: Settings, key: str, path: Path) -> None:
    """A folder Elemta keeps mail or state in: a directory (or creatable), not writable by
    others."""
    src = settings.source
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK) \
                and os.geteuid() != 0:
            report.error(f"{src}: {key}: {path} does not exist and cannot be created "
                         f"({parent} is not writable by this user); create it, owned by the "
                         "user elemta runs as, with mode 0700")
        return
    except OSError as e:
        report.error(f"{src}: {key}: cannot look at {path}: {os.strerror(e.errno or 0)}")
        return
    if not stat.S_ISDIR(st.st_mode):
        report.error(f"{src}: {key}: {path} is not a directory; name a directory (it is "
                     "created if missing)")
    elif st.st_mode & stat.S_IWOTH:
        report.error(f"{src}: {key}: {path} is writable by every user (mode "
                     f"{stat.S_IMODE(st.st_mode):04o}): anyone on this machine could add or "
                     f"change mail; `chmod o-w {path}` (0700 is right)")


__all__ = ["Finding", "Report", "check_config", "check_machine"]

