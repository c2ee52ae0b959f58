"""Local delivery to real system users: home Maildir, home mbox, .forward
ownership rules, files owned by the recipient, and the unprivileged mode.

These tests create a throw-away system user with ``useradd`` and therefore
need root — which CI has (the suite is run as root there, as the brief
says).  As a non-root developer they fail loudly instead of skipping."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness import ServerProcess, maildir_messages, wait_until

MSG = b"From: a@example.com\r\nSubject: to a user\r\n\r\nhello user\r\n"


@pytest.fixture(scope="module")
def user():
    assert os.geteuid() == 0, "these tests create a system user: run the suite as root (CI does)"
    name = f"mst{os.getpid() % 100000}"
    home = Path(tempfile.mkdtemp(prefix="mailserver-home-"))
    home.chmod(0o755)
    subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh", name],
                   check=True, capture_output=True)
    pw = pwd.getpwnam(name)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    yield pw
    subprocess.run(["userdel", name], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def clean_home(user):
    home = Path(user.pw_dir)
    for entry in home.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return home


def send(srv: ServerProcess, rcpt: str, msg: bytes = MSG) -> None:
    with smtplib.SMTP(srv.host, srv.port) as s:
        s.sendmail("a@example.com", [rcpt], msg)


def test_home_maildir_is_created_and_owned_by_the_recipient(tmp_path, user, clean_home):
    srv = ServerProcess(tmp_path, {"home_mailbox": "Maildir/"}).start()
    try:
        send(srv, f"{user.pw_name}@localhost")
        msgs = wait_until(lambda: maildir_messages(clean_home / "Maildir"), what="home Maildir delivery")
        assert b"hello user" in msgs[0]
        new = clean_home / "Maildir" / "new"
        assert new.stat().st_uid == user.pw_uid
        assert all((new / f).stat().st_uid == user.pw_uid for f in os.listdir(new))
        srv.wait_for_log(rf"to=<{user.pw_name}@localhost>.*status=sent \(delivered to maildir\)")
    finally:
        srv.stop()


def test_home_mbox_and_spool_mbox_are_owned_by_the_recipient(tmp_path, user, clean_home):
    srv = ServerProcess(tmp_path, {"home_mailbox": "Mailbox"}).start()
    try:
        send(srv, f"{user.pw_name}@localhost")
        wait_until(lambda: (clean_home / "Mailbox").exists() and (clean_home / "Mailbox").stat().st_size,
                   what="home mbox delivery")
        assert (clean_home / "Mailbox").stat().st_uid == user.pw_uid
    finally:
        srv.stop()
    srv2 = ServerProcess(tmp_path / "spoolmbox").start()
    try:
        send(srv2, f"{user.pw_name}@localhost")
        wait_until(lambda: (srv2.mail / user.pw_name).exists() and (srv2.mail / user.pw_name).stat().st_size,
                   what="spool mbox delivery")
        assert (srv2.mail / user.pw_name).stat().st_uid == user.pw_uid
        assert (srv2.mail / user.pw_name).read_bytes().startswith(b"From a@example.com ")
    finally:
        srv2.stop()


def test_dot_forward_owned_by_the_user_is_honoured(tmp_path, user, clean_home):
    fwd = clean_home / ".forward"
    fwd.write_text("box@virt.test\n")
    os.chown(fwd, user.pw_uid, user.pw_gid)
    fwd.chmod(0o644)
    srv = ServerProcess(tmp_path).start()
    try:
        send(srv, f"{user.pw_name}@localhost")
        msgs = wait_until(lambda: maildir_messages(srv.vmail / "box"), what="forwarded delivery")
        assert f"Delivered-To: {user.pw_name}@localhost".encode() in msgs[0]
        srv.wait_for_log(rf"to=<{user.pw_name}@localhost>.*status=sent \(forwarded as \w+\)")
        assert not (srv.mail / user.pw_name).exists()
    finally:
        srv.stop()


@pytest.mark.parametrize("owner_is_user, mode", [(False, 0o644), (True, 0o666), (True, 0o664)])
def test_dot_forward_not_owned_or_writable_by_others_is_ignored(tmp_path, user, clean_home, owner_is_user, mode):
    fwd = clean_home / ".forward"
    fwd.write_text("box@virt.test\n")
    if owner_is_user:
        os.chown(fwd, user.pw_uid, user.pw_gid)
    fwd.chmod(mode)
    srv = ServerProcess(tmp_path).start()
    try:
        send(srv, f"{user.pw_name}@localhost")
        wait_until(lambda: (srv.mail / user.pw_name).exists(), what="delivery to the mailbox instead")
        assert maildir_messages(srv.vmail / "box") == []
    finally:
        srv.stop()


def test_dot_forward_command_runs_as_the_recipient(tmp_path, user, clean_home):
    out = clean_home / "out.txt"
    fwd = clean_home / ".forward"
    fwd.write_text(f'"|/usr/bin/python3 -c \'import os,sys; open(\\"{out}\\",\\"w\\").write(str(os.getuid()))\'"\n')
    os.chown(fwd, user.pw_uid, user.pw_gid)
    fwd.chmod(0o644)
    srv = ServerProcess(tmp_path).start()
    try:
        send(srv, f"{user.pw_name}@localhost")
        # (the command creates the file, then writes: wait for what it writes)
        assert wait_until(lambda: out.exists() and out.read_text(), what="command from .forward") == str(user.pw_uid)
        assert out.stat().st_uid == user.pw_uid
    finally:
        srv.stop()


def test_unprivileged_delivery_to_an_unwritable_system_mailbox_is_deferred_with_a_clear_reason(tmp_path, user):
    """The local agent running as an unprivileged user (a forked child that
    drops to the test user's uid): a root-owned mail spool is out of reach,
    nothing is written, and the deferral reason says why."""
    import asyncio

    from mailserver import Config
    from mailserver.delivery import DeliveryRequest, Recipient
    from mailserver.delivery.local import LocalAgent
    from mailserver.resolve import AddressResolver

    spool = tmp_path / "mailspool"
    spool.mkdir(mode=0o755)  # root-owned
    tmp_path.chmod(0o755)
    config = Config(myhostname="mx.test.example", mail_spool_directory=str(spool), alias_maps=[],
                    queue_directory=str(tmp_path / "q"))
    agent = LocalAgent(config, AddressResolver(config))
    request = DeliveryRequest(queue_id="08DmbTESTAAA", sender="a@example.com",
                              recipients=(Recipient("root@mx.test.example", "root@mx.test.example", 0),),
                              message=MSG)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, deliver, report
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            outcome = asyncio.run(agent.deliver(request))[0]
            os.write(wfd, f"{type(outcome).__name__}|{outcome.status}|{outcome.text}".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        report = fh.read().decode()
    os.waitpid(pid, 0)
    kind, status, text = report.split("|", 2)
    assert kind == "TemporaryFailure" and status == "4.2.0"
    assert f"cannot deliver to mailbox of user root: {spool} is not writable by uid {user.pw_uid}" in text
    assert not (spool / "root").exists()
