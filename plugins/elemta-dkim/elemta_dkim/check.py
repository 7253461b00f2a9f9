"""``elemta dkim check``: each key's published record, looked up and compared with the key."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .keys import KeyFileError, load_private_key, public_p
from .settings import KeySettings


@dataclass(frozen=True, slots=True)
class KeyToCheck:
    """A key whose record is checked: its public key (``p``) or why it cannot be used."""

    domain: str
    selector: str
    algorithm: str
    holder: str          # where the private key is, as the report names it
    p: str | None
    error: str | None
    signing: str         # "signing now" or why not
    origin: str = ""     # where the server found it, when the server answered it

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def record(self) -> str | None:
        return None if self.p is None else f"v=DKIM1; k={self.algorithm}; p={self.p}"


def configured(entry: KeySettings, keys_dir: Path) -> KeyToCheck:
    """A ``[[plugins.dkim.keys]]`` entry, its key file read here."""
    path = Path(entry.key_file)
    path = path if path.is_absolute() else keys_dir / path
    p = error = None
    try:
        p = public_p(load_private_key(path, entry.algorithm))
    except KeyFileError as e:
        error = str(e)
    now = dt.datetime.now(dt.timezone.utc)
    signing = "signing now" if entry.valid_at(now) else "not signing now (not_before/not_after)"
    return KeyToCheck(entry.domain, entry.selector, entry.algorithm, str(path), p, error,
                      signing)


def served(key: dict[str, Any]) -> KeyToCheck:
    """A key of the running server's ``dkim.keys`` answer."""
    if key["source"] == "datasource":
        holder = f"the key stored in the datasource ({key.get('key_file') or 'its PEM text'})"
        origin = "in the datasource"
    else:
        holder = f"{key.get('key_file')} (on the server)"
        origin = "configured on the server"
    why_not = "not signing now (its validity dates, or a newer key of its algorithm)"
    return KeyToCheck(key["domain"], key["selector"], key["algorithm"], holder,
                      key.get("p"), key.get("error"),
                      "signing now" if key.get("signing_now") else why_not, origin)


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
        name, sep, value = part.partition("=")
        if not sep:
            return None
        tags[name.strip().lower()] = value.strip()
    return tags


async def check_key(resolver: Any, key: KeyToCheck) -> Status:
    """Look ``key``'s record up through ``resolver`` and compare it with the key."""
    from elemta import NotFound, TempError

    name, expected = key.name, key.record
    if key.error is not None or expected is None:
        return Status(name, "key error", key.error or "no public key")
    try:
        records = await resolver.txt(name)
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
    if published_k != key.algorithm:
        return Status(name, "mismatch", f"the record says k={published_k}, "
                      f"{key.holder} holds an {key.algorithm} key", expected)
    if published_p != key.p:
        return Status(name, "mismatch", "the record holds another public key than "
                      f"{key.holder}", expected)
    hashes = tags.get("h")
    if hashes and "sha256" not in {h.strip().lower() for h in hashes.split(":")}:
        return Status(name, "mismatch", f"the record allows only h={hashes}; signatures "
                      "use sha256", expected)
    origin = f", {key.origin}" if key.origin else ""
    return Status(name, "match", f"{key.algorithm}, {key.signing}{origin}")
