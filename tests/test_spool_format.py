"""The spool's format version: an older spool is read, a newer one refused.

``tests/data/spool-format-1`` is a spool written by Elemta before the format was
recorded (format 1: a journal, messages ready and held, no ``format`` file), as
a server left it when it was killed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from elemta.checks import check_config
from elemta.spool.lock import SPOOL_FORMAT, SpoolFormatError, lock_spool, spool_format, unlock_spool
from elemta.testing.fixtures import write_config
from tests.test_cli import elemta

FORMAT_1 = Path(__file__).parent / "data" / "spool-format-1"


def old_spool(tmp_path: Path) -> Path:
    spool = tmp_path / "queue"
    shutil.copytree(FORMAT_1, spool)
    return spool


async def test_a_format_1_spool_is_recovered_and_delivered(tmp_path: Path, elemta_server,
                                                           elemta_outbox) -> None:
    spool = old_spool(tmp_path)
    assert spool_format(spool) is None
    server = await elemta_server({"spool": {"path": str(spool)}}, outbox=elemta_outbox)
    delivered = await elemta_outbox.wait(3)
    assert sorted(m.recipients[0] for m in delivered) == [
        "late@example.test", "user1@example.test", "user2@example.test"]
    assert all(b"Subject: spool format 1" in m.content for m in delivered)
    assert [p.name for p in (spool / "hold").iterdir()] == ["01K1YZVQX32X5VR7KH6Z.json"]
    assert (spool / "format").read_text() == f"{SPOOL_FORMAT}\n"
    assert server.app.spool.root == spool


def test_a_newer_format_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    spool = old_spool(tmp_path)
    (spool / "format").write_text(f"{SPOOL_FORMAT + 1}\n")
    before = sorted(p.relative_to(spool) for p in spool.rglob("*"))
    with pytest.raises(SpoolFormatError, match="written by a newer Elemta"):
        lock_spool(spool)
    config = write_config(tmp_path / "cfg", {"spool": {"path": str(spool)},
                                             "metrics": {"enabled": False}})
    served = elemta("serve", "--config", str(config), cwd=tmp_path, timeout=60)
    assert served.returncode == 2   # found by the checks serve runs first
    assert f"the spool at {spool} is format {SPOOL_FORMAT + 1}, written by a newer Elemta" \
        in served.stderr
    listed = elemta("queue", "list", "--config", str(config), cwd=tmp_path)
    assert listed.returncode != 0 and "written by a newer Elemta" in listed.stderr
    assert any("written by a newer Elemta" in e for e in check_config(config).errors)
    # nothing was replayed, moved or written
    assert sorted(p.relative_to(spool) for p in spool.rglob("*")
                  if p.name != ".lock") == [p for p in before if p.name != ".lock"]


def test_a_garbled_format_file_is_named(tmp_path: Path) -> None:
    spool = old_spool(tmp_path)
    (spool / "format").write_text("spool v9\n")
    with pytest.raises(SpoolFormatError, match="is not a spool format number"):
        lock_spool(spool)


def test_a_new_spool_records_its_format(tmp_path: Path) -> None:
    fd = lock_spool(tmp_path / "new")
    unlock_spool(fd)
    assert (tmp_path / "new" / "format").read_text() == f"{SPOOL_FORMAT}\n"
    assert spool_format(tmp_path / "new") == SPOOL_FORMAT
