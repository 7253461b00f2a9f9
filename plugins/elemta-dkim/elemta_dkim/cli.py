"""``elemta dkim keygen`` and ``elemta dkim check`` (the comparison: :mod:`.check`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from pathlib import Path

import click

from .check import KeyToCheck, Status, check_key, configured, served
from .keys import (DEFAULT_RSA_BITS, dns_record, generate, txt_strings, write_private_key,
                   zone_line)
from .settings import DkimSettings, check_selector, normalize_domain


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"elemta dkim: {message}", err=True)
    sys.exit(code)


def _settings() -> tuple[DkimSettings, Path]:
    """``[plugins.dkim]`` and its keys_dir, made absolute against the config file."""
    from elemta import current_settings, plugin_settings

    settings: DkimSettings = plugin_settings("dkim")
    return settings, current_settings().resolve(Path(settings.keys_dir))


@click.group("dkim")
def dkim_group() -> None:
    """DKIM signing keys: make them, and check their DNS records."""


@dkim_group.command()
@click.option("--domain", required=True, help="The domain that signs (d=), such as example.com.")
@click.option("--selector", required=True, help="The selector (s=), such as 2026a.")
@click.option("--algo", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True,
              help="Key type: rsa (understood everywhere) or ed25519 (RFC 8463; sign with "
                   "both).")
@click.option("--bits", type=int, default=DEFAULT_RSA_BITS, show_default=True,
              help="RSA key size (1024-8192).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the private key (default: keys_dir/DOMAIN.SELECTOR.key).")
def keygen(domain: str, selector: str, algo: str, bits: int, out: Path | None) -> None:
    """Make a private key (mode 0600) and print the DNS record to publish and the
    configuration to add."""
    try:
        domain = normalize_domain(domain)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--domain") from None
    try:
        selector = check_selector(selector)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--selector") from None
    try:
        private = generate(algo, bits)  # type: ignore[arg-type]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--bits") from None
    settings, keys_dir = _settings()
    if out is None:
        path = keys_dir / f"{domain}.{selector}.key"
        try:
            keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"cannot create the keys folder {keys_dir} ({e.strerror}); create it, or "
                  "write the key elsewhere with --out PATH")
    else:
        path = out.absolute()
    try:
        write_private_key(path, private)
    except FileExistsError:
        _fail(f"{path} exists; a new key needs a new selector (the old one must keep "
              "verifying mail still in transit): choose another --selector, or remove the "
              "file if it is unused")
    except OSError as e:
        _fail(f"cannot write {path} ({e.strerror}); check the folder, or choose --out PATH")
    name = f"{selector}._domainkey.{domain}"
    record = dns_record(private)
    try:
        key_file = str(path.relative_to(keys_dir))
    except ValueError:
        key_file = str(path)
    tomorrow = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).replace(
        minute=0, second=0, microsecond=0)
    click.echo(f"wrote the private key {path} (mode 0600)\n")
    click.echo(f"1. Publish this TXT record (one record; its {len(txt_strings(record))} "
               "strings are joined):\n")
    click.echo(f"   name:  {name}")
    click.echo("   value: " + " ".join(f'"{s}"' for s in txt_strings(record)) + "\n")
    click.echo("   as a zone file line:\n")
    click.echo(f"   {zone_line(name, record)}\n")
    click.echo("2. Add the key to [plugins.dkim] in elemta.toml; not_before gives the record "
               "time to reach every resolver:\n")
    click.echo("   [[plugins.dkim.keys]]")
    click.echo(f'   domain = "{domain}"')
    click.echo(f'   selector = "{selector}"')
    click.echo(f'   algorithm = "{algo}"')
    click.echo(f'   key_file = "{key_file}"')
    click.echo(f"   not_before = {tomorrow:%Y-%m-%dT%H:%M:%SZ}\n")
    click.echo(f"3. Check it once published: elemta dkim check --domain {domain}")


def _ask_server(domains: list[str]) -> tuple[list[KeyToCheck], list[str]]:
    """The keys the running server would sign these domains' mail with (``dkim.keys``), and
    the problems that left a domain unchecked."""
    from elemta import ControlError, ServerNotRunning, control_request

    keys: list[KeyToCheck] = []
    problems: list[str] = []
    for i, domain in enumerate(domains):
        unchecked = ", ".join(domains[i:])
        try:
            answer = control_request("dkim.keys", {"domain": domain})
        except ServerNotRunning as e:
            return keys, problems + [
                f"{unchecked}: no key is configured in [plugins.dkim] keys (make one with "
                "`elemta dkim keygen --domain D --selector S`), and keys kept in the "
                f"datasource are checked through the running server: {e}"]
        except ControlError as e:
            return keys, problems + [f"{unchecked}: not checked: {e}"]
        if answer.get("store_error"):
            problems.append(f"{domain}: not checked: {answer['store_error']}")
        elif not answer.get("keys"):
            problems.append(f"{domain}: no key signs its mail: none in [plugins.dkim] keys, "
                            "none in the key store (add one with `elemta domains dkim add`, "
                            "or `elemta dkim keygen`)")
        keys += [served(k) for k in answer.get("keys", ())]
    return keys, problems


@dkim_group.command()
@click.option("--domain", "domains", multiple=True,
              help="Check this domain's keys, configured or kept in the datasource "
                   "(repeatable; default: every configured domain).")
def check(domains: tuple[str, ...]) -> None:
    """Look up each signing key's record through [dns] and compare it with the key.

    Configured keys are read from their files; the keys of a --domain with none
    configured (kept in the datasource) are asked of the running server. Exit
    status 0 only when every record matches its key.
    """
    from elemta import Resolver, current_settings

    settings, keys_dir = _settings()
    wanted: list[str] = []
    for d in domains:
        try:
            wanted.append(normalize_domain(d))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--domain") from None
    wanted = sorted(set(wanted))
    keys = [configured(k, keys_dir) for k in settings.keys if not wanted or k.domain in wanted]
    if not wanted and not keys:
        _fail("no key is configured in [plugins.dkim] keys; make one with `elemta dkim "
              "keygen --domain D --selector S` and add it, or check a domain whose keys "
              "are in the datasource with --domain D")
    problems: list[str] = []
    unconfigured = [d for d in wanted if not any(k.domain == d for k in settings.keys)]
    if unconfigured:
        found, problems = _ask_server(unconfigured)
        keys += found
    resolver = Resolver(current_settings().dns)

    async def run() -> list[Status]:
        return list(await asyncio.gather(*(check_key(resolver, k) for k in keys)))

    statuses = asyncio.run(run()) if keys else []
    width = max((len(s.name) for s in statuses), default=0)
    for s in statuses:
        click.echo(f"{s.status:<9}  {s.name:<{width}}  {s.detail}")
        if s.record is not None:
            click.echo(f"{'':<9}  publish: {zone_line(s.name, s.record)}")
    bad = [s for s in statuses if s.status != "match"]
    for problem in problems:
        click.echo(f"elemta dkim: {problem}", err=True)
    if bad:
        click.echo(f"\n{len(bad)} of {len(statuses)} key(s) do not match their DNS record",
                   err=True)
    if bad or problems:
        sys.exit(1)
