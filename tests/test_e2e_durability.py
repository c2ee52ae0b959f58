"""Durability: SIGKILL the real server at awkward moments, restart it, and
check that every message that got 250 is delivered exactly once and that
nothing else appears; corrupt queue files; disk errors; retries and expiry."""

from __future__ import annotations

import asyncio
import email
import email.policy
import errno
import smtplib
import socket
import time

import pytest

from harness import ServerProcess, maildir_messages, smtp_dialog, wait_until

MSG = b"From: a@example.com\r\nSubject: durable\r\n\r\nkeep me\r\n"


def test_message_acknowledged_before_a_crash_is_delivered_once_after_restart(tmp_path):
    # defer_transports = virtual: accepted and queued, but not delivered yet.
    srv = ServerProcess(tmp_path, {"defer_transports": ["virtual"]}).start()
    with smtplib.SMTP(srv.host, srv.port) as s:
        s.sendmail("a@example.com", ["box@virt.test"], MSG)
    srv.wait_for_log(r"to=<box@virt.test>.*status=deferred \(deferred transport\)")
    queued = srv.queue_ids()
    assert len(queued) == 1
    srv.kill()
    assert srv.queue_ids() == queued  # on disk after SIGKILL
    assert maildir_messages(srv.vmail / "box") == []

    srv.params["defer_transports"] = []
    srv.start()
    wait_until(lambda: maildir_messages(srv.vmail / "box"), what="delivery after restart")
    srv.wait_for_log(r"removed")
    wait_until(lambda: not srv.queue_files(), what="empty queue")
    srv.stop()
    assert len(maildir_messages(srv.vmail / "box")) == 1
    assert b"keep me" in maildir_messages(srv.vmail / "box")[0]


def test_crash_while_active_returns_mail_to_incoming_and_delivers_it(tmp_path):
    srv = ServerProcess(tmp_path).start()
    srv.kill()
    # Simulate a crash in the middle of delivery: a message left in active/.
    srv.start()
    with smtplib.SMTP(srv.host, srv.port) as s:
        s.sendmail("a@example.com", ["box@virt.test"], MSG)
    wait_until(lambda: maildir_messages(srv.vmail / "box"), what="first delivery")
    srv.kill()
    qid = "08DmbZZZZZZZ"
    (srv.spool / "active" / f"{qid}.msg").write_bytes(MSG.replace(b"keep me", b"was active"))
    (srv.spool / "active" / f"{qid}.env").write_text(
        '{"v":1,"id":"%s","sender":"a@example.com","arrival":%f,"rcpt":[["box@virt.test","box@virt.test",'
        '"pending","","",""]]}' % (qid, time.time()))
    srv.start()
    wait_until(lambda: len(maildir_messages(srv.vmail / "box")) == 2, what="recovered delivery")
    srv.wait_for_log(r"queue recovery: requeued=1")
    srv.stop()


def test_crash_in_the_middle_of_data_leaves_nothing_behind(tmp_path):
    srv = ServerProcess(tmp_path).start()
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"EHLO c\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<box@virt.test>\r\nDATA\r\n")
    assert f.readline().startswith(b"250") and f.readline().startswith(b"250") and f.readline().startswith(b"354")
    sock.sendall(b"Subject: half\r\n\r\n" + b"x" * 100000)
    srv.wait_for_log(r"client=localhost")
    srv.kill()
    sock.close()
    assert srv.queue_files() == []
    srv.start()
    srv.stop()
    assert srv.queue_files() == [] and maildir_messages(srv.vmail / "box") == []
    assert not any((srv.spool / "incoming").iterdir())


def test_corrupt_queue_file_is_quarantined_and_other_mail_flows(tmp_path):
    srv = ServerProcess(tmp_path).start()
    srv.kill()
    (srv.spool / "incoming" / "08DmbCORRUPT.env").write_text("{this is not json")
    (srv.spool / "incoming" / "08DmbCORRUPT.msg").write_bytes(MSG)
    (srv.spool / "deferred" / "08DmbNOBODYX.env").write_text('{"v":1}')
    srv.start()
    with smtplib.SMTP(srv.host, srv.port) as s:
        s.sendmail("a@example.com", ["box@virt.test"], MSG)
    wait_until(lambda: maildir_messages(srv.vmail / "box"), what="delivery next to a corrupt file")
    # The deferred one is read (and found corrupt) when it comes due, not at start-up.
    wait_until(lambda: len(list((srv.spool / "corrupt").iterdir())) == 3, what="the corrupt deferred file quarantined")
    assert sorted(p.name for p in (srv.spool / "corrupt").iterdir()) == [
        "08DmbCORRUPT.env", "08DmbCORRUPT.msg", "08DmbNOBODYX.env"]
    srv.wait_for_log(r"warning: 08DmbCORRUPT: corrupt queue file moved to corrupt/")
    srv.stop()


def test_queue_minfree_refuses_mail_with_452_at_mail_from(tmp_path):
    srv = ServerProcess(tmp_path, {"queue_minfree": 1 << 60}).start()
    try:
        replies = smtp_dialog(srv.host, srv.port, [b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"QUIT\r\n"])
        assert replies[2] == "452 4.3.1 Insufficient system storage"
        assert srv.queue_files() == []
    finally:
        srv.stop()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_write_error_while_spooling_answers_451_and_leaves_nothing(tmp_path, err):
    """In-process server with a fault injected into the spool's write path."""
    from mailserver import Config, MailServer
    from harness import free_port

    port = free_port()
    config = Config(myhostname="mx.test.example", queue_directory=str(tmp_path / "spool"),
                    mail_spool_directory=str(tmp_path / "mail"), alias_maps=[],
                    services={"smtp": {"listen": [f"127.0.0.1:{port}"]}})
    async with MailServer(config, log_stream=None) as server:
        def fault(stage: str) -> None:
            raise OSError(err, "injected")

        server.spool.fault_hook = fault
        replies = await asyncio.to_thread(smtp_dialog, "127.0.0.1", port, [
            b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@mx.test.example>\r\n", b"DATA\r\n",
            b"Subject: x\r\n\r\ny\r\n.\r\n", b"QUIT\r\n"])
        assert replies[5] == "451 4.3.0 Error: queue file write error"
        for state in ("incoming", "active", "deferred"):
            assert list((tmp_path / "spool" / state).iterdir()) == []


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
def test_a_real_write_error_answers_451_leaves_nothing_and_mail_flows_after(tmp_path, engine):
    """The real server process with a file size limit (RLIMIT_FSIZE): the
    kernel refuses the queue file's write with EFBIG, as for a full disk."""
    srv = ServerProcess(tmp_path, {"io_engine": engine})
    srv.fsize_limit = 256 * 1024  # the log stays far below it
    srv.start()
    try:
        big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 400  # 400 kB
        replies = smtp_dialog(srv.host, srv.port, [
            b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@mx.test.example>\r\n", b"DATA\r\n",
            big + b".\r\n", b"QUIT\r\n"])
        assert replies[5] == "451 4.3.0 Error: queue file write error"
        assert srv.queue_files() == []
        srv.wait_for_log(r"warning: \w+: queue file write error: .*File too large")
        replies = smtp_dialog(srv.host, srv.port, [
            b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@mx.test.example>\r\n", b"DATA\r\n",
            b"Subject: small\r\n\r\nfine\r\n.\r\n", b"QUIT\r\n"])
        assert replies[5].startswith("250 2.0.0 Ok: queued as ")
        srv.wait_for_log(r"to=<root@mx\.test\.example>.*status=sent")
        assert srv.log().count("status=sent") == 1  # only the small one: the big one was never queued
    finally:
        srv.stop()


def test_out_of_file_descriptors_answers_451_and_queues_nothing(tmp_path):
    """The real server process at its open-file limit (RLIMIT_NOFILE 64):
    the connection gets the last descriptor, the queue file cannot be
    created (EMFILE): 451 4.3.0, nothing queued, and mail flows again once
    descriptors are free."""
    import os

    srv = ServerProcess(tmp_path, {"smtpd_process_limit": 100})
    srv.nofile_soft = srv.nofile_hard = 64
    srv.start()
    # (a virtual mailbox: its RCPT check needs no file, unlike a passwd lookup)
    message = [b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<box@virt.test>\r\n",
               b"DATA\r\n", b"Subject: fd\r\n\r\nx\r\n.\r\n", b"QUIT\r\n"]
    held: list[socket.socket] = []
    try:
        assert smtp_dialog(srv.host, srv.port, message)[5].startswith("250 ")  # opens what stays open
        srv.wait_for_log(r"status=sent")
        wait_until(lambda: "disconnect from" in srv.log(), what="the first session's end")
        used = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        for _ in range(64 - used - 1):  # every descriptor but one, each held by an idle session
            sock = socket.create_connection((srv.host, srv.port), timeout=10)
            assert sock.recv(512).startswith(b"220 ")
            held.append(sock)
        replies = smtp_dialog(srv.host, srv.port, message)
        assert replies[5] == "451 4.3.0 Error: queue file write error", replies
        assert srv.queue_files() == []
        srv.wait_for_log(r"queue file write error: .*Too many open files")
        # A passwd lookup that cannot run is a temporary failure, not "User unknown" (550).
        replies = smtp_dialog(srv.host, srv.port, [b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n",
                                                   b"RCPT TO:<root@mx.test.example>\r\n", b"QUIT\r\n"])
        assert replies[3] == "451 4.3.0 <root@mx.test.example>: Temporary lookup failure", replies
        for sock in held:
            sock.close()
        held.clear()
        wait_until(lambda: len(os.listdir(f"/proc/{srv.proc.pid}/fd")) <= used, what="the held sessions to end")
        assert smtp_dialog(srv.host, srv.port, message)[5].startswith("250 ")
        srv.wait_for_log(r"status=sent", count=2)
        assert srv.log().count("status=sent") == 2  # the refused message never went anywhere
    finally:
        for sock in held:
            sock.close()
        srv.stop()


def test_temporary_failure_is_retried_on_the_backoff_schedule_then_bounced(tmp_path):
    """An unwritable mailbox (missing mail spool directory): deferred, retried
    with backoff, bounced with one DSN after maximal_queue_lifetime."""
    missing = tmp_path / "no-such-spool"
    srv = ServerProcess(tmp_path, {"mail_spool_directory": str(missing), "minimal_backoff_time": "1s",
                                   "maximal_backoff_time": "2s", "maximal_queue_lifetime": "5s"})
    srv.params["home_mailbox"] = ""
    srv.start()
    # The server creates a missing mail_spool_directory at start; remove it again.
    missing.rmdir()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("bounces@virt.test", ["root@mx.test.example"], MSG)
        lines = srv.wait_for_log(r"to=<root@mx.test.example>.*status=deferred", count=3, timeout=20)
        delays = [float(line.split("delay=")[1].split(",")[0]) for line in lines]
        assert delays == sorted(delays) and delays[1] >= 1.0 and delays[2] - delays[1] >= 1.0
        srv.wait_for_log(r"status=expired, returned to sender", timeout=20)
        dsns = wait_until(lambda: maildir_messages(srv.vmail / "bounces"), timeout=20, what="expiry DSN")
        dsn = email.message_from_bytes(dsns[0], policy=email.policy.default)
        status = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"][0].get_payload()
        assert status[1]["Action"] == "failed" and status[1]["Status"].startswith("4.")
        assert "does not exist" in status[1]["Diagnostic-Code"]
        wait_until(lambda: not srv.queue_files(), what="message removed after the bounce")
        assert len(maildir_messages(srv.vmail / "bounces")) == 1  # one DSN per message
    finally:
        srv.stop()


def test_sigterm_stops_gracefully_with_exit_0(tmp_path):
    srv = ServerProcess(tmp_path).start()
    assert srv.stop() == 0
    assert "terminating on signal" in srv.log() or "daemon stopped" in srv.log()


def test_a_dsn_owed_at_crash_time_is_sent_after_restart(tmp_path):
    """The envelope recorded a bounced recipient and the DSN it owes, then the
    server died before the DSN was queued: the restart sends it, once."""
    srv = ServerProcess(tmp_path).start()
    srv.kill()
    qid = "08DmbOWEDDSN"
    (srv.spool / "deferred" / f"{qid}.msg").write_bytes(MSG)
    (srv.spool / "deferred" / f"{qid}.env").write_text(
        '{"v":1,"id":"%s","sender":"bounces@virt.test","arrival":%f,"extra":{"dsn_owed":[0]},'
        '"rcpt":[["gone@example.org","gone@example.org","bounced","5.1.1","host mx said: 550 5.1.1 no such user",'
        '"mx[192.0.2.1]:25"]]}' % (qid, time.time()))
    srv.start()
    dsns = wait_until(lambda: maildir_messages(srv.vmail / "bounces"), what="owed DSN")
    wait_until(lambda: not srv.queue_files(), what="message removed")
    dsn = email.message_from_bytes(dsns[0], policy=email.policy.default)
    status = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"][0].get_payload()
    assert status[1]["Final-Recipient"] == "rfc822; gone@example.org" and status[1]["Status"] == "5.1.1"
    srv.stop()
    assert len(maildir_messages(srv.vmail / "bounces")) == 1


def test_double_bounce_goes_to_the_postmaster_when_notify_classes_has_2bounce(tmp_path):
    (tmp_path / "aliases").write_text("postmaster: box@virt.test\nbroken: nosuchuser-anywhere\n")
    srv = ServerProcess(tmp_path, {"notify_classes": ["resource", "software", "2bounce"]}).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("", ["broken@localhost"], MSG)
        srv.wait_for_log(r"bounce\[\d+\]: \w+: postmaster non-delivery notification: \w+")
        notices = wait_until(lambda: maildir_messages(srv.vmail / "box"), what="double-bounce notice")
        dsn = email.message_from_bytes(notices[0], policy=email.policy.default)
        assert dsn.get_content_type() == "multipart/report"
        assert b"Return-Path: <double-bounce@mx.test.example>" in notices[0]
    finally:
        srv.stop()


def test_double_bounce_is_dropped_by_default(tmp_path):
    (tmp_path / "aliases").write_text("postmaster: box@virt.test\nbroken: nosuchuser-anywhere\n")
    srv = ServerProcess(tmp_path).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("", ["broken@localhost"], MSG)
        srv.wait_for_log(r"undeliverable bounce discarded")
        wait_until(lambda: not srv.queue_files(), what="queue empty")
        assert maildir_messages(srv.vmail / "box") == []
    finally:
        srv.stop()


def test_delay_warning_is_sent_once_while_the_message_waits(tmp_path):
    (tmp_path / "transport").write_text("later.test retry:4.4.1 remote is down\n")
    srv = ServerProcess(tmp_path, {"transport_maps": [f"texthash:{tmp_path / 'transport'}"],
                                   "delay_warning_time": "1s", "minimal_backoff_time": "1s",
                                   "maximal_backoff_time": "1s"}).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("bounces@virt.test", ["user@later.test"], MSG)
        srv.wait_for_log(r"sender delay notification: \w+", timeout=20)
        srv.wait_for_log(r"to=<user@later.test>.*status=deferred", count=4, timeout=20)
        warnings = maildir_messages(srv.vmail / "bounces")
        assert len(warnings) == 1
        dsn = email.message_from_bytes(warnings[0], policy=email.policy.default)
        assert dsn["Subject"] == "Delayed Mail (still being retried)"
        status = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"][0].get_payload()
        assert status[1]["Action"] == "delayed" and status[1]["Status"] == "4.4.1"
    finally:
        srv.stop()


def test_notify_classes_bounce_sends_the_postmaster_a_copy(tmp_path):
    (tmp_path / "aliases").write_text("postmaster: box@virt.test\nbroken: nosuchuser-anywhere\n")
    srv = ServerProcess(tmp_path, {"notify_classes": ["bounce"]}).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("bounces@virt.test", ["broken@localhost"], MSG)
        wait_until(lambda: maildir_messages(srv.vmail / "bounces"), what="sender DSN")
        copies = wait_until(lambda: maildir_messages(srv.vmail / "box"), what="postmaster copy")
        assert b"Return-Path: <double-bounce@mx.test.example>" in copies[0]
        srv.wait_for_log(r"postmaster non-delivery notification: \w+")
    finally:
        srv.stop()
