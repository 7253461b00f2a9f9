"""Password hashes: argon2id for new ones, and the schemes existing user tables hold.

New passwords are hashed with **argon2id** (a PHC string, ``$argon2id$v=19$m=…``).
Stored hashes are recognised by their prefix, Dovecot's ``{SCHEME}`` or the
crypt(3) ``$id$``, so that a Dovecot or Postfix user table works unchanged:

==========================================  ===================================
``$argon2id$``, ``{ARGON2ID}``, ``$argon2i$``  argon2-cffi
``$2y$``, ``$2b$``, ``$2a$``, ``{BLF-CRYPT}``  bcrypt (passwords cut at 72 bytes,
                                               as every bcrypt implementation did)
``$6$``, ``$5$``, ``$1$``, ``$y$``,           crypt(3) through ``crypt_r``
``{SHA512-CRYPT}``, ``{SHA256-CRYPT}``,
``{MD5-CRYPT}``, ``{CRYPT}``
``{SSHA512}``, ``{SSHA256}``, ``{SSHA}``,     hashlib (salted or not)
``{SHA512}``, ``{SHA256}``, ``{SHA}``
``{PLAIN}``, ``{CLEARTEXT}``                   compared in constant time
==========================================  ===================================

A login with an old scheme (or with argon2 parameters below the configured
ones) asks to be re-hashed: the datasource then stores argon2id where it can
write. Verifying is slow on purpose: :class:`Verifier` runs it on a few
threads (``max_concurrent``), lets at most ``max_waiting`` more wait, and
answers "busy" beyond that, so a login flood costs bounded memory and never
blocks the event loop. An argon2 hash asking for more memory than
``max_memory_kib`` is refused rather than computed. An unknown login is
checked against a made-up hash, so that it costs the same time as a known one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import argon2
import bcrypt

log = logging.getLogger("elemta.datasource")

_ARGON2_MEMORY = re.compile(r"\$m=(\d+)")


class Busy(Exception):
    """Too many logins are being checked at once: a temporary failure."""


@dataclass(frozen=True, slots=True)
class Check:
    """A verification's result: the password is right; the hash should be renewed."""

    ok: bool
    rehash: bool = False


@dataclass(frozen=True, slots=True)
class Argon2Params:
    time_cost: int = 2
    memory_kib: int = 19_456      # OWASP's minimum profile: 19 MiB, t=2, p=1
    parallelism: int = 1


def _crypt(password: str, stored: str) -> bool:
    import crypt_r

    try:
        computed = crypt_r.crypt(password, stored)
    except (ValueError, OSError):
        return False
    return computed is not None and hmac.compare_digest(computed, stored)


def _digest(name: str, password: str, stored: str, salted: bool) -> bool:
    try:
        raw = base64.b64decode(stored, validate=True)
    except (binascii.Error, ValueError):
        try:
            raw = bytes.fromhex(stored)      # Dovecot's {SHA256.HEX} style
        except ValueError:
            return False
    size = hashlib.new(name).digest_size
    if len(raw) < size or (not salted and len(raw) != size):
        return False
    digest, salt = raw[:size], raw[size:]
    computed = hashlib.new(name, password.encode("utf-8", "surrogateescape") + salt).digest()
    return hmac.compare_digest(computed, digest)


_DIGESTS = {"SSHA512": ("sha512", True), "SSHA256": ("sha256", True), "SSHA": ("sha1", True),
            "SHA512": ("sha512", False), "SHA256": ("sha256", False), "SHA": ("sha1", False),
            "SHA1": ("sha1", False)}
_CRYPT_SCHEMES = {"SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT", "CRYPT", "DES-CRYPT"}


def split_scheme(stored: str) -> tuple[str, str]:
    """``("SHA512-CRYPT", "$6$…")`` for ``{SHA512-CRYPT}$6$…``; ``("", stored)`` without one."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 1:
            return stored[1:end].upper(), stored[end + 1:]
    return "", stored


def scheme_of(stored: str) -> str:
    """A hash's scheme as an operator would name it (for ``elemta users list``)."""
    scheme, rest = split_scheme(stored)
    if scheme:
        return scheme
    for prefix, name in (("$argon2id$", "ARGON2ID"), ("$argon2i$", "ARGON2I"),
                         ("$2", "BLF-CRYPT"), ("$6$", "SHA512-CRYPT"), ("$5$", "SHA256-CRYPT"),
                         ("$1$", "MD5-CRYPT"), ("$y$", "YESCRYPT")):
        if rest.startswith(prefix):
            return name
    return "CRYPT"


class Hasher:
    """Makes and checks hashes (blocking: call from a thread, or use :class:`Verifier`)."""

    def __init__(self, params: Argon2Params = Argon2Params(),
                 max_memory_kib: int = 262_144) -> None:
        self.params = params
        self.max_memory_kib = max_memory_kib
        self._argon2 = argon2.PasswordHasher(time_cost=params.time_cost,
                                             memory_cost=params.memory_kib,
                                             parallelism=params.parallelism,
                                             type=argon2.Type.ID)
        self._dummy = self._argon2.hash("not the password of anybody")

    def hash(self, password: str) -> str:
        """An argon2id PHC string for ``password``."""
        return self._argon2.hash(password)

    def verify(self, stored: str | None, password: str) -> Check:
        """Whether ``password`` matches ``stored``; ``None`` costs the same and fails."""
        if stored is None:
            self._argon2_verify(self._dummy, password)
            return Check(False)
        scheme, rest = split_scheme(stored)
        if scheme in ("ARGON2ID", "ARGON2I") or (not scheme and rest.startswith("$argon2")):
            ok = self._argon2_verify(rest, password)
            return Check(ok, ok and (scheme != "" or self._argon2.check_needs_rehash(rest)))
        if scheme == "BLF-CRYPT" or (not scheme and rest.startswith(("$2a$", "$2b$", "$2y$"))):
            ok = self._bcrypt(rest, password)
            return Check(ok, ok)
        if scheme in _CRYPT_SCHEMES or (not scheme and rest.startswith("$")):
            ok = _crypt(password, rest)
            return Check(ok, ok)
        if scheme in _DIGESTS:
            name, salted = _DIGESTS[scheme]
            ok = _digest(name, password, rest, salted)
            return Check(ok, ok)
        if scheme in ("PLAIN", "CLEARTEXT"):
            ok = hmac.compare_digest(rest.encode("utf-8", "surrogateescape"),
                                     password.encode("utf-8", "surrogateescape"))
            return Check(ok, ok)
        log.error("datasource: a stored password uses the unknown scheme {%s}; nobody can "
                  "log in with it (set a new one with `elemta users passwd`)", scheme or "?")
        self._argon2_verify(self._dummy, password)
        return Check(False)

    def _argon2_verify(self, phc: str, password: str) -> bool:
        found = _ARGON2_MEMORY.search(phc)
        if found is not None and int(found.group(1)) > self.max_memory_kib:
            log.error("datasource: an argon2 hash asks for %s KiB of memory, more than "
                      "max_memory_kib (%d); refused. Raise the limit, or set the password "
                      "again", found.group(1), self.max_memory_kib)
            return False
        try:
            return self._argon2.verify(phc, password)
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    @staticmethod
    def _bcrypt(stored: str, password: str) -> bool:
        secret = password.encode("utf-8", "surrogateescape")[:72]
        if stored.startswith("$2y$"):
            stored = "$2b$" + stored[4:]     # the same algorithm; bcrypt wants $2b$
        try:
            return bcrypt.checkpw(secret, stored.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return False


class Verifier:
    """:meth:`Hasher.verify` off the event loop, with a bound on work and on waiting."""

    def __init__(self, hasher: Hasher, max_concurrent: int = 4, max_waiting: int = 64) -> None:
        self.hasher = hasher
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="datasource-hash")
        self._slots = asyncio.Semaphore(max_concurrent)
        self._waiting = 0

    async def verify(self, stored: str | None, password: str) -> Check:
        """:class:`Busy` when ``max_concurrent`` checks run and ``max_waiting`` wait."""
        if self._slots.locked() and self._waiting >= self.max_waiting:
            raise Busy(f"{self.max_concurrent} logins being checked and {self._waiting} "
                       "waiting")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self.hasher.verify, stored, password)
        finally:
            self._slots.release()

    async def run(self, fn, *args):  # type: ignore[no-untyped-def]
        """Other slow work (hashing a new password, deriving SCRAM keys) on the same threads."""
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
