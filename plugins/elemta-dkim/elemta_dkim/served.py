"""``dkim.keys``: the keys the running server would sign a domain's mail with, answered on its
control socket for ``elemta dkim check`` (public keys only, never a private one)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING, Any

from .keys import KeyFileError, SigningKey, load_stored_key
from .settings import normalize_domain
from .sign import choose
from .stored import KeyUnavailable, StoredKeys, signing_domains

if TYPE_CHECKING:
    from . import DkimPlugin


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _entry(domain: str, selector: str, key: Any, source: str, signing: bool
           ) -> dict[str, Any]:
    """What the answer says of every key (``key``: its algorithm and validity dates)."""
    return {"domain": domain, "selector": selector, "algorithm": key.algorithm,
            "source": source, "not_before": _iso(key.not_before),
            "not_after": _iso(key.not_after), "signing_now": signing}


async def keys_answer(plugin: DkimPlugin, args: dict[str, Any]) -> dict[str, Any]:
    """``{"domain", "keys": [...], "store_error"}`` for ``args["domain"]``: the configured
    keys if the configuration signs for it (the key store is then never asked), else what
    the key store holds now (asked afresh, not from the signer's cache). Each key has
    ``p``, its public key as the DNS record's ``p=``, or ``error`` if it cannot be used.

    :raises ValueError: no domain, or not a domain name (the client is told).
    """
    domain = args.get("domain")
    if not isinstance(domain, str):
        raise ValueError('give the domain as {"domain": "example.com"}')
    domain = normalize_domain(domain)
    signer = plugin.signer
    if signer is None:
        raise ValueError("the dkim plugin has not started")
    now = dt.datetime.now(dt.timezone.utc)
    names = signing_domains(domain, plugin.settings.sign_subdomains)
    answer: dict[str, Any] = {"domain": domain, "keys": [], "store_error": None}
    if signer.configured(domain):
        configured = next(signer.by_domain[n] for n in names if n in signer.by_domain)
        chosen = choose(configured, now)
        answer["keys"] = [{**_entry(k.domain, k.selector, k, "config", k in chosen),
                           "key_file": str(k.path), "p": k.public_p()} for k in configured]
        return answer
    store = StoredKeys(plugin)
    records = []
    name = domain
    for name in names:
        try:
            records = await store.records(name)
        except KeyUnavailable as e:
            answer["store_error"] = str(e)
            return answer
        if records:
            break
    chosen = choose(records, now)
    loop = asyncio.get_running_loop()
    for entry in records:
        record = entry.record
        item = {**_entry(name, record.selector, entry, "datasource", entry in chosen),
                "key_file": record.key_file}
        try:
            key: SigningKey = await loop.run_in_executor(plugin.executor, load_stored_key,
                                                         record)
        except KeyFileError as e:
            item["error"] = (f"{e} (for the datasource's keys: `elemta domains dkim list "
                             f"{name}`)")
        else:
            item["p"] = key.public_p()
        answer["keys"].append(item)
    return answer
