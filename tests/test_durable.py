"""``elemta.check_write_back``: a file's own write-back error after a ``syncfs``."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from elemta import check_write_back, have_syncfs, syncfs
from elemta import durable


def test_a_written_and_synced_file_reports_nothing_and_is_not_fsynced(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "m", os.O_WRONLY | os.O_CREAT, 0o600)
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.write(fd, b"x" * 10_000)
        if have_syncfs():
            syncfs(root)
        monkeypatch.setattr(durable.os, "fsync", lambda fd: pytest.fail("fsync called"))
        if durable._sync_file_range is None:
            pytest.skip("no sync_file_range here")
        check_write_back(fd)
        os.write(fd, b"y" * 10_000)
        check_write_back(fd)  # pages not yet written back are not its business: no fsync
    finally:
        os.close(fd)
        os.close(root)


def test_the_files_write_back_error_is_raised(tmp_path, monkeypatch):
    calls = []

    def failing(fd, offset, nbytes, flags):
        calls.append((offset, nbytes, flags))
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(durable, "_sync_file_range", failing)
    fd = os.open(tmp_path / "m", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as e:
            check_write_back(fd)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EIO
    assert calls == [(0, 0, 4)]  # the whole file, SYNC_FILE_RANGE_WAIT_AFTER only


def test_without_sync_file_range_it_is_an_fsync(tmp_path, monkeypatch):
    fsyncs = []
    monkeypatch.setattr(durable, "_sync_file_range", None)
    monkeypatch.setattr(durable.os, "fsync", fsyncs.append)
    fd = os.open(tmp_path / "m", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        check_write_back(fd)
    finally:
        os.close(fd)
    assert fsyncs == [fd]


def test_what_it_cannot_check_is_fsynced_instead():
    r, w = os.pipe()
    try:
        if durable._sync_file_range is None:
            pytest.skip("no sync_file_range here")
        with pytest.raises(OSError) as e:   # the fsync of a pipe fails in turn
            check_write_back(w)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
