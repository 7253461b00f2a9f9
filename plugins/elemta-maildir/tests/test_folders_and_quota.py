"""Folder names (modified UTF-7, Maildir++) and the Maildir++ quota rules, without a server.

What Dovecot 2.3 does with the same names and files is checked against a
real Dovecot in ``test_dovecot_interop.py``; these pin the rules down case by
case.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydantic
import pytest
from elemta_maildir import MaildirSettings, imap_utf7
from elemta_maildir.layout import folder_dir, folder_of
from elemta_maildir.settings import resolve_owner
from elemta_maildir.store import (MAILDIRSIZE_MAX_BYTES, Quota, find_folder, read_maildirsize,
                                  replace_maildirsize, scan_usage)

# ------------------------------------------------------------------ modified UTF-7


@pytest.mark.parametrize("name, spelled", [
    ("INBOX", "INBOX"),
    ("r&d", "r&-d"),
    ("&", "&-"),
    ("café", "caf&AOk-"),
    ("éé", "&AOkA6Q-"),                                   # one run, not two
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),   # RFC 3501 §5.1.3
    ("📬 mail", "&2D3c7A- mail"),                          # beyond the BMP: a surrogate pair
    ("a\tb", "a&AAk-b"),                                  # a control character is encoded
])
def test_modified_utf7_spells_names_as_rfc_3501_says(name, spelled):
    assert imap_utf7.encode(name) == spelled
    assert imap_utf7.decode(spelled) == name


@pytest.mark.parametrize("text", [
    "café",          # not ASCII
    "a\tb",          # not printable
    "&AOk",          # no closing '-'
    "&AGE-",         # 'a' encoded: printable ASCII stands for itself
    "&AOk-&AOk-",    # two runs where encode writes one
    "&AOl-",         # bits left over after the last character
    "&AO-",          # half a character
    "&2D0-",         # a lone surrogate
    "&AO=k-",        # not modified base64
    "&AO/k-",        # '/' is written ','
])
def test_modified_utf7_refuses_any_other_spelling(text):
    with pytest.raises(ValueError):
        imap_utf7.decode(text)


# ------------------------------------------------------------------ folders


@pytest.mark.parametrize("detail, directory, name", [
    ("Work", ".Work", "Work"),                 # the case is kept
    ("café", ".caf&AOk-", "café"),
    ("r&d", ".r&-d", "r&d"),
    ("lists.python", ".lists.python", "lists.python"),  # '.' is the hierarchy separator
    ("inbox.Archive", ".INBOX.Archive", "INBOX.Archive"),
    ("INBOX", None, None), ("Inbox", None, None),        # the INBOX itself
    (".hidden", None, None), ("x.", None, None), ("a..b", None, None), ("a/b", None, None),
    ("a\x7fb", None, None),
])
def test_a_detail_names_the_folder_dovecot_would_open(detail, directory, name):
    assert folder_dir(detail) == directory
    if directory is not None:
        assert folder_of(directory) == name


@pytest.mark.parametrize("entry, name", [
    (".Work", "Work"), (".caf&AOk-", "café"), (".r&-d", "r&d"), (".INBOX.sub", "INBOX.sub"),
    (".x.", "x."),                      # Dovecot opens (and counts) these too
    (".café", None), (".r&d", None), (".&AGE-", None),   # not modified UTF-7
    (".INBOX", None), (".inbox.sub", None),            # Dovecot opens INBOX.sub as .INBOX.sub
    ("..DOVECOT-TRASHED", None), (".", None), ("..", None), ("cur", None),
])
def test_only_what_dovecot_can_open_is_a_folder(entry, name):
    assert folder_of(entry) == name


def maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True)
    return path


def test_a_folder_differing_only_by_case_is_found(tmp_path):
    maildir(tmp_path / ".Work")
    maildir(tmp_path / ".caf&AMk-")     # Café
    maildir(tmp_path / ".café")         # not a folder: never a match
    assert find_folder(tmp_path, ".WORK") == tmp_path / ".Work"
    assert find_folder(tmp_path, ".work") == tmp_path / ".Work"
    assert find_folder(tmp_path, ".caf&AOk-") == tmp_path / ".caf&AMk-"
    assert find_folder(tmp_path, ".Lists") is None
    maildir(tmp_path / ".WORK")
    assert find_folder(tmp_path, ".work") == tmp_path / ".WORK"   # of several, the first by name


# ------------------------------------------------------------------ quota


def put(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_the_scan_counts_what_dovecot_counts(tmp_path):
    put(tmp_path / "cur" / "1.M1.h,S=100:2,S", 1)            # the size in the name
    put(tmp_path / "cur" / "2.M2.h,S=200,W=210:2,", 1)
    put(tmp_path / "new" / "3.M3.h", 30)                     # no size: stat
    put(tmp_path / "new" / "4.M4.h,S=12x", 40)               # not a size: stat
    put(tmp_path / "new" / ".5.M5.h,S=50", 1)                # a dot file counts...
    put(tmp_path / "new" / "..6.M6.h,S=60", 1)               # ...but not '..'
    put(tmp_path / "tmp" / "7.M7.h,S=70", 1)                 # tmp/ is not mail yet
    put(tmp_path / ".Work" / "cur" / "8.M8.h,S=80:2,", 1)
    put(tmp_path / ".caf&AOk-" / "new" / "9.M9.h,S=90", 1)
    put(tmp_path / ".café" / "new" / "10.M10.h,S=1000", 1)   # Dovecot cannot open these
    put(tmp_path / ".r&d" / "cur" / "11.M11.h,S=1000:2,", 1)
    put(tmp_path / ".INBOX" / "cur" / "12.M12.h,S=1000:2,", 1)
    usage = scan_usage(tmp_path)
    assert (usage.used_bytes, usage.used_count) == (100 + 200 + 30 + 40 + 50 + 80 + 90, 7)


def write(root: Path, text: str, age: float = 0) -> None:
    (root / "maildirsize").write_text(text)
    if age:
        then = time.time() - age
        os.utime(root / "maildirsize", (then, then))


@pytest.mark.parametrize("text, age, expected", [
    ("1000S,10C\n300 3\n-100 -1\n", 0, (1000, 10, 200, 2, True)),
    ("1000S\n300 3\n50 1", 0, (1000, 0, 300, 3, True)),       # a line being written
    ("1000S\n900 3\n500 1\n", 0, (1000, 0, 1400, 4, False)),  # over quota, two lines
    ("1000S\n1400 4\n", 0, (1000, 0, 1400, 4, True)),         # over quota, one fresh line
    ("1000S\n1400 4\n", 16 * 60, (1000, 0, 1400, 4, False)),  # ...15 minutes old
    ("1000S\n300 3\nrubbish\n", 0, (1000, 0, 300, 3, False)),
    ("1000S\n300 3\n-400 -4\n", 0, (1000, 0, 0, 0, False)),    # below zero
    ("0S\n300 3\n", 0, (0, 0, 300, 3, True)),
    ("5C,junk\n300 3\n", 0, (0, 5, 300, 3, True)),            # a part that is neither: ignored
])
def test_maildirsize_is_trusted_as_the_maildir_plus_plus_rules_say(tmp_path, text, age,
                                                                    expected):
    write(tmp_path, text, age)
    sizes = read_maildirsize(tmp_path)
    q = sizes.quota
    assert (q.limit_bytes, q.limit_count, q.used_bytes, q.used_count, sizes.current) == expected


def test_a_maildirsize_of_5120_bytes_is_recalculated(tmp_path):
    write(tmp_path, "100000S\n" + "10 1\n" * ((MAILDIRSIZE_MAX_BYTES - 8) // 5 + 1))
    assert read_maildirsize(tmp_path).current is False
    write(tmp_path, "100000S\n" + "10 1\n" * ((MAILDIRSIZE_MAX_BYTES - 8) // 5 - 1))
    assert read_maildirsize(tmp_path).current is True


@pytest.mark.parametrize("text", ["", "1000S"])
def test_no_complete_line_is_no_maildirsize(tmp_path, text):
    write(tmp_path, text)
    assert read_maildirsize(tmp_path) is None


def test_maildirsize_is_replaced_as_dovecot_writes_it(tmp_path):
    put(tmp_path / "cur" / "1.M1.h,S=100:2,S", 1)
    usage = scan_usage(tmp_path)
    for quota, first in ((Quota(5000, 0, 0, 0), "5000S"), (Quota(5000, 7, 0, 0), "5000S,7C"),
                         (Quota(0, 7, 0, 0), "7C")):
        assert replace_maildirsize(tmp_path, quota, usage, file_mode=0o640, owner=None,
                                   fsync=False)
        assert (tmp_path / "maildirsize").read_text() == f"{first}\n100 1\n"
        assert (tmp_path / "maildirsize").stat().st_mode & 0o777 == 0o640
    put(tmp_path / "new" / "2.M2.h,S=5", 1)   # a delivery after the scan: not written
    assert not replace_maildirsize(tmp_path, Quota(9, 0, 0, 0), usage, file_mode=0o600,
                                   owner=None, fsync=False)
    assert (tmp_path / "maildirsize").read_text() == "7C\n100 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cur", "maildirsize", "new"]


# ------------------------------------------------------------------ owner


def test_owner_is_a_user_or_user_and_group():
    assert resolve_owner("root") == (0, 0)
    assert resolve_owner("0") == (0, 0)
    assert resolve_owner("5000:5001") == (5000, 5001)
    assert resolve_owner("root:5001") == (0, 5001)
    assert MaildirSettings(owner="root:root").owner == "root:root"
    for value, hint in (("no-such-user-here", "there is no user"),
                        ("root:no-such-group-here", "there is no group"),
                        ("4000000", 'write "4000000:GID"')):
        with pytest.raises(pydantic.ValidationError, match=hint):
            MaildirSettings(owner=value)
