"""The password sources that hold hashes: the directory's users, a Dovecot passwd-file.

Both check with :class:`~.hashing.Verifier`: argon2id, bcrypt, crypt(3) and
the digest schemes, on a bounded pool of threads. The directory can be
written, so a login that succeeds with an old scheme stores argon2id in its
place, and a user without SCRAM keys gets them (the password is at hand only
then). A passwd-file is Dovecot's, and is only read.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from elemta import ScramKeys

from .directory import Backend, BackendUnavailable, DirectoryError, User
from .hashing import Verifier

log = logging.getLogger("elemta.datasource")


class DirectoryPasswords:
    """Hashes stored with the directory's users (``elemta users``)."""

    writable = True

    def __init__(self, backend: Backend, verifier: Verifier, scram_iterations: int) -> None:
        self.backend = backend
        self.verifier = verifier
        self.scram_iterations = scram_iterations

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def verify(self, login: str, password: str, *, peer_ip: str, secured: bool,
                     local_ip: str | None = None) -> str | None:
        user = await self.backend.get_user(login)
        stored = user.password if user is not None else None
        check = await self.verifier.verify(stored, password)
        if not check.ok or user is None:
            return None
        if check.rehash or user.scram is None:
            await self._upgrade(user, password, check.rehash)
        return user.address

    async def _upgrade(self, user: User, password: str, rehash: bool) -> None:
        """Store argon2id and SCRAM keys made from a password just proven right."""
        changes: dict[str, object] = {}
        try:
            if rehash:
                changes["password"] = await self.verifier.run(self.verifier.hasher.hash,
                                                              password)
            if user.scram is None:
                keys = await self.verifier.run(_derive, password, self.scram_iterations)
                changes["scram"] = keys.to_string()
            await self.backend.update_user(user.address, **changes)
        except (BackendUnavailable, DirectoryError) as e:
            log.warning("datasource: could not store new hashes for %s: %s", user.address, e)
            return
        log.info("datasource: %s now has %s", user.address,
                 " and ".join(("an argon2id hash" if k == "password" else "SCRAM keys")
                              for k in changes))


def _derive(password: str, iterations: int) -> ScramKeys:
    return ScramKeys.derive(password, iterations=iterations)


class PasswdFilePasswords:
    """A Dovecot passwd-file (``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra``), read-only.

    Re-read when it changes; a file that cannot be read keeps the last contents
    (and is logged). Without a ``{SCHEME}`` prefix a hash is crypt(3), as in
    Dovecot. An empty password field never logs in.
    """

    writable = False
    RECHECK_SECONDS = 1.0

    def __init__(self, path: Path, verifier: Verifier) -> None:
        self.path = Path(path)
        self.verifier = verifier
        self._entries: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    async def open(self) -> None:
        try:
            self._load()
        except OSError as e:
            raise BackendUnavailable(f"passwd-file {self.path}: {e.strerror or e} (set "
                                     "[plugins.datasource.auth] passwd_file to a readable "
                                     "file)") from None

    async def close(self) -> None:
        pass

    def _load(self) -> None:
        st = os.stat(self.path)
        entries: dict[str, str] = {}
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                user, sep, rest = line.partition(":")
                if not sep or not user:
                    log.warning("datasource: %s:%d: not user:password:…; skipped", self.path,
                                number)
                    continue
                entries[user] = rest.split(":", 1)[0]
        self._entries = entries
        self._stamp = (st.st_mtime_ns, st.st_size)

    def _fresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.RECHECK_SECONDS:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._load()
        except OSError as e:
            log.error("datasource: cannot read %s: %s; still using the previous contents",
                      self.path, e.strerror or e)

    async def verify(self, login: str, password: str, *, peer_ip: str, secured: bool,
                     local_ip: str | None = None) -> str | None:
        self._fresh()
        user = login if login in self._entries else login.lower()
        stored = self._entries.get(user) or None
        check = await self.verifier.verify(stored, password)
        return user if check.ok and stored is not None else None
