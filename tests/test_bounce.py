"""Tests for mailserver.bounce (RFC 3464 DSNs, Postfix bounce(8) layout)."""

from __future__ import annotations

import email
import email.policy
import os
import time
from datetime import datetime, timezone

import pytest

from mailserver.bounce import FailedRecipient, build_dsn, dsn_sender, should_bounce

NOW = datetime(2026, 11, 21, 10, 0, 0, tzinfo=timezone.utc).timestamp()
ARRIVAL = NOW - 5 * 3600
BOUNDARY = "4Fx3Kq1zQ2.1795255200/host.example"

ORIGINAL = (
    b"Received: from client.example (client.example [1.2.3.4])\r\n"
    b"\tby host.example (mailserver) with ESMTP id 4Fx3Kq1zQ2\r\n"
    b"\tfor <bob@remote.example>; Sat, 21 Nov 2026 05:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@remote.example\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"SECRET BODY LINE\r\n"
    b"second line\r\n"
)


@pytest.fixture(autouse=True)
def utc():
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def failed(addr="bob@remote.example", **kw) -> FailedRecipient:
    args = dict(
        final_recipient=addr,
        original_recipient=None,
        action="failed",
        status="5.1.1",
        diagnostic="550 5.1.1 <%s>: Recipient address rejected: User unknown" % addr,
        remote_mta="dns; mx.remote.example",
        last_attempt=NOW - 60,
    )
    args.update(kw)
    return FailedRecipient(**args)


def delayed(addr="bob@remote.example", **kw) -> FailedRecipient:
    args = dict(
        action="delayed",
        status="4.4.1",
        diagnostic="connect to mx.remote.example[192.0.2.1]:25: Connection timed out",
        remote_mta=None,
    )
    args.update(kw)
    return failed(addr, **args)


def dsn(**overrides) -> bytes:
    args = dict(
        original=ORIGINAL,
        queue_id="4Fx3Kq1zQ2",
        sender="alice@example.org",
        recipients=[failed()],
        myhostname="host.example",
        arrival_time=ARRIVAL,
        now=NOW,
        boundary=BOUNDARY,
        message_id_suffix="20261121100000.5Gy4Lr2aR3",
    )
    args.update(overrides)
    return build_dsn(**args)


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def text_of(part) -> str:
    """Decoded text with LF line ends (the parser keeps CRLF)."""
    return part.get_content().replace("\r\n", "\n")


def status_blocks(msg):
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return part.get_payload()


# ---------------------------------------------------------------------------


def test_dsn_sender_and_should_bounce():
    assert dsn_sender() == ""
    assert should_bounce("") is False
    assert should_bounce("alice@example.org") is True
    assert should_bounce("MAILER-DAEMON@example.org") is True


def test_failure_top_level_headers():
    raw = dsn()
    assert b"\r\nFrom: MAILER-DAEMON@host.example (Mail Delivery System)\r\n" in b"\r\n" + raw
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@host.example"
    assert msg["To"] == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"] == "Sat, 21 Nov 2026 10:00:00 +0000"
    assert msg["Message-ID"] == "<20261121100000.5Gy4Lr2aR3@host.example>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg.get_boundary() == BOUNDARY
    assert not msg.defects


def test_failure_structure_and_parts():
    msg = parse(dsn())
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert [p["Content-Description"] for p in parts] == [
        "Notification", "Delivery report", "Undelivered Message Headers"]
    for p in msg.walk():
        assert not p.defects


def test_failure_human_text_postfix_wording():
    text = text_of(parse(dsn()).get_payload()[0])
    assert text.startswith(
        "This is the mail system at host host.example.\n\n"
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients. It's attached below.\n")
    assert "The mail system" in text
    assert ("<bob@remote.example>: 550 5.1.1 <bob@remote.example>: Recipient address\n"
            "    rejected: User unknown") in text
    assert "THIS IS A WARNING ONLY" not in text


def test_failure_delivery_status_fields():
    per_message, per_rcpt = status_blocks(parse(dsn()))
    assert per_message["Reporting-MTA"] == "dns; host.example"
    assert per_message["X-Postfix-Queue-ID"] == "4Fx3Kq1zQ2"
    assert per_message["X-Postfix-Sender"] == "rfc822; alice@example.org"
    assert per_message["Arrival-Date"] == "Sat, 21 Nov 2026 05:00:00 +0000"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@remote.example"
    assert per_rcpt["Original-Recipient"] is None
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.example"
    assert per_rcpt["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@remote.example>: Recipient address rejected: User unknown")
    assert per_rcpt["Last-Attempt-Date"] == "Sat, 21 Nov 2026 09:59:00 +0000"
    assert per_rcpt["Will-Retry-Until"] is None


def test_original_headers_only_by_default():
    part = parse(dsn()).get_payload()[2]
    content = text_of(part)
    assert "Subject: Quarterly numbers" in content
    assert "Message-ID: <orig-1@example.org>" in content
    assert "SECRET BODY LINE" not in content
    assert b"SECRET BODY LINE" not in dsn()


def test_return_full_within_limit():
    raw = dsn(return_full=True)
    part = parse(raw).get_payload()[2]
    assert part.get_content_type() == "message/rfc822"
    assert part["Content-Description"] == "Undelivered Message"
    inner = part.get_payload()[0]
    assert inner["Subject"] == "Quarterly numbers"
    assert "SECRET BODY LINE" in inner.get_content()
    # The original is embedded byte-identical.
    assert ORIGINAL + b"\r\n--" + BOUNDARY.encode() + b"--\r\n" in raw


def test_return_full_over_limit_falls_back_to_headers():
    raw = dsn(return_full=True, bounce_size_limit=len(ORIGINAL) - 1)
    part = parse(raw).get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert "Subject: Quarterly numbers" in part.get_content()
    assert b"SECRET BODY LINE" not in raw
    raw = dsn(return_full=True, bounce_size_limit=len(ORIGINAL))
    assert parse(raw).get_payload()[2].get_content_type() == "message/rfc822"


def test_zero_bounce_size_limit_means_unlimited():
    raw = dsn(return_full=True, bounce_size_limit=0)
    assert parse(raw).get_payload()[2].get_content_type() == "message/rfc822"


def test_headers_only_part_is_cut_at_bounce_size_limit():
    big = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 60) for i in range(200))
    original = b"Subject: big\r\n" + big + b"\r\nbody\r\n"
    raw = dsn(original=original, bounce_size_limit=1000)
    content = text_of(parse(raw).get_payload()[2])
    assert content.startswith("Subject: big\n")
    assert 1000 <= len(content.replace("\n", "\r\n")) < 1100
    assert "X-Filler-199" not in content


def test_multi_recipient_lists_all():
    rcpts = [
        failed("bob@remote.example"),
        failed("carol@remote.example", status="5.2.2",
               diagnostic="552 5.2.2 mailbox full", original_recipient="rfc822; c@alias.example"),
        failed("dave@local.example", status="5.4.6", remote_mta=None, last_attempt=None,
               diagnostic="mail forwarding loop for dave@local.example"),
    ]
    msg = parse(dsn(recipients=rcpts))
    blocks = status_blocks(msg)
    assert len(blocks) == 4
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@remote.example", "rfc822; carol@remote.example",
        "rfc822; dave@local.example"]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "5.2.2", "5.4.6"]
    assert blocks[2]["Original-Recipient"] == "rfc822; c@alias.example"
    assert blocks[3]["Diagnostic-Code"] == "x-unix; mail forwarding loop for dave@local.example"
    assert blocks[3]["Remote-MTA"] is None and blocks[3]["Last-Attempt-Date"] is None
    text = text_of(msg.get_payload()[0]).replace("\n    ", " ")
    for addr in ("<bob@remote.example>:", "<carol@remote.example> (expanded from "
                 "<c@alias.example>): 552 5.2.2 mailbox full", "<dave@local.example>:"):
        assert addr in text


def test_delay_dsn():
    raw = dsn(kind="delay", recipients=[delayed()])
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text = text_of(msg.get_payload()[0])
    assert "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #" in text
    assert "Your message could not be delivered for more than 5 hour(s)." in text
    assert "It will be retried until it is 5 day(s) old." in text
    _, rcpt = status_blocks(msg)
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.4.1"
    assert rcpt["Diagnostic-Code"].startswith("x-unix; connect to mx.remote.example")
    assert rcpt["Will-Retry-Until"] == "Thu, 26 Nov 2026 05:00:00 +0000"
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_diagnostic_types():
    rcpts = [
        failed("a@x", diagnostic="smtp; 550 already typed"),
        failed("b@x", diagnostic="554-multi line first"),
        failed("c@x", diagnostic="host not found"),
        failed("d@x", diagnostic="550 5.7.1 no", diagnostic_type="X-Postfix"),
    ]
    blocks = status_blocks(parse(dsn(recipients=rcpts)))
    assert [b["Diagnostic-Code"] for b in blocks[1:]] == [
        "smtp; 550 already typed", "smtp; 554-multi line first",
        "x-unix; host not found", "X-Postfix; 550 5.7.1 no"]


def test_untyped_remote_mta_and_original_recipient():
    r = failed(remote_mta="mx.remote.example", original_recipient="Bob@Remote.example")
    _, blk = status_blocks(parse(dsn(recipients=[r])))
    assert blk["Remote-MTA"] == "dns; mx.remote.example"
    assert blk["Original-Recipient"] == "rfc822; Bob@Remote.example"


def test_long_diagnostic_is_folded_and_round_trips():
    diag = "550 5.7.1 " + " ".join(f"word{i}" for i in range(80))
    raw = dsn(recipients=[failed(diagnostic=diag)])
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"Diagnostic-Code: smtp; 550 5.7.1 word0" in raw
    _, blk = status_blocks(parse(raw))
    assert blk["Diagnostic-Code"] == "smtp; " + diag


def test_values_cannot_inject_headers_or_mime_structure():
    evil = failed(
        "bob@x\r\nX-Evil: 1",
        diagnostic="550 no\r\nX-Evil: 2\r\n\r\n--" + BOUNDARY + "--\r\n",
        remote_mta="mx\r\nX-Evil: 3",
        original_recipient="o@x\r\nX-Evil: 4",
    )
    raw = dsn(recipients=[evil], sender="alice@x\r\nBcc: victim@x",
              message_id_suffix="id>\r\nX-Evil: 5")
    msg = parse(raw)
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    for blk in status_blocks(msg):
        assert blk["X-Evil"] is None
    assert not any(line.startswith(b"X-Evil") for line in raw.split(b"\r\n"))
    assert msg["Message-ID"] == "<idX-Evil5@host.example>"


def test_output_is_crlf_only():
    raw = dsn(recipients=[failed(), failed("c@x")], return_full=True)
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"\r\n--" + BOUNDARY.encode() + b"--\r\n")


def test_boundary_collision_is_resolved():
    original = b"Subject: x\r\n\r\n--" + BOUNDARY.encode() + b"--\r\ntrailing\r\n"
    raw = dsn(original=original, return_full=True)
    msg = parse(raw)
    assert msg.get_boundary() == BOUNDARY + ".1"
    parts = msg.get_payload()
    assert len(parts) == 3
    assert "trailing" in parts[2].get_payload()[0].get_content()


def test_invalid_boundary():
    with pytest.raises(ValueError):
        dsn(boundary="bad\r\nboundary")
    with pytest.raises(ValueError):
        dsn(boundary="x" * 71)
    with pytest.raises(ValueError):
        dsn(boundary="")


def test_8bit_original_and_utf8_recipient():
    original = ("Subject: caf\u00e9\r\nTo: j\u00f6rg@b\u00fccher.example\r\n\r\n"
                "h\u00e9\r\n").encode("utf-8")
    r = failed("j\u00f6rg@b\u00fccher.example", diagnostic="550 5.1.1 unbekannt \u00fc")
    raw = dsn(original=original, recipients=[r])
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    text_part, ds_part, orig_part = msg.get_payload()
    assert text_part.get_content_charset() == "utf-8"
    assert "<j\u00f6rg@b\u00fccher.example>: 550 5.1.1 unbekannt \u00fc" in text_of(text_part)
    assert orig_part["Content-Transfer-Encoding"] == "8bit"
    _, blk = ds_part.get_payload()
    # RFC 6533 utf-8-addr-xtext; the machine-readable part stays 7-bit.
    assert blk["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert blk["Diagnostic-Code"] == "smtp; 550 5.1.1 unbekannt ?"
    ds_start = raw.index(b"Content-Type: message/delivery-status")
    ds_end = raw.index(b"--" + BOUNDARY.encode(), ds_start)
    assert raw[ds_start:ds_end].isascii()


def test_ascii_dsn_is_7bit():
    msg = parse(dsn())
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert msg.get_payload()[0].get_content_charset() == "us-ascii"


@pytest.mark.parametrize("kwargs", [
    dict(sender=""),
    dict(kind="success"),
    dict(recipients=[]),
    dict(recipients=[delayed()]),                       # delayed in a failure DSN
    dict(kind="delay", recipients=[failed()]),          # failed in a delay DSN
    dict(recipients=[failed(status="5.1")]),
    dict(recipients=[failed(status="2.0.0")]),
])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        dsn(**kwargs)


def test_expired_recipient_may_fail_with_a_temporary_status():
    # Mail that expired after temporary failures: Action failed, Status 4.x.x (as Postfix).
    msg = email.message_from_bytes(dsn(recipients=[failed(status="4.4.7")]), policy=email.policy.default)
    assert "Status: 4.4.7" in msg.as_string()


def test_deterministic():
    assert dsn(return_full=True) == dsn(return_full=True)
