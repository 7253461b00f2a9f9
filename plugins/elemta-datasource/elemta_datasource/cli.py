"""``elemta domains|mailboxes|aliases|rules``: edit the directory, whatever the backend
(``elemta users``: :mod:`.cli_users`).

The commands act on the backend the configuration names (``--config``), the
same one the running server reads; the server sees a change once its lookup
cache expires (``cache_seconds``, 10 s by default).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import click

from .directory import (BackendUnavailable, DirectoryError, Domain, Rule, check_rule,
                        normalize_address, normalize_domain, normalize_target)


def _with_backend(op: Callable[[Any], Awaitable[Any]]) -> Any:
    from elemta import current_settings, plugin_settings

    from .backends import make_backend

    settings = plugin_settings("datasource")
    backend = make_backend(settings, current_settings())

    async def run() -> Any:
        await backend.open()
        try:
            return await op(backend)
        finally:
            await backend.close()

    try:
        return asyncio.run(run())
    except (DirectoryError, BackendUnavailable) as e:
        click.echo(f"elemta: {e}", err=True)
        sys.exit(1)


def _checked(fn: Callable[[str], str], value: str) -> str:
    try:
        return fn(value)
    except DirectoryError as e:
        raise click.BadParameter(str(e)) from None


def add_commands(cli: click.Group) -> None:
    from .cli_users import users

    for group in (domains, mailboxes, aliases, rules, users):
        if group.name not in cli.commands:
            cli.add_command(group)


# ------------------------------------------------------------------ domains


@click.group()
def domains() -> None:
    """Hosted domains (elemta-datasource)."""


@domains.command("add")
@click.argument("name")
@click.option("--catch-all", metavar="ADDRESS", help="Deliver mail for unknown users here.")
@click.option("--max-message-bytes", type=click.IntRange(min=1), default=None,
              help="Refuse larger messages for this domain (552 5.3.4).")
@click.option("--accept-unknown", is_flag=True,
              help="Accept any local part (default: unknown users get 550 5.1.1).")
@click.option("--update", is_flag=True, help="Change the settings of an existing domain.")
def domains_add(name: str, catch_all: str | None, max_message_bytes: int | None,
                accept_unknown: bool, update: bool) -> None:
    """Host the domain NAME."""
    d = Domain(_checked(normalize_domain, name), not accept_unknown,
               _checked(normalize_target, catch_all) if catch_all else None, max_message_bytes)
    _with_backend(lambda b: b.add_domain(d, replace=update))
    click.echo(f"domain {d.name} {'updated' if update else 'added'}")


@domains.command("list")
def domains_list() -> None:
    """List hosted domains and their settings."""
    rows = _with_backend(lambda b: b.list_domains())
    for d in rows:
        extra = []
        if not d.reject_unknown:
            extra.append("accept-unknown")
        if d.catch_all:
            extra.append(f"catch-all={d.catch_all}")
        if d.max_message_bytes:
            extra.append(f"max-message-bytes={d.max_message_bytes}")
        for key in ("messages_per_hour", "messages_per_day"):
            if getattr(d, key) is not None:
                extra.append(f"{key.replace('_', '-')}={getattr(d, key)}")
        click.echo(f"{d.name}\t{' '.join(extra)}".rstrip())
    click.echo(f"{len(rows)} domain{'s' if len(rows) != 1 else ''}", err=True)


def limit_changes(**options: str | None) -> dict[str, int | None]:
    """``--messages-per-hour N|0|none``…: a number of messages, ``0`` for no limit (whatever
    ``[plugins.ratelimit]`` says), ``none`` to leave it to ``[plugins.ratelimit]``."""
    changes: dict[str, int | None] = {}
    for key, value in options.items():
        if value is None:
            continue
        if value.lower() == "none":
            changes[key] = None
        elif value.isdigit():
            changes[key] = int(value)
        else:
            raise click.BadParameter(f"{value!r}: a number of messages, 0 for no limit, or "
                                     "none", param_hint=f"--{key.replace('_', '-')}")
    return changes


@domains.command("set")
@click.argument("name")
@click.option("--messages-per-hour", default=None, metavar="N|0|none",
              help="Messages per hour sent from NAME (0: no limit; none: the rate limiter's "
                   "configuration decides).")
@click.option("--messages-per-day", default=None, metavar="N|0|none",
              help="Messages per day sent from NAME (0: no limit; none: the configuration).")
def domains_set(name: str, messages_per_hour: str | None, messages_per_day: str | None) -> None:
    """Change the limits of mail sent from the hosted domain NAME (elemta-ratelimit)."""
    n = _checked(normalize_domain, name)
    changes = limit_changes(messages_per_hour=messages_per_hour,
                            messages_per_day=messages_per_day)
    if not changes:
        raise click.UsageError("nothing to change: give --messages-per-hour or "
                               "--messages-per-day")
    if not _with_backend(lambda b: b.set_domain_limits(n, **changes)):
        click.echo(f"elemta: domain {n} is not hosted (add it with `elemta domains add {n}`)",
                   err=True)
        sys.exit(1)
    shown = ", ".join(f"{k.replace('_', '-')}={'none' if v is None else v}"
                      for k, v in changes.items())
    click.echo(f"domain {n}: {shown}")


@domains.command("remove")
@click.argument("name")
def domains_remove(name: str) -> None:
    """Stop hosting NAME (its mailboxes and aliases are removed too; mail stays on disk)."""
    n = _checked(normalize_domain, name)
    if not _with_backend(lambda b: b.remove_domain(n)):
        click.echo(f"elemta: domain {n} is not hosted (see `elemta domains list`)", err=True)
        sys.exit(1)
    click.echo(f"domain {n} removed")


# ------------------------------------------------------------------ DKIM keys


@domains.group("dkim")
def domains_dkim() -> None:
    """DKIM signing keys of hosted domains, for elemta-dkim (the dkim_keys hook)."""


def _when(value: str | None, option: str) -> float | None:
    from .dkim import timestamp

    try:
        return timestamp(value, option)
    except DirectoryError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


@domains_dkim.command("add")
@click.argument("domain")
@click.argument("selector")
@click.option("--algo", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True,
              help="Key type: rsa (understood everywhere) or ed25519 (RFC 8463; sign with both).")
@click.option("--bits", type=int, default=2048, show_default=True, help="RSA key size.")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keep the private key in this file (mode 0600) rather than in the directory: "
                   "an existing key file is used as it is, otherwise a new key is written there.")
@click.option("--not-before", metavar="WHEN", default=None,
              help="The key signs from then on (2027-01-01 or 2027-01-01T00:00:00Z; UTC).")
@click.option("--not-after", metavar="WHEN", default=None,
              help="The key signs until just before then.")
def dkim_add(domain: str, selector: str, algo: str, bits: int, key_file: Path | None,
             not_before: str | None, not_after: str | None) -> None:
    """Add a DKIM key for DOMAIN with SELECTOR; print the DNS record to publish.

    The private key is made here and stored in the directory (SQLite, PostgreSQL), or,
    with --key-file or the TOML backend, in a file of mode 0600.
    """
    from elemta import DkimKey, current_settings, plugin_settings

    from .dkim import check_key, check_selector, dns_record, generate, load, pem
    from .dkim import write_key_file, zone_line

    d = _checked(normalize_domain, domain)
    s = _checked(check_selector, selector)
    settings = plugin_settings("datasource")
    if key_file is None and settings.backend == "toml":
        toml = current_settings().resolve(settings.toml_path)
        key_file = toml.parent / "dkim" / f"{d}.{s}.key"
    written = False
    if key_file is not None and key_file.absolute().exists():
        private_text, path = None, str(key_file.absolute())
        probe = DkimKey(d, s, algo, key_file=path)
        try:
            private = load(probe)
        except DirectoryError as e:
            click.echo(f"elemta: {e}", err=True)
            sys.exit(1)
    else:
        try:
            private = generate(algo, bits)
        except DirectoryError as e:
            raise click.BadParameter(str(e), param_hint="--bits") from None
        private_text, path = pem(private), None
        if key_file is not None:
            path = str(key_file.absolute())
            try:
                write_key_file(Path(path), private_text)
            except OSError as e:
                click.echo(f"elemta: cannot write {path} ({e.strerror}); check the folder",
                           err=True)
                sys.exit(1)
            private_text, written = None, True
    try:
        record = check_key(DkimKey(d, s, algo, private_text, path,
                                   _when(not_before, "--not-before"),
                                   _when(not_after, "--not-after")))
    except (DirectoryError, ValueError) as e:
        raise click.BadParameter(str(e)) from None
    try:
        _with_backend(lambda b: b.add_dkim_key(record))
    except SystemExit:
        if written and path is not None:
            Path(path).unlink(missing_ok=True)   # not referenced: no key left behind
        raise
    name = f"{s}._domainkey.{d}"
    where = f"in the file {path}" if path else "in the directory"
    click.echo(f"DKIM key {s} of {d} added ({algo}, private key {where})\n")
    click.echo("Publish this TXT record before the key signs (not_before gives it time):\n")
    click.echo(f"   {zone_line(name, dns_record(private))}")


@domains_dkim.command("list")
@click.argument("domain", required=False)
@click.option("--records", is_flag=True, help="Also print each key's DNS record.")
def dkim_list(domain: str | None, records: bool) -> None:
    """List DKIM keys (of DOMAIN): selector, algorithm, validity, where the private key is."""
    from .dkim import dns_record, load, show_time, zone_line

    d = _checked(normalize_domain, domain) if domain else None
    rows = _with_backend(lambda b: b.list_dkim_keys(d))
    for k in rows:
        where = f"file {k.key_file}" if k.key_file else "stored"
        click.echo(f"{k.domain}\t{k.selector}\t{k.algorithm}\t{show_time(k.not_before)}\t"
                   f"{show_time(k.not_after)}\t{where}")
        if records:
            try:
                line = zone_line(f"{k.selector}._domainkey.{k.domain}", dns_record(load(k)))
            except DirectoryError as e:
                line = f"key error: {e}"
            click.echo(f"\t{line}")
    click.echo(f"{len(rows)} key{'s' if len(rows) != 1 else ''}", err=True)


@domains_dkim.command("remove")
@click.argument("domain")
@click.argument("selector")
def dkim_remove(domain: str, selector: str) -> None:
    """Stop signing with SELECTOR of DOMAIN (a key file it named is left in place)."""
    from .dkim import check_selector

    d, s = _checked(normalize_domain, domain), _checked(check_selector, selector)
    if not _with_backend(lambda b: b.remove_dkim_key(d, s)):
        click.echo(f"elemta: {d} has no DKIM key {s} (see `elemta domains dkim list`)", err=True)
        sys.exit(1)
    click.echo(f"DKIM key {s} of {d} removed; keep its DNS record published a week or two "
               "for mail still in transit")


# ------------------------------------------------------------------ mailboxes


@click.group()
def mailboxes() -> None:
    """Mailboxes of hosted domains (elemta-datasource)."""


@mailboxes.command("add")
@click.argument("address")
def mailboxes_add(address: str) -> None:
    """Create the mailbox ADDRESS (its domain must be hosted)."""
    a = _checked(normalize_address, address)
    _with_backend(lambda b: b.add_mailbox(a))
    click.echo(f"mailbox {a} added")


@mailboxes.command("list")
@click.option("--domain", default=None, help="Only this domain's mailboxes.")
def mailboxes_list(domain: str | None) -> None:
    """List mailboxes."""
    d = _checked(normalize_domain, domain) if domain else None
    rows = _with_backend(lambda b: b.list_mailboxes(d))
    for a in rows:
        click.echo(a)
    click.echo(f"{len(rows)} mailbox{'es' if len(rows) != 1 else ''}", err=True)


@mailboxes.command("remove")
@click.argument("address")
def mailboxes_remove(address: str) -> None:
    """Remove the mailbox ADDRESS (its stored mail stays on disk)."""
    a = _checked(normalize_address, address)
    if not _with_backend(lambda b: b.remove_mailbox(a)):
        click.echo(f"elemta: there is no mailbox {a} (see `elemta mailboxes list`)", err=True)
        sys.exit(1)
    click.echo(f"mailbox {a} removed")


# ------------------------------------------------------------------ aliases


@click.group()
def aliases() -> None:
    """Aliases and distribution lists (elemta-datasource)."""


@aliases.command("add")
@click.argument("address")
@click.argument("targets", nargs=-1, required=True)
def aliases_add(address: str, targets: tuple[str, ...]) -> None:
    """Deliver mail for ADDRESS to TARGETS (mailboxes, other aliases, outside addresses)."""
    a = _checked(normalize_address, address)
    ts = [_checked(normalize_target, t) for t in targets]
    _with_backend(lambda b: b.add_alias(a, ts))
    click.echo(f"alias {a} → {', '.join(ts)}")


@aliases.command("list")
@click.option("--domain", default=None, help="Only this domain's aliases.")
def aliases_list(domain: str | None) -> None:
    """List aliases, one line per target."""
    d = _checked(normalize_domain, domain) if domain else None
    rows = _with_backend(lambda b: b.list_aliases(d))
    for a, t in rows:
        click.echo(f"{a}\t{t}")
    click.echo(f"{len(rows)} alias target{'s' if len(rows) != 1 else ''}", err=True)


@aliases.command("remove")
@click.argument("address")
@click.argument("target", required=False)
def aliases_remove(address: str, target: str | None) -> None:
    """Remove the alias ADDRESS, or only its TARGET."""
    a = _checked(normalize_address, address)
    t = _checked(normalize_target, target) if target else None
    n = _with_backend(lambda b: b.remove_alias(a, t))
    if not n:
        click.echo(f"elemta: there is no alias {a}{f' → {t}' if t else ''} "
                   "(see `elemta aliases list`)", err=True)
        sys.exit(1)
    click.echo(f"alias {a}: {n} target{'s' if n != 1 else ''} removed")


# ------------------------------------------------------------------ rules


@click.group()
def rules() -> None:
    """Routing rules: forward, redirect, reject, quarantine (elemta-datasource)."""


@rules.command("set")
@click.argument("pattern")
@click.argument("action", type=click.Choice(["forward", "redirect", "reject", "quarantine"]))
@click.option("--target", "targets", multiple=True,
              help="forward/redirect: an address, or @domain to keep the local part.")
@click.option("--code", type=int, default=None, help="reject: the reply code (default 550).")
@click.option("--enhanced", default=None, help="reject: the enhanced status (default 5.7.1).")
@click.option("--text", default=None, help="reject: the reply text; quarantine: the reason.")
def rules_set(pattern: str, action: str, targets: tuple[str, ...], code: int | None,
              enhanced: str | None, text: str | None) -> None:
    """Set the rule for PATTERN (a domain or an address), replacing any."""
    try:
        rule = check_rule(Rule(pattern, action, targets, code, enhanced, text))  # type: ignore[arg-type]
    except DirectoryError as e:
        raise click.UsageError(str(e)) from None
    _with_backend(lambda b: b.set_rule(rule))
    click.echo(f"rule {rule.pattern}: {_describe(rule)}")


@rules.command("list")
def rules_list() -> None:
    """List routing rules."""
    rows = _with_backend(lambda b: b.list_rules())
    for r in rows:
        click.echo(f"{r.pattern}\t{_describe(r)}")
    click.echo(f"{len(rows)} rule{'s' if len(rows) != 1 else ''}", err=True)


@rules.command("remove")
@click.argument("pattern")
def rules_remove(pattern: str) -> None:
    """Remove the rule for PATTERN."""
    from .directory import normalize_pattern

    p = _checked(normalize_pattern, pattern)
    if not _with_backend(lambda b: b.remove_rule(p)):
        click.echo(f"elemta: there is no rule for {p} (see `elemta rules list`)", err=True)
        sys.exit(1)
    click.echo(f"rule {p} removed")


def _describe(rule: Rule) -> str:
    if rule.action in ("forward", "redirect"):
        return f"{rule.action} to {', '.join(rule.targets)}"
    if rule.action == "reject":
        return f"reject {rule.code} {rule.enhanced} {rule.text}"
    return f"quarantine ({rule.text})"
