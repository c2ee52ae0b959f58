"""The smtp delivery agent against real fake MX servers on loopback.

Every DNS answer comes from ``TestDNSServer`` (127.0.0.1) and every fake MX
is an aiosmtpd server (or a raw asyncio server when byte-exact control is
needed) bound to 127.0.0.2 / 127.0.0.3 on one shared ephemeral port, which
the agent uses as ``smtp_tcp_port``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
import trustme

from dnsserver import TestDNSServer
from harness import await_until
from fakemx import MX1, MX2, BrokenTLS, FakeMX, NoEhlo, RawServer, free_port, start_on_shared_port
from mailserver.delivery import (
    Delivered,
    DeliveryRequest,
    PermanentFailure,
    Recipient,
    TemporaryFailure,
)
from mailserver.delivery.smtp import (
    SmtpAgent,
    SmtpClientSettings,
    parse_nexthop,
    wire_message,
)
from mailserver.dns import Resolver

ZONES = {
    "example.test": [
        "@ 300 IN MX 10 mx1.example.test.",
        "@ 300 IN MX 20 mx2.example.test.",
        "mx1 300 IN A 127.0.0.2",
        "mx2 300 IN A 127.0.0.3",
    ],
    "single.test": ["@ 300 IN MX 10 mx1.example.test."],
    "implicit.test": ["@ 300 IN A 127.0.0.2"],
    "null.test": ["@ 300 IN MX 0 ."],
}
BODY = b"From: a@sender.test\r\nTo: x@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


# --------------------------------------------------------------------------
# Fake MX servers


# --------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
async def dns_server():
    async with TestDNSServer(ZONES) as server:
        yield server


@pytest.fixture
async def env(dns_server):
    """Collects servers/agents and tears everything down in order."""
    state = Env(dns_server)
    yield state
    for agent in state.agents:
        await agent.close()
    for server in state.servers:
        await server.stop()


class Env:
    def __init__(self, dns_server: TestDNSServer):
        self.dns = dns_server
        self.servers: list = []
        self.agents: list[SmtpAgent] = []
        self.logs: list[str] = []
        self.port = 0

    async def serve(self, *servers) -> int:
        self.servers.extend(servers)
        self.port = await start_on_shared_port(*servers)
        return self.port

    def agent(self, **overrides) -> SmtpAgent:
        values = dict(
            myhostname="client.sender.test",
            smtp_tcp_port=self.port,
            smtp_connect_timeout=10,
            smtp_helo_timeout=10,
            smtp_mail_timeout=10,
            smtp_rcpt_timeout=10,
            smtp_data_init_timeout=10,
            smtp_data_xfer_timeout=10,
            smtp_data_done_timeout=10,
            smtp_rset_timeout=10,
        )
        values.update(overrides)
        resolver = Resolver([self.dns.nameserver], timeout=2)
        agent = SmtpAgent(SmtpClientSettings(**values), resolver, log=self.logs.append)
        self.agents.append(agent)
        return agent


def request(nexthop: str, *rcpts: str, message: bytes = BODY, **kw) -> DeliveryRequest:
    rcpts = rcpts or ("x@example.test",)
    return DeliveryRequest(
        queue_id="4ABC",
        sender="a@sender.test",
        recipients=tuple(Recipient(r, r, i) for i, r in enumerate(rcpts)),
        message=message,
        nexthop=nexthop,
        **kw,
    )


def make_tls(hostname: str = "mx1.example.test"):
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(server_ctx)
    return ca, server_ctx


# --------------------------------------------------------------------------
# Routing


async def test_mx_preference_order(env):
    mx1, mx2 = FakeMX(MX1), FakeMX(MX2)
    port = await env.serve(mx1, mx2)
    [out] = await env.agent().deliver(request("example.test"))
    assert isinstance(out, Delivered)
    assert out.relay == f"mx1.example.test[127.0.0.2]:{port}"
    assert out.status == "2.0.0"
    assert out.text == "250 2.0.0 Ok: queued as 4ABC"
    assert len(mx1.handler.messages) == 1 and not mx2.handler.messages
    msg = mx1.handler.messages[0]
    assert msg.mail_from == "a@sender.test" and msg.rcpt_tos == ["x@example.test"]
    assert msg.data == BODY


async def test_refusing_first_mx_falls_back_to_second(env):
    mx2 = FakeMX(MX2)  # nothing listens on 127.0.0.2
    port = await env.serve(mx2)
    [out] = await env.agent().deliver(request("example.test"))
    assert isinstance(out, Delivered)
    assert out.relay == f"mx2.example.test[127.0.0.3]:{port}"
    assert any(
        f"connect to mx1.example.test[127.0.0.2]:{port}: Connection refused" in line
        for line in env.logs
    )


async def test_all_mx_refusing_defers_with_connect_error(env):
    env.port = await free_port()  # nothing listens on either MX
    out = await env.agent().deliver(request("example.test", "x@example.test", "y@example.test"))
    for o in out:
        assert isinstance(o, TemporaryFailure)
        assert o.status == "4.4.1"
        assert o.text == f"connect to mx2.example.test[127.0.0.3]:{env.port}: Connection refused"
        assert o.relay == "none"


async def test_implicit_mx(env):
    mx = FakeMX(MX1)
    port = await env.serve(mx)
    [out] = await env.agent().deliver(request("implicit.test", "u@implicit.test"))
    assert isinstance(out, Delivered)
    assert out.relay == f"implicit.test[127.0.0.2]:{port}"
    assert mx.handler.messages[0].rcpt_tos == ["u@implicit.test"]


async def test_null_mx(env):
    [out] = await env.agent(smtp_tcp_port=2525).deliver(request("null.test", "u@null.test"))
    assert out == PermanentFailure("5.1.10", "Domain null.test does not accept mail (nullMX)", "none")


async def test_nxdomain(env):
    [out] = await env.agent(smtp_tcp_port=2525).deliver(
        request("nosuch.example.test", "u@nosuch.example.test")
    )
    assert out == PermanentFailure(
        "5.4.4",
        "Host or domain name not found. Name service error for "
        "name=nosuch.example.test type=MX: Host not found",
        "none",
    )


async def test_servfail_defers_then_succeeds(env):
    mx = FakeMX(MX1)
    await env.serve(mx)
    agent = env.agent()
    env.dns.fail("single.test", "SERVFAIL")
    [out] = await agent.deliver(request("single.test", "u@single.test"))
    assert out == TemporaryFailure(
        "4.4.3",
        "Host or domain name not found. Name service error for "
        "name=single.test type=MX: Host not found, try again",
        "none",
    )
    assert not mx.handler.messages
    env.dns.clear_failures()
    [out] = await agent.deliver(request("single.test", "u@single.test"))
    assert isinstance(out, Delivered)


async def test_mail_loops_back_to_myself(env):
    mx = FakeMX(MX1)
    await env.serve(mx)
    agent = env.agent(own_addresses=frozenset({"127.0.0.2"}))
    [out] = await agent.deliver(request("single.test", "u@single.test"))
    assert out == PermanentFailure("5.4.6", "mail for single.test loops back to myself", "none")
    assert mx.connections == 0


async def test_backup_mx_delivers_to_better_mx_only(env):
    # We are mx2 (preference 20): deliver to mx1 only, never to ourselves.
    mx1, mx2 = FakeMX(MX1), FakeMX(MX2)
    await env.serve(mx1, mx2)
    agent = env.agent(myhostname="mx2.example.test")
    [out] = await agent.deliver(request("example.test"))
    assert isinstance(out, Delivered) and out.relay.startswith("mx1.example.test[")
    # mx1 down: the mail stays here (deferred), it is not sent to ourselves.
    await mx1.stop()
    [out] = await agent.deliver(request("example.test"))
    assert isinstance(out, TemporaryFailure) and out.status == "4.4.1"
    assert mx2.connections == 0


async def test_literal_nexthop_bypasses_dns(env):
    mx = FakeMX("127.0.0.1")
    port = await env.serve(mx)
    [out] = await env.agent().deliver(request(f"[127.0.0.1]:{port}"))
    assert isinstance(out, Delivered)
    assert out.relay == f"127.0.0.1[127.0.0.1]:{port}"
    assert env.dns.queries == []


async def test_bracketed_name_nexthop_uses_address_records_only(env):
    mx = FakeMX(MX1)
    port = await env.serve(mx)
    [out] = await env.agent(smtp_tcp_port=1).deliver(request(f"[mx1.example.test]:{port}"))
    assert isinstance(out, Delivered)
    assert out.relay == f"mx1.example.test[127.0.0.2]:{port}"
    assert all(qtype in ("A", "AAAA") for _, qtype in env.dns.queries)


# --------------------------------------------------------------------------
# Replies


async def test_rcpt_4xx_and_5xx_while_others_are_delivered(env):
    mx = FakeMX(MX1)
    port = await env.serve(mx)
    mx.handler.rcpt_replies = {
        "b@single.test": "450 4.2.0 <b@single.test>: Mailbox busy",
        "c@single.test": "550 5.1.1 <c@single.test>: Recipient address rejected: User unknown",
    }
    out = await env.agent().deliver(
        request("single.test", "a@single.test", "b@single.test", "c@single.test", "d@single.test")
    )
    relay = f"mx1.example.test[127.0.0.2]:{port}"
    assert isinstance(out[0], Delivered) and isinstance(out[3], Delivered)
    assert out[1] == TemporaryFailure(
        "4.2.0",
        "host mx1.example.test[127.0.0.2] said: 450 4.2.0 <b@single.test>: Mailbox busy "
        "(in reply to RCPT TO command)",
        relay,
    )
    assert out[2] == PermanentFailure(
        "5.1.1",
        "host mx1.example.test[127.0.0.2] said: 550 5.1.1 <c@single.test>: Recipient "
        "address rejected: User unknown (in reply to RCPT TO command)",
        relay,
    )
    assert [m.rcpt_tos for m in mx.handler.messages] == [["a@single.test", "d@single.test"]]


async def test_rcpt_4xx_is_retried_on_the_backup_mx(env):
    mx1, mx2 = FakeMX(MX1), FakeMX(MX2)
    await env.serve(mx1, mx2)
    mx1.handler.rcpt_replies = {"b@example.test": "451 4.7.1 Greylisted, try later"}
    out = await env.agent().deliver(request("example.test", "a@example.test", "b@example.test"))
    assert out[0].relay.startswith("mx1.example.test[") and isinstance(out[0], Delivered)
    assert out[1].relay.startswith("mx2.example.test[") and isinstance(out[1], Delivered)
    assert [m.rcpt_tos for m in mx2.handler.messages] == [["b@example.test"]]


async def test_no_recipient_accepted_sends_no_data(env):
    mx = FakeMX(MX1)
    await env.serve(mx)
    mx.handler.rcpt_replies = {"a@single.test": "550 5.1.1 no such user"}
    [out] = await env.agent().deliver(request("single.test", "a@single.test"))
    assert isinstance(out, PermanentFailure) and out.status == "5.1.1"
    assert mx.handler.messages == [] and mx.handler.rsets == 1


async def test_5xx_after_data(env):
    mx = FakeMX(MX1)
    port = await env.serve(mx)
    mx.handler.data_reply = "554 5.7.1 Message content rejected"
    out = await env.agent().deliver(request("single.test", "a@single.test", "b@single.test"))
    for o in out:
        assert o == PermanentFailure(
            "5.7.1",
            "host mx1.example.test[127.0.0.2] said: 554 5.7.1 Message content rejected "
            "(in reply to end of DATA command)",
            f"mx1.example.test[127.0.0.2]:{port}",
        )


async def test_mail_from_5xx_bounces_everything(env):
    mx1, mx2 = FakeMX(MX1), FakeMX(MX2)
    await env.serve(mx1, mx2)
    mx1.handler.mail_reply = "553 5.7.1 <a@sender.test>: Sender address rejected"
    out = await env.agent().deliver(request("example.test", "a@example.test", "b@example.test"))
    assert all(isinstance(o, PermanentFailure) and o.status == "5.7.1" for o in out)
    assert "(in reply to MAIL FROM command)" in out[0].text
    assert mx2.connections == 0


async def test_mail_from_4xx_tries_next_mx(env):
    mx1, mx2 = FakeMX(MX1), FakeMX(MX2)
    await env.serve(mx1, mx2)
    mx1.handler.mail_reply = "451 4.3.0 Try again later"
    [out] = await env.agent().deliver(request("example.test"))
    assert isinstance(out, Delivered) and out.relay.startswith("mx2.example.test[")


async def test_421_greeting_on_first_mx_uses_second(env):
    async def busy(reader, writer, server):
        writer.write(b"421 4.3.2 mx1.example.test Service not available\r\n")
        await writer.drain()

    mx1, mx2 = RawServer(MX1, busy), FakeMX(MX2)
    await env.serve(mx1, mx2)
    [out] = await env.agent().deliver(request("example.test"))
    assert isinstance(out, Delivered) and out.relay.startswith("mx2.example.test[")
    assert any(
        "host mx1.example.test[127.0.0.2] refused to talk to me: 421 4.3.2" in line
        for line in env.logs
    )


async def test_5xx_greeting_on_every_mx_defers(env):
    async def reject(reader, writer, server):
        writer.write(b"554 5.7.1 No SMTP service here\r\n")
        await writer.drain()

    await env.serve(RawServer(MX1, reject), RawServer(MX2, reject))
    [out] = await env.agent().deliver(request("example.test"))
    assert out == TemporaryFailure(
        "4.7.1",
        "host mx2.example.test[127.0.0.3] refused to talk to me: 554 5.7.1 No SMTP service here",
        f"mx2.example.test[127.0.0.3]:{env.port}",
    )
    # Without smtp_skip_5xx_greeting the last server's 5xx is final.
    [out] = await env.agent(smtp_skip_5xx_greeting=False).deliver(request("example.test"))
    assert isinstance(out, PermanentFailure) and out.status == "5.7.1"


async def test_lost_connection_before_greeting(env):
    async def hang_up(reader, writer, server):
        pass  # close without a greeting

    await env.serve(RawServer(MX1, hang_up))
    [out] = await env.agent().deliver(request("single.test", "u@single.test"))
    assert out == TemporaryFailure(
        "4.4.2",
        "lost connection with mx1.example.test[127.0.0.2] while receiving the initial "
        "server greeting",
        f"mx1.example.test[127.0.0.2]:{env.port}",
    )


async def test_mx_session_limit(env):
    mx1, mx2 = FakeMX(MX1), FakeMX(MX2)
    await env.serve(mx1, mx2)
    mx1.handler.mail_reply = "451 4.3.0 Try again later"
    [out] = await env.agent(smtp_mx_session_limit=1).deliver(request("example.test"))
    assert isinstance(out, TemporaryFailure) and out.status == "4.3.0"
    assert "(in reply to MAIL FROM command)" in out.text
    assert mx2.connections == 0


async def test_server_greeting_us_with_our_own_name_is_a_loop(env):
    mx = FakeMX(MX1, hostname="client.sender.test")  # i.e. ourselves
    await env.serve(mx)
    [out] = await env.agent().deliver(request("single.test", "u@single.test"))
    assert isinstance(out, PermanentFailure) and out.status == "5.4.6"
    assert out.text == "mail for single.test loops back to myself"
    assert mx.handler.messages == []


async def test_ehlo_rejected_falls_back_to_helo(env):
    mx = FakeMX(MX1, cls=NoEhlo)
    await env.serve(mx)
    [out] = await env.agent().deliver(
        request("single.test", "u@single.test", body_8bit=True)
    )
    assert isinstance(out, Delivered)
    assert mx.handler.messages[0].mail_options == []  # no ESMTP parameters


async def test_drop_after_final_dot_is_temporary(env):
    mx = FakeMX(MX1)
    port = await env.serve(mx)
    mx.handler.drop_after_data = True
    [out] = await env.agent().deliver(request("single.test", "u@single.test"))
    assert out == TemporaryFailure(
        "4.4.2",
        "lost connection with mx1.example.test[127.0.0.2] while sending end of data "
        "-- message may be sent more than once",
        f"mx1.example.test[127.0.0.2]:{port}",
    )
    assert len(mx.handler.messages) == 1  # the server did get it: a duplicate is possible


async def test_stall_after_final_dot_times_out(env):
    mx = FakeMX(MX1)
    port = await env.serve(mx)
    mx.handler.stall_after_data = True
    [out] = await env.agent(smtp_data_done_timeout=0.3).deliver(
        request("single.test", "u@single.test")
    )
    assert out == TemporaryFailure(
        "4.4.2",
        "conversation with mx1.example.test[127.0.0.2] timed out while sending end of "
        "data -- message may be sent more than once",
        f"mx1.example.test[127.0.0.2]:{port}",
    )


async def test_rcpt_stall_times_out(env):
    async def stall_rcpt(reader, writer, server):
        writer.write(b"220 mx1.example.test ESMTP\r\n")
        for _ in range(10):
            line = await reader.readline()
            if not line or line.startswith(b"RCPT"):
                break
            writer.write(b"250 ok\r\n")
        await reader.read()  # wait for the client to give up

    mx = RawServer(MX1, stall_rcpt)
    await env.serve(mx)
    [out] = await env.agent(smtp_rcpt_timeout=0.3).deliver(request("single.test", "u@single.test"))
    assert isinstance(out, TemporaryFailure) and out.status == "4.4.2"
    assert out.text == (
        "conversation with mx1.example.test[127.0.0.2] timed out while sending RCPT TO"
    )


# --------------------------------------------------------------------------
# Message transfer


async def test_dot_stuffing_and_crlf_on_the_wire(env):
    async def record(reader, writer, server):
        writer.write(b"220 raw.example.test ESMTP\r\n")
        for _ in range(20):
            line = await reader.readline()
            if not line:
                return
            server.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-raw.example.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                server.data.append(await reader.readuntil(b"\r\n.\r\n"))
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")

    raw = RawServer("127.0.0.1", record)
    port = await env.serve(raw)
    message = (
        b"Subject: dots\r\n\r\n"
        b".leading dot\r\n"
        b"..two dots\n"
        b".\n"
        b"bare LF\n"
        b"bare CR\r"
        b"mid.dot\r\n"
        b"last line without newline"
    )
    [out] = await env.agent().deliver(request(f"[127.0.0.1]:{port}", message=message))
    assert isinstance(out, Delivered)
    assert raw.data == [
        b"Subject: dots\r\n\r\n"
        b"..leading dot\r\n"
        b"...two dots\r\n"
        b"..\r\n"
        b"bare LF\r\n"
        b"bare CR\r\n"
        b"mid.dot\r\n"
        b"last line without newline\r\n"
        b".\r\n"
    ]
    assert raw.commands[1] == b"MAIL FROM:<a@sender.test>\r\n"  # no SIZE: not offered
    assert raw.commands[2] == b"RCPT TO:<x@example.test>\r\n"


def test_wire_message_unit():
    assert wire_message(b"") == (b".\r\n", 0)
    assert wire_message(b".") == (b"..\r\n.\r\n", 3)
    assert wire_message(b"a\r\n.\r\nb") == (b"a\r\n..\r\nb\r\n.\r\n", 9)
    assert wire_message(b"a\r\r\nb\r\n") == (b"a\r\n\r\nb\r\n.\r\n", 8)
    assert wire_message(b"a\r\nb\r\n") == (b"a\r\nb\r\n.\r\n", 6)  # the CRLF, no-dot fast path
    assert wire_message(b"a\nb.\r\n.x") == (b"a\r\nb.\r\n..x\r\n.\r\n", 11)


def test_wire_message_fast_paths_agree_with_the_general_rewrite():
    import random
    import re

    line_end, leading_dot = re.compile(rb"\r\n|\r|\n"), re.compile(rb"(?m)^\.")

    def general(message: bytes) -> tuple[bytes, int]:
        normalized = line_end.sub(b"\r\n", message)
        if normalized and not normalized.endswith(b"\r\n"):
            normalized += b"\r\n"
        return leading_dot.sub(b"..", normalized) + b".\r\n", len(normalized)

    rng = random.Random(7)
    pieces = [b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"x."]
    for _ in range(5000):
        message = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert wire_message(message) == general(message), message


async def test_large_message_is_sent_intact(env):
    mx = FakeMX(MX1)
    await env.serve(mx)
    body = b"Subject: big\r\n\r\n" + b"".join(
        b".%06d abcdefghijklmnopqrstuvwxyz\r\n" % i for i in range(20000)
    )
    [out] = await env.agent().deliver(request("single.test", "u@single.test", message=body))
    assert isinstance(out, Delivered)
    assert mx.handler.messages[0].data == body


async def test_size_and_8bitmime_parameters(env):
    mx = FakeMX(MX1)
    await env.serve(mx)
    [out] = await env.agent().deliver(request("single.test", "u@single.test", body_8bit=True))
    assert isinstance(out, Delivered)
    assert mx.handler.messages[0].mail_options == [f"SIZE={len(BODY)}", "BODY=8BITMIME"]


async def test_peer_size_limit_bounces_without_data(env):
    mx = FakeMX(MX1, data_size_limit=50)
    port = await env.serve(mx)
    out = await env.agent().deliver(request("single.test", "a@single.test", "b@single.test"))
    for o in out:
        assert o == PermanentFailure(
            "5.3.4",
            f"message size {len(BODY)} exceeds size limit 50 of server "
            "mx1.example.test[127.0.0.2]",
            f"mx1.example.test[127.0.0.2]:{port}",
        )
    assert mx.handler.messages == []


async def test_smtputf8_required_but_not_offered(env):
    mx = FakeMX(MX1)
    port = await env.serve(mx)
    [out] = await env.agent().deliver(request("single.test", "u@single.test", smtputf8=True))
    assert out == PermanentFailure(
        "5.6.7",
        "SMTPUTF8 is required, but was not offered by host mx1.example.test[127.0.0.2]",
        f"mx1.example.test[127.0.0.2]:{port}",
    )
    assert mx.handler.messages == []


async def test_smtputf8_offered(env):
    mx = FakeMX(MX1, enable_SMTPUTF8=True)
    await env.serve(mx)
    rcpt = "jörg@single.test"
    [out] = await env.agent().deliver(request("single.test", rcpt, smtputf8=True))
    assert isinstance(out, Delivered)
    assert mx.handler.messages[0].rcpt_tos == [rcpt]
    assert "SMTPUTF8" in mx.handler.messages[0].mail_options


# --------------------------------------------------------------------------
# TLS


async def test_opportunistic_starttls(env):
    ca, server_ctx = make_tls()
    mx = FakeMX(MX1, tls_context=server_ctx)
    await env.serve(mx)
    [out] = await env.agent().deliver(request("single.test", "u@single.test"))
    assert isinstance(out, Delivered)
    assert mx.handler.messages[0].tls is True


async def test_tls_handshake_failure_retries_in_plaintext(env):
    _, server_ctx = make_tls()
    mx = FakeMX(MX1, cls=BrokenTLS, tls_context=server_ctx)
    await env.serve(mx)
    [out] = await env.agent().deliver(request("single.test", "u@single.test"))
    assert isinstance(out, Delivered)
    assert mx.connections == 2
    assert mx.handler.messages[0].tls is False
    assert any("Cannot start TLS" in line and "without TLS" in line for line in env.logs)


async def test_encrypt_without_starttls_is_deferred(env):
    mx = FakeMX(MX1)
    port = await env.serve(mx)
    [out] = await env.agent(smtp_tls_security_level="encrypt").deliver(
        request("single.test", "u@single.test")
    )
    assert out == TemporaryFailure(
        "4.7.5",
        "TLS is required, but was not offered by host mx1.example.test[127.0.0.2]",
        f"mx1.example.test[127.0.0.2]:{port}",
    )
    assert mx.handler.messages == []


async def test_encrypt_with_broken_tls_never_falls_back(env):
    _, server_ctx = make_tls()
    mx = FakeMX(MX1, cls=BrokenTLS, tls_context=server_ctx)
    await env.serve(mx)
    [out] = await env.agent(smtp_tls_security_level="encrypt").deliver(
        request("single.test", "u@single.test")
    )
    assert isinstance(out, TemporaryFailure) and out.status == "4.7.5"
    assert "Cannot start TLS" in out.text
    assert mx.connections == 1 and mx.handler.messages == []


async def test_verify_and_secure_levels(env, tmp_path):
    ca, server_ctx = make_tls("mx1.example.test")
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    mx = FakeMX(MX1, tls_context=server_ctx)
    await env.serve(mx)
    for level in ("verify", "secure"):
        [out] = await env.agent(
            smtp_tls_security_level=level, smtp_tls_CAfile=str(cafile)
        ).deliver(request("single.test", "u@single.test"))
        assert isinstance(out, Delivered), out
    assert [m.tls for m in mx.handler.messages] == [True, True]

    # An untrusted CA: deferred, never sent in plaintext.
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    [out] = await env.agent(smtp_tls_security_level="verify", smtp_tls_CAfile=str(other)).deliver(
        request("single.test", "u@single.test")
    )
    assert isinstance(out, TemporaryFailure) and out.status == "4.7.5"
    assert "Server certificate not verified" in out.text


async def test_secure_checks_the_host_name(env, tmp_path):
    ca, server_ctx = make_tls("elsewhere.example.test")
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    mx = FakeMX(MX1, tls_context=server_ctx)
    await env.serve(mx)
    [out] = await env.agent(smtp_tls_security_level="verify", smtp_tls_CAfile=str(cafile)).deliver(
        request("single.test", "u@single.test")
    )
    assert isinstance(out, Delivered)
    [out] = await env.agent(smtp_tls_security_level="secure", smtp_tls_CAfile=str(cafile)).deliver(
        request("single.test", "u@single.test")
    )
    assert isinstance(out, TemporaryFailure) and out.status == "4.7.5"
    assert len(mx.handler.messages) == 1


# --------------------------------------------------------------------------
# Connection cache


async def test_connection_reuse(env):
    mx = FakeMX(MX1)
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    [a] = await agent.deliver(request("single.test", "a@single.test"))
    [b] = await agent.deliver(request("single.test", "b@single.test"))
    assert isinstance(a, Delivered) and isinstance(b, Delivered)
    assert mx.connections == 1
    assert mx.handler.rsets == 1
    assert [m.rcpt_tos for m in mx.handler.messages] == [["a@single.test"], ["b@single.test"]]


async def test_connection_cache_keeps_one_connection_per_concurrent_delivery(env):
    """Postfix scache: as many idle connections per destination as were in
    use, so a burst of concurrent deliveries reuses all of them (not one
    connection and a new one for every other delivery)."""
    mx = FakeMX(MX1)
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    first = await asyncio.gather(*(agent.deliver(request("single.test", f"a{i}@single.test")) for i in range(4)))
    opened = mx.connections
    assert opened == 4 and [len(stack) for stack in agent._cache.values()] == [4]
    second = await asyncio.gather(*(agent.deliver(request("single.test", f"b{i}@single.test")) for i in range(4)))
    assert all(isinstance(o, Delivered) for [o] in first + second)
    assert mx.connections == opened  # every second-round delivery reused a cached connection
    assert mx.handler.rsets == 4
    assert len(mx.handler.messages) == 8


async def test_a_dead_cached_connection_is_skipped_for_the_next_cached_one(env):
    mx = FakeMX(MX1)
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    await asyncio.gather(*(agent.deliver(request("single.test", f"a{i}@single.test")) for i in range(2)))
    [stack] = agent._cache.values()
    assert len(stack) == 2 and mx.connections == 2
    stack[-1].session.smtp.close()  # the one taken first is dead
    [b] = await agent.deliver(request("single.test", "b@single.test"))
    assert isinstance(b, Delivered)
    assert mx.connections == 2  # the other cached connection was used, no new one opened


async def test_reuse_falls_back_when_cached_connection_is_dead(env):
    mx = FakeMX(MX1)
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    [a] = await agent.deliver(request("single.test", "a@single.test"))
    # The server drops the idle connection; the agent must open a new one.
    for proto in mx.protocols:
        proto.transport.close()
    tasks = [p._handler_coroutine for p in mx.protocols]
    await asyncio.wait(tasks, timeout=10)
    [b] = await agent.deliver(request("single.test", "b@single.test"))
    assert isinstance(a, Delivered) and isinstance(b, Delivered)
    assert mx.connections == 2


async def test_with_pipelining_the_rset_of_a_reused_connection_leads_the_next_group(env):
    """PIPELINING: a cached connection is reused without a round trip of
    its own: RSET arrives with the next MAIL FROM, in the same write."""
    mx = FakeMX(MX1)
    mx.handler.pipelining = True
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    outcomes = [await agent.deliver(request("single.test", f"{n}@single.test")) for n in "abc"]
    assert all(isinstance(o, Delivered) for [o] in outcomes), outcomes
    assert mx.connections == 1
    assert mx.handler.rset_pipelined == [True, True]
    assert [m.rcpt_tos for m in mx.handler.messages] == [["a@single.test"], ["b@single.test"], ["c@single.test"]]


@pytest.mark.parametrize("reply", ["421 4.3.2 Service shutting down", "502 5.5.2 RSET not implemented", None],
                         ids=["421", "502", "silent"])
@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_refused_rset_discards_the_cached_connection_and_a_new_one_delivers(env, reply, pipelining):
    """The refusal (or no answer within smtp_rset_timeout: a server gone
    quiet) only says the cached connection is unusable: no recipient is
    failed and a fresh connection delivers the message once.  With
    PIPELINING the RSET led a group: the 354 to its DATA got no content (or
    the MAIL, RCPT and DATA behind a silent RSET no answer at all)."""
    mx = FakeMX(MX1)
    mx.handler.pipelining = pipelining
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30, smtp_rset_timeout=1)
    [a] = await agent.deliver(request("single.test", "a@single.test"))
    if reply is None:
        mx.handler.rset_stall = True
    else:
        mx.handler.rset_reply = reply
    [b] = await agent.deliver(request("single.test", "b@single.test"))
    assert isinstance(a, Delivered) and isinstance(b, Delivered), (a, b)
    assert mx.handler.rsets == 1 and mx.connections == 2
    assert [m.rcpt_tos for m in mx.handler.messages] == [["a@single.test"], ["b@single.test"]]
    assert not [line for line in env.logs if "b@single.test" in line or "RSET" in line]
    [stack] = agent._cache.values()
    assert len(stack) == 1 and stack[0].session.connected  # only the new connection is kept


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_421_to_mail_on_a_cached_connection_moves_the_message_to_a_new_connection(env, pipelining):
    """A server with a per-connection message limit answers 421 to the next
    MAIL on a reused connection: nothing was sent, so a new connection takes
    the message at once instead of deferring it."""
    mx = FakeMX(MX1)
    mx.handler.pipelining = pipelining
    mx.handler.mails_per_connection = 1
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    [a] = await agent.deliver(request("single.test", "a@single.test"))
    [b] = await agent.deliver(request("single.test", "b@single.test"))
    assert isinstance(a, Delivered) and isinstance(b, Delivered), (a, b)
    assert mx.connections == 2
    assert [m.rcpt_tos for m in mx.handler.messages] == [["a@single.test"], ["b@single.test"]]
    assert [line for line in env.logs if "refused another message on a cached connection: 421 4.7.0" in line]


async def test_after_a_421_to_mail_the_other_cached_connections_are_not_tried(env):
    """One 421 at MAIL on a reused connection: the next attempt is a new
    connection, not each of the other cached ones in turn."""
    mx = FakeMX(MX1)
    mx.handler.pipelining = True
    mx.handler.mails_per_connection = 1
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    await asyncio.gather(*(agent.deliver(request("single.test", f"a{i}@single.test")) for i in range(3)))
    assert mx.connections == 3
    [b] = await agent.deliver(request("single.test", "b@single.test"))
    assert isinstance(b, Delivered), b
    assert mx.connections == 4  # one cached connection refused, then a new one
    assert len([line for line in env.logs if "refused another message on a cached connection" in line]) == 1
    [stack] = agent._cache.values()
    assert len(stack) == 3  # the two untried cached connections, and the new one


async def test_a_421_to_mail_on_a_new_connection_still_defers(env):
    mx = FakeMX(MX1)
    mx.handler.mail_reply = "421 4.3.2 mx.example.test Service shutting down"
    await env.serve(mx)
    [out] = await env.agent().deliver(request("single.test", "a@single.test"))
    assert not isinstance(out, Delivered) and out.status.startswith("4"), out
    assert mx.connections == 1 and not mx.handler.messages


async def test_a_stale_pipelined_rset_moves_on_to_the_next_cached_connection(env):
    mx = FakeMX(MX1)
    mx.handler.pipelining = True
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    await asyncio.gather(*(agent.deliver(request("single.test", f"a{i}@single.test")) for i in range(2)))
    assert mx.connections == 2
    mx.handler.rset_replies = ["421 4.4.2 mx1.example.test Error: timeout exceeded"]
    [b] = await agent.deliver(request("single.test", "b@single.test"))
    assert isinstance(b, Delivered)
    assert mx.connections == 2 and mx.handler.rsets == 2  # the other cached connection, no new one
    assert sorted(m.rcpt_tos[0] for m in mx.handler.messages) == ["a0@single.test", "a1@single.test", "b@single.test"]


async def test_a_cached_connection_the_server_closed_is_replaced_with_pipelining(env):
    mx = FakeMX(MX1)
    mx.handler.pipelining = True
    await env.serve(mx)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    [a] = await agent.deliver(request("single.test", "a@single.test"))
    for proto in mx.protocols:
        proto.transport.close()
    await asyncio.wait([p._handler_coroutine for p in mx.protocols], timeout=10)
    [b] = await agent.deliver(request("single.test", "b@single.test"))
    assert isinstance(a, Delivered) and isinstance(b, Delivered), (a, b)
    assert mx.connections == 2
    assert [m.rcpt_tos for m in mx.handler.messages] == [["a@single.test"], ["b@single.test"]]


async def test_a_connection_lost_at_the_pipelined_rset_is_replaced_before_anything_is_sent(env):
    """The server hangs up on the group RSET+MAIL+RCPT+DATA of a reused
    connection (it had timed the idle connection out): a new connection
    delivers the message, and nothing failed or was logged for it."""
    groups: list[list[bytes]] = []

    async def script(reader, writer, server):
        writer.write(b"220 raw.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        while True:
            group = [await reader.readline()]
            while reader._buffer:  # the rest of the pipelined group
                group.append(await reader.readline())
            groups.append(group)
            if group[0] == b"RSET\r\n":
                return  # hang up: the cached connection was stale
            if group[0].startswith(b"QUIT") or not group[0]:
                return
            writer.write(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
            server.data.append(await reader.readuntil(b"\r\n.\r\n"))
            writer.write(b"250 2.0.0 Ok: queued\r\n")

    raw = RawServer("127.0.0.1", script)
    port = await env.serve(raw)
    agent = env.agent(smtp_connection_cache_time_limit=30)
    [a] = await agent.deliver(request(f"[127.0.0.1]:{port}", "a@x.test"))
    [b] = await agent.deliver(request(f"[127.0.0.1]:{port}", "b@x.test"))
    assert isinstance(a, Delivered) and isinstance(b, Delivered), (a, b)
    assert len(raw.data) == 2 and len(raw.writers) == 2
    assert [g[0] for g in groups] == [b"MAIL FROM:<a@sender.test>\r\n", b"RSET\r\n",
                                      b"MAIL FROM:<a@sender.test>\r\n"]
    assert groups[1][1:] == [b"MAIL FROM:<a@sender.test>\r\n", b"RCPT TO:<b@x.test>\r\n", b"DATA\r\n"]
    assert not [line for line in env.logs if "b@x.test" in line or "lost connection" in line]


async def test_idle_cached_connection_expires(env):
    now = [1000.0]
    mx = FakeMX(MX1)
    await env.serve(mx)
    values = dict(
        myhostname="client.sender.test",
        smtp_tcp_port=env.port,
        smtp_connection_cache_time_limit=2.0,
    )
    agent = SmtpAgent(
        SmtpClientSettings(**values),
        Resolver([env.dns.nameserver], timeout=2),
        log=env.logs.append,
        clock=lambda: now[0],
    )
    env.agents.append(agent)
    await agent.deliver(request("single.test", "a@single.test"))
    now[0] += 2.5  # idle longer than smtp_connection_cache_time_limit
    await agent.deliver(request("single.test", "b@single.test"))
    assert mx.connections == 2 and mx.handler.rsets == 0


# --------------------------------------------------------------------------
# Misc


def test_parse_nexthop():
    assert parse_nexthop("example.com") == parse_nexthop("Example.COM.:25")
    d = parse_nexthop("example.com:2525")
    assert (d.host, d.port, d.mx_lookup) == ("example.com", 2525, True)
    d = parse_nexthop("[mail.example.com]")
    assert (d.host, d.port, d.mx_lookup) == ("mail.example.com", 25, False)
    d = parse_nexthop("[192.0.2.1]:587")
    assert (d.host, d.port, d.mx_lookup) == ("192.0.2.1", 587, False)
    d = parse_nexthop("[ipv6:2001:db8::1]:26")
    assert (d.host, d.port, d.mx_lookup) == ("2001:db8::1", 26, False)
    d = parse_nexthop("[2001:db8::1]")
    assert (d.host, d.port, d.mx_lookup) == ("2001:db8::1", 25, False)
    assert parse_nexthop("192.0.2.1:26").mx_lookup is False
    for bad in ("", "[x", "host:port", "host:0", "[h]x"):
        with pytest.raises(ValueError):
            parse_nexthop(bad)


async def test_bad_nexthop_is_a_configuration_error(env):
    [out] = await env.agent(smtp_tcp_port=25).deliver(request("host:notaport"))
    assert isinstance(out, TemporaryFailure) and out.status == "4.3.5"




def _owned_by_a_process(local_port: int, remote_port: int) -> bool | None:
    """Whether the (IPv4) TCP connection from ``local_port`` to
    ``remote_port`` still has an owner (its inode in /proc/net/tcp; 0 once
    the owner closed it and only the kernel keeps it, to send what is
    left); None when the kernel has none."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)) == (local_port, remote_port):
                return int(fields[9]) != 0
    return None


async def test_a_next_hop_that_stops_reading_in_mid_message_does_not_keep_our_socket(env):
    """A server that takes DATA and then never reads the message: after
    smtp_data_xfer_timeout the delivery is deferred and the connection is
    cut.  (Closing it only made asyncio keep the socket open until the
    unsent rest was written: a hostile next hop could hold a descriptor and
    a message's bytes per delivery attempt for as long as it liked.)"""
    stalled, release = asyncio.Event(), asyncio.Event()
    peer: list[int] = []

    async def stop_reading(reader, writer, server):
        # (a small receive buffer: the message cannot all fit in the kernel's buffers)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer.write(b"220 raw.example.test ESMTP\r\n")
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-raw.example.test\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                peer.append(writer.get_extra_info("peername")[1])
                assert _owned_by_a_process(peer[0], env.port) is True  # (what the check below reads, while open)
                stalled.set()
                await release.wait()  # reads nothing more until the test is over
                return
            else:
                writer.write(b"250 ok\r\n")

    await env.serve(RawServer(MX1, stop_reading))
    big = BODY + (b"y" * 998 + b"\r\n") * 16000  # 16 MB
    try:
        [out] = await env.agent(smtp_data_xfer_timeout=0.5).deliver(
            request("single.test", "u@single.test", message=big))
        assert stalled.is_set()
        assert isinstance(out, TemporaryFailure) and out.status == "4.4.2", out
        await await_until(lambda: _owned_by_a_process(peer[0], env.port) is not True,
                          what="our end of the connection closed")
    finally:
        release.set()
