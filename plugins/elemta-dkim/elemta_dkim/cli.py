"""``elemta dkim keygen`` and ``elemta dkim check``."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from .keys import (DEFAULT_RSA_BITS, KeyFileError, PrivateKey, dns_record, generate,
                   load_private_key, public_p, txt_strings, write_private_key, zone_line)
from .settings import DkimSettings, KeySettings, check_selector, normalize_domain


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


@dataclass
class Status:
    name: str
    status: str      # match, mismatch, missing, DNS error, key error
    detail: str
    record: str | None = None  # what to publish, when it is not published right


def _tags(text: str) -> dict[str, str] | None:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            return None
        tags[key.strip().lower()] = value.strip()
    return tags


async def _check_one(resolver: object, entry: KeySettings, keys_dir: Path) -> Status:
    from elemta import NotFound, TempError

    name = f"{entry.selector}._domainkey.{entry.domain}"
    path = Path(entry.key_file)
    path = path if path.is_absolute() else keys_dir / path
    try:
        private: PrivateKey = load_private_key(path, entry.algorithm)
    except KeyFileError as e:
        return Status(name, "key error", str(e))
    expected = dns_record(private)
    try:
        records = await resolver.txt(name)  # type: ignore[attr-defined]
    except NotFound:
        return Status(name, "missing", "no TXT record at this name", expected)
    except TempError as e:
        return Status(name, "DNS error", f"the lookup failed ({e.reason}); try again, or "
                      "check [dns] nameservers")
    except Exception as e:  # any other resolver error: say it, never a match
        return Status(name, "DNS error", str(e))
    dkim_records = [t for t in map(_tags, records)
                    if t is not None and "p" in t and t.get("v", "DKIM1") == "DKIM1"]
    if not dkim_records:
        return Status(name, "missing", f"{len(records)} TXT record(s), none a DKIM key "
                      "record (v=DKIM1; ...; p=...)", expected)
    if len(dkim_records) > 1:
        return Status(name, "mismatch", f"{len(dkim_records)} DKIM records; publish "
                      "exactly one", expected)
    tags = dkim_records[0]
    published_p = re.sub(r"\s+", "", tags["p"])
    published_k = tags.get("k", "rsa").lower()
    if not published_p:
        return Status(name, "mismatch", "the published key is revoked (empty p=)", expected)
    if published_k != entry.algorithm:
        return Status(name, "mismatch", f"the record says k={published_k}, the key file "
                      f"holds an {entry.algorithm} key", expected)
    if published_p != public_p(private):
        return Status(name, "mismatch", "the record holds another public key than "
                      f"{path}", expected)
    hashes = tags.get("h")
    if hashes and "sha256" not in {h.strip().lower() for h in hashes.split(":")}:
        return Status(name, "mismatch", f"the record allows only h={hashes}; signatures "
                      "use sha256", expected)
    now = dt.datetime.now(dt.timezone.utc)
    when = "signing now" if entry.valid_at(now) else "not signing now (not_before/not_after)"
    return Status(name, "match", f"{entry.algorithm}, {when}")


@dkim_group.command()
@click.option("--domain", "domains", multiple=True,
              help="Check this domain's keys (repeatable; default: every configured domain).")
def check(domains: tuple[str, ...]) -> None:
    """Look up each configured selector's record through [dns] and compare it with the key.

    Exit status 0 only when every record matches its key.
    """
    from elemta import Resolver, current_settings

    settings, keys_dir = _settings()
    wanted: set[str] = set()
    for d in domains:
        try:
            wanted.add(normalize_domain(d))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--domain") from None
    entries = [k for k in settings.keys if not wanted or k.domain in wanted]
    if not entries:
        what = ", ".join(sorted(wanted)) if wanted else "any domain"
        _fail(f"no key is configured for {what} in [plugins.dkim] keys; make one with "
              "`elemta dkim keygen --domain D --selector S` and add it")
    resolver = Resolver(current_settings().dns)

    async def run() -> list[Status]:
        return list(await asyncio.gather(*(_check_one(resolver, e, keys_dir)
                                           for e in entries)))

    statuses = asyncio.run(run())
    width = max(len(s.name) for s in statuses)
    for s in statuses:
        click.echo(f"{s.status:<9}  {s.name:<{width}}  {s.detail}")
        if s.record is not None:
            click.echo(f"{'':<9}  publish: {zone_line(s.name, s.record)}")
    bad = [s for s in statuses if s.status != "match"]
    if bad:
        click.echo(f"\n{len(bad)} of {len(statuses)} key(s) do not match their DNS record",
                   err=True)
        sys.exit(1)
