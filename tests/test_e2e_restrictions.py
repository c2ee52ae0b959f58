"""Restriction lists on the real server, through real SMTP sessions: the
open-relay battery, access maps, restriction classes, HELO/sender checks,
DNS blocklists against the loopback test DNS server, HOLD/DISCARD/PREPEND."""

from __future__ import annotations

import asyncio

import pytest

from dnsserver import TestDNSServer
from harness import ServerProcess, maildir_messages, smtp_dialog, wait_until

OUTSIDE = "127.0.0.2"  # mynetworks is 127.0.0.1/32 in the harness: this client is untrusted


def session(srv: ServerProcess, rcpts: list[bytes], *, sender: bytes = b"<a@example.org>", helo: bytes = b"client.example",
            source: str | None = OUTSIDE, data: bytes | None = None) -> list[str]:
    script = [b"EHLO " + helo + b"\r\n", b"MAIL FROM:" + sender + b"\r\n"]
    script += [b"RCPT TO:" + r + b"\r\n" for r in rcpts]
    if data is not None:
        script += [b"DATA\r\n", data]
    script.append(b"QUIT\r\n")
    return smtp_dialog(srv.host, srv.port, script, source=source)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("restrictions")
    (root / "client_access").write_text("127.0.0.3 REJECT go away\n")
    (root / "sender_access").write_text("spammer@bad.example REJECT\n"
                                        "bad.example 450 4.7.9 try later\n"
                                        "held@example.org HOLD\n"
                                        "drop@example.org DISCARD\n"
                                        "tagged@example.org PREPEND X-Tag: yes\n"
                                        "strict@example.org strict_class\n")
    (root / "recipient_access").write_text("blocked@virt.test REJECT no mail for you\n")
    srv = ServerProcess(root, {
        "smtpd_restriction_classes": ["strict_class"],
        "strict_class": ["reject_non_fqdn_helo_hostname"],
        "smtpd_client_restrictions": [f"check_client_access texthash:{root / 'client_access'}"],
        "smtpd_helo_restrictions": ["reject_invalid_helo_hostname"],
        "smtpd_sender_restrictions": [f"check_sender_access texthash:{root / 'sender_access'}",
                                      "reject_non_fqdn_sender"],
        "smtpd_recipient_restrictions": [f"check_recipient_access texthash:{root / 'recipient_access'}",
                                         "reject_non_fqdn_recipient"],
        "smtpd_error_sleep_time": "0s",
    }).start()
    yield srv
    srv.stop()


RELAY_BATTERY = [
    "relaytest@example.com",
    "relaytest%example.com@[127.0.0.1]",
    "relaytest%example.com@mx.test.example",
    '"relaytest@example.com"',
    '"relaytest%example.com"',
    '"relaytest@example.com"@[127.0.0.1]',
    "@[127.0.0.1]:relaytest@example.com",
    "@mx.test.example:relaytest@example.com",
    "example.com!relaytest",
    "example.com!relaytest@[127.0.0.1]",
    "example.com!relaytest@mx.test.example",
]


@pytest.mark.parametrize("rcpt", RELAY_BATTERY)
def test_open_relay_battery_is_refused_while_a_local_recipient_is_accepted(server, rcpt):
    before = server.queue_files()
    replies = session(server, [f"<{rcpt}>".encode(), b"<box@virt.test>"])
    assert replies[3].startswith("554 5.7.1 <") and replies[3].endswith(">: Relay access denied"), replies[3]
    assert replies[4] == "250 2.1.5 Ok"
    assert server.queue_files() == before


def test_address_with_two_at_signs_is_a_syntax_error(server):
    replies = session(server, [b"<relaytest@example.com@[127.0.0.1]>"])
    assert replies[3] == "501 5.1.3 Bad recipient address syntax"


def test_check_client_access_rejects_with_the_table_text(server):
    replies = session(server, [b"<box@virt.test>"], source="127.0.0.3")
    assert replies[3] == "554 5.7.1 <localhost[127.0.0.3]>: Client host rejected: go away"
    server.wait_for_log(r"NOQUEUE: reject: RCPT from localhost\[127\.0\.0\.3\]: 554 5\.7\.1 .*Client host rejected: go away")


def test_check_sender_access_reject_and_4xx(server):
    replies = session(server, [b"<box@virt.test>"], sender=b"<spammer@bad.example>")
    assert replies[3] == "554 5.7.1 <spammer@bad.example>: Sender address rejected: Access denied"
    replies = session(server, [b"<box@virt.test>"], sender=b"<other@bad.example>")
    assert replies[3] == "450 4.7.9 <other@bad.example>: Sender address rejected: try later"


def test_check_recipient_access(server):
    replies = session(server, [b"<blocked@virt.test>", b"<box@virt.test>"])
    assert replies[3] == "554 5.7.1 <blocked@virt.test>: Recipient address rejected: no mail for you"
    assert replies[4] == "250 2.1.5 Ok"


def test_invalid_helo_and_non_fqdn_sender(server):
    replies = session(server, [b"<box@virt.test>"], helo=b"bad_helo!")
    assert replies[3] == "501 5.5.2 <bad_helo!>: Helo command rejected: Invalid name"
    replies = session(server, [b"<box@virt.test>"], sender=b"<user@localdomainonly>")
    assert replies[3] == "504 5.5.2 <user@localdomainonly>: Sender address rejected: need fully-qualified address"


def test_restriction_class_from_an_access_map(server):
    replies = session(server, [b"<box@virt.test>"], sender=b"<strict@example.org>", helo=b"shortname")
    assert replies[3] == "504 5.5.2 <shortname>: Helo command rejected: need fully-qualified hostname"
    replies = session(server, [b"<box@virt.test>"], sender=b"<strict@example.org>", helo=b"host.example.org")
    assert replies[3] == "250 2.1.5 Ok"


def test_hold_parks_the_message_in_the_hold_queue(server):
    replies = session(server, [b"<box@virt.test>"], sender=b"<held@example.org>",
                      data=b"Subject: held\r\n\r\nx\r\n.\r\n")
    assert replies[5].startswith("250 2.0.0 Ok: queued as ")
    qid = replies[5].rsplit(" ", 1)[1]
    assert f"hold/{qid}.env" in server.queue_files("hold")


def test_discard_accepts_and_drops(server):
    before = len(maildir_messages(server.vmail / "box"))
    replies = session(server, [b"<box@virt.test>"], sender=b"<drop@example.org>",
                      data=b"Subject: dropped\r\n\r\nx\r\n.\r\n")
    assert replies[5].startswith("250 2.0.0 Ok: queued as ")
    server.wait_for_log(r"discard: END-OF-MESSAGE")
    assert not server.queue_files("incoming", "active", "deferred")
    assert len(maildir_messages(server.vmail / "box")) == before


def test_prepend_adds_a_header(server):
    replies = session(server, [b"<box@virt.test>"], sender=b"<tagged@example.org>",
                      data=b"Subject: tagged\r\n\r\nx\r\n.\r\n")
    assert replies[5].startswith("250 ")
    msgs = wait_until(lambda: [m for m in maildir_messages(server.vmail / "box") if b"Subject: tagged" in m],
                      what="tagged delivery")
    assert b"X-Tag: yes" in msgs[0]


async def test_rbl_hit_rejects_and_rbl_timeout_defers(tmp_path):
    zones = {"rbl.test": ["3.0.0.127 60 IN A 127.0.0.2", "3.0.0.127 60 IN TXT \"listed for testing\""]}
    async with TestDNSServer(zones) as dns:
        srv = ServerProcess(tmp_path, {"dns_nameservers": [dns.nameserver], "dns_timeout": "1s",
                                       "smtpd_client_restrictions": ["reject_rbl_client rbl.test"]})
        await asyncio.to_thread(srv.start)
        try:
            replies = await asyncio.to_thread(session, srv, [b"<box@virt.test>"], source="127.0.0.3")
            assert replies[3] == ("554 5.7.1 Service unavailable; Client host [127.0.0.3] blocked using rbl.test; "
                                  "listed for testing")
            dns.fail("4.0.0.127.rbl.test", "TIMEOUT")
            replies = await asyncio.to_thread(session, srv, [b"<box@virt.test>"], source="127.0.0.4")
            assert replies[3].startswith("450 4.7.1 "), replies[3]
            assert srv.queue_files() == []
            replies = await asyncio.to_thread(session, srv, [b"<box@virt.test>"], source="127.0.0.5")
            assert replies[3] == "250 2.1.5 Ok"
        finally:
            await asyncio.to_thread(srv.stop)


async def test_reject_unknown_sender_domain_against_the_test_dns(tmp_path):
    zones = {"known.test": ["@ 60 IN A 127.0.0.9"]}
    async with TestDNSServer(zones) as dns:
        srv = ServerProcess(tmp_path, {"dns_nameservers": [dns.nameserver], "dns_timeout": "1s",
                                       "smtpd_sender_restrictions": ["reject_unknown_sender_domain"]})
        await asyncio.to_thread(srv.start)
        try:
            replies = await asyncio.to_thread(session, srv, [b"<box@virt.test>"], sender=b"<a@nosuch.known.test>")
            assert replies[3] == "450 4.1.8 <a@nosuch.known.test>: Sender address rejected: Domain not found"
            replies = await asyncio.to_thread(session, srv, [b"<box@virt.test>"], sender=b"<a@known.test>")
            assert replies[3] == "250 2.1.5 Ok"
        finally:
            await asyncio.to_thread(srv.stop)


def test_sender_login_mismatch(tmp_path):
    from harness import free_port
    from mailserver.sasl import set_password
    import base64
    import smtplib

    set_password(str(tmp_path / "passwd"), "alice", "pw")
    set_password(str(tmp_path / "passwd"), "bob", "pw")
    (tmp_path / "logins").write_text("alice@example.org alice\n")
    port = free_port()
    srv = ServerProcess(tmp_path, {
        "smtpd_sasl_password_maps": f"passwd-file:{tmp_path / 'passwd'}", "smtpd_tls_auth_only": False,
        "smtpd_sender_login_maps": [f"texthash:{tmp_path / 'logins'}"],
        "smtpd_sender_restrictions": ["reject_sender_login_mismatch"],
    }, port=port, services={"smtp": {"listen": [f"127.0.0.1:{port}"], "auth": "optional"}}).start()
    try:
        for user, code in (("alice", 250), ("bob", 553)):
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.ehlo()
                s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{user}\0pw".encode()).decode())
                s.docmd("MAIL FROM:<alice@example.org>")
                got = s.docmd("RCPT TO:<box@virt.test>")
                assert got[0] == code, got
                if code == 553:
                    assert got[1] == b"5.7.1 <alice@example.org>: Sender address rejected: not owned by user bob"
    finally:
        srv.stop()


@pytest.mark.parametrize("header, reply, where", [
    (b"Subject: buy cheap pills", "550 5.7.1 no spam please", None),
    (b"Subject: quarantine me", "250", "hold"),
    (b"Subject: drop me", "250", "discard"),
    (b"Subject: just warn", "250", "warn"),
])
def test_header_checks_actions(tmp_path, header, reply, where):
    (tmp_path / "header_checks").write_text("/^Subject: .*pills/ REJECT no spam please\n"
                                            "/^Subject: quarantine/ HOLD\n"
                                            "/^Subject: drop/ DISCARD\n"
                                            "/^Subject: just warn/ WARN be careful\n"
                                            "/^X-Remove-Me:/ IGNORE\n")
    srv = ServerProcess(tmp_path, {"header_checks": [f"regexp:{tmp_path / 'header_checks'}"]}).start()
    try:
        replies = session(srv, [b"<box@virt.test>"], source=None,
                          data=header + b"\r\nX-Remove-Me: yes\r\n\r\nbody\r\n.\r\n")
        assert replies[5].startswith(reply), replies[5]
        if where is None:
            srv.wait_for_log(r"reject: header Subject: buy cheap pills")
            assert srv.queue_files() == []
        elif where == "hold":
            qid = replies[5].rsplit(" ", 1)[1]
            assert f"hold/{qid}.env" in srv.queue_files("hold")
        elif where == "discard":
            srv.wait_for_log(r"discard: ")
            assert srv.queue_files() == []
        else:
            srv.wait_for_log(r"warning: header Subject: just warn from localhost\[127\.0\.0\.1\].*: be careful")
            msgs = wait_until(lambda: maildir_messages(srv.vmail / "box"), what="delivery")
            assert b"X-Remove-Me" not in msgs[0]
    finally:
        srv.stop()


def test_access_table_edits_apply_without_a_reload(tmp_path):
    """Tables are re-read when their file changes (checked every few seconds)."""
    import os
    import time as _time

    table = tmp_path / "client_access"
    table.write_text("127.0.0.9 OK\n")
    srv = ServerProcess(tmp_path, {"smtpd_client_restrictions": [f"check_client_access texthash:{table}"]}).start()
    try:
        assert session(srv, [b"<box@virt.test>"], source="127.0.0.3")[3] == "250 2.1.5 Ok"
        table.write_text("127.0.0.3 REJECT changed my mind\n")
        os.utime(table, (_time.time() + 5, _time.time() + 5))
        wait_until(lambda: session(srv, [b"<box@virt.test>"], source="127.0.0.3")[3].startswith("554 "),
                   timeout=20, interval=0.5, what="the edited table to take effect")
    finally:
        srv.stop()
