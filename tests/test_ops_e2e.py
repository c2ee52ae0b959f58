"""Operating it end to end: the real ``mailserver run`` process and the real
command line — sendmail with and without the server, mailq/postcat/qshape
on a real spool, flush, hold/release/delete/requeue while a delivery is in
flight, status, reload (command and SIGHUP) without dropping a session,
stop, and pflogsumm over the log of a run."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from harness import ServerProcess, free_port, maildir_messages, smtp_dialog, wait_until

MSG = b"From: a@example.com\r\nTo: root@localhost\r\nSubject: test\r\n\r\nhello\r\n"


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout={result.stdout!r}\nstderr={result.stderr!r}"
    return result


def queue_json(srv: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in ok(srv.cli("queue", "list", "--json")).stdout.decode().splitlines()]


class GateServer:
    """A slow next hop: accepts SMTP connections and holds each one,
    silent, until ``gate`` opens; then answers 421 (a temporary failure)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.gate = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connected.set()
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn:
            self.gate.wait(30)
            try:
                conn.sendall(b"421 4.3.2 slow.test is busy, try again later\r\n")
            except OSError:
                pass

    def reset(self) -> None:
        self.connected.clear()
        self.gate.clear()

    def close(self) -> None:
        self.gate.set()
        self._done.set()
        self._thread.join(5)
        self.sock.close()


# ---------------------------------------------------------------- sendmail
def test_sendmail_without_and_with_the_server_and_its_exit_codes(tmp_path):
    srv = ServerProcess(tmp_path, {"message_size_limit": 4000})
    srv.write_config()
    # The server is down: the message waits in maildrop.
    ok(srv.cli("sendmail", "-t", "-i", input=b"To: root@localhost\nBcc: box@virt.test\nSubject: down\n\n"
                                             b"sent while the server was down\n.\nstill body with -i\n"))
    assert len(srv.queue_files("maildrop")) == 1 and srv.queue_files("maildrop")[0].endswith(".drop")
    listing = ok(srv.cli("queue", "list")).stdout.decode()
    assert "root@mx.test.example" in listing and "root@localhost" in listing and "box@virt.test" in listing
    # Malformed submissions: a sysexits code and nothing left behind.
    for args, data, status in ((["sendmail"], b"Subject: x\n\nno recipients\n", 64),
                               (["sendmail", "-t"], b"Subject: x\n\nno recipients either\n", 64),
                               (["sendmail", "root@localhost"], b"Subject: big\n\n" + b"x" * 5000 + b"\n", 65),
                               (["sendmail", "-Z", "root@localhost"], b"x\n", 64),
                               (["sendmail", "bad address@@"], b"x\n", 64)):
        result = srv.cli(*args, input=data)
        assert result.returncode == status, (args, result)
        assert b"fatal" in result.stderr
    assert len(srv.queue_files("maildrop")) == 1
    srv.start()
    try:
        wait_until(lambda: srv.mbox_count("root") == 1, what="maildrop mail delivered after start")
        boxed = wait_until(lambda: maildir_messages(srv.vmail / "box"), what="Bcc recipient delivered")
        mbox = srv.mbox("root")
        assert b"sent while the server was down\n.\nstill body with -i\n" in mbox
        assert b"Bcc" not in mbox and b"Bcc" not in boxed[0]
        assert b"\nFrom: root@mx.test.example\n" in mbox and b"\nMessage-ID: <" in mbox and b"\nDate: " in mbox
        srv.wait_for_log(r"mailserver/pickup\[\d+\]: \w+: uid=\d+ from=<root@mx.test.example>")
        assert srv.queue_files("maildrop") == []

        # The server is up: the nudge over the control socket queues it at once.
        ok(srv.cli("sendmail", "-f", "sender", "-F", "Jane Doe", "root",
                   input=b"Subject: up\n\nsent while the server ran\n"))
        wait_until(lambda: srv.mbox_count("root") == 2, timeout=5, what="delivery within the poll interval")
        last = srv.mbox("root").rsplit(b"\nFrom sender@mx.test.example ", 1)[1]
        assert b"From: Jane Doe <sender@mx.test.example>\n" in last

        # sendmail -bs: SMTP on stdin/stdout.
        out = ok(srv.cli("sendmail", "-bs", input=b"EHLO me\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<root@localhost>"
                                                    b"\r\nDATA\r\nSubject: bs\r\n\r\n..dot\r\n.\r\nQUIT\r\n")).stdout
        lines = out.decode().splitlines()
        assert lines[0] == "220 mx.test.example ESMTP mailserver" and lines[-1] == "221 2.0.0 Bye"
        queued = [line for line in lines if line.startswith("250 2.0.0 Ok: queued as ")]
        assert len(queued) == 1
        qid = queued[0].rsplit(" ", 1)[1]
        srv.wait_for_log(rf"{qid}: to=<root@localhost>, .*status=sent")
        assert b"\n.dot\n" in srv.mbox("root")

        # argv[0]: sendmail, mailq and newaliases links.
        bin_dir = tmp_path / "bin"
        ok(srv.cli("install-links", str(bin_dir)))
        assert sorted(os.listdir(bin_dir)) == ["mailq", "newaliases", "sendmail"]
        # the program installed with this interpreter, not a version manager's shim on PATH
        import sysconfig
        assert os.path.realpath(bin_dir / "sendmail") == os.path.realpath(
            os.path.join(sysconfig.get_path("scripts"), "mailserver"))
        ok(srv.cli("root@localhost", input=b"Subject: via link\n\nx\n", prog=str(bin_dir / "sendmail")))
        wait_until(lambda: srv.mbox_count("root") == 4, what="delivery through the sendmail link")
        wait_until(lambda: not srv.queue_files(), what="queue to drain")
        assert ok(srv.cli(prog=str(bin_dir / "mailq"))).stdout == b"Mail queue is empty\n"
        assert b"1 aliases" in ok(srv.cli(prog=str(bin_dir / "newaliases"))).stderr
        assert ok(srv.cli("sendmail", "-bp")).stdout == b"Mail queue is empty\n"

        # mailserver stop: a graceful stop, exit 0.
        assert b"stopping the mail system" in ok(srv.cli("stop")).stderr
        assert srv.proc is not None and srv.proc.wait(timeout=20) == 0
        assert srv.cli("status").returncode == 1
    finally:
        srv.stop()


# ---------------------------------------------------------------- mailq, postcat, qshape, status, flush
def test_mailq_show_summary_status_and_flush_of_deferred_mail(tmp_path):
    srv = ServerProcess(tmp_path, {"defer_transports": ["local"], "minimal_backoff_time": "1h",
                                   "maximal_backoff_time": "2h"}).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("a@example.com", ["root@localhost"], MSG)
        srv.wait_for_log(r"to=<root@localhost>, relay=none, .*status=deferred \(deferred transport\)")
        wait_until(lambda: srv.queue_files("deferred"), what="deferred message")
        (qid,) = srv.queue_ids("deferred")
        entry = queue_json(srv)[0]
        assert entry["queue_id"] == qid and entry["queue_name"] == "deferred" and entry["sender"] == "a@example.com"
        assert entry["recipients"] == [{"address": "root@localhost", "delay_reason": "deferred transport"}]
        lines = ok(srv.cli("queue", "list")).stdout.decode().splitlines()
        assert lines[0] == "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------"
        assert re.fullmatch(rf"{qid} +{entry['message_size']} \w{{3}} \w{{3}} [ \d]\d \d\d:\d\d:\d\d a@example.com",
                            lines[1])
        assert lines[1].index(str(entry["message_size"])) + len(str(entry["message_size"])) == 26
        assert lines[2] == " " * (76 - len("deferred transport")) + "(deferred transport)"
        assert lines[3] == " " * 47 + "root@localhost"
        assert lines[4:] == ["", f"-- {entry['message_size'] // 1024} Kbytes in 1 Request."]

        shown = ok(srv.cli("queue", "show", qid)).stdout.decode()
        assert shown.startswith(f"*** ENVELOPE RECORDS deferred/{qid} ***\n")
        assert "sender: a@example.com\n" in shown and "recipient: root@localhost\n" in shown
        assert f"*** MESSAGE CONTENTS deferred/{qid} ***\n" in shown and "Subject: test\n" in shown
        assert shown.endswith(f"*** MESSAGE FILE END deferred/{qid} ***\n")
        assert srv.cli("queue", "show", "08DmNOSUCHID0").returncode == 1

        shape = ok(srv.cli("queue", "summary", "deferred")).stdout.decode().splitlines()
        assert shape[1].split()[:3] == ["TOTAL", "1", "1"] and shape[2].split()[:3] == ["localhost", "1", "1"]

        status = json.loads(ok(srv.cli("status", "--json")).stdout)
        assert status["running"] and status["pid"] == srv.proc.pid
        assert status["listeners"] == [{"service": "smtp", "address": f"127.0.0.1:{srv.port}", "sessions": 0}]
        assert status["queue"]["deferred"] == 1 and status["active_deliveries"] == 0
        text = ok(srv.cli("status")).stdout.decode()
        assert f"pid {srv.proc.pid}" in text and "deferred=1" in text and f"127.0.0.1:{srv.port}" in text

        # postqueue -f: deferred mail (here: held back by defer_transports, with
        # an hour of backoff) goes now.
        ok(srv.cli("queue", "flush"))
        wait_until(lambda: srv.mbox_count("root") == 1, timeout=5, what="flushed delivery")
        # postqueue -s DOMAIN, and sendmail -q, for the next one.
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("a@example.com", ["root@localhost"], MSG)
        wait_until(lambda: srv.queue_files("deferred"), what="second deferral")
        ok(srv.cli("queue", "flush", "-s", "other.example"))
        ok(srv.cli("queue", "flush", "-s", "localhost"))
        wait_until(lambda: srv.mbox_count("root") == 2, timeout=5, what="flush -s delivery")
        srv.stop()
        result = srv.cli("queue", "flush")
        assert result.returncode == 69 and b"mail system is down" in result.stderr
        assert srv.cli("reload").returncode == 1 and srv.cli("stop").returncode == 1
    finally:
        srv.stop()


# ---------------------------------------------------------------- postsuper while a delivery is in flight
def test_hold_release_requeue_delete_during_active_delivery(tmp_path):
    gate = GateServer()
    srv = ServerProcess(tmp_path, {"transport_maps": [f"inline:{{ slow.test=smtp:[127.0.0.1]:{gate.port} }}"],
                                   "minimal_backoff_time": "1h", "maximal_backoff_time": "2h"}).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("a@example.com", ["user@slow.test"], MSG)
        assert gate.connected.wait(15)
        (qid,) = srv.queue_ids("active")
        assert f"\n{qid}*" in ok(srv.cli("queue", "list")).stdout.decode()

        # hold: marked now, done after the attempt; the result is recorded.
        held = ok(srv.cli("queue", "hold", qid))
        assert f"{qid}: being delivered".encode() in held.stderr and b"Placed on hold: 1 message" in held.stderr
        assert srv.queue_ids("active") == [qid]
        gate.gate.set()
        srv.wait_for_log(rf"postsuper\[\d+\]: {qid}: placed on hold")
        assert srv.queue_ids("hold") == [qid] and srv.queue_files("active", "deferred") == []
        entry = queue_json(srv)[0]
        arrival = entry["arrival_time"]
        assert entry["queue_name"] == "hold" and "421 4.3.2" in entry["recipients"][0]["delay_reason"]
        assert f"\n{qid}!" in ok(srv.cli("queue", "list")).stdout.decode()

        # release: to deferred, due now (tried again at once: 421 again).
        attempts = len(srv.wait_for_log(rf"{qid}: to=<user@slow.test>.*status=deferred"))
        assert b"released from hold" in ok(srv.cli("queue", "release", qid)).stderr
        srv.wait_for_log(rf"{qid}: to=<user@slow.test>.*status=deferred", count=attempts + 1)
        wait_until(lambda: srv.queue_ids("deferred") == [qid], what="released message deferred")

        # requeue while in flight: a new queue file through pickup/cleanup,
        # the original arrival time kept, the old one gone.
        gate.reset()
        ok(srv.cli("queue", "flush", qid))
        assert gate.connected.wait(15)
        wait_until(lambda: srv.queue_ids("active") == [qid], what="flushed message active")
        assert b"being delivered" in ok(srv.cli("queue", "requeue", qid)).stderr
        gate.gate.set()
        srv.wait_for_log(rf"postsuper\[\d+\]: {qid}: requeued")
        new = wait_until(lambda: [m for m in queue_json(srv) if m["queue_name"] == "deferred"], what="requeued mail")
        assert len(new) == 1 and new[0]["queue_id"] != qid and new[0]["arrival_time"] == arrival
        assert [r["address"] for r in new[0]["recipients"]] == ["user@slow.test"]
        new_id = new[0]["queue_id"]
        srv.wait_for_log(rf"pickup\[\d+\]: {new_id}: uid=\d+ from=<a@example.com>")

        # delete while in flight: gone after the attempt, nothing delivered or bounced.
        gate.reset()
        ok(srv.cli("queue", "flush", new_id))
        assert gate.connected.wait(15)
        wait_until(lambda: srv.queue_ids("active") == [new_id], what="requeued message active")
        deleted = ok(srv.cli("queue", "delete", "-", input=f"{new_id}*\n".encode()))
        assert f"{new_id}: being delivered".encode() in deleted.stderr
        gate.gate.set()
        srv.wait_for_log(rf"postsuper\[\d+\]: {new_id}: removed")
        wait_until(lambda: not srv.queue_files(), what="empty queue")
        assert "status=bounced" not in srv.log() and "sender non-delivery" not in srv.log()

        # With the server stopped the same operations work on the spool directly.
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("a@example.com", ["user@slow.test"], MSG)
        wait_until(lambda: srv.queue_files("deferred"), what="deferred again")
        (last,) = srv.queue_ids("deferred")
        srv.stop()
        assert b"placed on hold" in ok(srv.cli("queue", "hold", "ALL")).stderr
        assert srv.queue_ids("hold") == [last]
        ok(srv.cli("queue", "release", "ALL"))
        assert srv.queue_ids("deferred") == [last]
        ok(srv.cli("queue", "requeue", last))
        assert len(srv.queue_files("maildrop")) == 1 and srv.queue_files("deferred") == []
        assert b"Deleted: 1 message" in ok(srv.cli("queue", "delete", "ALL", "maildrop")).stderr
        assert srv.queue_files() == []
    finally:
        srv.stop()
        gate.close()


# ---------------------------------------------------------------- reload
def test_reload_adds_a_listener_and_changes_mynetworks_without_dropping_a_session(tmp_path):
    srv = ServerProcess(tmp_path, {"transport_maps": ["inline:{ remote.test=discard:ok }"]}).start()
    port2, port3 = free_port(), free_port()
    try:
        session = smtplib.SMTP(srv.host, srv.port)
        session.ehlo("client.example")
        assert session.mail("a@example.com")[0] == 250
        assert session.rcpt("x@remote.test")[0] == 250  # relaying: 127.0.0.1 is in mynetworks

        srv.params["mynetworks"] = ["10.9.9.0/24"]
        srv.services["extra"] = {"listen": [f"127.0.0.1:{port2}"]}
        srv.write_config()
        assert b"refreshing the mail system" in ok(srv.cli("reload")).stderr
        srv.wait_for_log(r"master\[\d+\]: reload -- version")

        # The open session goes on as it started.
        assert session.data(b"Subject: across a reload\r\n\r\nx\r\n")[0] == 250
        session.quit()
        srv.wait_for_log(r"to=<x@remote.test>, relay=none, .*status=sent")
        # The new listener answers; new sessions see the new mynetworks.
        assert smtp_dialog(srv.host, port2, [b"QUIT\r\n"])[0].startswith("220 ")
        replies = smtp_dialog(srv.host, srv.port, [b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n",
                                                   b"RCPT TO:<y@remote.test>\r\n", b"QUIT\r\n"])
        assert replies[3].startswith("554 5.7.1") and "Relay access denied" in replies[3]
        status = json.loads(ok(srv.cli("status", "--json")).stdout)
        assert sorted(item["service"] for item in status["listeners"]) == ["extra", "smtp"]
        assert status["reloads"] == 1

        # A bad configuration is refused; the old one keeps running.
        good = srv.config_path.read_text()
        srv.config_path.write_text("no_such_parameter = 1\n" + good)
        bad = srv.cli("reload")
        assert bad.returncode == 78 and b"unknown parameter 'no_such_parameter'" in bad.stderr
        # ... also when only the server can tell: a new listener whose port is taken.
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        srv.services["busy"] = {"listen": [f"127.0.0.1:{busy.getsockname()[1]}"]}
        srv.write_config()
        with busy:
            bad = srv.cli("reload")
        assert bad.returncode == 1 and b"cannot listen" in bad.stderr and b"unchanged" in bad.stderr
        del srv.services["busy"]
        assert smtp_dialog(srv.host, port2, [b"QUIT\r\n"])[0].startswith("220 ")
        assert smtp_dialog(srv.host, srv.port, [b"QUIT\r\n"])[0].startswith("220 ")
        assert json.loads(ok(srv.cli("status", "--json")).stdout)["reloads"] == 1
        srv.wait_for_log(r"warning: reload failed, keeping the running configuration: cannot listen")

        # SIGHUP reloads too: "extra" goes away, "third" appears.
        del srv.services["extra"]
        srv.services["third"] = {"listen": [f"127.0.0.1:{port3}"]}
        srv.write_config()
        os.kill(srv.proc.pid, signal.SIGHUP)
        srv.wait_for_log(r"master\[\d+\]: reload -- version", count=2)
        assert smtp_dialog(srv.host, port3, [b"QUIT\r\n"])[0].startswith("220 ")
        with pytest.raises(OSError):
            socket.create_connection((srv.host, port2), timeout=2).close()
        assert srv.proc.poll() is None
    finally:
        srv.stop()


# ---------------------------------------------------------------- logs
def test_pflogsumm_counts_a_real_run(tmp_path):
    srv = ServerProcess(tmp_path, {
        "transport_maps": ["inline:{ bounce.test=error:5.1.1 no such user here, defer.test=retry:4.3.0 try later }"],
        "minimal_backoff_time": "1h", "maximal_backoff_time": "2h"}).start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            for _ in range(3):
                s.sendmail("a@example.com", ["root@localhost"], MSG)  # 3 received, 3 delivered
            s.sendmail("root@localhost", ["x@bounce.test"], MSG)  # received, bounced; its DSN is delivered
            s.sendmail("a@example.com", ["y@defer.test"], MSG)  # received, deferred
            for _ in range(2):  # 2 rejected
                s.ehlo()
                s.mail("a@example.com")
                assert s.rcpt("nosuchuser@localhost")[0] == 550
                s.rset()
        ok(srv.cli("sendmail", "root@localhost", input=b"Subject: local\n\nx\n"))  # received (pickup), delivered
        wait_until(lambda: srv.mbox_count("root") == 5, what="4 messages and 1 DSN delivered")
        srv.wait_for_log(r"to=<y@defer.test>.*status=deferred")
        srv.wait_for_log(r"to=<x@bounce.test>.*status=bounced")
        assert srv.stop() == 0
        report = subprocess.run(["pflogsumm", "--syslog-name=mailserver", str(srv.log_path)], capture_output=True,
                                timeout=60, check=True).stdout.decode()
        grand = report.split("Grand Totals", 1)[1].split("Per-Hour Traffic Summary", 1)[0]
        totals = {m.group(2): int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+(\w+)", grand, re.M)}
        assert totals["received"] == 6, report
        assert totals["delivered"] == 5, report
        assert totals["deferred"] == 1, report
        assert totals["bounced"] == 1, report
        assert totals["rejected"] == 2, report
    finally:
        srv.stop()


def test_json_logs_from_run_log_format(tmp_path):
    srv = ServerProcess(tmp_path)
    srv.run_args = ["--log-format", "json"]
    srv.start()
    try:
        with smtplib.SMTP(srv.host, srv.port) as s:
            s.sendmail("a@example.com", ["root@localhost"], MSG)
        wait_until(lambda: srv.mbox_count("root") == 1, what="delivery")
        srv.wait_for_log(r'"status": "sent"')
    finally:
        srv.stop()
    records = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    sent = [r for r in records if r.get("fields", {}).get("status") == "sent"]
    assert len(sent) == 1 and sent[0]["program"] == "mailserver/local"
    assert sent[0]["fields"]["to"] == "root@localhost" and sent[0]["fields"]["dsn"] == "2.0.0"
    assert {r["service"] for r in records} >= {"master", "smtpd", "cleanup", "qmgr", "local"}
    assert all(r["host"] == "mx.test.example" for r in records)


# ---------------------------------------------------------------- root server, unprivileged sendmail
def test_an_unprivileged_user_submits_into_a_root_servers_maildrop():
    """maildrop is 1733 when the server runs as root: any local user can drop
    a file (not list or read others'); pickup logs the submitter's uid."""
    import pwd
    import shutil
    import tempfile

    from mailserver.spool import MaildropRecord, Spool

    assert os.geteuid() == 0, "run the suite as root (CI does): this test switches to 'nobody'"
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="ops-maildrop-"))
    root.chmod(0o755)  # pytest's own temp directories are private to root
    srv = ServerProcess(root).start()
    try:
        maildrop = srv.spool / "maildrop"
        assert maildrop.stat().st_mode & 0o7777 == 0o1733
        record = MaildropRecord(sender="nobody@mx.test.example", recipients=[("root@localhost", "root@localhost")],
                                content=b"Subject: from nobody\r\n\r\nunprivileged\r\n")
        pid = os.fork()
        if pid == 0:  # child: become nobody, write, report through the exit status
            status = 1
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                Spool(str(srv.spool)).write_maildrop(record)
                try:
                    os.listdir(maildrop)
                    status = 2  # must not be able to list other users' submissions
                except PermissionError:
                    status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        srv.wait_for_log(rf"pickup\[\d+\]: \w+: uid={nobody.pw_uid} from=<nobody@mx.test.example>")
        wait_until(lambda: b"unprivileged" in srv.mbox("root"), what="delivery of nobody's submission")
        assert srv.queue_files("maildrop") == []
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
