"""Tests for mailserver.content_checks: header_checks and body_checks (header_checks(5))."""

from __future__ import annotations

import os

import pytest

from mailserver.content_checks import ContentChecker, ContentResult, format_log_context
from mailserver.tables import TableError, TableLookupError

CTX = format_log_context("unknown[1.2.3.4]", sender="a@b", recipient="c@d", proto="ESMTP", helo="h")

MESSAGE = (
    b"Received: from h (unknown [1.2.3.4])\r\n"
    b"\tby mx.example with ESMTP id 4Fx3Kq1zQ2\r\n"
    b"From: Alice <a@b>\r\n"
    b"To: c@d\r\n"
    b"Subject: buy now\r\n"
    b"X-Mailer: spamcannon 1.0\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"this line has a bad word\r\n"
    b"bye\r\n"
)


def checker(header_rules: list[str] = (), body_rules: list[str] = (), kind: str = "regexp",
            warnings: list | None = None, **kw) -> ContentChecker:
    def inline(rules):
        return [f"{kind}:{{ " + ", ".join("{" + r + "}" for r in rules) + " }"] if rules else []
    return ContentChecker(inline(header_rules), inline(body_rules),
                          warn=(warnings.append if warnings is not None else lambda s: None), **kw)


def check(header_rules=(), body_rules=(), message=MESSAGE, **kw) -> ContentResult:
    return checker(header_rules, body_rules, **kw).check(message, log_context=CTX)


# ---------------------------------------------------------------- log context and log lines


def test_log_context_is_the_text_after_from():
    assert CTX == "unknown[1.2.3.4]; from=<a@b> to=<c@d> proto=ESMTP helo=<h>"
    assert format_log_context("local", sender="") == "local; from=<>"
    assert format_log_context("", sender=None) == "unknown;"


def test_warn_logs_exactly_as_cleanup():
    r = check([r"/^Subject: buy/ WARN spam"])
    assert r.action == "dunno"
    assert r.logs == ["warning: header Subject: buy now from unknown[1.2.3.4]; from=<a@b> "
                      "to=<c@d> proto=ESMTP helo=<h>: spam"]
    assert r.message is MESSAGE


def test_warn_without_text_has_no_trailing_colon():
    r = check([r"/^Subject: buy/ WARN"])
    assert r.logs == ["warning: header Subject: buy now from unknown[1.2.3.4]; from=<a@b> "
                      "to=<c@d> proto=ESMTP helo=<h>"]


def test_logged_content_is_cut_at_200_characters_and_newlines_shown_as_syslog_does():
    long_subject = b"Subject: " + b"x" * 300 + b"\r\n"
    r = check([r"/^Subject:/ INFO long"], message=long_subject + b"\r\nbody\r\n")
    assert r.logs[0] == f"info: header Subject: {'x' * 191} from {CTX}: long"
    r = check([r"/^Received:/ INFO folded"])
    assert r.logs[0].startswith("info: header Received: from h (unknown [1.2.3.4])#012\tby mx.example ")


# ---------------------------------------------------------------- REJECT


def test_reject_default_text():
    r = check([r"/^Subject: buy/ REJECT"])
    assert (r.action, r.reply_code, r.status, r.reply_text) == ("reject", 550, "5.7.1", "message content rejected")
    assert r.reply == "550 5.7.1 message content rejected"
    assert r.logs == [f"reject: header Subject: buy now from {CTX}: 5.7.1 message content rejected"]


def test_reject_with_text_and_with_an_explicit_status():
    r = check([r"/^Subject: buy/ REJECT no spam please"])
    assert r.reply == "550 5.7.1 no spam please"
    assert r.logs[0].endswith(": 5.7.1 no spam please")
    r = check([r"/^Subject: buy/ REJECT 5.7.0 policy violation"])
    assert r.reply == "550 5.7.0 policy violation"


def test_reject_with_a_4xx_status_is_temporary():
    r = check([r"/^Subject: buy/ REJECT 4.7.1 try again later"])
    assert (r.action, r.reply) == ("reject", "451 4.7.1 try again later")


def test_reject_with_a_2xx_status_becomes_4xx_with_a_warning():
    warnings = []
    r = check([r"/^Subject: buy/ REJECT 2.0.0 fine"], warnings=warnings)
    assert r.reply == "451 4.0.0 fine"
    assert warnings == ["warning: bad DSN action in 2.0.0 fine -- need 4.x.x or 5.x.x"]


def test_first_reject_ends_inspection_and_returns_the_original_message():
    r = check([r"/^From:/ REJECT first", r"/^X-Mailer:/ IGNORE", r"/^Subject:/ WARN never"],
              [r"/bad word/ WARN never"])
    assert r.action == "reject" and r.reply_text == "first"
    assert len(r.logs) == 1
    assert r.message is MESSAGE


def test_reject_from_a_body_line():
    r = check(body_rules=[r"/bad word/ REJECT body says no"])
    assert r.reply == "550 5.7.1 body says no"
    assert r.logs == [f"reject: body this line has a bad word from {CTX}: 5.7.1 body says no"]


# ---------------------------------------------------------------- DISCARD and HOLD


def test_discard_ends_inspection():
    r = check([r"/^Subject: buy/ DISCARD not wanted", r"/^X-Mailer:/ REJECT never"])
    assert r.action == "discard"
    assert r.logs == [f"discard: header Subject: buy now from {CTX}: not wanted"]


def test_hold_continues_and_is_logged_once():
    r = check([r"/^From:/ HOLD check this", r"/^Subject:/ HOLD again", r"/^X-Mailer:/ WARN still checked"])
    assert r.action == "hold"
    assert r.logs == [f"hold: header From: Alice <a@b> from {CTX}: check this",
                      f"warning: header X-Mailer: spamcannon 1.0 from {CTX}: still checked"]


def test_hold_then_reject_is_a_reject():
    r = check([r"/^From:/ HOLD", r"/^Subject:/ REJECT"])
    assert r.action == "reject"
    assert [line.split(":")[0] for line in r.logs] == ["hold", "reject"]


# ---------------------------------------------------------------- INFO, DUNNO, OK


def test_info_logs_and_changes_nothing():
    r = check([r"/^To:/ INFO saw it"])
    assert r.logs == [f"info: header To: c@d from {CTX}: saw it"]
    assert r.action == "dunno" and r.message is MESSAGE and not r.edited


@pytest.mark.parametrize("stop", ["DUNNO", "OK", "dunno"])
def test_dunno_and_ok_stop_the_table_search_for_that_line(stop):
    r = check([rf"/^Subject: buy now$/ {stop}", r"/^Subject:/ REJECT"])
    assert r.action == "dunno" and r.logs == []


# ---------------------------------------------------------------- IGNORE, PREPEND, REPLACE (headers)


def test_ignore_deletes_a_whole_folded_header_and_nothing_else():
    r = check([r"/^Received:/ IGNORE"])
    assert r.edited
    assert r.message == MESSAGE.replace(b"Received: from h (unknown [1.2.3.4])\r\n"
                                        b"\tby mx.example with ESMTP id 4Fx3Kq1zQ2\r\n", b"")
    assert r.logs == []


def test_prepend_inserts_a_header_before_the_matched_one():
    r = check([r"/^Subject:/ PREPEND X-Checked: yes"])
    assert r.message == MESSAGE.replace(b"Subject: buy now\r\n", b"X-Checked: yes\r\nSubject: buy now\r\n")
    assert r.logs == [f"prepend: header Subject: buy now from {CTX}: X-Checked: yes"]


def test_replace_swaps_the_header():
    r = check([r"/^X-Mailer:/ REPLACE X-Mailer: redacted"])
    assert r.message == MESSAGE.replace(b"X-Mailer: spamcannon 1.0", b"X-Mailer: redacted")
    assert r.logs == [f"replace: header X-Mailer: spamcannon 1.0 from {CTX}: X-Mailer: redacted"]


def test_replace_with_group_substitution():
    r = check([r"/^Subject: (.*)$/ REPLACE Subject: [SPAM] $1"])
    assert b"\r\nSubject: [SPAM] buy now\r\n" in r.message


@pytest.mark.parametrize("rule, problem", [
    (r"/^Subject:/ PREPEND not a header", 'bad PREPEND header text "not a header" in header_checks map'),
    (r"/^Subject:/ REPLACE not a header", 'bad REPLACE header text "not a header"'),
    (r"/^Subject:/ PREPEND", "PREPEND action without text in header_checks map"),
])
def test_prepend_or_replace_that_is_not_a_header_is_ignored_with_a_warning(rule, problem):
    warnings = []
    r = check([rule], warnings=warnings)
    assert r.message is MESSAGE and r.logs == []
    assert len(warnings) == 1 and problem in warnings[0]


# ---------------------------------------------------------------- body edits


def test_body_ignore_replace_and_prepend():
    r = check(body_rules=[r"/^Hello,$/ PREPEND Note: scanned", r"/bad word/ REPLACE this line was cleaned",
                          r"/^bye$/ IGNORE"])
    assert r.message == MESSAGE.replace(
        b"Hello,\r\nthis line has a bad word\r\nbye\r\n",
        b"Note: scanned\r\nHello,\r\nthis line was cleaned\r\n")
    assert r.logs == [f"prepend: body Hello, from {CTX}: Note: scanned",
                      f"replace: body this line has a bad word from {CTX}: this line was cleaned"]


def test_inserted_lines_use_the_line_ending_of_the_message():
    message = b"Subject: x\nX-A: 1\n\nbody\n"
    r = check([r"/^X-A:/ PREPEND X-B: 2"], [r"/^body/ PREPEND first"], message=message)
    assert r.message == b"Subject: x\nX-B: 2\nX-A: 1\n\nfirst\nbody\n"


def test_body_checks_see_the_empty_line_after_the_headers():
    r = check(body_rules=[r"/^$/ INFO empty"], message=b"Subject: x\r\n\r\nbody\r\n")
    assert r.logs == [f"info: body  from {CTX}: empty"]


# ---------------------------------------------------------------- unsupported and unknown actions


@pytest.mark.parametrize("action", ["FILTER smtp:[127.0.0.1]:10025", "REDIRECT x@y", "BCC x@y"])
def test_filter_redirect_and_bcc_are_ignored_with_one_warning(action):
    warnings = []
    c = checker([rf"/^Subject:/ {action}"], warnings=warnings)
    for _ in range(3):
        r = c.check(MESSAGE, log_context=CTX)
        assert r.action == "dunno" and r.message is MESSAGE and r.logs == []
    assert warnings == [f"warning: header_checks map: {action.split()[0]} action is not supported: ignored"]


def test_unknown_command_is_a_warning():
    warnings = []
    r = check([r"/^Subject:/ FROBNICATE now"], warnings=warnings)
    assert r.action == "dunno"
    assert warnings == ["warning: unknown command in header_checks map: FROBNICATE now"]


def test_action_names_are_case_insensitive():
    assert check([r"/^Subject:/ reject nope"]).reply == "550 5.7.1 nope"


# ---------------------------------------------------------------- byte-identical pass-through


ODD_MESSAGE = (
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"X-Latin1: caf\xe9\r\n"
    b"X-Bare-CR: a\rb\r\n"
    b"X-Folded: one\n"
    b"   two\r\n"
    b"\r\n"
    b"8-bit body \xff\xfe\x00 line\r\n"
    b"lf only line\n"
    b"last line without newline"
)


def test_unmatched_message_is_returned_as_the_same_object():
    r = check([r"/^Nothing:/ REJECT"], [r"/^nothing$/ REJECT"], message=ODD_MESSAGE)
    assert r.message is ODD_MESSAGE and not r.edited and r.action == "dunno"


def test_edits_leave_every_other_byte_untouched():
    r = check([r"/^X-Bare-CR:/ IGNORE", r"/^X-Latin1: caf/ PREPEND X-Seen: latin1"],
              [r"/^lf only/ REPLACE replaced"], message=ODD_MESSAGE)
    expected = (ODD_MESSAGE
                .replace(b"X-Bare-CR: a\rb\r\n", b"")
                .replace(b"X-Latin1:", b"X-Seen: latin1\r\nX-Latin1:")
                .replace(b"lf only line\n", b"replaced\n"))
    assert r.message == expected


def test_8bit_text_matches_and_is_substituted_back_byte_for_byte():
    r = check([r"/^X-Latin1: (.*)$/ REPLACE X-Was: $1"], message=ODD_MESSAGE)
    assert b"\r\nX-Was: caf\xe9\r\n" in r.message
    r = check([r"/^X-Latin1:/ WARN eight-bit"], message=ODD_MESSAGE)
    assert r.logs[0].startswith("warning: header X-Latin1: caf\ufffd from ")


def test_folded_header_key_keeps_its_line_breaks():
    # cleanup(8) matches the logical header with the newline(s) inside
    r = check([r"/^X-Folded: one\n   two$/ INFO exact"], message=ODD_MESSAGE, kind="pcre")
    assert len(r.logs) == 1
    r = check([r"/^X-Folded:.*two/ INFO dot-matches-newline"], message=ODD_MESSAGE)
    assert len(r.logs) == 1


def test_name_space_colon_is_normalised_in_the_key():
    r = check([r"/^Subject: odd$/ INFO normalised"], message=b"Subject   : odd\r\n\r\nx\r\n")
    assert len(r.logs) == 1


def test_no_checks_configured_is_a_no_op():
    c = ContentChecker([], [])
    assert not c.enabled
    r = c.check(MESSAGE, log_context=CTX)
    assert r.message is MESSAGE and r.action == "dunno" and r.logs == []


def test_a_non_header_line_ends_the_header_section():
    message = b"Subject: x\r\nnot a header line\r\nX-Later: 1\r\n"
    r = check([r"/^X-Later:/ REJECT"], [r"/^X-Later:/ INFO body"], message=message)
    assert r.action == "dunno" and r.logs == [f"info: body X-Later: 1 from {CTX}: body"]


# ---------------------------------------------------------------- MIME


MIME = (
    b"From: a@b\r\n"
    b"Content-Type: multipart/mixed; boundary=\"=-outer\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--=-outer\r\n"
    b"Content-Type: text/plain\r\n"
    b"X-Part: first\r\n"
    b"\r\n"
    b"first part body\r\n"
    b"--=-outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"Subject: attached message\r\n"
    b"X-Inner: yes\r\n"
    b"\r\n"
    b"inner body\r\n"
    b"--=-outer--\r\n"
    b"epilogue\r\n"
)


def test_mime_part_headers_and_attached_message_headers_get_header_checks():
    r = check([r"/^X-Part:/ INFO part", r"/^Subject: attached/ INFO nested",
               r"/^Content-Type: message/ INFO mime"], [r"/body$/ INFO body"], message=MIME)
    assert [line.split(" from ")[0] for line in r.logs] == [
        "info: header X-Part: first",
        "info: body first part body",
        "info: header Content-Type: message/rfc822",
        "info: header Subject: attached message",
        "info: body inner body",
    ]


def test_body_checks_see_boundaries_but_not_part_headers():
    r = check(body_rules=[r"/^--=-outer/ INFO boundary", r"/^X-Part:/ INFO never"], message=MIME)
    assert [line.split(" from ")[0] for line in r.logs] == [
        "info: body --=-outer", "info: body --=-outer", "info: body --=-outer--"]


def test_mime_and_nested_header_checks_can_be_set_separately():
    c = checker([r"/^X-/ INFO top"], mime_header_checks=[], nested_header_checks=[])
    r = c.check(MIME, log_context=CTX)
    assert r.logs == []  # X-Part is a MIME part header, X-Inner a nested header
    c = checker([r"/^X-/ INFO top"], mime_header_checks=[], nested_header_checks=None)
    r = c.check(MIME, log_context=CTX)
    assert [line.split(" from ")[0] for line in r.logs] == ["info: header X-Inner: yes"]


def test_disable_mime_input_processing_makes_everything_after_the_headers_body():
    r = check([r"/^X-Part:/ INFO header"], [r"/^X-Part:/ INFO body"], message=MIME,
              disable_mime_input_processing=True)
    assert [line.split(" from ")[0] for line in r.logs] == ["info: body X-Part: first"]


def test_mime_part_header_edit():
    r = check([r"/^X-Part:/ IGNORE"], message=MIME)
    assert r.message == MIME.replace(b"X-Part: first\r\n", b"")


def test_multipart_digest_parts_default_to_message_rfc822():
    message = (b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
               b"--d\r\n\r\nSubject: in digest\r\n\r\nbody\r\n--d--\r\n")
    r = check([r"/^Subject: in digest/ INFO nested"], message=message)
    assert len(r.logs) == 1


# ---------------------------------------------------------------- limits


def test_body_checks_size_limit_applies_per_body_segment():
    big = b"x" * 100 + b"\r\n"
    message = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b\r\n\r\n" + big * 3 + b"late one\r\n"
               b"--b\r\n\r\nearly two\r\n--b--\r\n")
    r = check(body_rules=[r"/^(late|early)/ INFO seen"], message=message, body_checks_size_limit=200)
    assert [line.split(" from ")[0] for line in r.logs] == ["info: body early two"]
    r = check(body_rules=[r"/^(late|early)/ INFO seen"], message=message, body_checks_size_limit=0)
    assert len(r.logs) == 2


def test_long_body_lines_are_checked_in_chunks():
    message = b"Subject: x\r\n\r\n" + b"a" * 10 + b"MARK" + b"b" * 20 + b"\r\n"
    r = check(body_rules=[r"/^MARK/ INFO chunk-start"], message=message, line_length_limit=10)
    assert [line.split(" from ")[0] for line in r.logs] == ["info: body MARKbbbbbb"]
    r = check(body_rules=[r"/^MARK/ IGNORE"], message=message, line_length_limit=10)
    assert r.message == b"Subject: x\r\n\r\n" + b"a" * 10 + b"b" * 14 + b"\r\n"


def test_huge_message_without_body_checks_only_scans_the_headers():
    message = MESSAGE + b"y" * 5_000_000 + b"\r\n"
    r = check([r"/^Subject:/ PREPEND X-A: b"], message=message)
    assert r.message.endswith(b"y" * 1000 + b"\r\n") and len(r.message) == len(message) + len(b"X-A: b\r\n")


# ---------------------------------------------------------------- tables and errors


def test_pcre_and_file_tables_work_as_checks(tmp_path):
    hc = tmp_path / "header_checks"
    hc.write_text("/^subject:.*BUY/ REJECT no sales\n")
    c = ContentChecker([f"pcre:{hc}"], [])
    assert c.check(MESSAGE, log_context=CTX).reply == "550 5.7.1 no sales"
    hc.write_text("/^subject:.*BUY/ WARN changed\n")
    os.utime(hc, (1_600_000_100, 1_600_000_100))
    c.reload_if_changed()
    assert c.check(MESSAGE, log_context=CTX).action == "dunno"


def test_a_broken_check_table_is_an_error_when_the_checker_is_built(tmp_path):
    hc = tmp_path / "header_checks"
    hc.write_text("/^subject:(/ REJECT\n")
    with pytest.raises(TableError) as info:
        ContentChecker([f"pcre:{hc}"], [])
    assert f"{hc}:1" in str(info.value)


def test_a_failing_lookup_propagates_as_a_temporary_error():
    class Broken:
        spec = "broken:"

        def lookup(self, key):
            raise TableLookupError("database is locked")

    from mailserver.tables import TableList
    c = ContentChecker(TableList([Broken()]), [])
    with pytest.raises(TableLookupError):
        c.check(MESSAGE, log_context=CTX)
