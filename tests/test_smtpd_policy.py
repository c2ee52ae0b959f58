"""Tests for mailserver.smtpd.policy (SMTP decisions as pure functions)
and mailserver.reply (reply formatting)."""

from __future__ import annotations

import pytest

from mailserver.address import Address, parse_address
from mailserver.reply import Reply, ReplyError
from mailserver.resolve import DEFAULT, LOCAL, RELAY, VIRTUAL, VIRTUAL_ALIAS
from mailserver.smtpd import policy
from mailserver.smtpd.policy import (
    MailParams,
    check_address_charset,
    check_content,
    check_helo_argument,
    check_mail_params,
    check_rcpt_params,
    check_recipient,
    ehlo_reply,
    greeting,
    helo_reply,
    is_postmaster,
    queued,
    relay_denied,
    timeout_reply,
    too_many_errors,
    unsupported_option,
    user_unknown,
)

HOST = "mail.example.com"


# ---------------------------------------------------------------- Reply


def test_single_line_reply_with_enhanced_code():
    r = Reply(250, "2.0.0", "Ok")
    assert r.lines() == ["250 2.0.0 Ok"]
    assert str(r) == "250 2.0.0 Ok"


def test_single_line_reply_without_enhanced_code():
    assert Reply(220, "", "mail.example.com ESMTP").lines() == ["220 mail.example.com ESMTP"]
    assert Reply(354, "", "End data with <CR><LF>.<CR><LF>").lines() == ["354 End data with <CR><LF>.<CR><LF>"]


def test_multi_line_reply_puts_a_dash_on_all_but_the_last_line():
    r = Reply(550, "5.1.1", "first\nsecond\nthird")
    assert r.lines() == ["550-5.1.1 first", "550-5.1.1 second", "550 5.1.1 third"]
    assert str(r) == "550-5.1.1 first\r\n550-5.1.1 second\r\n550 5.1.1 third"


def test_multi_line_reply_without_enhanced_code():
    assert Reply(250, "", "a\nb").lines() == ["250-a", "250 b"]


def test_empty_text_reply_has_no_trailing_space():
    assert Reply(250, "", "").lines() == ["250"]
    assert Reply(250, "2.0.0", "").lines() == ["250 2.0.0"]


def test_empty_line_inside_multi_line_reply():
    assert Reply(250, "", "a\n\nb").lines() == ["250-a", "250-", "250 b"]


@pytest.mark.parametrize("code, success, temporary, permanent", [
    (220, True, False, False), (250, True, False, False), (354, True, False, False),
    (421, False, True, False), (452, False, True, False), (500, False, False, True), (554, False, False, True),
])
def test_reply_classification(code, success, temporary, permanent):
    r = Reply(code, "", "x")
    assert (r.is_success, r.is_temporary, r.is_permanent) == (success, temporary, permanent)


def test_reply_is_an_immutable_value():
    r = Reply(250, "2.0.0", "Ok")
    assert r == Reply(250, "2.0.0", "Ok")
    with pytest.raises(AttributeError):
        r.code = 550


def test_reply_error_carries_the_reply():
    r = Reply(501, "5.5.4", "Syntax")
    exc = ReplyError(r)
    assert exc.reply is r
    assert str(exc) == "501 5.5.4 Syntax"


# ---------------------------------------------------------------- greeting / EHLO / HELO


def test_greeting_and_helo_reply():
    assert greeting(f"{HOST} ESMTP").lines() == [f"220 {HOST} ESMTP"]
    assert helo_reply(HOST).lines() == [f"250 {HOST}"]


def test_timeout_and_too_many_errors_replies():
    assert timeout_reply(HOST).lines() == [f"421 4.4.2 {HOST} Error: timeout exceeded"]
    assert too_many_errors(HOST).lines() == [f"421 4.7.0 {HOST} Error: too many errors"]


def test_ehlo_reply_lines_exactly():
    assert ehlo_reply(HOST, size_limit=10240000).lines() == [
        f"250-{HOST}",
        "250-PIPELINING",
        "250-SIZE 10240000",
        "250-VRFY",
        "250-ENHANCEDSTATUSCODES",
        "250-8BITMIME",
        "250 SMTPUTF8",
    ]


def test_ehlo_reply_without_size_limit_advertises_bare_size():
    assert "250-SIZE" in ehlo_reply(HOST, size_limit=0).lines()


def test_ehlo_reply_without_smtputf8():
    lines = ehlo_reply(HOST, size_limit=1000, smtputf8=False).lines()
    assert lines[-1] == "250 8BITMIME"
    assert not any("SMTPUTF8" in line for line in lines)


def test_ehlo_reply_never_offers_starttls_or_auth_unless_asked():
    text = "\n".join(ehlo_reply(HOST, size_limit=1000).lines())
    assert "STARTTLS" not in text and "AUTH" not in text


def test_ehlo_reply_with_starttls_and_auth_in_postfix_order():
    assert ehlo_reply(HOST, size_limit=1000, starttls=True, auth_mechanisms=("PLAIN", "LOGIN")).lines() == [
        f"250-{HOST}",
        "250-PIPELINING",
        "250-SIZE 1000",
        "250-VRFY",
        "250-STARTTLS",
        "250-AUTH PLAIN LOGIN",
        "250-ENHANCEDSTATUSCODES",
        "250-8BITMIME",
        "250 SMTPUTF8",
    ]


def test_ehlo_reply_auth_only():
    lines = ehlo_reply(HOST, size_limit=1000, auth_mechanisms=("PLAIN",)).lines()
    assert "250-AUTH PLAIN" in lines and "250-STARTTLS" not in lines


def test_ehlo_reply_never_advertises_unimplemented_extensions():
    text = "\n".join(ehlo_reply(HOST, size_limit=1000, starttls=True, auth_mechanisms=("PLAIN",)).lines())
    for word in ("CHUNKING", "DSN", "ETRN", "BINARYMIME", "XCLIENT"):
        assert word not in text


@pytest.mark.parametrize("arg", ["client.example.org", "[192.0.2.1]", "x", "a" * 255])
def test_helo_argument_accepted(arg):
    assert check_helo_argument(arg, ehlo=True) is None
    assert check_helo_argument(arg, ehlo=False) is None


@pytest.mark.parametrize("arg", [None, "", "   "])
def test_empty_ehlo_argument_is_a_syntax_error(arg):
    assert check_helo_argument(arg, ehlo=True) == Reply(501, "5.5.4", "Syntax: EHLO hostname")
    assert check_helo_argument(arg, ehlo=False) == Reply(501, "5.5.4", "Syntax: HELO hostname")


@pytest.mark.parametrize("arg", ["bad\x00host", "bad\rhost", "bad\nX-Injected: 1", "tab\there", "del\x7f", "\x1b[31m"])
def test_control_characters_in_helo_are_rejected(arg):
    assert check_helo_argument(arg, ehlo=True) == Reply(501, "5.5.2", "Error: invalid characters in hostname")


def test_overlong_helo_is_rejected():
    assert check_helo_argument("a" * 256, ehlo=True).code == 501


# ---------------------------------------------------------------- MAIL FROM parameters


def test_no_mail_parameters():
    assert check_mail_params({}, size_limit=1000) == (MailParams(None, False, False), None)


def test_size_within_limit():
    assert check_mail_params({"SIZE": "1000"}, size_limit=1000) == (MailParams(1000, False, False), None)
    assert check_mail_params({"SIZE": "0"}, size_limit=1000) == (MailParams(0, False, False), None)


def test_size_over_limit_is_552():
    params, reply = check_mail_params({"SIZE": "1001"}, size_limit=1000)
    assert params is None
    assert reply == Reply(552, "5.3.4", "Message size exceeds fixed limit")


def test_size_with_no_limit_is_accepted():
    params, reply = check_mail_params({"SIZE": "99999999999"}, size_limit=0)
    assert reply is None and params.size == 99999999999


@pytest.mark.parametrize("value", [None, "", "abc", "-1", "1.5", "1e6", "1 000", "1" * 21, "+5", "²", "١٢٣"])
def test_bad_size_syntax_is_501(value):
    params, reply = check_mail_params({"SIZE": value}, size_limit=1000)
    assert params is None
    assert reply == Reply(501, "5.5.4", "Bad message size syntax")


@pytest.mark.parametrize("value, eight_bit", [("7BIT", False), ("8BITMIME", True), ("8bitmime", True), ("7bit", False)])
def test_body_parameter(value, eight_bit):
    params, reply = check_mail_params({"BODY": value}, size_limit=1000)
    assert reply is None
    assert params.body_8bit is eight_bit


@pytest.mark.parametrize("value", ["BINARYMIME", None, "8BIT"])
def test_unsupported_body_parameter(value):
    params, reply = check_mail_params({"BODY": value}, size_limit=1000)
    assert params is None
    assert reply == Reply(501, "5.5.4", "Error: Unsupported BODY parameter")


def test_smtputf8_parameter():
    params, reply = check_mail_params({"SMTPUTF8": None}, size_limit=1000)
    assert reply is None and params.smtputf8 is True


def test_smtputf8_with_a_value_is_rejected():
    params, reply = check_mail_params({"SMTPUTF8": "yes"}, size_limit=1000)
    assert params is None
    assert reply == Reply(555, "5.5.4", "Unsupported option: SMTPUTF8=yes")


@pytest.mark.parametrize("name", ["RET", "ENVID", "AUTH", "XFORWARD", "X-UNKNOWN"])
def test_unknown_mail_parameter_is_555(name):
    params, reply = check_mail_params({name: "x"}, size_limit=1000)
    assert params is None
    assert reply == Reply(555, "5.5.4", f"Unsupported option: {name}")


def test_all_mail_parameters_together():
    params, reply = check_mail_params({"SIZE": "500", "BODY": "8BITMIME", "SMTPUTF8": None}, size_limit=1000)
    assert reply is None
    assert params == MailParams(500, True, True)


def test_rcpt_parameters_are_not_supported():
    assert check_rcpt_params({}) is None
    assert check_rcpt_params({"NOTIFY": "NEVER"}) == Reply(555, "5.5.4", "Unsupported option: NOTIFY")
    assert check_rcpt_params({"ORCPT": "rfc822;a@b"}) == Reply(555, "5.5.4", "Unsupported option: ORCPT")


def test_unsupported_option_reply():
    assert unsupported_option("FOO") == Reply(555, "5.5.4", "Unsupported option: FOO")


def test_address_charset_requires_smtputf8_for_unicode():
    uni = Address("jösé", "example.org")
    assert check_address_charset(uni, smtputf8=False) == Reply(553, "5.6.7",
                                                              "Must declare SMTPUTF8 to send unicode address")
    assert check_address_charset(uni, smtputf8=True) is None
    assert check_address_charset(Address("jose", "example.org"), smtputf8=False) is None
    assert check_address_charset(Address("jose", "例子.广告"), smtputf8=False).code == 553


# ---------------------------------------------------------------- RCPT TO decisions


def rcpt(address: Address, *, cls: str, trusted: bool = False, known: bool | None = None, count: int = 0,
         limit: int = 1000) -> Reply | None:
    return check_recipient(address, address_class=cls, client_trusted=trusted, known=known, rcpt_count=count,
                           rcpt_limit=limit)


RELAY_DENIED = "Relay access denied"


@pytest.mark.parametrize("cls", [RELAY, DEFAULT])
def test_untrusted_client_may_not_relay(cls):
    reply = rcpt(Address("u", "example.org"), cls=cls)
    assert reply == Reply(554, "5.7.1", "<u@example.org>: Relay access denied")
    assert reply.lines() == ["554 5.7.1 <u@example.org>: Relay access denied"]


@pytest.mark.parametrize("cls", [RELAY, DEFAULT])
def test_trusted_client_may_relay(cls):
    assert rcpt(Address("u", "example.org"), cls=cls, trusted=True) is None


@pytest.mark.parametrize("local", ["user%other.example", "other.example!user", "user@other.example"])
def test_routed_address_is_relay_denied_for_untrusted_even_when_local(local):
    address = Address(local, HOST)
    assert address.routed
    reply = rcpt(address, cls=LOCAL, known=True)
    assert reply is not None
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert reply.text.endswith(": Relay access denied")


def test_source_routed_address_is_relay_denied_for_untrusted():
    address = Address("user", HOST, source_route=True)
    assert rcpt(address, cls=LOCAL, known=True).code == 554


def test_routed_address_is_accepted_from_a_trusted_client():
    assert rcpt(Address("user%other.example", HOST), cls=LOCAL, trusted=True, known=True) is None


def test_percent_hack_in_parsed_address_is_routed():
    address = parse_address("user%victim.example@mail.example.com")
    assert rcpt(address, cls=LOCAL, known=True) == Reply(
        554, "5.7.1", "<user%victim.example@mail.example.com>: Relay access denied")


def test_unknown_local_user_is_550_user_unknown():
    reply = rcpt(Address("nobody", HOST), cls=LOCAL, known=False)
    assert reply == Reply(550, "5.1.1",
                          f"<nobody@{HOST}>: Recipient address rejected: User unknown in local recipient table")


def test_unknown_virtual_mailbox_user_text():
    reply = rcpt(Address("nobody", "vmail.test"), cls=VIRTUAL, known=False)
    assert reply == Reply(550, "5.1.1",
                          "<nobody@vmail.test>: Recipient address rejected: User unknown in virtual mailbox table")


def test_unknown_virtual_alias_user_text():
    reply = rcpt(Address("nobody", "alias.test"), cls=VIRTUAL_ALIAS, known=False)
    assert reply == Reply(550, "5.1.1",
                          "<nobody@alias.test>: Recipient address rejected: User unknown in virtual alias table")


@pytest.mark.parametrize("cls", [LOCAL, VIRTUAL, VIRTUAL_ALIAS])
@pytest.mark.parametrize("known", [True, None])
def test_known_or_unchecked_recipient_is_accepted(cls, known):
    assert rcpt(Address("user", "dom.test"), cls=cls, known=known) is None


def test_unknown_user_is_rejected_for_trusted_clients_too():
    assert rcpt(Address("nobody", HOST), cls=LOCAL, known=False, trusted=True).code == 550


def test_recipient_limit_is_452_temporary():
    reply = rcpt(Address("u", HOST), cls=LOCAL, known=True, count=1000, limit=1000)
    assert reply == Reply(452, "4.5.3", "Error: too many recipients")
    assert reply.is_temporary


def test_recipient_limit_is_checked_before_anything_else():
    assert rcpt(Address("u", "example.org"), cls=DEFAULT, count=5, limit=5).code == 452


def test_below_recipient_limit_is_accepted_and_zero_limit_is_unlimited():
    assert rcpt(Address("u", HOST), cls=LOCAL, known=True, count=999, limit=1000) is None
    assert rcpt(Address("u", HOST), cls=LOCAL, known=True, count=10**6, limit=0) is None


def test_relay_denied_and_user_unknown_helpers():
    assert relay_denied("a@b").lines() == ["554 5.7.1 <a@b>: Relay access denied"]
    assert user_unknown("a@b", "local recipient table").lines() == [
        "550 5.1.1 <a@b>: Recipient address rejected: User unknown in local recipient table"]


def test_quoted_local_part_is_shown_quoted_in_the_reply():
    reply = rcpt(Address("john doe", "example.org"), cls=DEFAULT)
    assert reply.text == '<"john doe"@example.org>: Relay access denied'


@pytest.mark.parametrize("address, local_domain, expected", [
    (Address("postmaster", ""), False, True),
    (Address("Postmaster", HOST), True, True),
    (Address("POSTMASTER", HOST), True, True),
    (Address("postmaster", "example.org"), False, False),
    (Address("postmaster%evil.example", HOST), True, False),
    (Address("postmaster", HOST, source_route=True), True, False),
    (Address("root", HOST), True, False),
])
def test_is_postmaster(address, local_domain, expected):
    assert is_postmaster(address, local_domain) is expected


# ---------------------------------------------------------------- end of DATA


def content(**kw) -> Reply | None:
    args = dict(too_big=False, has_nul=False, bare_lf=False, bare_cr=False, forbid_bare_newline="reject", hops=0,
                hopcount_limit=50)
    args.update(kw)
    return check_content(1234, **args)


def test_clean_content_is_accepted():
    assert content() is None


def test_too_big_is_552_and_beats_everything():
    assert content(too_big=True, has_nul=True, bare_lf=True, bare_cr=True, hops=99) == Reply(
        552, "5.3.4", "Message size exceeds fixed limit")


def test_nul_is_554_and_beats_bare_newlines_and_hops():
    assert content(has_nul=True, bare_lf=True, bare_cr=True, hops=99) == Reply(
        554, "5.6.0", "Error: message content contains NUL characters")


def test_bare_lf_is_550_in_reject_mode():
    assert content(bare_lf=True) == Reply(550, "5.5.2", "Error: bare <LF> received")


def test_bare_cr_is_550_in_reject_mode():
    assert content(bare_cr=True) == Reply(550, "5.5.2", "Error: bare <CR> received")


def test_bare_lf_is_reported_before_bare_cr():
    assert content(bare_lf=True, bare_cr=True).text == "Error: bare <LF> received"


def test_bare_newlines_beat_hop_count():
    assert content(bare_lf=True, hops=99).code == 550


def test_bare_newlines_are_accepted_in_normalize_mode():
    assert content(bare_lf=True, bare_cr=True, forbid_bare_newline="normalize") is None


def test_normalize_mode_still_checks_hops():
    assert content(bare_lf=True, forbid_bare_newline="normalize", hops=50).code == 554


def test_too_many_hops_is_554():
    assert content(hops=50) == Reply(554, "5.4.0", "Error: too many hops")
    assert content(hops=49) is None


def test_hop_limit_zero_disables_the_check():
    assert content(hops=1000, hopcount_limit=0) is None


def test_queued_reply_text():
    assert queued("4Fx3Kq1zQ2ab") == Reply(250, "2.0.0", "Ok: queued as 4Fx3Kq1zQ2ab")
    assert str(queued("ABC")) == "250 2.0.0 Ok: queued as ABC"


# ---------------------------------------------------------------- fixed replies


def test_every_fixed_reply_has_an_enhanced_code_except_greeting_style_ones():
    for name in dir(policy):
        value = getattr(policy, name)
        if isinstance(value, Reply) and value.code not in (354,):
            assert value.enhanced, name
            assert value.enhanced[0] == str(value.code)[0], name


def test_internal_errors_are_temporary():
    assert policy.INTERNAL_ERROR == Reply(451, "4.3.0", "Error: internal error")
    assert policy.QUEUE_WRITE_ERROR.is_temporary
    assert policy.INSUFFICIENT_STORAGE == Reply(452, "4.3.1", "Insufficient system storage")
