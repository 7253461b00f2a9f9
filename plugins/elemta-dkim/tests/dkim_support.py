"""Helpers for the elemta-dkim tests: keys, independent signatures, records, the verifier."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
import io
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from elemta import Accept, Reject, hookimpl
from elemta_dkim.keys import dns_record
from elemta_dkim.verify import Checked, Verifier

MESSAGE = (b"From: Alice <alice@example.com>\r\n"
           b"To: Bob <bob@example.org>\r\n"
           b"Subject: Quarterly numbers\r\n"
           b"Date: Mon, 07 Dec 2026 09:00:00 +0000\r\n"
           b"Message-ID: <q4@example.com>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"\r\n"
           b"Hello Bob,\r\n"
           b"\r\n"
           b"the numbers  are in.   Trailing spaces here:   \r\n"
           b"\tand a tab.\r\n"
           b"\r\n"
           b"\r\n")


def _probable_prime(bits: int, rng: random.Random) -> int:
    while True:
        n = rng.getrandbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
        if all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)):
            return n


@functools.cache
def rsa_key(bits: int = 2048, seed: int = 0) -> rsa.RSAPrivateKey:
    """An RSA key; under 1024 bits (which cryptography refuses to make) it is built here
    from its primes, so that tests can show such keys are refused."""
    if bits >= 1024 and seed == 0:
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    rng = random.Random(bits * 1000 + seed)
    e = 65537
    while True:
        p, q = _probable_prime(bits // 2, rng), _probable_prime(bits // 2, rng)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e and (p * q).bit_length() == bits:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q))
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def pem(key: Any, pkcs8: bool = False) -> bytes:
    fmt = serialization.PrivateFormat.PKCS8 if pkcs8 or isinstance(
        key, ed25519.Ed25519PrivateKey) else serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def ed_seed_b64(key: ed25519.Ed25519PrivateKey) -> bytes:
    import base64

    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return base64.b64encode(raw)


def publish(dns_server: Any, domain: str, selector: str, key: Any, extra: str = "") -> str:
    """Publish ``key``'s record (with ``extra`` tags, such as ``"t=s; "``) in the test DNS."""
    name = f"{selector}._domainkey.{domain}"
    dns_server.zone(domain)  # (again: zone() replaces the SOA and NS it made before)
    record = dns_record(key)
    if extra:
        record = record.replace("; p=", f"; {extra.strip().rstrip(';')}; p=")
    dns_server.add(name, "TXT", record)
    return record


def dkimpy_sign(message: bytes, domain: str, selector: str, key: Any, **kw: Any) -> bytes:
    """``message`` with a signature by dkimpy, an independent signer, prepended."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        kw.setdefault("signature_algorithm", b"ed25519-sha256")
        secret = ed_seed_b64(key)
    else:
        secret = pem(key)
    kw.setdefault("canonicalize", (b"relaxed", b"relaxed"))
    sig = dkim.sign(message, selector.encode(), domain.encode(), secret, **kw)
    return sig + message


def tamper_body(message: bytes) -> bytes:
    return message.replace(b"numbers  are in", b"numbers are out", 1)


def tamper_subject(message: bytes) -> bytes:
    return re.sub(rb"Subject: [^\r]*", b"Subject: Quarterly numbers (revised)", message,
                  count=1)


async def verify(dns_server: Any, message: bytes, **kw: Any) -> list[Checked]:
    """Our verifier, asking the test DNS server, on ``message``."""
    resolver = dns_server.resolver()
    with ThreadPoolExecutor(2) as executor:
        verifier = Verifier(resolver.dkim_dnsfunc, executor, **kw)
        return await verifier.verify(lambda: io.BytesIO(message))


def results(checked: list[Checked]) -> list[str]:
    return [c.result for c in checked]


USERS = {"alice@example.com": "correct horse"}


class Users:
    """A tiny AUTH datasource: alice logs in with her password."""

    @hookimpl
    def auth(self, credentials: Any) -> Accept | Reject:
        if USERS.get(credentials.login) == credentials.password:
            return Accept()
        return Reject(535, "5.7.8", "Authentication credentials invalid")


@dataclass
class Keys:
    folder: Path
    rsa: Any
    ed: Any

    def entries(self, domain: str = "example.com") -> list[dict[str, Any]]:
        return [
            {"domain": domain, "selector": "rsa2026", "algorithm": "rsa",
             "key_file": "example.com.rsa2026.key"},
            {"domain": domain, "selector": "ed2026", "algorithm": "ed25519",
             "key_file": str(self.folder / "example.com.ed2026.key")},
        ]


def server_config(dns_server: Any, signing: Keys | None = None, **dkim: Any) -> dict[str, Any]:
    """An ``elemta_server`` config asking the test DNS, with ``[plugins.dkim]`` (``dkim``,
    and the keys of ``signing``)."""
    table: dict[str, Any] = dict(dkim)
    if signing is not None:
        table.setdefault("keys_dir", str(signing.folder))
        table.setdefault("keys", signing.entries())
    return {"dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1,
                    "attempts": 1},
            "plugins": {"dkim": table}}


# ------------------------------------------------------------------ OpenDKIM


_SERVE_ZONE = r'''
"""Serve the test zone on 127.0.0.1:53 (UDP and TCP) inside a private network namespace."""
import json, socket, struct, sys, threading
from elemta.testing import ZoneServer

zone = ZoneServer()
for name, rdtype, value in json.load(open(sys.argv[1])):
    if rdtype == "ZONE":
        zone.zone(name)
    else:
        zone.add(name, rdtype, value)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 53))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("127.0.0.1", 53))
tcp.listen(16)


def read(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve_udp():
    while True:
        packet, peer = udp.recvfrom(65535)
        reply = zone.answer(packet, "udp")
        if reply:
            udp.sendto(reply, peer)


def serve_tcp():
    while True:
        conn, _ = tcp.accept()
        with conn:
            conn.settimeout(5)
            try:
                while (head := read(conn, 2)) is not None:
                    packet = read(conn, struct.unpack("!H", head)[0])
                    reply = packet and zone.answer(packet, "tcp")
                    if reply:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                pass


threading.Thread(target=serve_udp, daemon=True).start()
threading.Thread(target=serve_tcp, daemon=True).start()
open(sys.argv[2], "w").write("ready")
threading.Event().wait()
'''

_IN_NAMESPACE = r'''
set -e
ip link set lo up
mount --bind "$DIR/resolv.conf" /etc/resolv.conf
"$PY" "$DIR/serve.py" "$DIR/zone.json" "$DIR/ready" &
server=$!
i=0
while [ ! -e "$DIR/ready" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
set +e
for m in "$DIR"/msg*.eml; do
    "$TESTMSG" < "$m" > "$m.out" 2> "$m.err"
    echo $? > "$m.rc"
done
kill $server
'''


def unshare_problem() -> str | None:
    """Why a private mount and network namespace cannot be made here, or ``None``."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare(1) or ip(8) is not installed (util-linux, iproute2)"
    run = subprocess.run(["unshare", "-mn", "true"], capture_output=True, text=True,
                         timeout=30)
    if run.returncode != 0:
        return ("cannot make a private mount+network namespace for opendkim-testmsg "
                f"(needs root or user namespaces): {run.stderr.strip()}")
    return None


def opendkim_verify(testmsg: str, tmp: Path, messages: list[bytes],
                    records: list[tuple[str, str, str]]) -> list[tuple[int, str]]:
    """Verify each message with ``testmsg`` (opendkim-testmsg), which asks the libc resolver: in a
    private mount+network namespace, /etc/resolv.conf points at a ZoneServer serving
    ``records`` ((name, "TXT", text), or (apex, "ZONE", "")) on 127.0.0.1:53.

    :returns: (exit status, standard error) per message: 0 when a signature verified.
    """
    import json
    import subprocess
    import sys

    folder = tmp / "opendkim"
    folder.mkdir()
    (folder / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    (folder / "zone.json").write_text(json.dumps(records))
    (folder / "serve.py").write_text(_SERVE_ZONE)
    (folder / "run.sh").write_text(_IN_NAMESPACE)
    for i, message in enumerate(messages):
        (folder / f"msg{i:03d}.eml").write_bytes(message)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DIR": str(folder), "PY": sys.executable,
           "TESTMSG": testmsg}
    run = subprocess.run(["unshare", "-mn", "sh", str(folder / "run.sh")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"the namespace script failed: {run.stderr}"
    return [(int((folder / f"msg{i:03d}.eml.rc").read_text()),
             (folder / f"msg{i:03d}.eml.err").read_text().strip())
            for i in range(len(messages))]


def key_records(domain: str, keys: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, "TXT", record) for ``keys`` (selector → private key), and the zone."""
    return [(domain, "ZONE", "")] + [(f"{sel}._domainkey.{domain}", "TXT", dns_record(key))
                                     for sel, key in keys.items()]


def only_signature(message: bytes, keep: int) -> bytes:
    """``message`` with every DKIM-Signature field but the ``keep``-th removed."""
    head, sep, body = message.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    signatures = [f for f in fields if f.lower().startswith(b"dkim-signature:")]
    kept = [f for f in fields
            if not f.lower().startswith(b"dkim-signature:") or f is signatures[keep]]
    return b"\r\n".join(kept) + sep + body


class LibOpenDKIM:
    """Signing with OpenDKIM's own library (libopendkim, which opendkim-testmsg and the
    opendkim milter are built on), through ctypes: opendkim-testmsg itself signs only
    with rsa-sha1 and has no option for another algorithm."""

    RSA_SHA1, RSA_SHA256, ED25519_SHA256 = 0, 1, 2
    SIMPLE, RELAXED = 0, 1

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("opendkim") or "libopendkim.so.11"
        self.ct = ctypes
        lib = self.lib = ctypes.CDLL(name)
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        lib.dkim_init.restype = vp
        lib.dkim_init.argtypes = [vp, vp]
        lib.dkim_sign.restype = vp
        lib.dkim_sign.argtypes = [vp, cp, vp, cp, cp, cp, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_ssize_t, ctypes.POINTER(ctypes.c_int)]
        lib.dkim_chunk.argtypes = [vp, cp, ctypes.c_size_t]
        lib.dkim_eom.argtypes = [vp, vp]
        lib.dkim_getsighdr_d.argtypes = [vp, ctypes.c_size_t, ctypes.POINTER(cp),
                                         ctypes.POINTER(ctypes.c_size_t)]
        lib.dkim_free.argtypes = [vp]
        lib.dkim_close.argtypes = [vp]
        lib.dkim_getresultstr.restype = cp
        lib.dkim_getresultstr.argtypes = [ctypes.c_int]

    def sign(self, message: bytes, domain: str, selector: str, key_pem: bytes, algorithm: int,
             header_canon: int = RELAXED, body_canon: int = RELAXED) -> bytes:
        ct, lib = self.ct, self.lib
        handle = lib.dkim_init(None, None)
        status = ct.c_int(0)
        dkim_ = lib.dkim_sign(handle, b"elemta-test", None, key_pem, selector.encode(),
                              domain.encode(), header_canon, body_canon, algorithm, -1,
                              ct.byref(status))
        try:
            assert dkim_, f"dkim_sign: {lib.dkim_getresultstr(status.value)}"
            for data in (message, None):
                rc = lib.dkim_chunk(dkim_, data, len(data) if data else 0)
                assert rc == 0, f"dkim_chunk: {lib.dkim_getresultstr(rc)}"
            rc = lib.dkim_eom(dkim_, None)
            assert rc == 0, f"dkim_eom: {lib.dkim_getresultstr(rc)}"
            value, size = ct.c_char_p(), ct.c_size_t()
            rc = lib.dkim_getsighdr_d(dkim_, len("DKIM-Signature"), ct.byref(value),
                                      ct.byref(size))
            assert rc == 0, f"dkim_getsighdr_d: {lib.dkim_getresultstr(rc)}"
            return b"DKIM-Signature: " + value.value + b"\r\n" + message
        finally:
            if dkim_:
                lib.dkim_free(dkim_)
            lib.dkim_close(handle)
