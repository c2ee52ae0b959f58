"""Operating it, the parts without a server process: sendmail's command
line and message handling, the maildrop file, mailq/postcat/qshape
formats, postconf -e/-X/-M, JSON and syslog log output, the control
socket client."""

from __future__ import annotations

import io
import json
import os
import socket
import time
from pathlib import Path

import pytest

from mailserver import cli, control
from mailserver.config import Config
from mailserver.maillog import MailLog
from mailserver.queuetools import QueueMessage, format_json, format_mailq, qshape, read_ids
from mailserver.sendmail import (EX_DATAERR, EX_USAGE, SubmitError, add_from_header, build_record,
                                 extract_recipients, parse_args, read_message)
from mailserver.spool import CorruptRecord, Envelope, MaildropRecord, RecipientState, Spool


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ---------------------------------------------------------------- sendmail command line
def test_sendmail_options_are_parsed_like_postfix_getopt():
    a = parse_args(["-t", "-oi", "-f", "me@example.com", "-FJane Doe", "-oem", "-v", "rcpt@example.com"])
    assert a.extract and not a.dot_ends and a.sender == "me@example.com" and a.fullname == "Jane Doe"
    assert a.recipients == ["rcpt@example.com"] and a.mode == "m"
    assert parse_args(["-i", "-fme", "x"]).sender == "me"
    assert parse_args(["-bp"]).mode == "p" and parse_args(["-bs"]).mode == "s" and parse_args(["-bi"]).mode == "i"
    assert parse_args(["-I"]).mode == "i" and parse_args(["-q"]).mode == "q"
    assert parse_args(["-qRexample.com"]).flush_site == "example.com"
    assert parse_args(["-qI", "08DmcJjjKjJS"]).flush_id == "08DmcJjjKjJS"
    assert parse_args(["-q1h"]).mode == "ignore"
    assert parse_args(["-o", "x", "-Am", "--", "-odd@example.com"]).recipients == ["-odd@example.com"]
    with pytest.raises(SubmitError) as exc:
        parse_args(["-Z"])
    assert exc.value.status == EX_USAGE
    with pytest.raises(SubmitError):
        parse_args(["-f"])


def test_a_lone_dot_ends_input_unless_minus_i_and_lines_become_crlf():
    data = b"Subject: x\n\nline\n.\nafter\n"
    assert read_message(io.BytesIO(data), dot_ends=True, limit=0) == b"Subject: x\r\n\r\nline\r\n"
    assert read_message(io.BytesIO(data), dot_ends=False, limit=0) == b"Subject: x\r\n\r\nline\r\n.\r\nafter\r\n"
    assert read_message(io.BytesIO(b"a\r\nno newline"), dot_ends=True, limit=0) == b"a\r\nno newline\r\n"
    with pytest.raises(SubmitError) as exc:
        read_message(io.BytesIO(b"x" * 100 + b"\n"), dot_ends=True, limit=50)
    assert exc.value.status == EX_DATAERR


def test_minus_t_takes_to_cc_bcc_and_removes_bcc():
    msg = (b"From: a@example.com\r\nTo: One <one@example.com>, two\r\nCc: three@example.com\r\n"
           b"Bcc: hidden@example.com,\r\n  hidden2@example.com\r\nSubject: s\r\n\r\nBcc: not a header\r\n")
    rcpts, out = extract_recipients(msg)
    assert rcpts == ["one@example.com", "two", "three@example.com", "hidden@example.com", "hidden2@example.com"]
    assert out == (b"From: a@example.com\r\nTo: One <one@example.com>, two\r\nCc: three@example.com\r\n"
                   b"Subject: s\r\n\r\nBcc: not a header\r\n")
    resent = b"To: old@example.com\r\nResent-To: new@example.com\r\nResent-Bcc: b@example.com\r\n\r\nx\r\n"
    rcpts, out = extract_recipients(resent)
    assert rcpts == ["new@example.com", "b@example.com"] and b"Resent-Bcc" not in out


def test_bare_addresses_are_qualified_with_myorigin_and_no_recipient_is_a_usage_error():
    config = Config(myhostname="mx.example.com", myorigin="example.com")
    record = build_record(config, parse_args(["-f", "sender", "-t", "bob"]),
                          b"To: carol, dave@other.example\r\n\r\nhi\r\n")
    assert record.sender == "sender@example.com"
    assert [r for r, _ in record.recipients] == ["bob@example.com", "carol@example.com", "dave@other.example"]
    assert build_record(config, parse_args(["-f", "<>", "x"]), b"\r\n").sender == ""
    with pytest.raises(SubmitError) as exc:
        build_record(config, parse_args(["-t"]), b"Subject: nobody\r\n\r\nx\r\n")
    assert exc.value.status == EX_USAGE
    with pytest.raises(SubmitError) as exc:
        build_record(config, parse_args(["bad address@@x"]), b"\r\n")
    assert exc.value.status == EX_USAGE


def test_full_name_goes_into_a_missing_from_header_only():
    assert add_from_header(b"Subject: s\r\n\r\nb\r\n", "me@example.com", "Jane Doe") == \
        b"Subject: s\r\nFrom: Jane Doe <me@example.com>\r\n\r\nb\r\n"
    msg = b"From: x@example.com\r\n\r\nb\r\n"
    assert add_from_header(msg, "me@example.com", "Jane") == msg


# ---------------------------------------------------------------- maildrop files
def test_maildrop_record_round_trip_and_untrusted_files_are_refused(tmp_path):
    spool = Spool(str(tmp_path / "q"))
    spool.create_directories()
    record = MaildropRecord(sender="a@example.com", recipients=[("b@example.com", "b@example.com")],
                            content=b"Subject: x\r\n\r\nbody\r\n")
    name = spool.write_maildrop(record)
    assert spool.scan_maildrop() == [name]
    assert not [n for n in os.listdir(spool.state_dir("maildrop")) if n.endswith(".tmp")]
    back = spool.read_maildrop(name, 10000)
    assert (back.sender, back.recipients, back.content, back.uid) == (
        "a@example.com", [("b@example.com", "b@example.com")], b"Subject: x\r\n\r\nbody\r\n", os.getuid())
    with pytest.raises(CorruptRecord):
        spool.read_maildrop(name, 10)  # over the size cap
    secret = tmp_path / "secret"
    secret.write_bytes(record.to_bytes())
    os.symlink(secret, Path(spool.state_dir("maildrop")) / "08DmcSYMLINK.drop")
    os.link(secret, Path(spool.state_dir("maildrop")) / "08DmcHARDLNK.drop")
    with pytest.raises(CorruptRecord):
        spool.read_maildrop("08DmcSYMLINK.drop", 10000)
    with pytest.raises(CorruptRecord):
        spool.read_maildrop("08DmcHARDLNK.drop", 10000)
    (Path(spool.state_dir("maildrop")) / "08DmcGARBAGE.drop").write_bytes(b"From x\r\n")
    with pytest.raises(CorruptRecord):
        spool.read_maildrop("08DmcGARBAGE.drop", 10000)


# ---------------------------------------------------------------- mailq, postqueue -j, qshape
# Written from Postfix's documented mailq format (postqueue/showq_compat.c,
# long queue IDs: "%-17s %8ld %19.19s %s"; recipients indented under the
# sender, a "(reason)" line right-aligned to column 78 when the reason
# changes, a blank line between messages, the Kbytes/Requests summary).
MAILQ_FIXTURE = """\
----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------
08DmaaaaaaaA*         1024 Sat Nov 21 10:00:00 alice@example.com
                                               bob@example.net

08DmbbbbbbbB          2048 Sat Nov 21 10:05:00 MAILER-DAEMON
                 (connect to mx.example.org[192.0.2.1]:25: Connection refused)
                                               carol@example.org
                                               dave@example.org
                                                          (reason unavailable)
                                               erin@example.org

08DmccccccC!           999 Sat Nov 21 10:10:09 frank@example.com
                                                         (host said: 450 busy)
                                               gina@example.com

-- 3 Kbytes in 3 Requests.
"""


def _queue_fixture() -> list[QueueMessage]:
    t0 = 1795255200.0  # Sat Nov 21 10:00:00 UTC
    refused = "connect to mx.example.org[192.0.2.1]:25: Connection refused"
    return [
        QueueMessage("08DmaaaaaaaA", "active", t0, 1024, "alice@example.com", [("bob@example.net", "")]),
        QueueMessage("08DmbbbbbbbB", "deferred", t0 + 300, 2048, "",
                     [("carol@example.org", refused), ("dave@example.org", refused), ("erin@example.org", "")]),
        QueueMessage("08DmccccccC", "hold", t0 + 609, 999, "frank@example.com",
                     [("gina@example.com", "host said: 450 busy")]),
    ]


def test_mailq_output_matches_postfix_format(utc):
    assert format_mailq(_queue_fixture()) == MAILQ_FIXTURE
    assert format_mailq([]) == "Mail queue is empty\n"
    one = format_mailq(_queue_fixture()[:1])
    assert one.endswith("\n-- 1 Kbytes in 1 Request.\n")


def test_mailq_json_is_postqueue_j(utc):
    lines = [json.loads(line) for line in format_json(_queue_fixture()).splitlines()]
    assert lines[1] == {"queue_name": "deferred", "queue_id": "08DmbbbbbbbB", "arrival_time": 1795255500,
                        "message_size": 2048, "force_expired": False, "sender": "MAILER-DAEMON",
                        "recipients": [
                            {"address": "carol@example.org",
                             "delay_reason": "connect to mx.example.org[192.0.2.1]:25: Connection refused"},
                            {"address": "dave@example.org",
                             "delay_reason": "connect to mx.example.org[192.0.2.1]:25: Connection refused"},
                            {"address": "erin@example.org"}]}


def test_postsuper_stdin_ids_drop_mailq_markers():
    assert read_ids(io.StringIO("08DmaaaaaaaA*\n\n08DmccccccC!\n 08DmbbbbbbbB \n")) == [
        "08DmaaaaaaaA", "08DmccccccC", "08DmbbbbbbbB"]


def test_qshape_buckets_recipient_and_sender_domains():
    now = 1_000_000.0
    msgs = [
        QueueMessage("A", "deferred", now - 60, 1, "x@a.example", [("r1@d1.example", ""), ("r2@d1.example", "")]),
        QueueMessage("B", "deferred", now - 7 * 60, 1, "x@a.example", [("r@d2.example", "")]),
        QueueMessage("C", "deferred", now - 2000 * 60, 1, "", [("r@d1.example", "")]),
    ]
    out = qshape(msgs, now).splitlines()
    assert out[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert out[1].split() == ["TOTAL", "4", "2", "1", "0", "0", "0", "0", "0", "0", "0", "1"]
    assert out[2].split() == ["d1.example", "3", "2", "0", "0", "0", "0", "0", "0", "0", "0", "1"]
    assert out[3].split() == ["d2.example", "1", "0", "1", "0", "0", "0", "0", "0", "0", "0", "0"]
    senders = qshape(msgs, now, by_sender=True).splitlines()
    assert senders[2].split()[:2] == ["a.example", "2"] and senders[3].split()[:2] == ["MAILER-DAEMON", "1"]
    assert len({len(line) for line in out}) == 1  # columns line up


# ---------------------------------------------------------------- postconf -e / -X / -M
CONF = """\
# Site configuration -- keep this comment
myhostname = "mx.example.com"   # the name we greet with
mynetworks = ["127.0.0.0/8"]

# Queue
minimal_backoff_time = "300s"

[services.smtp]
listen = ["127.0.0.1:2525"]  # loopback only
"""


def test_conf_e_edits_in_place_keeping_comments_and_order(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text(CONF)
    assert cli.main(["-c", str(path), "conf", "-e", "minimal_backoff_time=60s", "mynetworks = 10.0.0.0/8, 127.0.0.1",
                     "smtpd_helo_required=yes", "default_destination_recipient_limit=20",
                     "services.submission.listen=127.0.0.1:2587", "services.submission.tls=none"]) == 0
    text = path.read_text()
    assert text.startswith("# Site configuration -- keep this comment\n"
                           'myhostname = "mx.example.com"   # the name we greet with\n'
                           'mynetworks = ["10.0.0.0/8", "127.0.0.1"]\n\n# Queue\nminimal_backoff_time = "60s"\n')
    assert 'listen = ["127.0.0.1:2525"]  # loopback only' in text
    config = Config.from_file(path)
    assert config.smtpd_helo_required is True and config.default_destination_recipient_limit == 20
    assert config.service("submission").listen == ("127.0.0.1:2587",)
    assert text.index("minimal_backoff_time") < text.index("smtpd_helo_required") < text.index("[services.smtp]")

    assert cli.main(["-c", str(path), "conf", "-X", "smtpd_helo_required", "services.submission"]) == 0
    text = path.read_text()
    assert "smtpd_helo_required" not in text and "submission" not in text and "# Queue" in text

    capsys.readouterr()
    assert cli.main(["-c", str(path), "conf", "-M"]) == 0
    assert capsys.readouterr().out == "smtp       inet  127.0.0.1:2525  tls=none auth=none\n"


@pytest.mark.parametrize("assignment", ["minimal_backoff_time=soon", "no_such_parameter=1", "mynetworks=300.1.2.3/8",
                                        "services.smtp.tls=sometimes", "minimal_backoff_time"])
def test_conf_e_with_a_bad_value_leaves_the_file_untouched(tmp_path, capsys, assignment):
    path = tmp_path / "config.toml"
    path.write_text(CONF)
    before = path.stat().st_mtime_ns
    assert cli.main(["-c", str(path), "conf", "-e", assignment]) in (64, 78)
    assert path.read_text() == CONF and path.stat().st_mtime_ns == before
    assert "fatal" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name != "config.toml"]


# ---------------------------------------------------------------- logs
def test_json_log_lines_carry_the_same_fields():
    out = io.StringIO()
    log = MailLog(hostname="mx.example.com", stream=out, fmt="json", clock=lambda: 1795255200.0)
    log.log("smtp", "08DmaaaaaaaA: to=<bob@example.net>, relay=mx.example.net[192.0.2.2]:25, delay=1.2, "
                    "delays=0.1/0/0.5/0.6, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 12345)")
    log.log("smtpd", "NOQUEUE: reject: RCPT from unknown[192.0.2.9]: 554 5.7.1 <x@y.example>: Relay access denied; "
                     "from=<a@b.example> to=<x@y.example> proto=ESMTP helo=<c>")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["program"] == "mailserver/smtp" and first["queue_id"] == "08DmaaaaaaaA"
    assert first["fields"] == {"to": "bob@example.net", "relay": "mx.example.net[192.0.2.2]:25", "delay": "1.2",
                               "delays": "0.1/0/0.5/0.6", "dsn": "2.0.0", "status": "sent",
                               "status_detail": "250 2.0.0 Ok: queued as 12345"}
    assert first["text"].startswith("08DmaaaaaaaA: to=<bob@example.net>")
    assert second["queue_id"] == "NOQUEUE" and second["fields"]["to"] == "x@y.example"


def test_syslog_output_is_rfc3164_datagrams_with_facility_and_name(tmp_path):
    address = str(tmp_path / "log")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5)
    try:
        log = MailLog(hostname="mx", stream=None, to_syslog=True, syslog_facility="local3", syslog_name="postfix",
                      syslog_address=address)
        log.log("qmgr", "08DmaaaaaaaA: removed")
        log.log("smtpd", "warning: something odd")
        first = receiver.recv(4096).decode()
        second = receiver.recv(4096).decode()
        log.close()
    finally:
        receiver.close()
    assert first.startswith(f"<{19 * 8 + 6}>")  # local3.info
    assert first.endswith(f" postfix/qmgr[{os.getpid()}]: 08DmaaaaaaaA: removed")
    assert second.startswith(f"<{19 * 8 + 4}>")


def test_maillog_file_dev_stdout_replaces_stderr(capsys):
    import sys

    log = MailLog(hostname="mx", stream=sys.stderr, path="/dev/stdout", prefix=False)
    log.log("master", "hello")
    captured = capsys.readouterr()
    assert captured.out == f"mailserver/master[{os.getpid()}]: hello\n" and captured.err == ""


# ---------------------------------------------------------------- control socket
def test_control_request_to_nothing_is_not_running(tmp_path):
    with pytest.raises(control.NotRunning):
        control.request(str(tmp_path / "none" / "control"), "status")
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with pytest.raises(control.NotRunning):
        control.request(str(deep / "control"), "status")


async def test_control_server_on_a_long_path_answers_one_json_request(tmp_path):
    import asyncio

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = str(deep / "control")

    async def handler(request: dict) -> dict:
        return {"ok": True, "echo": request}

    server = control.ControlServer(path, handler)
    await server.start()
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"
        response = await asyncio.to_thread(control.request, path, "status", extra=1)
        assert response == {"ok": True, "echo": {"op": "status", "extra": 1}}
    finally:
        await server.close()
    assert not os.path.exists(path)


def test_envelope_recipients_for_mailq_skip_done_ones(tmp_path):
    from mailserver.queuetools import collect

    spool = Spool(str(tmp_path / "q"))
    spool.create_directories()
    env = Envelope("08DmaaaaaaaA", "a@example.com", [RecipientState("done@example.com", status="sent"),
                                                   RecipientState("later@example.com", reason="")],
                   arrival_time=time.time(), size=10)
    spool._enqueue_files(env, b"x\r\n", "deferred")
    msgs = collect(spool)
    assert [(m.queue_id, m.state, m.recipients) for m in msgs] == [("08DmaaaaaaaA", "deferred",
                                                                   [("later@example.com", "")])]


def test_newaliases_reports_file_and_line_and_builds_hash_tables(tmp_path, capsys):
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: root\nteam: a, b\nteam: c\n")
    config = tmp_path / "config.toml"
    config.write_text(f'queue_directory = "{tmp_path}/q"\nalias_maps = ["hash:{aliases}"]\n')
    assert cli.main(["-c", str(config), "aliases"]) == 0
    err = capsys.readouterr().err
    assert f"{aliases}:3: duplicate entry for 'team'" in err and "2 aliases" in err
    assert (tmp_path / "aliases.db").exists()
    aliases.write_text("postmaster: root\nbad@name: x\n")
    assert cli.main(["-c", str(config), "aliases"]) == 1
    assert f"{aliases}:2: name must be local" in capsys.readouterr().err


def test_run_raises_the_collector_threshold_before_the_event_loop_starts(tmp_path, monkeypatch):
    """`mailserver run` (the standalone server) sets the cyclic collector's
    threshold before its loop runs; embedding MailServer does not
    (tests/test_perf_regressions.py)."""
    import gc

    path = tmp_path / "config.toml"
    path.write_text(CONF)  # (nothing is started: the server's coroutine is replaced)
    seen = []

    async def fake_run(config, overrides=None):
        seen.append(gc.get_threshold())
        return 0

    monkeypatch.setattr(cli, "_run", fake_run)
    before = gc.get_threshold()
    try:
        assert cli.main(["-c", str(path), "run"]) == 0
    finally:
        gc.set_threshold(*before)
    assert seen == [cli.GC_THRESHOLD] != [before]
