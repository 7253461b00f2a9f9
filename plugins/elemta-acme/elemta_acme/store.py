"""The state directory: account, certificates, renewal status, locks, requests.

Layout (``<[server] state_dir>/acme`` by default, mode 0700)::

    account.key                 the ACME account's private key (0600)
    account.json                the account URL at the CA and the directory it belongs to
    certificates/<generation>/  one issued certificate: privkey.pem (0600), fullchain.pem,
                                cert.pem, chain.pem
    current -> certificates/<generation>   the certificate in use (a symlink)
    status.json                 next renewal, next attempt, failures, last error, ARI window
    renew-request.<id>.json     written by `elemta acme renew`, taken by a running server
    order.lock                  flock held around ordering; the holder's pid inside
    server.lock                 flock (shared) held by every server that uses this directory
    status.lock                 flock around read-modify-write of status.json
    challenges/<token>.json     key authorizations of an order in progress

Every file is written atomically and durably: a temporary file, fsync, rename,
fsync of the directory. A new certificate is written into a new generation
folder and becomes current by replacing the ``current`` symlink, so a reader
always sees a complete certificate and the key that belongs to it, never a mix
of two generations. Readers resolve ``current`` once and read both files from
the folder it names.

All of these functions block (file I/O, flock): call them in a thread from the
event loop.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.serialization import Encoding

from elemta import fsync_dir, write_file_durably

from .certs import CertInfo, cert_info, check_pair, split_chain

LEFTOVER_SECONDS = 3600.0
"""Temporary files older than this are the leftovers of a writer that died."""
KEEP_GENERATIONS = 3
"""Certificate generations kept: the current one and the two before it."""


class StoreError(Exception):
    """The state directory cannot be used; ``str()`` names the path and the fix."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


@dataclass(frozen=True)
class Current:
    """The certificate in use, read from one generation folder."""

    generation: str
    folder: Path
    info: CertInfo

    @property
    def fullchain(self) -> Path:
        return self.folder / "fullchain.pem"

    @property
    def privkey(self) -> Path:
        return self.folder / "privkey.pem"


class OrderLock:
    """The lock held around ordering: ``flock`` on ``order.lock``, non-blocking.

    Locks of different open files conflict even inside one process, so two
    renewals in one process exclude each other too. The holder writes its pid
    (and host name) into the file for ``elemta acme status`` and the logs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock if it is free; whether it was taken."""
        if self._fd is not None:
            raise RuntimeError("the order lock is already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str | None:
        """``"pid 1234 on host (since …)"`` while another open file holds the lock, else None."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
                if len(text) >= 3 and text[2].isdigit():
                    since = datetime.datetime.fromtimestamp(int(text[2]), datetime.timezone.utc)
                    return f"pid {text[0]} on {text[1]} (since {since:%Y-%m-%d %H:%M:%S} UTC)"
                return "another process (its pid is not written yet)"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


class Store:
    """One ACME state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.account_key = self.root / "account.key"
        self.account_json = self.root / "account.json"
        self.certificates = self.root / "certificates"
        self.current_link = self.root / "current"
        self.status_json = self.root / "status.json"
        self.order_lock_path = self.root / "order.lock"
        self.server_lock_path = self.root / "server.lock"
        self.status_lock_path = self.root / "status.lock"
        self.challenges = self.root / "challenges"
        self._server_fd: int | None = None

    # ------------------------------------------------------------ the folder

    def ensure(self) -> None:
        """Create the folders (0700); ``StoreError`` saying how to fix a failure."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.certificates.mkdir(mode=0o700, exist_ok=True)
            self.challenges.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the ACME state directory {self.root}: "
                             f"{_reason(e)}; make its parent writable by the user Elemta "
                             "runs as, or set state_dir in [plugins.acme]") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"the ACME state directory {self.root} is not writable by "
                             "the user Elemta runs as; fix its owner or mode")
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files of writers that died (a crash between write and rename)."""
        cutoff = time.time() - LEFTOVER_SECONDS
        for folder in (self.root, self.challenges):
            try:
                candidates = [p for p in folder.iterdir() if p.name.startswith(".")
                              and p.name.endswith((".tmp", ".claimed"))]
            except OSError:
                continue
            for path in candidates:
                try:
                    if path.lstat().st_mtime < cutoff:
                        path.unlink()
                except OSError:
                    pass

    def write(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        """Replace ``path`` atomically and durably (a temporary name of its own per writer)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            write_file_durably(path, data, mode=mode, tmp=tmp)
        except OSError as e:
            raise StoreError(f"cannot write {path}: {_reason(e)}; make {path.parent} "
                             "writable by the user Elemta runs as (and check free space)") \
                from None

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {path}: {e}; remove the file if it was edited "
                             "by hand") from None
        return data if isinstance(data, dict) else None

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        self.write(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")

    # ------------------------------------------------------------ the account

    def load_account_key(self) -> bytes | None:
        try:
            return self.account_key.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read the account key {self.account_key}: "
                             f"{_reason(e)}") from None

    def save_account_key(self, pem: bytes) -> None:
        self.write(self.account_key, pem, mode=0o600)

    def load_account(self) -> dict[str, Any] | None:
        return self._read_json(self.account_json)

    def save_account(self, account: dict[str, Any]) -> None:
        self._write_json(self.account_json, account)

    # ------------------------------------------------------------ certificates

    def current_generation(self) -> str | None:
        """The name of the generation in use, or None (one ``readlink``)."""
        try:
            return Path(os.readlink(self.current_link)).name
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.EINVAL:   # not a symlink
                raise StoreError(f"{self.current_link} is not a symlink; remove it and run "
                                 "`elemta acme renew`") from None
            raise StoreError(f"cannot read {self.current_link}: {_reason(e)}") from None

    def load_current(self) -> Current | None:
        """The certificate in use, checked (the key belongs to it), or None before the first."""
        generation = self.current_generation()
        if generation is None:
            return None
        folder = self.certificates / generation
        try:
            fullchain = (folder / "fullchain.pem").read_bytes()
            key = (folder / "privkey.pem").read_bytes()
            leaf, _ = check_pair(fullchain, key)
        except FileNotFoundError as e:
            raise StoreError(f"{e.filename} is missing; run `elemta acme renew --force` to "
                             "order a new certificate") from None
        except (OSError, ValueError) as e:
            raise StoreError(f"the certificate in {folder} cannot be used ({e}); run "
                             "`elemta acme renew --force` to order a new one") from None
        return Current(generation, folder, cert_info(leaf))

    def install(self, key_pem: bytes, fullchain_pem: bytes) -> Current:
        """Write a new generation and make it current; call with the order lock held."""
        chain = split_chain(fullchain_pem)
        leaf, _ = check_pair(fullchain_pem, key_pem)
        info = cert_info(leaf)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        generation = f"{stamp}-{info.serial_hex[:16]}"
        folder = self.certificates / generation
        n = 1
        while folder.exists():
            n += 1
            folder = self.certificates / f"{generation}.{n}"
        generation = folder.name
        try:
            folder.mkdir(mode=0o700)
            fsync_dir(self.certificates)
        except OSError as e:
            raise StoreError(f"cannot create {folder}: {_reason(e)}") from None
        self.write(folder / "privkey.pem", key_pem, mode=0o600)
        self.write(folder / "cert.pem", chain[0].public_bytes(Encoding.PEM))
        self.write(folder / "chain.pem", b"".join(c.public_bytes(Encoding.PEM)
                                                   for c in chain[1:]))
        self.write(folder / "fullchain.pem", fullchain_pem)
        tmp = self.root / f".current.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.symlink(Path("certificates") / generation, tmp)
            os.replace(tmp, self.current_link)
            fsync_dir(self.root)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot point {self.current_link} at the new certificate: "
                             f"{_reason(e)}") from None
        self._prune(generation)
        return Current(generation, folder, info)

    def _prune(self, keep: str) -> None:
        try:
            generations = sorted((p for p in self.certificates.iterdir() if p.is_dir()),
                                 key=lambda p: p.name, reverse=True)
        except OSError:
            return
        old = [p for p in generations if p.name != keep][KEEP_GENERATIONS - 1:]
        for folder in old:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------ status

    def read_status(self) -> dict[str, Any]:
        return self._read_json(self.status_json) or {}

    def update_status(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change and write ``status.json`` under ``status.lock`` (short, blocking)."""
        try:
            fd = os.open(self.status_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open {self.status_lock_path}: {_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                status = self.read_status()
            except StoreError:
                status = {}
            change(status)
            self._write_json(self.status_json, status)
            return status
        finally:
            os.close(fd)

    # ------------------------------------------------------------ renewal requests

    def request_path(self, request_id: str) -> Path:
        return self.root / f"renew-request.{request_id}.json"

    def write_request(self, force: bool) -> dict[str, Any]:
        """Ask the running server to renew (``elemta acme renew``); the request.

        Each request is a file of its own, so that two commands at once both get
        their answer.
        """
        # the id sorts by time, so requests are taken in the order they were made
        request_id = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        request = {"id": request_id, "force": force, "requested_at": time.time(),
                   "generation": self.current_generation(), "pid": os.getpid()}
        self._write_json(self.request_path(request["id"]), request)
        return request

    def _request_files(self) -> list[Path]:
        try:
            return sorted(self.root.glob("renew-request.*.json"))
        except OSError:
            return []

    def claim_request(self) -> dict[str, Any] | None:
        """Take the oldest pending request, if any; of several servers, exactly one gets it."""
        for path in self._request_files():
            claimed = self.root / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.claimed"
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue        # another server took it
            except OSError as e:
                raise StoreError(f"cannot take {path}: {_reason(e)}") from None
            try:
                request = self._read_json(claimed)
            except StoreError:
                request = None
            finally:
                claimed.unlink(missing_ok=True)
            if request and isinstance(request.get("id"), str):
                return request
        return None

    def pending_requests(self) -> list[dict[str, Any]]:
        out = []
        for path in self._request_files():
            try:
                request = self._read_json(path)
            except StoreError:
                continue
            if request:
                out.append(request)
        return out

    def withdraw_request(self, request_id: str) -> bool:
        """Remove a request no server took; whether it was still there."""
        try:
            self.request_path(request_id).unlink()
        except FileNotFoundError:
            return False
        return True

    # ------------------------------------------------------------ locks

    def order_lock(self) -> OrderLock:
        return OrderLock(self.order_lock_path)

    def hold_server_lock(self) -> None:
        """Mark this directory as used by a running server (a shared flock, till release)."""
        if self._server_fd is not None:
            return
        fd = os.open(self.server_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._server_fd = fd

    def release_server_lock(self) -> None:
        fd, self._server_fd = self._server_fd, None
        if fd is not None:
            os.close(fd)

    def server_running(self) -> bool:
        """Whether a server holds ``server.lock`` (and so takes renewal requests)."""
        try:
            fd = os.open(self.server_lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # ------------------------------------------------------------ challenges

    def put_challenge(self, token: str, typ: str, name: str, key_authorization: str) -> None:
        self._write_json(self.challenges / f"{token}.json",
                         {"type": typ, "name": name, "token": token,
                          "key_authorization": key_authorization})

    def drop_challenge(self, token: str) -> None:
        (self.challenges / f"{token}.json").unlink(missing_ok=True)

    def challenge_files(self) -> list[dict[str, Any]]:
        """Every challenge of an order in progress (of this node or another one)."""
        out = []
        try:
            paths = sorted(self.challenges.glob("*.json"))
        except OSError:
            return out
        for path in paths:
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                out.append(data)
        return out
