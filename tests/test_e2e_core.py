"""End to end: the real ``mailserver run`` process, real SMTP clients
(smtplib, raw sockets, swaks), real files.  The core mail path of issue 2."""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import ServerProcess, maildir_messages, smtp_dialog, wait_until

MSG = b"From: a@example.com\r\nTo: root@localhost\r\nSubject: test\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    (root / "aliases").write_text(
        "postmaster: root\n"
        "team: root,\n"
        "  box@virt.test,\n"
        f"  {root}/teamfile\n"
        "loop1: loop2\n"
        "loop2: loop1\n"
    )
    srv = ServerProcess(root, {"message_size_limit": 20000, "smtpd_recipient_limit": 3}).start()
    yield srv
    srv.stop()


def idle_queue(srv: ServerProcess) -> None:
    wait_until(lambda: not srv.queue_files("incoming", "active"), what="queue to drain")


def nothing_new(srv: ServerProcess, before: list[str]) -> None:
    idle_queue(srv)
    assert srv.queue_files() == [f for f in before if not f.startswith(("incoming", "active"))]


# ---------------------------------------------------------------- delivery
def test_mail_to_a_local_user_lands_in_the_mbox(server):
    idle_queue(server)
    before = server.mbox_count("root")
    with smtplib.SMTP(server.host, server.port) as s:
        code, banner = s.ehlo("client.example")
        assert code == 250 and b"PIPELINING" in banner and b"SIZE 20000" in banner
        assert b"ENHANCEDSTATUSCODES" in banner and b"8BITMIME" in banner and b"SMTPUTF8" in banner
        s.sendmail("a@example.com", ["root@localhost"], MSG + b".leading dot\r\n")
    wait_until(lambda: server.mbox_count("root") == before + 1, what="mbox delivery")
    box = server.mbox("root")
    last = box[box.rindex(b"\nFrom a@example.com ") + 1:] if before else box
    assert last.startswith(b"From a@example.com ")
    assert b"Return-Path: <a@example.com>\n" in last
    assert b"Delivered-To: root@localhost\n" in last
    assert b"Received: from client.example (localhost [127.0.0.1])" in last
    assert b"\n.leading dot\n" in last and b"\r\n" not in last
    server.wait_for_log(r"local\[\d+\]: \w+: to=<root@localhost>, relay=local, .*status=sent \(delivered to mailbox\)")
    server.wait_for_log(r"qmgr\[\d+\]: \w+: removed")


def test_greeting_and_queued_reply_formats(server):
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c.example\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@localhost>\r\n",
        b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n"])
    assert replies[0] == "220 mx.test.example ESMTP"
    assert replies[2] == "250 2.1.0 Ok" and replies[3] == "250 2.1.5 Ok"
    assert replies[4].startswith("354 ")
    assert replies[5].startswith("250 2.0.0 Ok: queued as ")
    assert replies[6] == "221 2.0.0 Bye"


def test_alias_fans_out_to_mbox_maildir_and_file(server):
    idle_queue(server)
    before = server.mbox_count("root")
    with smtplib.SMTP(server.host, server.port) as s:
        s.sendmail("a@example.com", ["team@localhost"], MSG)
    wait_until(lambda: server.mbox_count("root") == before + 1, what="alias to root")
    wait_until(lambda: maildir_messages(server.vmail / "box"), what="alias to virtual maildir")
    wait_until(lambda: (server.root / "teamfile").exists() and b"hello" in (server.root / "teamfile").read_bytes(),
               what="alias to file")
    server.wait_for_log(r"to=<team@localhost>.*status=sent")


def test_virtual_mailboxes_maildir_and_mbox(server):
    n = len(maildir_messages(server.vmail / "box"))
    with smtplib.SMTP(server.host, server.port) as s:
        s.sendmail("a@example.com", ["box@virt.test", "mbox@virt.test"], MSG)
    wait_until(lambda: len(maildir_messages(server.vmail / "box")) == n + 1, what="virtual maildir")
    wait_until(lambda: (server.vmail / "mboxfile").exists(), what="virtual mbox")
    assert (server.vmail / "box" / "tmp").is_dir() and not os.listdir(server.vmail / "box" / "tmp")
    msg = maildir_messages(server.vmail / "box")[-1]
    assert b"Delivered-To: box@virt.test\n" in msg


def test_alias_loop_bounces_with_5_4_6(server):
    with smtplib.SMTP(server.host, server.port) as s:
        s.sendmail("", ["loop1@localhost"], MSG)
    server.wait_for_log(r"to=<loop1@localhost>.*dsn=5\.4\.6, status=bounced")


# ---------------------------------------------------------------- rejections
def test_unknown_local_user_is_rejected_at_rcpt_and_nothing_is_queued(server):
    before = server.queue_files()
    with smtplib.SMTP(server.host, server.port) as s:
        s.ehlo()
        s.mail("a@example.com")
        code, text = s.rcpt("nosuchuser@localhost")
        assert (code, text) == (550, b"5.1.1 <nosuchuser@localhost>: Recipient address rejected: "
                                     b"User unknown in local recipient table")
        code, text = s.rcpt("nobody@virt.test")
        assert code == 550 and b"User unknown in virtual mailbox table" in text
    nothing_new(server, before)
    server.wait_for_log(r"NOQUEUE: reject: RCPT from localhost\[127\.0\.0\.1\]: 550 5\.1\.1 <nosuchuser@localhost>")


@pytest.mark.parametrize("local", ["../etc/passwd", ".hidden", "a/b", "..", "root/../root"])
def test_path_like_local_parts_never_reach_the_file_system(server, local):
    before = server.queue_files()
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", f'RCPT TO:<"{local}"@localhost>\r\n'.encode(), b"QUIT\r\n"])
    assert replies[3].startswith("550 5.1.1 ")
    nothing_new(server, before)


def test_relaying_is_denied_to_clients_outside_mynetworks(server):
    before = server.queue_files()
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO outside\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<victim@example.org>\r\n",
        b"RCPT TO:<relaytest%example.org@localhost>\r\n", b"RCPT TO:<example.org!relaytest@localhost>\r\n",
        b"RCPT TO:<@mx.test.example:victim@example.org>\r\n", b"RCPT TO:<root@localhost>\r\n", b"QUIT\r\n"],
        source="127.0.0.2")
    assert replies[3] == "554 5.7.1 <victim@example.org>: Relay access denied"
    assert replies[4] == "554 5.7.1 <relaytest%example.org@localhost>: Relay access denied"
    assert replies[5] == "554 5.7.1 <example.org!relaytest@localhost>: Relay access denied"
    assert replies[6] == "554 5.7.1 <victim@example.org>: Relay access denied"
    assert replies[7] == "250 2.1.5 Ok"  # a local recipient in the same session is fine
    nothing_new(server, before)


def test_postmaster_is_always_accepted(server):
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO outside\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<postmaster>\r\n",
        b"RCPT TO:<Postmaster@mx.test.example>\r\n", b"RSET\r\n", b"QUIT\r\n"], source="127.0.0.2")
    assert replies[3] == "250 2.1.5 Ok" and replies[4] == "250 2.1.5 Ok"


def test_null_sender_is_accepted(server):
    replies = smtp_dialog(server.host, server.port, [b"EHLO c\r\n", b"MAIL FROM:<>\r\n", b"QUIT\r\n"])
    assert replies[2] == "250 2.1.0 Ok"


@pytest.mark.parametrize("command, reply", [
    (b"MAIL FROM:<a..b@example.com>\r\n", "501 5.1.7 Bad sender address syntax"),
    (b"MAIL FROM:<a@example.com\r\n", "501 5.1.7 Bad sender address syntax"),
    (b"MAIL FROM:<\"unbalanced@example.com>\r\n", "501 5.1.7 Bad sender address syntax"),
    (b"MAIL FROM:<" + b"a" * 65 + b"@example.com>\r\n", "501 5.1.7 Bad sender address syntax"),
    (b"MAIL FROM:<a@example.com>\rX-Injected: yes\r\n", "501 5.1.7 Bad sender address syntax"),
    (b"MAIL FROM:<a\x00b@example.com>\r\n", "501 5.1.7 Bad sender address syntax"),
    (b"MAIL FROM:<a@example.com> SIZE=99999999\r\n", "552 5.3.4 Message size exceeds fixed limit"),
    (b"MAIL FROM:<a@example.com> FOO=bar\r\n", "555 5.5.4 Unsupported option: FOO"),
    (b"MAIL TO:<a@example.com>\r\n", "501 5.5.4 Syntax: MAIL FROM:<address>"),
])
def test_bad_mail_commands_get_exact_replies(server, command, reply):
    replies = smtp_dialog(server.host, server.port, [b"EHLO c\r\n", command, b"QUIT\r\n"])
    assert replies[2] == reply


@pytest.mark.parametrize("command, reply", [
    (b"RCPT TO:<root@" + b"a" * 256 + b".com>\r\n", "501 5.1.3 Bad recipient address syntax"),
    (b"RCPT TO:<root@localhost>\tX\r\n", "501 5.1.3 Bad recipient address syntax"),
    (b"RCPT TO:<relaytest@example.com@[127.0.0.1]>\r\n", "501 5.1.3 Bad recipient address syntax"),
])
def test_bad_rcpt_commands_get_exact_replies(server, command, reply):
    replies = smtp_dialog(server.host, server.port, [b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", command,
                                                     b"QUIT\r\n"])
    assert replies[3] == reply


def test_header_injection_through_ehlo_is_refused(server):
    replies = smtp_dialog(server.host, server.port, [b"EHLO evil\rX-Injected: yes\r\n", b"QUIT\r\n"])
    assert replies[1] == "501 5.5.2 Error: invalid characters in hostname"
    replies = smtp_dialog(server.host, server.port, [b"EHLO evil\nX-Injected: yes\r\n"])
    assert replies[1].startswith("521 5.5.2 ")


def test_command_line_over_512_octets_is_refused(server):
    replies = smtp_dialog(server.host, server.port, [b"EHLO c\r\n", b"NOOP " + b"x" * 600 + b"\r\n",
                                                     b"NOOP\r\n", b"QUIT\r\n"])
    assert replies[2] == "500 5.5.2 Error: command line too long"
    assert replies[3] == "250 2.0.0 Ok"


def test_other_commands(server):
    replies = smtp_dialog(server.host, server.port, [
        b"HELO c\r\n", b"VRFY root\r\n", b"HELP\r\n", b"NOOP\r\n", b"RSET\r\n", b"DATA\r\n",
        b"RCPT TO:<root@localhost>\r\n", b"XYZZY\r\n", b"MAIL FROM:<a@example.com>\r\n",
        b"MAIL FROM:<a@example.com>\r\n", b"DATA\r\n", b"QUIT\r\n"])
    assert replies[1] == "250 mx.test.example"
    assert replies[2].startswith("252 2.0.0 ")
    assert replies[3].startswith("214 2.0.0 ")
    assert replies[4] == replies[5] == "250 2.0.0 Ok"
    assert replies[6] == "503 5.5.1 Error: need MAIL command"
    assert replies[7] == "503 5.5.1 Error: need MAIL command"
    assert replies[8] == "502 5.5.2 Error: command not recognized"
    assert replies[10] == "503 5.5.1 Error: nested MAIL command"
    assert replies[11] == "503 5.5.1 Error: need RCPT command"


# ---------------------------------------------------------------- limits
def test_message_over_size_limit_is_read_to_the_end_then_refused(server):
    before = server.queue_files()
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 30 + b".\r\n"
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@localhost>\r\n", b"DATA\r\n", big,
        b"NOOP\r\n", b"QUIT\r\n"])
    assert replies[5] == "552 5.3.4 Message size exceeds fixed limit"
    assert replies[6] == "250 2.0.0 Ok"  # the session is still in sync
    nothing_new(server, before)


def test_recipient_limit(server):
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n"] + [b"RCPT TO:<root@localhost>\r\n"] * 3 +
        [b"RCPT TO:<root@localhost>\r\n", b"RSET\r\n", b"QUIT\r\n"])
    assert replies[3:6] == ["250 2.1.5 Ok"] * 3
    assert replies[6] == "452 4.5.3 Error: too many recipients"


def test_hop_count_limit(server):
    before = server.queue_files()
    body = b"".join(b"Received: from hop%d by x; Sat, 21 Nov 2026 10:00:00 +0000\r\n" % i for i in range(50))
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@localhost>\r\n", b"DATA\r\n",
        body + b"Subject: loop\r\n\r\nx\r\n.\r\n", b"QUIT\r\n"])
    assert replies[5] == "554 5.4.0 Error: too many hops"
    nothing_new(server, before)


# ---------------------------------------------------------------- smuggling (CVE-2023-51764 class)
SMUGGLED = b"MAIL FROM:<smuggler@example.com>\r\nRCPT TO:<root@localhost>\r\nDATA\r\nSubject: smuggled\r\n\r\nX\r\n"


@pytest.mark.parametrize("terminator", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n"])
def test_smuggling_variants_are_rejected_and_nothing_extra_is_queued(server, terminator):
    idle_queue(server)
    before_count = server.mbox_count("root")
    before = server.queue_files()
    payload = b"Subject: outer\r\n\r\nbody" + terminator + SMUGGLED + b".\r\n"
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@localhost>\r\n", b"DATA\r\n", payload,
        b"QUIT\r\n"])
    expected = "550 5.5.2 Error: bare <LF> received" if b"\n" in terminator.replace(b"\r\n", b"") \
        else "550 5.5.2 Error: bare <CR> received"
    assert replies[5] == expected
    assert replies[6] == "221 2.0.0 Bye"
    nothing_new(server, before)
    assert server.mbox_count("root") == before_count
    assert "smuggler" not in server.log()


def test_nul_in_data_is_rejected(server):
    before = server.queue_files()
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@localhost>\r\n", b"DATA\r\n",
        b"Subject: nul\r\n\r\na\x00b\r\n.\r\n", b"QUIT\r\n"])
    assert replies[5] == "554 5.6.0 Error: message content contains NUL characters"
    nothing_new(server, before)


def test_crlf_dot_crlf_inside_a_line_does_not_end_data(server):
    idle_queue(server)
    before_count = server.mbox_count("root")
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<root@localhost>\r\n", b"DATA\r\n",
        b"Subject: dots\r\n\r\n..\r\n. not the end\r\n.\r\n", b"QUIT\r\n"])
    assert replies[5].startswith("250 2.0.0 Ok: queued as ")
    wait_until(lambda: server.mbox_count("root") == before_count + 1, what="delivery")
    assert b"\n.\n not the end\n" in server.mbox("root")  # a leading dot is transparency (RFC 5321 4.5.2)


def test_pipelining_before_ehlo_is_refused_and_the_connection_closed(server):
    before = server.queue_files()
    replies = smtp_dialog(server.host, server.port, [
        b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<root@localhost>\r\n", b""])
    assert replies[1] == "554 5.5.0 Error: SMTP protocol synchronization"
    assert replies[2] == "<EOF>"
    nothing_new(server, before)


def test_pipelining_after_ehlo_is_allowed(server):
    replies = smtp_dialog(server.host, server.port, [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\nRCPT TO:<root@localhost>\r\nDATA\r\n", b"", b"",
        b"Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n", b""])
    assert replies[2:5] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert replies[5].startswith("250 2.0.0 Ok: queued as ") and replies[6] == "221 2.0.0 Bye"


def test_swaks_sends_mail(server):
    out = subprocess.run(["swaks", "--server", f"{server.host}:{server.port}", "--from", "swaks@example.com",
                          "--to", "root@localhost", "--header", "Subject: from swaks", "--body", "swaks body"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    wait_until(lambda: b"Subject: from swaks" in server.mbox("root"), what="swaks delivery")


# ---------------------------------------------------------------- bounces
def test_unknown_alias_target_bounces_to_the_sender_with_a_dsn(tmp_path):
    (tmp_path / "aliases").write_text("broken: nosuchuser-anywhere\n")
    srv = ServerProcess(tmp_path).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("bounces@virt.test", ["broken@localhost"], MSG)
        srv.wait_for_log(r"to=<broken@localhost>.*dsn=5\.1\.1, status=bounced")
        dsns = wait_until(lambda: maildir_messages(srv.vmail / "bounces"), what="DSN delivery")
        dsn = email.message_from_bytes(dsns[0], policy=email.policy.default)
        assert dsn.get_content_type() == "multipart/report"
        assert dsn["From"].startswith("MAILER-DAEMON@mx.test.example")
        assert dsn["Auto-Submitted"] == "auto-replied"
        assert "Return-Path: <>" in dsns[0].decode()
        status = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"][0]
        blocks = status.get_payload()
        assert blocks[1]["Final-Recipient"] == "rfc822; broken@localhost"
        assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"
        headers = [p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers"][0]
        assert "Subject: test" in headers.get_content()
    finally:
        srv.stop()


def test_no_dsn_for_a_null_sender_bounce(tmp_path):
    (tmp_path / "aliases").write_text("broken: nosuchuser-anywhere\n")
    srv = ServerProcess(tmp_path).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("", ["broken@localhost"], MSG)
        srv.wait_for_log(r"to=<broken@localhost>.*status=bounced")
        srv.wait_for_log(r"qmgr\[\d+\]: \w+: removed")
        idle_queue(srv)
        assert "sender non-delivery notification" not in srv.log()
        assert srv.queue_files() == []
    finally:
        srv.stop()


def test_delivered_to_loop_bounces(server):
    msg = b"Delivered-To: root@localhost\r\nSubject: looped\r\n\r\nx\r\n"
    with smtplib.SMTP(server.host, server.port) as s:
        s.sendmail("", ["root@localhost"], msg)
    server.wait_for_log(r"to=<root@localhost>.*dsn=5\.4\.6, status=bounced \(mail forwarding loop")


@pytest.fixture
def shared_dir():
    """A directory the unprivileged command user (default_privs) can use:
    as root, alias commands run as ``nobody``, who cannot enter pytest's
    private tmp directory."""
    path = Path(tempfile.mkdtemp(prefix="mailserver-cmd-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_command_alias_runs_without_a_shell_and_gets_a_clean_environment(tmp_path, shared_dir):
    out = shared_dir / "cmd-out"
    script = shared_dir / "deliver.py"
    script.write_text("import os, sys\n"
                      f"open({str(out)!r}, 'w').write(repr(sorted(os.environ)) + '\\n' + os.environ['RECIPIENT']"
                      " + '\\n' + repr(os.getuid()) + '\\n' + sys.stdin.read())\n")
    script.chmod(0o644)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    (tmp_path / "aliases").write_text(f'prog: "|{python} {script} ; touch {shared_dir}/pwned"\n'
                                      f"tempfail: \"|{python} -c 'raise SystemExit(75)'\"\n")
    srv = ServerProcess(tmp_path).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("a@example.com", ["prog@localhost"], MSG)
            s.sendmail("a@example.com", ["tempfail@localhost"], MSG)
        wait_until(out.exists, what="command delivery")
        text = wait_until(lambda: "Subject: test" in out.read_text() and out.read_text(), what="command output")
        assert "prog@localhost" in text
        assert "'SENDER'" in text and "'PYTHONUNBUFFERED'" not in text and "'TZ'" not in text
        if os.geteuid() == 0:  # alias commands never run as root (default_privs)
            assert f"\n{pwd.getpwnam('nobody').pw_uid}\n" in text
        assert not (shared_dir / "pwned").exists()  # ';' is an argument, not a shell operator
        srv.wait_for_log(r"to=<tempfail@localhost>.*status=deferred \(Command died with status 75")
    finally:
        srv.stop()
