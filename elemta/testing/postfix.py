"""A private Postfix instance's configuration, for tests and benchmarks that run Postfix beside
Elemta (interoperability, and the same workload measured on both).

Everything of the instance lives in folders of its own: ``main.cf`` and
``master.cf`` in ``conf`` (with a copy of Debian's ``/etc/postfix`` for the
scripts ``postfix check`` reads), ``queue/`` and ``data/`` and the log
(``maillog``, written by postlogd) under ``root``. It listens on one loopback
port, relays for 127.0.0.0/8, does no DNS, sends no notices to postmaster, and
runs every daemon unchrooted as ``postfix``; nothing of the system's own Postfix
is used or touched. The master must run as root (Debian's ``postfix`` package,
installed by ``make test-tools``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["MASTER_SERVICES", "daemon_directory", "main_cf", "master_cf", "prepare"]

#: Debian's master.cf services, chroot off, the unused ones left out.
MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def daemon_directory() -> str:
    """Where this Postfix keeps its daemons (``postconf -h daemon_directory``)."""
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    try:
        out = subprocess.run([postconf, "-dh", "daemon_directory"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except OSError:
        out = ""
    return out or "/usr/lib/postfix/sbin"


def main_cf(conf: Path, root: Path, *, hostname: str, **settings: str) -> str:
    """``main.cf`` of a private instance; ``settings`` add to or replace its parameters."""
    params = {
        "compatibility_level": "3.6",
        "config_directory": str(conf),
        "queue_directory": f"{root}/queue",
        "data_directory": f"{root}/data",
        "command_directory": "/usr/sbin",
        "daemon_directory": daemon_directory(),
        "shlib_directory": "/usr/lib/postfix",
        "meta_directory": str(conf),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "maillog_file_prefixes": str(root),
        "maillog_file": f"{root}/maillog",
        "biff": "no",
        "alias_maps": "",
        "alias_database": "",
        "myhostname": hostname,
        "mydomain": hostname.partition(".")[2] or hostname,
        "myorigin": "$myhostname",
        "mydestination": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "smtpd_peername_lookup": "no",
        "smtp_dns_support_level": "disabled",
        "notify_classes": "",
        **settings,
    }
    return "".join(f"{k} = {v}\n" if v else f"{k} =\n" for k, v in params.items())


def master_cf(port: int, smtpd_options: dict[str, str] | None = None) -> str:
    """``master.cf``: one smtpd on ``127.0.0.1:port`` (with ``-o`` options), then
    :data:`MASTER_SERVICES`."""
    options = "".join(f"\n  -o {k}={v}" for k, v in (smtpd_options or {}).items())
    return f"127.0.0.1:{port} inet n - n - - smtpd{options}\n{MASTER_SERVICES}"


def prepare(root: Path, conf: Path) -> None:
    """Make the instance's folders: ``conf`` from ``/etc/postfix``, ``data/`` owned by
    ``postfix``, an empty ``queue/`` (``postfix check`` fills it in)."""
    shutil.copytree("/etc/postfix", conf, symlinks=True)   # postfix-files and scripts
    (root / "data").mkdir()
    shutil.chown(root / "data", "postfix", "postfix")
    (root / "queue").mkdir()
