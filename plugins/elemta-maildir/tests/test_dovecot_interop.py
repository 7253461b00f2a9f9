"""elemta-maildir against a real Dovecot 2.3: what Elemta writes, Dovecot serves and counts.

A private Dovecot (``elemta_lmtp.testing.Dovecot``: IMAP on 127.0.0.1, a
Maildir++ quota) serves the mailboxes a real Elemta server delivers into.
Mail goes in over SMTP; it is read back over IMAP with :mod:`imaplib`. The
quota test compares Elemta's accounting with Dovecot's own
(``GETQUOTAROOT``, ``doveadm quota recalc``), starting before Dovecot ever
wrote a ``maildirsize``.
"""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import stat
from pathlib import Path

import aiosmtplib
import pytest
from elemta_maildir.store import read_maildirsize, scan_usage

testing = pytest.importorskip("elemta_lmtp.testing",
                              reason="the Dovecot test server comes with elemta-lmtp")
Dovecot, DovecotUser = testing.Dovecot, testing.DovecotUser

QUOTA_BYTES = 8192   # Dovecot's "8K"
USERS = [DovecotUser("mia@example.test"), DovecotUser("existing@example.test"),
         DovecotUser("create@example.test"), DovecotUser("pia@example.test"),
         DovecotUser("quinn@example.test", quota="*:storage=8K:messages=100")]


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot.started(USERS) as server:
        yield server


async def start(elemta_server, dovecot: Dovecot, **maildir):
    """An Elemta server delivering into Dovecot's mailboxes, as their owner."""
    settings = {"path": dovecot.mail_path, "owner": dovecot.owner, "create_mailboxes": True,
                **maildir}
    return await elemta_server({"delivery": {"enabled": True, "workers": 2,
                                             "retry_intervals_seconds": [60]},
                                "plugins": {"maildir": settings}}, enabled=["maildir"])


async def submit(server, rcpts: list[str], content: bytes, **options) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port("mx"),
                               start_tls=False) as client:
        errors, reply = await client.sendmail("alice@origin.example", rcpts, content, **options)
    assert not errors, errors
    await server.app.spool.checkpoint()
    return reply.rsplit(" ", 1)[1]


def spooled(server, queue_id: str) -> dict | None:
    for state in ("ready", "deferred", "hold", "failed"):
        path = server.spool_path / state / f"{queue_id}.json"
        if path.exists():
            return {"state": state, **json.loads(path.read_bytes())}
    return None


async def settled(server, queue_id: str) -> dict | None:
    """The envelope once every recipient had an attempt: ``None`` when all were delivered."""
    async with asyncio.timeout(10):
        while (env := spooled(server, queue_id)) is not None and not (
                env["state"] == "deferred" and env["attempts"] >= 1):
            await asyncio.sleep(0.02)
    return env


def message(subject: str, body: bytes = b"body\r\n") -> bytes:
    return (b"From: alice@origin.example\r\nTo: someone@example.test\r\nSubject: " +
            subject.encode() + b"\r\nMessage-ID: <" + subject.encode() +
            b"@origin.example>\r\n\r\n" + body)


def folders(imap) -> set[str]:
    status, lines = imap.list()
    assert status == "OK", lines
    return {line.decode().rsplit(' "." ', 1)[1].strip('"') for line in lines}


def fetch_all(imap, mailbox: str) -> list[bytes]:
    """Every message of ``mailbox`` (its modified UTF-7 name) as Dovecot serves it."""
    status, data = imap.select(mailbox, readonly=True)
    assert status == "OK", (mailbox, data)
    count = int(data[0])
    if not count:
        return []
    status, data = imap.fetch(f"1:{count}", "(BODY.PEEK[])")
    assert status == "OK", data
    return [part[1] for part in data if isinstance(part, tuple)]


def quota_root(imap) -> dict[str, tuple[int, int]]:
    """``GETQUOTAROOT INBOX``: resource → (usage, limit); STORAGE in KiB, rounded up."""
    status, data = imap.getquotaroot("INBOX")
    assert status == "OK", data
    words = data[1][0].decode().partition("(")[2].rstrip(")").split()
    return {words[i]: (int(words[i + 1]), int(words[i + 2])) for i in range(0, len(words), 3)}


def put(path: Path, size: int, owner: tuple[int, int]) -> None:
    """A message file of ``size`` bytes, as Dovecot would have left it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"Subject: old\r\n\r\n" + b"x" * (size - 16))
    os.chown(path, *owner)


# ------------------------------------------------------------------ what IMAP shows


async def test_a_delivered_message_is_served_by_dovecot_byte_for_byte(elemta_server, dovecot):
    server = await start(elemta_server, dovecot)
    content = message("exact", b".a line with a dot\r\n..two\r\n\xe2\x82\xac 8-bit\r\n"
                               + b"y" * 998 + b"\r\n\r\n  blanks  \r\nend\r\n")
    queue_id = await submit(server, ["Mia@Example.Test"], content,
                            mail_options=["BODY=8BITMIME"])
    assert await settled(server, queue_id) is None
    box = dovecot.maildir("mia@example.test")
    [path] = (box / "new").iterdir()
    written = path.read_bytes()
    for made in (box, box / "new", path):
        st = made.stat()
        assert (st.st_uid, st.st_gid) == (dovecot.uid, dovecot.gid)
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0   # nobody else reads mail
    with dovecot.imap("mia@example.test") as imap:
        [served] = fetch_all(imap, "INBOX")
    assert served == written
    assert served.startswith(b"Return-Path: <alice@origin.example>\r\n"
                             b"Delivered-To: Mia@Example.Test\r\nReceived: ")
    assert served.endswith(b"\r\n" + content)


@pytest.mark.parametrize("mode", ["existing", "create"])
async def test_a_detail_picks_the_imap_folder_of_that_name_whatever_its_case(
        elemta_server, dovecot, mode):
    user = f"{mode}@example.test"
    with dovecot.imap(user) as imap:
        assert imap.create("Work")[0] == "OK"
    server = await start(elemta_server, dovecot, detail_folder=mode)
    # one message each: a transaction keeps one of two addresses differing only by case
    for detail in ("Work", "WORK", "Lists"):
        queue_id = await submit(server, [f"{mode}+{detail}@example.test"],
                                message(f"detail-{detail}"))
        assert await settled(server, queue_id) is None
    with dovecot.imap(user) as imap:
        if mode == "create":
            assert folders(imap) == {"INBOX", "Work", "Lists"}   # no "WORK", no "work"
            assert (len(fetch_all(imap, "Work")), len(fetch_all(imap, "Lists")),
                    len(fetch_all(imap, "INBOX"))) == (2, 1, 0)
        else:
            assert folders(imap) == {"INBOX", "Work"}
            assert len(fetch_all(imap, "Work")) == 2 and len(fetch_all(imap, "INBOX")) == 1


async def test_non_ascii_and_ampersand_details_are_folders_dovecot_opens(elemta_server,
                                                                         dovecot):
    server = await start(elemta_server, dovecot, detail_folder="create")
    content = message("utf7")
    queue_id = await submit(server, ["pia+café@example.test", "pia+r&d@example.test",
                                     "pia+lists.python@example.test"], content,
                            mail_options=["SMTPUTF8"])
    assert await settled(server, queue_id) is None
    box = dovecot.maildir("pia@example.test")
    assert {p.name for p in box.iterdir() if p.name.startswith(".")} == {
        ".caf&AOk-", ".r&-d", ".lists.python"}
    with dovecot.imap("pia@example.test") as imap:
        # RFC 3501 §5.1.3 spellings, written out here rather than computed
        assert {"caf&AOk-", "r&-d", "lists.python"} <= folders(imap)
        for name, address in (("caf&AOk-", "pia+café@example.test"),
                              ("r&-d", "pia+r&d@example.test"),
                              ("lists.python", "pia+lists.python@example.test")):
            [served] = fetch_all(imap, name)
            assert f"Delivered-To: {address}\r\n".encode() in served
            assert served.endswith(b"\r\n" + content)


# ------------------------------------------------------------------ quota


async def test_elemta_and_dovecot_agree_on_the_quota_from_the_first_delivery(elemta_server,
                                                                              dovecot):
    """No ``maildirsize`` yet: Elemta counts what Dovecot counts, writes the file, refuses alike."""
    user = "quinn@example.test"
    box = dovecot.maildir(user)
    owner = (dovecot.uid, dovecot.gid)
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    for folder in (box, box / "cur", box / "new", box / "tmp"):
        os.chown(folder, *owner)
    put(box / "cur" / "1700000000.M1P1.old,S=3000,W=3050:2,S", 3000, owner)
    put(box / "cur" / "1700000001.M2P2.old:2,S", 2500, owner)          # no size: stat'ed
    put(box / ".café" / "cur" / "1700000002.M3P3.old,S=3000:2,", 3000, owner)  # not a folder
    put(box / ".r&d" / "new" / "1700000003.M4P4.old,S=3000", 3000, owner)     # to Dovecot
    assert not (box / "maildirsize").exists()

    server = await start(elemta_server, dovecot, quotas={user: QUOTA_BYTES})
    big = message("big", b"z" * 3000 + b"\r\n")
    big_id = await submit(server, [user], big)
    env = await settled(server, big_id)
    assert env["recipients"][0]["last_error"].startswith("452 4.2.2 mailbox of "
                                                         "<quinn@example.test> is full")
    elemta_view = read_maildirsize(box)
    assert elemta_view is not None and elemta_view.current
    assert (elemta_view.quota.limit_bytes, elemta_view.quota.used_bytes,
            elemta_view.quota.used_count) == (QUOTA_BYTES, 5500, 2)
    assert stat.S_IMODE((box / "maildirsize").stat().st_mode) == 0o600
    assert (box / "maildirsize").stat().st_uid == dovecot.uid

    small = message("small")
    small_id = await submit(server, [user], small)
    assert await settled(server, small_id) is None   # the unreachable folders do not count
    [delivered] = (box / "new").iterdir()
    elemta_view = read_maildirsize(box).quota
    assert (elemta_view.used_bytes, elemta_view.used_count) == (
        5500 + delivered.stat().st_size, 3)
    scanned = scan_usage(box)
    assert (scanned.used_bytes, scanned.used_count) == (elemta_view.used_bytes, 3)

    with dovecot.imap(user) as imap:
        assert quota_root(imap) == {"STORAGE": (-(-elemta_view.used_bytes // 1024),
                                                QUOTA_BYTES // 1024),
                                    "MESSAGE": (3, 100)}
    dovecot.doveadm("quota", "recalc", "-u", user)   # Dovecot's own count, written to the file
    assert (box / "maildirsize").read_text().split("\n")[1] == f"{elemta_view.used_bytes} 3"

    # what Elemta deferred, Dovecot refuses too
    with smtplib.LMTP(str(dovecot.lmtp_socket)) as lmtp:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            lmtp.sendmail("alice@origin.example", [user], big)
    assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (552, b"5.2.2")
