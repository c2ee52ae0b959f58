"""Scenario tests for mailserver.smtpd.restrictions (Postfix smtpd_check).

Plain async unit tests of RestrictionChecker: no SMTP sockets.  DNS-based
checks talk to a real UDP DNS server on 127.0.0.1 (tests/dnsserver.py);
check_policy_service talks to a real policy server on 127.0.0.1 / a unix
socket.  Expected replies are Postfix's texts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os

import pytest

from dnsserver import TestDNSServer
from mailserver.address import parse_rcpt_to
from mailserver.config import Config, parse_network
from mailserver.dns import Resolver
from mailserver.reply import Reply
from mailserver.resolve import AddressResolver
from mailserver.smtpd.restrictions import Decision, Facts, RestrictionChecker

HOST = "mx.test.example"
CLIENT_IP = "192.0.2.9"
RCPT = "user@mx.test.example"
SENDER = "sender@example.org"
HELO_NAME = "client.example.org"
CONFIG_ERROR = Reply(451, "4.3.5", "Server configuration error")


def make_checker(*, dns=None, recipient_known=None, policy_hooks=None, sender_login_owner=None,
                 supports_filter=False, log=None, **params) -> RestrictionChecker:
    params.setdefault("myhostname", HOST)
    params.setdefault("alias_maps", [])
    config = Config(**params)
    networks = [parse_network(n) for n in config.mynetworks]

    def is_mynetworks(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in networks if net.version == addr.version)

    return RestrictionChecker(config, resolver=AddressResolver(config), dns=dns, is_mynetworks=is_mynetworks,
                              recipient_known=recipient_known, policy_hooks=policy_hooks,
                              sender_login_owner=sender_login_owner, supports_filter=supports_filter, log=log)


def facts(**kw) -> Facts:
    kw.setdefault("client_addr", CLIENT_IP)
    kw.setdefault("helo", HELO_NAME)
    kw.setdefault("sender", SENDER)
    kw.setdefault("recipient", RCPT)
    return Facts(**kw)


async def rcpt_list(checker: RestrictionChecker, restrictions, **kw) -> Decision:
    return await checker.check("smtpd_recipient_restrictions", facts(**kw), restrictions)


# ---------------------------------------------------------------- DNS fixture

ZONES = {
    "test.example": [
        "good-helo A 192.0.2.20",
        "mx-only MX 10 good-helo.test.example.",
        "v6-only AAAA 2001:db8::20",
    ],
    "example": [
        "known A 192.0.2.30",
        "mxdomain MX 10 known.example.",
        "nullmx MX 0 .",
        "v6 AAAA 2001:db8::30",
    ],
    "rbl.test": [
        "9.2.0.192 A 127.0.0.2",
        '9.2.0.192 TXT "Listed, see http://rbl.test/q?192.0.2.9"',
        "10.2.0.192 A 127.0.0.10",
        "20.2.0.192 A 127.0.0.2",
        '20.2.0.192 TXT "first"',
        '20.2.0.192 TXT "second"',
        "21.2.0.192 A 127.0.0.2",
        '21.2.0.192 TXT "evil\\013\\010text"',
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2 A 127.0.0.4",
    ],
    "rhsbl.test": [
        "spam.example A 127.0.0.2",
        'spam.example TXT "spam domain"',
    ],
}


@pytest.fixture
async def dnsserver():
    server = TestDNSServer(ZONES)
    await server.start()
    server.fail("broken.example", "SERVFAIL")
    server.fail("slow-helo.test.example", "TIMEOUT")
    server.fail("11.2.0.192.rbl.test", "TIMEOUT")
    server.fail("slow.example.rhsbl.test", "SERVFAIL")
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def resolver(dnsserver):
    return Resolver([dnsserver.nameserver], timeout=0.5)


# ================================================================ generic restrictions


async def test_permit_ends_the_list_and_later_restrictions_are_not_reached():
    checker = make_checker()
    decision = await rcpt_list(checker, ["permit", "reject"])
    assert decision.action == "permit"
    assert decision.reply is None
    assert any("restriction `reject' after `permit' is ignored" in line for line in decision.logs)


async def test_empty_list_is_dunno():
    decision = await rcpt_list(make_checker(), [])
    assert decision.action == "dunno" and decision.accepted


async def test_reject_in_client_list_names_the_client():
    decision = await make_checker().check("smtpd_client_restrictions", facts(stage="connect"), ["reject"])
    assert decision.action == "reject"
    assert decision.reply == Reply(554, "5.7.1", "<unknown[192.0.2.9]>: Client host rejected: Access denied")


async def test_reject_uses_reject_code():
    decision = await rcpt_list(make_checker(reject_code=550), ["reject"])
    assert decision.reply == Reply(550, "5.7.1", "<user@mx.test.example>: Recipient address rejected: Access denied")


async def test_reject_in_each_list_uses_its_reply_name_and_class():
    checker = make_checker()
    f = facts(client_name="host.example.org")
    assert (await checker.check("smtpd_client_restrictions", f, ["reject"])).reply.text == \
        "<host.example.org[192.0.2.9]>: Client host rejected: Access denied"
    assert (await checker.check("smtpd_helo_restrictions", f, ["reject"])).reply.text == \
        "<client.example.org>: Helo command rejected: Access denied"
    assert (await checker.check("smtpd_sender_restrictions", f, ["reject"])).reply.text == \
        "<sender@example.org>: Sender address rejected: Access denied"
    assert (await checker.check("smtpd_relay_restrictions", f, ["reject"])).reply.text == \
        "<user@mx.test.example>: Recipient address rejected: Access denied"
    assert (await checker.check("smtpd_data_restrictions", f, ["reject"])).reply.text == \
        "<DATA>: Data command rejected: Access denied"
    assert (await checker.check("smtpd_end_of_data_restrictions", f, ["reject"])).reply.text == \
        "<END-OF-MESSAGE>: End-of-data rejected: Access denied"


async def test_defer_is_450_try_again_later():
    decision = await rcpt_list(make_checker(), ["defer"])
    assert decision.action == "defer"
    assert decision.reply == Reply(450, "4.3.2", "<user@mx.test.example>: Recipient address rejected: Try again later")


async def test_defer_if_permit_turns_the_final_permit_into_a_deferral():
    decision = await rcpt_list(make_checker(), ["defer_if_permit", "permit"])
    assert decision.reply == Reply(450, "4.7.0",
                                   "<user@mx.test.example>: Recipient address rejected: defer_if_permit requested")


async def test_defer_if_permit_yields_to_a_later_reject():
    decision = await rcpt_list(make_checker(), ["defer_if_permit", "reject"])
    assert decision.reply == Reply(554, "5.7.1", "<user@mx.test.example>: Recipient address rejected: Access denied")


async def test_defer_if_reject_turns_a_later_reject_into_a_deferral():
    decision = await rcpt_list(make_checker(), ["defer_if_reject", "reject"])
    assert decision.reply == Reply(450, "4.7.0",
                                   "<user@mx.test.example>: Recipient address rejected: defer_if_reject requested")


async def test_defer_if_reject_does_not_affect_a_permit():
    decision = await rcpt_list(make_checker(), ["defer_if_reject", "permit"])
    assert decision.action == "permit"


async def test_warn_if_reject_logs_reject_warning_and_continues():
    decision = await rcpt_list(make_checker(), ["warn_if_reject", "reject", "permit"])
    assert decision.action == "permit"
    assert ("NOQUEUE: reject_warning: RCPT from unknown[192.0.2.9]: 554 5.7.1 <user@mx.test.example>: "
            "Recipient address rejected: Access denied; from=<sender@example.org> to=<user@mx.test.example> "
            "proto=ESMTP helo=<client.example.org>") in decision.logs


async def test_warn_if_reject_applies_only_to_the_next_restriction():
    decision = await rcpt_list(make_checker(), ["warn_if_reject", "defer_if_permit", "reject"])
    assert decision.action == "reject"
    # With warn_if_reject, defer_if_permit is a (logged) warning, not a flag.
    assert any("reject_warning" in line and "defer_if_permit requested" in line for line in decision.logs)


async def test_unknown_restriction_is_a_configuration_error():
    logs: list[str] = []
    decision = await rcpt_list(make_checker(log=logs.append), ["reject_everything_bad"])
    assert decision.reply == CONFIG_ERROR
    assert 'warning: unknown smtpd restriction: "reject_everything_bad"' in logs


async def test_restriction_names_are_case_insensitive():
    decision = await rcpt_list(make_checker(), ["REJECT"])
    assert decision.action == "reject"


# ================================================================ client restrictions


async def test_permit_mynetworks_permits_trusted_clients_only():
    checker = make_checker(mynetworks="127.0.0.0/8, 192.0.2.128/25")
    assert (await rcpt_list(checker, ["permit_mynetworks", "reject"], client_addr="127.0.0.1")).action == "permit"
    assert (await rcpt_list(checker, ["permit_mynetworks", "reject"], client_addr="192.0.2.200")).action == "permit"
    assert (await rcpt_list(checker, ["permit_mynetworks", "reject"])).action == "reject"


async def test_permit_inet_interfaces_permits_our_own_addresses():
    checker = make_checker()
    assert (await rcpt_list(checker, ["permit_inet_interfaces", "reject"], client_addr="127.0.0.1")).action == "permit"
    assert (await rcpt_list(checker, ["permit_inet_interfaces", "reject"])).action == "reject"


async def test_permit_sasl_authenticated():
    checker = make_checker()
    assert (await rcpt_list(checker, ["permit_sasl_authenticated", "reject"], sasl_username="alice")).action == "permit"
    assert (await rcpt_list(checker, ["permit_sasl_authenticated", "reject"])).action == "reject"


async def test_reject_unknown_client_hostname():
    checker = make_checker()
    decision = await rcpt_list(checker, ["reject_unknown_client_hostname"])
    assert decision.reply == Reply(450, "4.7.25", "Client host rejected: cannot find your hostname, [192.0.2.9]")
    assert (await rcpt_list(checker, ["reject_unknown_client_hostname"],
                            client_name="host.example.org")).action == "dunno"


async def test_reject_unknown_client_hostname_uses_unknown_client_reject_code_unless_tempfail():
    checker = make_checker(unknown_client_reject_code=550)
    decision = await rcpt_list(checker, ["reject_unknown_client_hostname"])
    assert decision.reply == Reply(550, "5.7.25", "Client host rejected: cannot find your hostname, [192.0.2.9]")
    decision = await rcpt_list(checker, ["reject_unknown_client_hostname"], client_name_tempfail=True)
    assert decision.reply == Reply(450, "4.7.25", "Client host rejected: cannot find your hostname, [192.0.2.9]")


async def test_reject_unknown_reverse_client_hostname():
    checker = make_checker()
    decision = await rcpt_list(checker, ["reject_unknown_reverse_client_hostname"])
    assert decision.reply == Reply(450, "4.7.25",
                                   "Client host rejected: cannot find your reverse hostname, [192.0.2.9]")
    # A PTR name that is not forward-confirmed still satisfies this check.
    assert (await rcpt_list(checker, ["reject_unknown_reverse_client_hostname"],
                            reverse_client_name="ptr.example.org")).action == "dunno"


async def test_reject_unauth_pipelining():
    checker = make_checker()
    decision = await checker.check("smtpd_client_restrictions", facts(pipelining_violation=True),
                                   ["reject_unauth_pipelining"])
    assert decision.reply == Reply(503, "5.5.0", "<unknown[192.0.2.9]>: Client host rejected: "
                                                 "Improper use of SMTP command pipelining")
    assert (await checker.check("smtpd_client_restrictions", facts(), ["reject_unauth_pipelining"])).action == "dunno"
    decision = await checker.check("smtpd_data_restrictions", facts(stage="data", pipelining_violation=True),
                                   ["reject_unauth_pipelining"])
    assert decision.reply == Reply(503, "5.5.0",
                                   "<DATA>: Data command rejected: Improper use of SMTP command pipelining")


async def test_reject_plaintext_session():
    checker = make_checker()
    decision = await rcpt_list(checker, ["reject_plaintext_session"])
    assert decision.reply == Reply(450, "4.7.1", "Session encryption is required")
    assert (await rcpt_list(checker, ["reject_plaintext_session"], tls=True)).action == "dunno"


# ================================================================ access tables: lookup order


async def test_client_access_lookup_order_hostname_parents_address_prefixes():
    keys = ["mail.sub.example.com", "sub.example.com", "example.com", "com",
            "192.0.2.9", "192.0.2", "192.0", "192"]
    for n in range(len(keys)):
        table = "inline:{ " + ", ".join(f"{k}=REJECT k{i}" for i, k in enumerate(keys) if i >= n) + " }"
        decision = await make_checker().check("smtpd_client_restrictions", facts(client_name="mail.sub.example.com"),
                                              ["check_client_access", table])
        assert decision.reply == Reply(554, "5.7.1",
                                       f"<mail.sub.example.com[192.0.2.9]>: Client host rejected: k{n}"), keys[n]


async def test_client_access_dotted_parents_when_access_maps_do_not_match_subdomains():
    checker = make_checker(parent_domain_matches_subdomains="relay_domains")
    f = facts(client_name="mail.sub.example.com")
    table = "inline:{ example.com=REJECT bare, .example.com=REJECT dotted }"
    decision = await checker.check("smtpd_client_restrictions", f, ["check_client_access", table])
    assert decision.reply.text.endswith("rejected: dotted")
    # With the default, the bare parent matches and ".example.com" is not looked up.
    decision = await make_checker().check("smtpd_client_restrictions", f, ["check_client_access", table])
    assert decision.reply.text.endswith("rejected: bare")


async def test_client_access_ipv6_prefixes_by_colon_groups():
    keys = ["2001:db8:1:2::9", "2001:db8:1:2:", "2001:db8:1:2", "2001:db8:1", "2001:db8", "2001"]
    for n in range(len(keys)):
        table = "inline:{ " + ", ".join(f"{k}=REJECT k{i}" for i, k in enumerate(keys) if i >= n) + " }"
        decision = await make_checker().check("smtpd_client_restrictions", facts(client_addr="2001:db8:1:2::9"),
                                              ["check_client_access", table])
        assert decision.reply.text == f"<unknown[2001:db8:1:2::9]>: Client host rejected: k{n}", keys[n]


async def test_client_access_hostname_match_stops_before_the_address():
    table = "inline:{ host.example.org=DUNNO, 192.0.2.9=REJECT }"
    decision = await make_checker().check("smtpd_client_restrictions", facts(client_name="host.example.org"),
                                          ["check_client_access", table, "permit"])
    assert decision.action == "permit"


async def test_client_access_no_parent_magic_for_numeric_names():
    table = "inline:{ 2.9=REJECT parent, 192.0.2=REJECT prefix }"
    decision = await make_checker().check("smtpd_client_restrictions", facts(),
                                          ["check_client_access", table])
    assert decision.reply.text.endswith("rejected: prefix")


async def test_bare_table_in_client_list_is_check_client_access():
    decision = await make_checker().check("smtpd_client_restrictions", facts(), ["inline:{ 192.0.2.9=REJECT }"])
    assert decision.reply == Reply(554, "5.7.1", "<unknown[192.0.2.9]>: Client host rejected: Access denied")


async def test_bare_table_in_data_list_is_a_configuration_error():
    decision = await make_checker().check("smtpd_data_restrictions", facts(stage="data"),
                                          ["inline:{ 192.0.2.9=REJECT }"])
    assert decision.reply == CONFIG_ERROR


async def test_check_access_without_a_table_is_a_configuration_error():
    decision = await rcpt_list(make_checker(), ["check_recipient_access", "reject"])
    assert decision.reply == CONFIG_ERROR


async def test_check_reverse_client_hostname_access():
    table = "inline:{ dynamic.example.net=REJECT dynamic address }"
    decision = await make_checker().check(
        "smtpd_client_restrictions", facts(reverse_client_name="1-2-3.dynamic.example.net"),
        ["check_reverse_client_hostname_access", table])
    assert decision.reply == Reply(554, "5.7.1", "<1-2-3.dynamic.example.net>: Unverified Client host rejected: "
                                                 "dynamic address")


async def test_check_reverse_client_hostname_access_may_not_allowlist():
    table = "inline:{ good.example.net=OK }"
    decision = await make_checker().check(
        "smtpd_client_restrictions", facts(reverse_client_name="good.example.net"),
        ["check_reverse_client_hostname_access", table])
    assert decision.reply == CONFIG_ERROR


async def test_check_helo_access_name_and_parents():
    table = "inline:{ example.org=REJECT you are not us }"
    decision = await make_checker().check("smtpd_helo_restrictions", facts(), ["check_helo_access", table])
    assert decision.reply == Reply(554, "5.7.1", "<client.example.org>: Helo command rejected: you are not us")


async def test_sender_access_lookup_order_with_extension():
    keys = ["user+tag@sub.example.com", "user@sub.example.com", "sub.example.com", "example.com", "com",
            "user+tag@", "user@"]
    for n in range(len(keys)):
        table = "inline:{ " + ", ".join(f"{k}=REJECT k{i}" for i, k in enumerate(keys) if i >= n) + " }"
        decision = await make_checker(recipient_delimiter="+").check(
            "smtpd_sender_restrictions", facts(sender="User+Tag@Sub.Example.com"), ["check_sender_access", table])
        assert decision.reply == Reply(554, "5.7.1", f"<User+Tag@Sub.Example.com>: Sender address rejected: k{n}"), \
            keys[n]


async def test_sender_access_parent_style_dotted():
    checker = make_checker(parent_domain_matches_subdomains="")
    table = "inline:{ example.com=REJECT bare, .example.com=REJECT dotted }"
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="a@sub.example.com"),
                                   ["check_sender_access", table])
    assert decision.reply.text.endswith("rejected: dotted")
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="a@example.com"),
                                   ["check_sender_access", table])
    assert decision.reply.text.endswith("rejected: bare")


async def test_sender_access_unqualified_address_gets_myorigin():
    table = f"inline:{{ joe@{HOST}=REJECT qualified }}"
    decision = await make_checker().check("smtpd_sender_restrictions", facts(sender="joe"),
                                          ["check_sender_access", table])
    assert decision.reply.text == "<joe>: Sender address rejected: qualified"


async def test_null_sender_is_looked_up_as_angle_brackets():
    table = "inline:{ <>=REJECT no bounces here }"
    decision = await make_checker().check("smtpd_sender_restrictions", facts(sender=""),
                                          ["check_sender_access", table])
    assert decision.reply == Reply(554, "5.7.1", "<>: Sender address rejected: no bounces here")
    decision = await make_checker().check("smtpd_sender_restrictions", facts(),
                                          ["check_sender_access", table])
    assert decision.action == "dunno"


async def test_recipient_access_and_dsn_from_the_table_text():
    table = "inline:{ user@mx.test.example=REJECT 5.2.2 mailbox full }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table])
    assert decision.reply == Reply(554, "5.2.2", "<user@mx.test.example>: Recipient address rejected: mailbox full")


async def test_routed_recipient_cannot_be_allowlisted_by_an_access_table():
    table = "inline:{ mx.test.example=OK }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "reject_unauth_destination"],
                               recipient="relaytest%example.com@mx.test.example")
    assert decision.reply == Reply(554, "5.7.1", "<relaytest%example.com@mx.test.example>: Relay access denied")
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "reject"])
    assert decision.action == "permit"


async def test_table_lookup_failure_is_a_temporary_error():
    spec = "inline:{ 192.0.2.9=OK }"
    checker = make_checker(smtpd_client_restrictions=f"check_client_access {spec}")

    def broken(key):
        raise OSError("database is locked")

    checker._maps[spec].tables.lookup = broken
    decision = await checker.check("smtpd_client_restrictions", facts())
    assert decision.reply == Reply(451, "4.3.0", "<unknown[192.0.2.9]>: Temporary lookup failure")


async def test_unopenable_table_is_a_configuration_error():
    checker = make_checker(smtpd_client_restrictions="check_client_access nosuchtype:/etc/x")
    decision = await checker.check("smtpd_client_restrictions", facts())
    assert decision.reply == CONFIG_ERROR
    assert any("nosuchtype:/etc/x" in p for p in checker.configuration_problems())


# ================================================================ access(5) results


ACCESS_RESULTS = [
    ("OK", "permit", None),
    ("RELAY", "permit", None),
    ("1234567890", "permit", None),
    ("REJECT", "reject", Reply(554, "5.7.1", "<user@mx.test.example>: Recipient address rejected: Access denied")),
    ("REJECT go away", "reject", Reply(554, "5.7.1", "<user@mx.test.example>: Recipient address rejected: go away")),
    ("reject 5.7.9 policy", "reject", Reply(554, "5.7.9", "<user@mx.test.example>: Recipient address rejected: policy")),
    ("DEFER", "defer", Reply(450, "4.7.1", "<user@mx.test.example>: Recipient address rejected: Access denied")),
    ("DEFER come back later", "defer",
     Reply(450, "4.7.1", "<user@mx.test.example>: Recipient address rejected: come back later")),
    ("450 4.2.0 Greylisted", "defer", Reply(450, "4.2.0", "<user@mx.test.example>: Recipient address rejected: Greylisted")),
    ("550 Go away", "reject", Reply(550, "5.7.1", "<user@mx.test.example>: Recipient address rejected: Go away")),
    ("421 closing", "defer", Reply(421, "4.7.1", "<user@mx.test.example>: Recipient address rejected: closing")),
    ("551 4.1.6 moved", "reject", Reply(551, "5.1.6", "<user@mx.test.example>: Recipient address rejected: moved")),
    ("DUNNO", "dunno", None),
    ("DUNNO with ignored text", "dunno", None),
]


@pytest.mark.parametrize("result,action,reply", ACCESS_RESULTS)
async def test_access_table_result(result, action, reply):
    table = f"inline:{{ {{user@mx.test.example={result}}} }}"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table])
    assert decision.action == action
    assert decision.reply == reply


async def test_access_result_reply_codes_come_from_the_map_codes():
    checker = make_checker(access_map_reject_code=550, access_map_defer_code=451)
    assert (await rcpt_list(checker, ["check_recipient_access", "inline:{ user@mx.test.example=REJECT }"])).reply.code \
        == 550
    assert (await rcpt_list(checker, ["check_recipient_access", "inline:{ user@mx.test.example=DEFER }"])).reply \
        == Reply(451, "4.7.1", "<user@mx.test.example>: Recipient address rejected: Access denied")


async def test_access_result_address_dsn_is_fixed_for_the_sender():
    table = "inline:{ {sender@example.org=REJECT 5.1.1 no such user} }"
    decision = await make_checker().check("smtpd_sender_restrictions", facts(), ["check_sender_access", table])
    assert decision.reply == Reply(554, "5.1.0", "<sender@example.org>: Sender address rejected: no such user")
    # ... and an address DSN becomes 4.0.0-ish for a non-address class.
    decision = await make_checker().check("smtpd_client_restrictions", facts(),
                                          ["check_client_access", "inline:{ {192.0.2.9=REJECT 5.1.1 nope} }"])
    assert decision.reply == Reply(554, "5.0.0", "<unknown[192.0.2.9]>: Client host rejected: nope")


async def test_access_result_with_a_bad_configured_code_sends_a_generic_reply():
    logs: list[str] = []
    checker = make_checker(access_map_reject_code=250, log=logs.append)
    decision = await rcpt_list(checker, ["check_recipient_access", "inline:{ user@mx.test.example=REJECT }"])
    assert decision.reply == Reply(450, "4.7.1", "Service unavailable")
    assert any(line.startswith("warning: SMTP reply code configuration error") for line in logs)


async def test_access_result_defer_if_permit():
    table = "inline:{ {user@mx.test.example=DEFER_IF_PERMIT busy, try later} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "permit"])
    assert decision.reply == Reply(450, "4.7.1", "<user@mx.test.example>: Recipient address rejected: busy, try later")
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "reject"])
    assert decision.reply.code == 554


async def test_access_result_defer_if_reject():
    table = "inline:{ {user@mx.test.example=DEFER_IF_REJECT maybe} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "reject"])
    assert decision.reply == Reply(450, "4.7.1", "<user@mx.test.example>: Recipient address rejected: maybe")
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "permit"])
    assert decision.action == "permit"


async def test_access_result_discard_permits_and_stops_everything():
    table = "inline:{ user@mx.test.example=DISCARD }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "reject"])
    assert decision.action == "permit" and decision.discard
    assert ("NOQUEUE: discard: RCPT from unknown[192.0.2.9]: <user@mx.test.example>: Recipient address triggers "
            "DISCARD action; from=<sender@example.org> to=<user@mx.test.example> proto=ESMTP "
            "helo=<client.example.org>") in decision.logs


async def test_access_result_hold_continues_the_list():
    table = "inline:{ {user@mx.test.example=HOLD quarantine for review} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "permit"])
    assert decision.action == "permit" and decision.hold
    assert any(": hold: RCPT from unknown[192.0.2.9]: <user@mx.test.example>: Recipient address "
               "quarantine for review;" in line for line in decision.logs)


async def test_access_result_hold_and_discard_need_a_mail_transaction():
    table = "inline:{ 192.0.2.9=HOLD }"
    decision = await make_checker().check("smtpd_client_restrictions", facts(stage="connect", sender=None),
                                          ["check_client_access", table])
    assert not decision.hold
    assert any("action HOLD is always skipped" in line for line in decision.logs)


async def test_access_result_prepend():
    table = "inline:{ {user@mx.test.example=PREPEND X-Checked: by table} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table])
    assert decision.action == "dunno" and decision.prepend == ["X-Checked: by table"]
    bad = "inline:{ {user@mx.test.example=PREPEND not a header} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", bad])
    assert decision.prepend == []
    assert any("requires header: text" in line for line in decision.logs)


async def test_access_result_filter_is_ignored_with_a_warning_unless_supported():
    table = "inline:{ {user@mx.test.example=FILTER smtp:[127.0.0.1]:10025} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table])
    assert decision.filter is None and decision.action == "dunno"
    assert any(line.startswith("warning:") and "FILTER" in line for line in decision.logs)
    decision = await rcpt_list(make_checker(supports_filter=True), ["check_recipient_access", table])
    assert decision.filter == "smtp:[127.0.0.1]:10025"


@pytest.mark.parametrize("word", ["REDIRECT", "BCC"])
async def test_access_result_redirect_and_bcc_are_ignored_with_a_warning(word):
    table = f"inline:{{ {{user@mx.test.example={word} other@example.org}} }}"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "permit"])
    assert decision.action == "permit"
    assert any(line.startswith("warning:") and word in line for line in decision.logs)


async def test_access_result_warn_logs_and_continues():
    table = "inline:{ {user@mx.test.example=WARN looks odd} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table, "permit"])
    assert decision.action == "permit"
    assert ("NOQUEUE: warn: RCPT from unknown[192.0.2.9]: looks odd; from=<sender@example.org> "
            "to=<user@mx.test.example> proto=ESMTP helo=<client.example.org>") in decision.logs


async def test_access_result_restriction_list_is_evaluated():
    table = "inline:{ {user@mx.test.example=permit_mynetworks, reject} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table])
    assert decision.reply == Reply(554, "5.7.1", "<user@mx.test.example>: Recipient address rejected: Access denied")
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table], client_addr="127.0.0.1")
    assert decision.action == "permit"


async def test_access_result_restriction_class():
    checker = make_checker(smtpd_restriction_classes="trusted_only", trusted_only="permit_mynetworks, reject")
    table = "inline:{ user@mx.test.example=trusted_only }"
    decision = await rcpt_list(checker, ["check_recipient_access", table, "permit"])
    assert decision.reply == Reply(554, "5.7.1", "<user@mx.test.example>: Recipient address rejected: Access denied")
    assert (await rcpt_list(checker, ["check_recipient_access", table], client_addr="127.0.0.1")).action == "permit"


async def test_access_result_with_a_lookup_table_is_a_configuration_error():
    table = "inline:{ {user@mx.test.example=check_client_access hash:/etc/postfix/x} }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table])
    assert decision.reply == CONFIG_ERROR
    assert any("do not specify lookup tables inside SMTPD access maps" in line for line in decision.logs)


async def test_access_result_unknown_word_is_a_configuration_error():
    table = "inline:{ user@mx.test.example=MAYBE }"
    decision = await rcpt_list(make_checker(), ["check_recipient_access", table])
    assert decision.reply == CONFIG_ERROR


async def test_access_result_recursion_is_bounded():
    checker = make_checker(smtpd_restriction_classes="loop", loop="check_recipient_access inline:{ u@x=loop }")
    decision = await checker.check("smtpd_recipient_restrictions", facts(recipient="u@x"), ["loop"])
    assert decision.reply == CONFIG_ERROR


# ================================================================ restriction classes


async def test_restriction_class_in_a_list():
    checker = make_checker(smtpd_restriction_classes="local_only",
                           local_only="permit_mynetworks, reject_unauth_destination, permit",
                           smtpd_recipient_restrictions="local_only, reject")
    assert (await checker.check("smtpd_recipient_restrictions", facts())).action == "permit"
    decision = await checker.check("smtpd_recipient_restrictions", facts(recipient="a@example.com"))
    assert decision.reply == Reply(554, "5.7.1", "<a@example.com>: Relay access denied")


async def test_restriction_class_can_be_checked_by_name():
    checker = make_checker(smtpd_restriction_classes="strict", strict="reject")
    decision = await checker.check("strict", facts(stage="mail"))
    assert decision.reply.text == "<sender@example.org>: Sender address rejected: Access denied"


async def test_restriction_class_permit_ends_only_the_enclosing_list_evaluation():
    # A class's permit is the list's result, like any other restriction.
    checker = make_checker(smtpd_restriction_classes="ok_class", ok_class="permit")
    decision = await rcpt_list(checker, ["ok_class", "reject"])
    assert decision.action == "permit"


# ================================================================ relay control


BATTERY = [
    "<relaytest@example.com>",
    "<relaytest%example.com@[127.0.0.1]>",
    "<relaytest%example.com@mx.test.example>",
    '<"relaytest@example.com">',
    '<"relaytest%example.com">',
    '<"relaytest@example.com"@[127.0.0.1]>',
    "<@[127.0.0.1]:relaytest@example.com>",
    "<@mx.test.example:relaytest@example.com>",
    "<example.com!relaytest>",
    "<example.com!relaytest@[127.0.0.1]>",
    "<example.com!relaytest@mx.test.example>",
]


@pytest.mark.parametrize("arg", BATTERY)
async def test_open_relay_battery_is_denied(arg):
    address, _params = parse_rcpt_to(arg)
    recipient = str(address)  # what the session passes
    decision = await make_checker().check_rcpt(facts(recipient=recipient))
    assert decision.action == "reject"
    assert decision.reply == Reply(554, "5.7.1", f"<{recipient}>: Relay access denied")


async def test_open_relay_battery_postmaster_is_accepted():
    address, _params = parse_rcpt_to("<postmaster@mx.test.example>")
    decision = await make_checker().check_rcpt(facts(recipient=str(address)))
    assert decision.accepted and decision.reply is None


async def test_relay_denied_log_line_is_postfix_format():
    decision = await make_checker().check_rcpt(facts(recipient="a@example.com", helo="h"))
    assert decision.log == ("NOQUEUE: reject: RCPT from unknown[192.0.2.9]: 554 5.7.1 <a@example.com>: "
                            "Relay access denied; from=<sender@example.org> to=<a@example.com> proto=ESMTP helo=<h>")
    decision = await make_checker().check_rcpt(facts(recipient="a@example.com", helo=None, queue_id="4Fx3Kq1zQ2",
                                                     client_name="host.example.org"))
    assert decision.log == ("4Fx3Kq1zQ2: reject: RCPT from host.example.org[192.0.2.9]: 554 5.7.1 <a@example.com>: "
                            "Relay access denied; from=<sender@example.org> to=<a@example.com> proto=ESMTP")


async def test_relay_is_allowed_for_trusted_clients_and_listed_domains():
    checker = make_checker(relay_domains="relay.example", virtual_mailbox_domains="vmail.example",
                           virtual_alias_domains="valias.example")
    assert (await checker.check_rcpt(facts(recipient="a@example.com", client_addr="127.0.0.1"))).accepted
    assert (await checker.check_rcpt(facts(recipient="a@example.com", sasl_username="alice"))).accepted
    for rcpt in ("a@relay.example", "a@sub.relay.example", "a@vmail.example", "a@valias.example", "a@MX.test.example",
                 "a@[127.0.0.1]", "a"):
        assert (await checker.check_rcpt(facts(recipient=rcpt))).accepted, rcpt
    assert (await checker.check_rcpt(facts(recipient="a@[192.0.2.1]"))).action == "reject"


async def test_reject_unauth_destination_uses_relay_domains_reject_code():
    decision = await rcpt_list(make_checker(relay_domains_reject_code=550), ["reject_unauth_destination"],
                               recipient="a@example.com")
    assert decision.reply == Reply(550, "5.7.1", "<a@example.com>: Relay access denied")


async def test_defer_unauth_destination_is_the_4xx_variant():
    decision = await rcpt_list(make_checker(), ["defer_unauth_destination"], recipient="a@example.com")
    assert decision.reply == Reply(454, "4.7.1", "<a@example.com>: Relay access denied")
    assert (await rcpt_list(make_checker(), ["defer_unauth_destination"])).action == "dunno"


async def test_permit_auth_destination():
    checker = make_checker()
    assert (await rcpt_list(checker, ["permit_auth_destination", "reject"])).action == "permit"
    assert (await rcpt_list(checker, ["permit_auth_destination", "reject"], recipient="a@example.com")).action \
        == "reject"
    assert (await rcpt_list(checker, ["permit_auth_destination", "reject"],
                            recipient="a%example.com@mx.test.example")).action == "reject"


async def test_bare_postmaster_is_accepted_before_any_restriction():
    checker = make_checker(smtpd_client_restrictions="reject")
    assert (await checker.check_rcpt(facts(recipient="Postmaster"))).action == "permit"
    assert (await checker.check_rcpt(facts(recipient="postmaster@mx.test.example"))).action == "reject"


# ================================================================ unlisted recipients / senders


def known_users(*users):
    calls: list[str] = []

    async def recipient_known(address: str):
        calls.append(address)
        if "@" in address and address.split("@", 1)[1] in ("example.com", "example.org"):
            return None
        return address.split("@", 1)[0] in users

    recipient_known.calls = calls
    return recipient_known


async def test_unlisted_recipient_in_local_domain_is_rejected():
    checker = make_checker(recipient_known=known_users("user"))
    decision = await checker.check_rcpt(facts(recipient="nobody@mx.test.example"))
    assert decision.reply == Reply(550, "5.1.1", "<nobody@mx.test.example>: Recipient address rejected: "
                                                 "User unknown in local recipient table")
    assert (await checker.check_rcpt(facts())).accepted


@pytest.mark.parametrize("domain_params,domain,table,code_param", [
    ({"virtual_mailbox_domains": "vmail.example"}, "vmail.example", "virtual mailbox table",
     "unknown_virtual_mailbox_reject_code"),
    ({"virtual_alias_domains": "valias.example"}, "valias.example", "virtual alias table",
     "unknown_virtual_alias_reject_code"),
    ({"relay_domains": "relay.example"}, "relay.example", "relay recipient table",
     "unknown_relay_recipient_reject_code"),
    ({}, HOST, "local recipient table", "unknown_local_recipient_reject_code"),
])
async def test_unlisted_recipient_table_name_and_code_per_address_class(domain_params, domain, table, code_param):
    checker = make_checker(recipient_known=known_users(), **domain_params, **{code_param: 551})
    decision = await checker.check_rcpt(facts(recipient=f"nobody@{domain}"))
    assert decision.reply == Reply(551, "5.1.1", f"<nobody@{domain}>: Recipient address rejected: User unknown in {table}")


async def test_unlisted_recipient_not_applicable_or_disabled_is_accepted():
    checker = make_checker(recipient_known=known_users(), mynetworks="192.0.2.0/24")
    assert (await checker.check_rcpt(facts(recipient="nobody@example.com"))).accepted  # None: not applicable
    checker = make_checker(recipient_known=known_users(), smtpd_reject_unlisted_recipient=False)
    assert (await checker.check_rcpt(facts(recipient="nobody@mx.test.example"))).accepted


async def test_unlisted_recipient_is_checked_once_and_after_relay_control():
    known = known_users()
    checker = make_checker(recipient_known=known, smtpd_recipient_restrictions="reject_unlisted_recipient")
    decision = await checker.check_rcpt(facts(recipient="nobody@mx.test.example"))
    assert decision.action == "reject"
    assert known.calls == ["nobody@mx.test.example"]  # the implicit check is not repeated
    known.calls.clear()
    decision = await checker.check_rcpt(facts(recipient="nobody@example.net"))
    assert decision.reply.text == "<nobody@example.net>: Relay access denied"
    assert known.calls == []


async def test_unlisted_sender():
    checker = make_checker(recipient_known=known_users("user"), smtpd_reject_unlisted_sender=True)
    decision = await checker.check_rcpt(facts(sender="ghost@mx.test.example"))
    assert decision.reply == Reply(550, "5.1.0", "<ghost@mx.test.example>: Sender address rejected: "
                                                 "User unknown in local recipient table")
    assert (await checker.check_rcpt(facts(sender="user@mx.test.example"))).accepted
    assert (await checker.check_rcpt(facts(sender=""))).accepted
    decision = await checker.check_mail(facts(stage="mail", recipient=None, sender="ghost@mx.test.example"))
    assert decision.reply.code == 550


async def test_reject_unlisted_sender_restriction():
    checker = make_checker(recipient_known=known_users())
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="ghost@mx.test.example"),
                                   ["reject_unlisted_sender"])
    assert decision.reply.text == "<ghost@mx.test.example>: Sender address rejected: User unknown in local recipient table"


# ================================================================ HELO syntax and DNS


@pytest.mark.parametrize("helo,reply", [
    ("bad_-name-", Reply(501, "5.5.2", "<bad_-name->: Helo command rejected: Invalid name")),
    ("a..b", Reply(501, "5.5.2", "<a..b>: Helo command rejected: Invalid name")),
    ("[300.1.2.3]", Reply(501, "5.5.2", "<[300.1.2.3]>: Helo command rejected: invalid ip address")),
    ("[192.0.2.9]", None),
    ("[IPv6:2001:db8::9]", None),
    ("192.0.2.9", None),
    ("localhost", None),
    ("client.example.org.", None),
])
async def test_reject_invalid_helo_hostname(helo, reply):
    decision = await make_checker().check("smtpd_helo_restrictions", facts(helo=helo),
                                          ["reject_invalid_helo_hostname"])
    assert decision.reply == reply


@pytest.mark.parametrize("helo,reply", [
    ("localhost", Reply(504, "5.5.2", "<localhost>: Helo command rejected: need fully-qualified hostname")),
    ("192.0.2.9", Reply(504, "5.5.2", "<192.0.2.9>: Helo command rejected: need fully-qualified hostname")),
    ("[192.0.2.9]", None),
    ("client.example.org", None),
])
async def test_reject_non_fqdn_helo_hostname(helo, reply):
    decision = await make_checker().check("smtpd_helo_restrictions", facts(helo=helo),
                                          ["reject_non_fqdn_helo_hostname"])
    assert decision.reply == reply


async def test_helo_restrictions_are_skipped_without_helo():
    checker = make_checker(smtpd_helo_restrictions="reject")
    assert (await checker.check("smtpd_helo_restrictions", facts(helo=None))).action == "dunno"
    assert (await checker.check_rcpt(facts(helo=None))).accepted


async def test_reject_unknown_helo_hostname(resolver):
    checker = make_checker(dns=resolver)
    decision = await checker.check("smtpd_helo_restrictions", facts(helo="nowhere.test.example"),
                                   ["reject_unknown_helo_hostname"])
    assert decision.reply == Reply(450, "4.7.1", "<nowhere.test.example>: Helo command rejected: Host not found")
    for helo in ("good-helo.test.example", "mx-only.test.example", "v6-only.test.example", "nullmx.example",
                 "[192.0.2.9]"):
        decision = await checker.check("smtpd_helo_restrictions", facts(helo=helo), ["reject_unknown_helo_hostname"])
        assert decision.action == "dunno", helo
    decision = await make_checker(dns=resolver, unknown_hostname_reject_code=550).check(
        "smtpd_helo_restrictions", facts(helo="nowhere.test.example"), ["reject_unknown_helo_hostname"])
    assert decision.reply == Reply(550, "5.7.1", "<nowhere.test.example>: Helo command rejected: Host not found")


async def test_unknown_helo_hostname_dns_timeout_defers_if_permit(resolver):
    checker = make_checker(dns=resolver, smtpd_helo_restrictions="reject_unknown_helo_hostname")
    decision = await checker.check_rcpt(facts(helo="slow-helo.test.example"))
    assert decision.reply == Reply(450, "4.7.1", "<slow-helo.test.example>: Helo command rejected: Host not found")
    # A later reject still rejects (the DNS problem did not cause it).
    decision = await checker.check_rcpt(facts(helo="slow-helo.test.example", recipient="a@example.com"))
    assert decision.reply == Reply(554, "5.7.1", "<a@example.com>: Relay access denied")
    # With smtpd_delay_reject = no the helo stage hands the flag to the next stage.
    checker = make_checker(dns=resolver, smtpd_helo_restrictions="reject_unknown_helo_hostname",
                           smtpd_delay_reject=False)
    helo = await checker.check_helo(facts(stage="helo", helo="slow-helo.test.example", sender=None, recipient=None))
    assert helo.accepted and helo.defer_if_permit is not None
    decision = await checker.check_rcpt(facts(helo="slow-helo.test.example", defer_if_permit=helo.defer_if_permit))
    assert decision.reply == Reply(450, "4.7.1", "<slow-helo.test.example>: Helo command rejected: Host not found")


async def test_unknown_helo_hostname_tempfail_action_defer(resolver):
    checker = make_checker(dns=resolver, unknown_helo_hostname_tempfail_action="defer")
    decision = await checker.check("smtpd_helo_restrictions", facts(helo="slow-helo.test.example"),
                                   ["reject_unknown_helo_hostname", "permit"])
    assert decision.reply == Reply(450, "4.7.1", "<slow-helo.test.example>: Helo command rejected: Host not found")


# ================================================================ sender / recipient address checks


async def test_reject_non_fqdn_sender_and_recipient():
    checker = make_checker()
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="user@localhost"),
                                   ["reject_non_fqdn_sender"])
    assert decision.reply == Reply(504, "5.5.2", "<user@localhost>: Sender address rejected: need fully-qualified address")
    decision = await rcpt_list(checker, ["reject_non_fqdn_recipient"], recipient="user")
    assert decision.reply == Reply(504, "5.5.2", "<user>: Recipient address rejected: need fully-qualified address")
    assert (await rcpt_list(checker, ["reject_non_fqdn_recipient"], recipient="user@[192.0.2.1]")).action == "dunno"
    assert (await checker.check("smtpd_sender_restrictions", facts(sender=""), ["reject_non_fqdn_sender"])).action \
        == "dunno"


async def test_reject_unknown_sender_domain_nxdomain(resolver):
    checker = make_checker(dns=resolver)
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="a@nxdomain.example"),
                                   ["reject_unknown_sender_domain"])
    assert decision.reply == Reply(450, "4.1.8", "<a@nxdomain.example>: Sender address rejected: Domain not found")
    decision = await make_checker(dns=resolver, unknown_address_reject_code=550).check(
        "smtpd_sender_restrictions", facts(sender="a@nxdomain.example"), ["reject_unknown_sender_domain"])
    assert decision.reply == Reply(550, "5.1.8", "<a@nxdomain.example>: Sender address rejected: Domain not found")


async def test_reject_unknown_sender_domain_accepts_domains_with_mx_or_address(resolver):
    checker = make_checker(dns=resolver)
    for sender in ("a@known.example", "a@mxdomain.example", "a@v6.example", "a@[192.0.2.1]", ""):
        decision = await checker.check("smtpd_sender_restrictions", facts(sender=sender),
                                       ["reject_unknown_sender_domain"])
        assert decision.action == "dunno", sender


async def test_reject_unknown_sender_domain_skips_our_own_domains(resolver, dnsserver):
    checker = make_checker(dns=resolver)
    decision = await checker.check("smtpd_sender_restrictions", facts(sender=f"a@{HOST}"),
                                   ["reject_unknown_sender_domain"])
    assert decision.action == "dunno"
    assert not any(name == HOST for name, _type in dnsserver.queries)


async def test_reject_unknown_domain_null_mx(resolver):
    checker = make_checker(dns=resolver)
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="a@nullmx.example"),
                                   ["reject_unknown_sender_domain"])
    assert decision.reply == Reply(550, "5.7.27", "<a@nullmx.example>: Sender address rejected: "
                                                  "Domain nullmx.example does not accept mail (nullMX)")
    decision = await rcpt_list(checker, ["reject_unknown_recipient_domain"], recipient="a@nullmx.example")
    assert decision.reply == Reply(556, "5.1.10", "<a@nullmx.example>: Recipient address rejected: "
                                                  "Domain nullmx.example does not accept mail (nullMX)")


async def test_reject_unknown_recipient_domain(resolver):
    checker = make_checker(dns=resolver)
    decision = await rcpt_list(checker, ["reject_unknown_recipient_domain"], recipient="a@nxdomain.example")
    assert decision.reply == Reply(450, "4.1.2", "<a@nxdomain.example>: Recipient address rejected: Domain not found")
    assert (await rcpt_list(checker, ["reject_unknown_recipient_domain"])).action == "dunno"


async def test_unknown_sender_domain_tempfail_defers_never_rejects(resolver):
    checker = make_checker(dns=resolver, smtpd_sender_restrictions="reject_unknown_sender_domain")
    decision = await checker.check_rcpt(facts(sender="a@broken.example"))
    assert decision.action == "defer"
    assert decision.reply == Reply(450, "4.1.8", "<a@broken.example>: Sender address rejected: Domain not found")
    checker = make_checker(dns=resolver, unknown_address_tempfail_action="defer")
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="a@broken.example"),
                                   ["reject_unknown_sender_domain", "permit"])
    assert decision.reply.code == 450


async def test_dns_checks_without_a_resolver_fail_temporarily():
    checker = make_checker(smtpd_sender_restrictions="reject_unknown_sender_domain")
    decision = await checker.check_rcpt(facts(sender="a@known.example"))
    assert decision.reply == Reply(450, "4.1.8", "<a@known.example>: Sender address rejected: Domain not found")


# ================================================================ DNS block lists


async def test_rbl_hit_with_txt(resolver):
    decision = await make_checker(dns=resolver).check("smtpd_client_restrictions", facts(),
                                                      ["reject_rbl_client", "rbl.test"])
    assert decision.reply == Reply(554, "5.7.1", "Service unavailable; Client host [192.0.2.9] blocked using rbl.test; "
                                                 "Listed, see http://rbl.test/q?192.0.2.9")


async def test_rbl_hit_without_txt_and_with_maps_rbl_reject_code(resolver):
    decision = await make_checker(dns=resolver, maps_rbl_reject_code=550).check(
        "smtpd_client_restrictions", facts(client_addr="192.0.2.10"), ["reject_rbl_client", "rbl.test"])
    assert decision.reply == Reply(550, "5.7.1", "Service unavailable; Client host [192.0.2.10] blocked using rbl.test")


async def test_rbl_multiple_txt_records_are_joined(resolver):
    decision = await make_checker(dns=resolver).check(
        "smtpd_client_restrictions", facts(client_addr="192.0.2.20"), ["reject_rbl_client", "rbl.test"])
    assert decision.reply.text in (
        "Service unavailable; Client host [192.0.2.20] blocked using rbl.test; first / second",
        "Service unavailable; Client host [192.0.2.20] blocked using rbl.test; second / first")


async def test_rbl_txt_cannot_inject_control_characters(resolver):
    decision = await make_checker(dns=resolver).check(
        "smtpd_client_restrictions", facts(client_addr="192.0.2.21"), ["reject_rbl_client", "rbl.test"])
    assert decision.reply.text == "Service unavailable; Client host [192.0.2.21] blocked using rbl.test; evil__text"
    assert len(decision.reply.lines()) == 1


async def test_rbl_reply_filter(resolver):
    checker = make_checker(dns=resolver)
    decision = await checker.check("smtpd_client_restrictions", facts(), ["reject_rbl_client", "rbl.test=127.0.0.2"])
    assert decision.reply.text.startswith("Service unavailable; Client host [192.0.2.9] blocked using rbl.test;")
    decision = await checker.check("smtpd_client_restrictions", facts(client_addr="192.0.2.10"),
                                   ["reject_rbl_client", "rbl.test=127.0.0.2"])
    assert decision.action == "dunno"
    decision = await checker.check("smtpd_client_restrictions", facts(client_addr="192.0.2.10"),
                                   ["reject_rbl_client", "rbl.test=127.0.0.[2..11]"])
    assert decision.reply.text == "Service unavailable; Client host [192.0.2.10] blocked using rbl.test"
    decision = await checker.check("smtpd_client_restrictions", facts(client_addr="192.0.2.10"),
                                   ["reject_rbl_client", "rbl.test=127.0.0.[2;3;4]"])
    assert decision.action == "dunno"


async def test_rbl_bad_reply_filter_is_a_configuration_error(resolver):
    decision = await make_checker(dns=resolver).check("smtpd_client_restrictions", facts(),
                                                      ["reject_rbl_client", "rbl.test=127.0.0.[x]"])
    assert decision.reply == CONFIG_ERROR


async def test_rbl_not_listed(resolver):
    decision = await make_checker(dns=resolver).check("smtpd_client_restrictions", facts(client_addr="192.0.2.99"),
                                                      ["reject_rbl_client", "rbl.test"])
    assert decision.action == "dunno"


async def test_rbl_ipv6_client_uses_nibbles(resolver, dnsserver):
    decision = await make_checker(dns=resolver).check("smtpd_client_restrictions", facts(client_addr="2001:db8::1"),
                                                      ["reject_rbl_client", "rbl.test"])
    assert decision.reply.text == "Service unavailable; Client host [2001:db8::1] blocked using rbl.test"
    assert ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.rbl.test", "A") in dnsserver.queries


async def test_rbl_timeout_defers_and_never_rejects(resolver):
    checker = make_checker(dns=resolver, smtpd_client_restrictions="reject_rbl_client rbl.test")
    decision = await checker.check_rcpt(facts(client_addr="192.0.2.11"))
    assert decision.action == "defer"
    assert decision.reply == Reply(450, "4.7.1", "<192.0.2.11>: Client host rejected: Service unavailable")
    assert any(line.startswith("warning: 11.2.0.192.rbl.test: RBL lookup error") for line in decision.logs)


async def test_rhsbl_sender(resolver):
    checker = make_checker(dns=resolver)
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="spammer@spam.example"),
                                   ["reject_rhsbl_sender", "rhsbl.test"])
    assert decision.reply == Reply(554, "5.7.1", "Service unavailable; Sender address [spammer@spam.example] "
                                                 "blocked using rhsbl.test; spam domain")
    assert (await checker.check("smtpd_sender_restrictions", facts(), ["reject_rhsbl_sender", "rhsbl.test"])).action \
        == "dunno"
    # A DNS list failure in a sender list raises defer_if_permit for later...
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="a@slow.example"),
                                   ["reject_rhsbl_sender", "rhsbl.test", "permit"])
    assert decision.action == "permit"
    assert decision.defer_if_permit == Reply(450, "4.7.1", "<a@slow.example>: Sender address rejected: "
                                                           "Service unavailable")
    # ... which defers the recipient at RCPT time.
    checker = make_checker(dns=resolver, smtpd_sender_restrictions="reject_rhsbl_sender rhsbl.test")
    decision = await checker.check_rcpt(facts(sender="a@slow.example"))
    assert decision.reply == Reply(450, "4.7.1", "<a@slow.example>: Sender address rejected: Service unavailable")


async def test_rhsbl_client_and_helo(resolver):
    checker = make_checker(dns=resolver)
    decision = await checker.check("smtpd_client_restrictions", facts(client_name="spam.example"),
                                   ["reject_rhsbl_client", "rhsbl.test"])
    assert decision.reply.text == ("Service unavailable; Client host [spam.example] blocked using rhsbl.test; "
                                   "spam domain")
    assert (await checker.check("smtpd_client_restrictions", facts(), ["reject_rhsbl_client", "rhsbl.test"])).action \
        == "dunno"
    decision = await checker.check("smtpd_helo_restrictions", facts(helo="spam.example"),
                                   ["reject_rhsbl_helo", "rhsbl.test"])
    assert decision.reply.text == ("Service unavailable; Helo command [spam.example] blocked using rhsbl.test; "
                                   "spam domain")


async def test_permit_dnswl_client(resolver):
    checker = make_checker(dns=resolver)
    decision = await rcpt_list(checker, ["permit_dnswl_client", "rbl.test", "reject"])
    assert decision.action == "permit"
    # Never allowlists an unauthorized destination.
    decision = await rcpt_list(checker, ["permit_dnswl_client", "rbl.test", "reject"], recipient="a@example.com")
    assert decision.action == "reject"


# ================================================================ SASL sender ownership


LOGIN_MAPS = "inline:{ alice@example.org=alice, bob@example.org=bob, {@shared.example=alice bob} }"


@pytest.mark.parametrize("user,sender,reply", [
    ("alice", "alice@example.org", None),
    ("ALICE", "alice@example.org", None),
    ("alice", "bob@example.org", Reply(553, "5.7.1", "<bob@example.org>: Sender address rejected: not owned by user alice")),
    ("bob", "anyone@shared.example", None),
    ("alice", "unowned@example.org",
     Reply(553, "5.7.1", "<unowned@example.org>: Sender address rejected: not owned by user alice")),
    (None, "alice@example.org", Reply(553, "5.7.1", "<alice@example.org>: Sender address rejected: not logged in")),
    (None, "unowned@example.org", None),
    ("alice", "", None),
])
async def test_reject_sender_login_mismatch(user, sender, reply):
    checker = make_checker(smtpd_sender_login_maps=LOGIN_MAPS)
    decision = await checker.check("smtpd_sender_restrictions", facts(sender=sender, sasl_username=user),
                                   ["reject_sender_login_mismatch"])
    assert decision.reply == reply


async def test_reject_known_sender_login_mismatch_ignores_unowned_addresses():
    checker = make_checker(smtpd_sender_login_maps=LOGIN_MAPS)
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="unowned@example.org",
                                                                      sasl_username="alice"),
                                   ["reject_known_sender_login_mismatch"])
    assert decision.action == "dunno"
    decision = await checker.check("smtpd_sender_restrictions", facts(sender="bob@example.org", sasl_username="alice"),
                                   ["reject_known_sender_login_mismatch"])
    assert decision.reply.code == 553


async def test_sender_login_owner_callback_replaces_the_maps():
    async def owner(sender: str):
        return ["carol"] if sender.endswith("@example.org") else None

    checker = make_checker(sender_login_owner=owner)
    decision = await checker.check("smtpd_sender_restrictions", facts(sasl_username="dave"),
                                   ["reject_authenticated_sender_login_mismatch"])
    assert decision.reply == Reply(553, "5.7.1", "<sender@example.org>: Sender address rejected: not owned by user dave")
    decision = await checker.check("smtpd_sender_restrictions", facts(sasl_username="carol"),
                                   ["reject_authenticated_sender_login_mismatch"])
    assert decision.action == "dunno"


# ================================================================ policy delegation


class PolicyServer:
    """A policy server on loopback that records requests and answers ``action``."""

    def __init__(self, action: str | None = "DUNNO", *, hang: bool = False):
        self.action = action
        self.hang = hang
        self.requests: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            attrs: dict[str, str] = {}
            while True:
                line = (await reader.readline()).decode().rstrip("\n")
                if not line:
                    break
                key, _, value = line.partition("=")
                attrs[key] = value
            self.requests.append(attrs)
            if self.hang:
                await self.release.wait()
            elif self.action is not None:
                writer.write(f"action={self.action}\n\n".encode())
            else:
                writer.write(b"foo=bar\n\n")
            await writer.drain()
        finally:
            writer.close()

    async def start_inet(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"inet:127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start_unix(self, path: str) -> str:
        self.server = await asyncio.start_unix_server(self.handle, path)
        return f"unix:{path}"

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await asyncio.sleep(0)


async def test_check_policy_service_inet_sends_postfix_attributes_and_applies_the_action():
    policy = PolicyServer("REJECT go away")
    endpoint = await policy.start_inet()
    try:
        checker = make_checker(smtpd_recipient_restrictions=f"check_policy_service {endpoint}")
        decision = await checker.check_rcpt(facts(client_name="host.example.org", reverse_client_name="host.example.org",
                                                  queue_id="ABC123", sasl_username="alice", sasl_method="PLAIN",
                                                  instance="1.2.3"))
    finally:
        await policy.stop()
    assert decision.reply == Reply(554, "5.7.1", "<user@mx.test.example>: Recipient address rejected: go away")
    request = policy.requests[0]
    assert request["request"] == "smtpd_access_policy"
    assert request["protocol_state"] == "RCPT"
    assert request["protocol_name"] == "ESMTP"
    assert request["client_address"] == CLIENT_IP
    assert request["client_name"] == "host.example.org"
    assert request["reverse_client_name"] == "host.example.org"
    assert request["helo_name"] == HELO_NAME
    assert request["sender"] == SENDER
    assert request["recipient"] == RCPT
    assert request["recipient_count"] == "0"
    assert request["queue_id"] == "ABC123"
    assert request["instance"] == "1.2.3"
    assert request["sasl_username"] == "alice"
    assert request["sasl_method"] == "PLAIN"


async def test_check_policy_service_dunno_continues(tmp_path):
    policy = PolicyServer("DUNNO")
    path = os.path.join(tmp_path, "p.sock")
    endpoint = await policy.start_unix(path)
    try:
        checker = make_checker()
        decision = await rcpt_list(checker, ["check_policy_service", endpoint, "permit"])
    finally:
        await policy.stop()
    assert decision.action == "permit"
    assert len(policy.requests) == 1


async def test_check_policy_service_relative_unix_path_is_under_queue_directory(tmp_path):
    os.mkdir(os.path.join(tmp_path, "private"))
    policy = PolicyServer("REJECT 5.7.0 local policy")
    await policy.start_unix(os.path.join(tmp_path, "private", "policy"))
    try:
        checker = make_checker(queue_directory=str(tmp_path))
        decision = await rcpt_list(checker, ["check_policy_service", "unix:private/policy"])
    finally:
        await policy.stop()
    assert decision.reply == Reply(554, "5.7.0", "<user@mx.test.example>: Recipient address rejected: local policy")


async def test_check_policy_service_timeout_defers_with_the_default_action():
    policy = PolicyServer(hang=True)
    endpoint = await policy.start_inet()
    try:
        checker = make_checker(smtpd_policy_service_timeout="0.3s")
        decision = await rcpt_list(checker, ["check_policy_service", endpoint, "permit"])
    finally:
        await policy.stop()
    assert decision.reply == Reply(451, "4.3.5", "<user@mx.test.example>: Recipient address rejected: "
                                                 "Server configuration problem")
    assert any("timeout talking to server" in line for line in decision.logs)


async def test_check_policy_service_unreachable_or_bad_reply_uses_the_default_action():
    policy = PolicyServer(None)  # answers without an action attribute
    endpoint = await policy.start_inet()
    try:
        decision = await rcpt_list(make_checker(), ["check_policy_service", endpoint])
    finally:
        await policy.stop()
    assert decision.reply.code == 451 and decision.reply.enhanced == "4.3.5"
    decision = await rcpt_list(make_checker(), ["check_policy_service", endpoint])  # now closed
    assert decision.reply.code == 451


async def test_check_policy_service_per_service_default_action():
    policy = PolicyServer(hang=True)
    endpoint = await policy.start_inet()
    try:
        decision = await rcpt_list(make_checker(), [
            "check_policy_service", f"{{ {endpoint}, timeout=0.2s, default_action=DUNNO }}", "permit"])
    finally:
        await policy.stop()
    assert decision.action == "permit"


async def test_check_python_policy_hook():
    seen: list[Facts] = []

    async def greylist(f: Facts) -> str:
        seen.append(f)
        return "DEFER_IF_PERMIT 4.7.1 Greylisted, try again"

    checker = make_checker(policy_hooks={"greylist": greylist})
    decision = await rcpt_list(checker, ["check_python_policy", "greylist", "permit"])
    assert decision.reply == Reply(450, "4.7.1", "<user@mx.test.example>: Recipient address rejected: "
                                                 "Greylisted, try again")
    assert seen[0].recipient == RCPT


async def test_check_python_policy_hook_failure_is_temporary():
    async def broken(f: Facts) -> str:
        raise RuntimeError("bug in the hook")

    checker = make_checker(policy_hooks={"broken": broken})
    decision = await rcpt_list(checker, ["check_python_policy", "broken", "permit"])
    assert decision.reply == Reply(451, "4.3.5", "<user@mx.test.example>: Recipient address rejected: "
                                                 "Server configuration problem")
    assert any("bug in the hook" in line for line in decision.logs)


async def test_check_python_policy_unknown_hook_is_a_configuration_error():
    checker = make_checker(smtpd_recipient_restrictions="check_python_policy nosuch, reject_unauth_destination")
    decision = await checker.check_rcpt(facts())
    assert decision.reply == CONFIG_ERROR
    assert any("nosuch" in p for p in checker.configuration_problems())


# ================================================================ RCPT-time orchestration


async def test_check_rcpt_permit_only_ends_its_own_list():
    checker = make_checker(smtpd_client_restrictions="permit", smtpd_helo_restrictions="permit",
                           smtpd_sender_restrictions="permit")
    decision = await checker.check_rcpt(facts(recipient="relaytest@example.com"))
    assert decision.reply == Reply(554, "5.7.1", "<relaytest@example.com>: Relay access denied")


async def test_check_rcpt_relay_permit_does_not_skip_recipient_restrictions():
    checker = make_checker(smtpd_recipient_restrictions="reject")
    decision = await checker.check_rcpt(facts(client_addr="127.0.0.1"))
    assert decision.reply == Reply(554, "5.7.1", "<user@mx.test.example>: Recipient address rejected: Access denied")


async def test_check_rcpt_first_reject_wins():
    checker = make_checker(smtpd_client_restrictions="check_client_access inline:{ 192.0.2.9=REJECT client }",
                           smtpd_sender_restrictions="reject")
    decision = await checker.check_rcpt(facts(recipient="relaytest@example.com"))
    assert decision.reply == Reply(554, "5.7.1", "<unknown[192.0.2.9]>: Client host rejected: client")
    assert decision.log.startswith("NOQUEUE: reject: RCPT from unknown[192.0.2.9]: 554 5.7.1 <unknown[192.0.2.9]>: "
                                   "Client host rejected: client; from=<sender@example.org> "
                                   "to=<relaytest@example.com>")


async def test_check_rcpt_side_effects_accumulate():
    checker = make_checker(
        smtpd_client_restrictions="check_client_access inline:{ 192.0.2.9=HOLD }",
        smtpd_sender_restrictions="check_sender_access inline:{ {example.org=PREPEND X-Sender-Checked: yes} }",
        smtpd_recipient_restrictions="check_recipient_access inline:{ {mx.test.example=PREPEND X-Rcpt: yes} }")
    decision = await checker.check_rcpt(facts())
    assert decision.accepted
    assert decision.hold
    assert decision.prepend == ["X-Sender-Checked: yes", "X-Rcpt: yes"]


async def test_check_rcpt_discard_skips_remaining_checks():
    known = known_users()
    checker = make_checker(smtpd_client_restrictions="check_client_access inline:{ 192.0.2.9=DISCARD }",
                           recipient_known=known)
    decision = await checker.check_rcpt(facts(recipient="nobody@example.com"))
    assert decision.accepted and decision.discard
    assert known.calls == []
    # A later recipient of a discarded transaction skips the checks too.
    decision = await make_checker(recipient_known=known).check_rcpt(facts(recipient="x@example.com", discard=True))
    assert decision.accepted


async def test_check_rcpt_without_delay_reject_leaves_client_helo_sender_to_the_caller():
    checker = make_checker(smtpd_delay_reject=False, smtpd_client_restrictions="reject")
    assert (await checker.check_rcpt(facts())).accepted
    decision = await checker.check_client(facts(stage="connect", helo=None, sender=None, recipient=None))
    assert decision.reply == Reply(554, "5.7.1", "<unknown[192.0.2.9]>: Client host rejected: Access denied")
    assert decision.log == ("NOQUEUE: reject: CONNECT from unknown[192.0.2.9]: 554 5.7.1 <unknown[192.0.2.9]>: "
                            "Client host rejected: Access denied; proto=ESMTP")


async def test_check_rcpt_uses_parameters_when_no_list_is_given():
    checker = make_checker(smtpd_recipient_restrictions="check_recipient_access inline:{ user@mx.test.example=REJECT }")
    decision = await checker.check("smtpd_recipient_restrictions", facts())
    assert decision.action == "reject"
    with pytest.raises(ValueError):
        await checker.check("no_such_list", facts())


async def test_reject_multi_recipient_bounce():
    checker = make_checker(smtpd_data_restrictions="reject_multi_recipient_bounce")
    decision = await checker.check_data(facts(stage="data", sender="", rcpt_count=2))
    assert decision.reply == Reply(550, "5.5.3", "<DATA>: Data command rejected: Multi-recipient bounce")
    assert " to=<" not in decision.log  # several recipients: none is named
    assert (await checker.check_data(facts(stage="data", sender="", rcpt_count=1))).accepted
    assert (await checker.check_data(facts(stage="data", rcpt_count=2))).accepted


async def test_end_of_data_restrictions():
    checker = make_checker(smtpd_end_of_data_restrictions="check_sender_access inline:{ example.org=REJECT no }")
    decision = await checker.check_eod(facts(stage="end-of-data", rcpt_count=1))
    assert decision.reply == Reply(554, "5.7.1", "<sender@example.org>: Sender address rejected: no")
    assert decision.log.startswith("NOQUEUE: reject: END-OF-MESSAGE from unknown[192.0.2.9]:")


# ================================================================ configuration problems


async def test_configuration_problems_are_reported():
    checker = make_checker(
        smtpd_relay_restrictions="permit_mynetworks",
        smtpd_recipient_restrictions="permit_sasl_authenticated, no_such_restriction, check_sender_access",
        smtpd_restriction_classes="empty_class",
    )
    problems = checker.configuration_problems()
    assert any('unknown smtpd restriction: "no_such_restriction"' in p for p in problems)
    assert any("check_sender_access needs an argument" in p for p in problems)
    assert any("restriction class `empty_class' needs a definition" in p for p in problems)
    assert any("specify at least one working instance of: reject_unauth_destination" in p for p in problems)


async def test_default_configuration_has_no_problems():
    assert make_checker().configuration_problems() == []
