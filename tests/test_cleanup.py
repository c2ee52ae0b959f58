"""Tests for mailserver.cleanup (Postfix cleanup(8) equivalent)."""

from __future__ import annotations

import email
import email.policy
import os
import time
from datetime import datetime, timezone

import pytest

from mailserver.cleanup import (
    CleanupResult,
    cleanup_message,
    count_received,
    header_section,
    quote_822_local,
    received_header,
    rfc5322_date,
    sanitize_header_value,
)

# 2026-11-21 10:00:00 UTC, a Saturday.
WHEN = datetime(2026, 11, 21, 10, 0, 0, tzinfo=timezone.utc).timestamp()
QID = "4Fx3Kq1zQ2"


@pytest.fixture(autouse=True)
def utc():
    """Render local-time dates in UTC so expected strings are exact."""
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


def rcvd(**overrides) -> bytes:
    args = dict(
        helo="helo.example",
        client_hostname="client.example",
        client_addr="1.2.3.4",
        myhostname="myhost.example",
        protocol="ESMTP",
        queue_id=QID,
        recipient="rcpt@x",
        when=WHEN,
    )
    args.update(overrides)
    return received_header(**args)


def clean(message: bytes, **overrides) -> CleanupResult:
    args = dict(
        received=rcvd(),
        queue_id=QID,
        myhostname="host.example",
        myorigin="example.org",
        sender="alice@example.org",
        now=WHEN,
        add_missing_headers=False,
    )
    args.update(overrides)
    return cleanup_message(message, **args)


def headers_of(message: bytes) -> list[bytes]:
    """Logical header fields (folded lines joined) of a stored message."""
    out: list[bytes] = []
    for line in header_section(message).split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            out[-1] += b"\r\n" + line
        else:
            out.append(line)
    return out


def body_of(message: bytes) -> bytes:
    return message[message.index(b"\r\n\r\n") + 4:]


# ---------------------------------------------------------------------------
# received_header
# ---------------------------------------------------------------------------

class TestReceivedHeader:
    def test_exact_single_recipient(self):
        assert rcvd() == (
            b"Received: from helo.example (client.example [1.2.3.4])\r\n"
            b"\tby myhost.example (mailserver) with ESMTP id 4Fx3Kq1zQ2\r\n"
            b"\tfor <rcpt@x>; Sat, 21 Nov 2026 10:00:00 +0000\r\n"
        )

    def test_multiple_recipients_no_for_clause(self):
        assert rcvd(recipient=None, protocol="ESMTPSA") == (
            b"Received: from helo.example (client.example [1.2.3.4])\r\n"
            b"\tby myhost.example (mailserver) with ESMTPSA id 4Fx3Kq1zQ2;\r\n"
            b"\tSat, 21 Nov 2026 10:00:00 +0000\r\n"
        )
        assert b"for <" not in rcvd(recipient=None)

    def test_tls_comment_between_from_and_by_lines(self):
        # Postfix smtpd.c emits the smtpd_tls_received_header comment right
        # after the "from" line.
        h = rcvd(tls_comment="using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
        assert h.split(b"\r\n")[:3] == [
            b"Received: from helo.example (client.example [1.2.3.4])",
            b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))",
            b"\tby myhost.example (mailserver) with ESMTP id 4Fx3Kq1zQ2",
        ]

    def test_tls_comment_already_parenthesised_and_multiline(self):
        h = rcvd(tls_comment="(using TLSv1.2 with cipher X (128/128 bits))\n"
                             "(No client certificate requested)")
        lines = h.split(b"\r\n")
        assert lines[1] == b"\t(using TLSv1.2 with cipher X (128/128 bits))"
        assert lines[2] == b"\t(No client certificate requested)"

    def test_tls_comment_cannot_close_the_comment(self):
        h = rcvd(tls_comment="evil) by attacker (x")
        assert h.split(b"\r\n")[1] == b"\t(evil by attacker (x))"

    def test_helo_header_injection_is_neutralised(self):
        h = rcvd(helo="evil\r\nX-Injected: yes")
        assert h.startswith(b"Received: from evilX-Injected: yes (client.example [1.2.3.4])\r\n")
        lines = h.split(b"\r\n")
        assert lines[-1] == b""
        assert all(line.startswith(b"\t") for line in lines[1:-1])
        msg = email.message_from_bytes(h + b"\r\nbody\r\n", policy=email.policy.default)
        assert list(msg.keys()) == ["Received"]
        assert msg["X-Injected"] is None

    @pytest.mark.parametrize("field", ["helo", "client_hostname", "recipient", "client_addr"])
    def test_no_client_value_adds_lines(self, field):
        h = rcvd(**{field: "a\rb\nc\x00d\x1b\x7fe\u0085f\r\n\tX-Evil: 1"})
        assert h.count(b"\r\n") == 3
        assert b"\n" not in h.replace(b"\r\n", b"")
        assert b"\r" not in h.replace(b"\r\n", b"")
        assert b"\x00" not in h and b"\x1b" not in h and b"\x7f" not in h
        assert b"abcdefX-Evil: 1" in h

    def test_unknown_client_hostname_and_empty_helo(self):
        h = rcvd(client_hostname="", helo="")
        assert h.startswith(b"Received: from unknown (unknown [1.2.3.4])\r\n")
        h = rcvd(helo="")
        assert h.startswith(b"Received: from client.example (client.example [1.2.3.4])\r\n")

    def test_client_values_are_length_limited(self):
        h = rcvd(helo="h" * 5000, recipient="r" * 5000 + "@x")
        first = h.split(b"\r\n")[0]
        assert b"h" * 255 in first and b"h" * 256 not in first
        assert len(h) < 1200

    def test_non_printable_replaced_and_utf8_kept(self):
        h = rcvd(helo="b\u00fccher.example\u202e", recipient="j\u00f6rg@b\u00fccher.example")
        assert "from b\u00fccher.example? (".encode() in h
        assert "for <j\u00f6rg@b\u00fccher.example>".encode() in h

    def test_surrogate_escaped_bytes_replaced(self):
        helo = b"bad\xffhelo".decode("utf-8", "surrogateescape")
        assert rcvd(helo=helo).startswith(b"Received: from bad?helo (")

    def test_recipient_local_part_is_quoted(self):
        assert b'\tfor <"john doe"@x>; ' in rcvd(recipient="john doe@x")

    def test_date_follows_local_time_zone(self, utc):
        os.environ["TZ"] = "EST+05"
        time.tzset()
        assert rcvd().endswith(b"; Sat, 21 Nov 2026 05:00:00 -0500\r\n")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class TestHelpers:
    def test_sanitize_removes_controls(self):
        assert sanitize_header_value("a\r\nb\x00c\td\x7fe\x9ff") == "abcdef"

    def test_sanitize_replaces_non_printable(self):
        assert sanitize_header_value("x\u202ey\u200bz\udcff") == "x?y?z?"

    def test_sanitize_keeps_utf8_and_spaces(self):
        assert sanitize_header_value("J\u00f6rg  M\u00fcller \u2603") == "J\u00f6rg  M\u00fcller \u2603"

    def test_sanitize_limit(self):
        assert sanitize_header_value("x" * 2000) == "x" * 998
        assert sanitize_header_value("abc\r\ndef", limit=4) == "abcd"

    def test_quote_822_local(self):
        assert quote_822_local("") == ""
        assert quote_822_local("a.b+c@x") == "a.b+c@x"
        assert quote_822_local("a b@x") == '"a b"@x'
        assert quote_822_local('a"b@x') == '"a\\"b"@x'
        assert quote_822_local('"a b"@x') == '"a b"@x'
        assert quote_822_local("j\u00f6rg@x") == "j\u00f6rg@x"

    def test_rfc5322_date(self):
        assert rfc5322_date(WHEN) == "Sat, 21 Nov 2026 10:00:00 +0000"

    def test_header_section_and_count_received(self):
        msg = (b"Received: a\r\nreceived: b\r\n\tc\r\nRECEIVED : d\r\n"
               b"X-Received: e\r\n\r\nReceived: body\r\n")
        assert header_section(msg) == msg[:msg.index(b"\r\n\r\n") + 2]
        assert count_received(msg) == 3

    def test_header_section_without_separator(self):
        assert header_section(b"A: 1\r\nB: 2\r\n") == b"A: 1\r\nB: 2\r\n"
        assert header_section(b"A: 1\r\nnot a header\r\nB: 2\r\n") == b"A: 1\r\n"
        assert header_section(b"") == b""


# ---------------------------------------------------------------------------
# cleanup_message
# ---------------------------------------------------------------------------

ODD_BODY = (
    b"Line one\r\n"
    b"\r\n"
    b"8-bit: \xc3\xa9\xff\xfe and NUL \x00 and bare CR \r here\r\n"
    b"bare LF\nnext\r\n"
    b".\r\n"
    b"..leading dots\r\n"
    b"From mbox-style line\r\n"
    b"Received: looks like a header\r\n"
    b"   \t  \r\n"
    b"no final newline"
)


class TestCleanupMessage:
    def test_received_prepended_and_body_identical(self):
        msg = b"Subject: x\r\nFrom: a@b\r\n\r\n" + ODD_BODY
        res = clean(msg)
        assert res.message.startswith(rcvd())
        assert res.message == rcvd() + msg
        assert body_of(res.message) == ODD_BODY

    def test_nothing_added_without_flag(self):
        res = clean(b"Subject: x\r\n\r\nbody\r\n")
        assert res.message == rcvd() + b"Subject: x\r\n\r\nbody\r\n"
        assert res.message_id == ""

    def test_missing_headers_added_at_end_in_postfix_order(self):
        res = clean(b"Subject: x\r\n\r\n" + ODD_BODY, add_missing_headers=True)
        assert headers_of(res.message)[-5:] == [
            b"Subject: x",
            b"Message-ID: <20261121100000.4Fx3Kq1zQ2@host.example>",
            b"Date: Sat, 21 Nov 2026 10:00:00 +0000",
            b"From: alice@example.org",
            b"To: undisclosed-recipients:;",
        ]
        assert res.message_id == "<20261121100000.4Fx3Kq1zQ2@host.example>"
        assert body_of(res.message) == ODD_BODY
        # Received stays first.
        assert res.message.startswith(rcvd())

    def test_message_id_timestamp_is_utc(self, utc):
        os.environ["TZ"] = "Asia/Tokyo"
        time.tzset()
        res = clean(b"Subject: x\r\n\r\n", add_missing_headers=True)
        assert res.message_id == "<20261121100000.4Fx3Kq1zQ2@host.example>"

    def test_existing_headers_not_duplicated(self):
        msg = (b"message-id:  <abc@origin.example> \r\n"
               b"DATE: Fri, 20 Nov 2026 09:00:00 +0000\r\n"
               b"from: Bob <bob@x>\r\n"
               b"Cc: carol@x\r\n\r\nbody\r\n")
        res = clean(msg, add_missing_headers=True)
        assert res.message == rcvd() + msg
        assert res.message_id == "<abc@origin.example>"

    def test_existing_message_id_reported_without_flag_and_folded(self):
        res = clean(b"Message-ID:\r\n <folded@x>\r\n\r\n")
        assert res.message_id == "<folded@x>"

    @pytest.mark.parametrize("dest", [b"To: a@b", b"Cc: a@b", b"Bcc: a@b",
                                      b"Resent-To: a@b", b"TO: a@b"])
    def test_destination_header_suppresses_undisclosed(self, dest):
        res = clean(b"Subject: x\r\n" + dest + b"\r\n\r\n", add_missing_headers=True)
        assert b"undisclosed-recipients" not in res.message

    def test_null_sender_from_is_mailer_daemon(self):
        res = clean(b"Subject: x\r\n\r\n", sender="", add_missing_headers=True)
        assert b"\r\nFrom: MAILER-DAEMON@host.example\r\n" in res.message

    def test_bare_sender_is_qualified_and_quoted(self):
        res = clean(b"\r\n", sender="alice", add_missing_headers=True)
        assert b"\r\nFrom: alice@example.org\r\n" in res.message
        res = clean(b"\r\n", sender="john doe@x", add_missing_headers=True)
        assert b'\r\nFrom: "john doe"@x\r\n' in res.message

    def test_envelope_values_cannot_inject_headers(self):
        res = clean(b"\r\n", sender="a@b\r\nBcc: victim@x", queue_id="Q\r\nX-Evil: 1",
                    add_missing_headers=True)
        fields = headers_of(res.message)
        assert not any(f.lower().startswith((b"bcc", b"x-evil")) for f in fields)
        assert b'\r\nFrom: "a@bBcc: victim"@x\r\n' in res.message
        parsed = email.message_from_bytes(res.message, policy=email.policy.default)
        assert parsed["Bcc"] is None and parsed["X-Evil"] is None

    def test_hop_count_counts_original_received_only(self):
        msg = (b"Received: from a by b; date\r\n"
               b"RECEIVED: from c\r\n\tby d; date\r\n"
               b"X-Received: not counted\r\n"
               b"Subject: Received: no\r\n\r\n"
               b"Received: in body, not counted\r\n")
        res = clean(msg)
        assert res.hop_count == 2
        assert count_received(res.message) == 3

    def test_header_size(self):
        res = clean(b"Subject: x\r\n\r\nbody\r\n", add_missing_headers=True)
        assert res.header_size == len(header_section(res.message))
        assert res.message[res.header_size:res.header_size + 2] == b"\r\n"
        assert res.message[res.header_size + 2:] == b"body\r\n"

    def test_all_headers_no_blank_line(self):
        res = clean(b"Subject: x\r\nX-A: 1\r\n\tcontinued")
        assert res.message == rcvd() + b"Subject: x\r\nX-A: 1\r\n\tcontinued\r\n\r\n"
        assert body_of(res.message) == b""

    def test_non_header_line_starts_body(self):
        msg = b"Subject: x\r\nthis is not a header\r\nX-Not: header either\r\n"
        res = clean(msg)
        assert res.message == (rcvd() + b"Subject: x\r\n\r\n"
                               b"this is not a header\r\nX-Not: header either\r\n")
        assert res.hop_count == 0

    def test_leading_whitespace_is_body_not_continuation(self):
        # smtpd.c kludge: content starting with white space must not become
        # part of our Received: header.
        msg = b" indented first line\r\nSubject: x\r\n"
        res = clean(msg)
        assert res.message == rcvd() + b"\r\n" + msg
        assert headers_of(res.message)[-1].startswith(b"Received:")

    def test_mbox_from_line_starts_body(self):
        msg = b"From alice@x Sat Nov 21 10:00:00 2026\r\nSubject: x\r\n\r\nbody\r\n"
        res = clean(msg)
        assert body_of(res.message) == msg

    def test_empty_message(self):
        res = clean(b"")
        assert res.message == rcvd() + b"\r\n"
        res = clean(b"", add_missing_headers=True)
        assert res.message.endswith(b"To: undisclosed-recipients:;\r\n\r\n")

    def test_header_with_space_before_colon_is_header(self):
        res = clean(b"Subject : x\r\n\r\nb\r\n")
        assert res.message == rcvd() + b"Subject : x\r\n\r\nb\r\n"

    def test_untouched_headers_keep_original_bytes(self):
        msg = (b"Subject: =?utf-8?q?caf=C3=A9?= and raw \xc3\xa9 \xff\r\n"
               b"X-Long: a\r\n    b\r\n\t c  \r\n"
               b"To: \"Odd, Name\" <user>, (comment) other\r\n\r\nb\r\n")
        res = clean(msg, add_missing_headers=True)
        assert (b"Subject: =?utf-8?q?caf=C3=A9?= and raw \xc3\xa9 \xff\r\n"
                b"X-Long: a\r\n    b\r\n\t c  \r\n"
                b"To: \"Odd, Name\" <user>, (comment) other\r\n") in res.message

    def test_bare_lf_header_lines_normalised_body_untouched(self):
        msg = b"Subject: x\nX-A: 1\n\tmore\n\nbody\nstays\n"
        res = clean(msg)
        assert res.message == rcvd() + b"Subject: x\r\nX-A: 1\r\n\tmore\r\n\r\nbody\nstays\n"

    def test_received_validation(self):
        with pytest.raises(ValueError):
            clean(b"\r\n", received=b"not a header\r\n")
        with pytest.raises(ValueError):
            clean(b"\r\n", received=b"Received: x\r\nX-Bad: 1\nY: 2\r\n")
        with pytest.raises(TypeError):
            clean("Subject: x\r\n\r\n")  # type: ignore[arg-type]
        assert clean(b"A: 1\r\n\r\n", received=b"").message == b"A: 1\r\n\r\n"
        assert clean(b"A: 1\r\n\r\n", received=b"Received: x").message == \
            b"Received: x\r\nA: 1\r\n\r\n"

    def test_recipients_argument_never_disclosed(self):
        res = clean(b"Subject: x\r\n\r\n", add_missing_headers=True,
                    recipients=["secret@x", "other@y"])
        assert b"secret@x" not in res.message and b"other@y" not in res.message

    def test_deterministic(self):
        msg = b"Subject: x\r\n\r\n" + ODD_BODY
        assert clean(msg, add_missing_headers=True) == clean(msg, add_missing_headers=True)


class TestAddressQualification:
    def test_simple_cases_qualified_with_flag(self):
        msg = (b"From: alice\r\n"
               b"To: bob, Carol <carol>,\r\n\tdave@x, \xc3\x89ve <eve>\r\n"
               b"Cc: <frank>\r\n"
               b"Reply-To: grace\r\n"
               b"Sender: heidi\r\n\r\nbody alice\r\n")
        res = clean(msg, add_missing_headers=True)
        fields = headers_of(res.message)
        assert b"From: alice@example.org" in fields
        assert (b"To: bob@example.org, Carol <carol@example.org>,\r\n"
                b"\tdave@x, \xc3\x89ve <eve@example.org>") in fields
        assert b"Cc: <frank@example.org>" in fields
        assert b"Reply-To: grace@example.org" in fields
        assert b"Sender: heidi@example.org" in fields
        assert body_of(res.message) == b"body alice\r\n"

    def test_not_qualified_without_flag(self):
        msg = b"From: alice\r\nTo: bob\r\n\r\n"
        assert clean(msg).message == rcvd() + msg

    @pytest.mark.parametrize("value", [
        b'"Alice Smith" <alice>',          # quoted string
        b"alice (Alice Smith)",            # comment
        b"friends: alice, bob;",           # group
        b"alice@[192.0.2.1]",              # domain literal
        b"=?utf-8?q?A?= <alice>",          # encoded word
        b"alice bob",                      # not an address list
        b"alice,,bob",                     # empty element
        b"<a lice>",                       # invalid local part
        b"Name <alice",                    # unbalanced
    ])
    def test_odd_values_untouched(self, value):
        msg = b"To: " + value + b"\r\n\r\n"
        res = clean(msg, add_missing_headers=True)
        assert b"To: " + value + b"\r\n" in res.message
        assert b"example.org" not in res.message.replace(b"From: alice@example.org", b"")

    def test_other_headers_not_qualified(self):
        msg = b"To: a@b\r\nX-User: alice\r\nIn-Reply-To: alice\r\n\r\n"
        res = clean(msg, add_missing_headers=True)
        assert b"X-User: alice\r\nIn-Reply-To: alice\r\n" in res.message
