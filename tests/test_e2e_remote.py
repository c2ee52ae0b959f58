"""Remote delivery end to end: the real ``mailserver run`` process, a real
UDP DNS server on loopback serving test zones (``dns_nameservers``), and
fake MX servers (aiosmtpd) on 127.0.0.x sharing one port
(``smtp_tcp_port``)."""

from __future__ import annotations

import asyncio
import email
import email.policy

import pytest

from dnsserver import TestDNSServer
from fakemx import MX2, FakeMX, Handler, start_on_shared_port
from harness import ServerProcess, async_log, async_send, await_until, maildir_messages

MSG = b"From: bounces@virt.test\r\nSubject: remote\r\n\r\nto the world\r\n.leading dot\r\n"
ZONES = {
    "example.test": ["@ 60 IN MX 10 mx1.example.test.", "@ 60 IN MX 20 mx2.example.test.",
                     "mx1 60 IN A 127.0.0.2", "mx2 60 IN A 127.0.0.3"],
    "healthy.test": ["@ 60 IN MX 10 mx2.example.test."],
    "dead.test": ["@ 60 IN MX 10 mx.dead.test.", "mx 60 IN A 127.0.0.4"],
    "implicit.test": ["@ 60 IN A 127.0.0.3"],
    "null.test": ["@ 60 IN MX 0 ."],
    "flaky.test": ["@ 60 IN MX 10 mx2.example.test."],
    "loop.test": ["@ 60 IN MX 10 mx.test.example."],
    "mx.test.example": ["@ 60 IN A 127.0.0.1"],
}


@pytest.fixture
async def dns():
    async with TestDNSServer(ZONES) as server:
        yield server


class Env:
    def __init__(self, dns, port, tmp_path):
        self.dns = dns
        self.port = port
        self.tmp_path = tmp_path
        self.mx2 = FakeMX(MX2)
        self.server: ServerProcess | None = None

    def start_server(self, **params) -> ServerProcess:
        base = {"dns_nameservers": [self.dns.nameserver], "smtp_tcp_port": self.port, "dns_timeout": "2s",
                "smtp_connect_timeout": "2s"}
        base.update(params)
        self.server = ServerProcess(self.tmp_path, base).start()
        return self.server


@pytest.fixture
async def env(dns, tmp_path):
    e = Env(dns, 0, tmp_path)
    e.port = await start_on_shared_port(e.mx2)
    yield e
    if e.server is not None:
        await asyncio.to_thread(e.server.stop)
    await e.mx2.stop()


async def send(srv: ServerProcess, rcpts: list[str], msg: bytes = MSG, sender: str = "bounces@virt.test") -> None:
    await async_send(srv.host, srv.port, sender, rcpts, msg)


def dsn_of(srv: ServerProcess) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(m, policy=email.policy.default) for m in maildir_messages(srv.vmail / "bounces")]


def status_blocks(dsn) -> list:
    return [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"][0].get_payload()


async def test_refusing_first_mx_falls_back_to_the_second(env):
    srv = env.start_server()
    await send(srv, ["user@example.test"])
    await await_until(lambda: env.mx2.handler.messages, what="delivery to the second MX")
    got = env.mx2.handler.messages[0]
    assert got.rcpt_tos == ["user@example.test"] and got.mail_from == "bounces@virt.test"
    assert b"\r\n.leading dot\r\n" in got.data  # dot-stuffing undone by the receiver: transparent on the wire
    await async_log(srv, rf"to=<user@example.test>, relay=mx2.example.test\[127.0.0.3\]:{env.port}, .*status=sent")


async def test_implicit_mx_uses_the_domain_address(env):
    srv = env.start_server()
    await send(srv, ["user@implicit.test"])
    await await_until(lambda: env.mx2.handler.messages, what="implicit MX delivery")


@pytest.mark.parametrize("rcpt, dsn, text", [
    ("user@nosuch.example.test", "5.4.4", "Host or domain name not found"),
    ("user@null.test", "5.1.10", "does not accept mail"),
    ("user@loop.test", "5.4.6", "loops back to myself"),
])
async def test_permanent_dns_outcomes_bounce_with_a_dsn(env, rcpt, dsn, text):
    srv = env.start_server()
    await send(srv, [rcpt])
    await async_log(srv, rf"to=<{rcpt}>.*dsn={dsn}, status=bounced \(.*{text}")
    dsns = await await_until(lambda: dsn_of(srv), what="DSN")
    blocks = status_blocks(dsns[0])
    assert blocks[1]["Final-Recipient"] == f"rfc822; {rcpt}" and blocks[1]["Status"] == dsn
    assert env.mx2.handler.messages == []


async def test_servfail_defers_then_delivers_when_dns_recovers(env):
    env.dns.fail("flaky.test", "SERVFAIL")
    srv = env.start_server()
    await send(srv, ["user@flaky.test"])
    await async_log(srv, r"to=<user@flaky.test>.*dsn=4\.4\.3, status=deferred")
    assert env.mx2.handler.messages == []
    env.dns.clear_failures()
    await await_until(lambda: env.mx2.handler.messages, timeout=20, what="delivery after DNS recovery")
    await async_log(srv, r"to=<user@flaky.test>.*status=sent")


async def test_per_recipient_outcomes_are_persisted_and_not_redelivered_after_restart(env):
    handler = env.mx2.handler
    handler.rcpt_replies = {"later@healthy.test": "450 4.2.0 try later", "gone@healthy.test": "550 5.1.1 no such user"}
    srv = env.start_server(minimal_backoff_time="2s", maximal_backoff_time="4s")
    await send(srv, ["ok@healthy.test", "later@healthy.test", "gone@healthy.test"])
    await async_log(srv, r"to=<later@healthy.test>.*status=deferred \(host mx2.example.test\[127.0.0.3\] said: "
                         r"450 4.2.0 try later \(in reply to RCPT TO command\)\)")
    await async_log(srv, r"to=<gone@healthy.test>.*dsn=5\.1\.1, status=bounced")
    assert [m.rcpt_tos for m in handler.messages] == [["ok@healthy.test"]]
    dsns = await await_until(lambda: dsn_of(srv), what="DSN for the 5xx recipient")
    blocks = status_blocks(dsns[0])
    assert len(blocks) == 2 and blocks[1]["Final-Recipient"] == "rfc822; gone@healthy.test"
    assert blocks[1]["Remote-MTA"] == "dns; mx2.example.test"
    assert "550 5.1.1 no such user" in blocks[1]["Diagnostic-Code"]
    # Crash once the message is deferred and the DSN has left the queue (a
    # crash between the DSN's mailbox delivery and the removal of its queue
    # file would deliver it again: at-least-once, as Postfix), then restart
    # with a fixed remote: only the deferred recipient goes.
    await await_until(lambda: srv.queue_files("deferred") and srv.queue_ids() == srv.queue_ids("deferred"),
                      what="message deferred, DSN delivered and removed from the queue")
    await asyncio.to_thread(srv.kill)
    handler.rcpt_replies = {}
    await asyncio.to_thread(srv.start)
    await await_until(lambda: len(handler.messages) == 2, timeout=20, what="retry after restart")
    assert handler.messages[1].rcpt_tos == ["later@healthy.test"]
    await await_until(lambda: not srv.queue_files(), what="queue empty")
    assert len(handler.messages) == 2 and len(dsn_of(srv)) == 1


async def test_5xx_after_data_bounces_every_accepted_recipient(env):
    env.mx2.handler.data_reply = "554 5.7.1 content rejected"
    srv = env.start_server()
    await send(srv, ["a@healthy.test", "b@healthy.test"])
    await async_log(srv, r"to=<b@healthy.test>.*dsn=5\.7\.1, status=bounced .*in reply to end of DATA command")
    dsns = await await_until(lambda: dsn_of(srv), what="one DSN")
    assert len(status_blocks(dsns[0])) == 3  # per-message block + two recipients


async def test_relayhost_sends_everything_to_one_host_without_mx_lookup(env):
    srv = env.start_server(relayhost=f"[127.0.0.3]:{env.port}")
    await send(srv, ["someone@unresolvable.invalid"])
    await await_until(lambda: env.mx2.handler.messages, what="relayhost delivery")
    assert ("unresolvable.invalid", "MX") not in env.dns.queries


async def test_transport_maps_route_discard_error_and_smtp(env, tmp_path):
    (tmp_path / "transport").write_text(f"special.test smtp:[127.0.0.3]:{env.port}\n"
                                        "blackhole.test discard:\n"
                                        "closed.test error:5.7.1 this domain is closed\n"
                                        "later.test retry:4.3.0 not today\n")
    srv = env.start_server(transport_maps=[f"texthash:{tmp_path / 'transport'}"])
    await send(srv, ["a@special.test", "b@blackhole.test", "c@closed.test", "d@later.test"])
    await await_until(lambda: env.mx2.handler.messages, what="transport_maps smtp route")
    await async_log(srv, r"to=<b@blackhole.test>, relay=none, .*status=sent")
    await async_log(srv, r"to=<c@closed.test>, relay=none, .*dsn=5\.7\.1, status=bounced \(this domain is closed\)")
    await async_log(srv, r"to=<d@later.test>, relay=none, .*dsn=4\.3\.0, status=deferred \(not today\)")
    assert env.mx2.handler.messages[0].rcpt_tos == ["a@special.test"]


async def test_a_dead_destination_does_not_delay_a_healthy_one(env):
    srv = env.start_server(minimal_backoff_time="30s", maximal_backoff_time="60s")
    for i in range(10):  # ten deliveries: more than a pseudo-cohort (the initial window of 5)
        await send(srv, [f"u{i}@dead.test"])
    await async_log(srv, r"warning: destination smtp:dead.test is dead")
    await send(srv, ["fine@healthy.test"])
    await await_until(lambda: env.mx2.handler.messages, timeout=5, what="healthy delivery despite a dead one")
    await async_log(srv, r"to=<u\d@dead.test>.*status=deferred \(delivery temporarily suspended: connect to")


class Gate(Handler):
    """Holds every DATA reply until released; counts simultaneous sessions."""

    def __init__(self):
        super().__init__()
        self.waiting = 0
        self.peak = 0
        self.release = asyncio.Event()

    async def handle_DATA(self, server, session, envelope):
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1
        return await super().handle_DATA(server, session, envelope)


async def test_concurrency_window_starts_at_the_initial_value_and_never_exceeds_the_limit(dns, tmp_path):
    gate = Gate()
    mx = FakeMX(MX2, gate)
    port = await start_on_shared_port(mx)
    srv = ServerProcess(tmp_path, {"dns_nameservers": [dns.nameserver], "smtp_tcp_port": port,
                                   "initial_destination_concurrency": 3,
                                   "default_destination_concurrency_limit": 6}).start()
    try:
        for i in range(30):
            await send(srv, [f"u{i}@healthy.test"])
        await await_until(lambda: gate.waiting == 3, what="the initial window of 3 sessions")
        # Observation window: with every session held, no fourth may open.
        await asyncio.sleep(0.5)
        assert gate.waiting == 3 and mx.connections == 3
        gate.release.set()
        await await_until(lambda: len(gate.messages) == 30, timeout=30, what="all 30 delivered")
        assert gate.peak <= 6
    finally:
        await asyncio.to_thread(srv.stop)
        await mx.stop()


async def test_one_message_to_many_domains_is_delivered_in_parallel(dns, tmp_path):
    gate = Gate()
    mx = FakeMX(MX2, gate)
    port = await start_on_shared_port(mx)
    zones = {f"d{i}.test": ["@ 60 IN MX 10 mx2.example.test."] for i in range(10)}
    for origin, lines in zones.items():
        dns.set_zone(origin, lines)
    srv = ServerProcess(tmp_path, {"dns_nameservers": [dns.nameserver], "smtp_tcp_port": port}).start()
    try:
        await send(srv, [f"u{j}@d{i}.test" for i in range(10) for j in range(3)])
        await await_until(lambda: gate.waiting == 10, what="ten domains in parallel")
        gate.release.set()
        await await_until(lambda: len(gate.messages) == 10, what="one transaction per domain")
        assert sorted(len(m.rcpt_tos) for m in gate.messages) == [3] * 10
    finally:
        await asyncio.to_thread(srv.stop)
        await mx.stop()


async def test_transport_maps_lmtp_over_a_unix_socket_and_tcp(tmp_path):
    """transport_maps lmtp:unix:/path and lmtp:[127.0.0.1]:port through the real server:
    per-recipient replies after DATA are per-recipient outcomes."""
    from test_lmtp import FakeLMTP

    sock_lmtp = FakeLMTP(str(tmp_path / "lmtp.sock"))
    tcp_lmtp = FakeLMTP()
    await sock_lmtp.start()
    await tcp_lmtp.start()
    sock_lmtp.handler.data_replies = {"full@store.test": "452 4.2.2 <full@store.test> Mailbox full"}
    (tmp_path / "transport").write_text(f"store.test lmtp:unix:{tmp_path / 'lmtp.sock'}\n"
                                        f"tcp.test lmtp:[127.0.0.1]:{tcp_lmtp.port}\n")
    srv = ServerProcess(tmp_path, {"transport_maps": [f"texthash:{tmp_path / 'transport'}"]})
    await asyncio.to_thread(srv.start)
    try:
        await send(srv, ["a@store.test", "full@store.test", "b@tcp.test"])
        await await_until(lambda: sock_lmtp.handler.messages and tcp_lmtp.handler.messages, what="LMTP deliveries")
        await async_log(srv, rf"lmtp\[\d+\]: \w+: to=<a@store.test>, relay=localhost\[{tmp_path / 'lmtp.sock'}\], "
                             r".*status=sent")
        await async_log(srv, r"to=<full@store.test>.*dsn=4\.2\.2, status=deferred .*Mailbox full")
        await async_log(srv, r"to=<b@tcp.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent")
    finally:
        await asyncio.to_thread(srv.stop)
        await sock_lmtp.stop()
        await tcp_lmtp.stop()


async def test_lmtp_relative_unix_socket_is_in_the_queue_directory_and_lmtp_tcp_port_applies(tmp_path):
    """Postfix: lmtp:unix:private/NAME names a socket under queue_directory;
    lmtp:[host] without a port uses lmtp_tcp_port."""
    from test_lmtp import FakeLMTP

    spool = tmp_path / "spool"
    (spool / "private").mkdir(parents=True)
    sock_lmtp = FakeLMTP(str(spool / "private" / "lmtp.sock"))
    tcp_lmtp = FakeLMTP()
    await sock_lmtp.start()
    await tcp_lmtp.start()
    (tmp_path / "transport").write_text("store.test lmtp:unix:private/lmtp.sock\n"
                                        "tcp.test lmtp:[127.0.0.1]\n")
    srv = ServerProcess(tmp_path, {"transport_maps": [f"texthash:{tmp_path / 'transport'}"],
                                   "lmtp_tcp_port": tcp_lmtp.port})
    await asyncio.to_thread(srv.start)
    try:
        await send(srv, ["a@store.test", "b@tcp.test"])
        await await_until(lambda: sock_lmtp.handler.messages and tcp_lmtp.handler.messages, what="LMTP deliveries")
        await async_log(srv, rf"to=<a@store.test>, relay=localhost\[{spool / 'private' / 'lmtp.sock'}\], "
                             r".*status=sent")
        await async_log(srv, rf"to=<b@tcp.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{tcp_lmtp.port}, .*status=sent")
    finally:
        await asyncio.to_thread(srv.stop)
        await sock_lmtp.stop()
        await tcp_lmtp.stop()
