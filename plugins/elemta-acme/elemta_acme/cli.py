"""``elemta acme status`` and ``elemta acme renew [--force]``.

Both work from the state directory, while a server runs or not:

- ``status`` reads the current certificate and ``status.json``.
- ``renew``: when a server uses the state directory (it holds a shared lock
  on ``server.lock``), the command writes ``renew-request.<id>.json``, which the
  server's renewal task takes within a second; the server orders (under the
  order lock), puts the new certificate in service for new connections at
  once, and writes its answer into ``status.json``, which the command waits
  for and prints. Without a running server the command orders by itself,
  under the same lock, and the server uses the certificate when it starts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click

from .renewer import Renewer, when_text
from .schedule import threshold_time
from .settings import AcmeSettings
from .store import Store, StoreError

REQUEST_POLL_SECONDS = 0.2


def _setup() -> tuple[AcmeSettings, Store]:
    from elemta import current_settings, plugin_settings

    from . import state_dir_of

    settings: AcmeSettings = plugin_settings("acme")
    return settings, Store(state_dir_of(settings, current_settings()))


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"elemta: acme: {message}", err=True)
    sys.exit(code)


def report(settings: AcmeSettings, store: Store) -> dict[str, Any]:
    """What ``elemta acme status`` shows, as data (``--json``)."""
    out: dict[str, Any] = {"names": list(settings.names), "directory": settings.directory_url,
                           "state_dir": str(store.root)}
    try:
        current = store.load_current()
    except StoreError as e:
        current = None
        out["certificate_error"] = str(e)
    try:
        status = store.read_status()
    except StoreError as e:
        status = {}
        out["status_error"] = str(e)
    if current is not None:
        info = current.info
        out["certificate"] = {
            "generation": current.generation, "path": str(current.fullchain),
            "names": list(info.names), "issuer": info.issuer, "serial": info.serial_hex,
            "not_before": info.not_before.timestamp(), "not_after": info.not_after.timestamp(),
            "key_type": info.key_type}
        if status.get("renew_serial") == info.serial_hex and status.get("renew_at"):
            out["next_renewal"] = status["renew_at"]
            out["next_renewal_reason"] = status.get("renew_reason")
        else:
            when, reason = threshold_time(info, settings.renew_share, settings.renew_days)
            out["next_renewal"] = when.timestamp()
            out["next_renewal_reason"] = reason
        if set(info.names) != set(settings.names):
            out["next_renewal"] = time.time()
            out["next_renewal_reason"] = "names changed: the certificate is not for names"
        elif status.get("directory") not in (None, settings.directory_url):
            out["next_renewal"] = time.time()
            out["next_renewal_reason"] = (f"the directory changed: the certificate comes from "
                                          f"{status['directory']}")
    else:
        out["certificate"] = None
        out["next_renewal"] = status.get("next_attempt_at") or time.time()
        out["next_renewal_reason"] = "there is no certificate yet"
    for key in ("failures", "last_error", "last_error_kind", "last_error_at", "next_attempt_at",
                "rate_limited_until", "last_attempt_at", "last_success_at", "ari", "requests"):
        if status.get(key) is not None:
            out[key] = status[key]
    try:
        out["ordering"] = store.order_lock().holder()
        out["server_running"] = store.server_running()
    except OSError as e:
        out["ordering"], out["server_running"] = None, None
        out["lock_error"] = str(e)
    out["pending_requests"] = store.pending_requests()
    return out


def _text(data: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str]] = [("names", ", ".join(data["names"])),
                                   ("directory", data["directory"]),
                                   ("state directory", data["state_dir"])]
    cert = data.get("certificate")
    if cert:
        left = cert["not_after"] - time.time()
        rows += [("certificate", cert["path"]),
                 ("certificate names", ", ".join(cert["names"])),
                 ("issuer", cert["issuer"]),
                 ("serial", cert["serial"]),
                 ("key", cert["key_type"]),
                 ("not before", when_text(cert["not_before"])),
                 ("not after", f"{when_text(cert['not_after'])} "
                               f"({'expired' if left < 0 else f'in {left / 86400:.1f} days'})")]
    else:
        rows.append(("certificate", data.get("certificate_error")
                     or "none yet (the server serves its [tls] or self-signed certificate)"))
    rows.append(("next renewal", f"{when_text(data['next_renewal'])} "
                                 f"({data.get('next_renewal_reason')})"))
    ari = data.get("ari") or {}
    if not cert or ari.get("serial") != cert["serial"]:
        ari = {}
    if ari.get("offered"):
        rows.append(("renewal info (ARI)", f"window {when_text(ari['start'])} to "
                                           f"{when_text(ari['end'])}, chosen "
                                           f"{when_text(ari.get('chosen'))}"))
    elif ari.get("offered") is False:
        rows.append(("renewal info (ARI)", "not offered by the CA; renew_share/renew_days "
                                           "apply"))
    elif ari.get("error"):
        rows.append(("renewal info (ARI)", f"unavailable: {ari['error']}"))
    if data.get("last_success_at"):
        rows.append(("last success", when_text(data["last_success_at"])))
    if data.get("last_error"):
        rows.append(("last error", f"{when_text(data.get('last_error_at'))}: "
                                   f"{data['last_error']}"))
        rows.append(("failures in a row", str(data.get("failures", 0))))
    if data.get("next_attempt_at") and data["next_attempt_at"] > time.time():
        rows.append(("next attempt", when_text(data["next_attempt_at"])))
    if data.get("rate_limited_until") and data["rate_limited_until"] > time.time():
        rows.append(("rate-limited until", when_text(data["rate_limited_until"])))
    if data.get("ordering"):
        rows.append(("ordering now", data["ordering"]))
    if data.get("pending_requests"):
        rows.append(("pending requests", f"{len(data['pending_requests'])} (`elemta acme renew` "
                                         "waits for the server to take them)"))
    rows.append(("server", "running (takes `elemta acme renew` requests)"
                 if data.get("server_running") else "not running on this state directory"))
    width = max(len(k) for k, _ in rows) + 1
    return [f"{k + ':':<{width}} {v}" for k, v in rows]


def add_commands(cli: click.Group) -> None:
    @cli.group()
    def acme() -> None:
        """ACME certificates: what is in service, and renewing it."""

    @acme.command()
    @click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
    def status(as_json: bool) -> None:
        """The certificate in service, the next renewal and the last error."""
        settings, store = _setup()
        if not store.root.is_dir():
            _fail(f"no state directory at {store.root}: the server has not started with the "
                  "acme plugin yet (or state_dir points elsewhere)")
        data = report(settings, store)
        if as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            for line in _text(data):
                click.echo(line)

    @acme.command()
    @click.option("--force", is_flag=True,
                  help="Order a new certificate even if the current one is not due.")
    @click.option("--wait", "wait_seconds", type=click.FloatRange(min=1), default=None,
                  help="How long to wait for the result (default: twice order_timeout_seconds).")
    def renew(force: bool, wait_seconds: float | None) -> None:
        """Renew now if due (or --force): through the running server, or from here."""
        settings, store = _setup()
        wait = wait_seconds if wait_seconds is not None else (
            2 * settings.order_timeout_seconds + 4 * settings.request_timeout_seconds)
        try:
            store.ensure()
            running = store.server_running()
        except (StoreError, OSError) as e:
            _fail(str(e))
        if running:
            _through_server(store, force, wait)
        else:
            _from_here(settings, store, force, wait)


def _answer(store: Store, request_id: str) -> dict[str, Any] | None:
    try:
        answers = store.read_status().get("requests") or []
    except StoreError:
        return None
    return next((a for a in answers if a.get("id") == request_id), None)


def _through_server(store: Store, force: bool, wait: float) -> None:
    request = store.write_request(force)
    click.echo(f"asked the running server to {'renew' if force else 'renew if due'}; waiting "
               f"for its answer (at most {wait:.0f} s)")
    deadline = time.monotonic() + wait
    while (answer := _answer(store, request["id"])) is None:
        taken = not store.request_path(request["id"]).exists()
        if not taken and not store.server_running() and store.withdraw_request(request["id"]):
            _fail("the server stopped before it took the request; run `elemta acme renew` "
                  "again")
        if time.monotonic() >= deadline:
            if store.withdraw_request(request["id"]):
                _fail(f"no server took the request within {wait:.0f} s; is the server "
                      "running with the acme plugin? (`elemta acme status`)")
            _fail(f"the server has not finished within {wait:.0f} s; it goes on: see "
                  "`elemta acme status`")
        time.sleep(REQUEST_POLL_SECONDS)
    click.echo(answer.get("message", ""))
    if not answer.get("ok"):
        sys.exit(1)
    if answer.get("ordered"):
        click.echo("new connections use the new certificate")


def _from_here(settings: AcmeSettings, store: Store, force: bool, wait: float) -> None:
    renewer = Renewer(settings, store)
    try:
        generation = store.current_generation()
        click.echo(f"no server is running on {store.root}: ordering from here")
        result = asyncio.run(renewer.renew_now(force=force, generation=generation,
                                               wait_seconds=wait))
    except StoreError as e:
        _fail(str(e))
    click.echo(result.message)
    if not result.ok:
        sys.exit(1)
    if result.ordered:
        click.echo("the server uses it from its next start")
