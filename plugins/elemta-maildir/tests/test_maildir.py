"""elemta-maildir end to end: SMTP in, the real runner, files in Maildir++ mailboxes out.

Each test starts an in-process server with the installed ``maildir`` plugin
enabled, sends mail to its MX listener and looks at the mailboxes on disk and
at the spool. Direct calls of the plugin's ``deliver`` (on the plugin instance
of a running server) cover what SMTP cannot express: redelivery of the same
envelope and a 20 MiB message.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import time
import tracemalloc
from pathlib import Path

import pydantic
import pytest
from elemta_maildir import MaildirSettings
from elemta_maildir.store import base_name

from elemta import Envelope, RecipientState, Route, hookimpl, new_id
from elemta.testing import RawSMTP

DOMAIN = "example.test"
# <secs>.M<usecs>Q<queue id>R<hash>.<host>,S=<size>, as maildir(5) and Dovecot write it
NAME = re.compile(r"(\d+)\.M(\d+)Q([0-9A-Z]{20})R([0-9a-f]{12})\.([^/:]+),S=(\d+)\Z")


def config(retry: float = 0.3, **maildir) -> dict:
    return {
        "delivery": {"enabled": True, "workers": 4, "retry_intervals_seconds": [retry, retry]},
        "plugins": {"maildir": maildir},
    }


async def start(elemta_server, retry: float = 0.3, plugins=(), **maildir):
    maildir.setdefault("create_mailboxes", True)
    return await elemta_server(config(retry, **maildir), plugins=plugins, enabled=["maildir"])


def maildir(server, user: str, domain: str = DOMAIN) -> Path:
    """Where the default template puts a mailbox: next to the server's elemta.toml."""
    return server.root / "mail" / domain / user / "Maildir"


def files(folder: Path, sub: str = "new") -> list[Path]:
    try:
        return sorted(p for p in (folder / sub).iterdir())
    except FileNotFoundError:
        return []


async def submit(server, sender: str, rcpts: list[str], data: bytes) -> str:
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message(sender, rcpts, data)
    assert reply.code == 250, str(reply)
    await server.app.spool.checkpoint()  # hand it to the runner now
    return reply.text.rsplit(" ", 1)[1]


def envelope_of(server, queue_id: str) -> tuple[str | None, dict | None]:
    for state in ("ready", "deferred", "hold", "failed"):
        path = server.spool_path / state / f"{queue_id}.json"
        if path.exists():
            return state, json.loads(path.read_bytes())
    return None, None


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    async with asyncio.timeout(timeout):
        while not (value := predicate()):
            await asyncio.sleep(0.02)
    assert value, what
    return value


async def wait_gone(server, queue_id: str) -> None:
    await wait_for(lambda: envelope_of(server, queue_id)[0] is None, what="message delivered")


async def wait_deferred(server, queue_id: str) -> dict:
    def deferred():
        state, env = envelope_of(server, queue_id)
        return env if state == "deferred" and env["attempts"] >= 1 else None
    return await wait_for(deferred, what="message deferred")


def body(n: int = 3) -> bytes:
    return b"".join(b"line %d\r\n" % i for i in range(n))


def message(subject: str = "hello", extra: bytes = b"") -> bytes:
    """A message as it is after DATA (dot-unstuffed), CRLF line ends."""
    return (b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: " + subject.encode()
            + b"\r\nMessage-ID: <" + subject.encode() + b"@example.test>\r\n\r\n" + extra
            + body())


def on_the_wire(msg: bytes) -> bytes:
    """``msg`` dot-stuffed and terminated for DATA."""
    stuffed = b"".join(b"." + line if line.startswith(b".") else line
                       for line in msg.splitlines(keepends=True))
    return stuffed + b".\r\n"


def split_delivered(path: Path) -> tuple[list[bytes], bytes]:
    """The trace headers this plugin added (up to the Received: line) and the rest."""
    raw = path.read_bytes()
    cut = raw.index(b"Received: ")
    return raw[:cut].split(b"\r\n")[:-1], raw[cut:]


# ------------------------------------------------------------------ delivery


async def test_delivers_a_byte_exact_copy_under_a_maildir_name(elemta_server):
    server = await start(elemta_server)
    extra = (b"caf\xc3\xa9 \xff\xfe raw 8-bit bytes\r\n" + b"x" * 1500 + b"\r\n"
             + b".a line that starts with a dot\r\n..two dots\r\n.\r\n \r\n")
    sent = message("exact", extra)
    queue_id = await submit(server, "alice@example.test", ["Bob@Example.Test"], on_the_wire(sent))
    box = maildir(server, "bob")
    [path] = await wait_for(lambda: files(box), what="a file in new/")
    await wait_gone(server, queue_id)

    m = NAME.match(path.name)
    assert m, path.name
    assert m.group(3) == queue_id and m.group(5) == server.settings.server.hostname
    assert int(m.group(6)) == path.stat().st_size
    head, rest = split_delivered(path)
    assert head == [b"Return-Path: <alice@example.test>", b"Delivered-To: Bob@Example.Test"]
    assert rest.endswith(b"\r\n" + sent)       # the spooled message, byte for byte
    assert rest.count(b"\r\n\r\n") == 1 and rest.index(b"\r\n\r\n") > rest.index(sent[:10])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert all(stat.S_IMODE((box / d).stat().st_mode) == 0o700 for d in ("", "cur", "new", "tmp"))
    assert files(box, "tmp") == [] and files(box, "cur") == []


async def test_two_recipients_of_a_bounce_get_two_mailboxes(elemta_server):
    server = await start(elemta_server, file_mode=0o640, dir_mode=0o750)
    queue_id = await submit(server, "", ["bob@example.test", "carol@example.test"],
                            on_the_wire(message("two")))
    await wait_gone(server, queue_id)
    for user in ("bob", "carol"):
        [path] = files(maildir(server, user))
        head, _ = split_delivered(path)
        assert head == [b"Return-Path: <>", f"Delivered-To: {user}@example.test".encode()]
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert stat.S_IMODE(maildir(server, user).stat().st_mode) == 0o750
    names = {p.name.split(".")[1] for u in ("bob", "carol") for p in files(maildir(server, u))}
    assert len(names) == 2  # the recipient is part of the unique name


class Aliases:
    """A real rcpt plugin: info@ is an alias of bob@ (Recipient.rewrite)."""

    @hookimpl
    def rcpt(self, recipient):
        if recipient.address.lower() == "info@example.test":
            recipient.rewrite(["bob@example.test"])


async def test_a_rewritten_recipient_gets_x_original_to(elemta_server):
    server = await start(elemta_server, plugins=[("aliases", Aliases())])
    queue_id = await submit(server, "alice@example.test", ["info@example.test"],
                            on_the_wire(message("alias")))
    await wait_gone(server, queue_id)
    [path] = files(maildir(server, "bob"))
    head, _ = split_delivered(path)
    assert head == [b"Return-Path: <alice@example.test>", b"Delivered-To: bob@example.test",
                    b"X-Original-To: info@example.test"]
    assert not maildir(server, "info").exists()


@pytest.mark.parametrize("mode", ["existing", "create", "off"])
async def test_detail_goes_to_a_maildir_plus_plus_folder(elemta_server, mode):
    server = await start(elemta_server, detail_folder=mode)
    box = maildir(server, "bob")
    for sub in ("cur", "new", "tmp"):
        (box / ".lists" / sub).mkdir(parents=True)
    queue_id = await submit(server, "alice@example.test",
                            ["bob+lists@example.test", "bob+news@example.test"],
                            on_the_wire(message("detail")))
    await wait_gone(server, queue_id)
    inbox, lists, news = files(box), files(box / ".lists"), files(box / ".news")
    if mode == "off":
        assert (len(inbox), len(lists), len(news)) == (2, 0, 0)
    elif mode == "existing":
        assert (len(inbox), len(lists), len(news)) == (1, 1, 0)
        assert not (box / ".news").exists()
    else:
        assert (len(inbox), len(lists), len(news)) == (0, 1, 1)
        assert (box / ".news" / "maildirfolder").is_file()
    delivered_to = {split_delivered(p)[0][1] for p in inbox + lists + news}
    assert delivered_to == {b"Delivered-To: bob+lists@example.test",
                            b"Delivered-To: bob+news@example.test"}


@pytest.mark.parametrize("mode", ["existing", "create"])
async def test_a_detail_finds_its_folder_whatever_the_case(elemta_server, mode):
    server = await start(elemta_server, detail_folder=mode)
    box = maildir(server, "bob")
    for sub in ("cur", "new", "tmp"):
        (box / ".Work" / sub).mkdir(parents=True)
    # one message each: a transaction keeps one of two addresses differing only by case
    for detail in ("Work", "work", "WORK"):
        queue_id = await submit(server, "alice@example.test", [f"bob+{detail}@example.test"],
                                on_the_wire(message(detail)))
        await wait_gone(server, queue_id)
    assert len(files(box / ".Work")) == 3 and files(box) == []
    assert sorted(p.name for p in box.iterdir() if p.name.startswith(".")) == [".Work"]


# ------------------------------------------------------------------ quota


async def test_a_message_larger_than_the_quota_bounces(elemta_server):
    # 300 bytes for everybody but alice (0: unlimited), who takes the bounce
    server = await start(elemta_server, quota_bytes=300, quotas={"alice@example.test": 0})
    queue_id = await submit(server, "alice@example.test", ["bob@example.test"],
                            on_the_wire(message("big", b"y" * 400 + b"\r\n")))
    # the 552 makes a bounce, which this plugin delivers to alice's mailbox
    [bounce] = await wait_for(lambda: files(maildir(server, "alice")), what="a bounce")
    await wait_gone(server, queue_id)
    assert files(maildir(server, "bob")) == []
    raw = bounce.read_bytes()
    assert raw.startswith(b"Return-Path: <>\r\nDelivered-To: alice@example.test\r\n")
    assert b"Status: 5.2.2" in raw and b"552 5.2.2" in raw


async def test_a_full_mailbox_defers_and_the_message_stays_queued(elemta_server):
    server = await start(elemta_server, retry=60, quotas={"Bob@Example.Test": 5000})
    box = maildir(server, "bob")
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "cur" / "1700000000.M1Q1.host,S=4800:2,S").write_bytes(b"x")  # the name counts
    queue_id = await submit(server, "alice@example.test", ["bob@example.test"],
                            on_the_wire(message("full")))
    env = await wait_deferred(server, queue_id)
    [rcpt] = env["recipients"]
    assert rcpt["state"] == "pending" and rcpt["last_error"].startswith("452 4.2.2")
    assert files(box) == [] and files(box, "tmp") == []
    assert files(maildir(server, "alice")) == []  # no bounce for a temporary failure
    # Maildir++: the configured quota and the scanned usage, for Dovecot to go on with
    assert (box / "maildirsize").read_text() == "5000S\n4800 1\n"


async def test_maildirsize_sets_the_limit_and_is_updated(elemta_server):
    # carol's configured quota would refuse anything; her maildirsize allows 1 MB
    server = await start(elemta_server, retry=60, quotas={"carol@example.test": 10})
    for user, content in (("carol", "1000000S,100C\n5000 2\n-1000 -1\n"),
                          ("dave", "2000S\n1900 5\n")):
        box = maildir(server, user)
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True)
        (box / "maildirsize").write_text(content)
    queue_id = await submit(server, "alice@example.test",
                            ["carol@example.test", "dave@example.test"],
                            on_the_wire(message("quota")))
    env = await wait_deferred(server, queue_id)
    fates = {r["address"]: (r["state"], (r["last_error"] or "")[:9]) for r in env["recipients"]}
    assert fates == {"carol@example.test": ("delivered", ""),
                     "dave@example.test": ("pending", "452 4.2.2")}
    [path] = files(maildir(server, "carol"))
    assert (maildir(server, "carol") / "maildirsize").read_text() == (
        f"1000000S,100C\n5000 2\n-1000 -1\n{path.stat().st_size} 1\n")
    assert (maildir(server, "dave") / "maildirsize").read_text() == "2000S\n1900 5\n"


async def test_a_stale_maildirsize_is_recalculated(elemta_server):
    """Over quota with more than one totals line: Maildir++ says count again, and rewrite it."""
    server = await start(elemta_server, retry=60)
    box = maildir(server, "erin")
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "cur" / "1700000000.M1Q1.host,S=700:2,S").write_bytes(b"x")
    (box / "maildirsize").write_text("2000S\n1900 2\n700 1\n")   # the user deleted mail since
    queue_id = await submit(server, "alice@example.test", ["erin@example.test"],
                            on_the_wire(message("recalc")))
    await wait_gone(server, queue_id)
    [path] = files(box)
    assert (box / "maildirsize").read_text() == f"2000S\n700 1\n{path.stat().st_size} 1\n"


# ------------------------------------------------------------------ failures


async def test_an_unwritable_mailbox_defers_until_it_is_fixed(elemta_server):
    server = await start(elemta_server, retry=60)
    box = maildir(server, "bob")
    for sub in ("cur", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "new").write_text("not a directory")  # root ignores modes; a file does not
    queue_id = await submit(server, "alice@example.test", ["bob@example.test"],
                            on_the_wire(message("broken")))
    env = await wait_deferred(server, queue_id)
    assert env["recipients"][0]["last_error"].startswith("451 4.3.0 cannot write to the "
                                                         "mailbox of <bob@example.test>")
    assert (server.spool_path / "messages" / queue_id).exists()
    assert files(box, "tmp") == []

    (box / "new").unlink()
    (box / "new").mkdir()
    await server.retry(queue_id)
    await wait_gone(server, queue_id)
    [path] = files(box)
    assert split_delivered(path)[1].endswith(message("broken"))


@pytest.fixture
def small_disk(small_filesystem):
    """A 256 KiB tmpfs: a real full disk (ENOSPC)."""
    return small_filesystem("256k")


async def test_a_full_disk_defers_and_delivers_once_there_is_room(elemta_server, small_disk):
    server = await start(elemta_server, retry=60,
                         path=str(small_disk / "{domain}" / "{user}" / "Maildir"))
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)   # fill the disk to the last block
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    big = message("full", b"y" * 64_000 + b"\r\n")
    queue_id = await submit(server, "alice@example.test", ["bob@example.test"], on_the_wire(big))
    env = await wait_deferred(server, queue_id)
    assert env["recipients"][0]["last_error"].startswith("452 4.3.1 insufficient storage")
    assert (server.spool_path / "messages" / queue_id).exists(), "the message is kept"
    box = small_disk / DOMAIN / "bob" / "Maildir"
    assert files(box) == [] and files(box, "tmp") == [], "no partial file is left"

    filler.unlink()
    await server.retry(queue_id)
    await wait_gone(server, queue_id)
    [path] = files(box)
    assert split_delivered(path)[1].endswith(big)


async def test_a_missing_mailbox_is_refused_at_rcpt_when_creation_is_off(elemta_server):
    """The mailboxes on disk are the users: no mailbox, no RCPT, so nothing to bounce."""
    server = await start(elemta_server, retry=60, create_mailboxes=False)
    box = maildir(server, "alice")
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("MAIL FROM:<forged@victim.example>")).code == 250
        reply = await c.cmd("RCPT TO:<bob@example.test>")
        assert (reply.code, reply.enhanced) == (550, "5.1.1"), str(reply)
        assert (await c.cmd("RCPT TO:<alice+news@example.test>")).code == 250
        assert (await c.cmd("RCPT TO:<someone@remote.example>")).code == 550  # no relay
    assert not maildir(server, "bob").exists()


async def test_a_mailbox_gone_after_rcpt_defers_when_creation_is_off(elemta_server):
    """Removed between RCPT and delivery (or routed here by another plugin): 450, kept."""
    server = await start(elemta_server, retry=60, create_mailboxes=False)
    plugin = server.app.pm.get_plugin("maildir")
    content = server.root / "content.eml"
    content.write_bytes(message("missing"))
    env = Envelope(id=new_id(), sender="", recipients=[RecipientState("bob@example.test")],
                   received_at=time.time(), size=content.stat().st_size)
    [outcome] = await plugin.deliver(env, Route("local", DOMAIN), env.recipients, str(content))
    assert (outcome.code, outcome.enhanced) == (450, "4.2.1"), outcome
    assert not (server.root / "mail").exists()


@pytest.mark.parametrize("rcpt", ["a/b@example.test", '"../x"@example.test'])
async def test_an_unsafe_local_part_is_refused_at_rcpt_not_bounced(elemta_server, rcpt):
    """No backscatter: a recipient no mailbox can be made for never gets to the spool."""
    server = await start(elemta_server)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("MAIL FROM:<forged@victim.example>")).code == 250
        reply = await c.cmd(f"RCPT TO:<{rcpt}>")
        assert (reply.code, reply.enhanced) == (550, "5.1.3"), str(reply)
        assert (await c.cmd("RCPT TO:<alice@example.test>")).code == 250
    assert not (server.root / "mail").exists()


async def test_an_unsafe_local_part_fails_at_delivery_without_touching_the_disk(elemta_server):
    """Should one reach delivery (a route from another plugin), it fails, writing nothing."""
    server = await start(elemta_server)

    plugin = server.app.pm.get_plugin("maildir")
    content = server.root / "content.eml"
    content.write_bytes(message("direct"))
    for address in (".hidden@example.test", "..@example.test", "x@../etc", "a\0b@example.test"):
        env = Envelope(id=new_id(), sender="", recipients=[RecipientState(address)],
                       received_at=time.time(), size=content.stat().st_size)
        [outcome] = await plugin.deliver(env, Route("local", DOMAIN), env.recipients,
                                         str(content))
        assert (outcome.code, outcome.enhanced) == (550, "5.1.3"), outcome
    assert not (server.root / "mail").exists()


class StoreRouter:
    """A real route plugin: carol's mail goes to the transport "store"."""

    @hookimpl
    def route(self, recipient):
        if recipient.address.startswith("carol@"):
            return Route("store", DOMAIN)
        return None


async def test_only_the_configured_transport_is_delivered(elemta_server):
    server = await start(elemta_server, retry=60, transport="store",
                         plugins=[("router", StoreRouter())])
    queue_id = await submit(server, "alice@example.test",
                            ["carol@example.test", "bob@example.test"],
                            on_the_wire(message("transport")))
    env = await wait_deferred(server, queue_id)
    fates = {r["address"]: (r["state"], r["last_error"]) for r in env["recipients"]}
    assert fates["carol@example.test"] == ("delivered", None)
    assert fates["bob@example.test"] == ("pending",
                                         "451 4.3.0 no transport accepted this route")
    assert len(files(maildir(server, "carol"))) == 1 and not maildir(server, "bob").exists()

    plugin = server.app.pm.get_plugin("maildir")
    answer = await plugin.deliver(Envelope(new_id(), "", [], time.time(), 0),
                                  Route("smtp", "remote.example"), [], "/nonexistent")
    assert answer is None


# ------------------------------------------------------------------ direct calls


async def test_delivering_the_same_envelope_again_writes_one_file(elemta_server):
    """Through tmp/ and a rename (a file system without O_TMPFILE): a stale copy is replaced.

    In threads of the server (``helper_process = false``), whose writer the test can reach."""
    server = await start(elemta_server, helper_process=False)
    plugin = server.app.pm.get_plugin("maildir")
    plugin.maildirs.writer.tmpfile = False
    content = server.root / "content.eml"
    content.write_bytes(message("again", b"\x00\xff\r\n"))
    rcpt = RecipientState("bob@example.test", original="Info@example.test")
    env = Envelope(id=new_id(), sender="alice@example.test", recipients=[rcpt],
                   received_at=time.time(), size=content.stat().st_size, attempts=1)
    route = Route("local", DOMAIN)
    box = maildir(server, "bob")
    # a crash left a partial copy in tmp/ under the very name this delivery uses
    head = (b"Return-Path: <alice@example.test>\r\nDelivered-To: bob@example.test\r\n"
            b"X-Original-To: Info@example.test\r\n")
    name = base_name(env.id, env.received_at, rcpt.address, server.settings.server.hostname,
                     len(head) + content.stat().st_size)
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "tmp" / name).write_bytes(b"partial")

    [first] = await plugin.deliver(env, route, [rcpt], str(content))
    [second] = await plugin.deliver(env, route, [rcpt], str(content))
    assert first.code == second.code == 250 and "already" in second.text
    [path] = files(box)
    assert path.name == name and files(box, "tmp") == []
    assert path.read_bytes() == head + content.read_bytes()

    # an IMAP client read it: new/ → cur/ with flags; a retry still finds it
    os.rename(path, box / "cur" / (name + ":2,S"))
    rcpt.attempts = 1
    [third] = await plugin.deliver(env, route, [rcpt], str(content))
    assert third.code == 250 and "already" in third.text
    assert files(box) == [] and len(files(box, "cur")) == 1


async def test_messages_are_linked_into_new_without_a_name_in_tmp(elemta_server):
    """An unnamed file linked into new/: tmp/ never changes, and a copy already in new/
    (a crash after the link, before the spool recorded it) is kept, not doubled."""
    server = await start(elemta_server)
    plugin = server.app.pm.get_plugin("maildir")
    assert plugin.maildirs.writer.tmpfile, "O_TMPFILE and linkat are available on Linux"
    content = server.root / "content.eml"
    content.write_bytes(message("linked", b"body\r\n"))
    box = maildir(server, "bob")
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    os.utime(box / "tmp", ns=(0, 0))
    route = Route("local", DOMAIN)
    rcpt = RecipientState("bob@example.test")
    env = Envelope(id=new_id(), sender="alice@example.test", recipients=[rcpt],
                   received_at=time.time(), size=content.stat().st_size, attempts=1)

    [first] = await plugin.deliver(env, route, [rcpt], str(content))
    assert first.code == 250 and "already" not in first.text
    [path] = files(box)
    assert path.read_bytes() == (b"Return-Path: <alice@example.test>\r\n"
                                 b"Delivered-To: bob@example.test\r\n" + content.read_bytes())
    st = path.stat()
    assert st.st_nlink == 1 and stat.S_IMODE(st.st_mode) == 0o600
    assert (box / "tmp").stat().st_mtime_ns == 0, "a name was made in tmp/"
    assert plugin.maildirs.writer.tmpfile

    # the same attempt again, as after a crash before the spool recorded it (attempts 1)
    [again] = await plugin.deliver(env, route, [rcpt], str(content))
    assert again.code == 250 and "already" in again.text
    assert files(box) == [path] and files(box, "tmp") == []
    assert (box / "tmp").stat().st_mtime_ns == 0


def write_big(path: Path, size: int) -> None:
    chunk = b"".join(b"%07d 0123456789abcdefghijklmnopqrstuvwxyz\r\n" % i for i in range(20000))
    with open(path, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        while f.tell() < size:
            f.write(chunk)


async def test_a_20_mib_message_is_streamed(elemta_server):
    server = await start(elemta_server)
    plugin = server.app.pm.get_plugin("maildir")
    content = server.root / "big.eml"
    await asyncio.to_thread(write_big, content, 20 << 20)
    rcpt = RecipientState("bob@example.test")
    env = Envelope(id=new_id(), sender="alice@example.test", recipients=[rcpt],
                   received_at=time.time(), size=content.stat().st_size)
    tracemalloc.start()
    try:
        [outcome] = await plugin.deliver(env, Route("local", DOMAIN), [rcpt], str(content))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.code == 250
    assert peak < 4 << 20, f"peak {peak} bytes while copying a {content.stat().st_size}-byte file"
    [path] = files(maildir(server, "bob"))
    assert path.stat().st_size == int(path.name.rsplit("S=", 1)[1])
    assert path.stat().st_size == content.stat().st_size + len(
        b"Return-Path: <alice@example.test>\r\nDelivered-To: bob@example.test\r\n")


# ------------------------------------------------------------------ settings


def test_settings_refuse_unknown_keys_and_placeholders():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        MaildirSettings(quota=1)
    with pytest.raises(pydantic.ValidationError, match=r"unknown placeholder \{login\}"):
        MaildirSettings(path="/var/vmail/{login}")
    with pytest.raises(pydantic.ValidationError, match="user@domain"):
        MaildirSettings(quotas={"bob": 1})
    assert MaildirSettings(quotas={"Bob@Example.TEST": 5}).quotas == {"bob@example.test": 5}


def test_directory_fsyncs_are_shared_by_concurrent_deliveries(tmp_path, monkeypatch):
    """Every caller returns after an fsync that began after it called; fewer fsyncs than calls."""
    import threading
    import time as _time

    from elemta_maildir import writer

    calls: list[tuple[float, float]] = []
    real = writer.fsync_dir

    def slow_fsync(path):
        start = _time.monotonic()
        _time.sleep(0.02)
        real(path)
        calls.append((start, _time.monotonic()))

    monkeypatch.setattr(writer, "fsync_dir", slow_fsync)
    syncer = writer.DirSyncer()
    asked: list[tuple[float, float]] = []

    def worker():
        t = _time.monotonic()
        syncer.sync(tmp_path)
        asked.append((t, _time.monotonic()))

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(asked) == 12
    assert len(calls) < 12, "concurrent callers share fsyncs"
    for t_ask, t_back in asked:
        assert any(start >= t_ask and end <= t_back for start, end in calls), \
            "a caller returned without an fsync that started after its request"


async def test_delivery_threads_run_up_to_their_number_at_once_and_stop():
    """The plugin's threads: as many calls in flight as threads, errors handed back, stop."""
    import threading

    from elemta_maildir.workers import Workers

    workers = Workers(3)
    gate = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    def blocking(n: int) -> int:
        with lock:
            running.append(threading.current_thread().name)
        assert gate.wait(10)
        return n * 2

    calls = [asyncio.ensure_future(workers.run(blocking, n)) for n in range(5)]
    await wait_for(lambda: len(running) >= 3, what="three calls running")
    await asyncio.sleep(0.05)
    assert len(running) == 3, "no more calls at once than threads"
    assert sorted(set(running)) == ["maildir-0", "maildir-1", "maildir-2"]
    gate.set()
    assert await asyncio.gather(*calls) == [0, 2, 4, 6, 8]

    def failing() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        await workers.run(failing)

    threads = [t for t in threading.enumerate() if t.name.startswith("maildir-")
               and t.ident in {u.ident for u in workers._threads}]
    assert len(threads) == 3
    workers.close()
    for t in threads:
        t.join(5)
    assert workers.closed and not any(t.is_alive() for t in threads)


def test_a_failed_group_sync_fails_everybody_it_was_meant_to_cover(tmp_path):
    """A write-back error reported to the syncfs that should have covered a caller reaches
    that caller too, not only the thread that ran it; the next sync serves later callers."""
    import threading

    from elemta_maildir import writer

    started = threading.Event()
    release = threading.Event()

    class Failing(writer.FsSyncer):
        calls = 0

        def _flush(self, path):
            Failing.calls += 1
            if Failing.calls == 1:      # keeps a sync running while the others queue up
                started.set()
                assert release.wait(10)
                return super()._flush(path)
            if Failing.calls == 2:
                raise OSError(5, "Input/output error")
            return super()._flush(path)

    syncer = Failing()
    results: list[object] = []

    def call():
        try:
            syncer.sync(str(tmp_path))
            results.append("ok")
        except OSError as e:
            results.append(e.errno)

    first = threading.Thread(target=call)
    first.start()
    assert started.wait(10)
    waiting = [threading.Thread(target=call) for _ in range(4)]
    for t in waiting:
        t.start()
    time.sleep(0.1)                     # all four wait for the sync after the running one
    release.set()
    for t in [first, *waiting]:
        t.join(10)
    assert sorted(results, key=str) == [5, 5, 5, 5, "ok"]
    syncer.sync(str(tmp_path))          # a real syncfs, after the error was reported
    assert Failing.calls == 3


async def test_concurrent_deliveries_share_syncfs_calls(elemta_server):
    """fsync on, in threads of the server: one syncfs of the mailbox file system serves
    the deliveries in flight."""
    server = await start(elemta_server, helper_process=False)
    plugin = server.app.pm.get_plugin("maildir")
    writer = plugin.maildirs.writer
    assert writer.group is not None, "syncfs is available on Linux"
    count = 0
    real = writer.group._flush

    def counting(path):
        nonlocal count
        count += 1
        real(path)

    writer.group._flush = counting
    content = server.root / "content.eml"
    content.write_bytes(message("shared", b"x\r\n"))
    route = Route("local", DOMAIN)
    envs = []
    for i in range(20):
        rcpt = RecipientState(f"user{i % 4}@example.test")
        envs.append(Envelope(id=new_id(), sender="alice@example.test", recipients=[rcpt],
                             received_at=time.time(), size=content.stat().st_size, attempts=1))
    outcomes = await asyncio.gather(*(plugin.deliver(e, route, e.recipients, str(content))
                                      for e in envs))
    assert all(o.code == 250 for [o] in outcomes)
    assert sum(len(files(maildir(server, f"user{u}"))) for u in range(4)) == 20
    assert 2 <= count < 40, f"{count} syncfs calls for 20 deliveries (2 each without sharing)"


async def test_removing_the_first_mailbox_does_not_stop_the_group_sync(elemta_server):
    """The syncfs descriptor of a file system outlives the mailbox it was opened from."""
    import shutil

    server = await start(elemta_server)
    plugin = server.app.pm.get_plugin("maildir")
    content = server.root / "content.eml"
    content.write_bytes(message("gone", b"x\r\n"))
    route = Route("local", DOMAIN)

    async def deliver(user: str):
        rcpt = RecipientState(f"{user}@example.test")
        env = Envelope(id=new_id(), sender="alice@example.test", recipients=[rcpt],
                       received_at=time.time(), size=content.stat().st_size, attempts=1)
        [outcome] = await plugin.deliver(env, route, [rcpt], str(content))
        return outcome

    assert (await deliver("first")).code == 250
    shutil.rmtree(maildir(server, "first"))
    assert (await deliver("second")).code == 250
    assert len(files(maildir(server, "second"))) == 1
    # the removed mailbox: deferred once (it was known to exist), then made anew
    assert (await deliver("first")).code == 451
    assert (await deliver("first")).code == 250
    assert len(files(maildir(server, "first"))) == 1
