"""mbox and Maildir writers (Postfix local(8) mailbox.c / maildir.c / mail_copy.c)."""

from __future__ import annotations

import errno
import mailbox as stdlib_mailbox
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailserver.delivery import PermanentFailure, TemporaryFailure
from mailserver.delivery import mailbox as mb
from mailserver.delivery.mailbox import (
    MailboxError,
    deliver_maildir,
    deliver_mbox,
    delivery_headers,
    has_delivered_to,
)

ARRIVAL = 1_700_000_000.0  # a fixed arrival time

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"first line\r\n"
    b"From the start of a line\r\n"
    b">From already quoted\r\n"
    b"a From in the middle\r\n"
    b"last line without newline"
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def mbox_kwargs(**over):
    kw = dict(
        sender="alice@example.org",
        recipient="bob@example.com",
        original_recipient="Bob@Example.com",
        arrival_time=ARRIVAL,
    )
    kw.update(over)
    return kw


def maildir_kwargs(**over):
    kw = dict(
        sender="alice@example.org",
        recipient="bob@example.com",
        original_recipient="bob@example.com",
        hostname="mx.example.com",
    )
    kw.update(over)
    return kw


# --------------------------------------------------------------------------
# headers and loop detection
# --------------------------------------------------------------------------


def test_delivery_headers_order_and_sanitising() -> None:
    assert delivery_headers("a@x", "b@y", "c@z") == (
        b"Return-Path: <a@x>\nDelivered-To: b@y\nX-Original-To: c@z\n"
    )
    assert delivery_headers("", "b@y", "b@y") == (
        b"Return-Path: <>\nDelivered-To: b@y\nX-Original-To: b@y\n"
    )
    got = delivery_headers("a@x\r\nBcc: evil", "b@y\n", "c\x00@z")
    assert got == b"Return-Path: <a@xBcc: evil>\nDelivered-To: b@y\nX-Original-To: c@z\n"


def test_delivery_headers_omit_empty_original_recipient() -> None:
    assert b"X-Original-To" not in delivery_headers("a@x", "b@y", "")


def test_has_delivered_to_matches_header_case_insensitively() -> None:
    msg = b"Received: x\r\nDelivered-To: Bob@Example.COM \r\nSubject: s\r\n\r\nbody\r\n"
    assert has_delivered_to(msg, "bob@example.com")
    assert not has_delivered_to(msg, "alice@example.com")


def test_has_delivered_to_ignores_body() -> None:
    msg = b"Subject: s\r\n\r\nDelivered-To: bob@example.com\r\n"
    assert not has_delivered_to(msg, "bob@example.com")


def test_has_delivered_to_folded_and_lf_only() -> None:
    msg = b"delivered-to:\n\tbob@example.com\nSubject: s\n\nbody\n"
    assert has_delivered_to(msg, "bob@example.com")


def test_has_delivered_to_other_header_names() -> None:
    msg = b"X-Delivered-To: bob@example.com\r\nDelivered-Tox: bob@example.com\r\n\r\n"
    assert not has_delivered_to(msg, "bob@example.com")


def test_mailbox_error_outcome() -> None:
    assert MailboxError(True, "4.2.2", "full").outcome() == TemporaryFailure("4.2.2", "full")
    assert MailboxError(False, "5.2.0", "no").outcome() == PermanentFailure("5.2.0", "no")


# --------------------------------------------------------------------------
# mbox
# --------------------------------------------------------------------------


def test_mbox_format(tmp_path) -> None:
    path = tmp_path / "bob"
    deliver_mbox(str(path), MESSAGE, **mbox_kwargs())
    date = time.asctime(time.localtime(ARRIVAL)).encode()
    assert path.read_bytes() == (
        b"From alice@example.org " + date + b"\n"
        b"Return-Path: <alice@example.org>\n"
        b"Delivered-To: bob@example.com\n"
        b"X-Original-To: Bob@Example.com\n"
        b"From: Alice <alice@example.org>\n"
        b"Subject: hello\n"
        b"\n"
        b"first line\n"
        b">From the start of a line\n"
        b">>From already quoted\n"
        b"a From in the middle\n"
        b"last line without newline\n"
        b"\n"
    )
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not os.path.exists(str(path) + ".lock")


def test_mbox_null_sender_is_mailer_daemon(tmp_path) -> None:
    path = tmp_path / "bob"
    deliver_mbox(str(path), b"Subject: x\r\n\r\nhi\r\n", **mbox_kwargs(sender=""))
    data = path.read_bytes()
    assert data.startswith(b"From MAILER-DAEMON ")
    assert b"\nReturn-Path: <>\n" in data


def test_mbox_two_deliveries_are_appended(tmp_path) -> None:
    path = tmp_path / "bob"
    deliver_mbox(str(path), MESSAGE, **mbox_kwargs())
    first = path.read_bytes()
    deliver_mbox(str(path), b"Subject: second\r\n\r\nbody two\r\n", **mbox_kwargs())
    data = path.read_bytes()
    assert data.startswith(first)
    assert data[len(first) :].startswith(b"From alice@example.org ")
    assert data.endswith(b"body two\n\n")
    box = stdlib_mailbox.mbox(str(path), create=False)
    try:
        subjects = [m["Subject"] for m in box]
    finally:
        box.close()
    assert subjects == ["hello", "second"]


def test_mbox_write_error_truncates_back(tmp_path, monkeypatch) -> None:
    path = tmp_path / "bob"
    deliver_mbox(str(path), MESSAGE, **mbox_kwargs())
    before = path.read_bytes()

    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(mb.os, "write", failing_write)
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(path), b"Subject: x\r\n\r\n" + b"y" * 100_000, **mbox_kwargs())
    monkeypatch.undo()
    assert calls["n"] == 2  # the first chunk really was written, then undone
    assert info.value.temporary is True
    assert info.value.status == "4.2.2"
    assert os.strerror(errno.ENOSPC) in info.value.text
    assert path.read_bytes() == before
    assert not os.path.exists(str(path) + ".lock")


def test_mbox_fsync_error_truncates_back(tmp_path, monkeypatch) -> None:
    path = tmp_path / "bob"
    deliver_mbox(str(path), MESSAGE, **mbox_kwargs())
    size = path.stat().st_size

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(mb.os, "fsync", failing_fsync)
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(path), MESSAGE, **mbox_kwargs())
    monkeypatch.undo()
    assert (info.value.temporary, info.value.status) == (True, "4.2.0")
    assert path.stat().st_size == size


def test_mbox_live_dotlock_bounded_wait_then_temporary_failure(tmp_path) -> None:
    path = tmp_path / "bob"
    path.write_bytes(b"")
    lock = tmp_path / "bob.lock"
    lock.write_bytes(b"")  # fresh: held by someone else
    start = time.monotonic()
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(path), MESSAGE, **mbox_kwargs(), lock_timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 5
    assert (info.value.temporary, info.value.status) == (True, "4.2.0")
    assert "lock" in info.value.text
    assert lock.exists()  # not ours: left alone
    assert path.read_bytes() == b""


def test_mbox_stale_dotlock_is_removed(tmp_path) -> None:
    path = tmp_path / "bob"
    lock = tmp_path / "bob.lock"
    lock.write_bytes(b"")
    old = time.time() - mb.STALE_LOCK_AGE - 100
    os.utime(lock, (old, old))
    deliver_mbox(str(path), MESSAGE, **mbox_kwargs(), lock_timeout=0.3)
    assert path.read_bytes().startswith(b"From ")
    assert not lock.exists()


def test_mbox_fcntl_lock_held_by_other_process(tmp_path) -> None:
    path = tmp_path / "bob"
    path.write_bytes(b"")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(path)!r}, os.O_WRONLY)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxError) as info:
            deliver_mbox(str(path), MESSAGE, **mbox_kwargs(), lock_timeout=0.3)
        assert (info.value.temporary, info.value.status) == (True, "4.2.0")
        assert path.read_bytes() == b""
        assert not os.path.exists(str(path) + ".lock")  # our dotlock released
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    deliver_mbox(str(path), MESSAGE, **mbox_kwargs(), lock_timeout=5)
    assert path.read_bytes().startswith(b"From ")


def test_mbox_symlink_refused(tmp_path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    link = tmp_path / "bob"
    link.symlink_to(target)
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(link), MESSAGE, **mbox_kwargs())
    assert (info.value.temporary, info.value.status) == (True, "4.2.0")
    assert "symbolic link" in info.value.text
    assert target.read_bytes() == b"precious\n"
    assert not os.path.exists(str(link) + ".lock")


def test_mbox_dangling_symlink_refused(tmp_path) -> None:
    link = tmp_path / "bob"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(MailboxError):
        deliver_mbox(str(link), MESSAGE, **mbox_kwargs())
    assert not (tmp_path / "nowhere").exists()


def test_mbox_hard_link_refused(tmp_path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"")
    os.link(target, tmp_path / "bob")
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(tmp_path / "bob"), MESSAGE, **mbox_kwargs())
    assert "hard links" in info.value.text
    assert target.read_bytes() == b""


def test_mbox_fifo_refused_without_hanging(tmp_path) -> None:
    fifo = tmp_path / "bob"
    os.mkfifo(fifo)
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(fifo), MESSAGE, **mbox_kwargs())
    assert info.value.temporary


def test_mbox_directory_refused(tmp_path) -> None:
    (tmp_path / "bob").mkdir()
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(tmp_path / "bob"), MESSAGE, **mbox_kwargs())
    assert (info.value.temporary, info.value.status) == (True, "4.2.0")


def test_mbox_missing_spool_directory(tmp_path) -> None:
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(tmp_path / "nope" / "bob"), MESSAGE, **mbox_kwargs())
    assert (info.value.temporary, info.value.status) == (True, "4.2.0")
    assert "does not exist" in info.value.text


@needs_root
def test_mbox_new_file_owned_by_uid_gid(tmp_path) -> None:
    path = tmp_path / "bob"
    deliver_mbox(str(path), MESSAGE, **mbox_kwargs(), uid=65534, gid=65534)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    # An existing mailbox owned by someone else than uid is refused.
    with pytest.raises(MailboxError) as info:
        deliver_mbox(str(path), MESSAGE, **mbox_kwargs(), uid=12345, gid=12345)
    assert "wrong owner" in info.value.text


# --------------------------------------------------------------------------
# Maildir
# --------------------------------------------------------------------------


def test_maildir_delivery(tmp_path) -> None:
    md = tmp_path / "Maildir"
    got = deliver_maildir(str(md), MESSAGE, **maildir_kwargs())
    assert os.path.dirname(got) == str(md / "new")
    assert os.listdir(md / "tmp") == []
    assert os.listdir(md / "cur") == []
    assert os.listdir(md / "new") == [os.path.basename(got)]
    for sub in ("", "tmp", "new", "cur"):
        assert os.stat(md / sub).st_mode & 0o777 == 0o700
    assert os.stat(got).st_mode & 0o777 == 0o600
    data = Path(got).read_bytes()
    assert data == (
        b"Return-Path: <alice@example.org>\n"
        b"Delivered-To: bob@example.com\n"
        b"X-Original-To: bob@example.com\n"
        + MESSAGE.replace(b"\r\n", b"\n")
        + b"\n"
    )
    assert b">From" not in data.replace(b">From already", b"")  # no quoting
    assert os.path.basename(got).endswith(".mx.example.com")


def test_maildir_unique_names_and_hostname_escaping(tmp_path) -> None:
    md = tmp_path / "Maildir"
    a = deliver_maildir(str(md), MESSAGE, **maildir_kwargs(hostname="h/x:y"))
    b = deliver_maildir(str(md), MESSAGE, **maildir_kwargs(hostname="h/x:y"))
    assert a != b
    assert os.path.basename(a).endswith(".h\\057x\\072y")
    assert sorted(os.listdir(md / "new")) == sorted([os.path.basename(a), os.path.basename(b)])


def test_maildir_existing_directories_are_reused(tmp_path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "old").write_bytes(b"x")
    deliver_maildir(str(md), MESSAGE, **maildir_kwargs())
    assert os.listdir(md / "cur") == ["old"]
    assert len(os.listdir(md / "new")) == 1


def test_maildir_enospc_leaves_no_tmp_file(tmp_path, monkeypatch) -> None:
    md = tmp_path / "Maildir"

    def failing_write(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mb.os, "write", failing_write)
    with pytest.raises(MailboxError) as info:
        deliver_maildir(str(md), MESSAGE, **maildir_kwargs())
    monkeypatch.undo()
    assert (info.value.temporary, info.value.status) == (True, "4.2.2")
    assert os.listdir(md / "tmp") == []
    assert os.listdir(md / "new") == []


def test_maildir_rename_failure_leaves_nothing(tmp_path, monkeypatch) -> None:
    md = tmp_path / "Maildir"

    def failing_rename(src, dst):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(mb.os, "rename", failing_rename)
    with pytest.raises(MailboxError) as info:
        deliver_maildir(str(md), MESSAGE, **maildir_kwargs())
    monkeypatch.undo()
    assert (info.value.temporary, info.value.status) == (True, "4.2.0")
    assert os.listdir(md / "tmp") == []
    assert os.listdir(md / "new") == []


def test_maildir_path_is_a_file(tmp_path) -> None:
    md = tmp_path / "Maildir"
    md.write_bytes(b"not a directory")
    with pytest.raises(MailboxError) as info:
        deliver_maildir(str(md), MESSAGE, **maildir_kwargs())
    assert (info.value.temporary, info.value.status) == (True, "4.2.0")


@needs_root
def test_maildir_created_dirs_and_file_owned_by_uid_gid(tmp_path) -> None:
    md = tmp_path / "vmail" / "example.com" / "bob"
    got = deliver_maildir(str(md), MESSAGE, **maildir_kwargs(), uid=65534, gid=65534)
    for p in (tmp_path / "vmail", md, md / "tmp", md / "new", md / "cur", got):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (65534, 65534), p
    assert tmp_path.stat().st_uid == os.geteuid()  # pre-existing: untouched
