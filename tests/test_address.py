"""Tests for mailserver.address: the RFC 5321 path parser."""

from __future__ import annotations

import pytest

from mailserver.address import (
    NULL,
    Address,
    AddressSyntaxError,
    is_valid_domain,
    parse_address,
    parse_mail_from,
    parse_rcpt_to,
    quote_local,
)
from mailserver.reply import Reply, ReplyError

BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_PARAMS = Reply(501, "5.5.4", "Syntax error in parameters")

LABEL63 = "a" * 63
DOMAIN255 = ".".join([LABEL63] * 4)  # 4*63 + 3 dots = 255 octets
DOMAIN256 = "b." + ".".join(["c" * 62] + [LABEL63] * 3)  # 2 + 62 + 3*64 = 256


def rcpt_error(arg: str, **kw: bool) -> Reply:
    with pytest.raises(ReplyError) as info:
        parse_rcpt_to(arg, **kw)
    return info.value.reply


def mail_error(arg: str, **kw: bool) -> Reply:
    with pytest.raises(ReplyError) as info:
        parse_mail_from(arg, **kw)
    return info.value.reply


def test_domain_constants_have_the_intended_lengths():
    assert len(DOMAIN255) == 255
    assert len(DOMAIN256) == 256


# --------------------------------------------------------------------------
# Routed addresses (the relay-test matrix): never rewritten, always flagged
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "local", "domain", "source_route"),
    [
        ("<relaytest%example.com@[127.0.0.1]>", "relaytest%example.com", "[127.0.0.1]", False),
        ('<"relaytest@example.com">', "relaytest@example.com", "", False),
        ('<"relaytest@example.com"@[127.0.0.1]>', "relaytest@example.com", "[127.0.0.1]", False),
        ("<@[127.0.0.1]:relaytest@example.com>", "relaytest", "example.com", True),
        ("<example.com!relaytest>", "example.com!relaytest", "", False),
        ("<example.com!relaytest@[127.0.0.1]>", "example.com!relaytest", "[127.0.0.1]", False),
        ("<relaytest%example.com>", "relaytest%example.com", "", False),
        ("<@a.example,@b.example:user@c.example>", "user", "c.example", True),
    ],
)
def test_routed_rcpt_is_kept_literally_and_flagged(arg, local, domain, source_route):
    address, params = parse_rcpt_to(arg)
    assert address.local == local
    assert address.domain == domain
    assert address.source_route is source_route
    assert address.routed is True
    assert params == {}


def test_quoted_at_sign_is_requoted_by_str():
    address, _ = parse_rcpt_to('<"relaytest@example.com">')
    assert str(address) == '"relaytest@example.com"'


def test_quoted_at_sign_with_domain_str():
    address, _ = parse_rcpt_to('<"relaytest@example.com"@[127.0.0.1]>')
    assert str(address) == '"relaytest@example.com"@[127.0.0.1]'


def test_percent_hack_str_is_unquoted():
    address, _ = parse_rcpt_to("<relaytest%example.com@[127.0.0.1]>")
    assert str(address) == "relaytest%example.com@[127.0.0.1]"


def test_unquoted_second_at_sign_is_a_syntax_error():
    assert rcpt_error("<relaytest@example.com@[127.0.0.1]>") == BAD_RECIPIENT


def test_source_route_is_stripped_from_str():
    address, _ = parse_rcpt_to("<@[127.0.0.1]:relaytest@example.com>")
    assert str(address) == "relaytest@example.com"


def test_source_route_with_ipv6_literal_hop():
    address, _ = parse_rcpt_to("<@[IPv6:::1],@relay.example:user@example.com>")
    assert (address.local, address.domain, address.source_route) == ("user", "example.com", True)


@pytest.mark.parametrize(
    "arg",
    [
        "<@x.com>",  # route without mailbox (and empty local part)
        "<@x.com:>",  # route with empty mailbox
        "<@:user@x.com>",  # empty hop
        "<@x.com,user@y.com>",  # missing ':' / '@' on the next hop
        "<@x.com;user@y.com>",  # wrong separator
        "<@x..com:user@y.com>",  # bad hop domain
        "<@[1.2.3.4]x:user@y.com>",  # junk after a literal hop
        "<@[1.2.3.4:user@y.com>",  # unterminated literal hop
        "<@x.com,:user@y.com>",  # empty second hop
    ],
)
def test_bad_source_route_is_rejected(arg):
    assert rcpt_error(arg) == BAD_RECIPIENT


@pytest.mark.parametrize(
    "local",
    ["user", "first.last", "user+tag", "o'hara", "a_b-c", "Postmaster"],
)
def test_ordinary_local_part_is_not_routed(local):
    address, _ = parse_rcpt_to(f"<{local}@example.com>")
    assert address.routed is False
    assert address.source_route is False


# --------------------------------------------------------------------------
# Well-formed paths
# --------------------------------------------------------------------------


def test_postmaster_without_domain():
    address, params = parse_rcpt_to("<Postmaster>")
    assert address == Address("Postmaster", "")
    assert str(address) == "Postmaster"
    assert params == {}


def test_domain_is_lowercased_local_case_preserved():
    address, _ = parse_rcpt_to("<User@EXAMPLE.com>")
    assert address.local == "User"
    assert address.domain == "example.com"
    assert str(address) == "User@example.com"


def test_quoted_local_part_with_space():
    address, _ = parse_rcpt_to('<"a b"@x.com>')
    assert address.local == "a b"
    assert str(address) == '"a b"@x.com'


def test_quoted_local_part_with_escaped_quote():
    address, _ = parse_rcpt_to('<"a\\"b"@x.com>')
    assert address.local == 'a"b'
    assert str(address) == '"a\\"b"@x.com'


def test_quoted_local_part_with_escaped_backslash():
    address, _ = parse_rcpt_to('<"a\\\\b"@x.com>')
    assert address.local == "a\\b"
    assert str(address) == '"a\\\\b"@x.com'


def test_needlessly_quoted_local_part_is_canonicalised():
    address, _ = parse_rcpt_to('<"user"@x.com>')
    assert address.local == "user"
    assert str(address) == "user@x.com"


def test_quoted_local_part_may_contain_angle_brackets_and_spaces():
    address, params = parse_rcpt_to('<"a> <b"@x.com> NOTIFY=NEVER')
    assert address.local == "a> <b"
    assert params == {"NOTIFY": "NEVER"}


def test_every_atext_special_is_accepted_unquoted():
    local = "!#$%&'*+-/=?^_`{|}~"
    address, _ = parse_rcpt_to(f"<{local}@x.com>")
    assert address.local == local
    assert str(address) == f"{local}@x.com"


@pytest.mark.parametrize(
    ("arg", "domain"),
    [
        ("<a@[127.0.0.1]>", "[127.0.0.1]"),
        ("<a@[255.255.255.255]>", "[255.255.255.255]"),
        ("<a@[0.0.0.0]>", "[0.0.0.0]"),
        ("<a@[IPv6:::1]>", "[IPv6:::1]"),
        ("<a@[ipv6:::1]>", "[IPv6:::1]"),
        ("<a@[IPV6:2001:DB8::1]>", "[IPv6:2001:db8::1]"),
        ("<a@[IPv6:::ffff:192.0.2.1]>", "[IPv6:::ffff:192.0.2.1]"),
        ("<a@localhost>", "localhost"),
        ("<a@x-y.example>", "x-y.example"),
        ("<a@1.2.3.com>", "1.2.3.com"),
        ("<a@xn--bcher-kva.example>", "xn--bcher-kva.example"),
    ],
)
def test_valid_domains_and_address_literals(arg, domain):
    address, _ = parse_rcpt_to(arg)
    assert address.local == "a"
    assert address.domain == domain


def test_whitespace_before_the_path_is_allowed():
    address, params = parse_mail_from("   <a@b.c> SIZE=1")
    assert address == Address("a", "b.c")
    assert params == {"SIZE": "1"}


def test_trailing_spaces_are_ignored():
    address, params = parse_rcpt_to("<a@b.c>   ")
    assert address == Address("a", "b.c")
    assert params == {}


@pytest.mark.parametrize(
    ("arg", "expected", "params"),
    [
        ("a@x.com", Address("a", "x.com"), {}),
        ("a@X.COM SIZE=5", Address("a", "x.com"), {"SIZE": "5"}),
        ("postmaster", Address("postmaster", ""), {}),
        (' "a b"@x.com', Address("a b", "x.com"), {}),
        ("@r.example:u@x.com", Address("u", "x.com", True), {}),
    ],
)
def test_path_without_angle_brackets_ends_at_first_space(arg, expected, params):
    assert parse_rcpt_to(arg) == (expected, params)


def test_local_part_of_exactly_64_octets_is_accepted():
    address, _ = parse_rcpt_to(f"<{'a' * 64}@x.com>")
    assert len(address.local) == 64


def test_domain_of_exactly_255_octets_is_accepted():
    address, _ = parse_rcpt_to(f"<a@{DOMAIN255}>")
    assert address.domain == DOMAIN255


# --------------------------------------------------------------------------
# Malformed paths
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        "<a\x00b@x.com>",  # NUL
        "<a\r\n@x.com>",  # CR LF
        "<a\tb@x.com>",  # TAB
        "<a\x7f@x.com>",  # DEL
        "<a@x.com>\r\n",  # caller forgot to strip CRLF
        "\t<a@x.com>",  # TAB is not allowed as leading white space
        '<"a\x01"@x.com>',  # control inside quotes
        '<"a\\\x01"@x.com>',  # control as quoted-pair
        '<"unbalanced@x.com>',
        '<"a"b@x.com>',  # junk after quoted string
        '<""@x.com>',  # empty quoted local part
        '<"">',
        '"unbalanced@x.com',
        "<a..b@x.com>",
        "<.a@x.com>",
        "<a.@x.com>",
        "<a@x..com>",
        "<a@.x.com>",
        "<a@x.com.>",  # trailing dot
        "<a@-x.com>",
        "<a@x-.com>",
        "<a@x_y.com>",
        "<a@x.com@y.com>",
        f"<{'a' * 65}@x.com>",
        f'<"{"a" * 63}"@x.com>',  # 65 octets on the wire with the quotes
        f"<a@{DOMAIN256}>",
        f"<a@{'a' * 64}.com>",  # label over 63 octets
        "<a@[300.1.1.1]>",
        "<a@[1.2.3]>",
        "<a@[1.2.3.4.5]>",
        "<a@[01.2.3.4]>",  # leading zero: ambiguous (octal)
        "<a@[1.2.3.4>",
        "<a@[]>",
        "<a@[IPv6:zz]>",
        "<a@[IPv6:]>",
        "<a@[IPv6:fe80::1%eth0]>",  # scope id
        "<a@[IPv6:1.2.3.4]>",
        "<a@[tag:content]>",  # general literal: unsupported
        "<a@1.2.3.4>",  # numeric domain must be a literal
        "<a@123>",
        "<user@>",
        "<@x.com>",
        "<a@x.com",
        "a@x.com>",
        "<a@x.com>>",
        "<<a@x.com>>",
        "<a@x.com>SIZE=10",  # garbage after '>'
        "<a@x.com>x",
        "< a@x.com>",
        "<a@x.com >",
        "<a b@x.com>",
        "<a,b@x.com>",
        "<a(comment)@x.com>",
        "<a@x.com(comment)>",
        "<a\\b@x.com>",  # backslash outside quotes
        "<\u00a0a@x.com>",  # non-ASCII white space
        "<a\ud800@x.com>",  # lone surrogate
        "<a@x\u2028.com>",  # line separator
        "<a\u0085@x.com>",  # C1 control (NEL)
    ],
)
def test_malformed_rcpt_path_is_rejected_with_5_1_3(arg):
    assert rcpt_error(arg) == BAD_RECIPIENT


@pytest.mark.parametrize(
    "arg",
    ["<a\x00b@x.com>", "<a..b@x.com>", "<user@>", "<@x.com>", "<a@x.com", "a@x.com>"],
)
def test_malformed_mail_path_is_rejected_with_5_1_7(arg):
    assert mail_error(arg) == BAD_SENDER


def test_error_cause_carries_the_reason():
    with pytest.raises(ReplyError) as info:
        parse_rcpt_to("<a..b@x.com>")
    assert isinstance(info.value.__cause__, AddressSyntaxError)
    assert "dot" in str(info.value.__cause__)


def test_null_recipient_is_a_syntax_error():
    assert rcpt_error("<>") == BAD_RECIPIENT


def test_control_character_in_parameters_is_rejected():
    assert mail_error("<a@b.c> SIZE=1\x00") == BAD_SENDER


@pytest.mark.parametrize("arg", ["", " ", "   "])
def test_empty_mail_argument(arg):
    assert mail_error(arg) == Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")


@pytest.mark.parametrize("arg", ["", " "])
def test_empty_rcpt_argument(arg):
    assert rcpt_error(arg) == Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")


# --------------------------------------------------------------------------
# MAIL FROM and ESMTP parameters
# --------------------------------------------------------------------------


def test_null_sender():
    address, params = parse_mail_from("<>")
    assert address == NULL
    assert address.is_null
    assert str(address) == ""
    assert params == {}


def test_null_sender_with_size():
    address, params = parse_mail_from("<> SIZE=10")
    assert address is NULL
    assert params == {"SIZE": "10"}


def test_sender_with_several_parameters():
    address, params = parse_mail_from("<a@b.c> SIZE=10 BODY=8BITMIME SMTPUTF8")
    assert address == Address("a", "b.c")
    assert not address.is_null
    assert params == {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}


def test_parameter_keywords_are_uppercased_values_kept():
    _, params = parse_mail_from("<a@b.c> body=8bitmime envid=QQ+2B314 x-Foo")
    assert params == {"BODY": "8bitmime", "ENVID": "QQ+2B314", "X-FOO": None}


def test_multiple_spaces_between_parameters_are_tolerated():
    _, params = parse_mail_from("<a@b.c>  SIZE=1   BODY=7BIT ")
    assert params == {"SIZE": "1", "BODY": "7BIT"}


def test_rcpt_parameters():
    _, params = parse_rcpt_to("<a@b.c> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b.c")
    assert params == {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b.c"}


@pytest.mark.parametrize(
    "params",
    [
        "=x",
        "SIZE=",
        "SIZE==1",
        "SIZE=1=2",
        "-SIZE=1",
        "SI_ZE=1",
        "SIZE=1 SIZE=2",  # duplicate keyword
        "size=1 SIZE=1",  # duplicate, case-insensitively
        "KÉY=1",
        "<x>",
    ],
)
def test_bad_parameter_syntax(params):
    assert mail_error(f"<a@b.c> {params}") == BAD_PARAMS
    assert rcpt_error(f"<a@b.c> {params}") == BAD_PARAMS


def test_utf8_parameter_value_depends_on_smtputf8():
    _, params = parse_mail_from("<a@b.c> X-NOTE=caf\u00e9")
    assert params == {"X-NOTE": "caf\u00e9"}
    assert mail_error("<a@b.c> X-NOTE=caf\u00e9", smtputf8_allowed=False) == BAD_PARAMS


# --------------------------------------------------------------------------
# SMTPUTF8
# --------------------------------------------------------------------------


def test_utf8_address_accepted_with_smtputf8():
    address, _ = parse_rcpt_to("<jösé@bücher.example>")
    assert address.local == "jösé"
    assert address.domain == "bücher.example"
    assert str(address) == "jösé@bücher.example"


def test_utf8_domain_is_lowercased():
    address, _ = parse_rcpt_to("<jösé@BÜCHER.example>")
    assert address.domain == "bücher.example"


@pytest.mark.parametrize(
    "arg",
    [
        "<jösé@bücher.example>",
        "<jose@bücher.example>",
        "<jösé@example.com>",
        '<"jösé"@x.com>',
    ],
)
def test_utf8_address_rejected_without_smtputf8(arg):
    assert rcpt_error(arg, smtputf8_allowed=False) == BAD_RECIPIENT
    assert mail_error(arg, smtputf8_allowed=False) == BAD_SENDER


def test_utf8_local_part_length_counts_octets():
    # 32 two-octet characters = 64 octets: fine; 33 = 66 octets: too long.
    parse_rcpt_to(f"<{'ö' * 32}@x.com>")
    assert rcpt_error(f"<{'ö' * 33}@x.com>") == BAD_RECIPIENT


def test_utf8_label_length_counts_octets():
    assert is_valid_domain("ö" * 31 + ".example")  # 62 octets
    assert not is_valid_domain("ö" * 32 + ".example")  # 64 octets


# --------------------------------------------------------------------------
# Address value type
# --------------------------------------------------------------------------


def test_null_constant():
    assert NULL == Address("", "")
    assert NULL.is_null
    assert not NULL.routed
    assert str(NULL) == ""


def test_address_is_frozen_and_hashable():
    address = Address("a", "b.c")
    with pytest.raises(AttributeError):
        address.local = "x"  # type: ignore[misc]
    assert {address, Address("a", "b.c")} == {address}


def test_with_domain_qualifies_a_bare_local_part():
    address, _ = parse_rcpt_to("<postmaster>")
    qualified = address.with_domain("Example.COM")
    assert qualified == Address("postmaster", "example.com")
    assert str(qualified) == "postmaster@example.com"
    assert address == Address("postmaster", "")  # original unchanged


def test_with_domain_keeps_routing_facts():
    address = Address("a%b", "", source_route=True)
    qualified = address.with_domain("x.com")
    assert qualified.source_route and qualified.routed


def test_with_domain_normalises_ipv6_literal():
    assert Address("a", "").with_domain("[ipv6:::1]").domain == "[IPv6:::1]"


@pytest.mark.parametrize("domain", ["", "x..com", "bad_domain", "[1.2.3]"])
def test_with_domain_rejects_bad_domain(domain):
    with pytest.raises(ValueError):
        Address("a", "").with_domain(domain)


def test_with_domain_rejects_null_address():
    with pytest.raises(ValueError):
        NULL.with_domain("x.com")


@pytest.mark.parametrize(
    ("local", "routed"),
    [("a", False), ("a@b", True), ("a%b", True), ("b!a", True), ("a.b+c", False)],
)
def test_routed_property(local, routed):
    assert Address(local, "x.com").routed is routed


# --------------------------------------------------------------------------
# quote_local
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "wire"),
    [
        ("user", "user"),
        ("first.last", "first.last"),
        ("a%b", "a%b"),
        ("a b", '"a b"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("a@b", '"a@b"'),
        (".a", '".a"'),
        ("a..b", '"a..b"'),
        ("a.", '"a."'),
        ("", '""'),
        ("jösé", "jösé"),
    ],
)
def test_quote_local(local, wire):
    assert quote_local(local) == wire


@pytest.mark.parametrize("local", ["a b", 'a"b', "a\\b", "a@b", ".a.", "x(y)", "jö sé"])
def test_quote_local_round_trips_through_the_parser(local):
    address, _ = parse_rcpt_to(f"<{quote_local(local)}@x.com>")
    assert address.local == local
    assert str(address) == f"{quote_local(local)}@x.com"


# --------------------------------------------------------------------------
# is_valid_domain
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "example.com",
        "localhost",
        "a",
        "x-y.example",
        "1.2.3.com",
        "a.123",
        DOMAIN255,
        "bücher.example",
    ],
)
def test_valid_domain_names(name):
    assert is_valid_domain(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "example.com.",
        ".example.com",
        "a..b",
        "-a.com",
        "a-.com",
        "a_b.com",
        "a b.com",
        "a@b.com",
        "1.2.3.4",
        "123",
        DOMAIN256,
        "a" * 64 + ".com",
        "x\x00.com",
        "[1.2.3.4]",  # literal: only with address_literal=True
    ],
)
def test_invalid_domain_names(name):
    assert not is_valid_domain(name)


def test_utf8_domain_needs_smtputf8():
    assert not is_valid_domain("bücher.example", smtputf8_allowed=False)


@pytest.mark.parametrize("name", ["[1.2.3.4]", "[IPv6:::1]", "[ipv6:2001:db8::1]"])
def test_address_literal_is_valid_when_allowed(name):
    assert is_valid_domain(name, address_literal=True)


@pytest.mark.parametrize("name", ["[1.2.3.256]", "[IPv6:::g]", "[1.2.3.4", "[x]"])
def test_bad_address_literal_is_invalid_even_when_allowed(name):
    assert not is_valid_domain(name, address_literal=True)


# --------------------------------------------------------------------------
# parse_address (config values, alias targets, header addresses)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user@Example.COM", Address("user", "example.com")),
        ("user", Address("user", "")),
        ('"a b"@x.com', Address("a b", "x.com")),
        ("u%d@relay.example", Address("u%d", "relay.example")),
        ("root@[127.0.0.1]", Address("root", "[127.0.0.1]")),
        ("jösé@bücher.example", Address("jösé", "bücher.example")),
    ],
)
def test_parse_address_accepts_bare_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<user@x.com>",
        " user@x.com",
        "user@x.com ",
        "user@",
        "@x.com",
        "@r.example:user@x.com",
        "a@b@c",
        "a..b@x.com",
        "a@x..com",
        "a\n@x.com",
        '"a@x.com',
        "a b@x.com",
    ],
)
def test_parse_address_rejects_bad_syntax(text):
    with pytest.raises(ValueError):
        parse_address(text)


def test_parse_address_rejects_utf8_without_smtputf8():
    with pytest.raises(AddressSyntaxError):
        parse_address("jösé@x.com", smtputf8_allowed=False)
