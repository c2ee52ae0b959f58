"""LMTP delivery (``SmtpClientSettings(lmtp=True)``, Postfix lmtp(8), RFC 2033)
against real fake LMTP servers on 127.0.0.1 and on Unix sockets in tmp dirs.

``FakeLMTP`` is aiosmtpd's ``LMTP`` server (LHLO only: EHLO/HELO are
refused) whose handler answers one reply per accepted recipient after the
final dot, and misbehaves on request; ``RawLMTP`` is a byte-level scripted
LMTP server for wire checks and for replies coalesced or split across TCP
segments.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile

import pytest
import trustme
from aiosmtpd.lmtp import LMTP
from dnsserver import TestDNSServer
from fakemx import FakeMX, Handler, Received

from mailserver.delivery import (
    Delivered,
    DeliveryRequest,
    PermanentFailure,
    Recipient,
    TemporaryFailure,
)
from mailserver.delivery.smtp import (
    Destination,
    SmtpAgent,
    SmtpClientSettings,
    parse_lmtp_nexthop,
)
from mailserver.dns import Resolver

BODY = b"From: a@sender.test\r\nTo: x@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------
# Fake LMTP servers


class LmtpHandler(Handler):
    """The fake MX handler (tests/fakemx.py) answering like an LMTP server:
    after the final dot one reply per accepted recipient (``data_replies``
    overrides the default ``250 2.0.0 <rcpt> Saved``); ``rcpt_replies``
    rejects at RCPT time; ``drop_after=N`` sends N replies, then drops the
    connection; ``stall_after=N`` sends N replies, then says nothing."""

    def __init__(self):
        super().__init__()
        self.data_replies: dict[str, str] = {}
        self.drop_after: int | None = None
        self.stall_after: int | None = None

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                session.ssl is not None,
                list(envelope.mail_options),
            )
        )
        replies = [
            self.data_replies.get(r, f"250 2.0.0 <{r}> Saved") for r in envelope.rcpt_tos
        ]
        for limit, drop in ((self.drop_after, True), (self.stall_after, False)):
            if limit is not None:
                for reply in replies[:limit]:
                    await server.push(reply)
                if drop:
                    server.transport.close()
                await asyncio.get_running_loop().create_future()  # cancelled on close
        for reply in replies[:-1]:
            await server.push(reply)
        return replies[-1]


class FakeLMTP(FakeMX):
    """aiosmtpd's LMTP server on 127.0.0.1 (``path=None``) or a Unix socket."""

    def __init__(self, path: str | None = None, handler: LmtpHandler | None = None,
                 **lmtp_kwargs):
        self.path = path
        self.handler = handler or LmtpHandler()
        self.lmtp_kwargs = lmtp_kwargs
        self.protocols: list[LMTP] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def nexthop(self) -> str:
        return f"unix:{self.path}" if self.path else f"[{LOOPBACK}]:{self.port}"

    @property
    def relay(self) -> str:
        return f"localhost[{self.path}]" if self.path else f"{LOOPBACK}[{LOOPBACK}]:{self.port}"

    @property
    def namaddr(self) -> str:
        return f"localhost[{self.path}]" if self.path else f"{LOOPBACK}[{LOOPBACK}]"

    def _factory(self):
        proto = LMTP(
            self.handler,
            hostname="lmtp.example.test",
            loop=asyncio.get_running_loop(),
            **self.lmtp_kwargs,
        )
        self.protocols.append(proto)
        return proto

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.path:
            self.server = await loop.create_unix_server(self._factory, self.path)
        else:
            self.server = await loop.create_server(self._factory, LOOPBACK, 0)
            self.port = self.server.sockets[0].getsockname()[1]


class RawLMTP:
    """A byte-level LMTP server on 127.0.0.1.  ``after_dot(rcpts, writer)``
    (a coroutine) writes the replies to the final dot; it returns False to
    hang up.  Records every command line and the raw DATA bytes."""

    def __init__(self, after_dot, *, lhlo: bytes = b"250-raw.example.test\r\n250 8BITMIME\r\n",
                 rcpt_replies: dict[bytes, bytes] | None = None):
        self.after_dot = after_dot
        self.lhlo = lhlo
        self.rcpt_replies = rcpt_replies or {}
        self.commands: list[bytes] = []
        self.data: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task] = []
        self.port = 0

    @property
    def nexthop(self) -> str:
        return f"[{LOOPBACK}]:{self.port}"

    @property
    def relay(self) -> str:
        return f"{LOOPBACK}[{LOOPBACK}]:{self.port}"

    async def _handle(self, reader, writer):
        self.tasks.append(asyncio.current_task())
        self.writers.append(writer)
        self.connections += 1
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _session(self, reader, writer):
        writer.write(b"220 raw.example.test LMTP\r\n")
        rcpts: list[bytes] = []
        while True:
            line = await reader.readline()
            if not line:
                return
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"LHLO":
                writer.write(self.lhlo)
            elif verb in (b"EHLO", b"HELO"):
                writer.write(b"500 5.5.1 LHLO please\r\n")
            elif verb == b"MAIL":
                rcpts = []
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                address = line[8:].strip().strip(b"<>")
                reply = self.rcpt_replies.get(address)
                if reply:
                    writer.write(reply)
                else:
                    rcpts.append(address)
                    writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                self.data.append(await reader.readuntil(b"\r\n.\r\n"))
                if await self.after_dot(rcpts, writer) is False:
                    return
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                return
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for writer in self.writers:
            writer.close()
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=10)


async def saved(rcpts, writer):
    writer.write(b"".join(b"250 2.0.0 <%s> Saved\r\n" % r for r in rcpts))


# --------------------------------------------------------------------------
# Fixtures and helpers


class NoDns:
    """A resolver that must not be used."""

    async def addresses(self, hostname):
        raise AssertionError(f"unexpected address lookup for {hostname}")

    async def mx_hosts(self, domain, limit=None):
        raise AssertionError(f"unexpected MX lookup for {domain}")


@pytest.fixture
def sockdir():
    # A short directory: AF_UNIX paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="lmtp-") as path:
        yield path


class Env:
    def __init__(self, sockdir: str):
        self.sockdir = sockdir
        self.servers: list = []
        self.agents: list[SmtpAgent] = []
        self.logs: list[str] = []

    async def serve(self, server):
        await server.start()
        self.servers.append(server)
        return server

    async def lmtp(self, kind: str = "tcp", **kw) -> FakeLMTP:
        path = os.path.join(self.sockdir, "lmtp.sock") if kind == "unix" else None
        return await self.serve(FakeLMTP(path, **kw))

    def agent(self, resolver=None, **overrides) -> SmtpAgent:
        values = dict(
            myhostname="client.sender.test",
            smtp_connect_timeout=10,
            smtp_helo_timeout=10,
            smtp_mail_timeout=10,
            smtp_rcpt_timeout=10,
            smtp_data_init_timeout=10,
            smtp_data_xfer_timeout=10,
            smtp_data_done_timeout=10,
            smtp_rset_timeout=10,
            lmtp=True,
        )
        values.update(overrides)
        agent = SmtpAgent(SmtpClientSettings(**values), resolver or NoDns(), log=self.logs.append)
        self.agents.append(agent)
        return agent


@pytest.fixture
async def env(sockdir):
    state = Env(sockdir)
    yield state
    for agent in state.agents:
        await agent.close()
    for server in state.servers:
        await server.stop()


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


RCPTS = ("a@example.test", "b@example.test", "c@example.test")


# --------------------------------------------------------------------------
# Next hops


def test_parse_lmtp_nexthop():
    assert parse_lmtp_nexthop("unix:/run/dovecot/lmtp") == Destination(
        "localhost", 0, False, "/run/dovecot/lmtp"
    )
    assert parse_lmtp_nexthop("unix:/run/dovecot/lmtp").key == "unix:/run/dovecot/lmtp"
    assert parse_lmtp_nexthop("[127.0.0.1]:24") == Destination("127.0.0.1", 24, False)
    assert parse_lmtp_nexthop("[127.0.0.1]") == Destination("127.0.0.1", 24, False)
    assert parse_lmtp_nexthop("127.0.0.1").key == "[127.0.0.1]:24"
    # A host name is never an MX lookup, bracketed or not.
    assert parse_lmtp_nexthop("Store.Example.test") == Destination("store.example.test", 24, False)
    assert parse_lmtp_nexthop("store.example.test:2424") == Destination(
        "store.example.test", 2424, False
    )
    assert parse_lmtp_nexthop("inet:store.example.test:lmtp") == Destination(
        "store.example.test", 24, False
    )
    assert parse_lmtp_nexthop("inet:[::1]:2003") == Destination("::1", 2003, False)
    assert parse_lmtp_nexthop("mail", default_port=1024).port == 1024
    for bad in ("", "unix:", "[127.0.0.1", "host:99999", "inet:"):
        with pytest.raises(ValueError):
            parse_lmtp_nexthop(bad)


def test_agent_is_named_lmtp():
    agent = SmtpAgent(SmtpClientSettings(myhostname="h", lmtp=True), NoDns())
    assert agent.name == "lmtp"
    assert SmtpAgent(SmtpClientSettings(myhostname="h"), NoDns()).name == "smtp"


async def test_bad_nexthop_is_a_configuration_error(env):
    [out] = await env.agent().deliver(request("unix:"))
    assert isinstance(out, TemporaryFailure) and out.status == "4.3.5"
    assert out.relay == "none"


# --------------------------------------------------------------------------
# Delivery


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_all_recipients_delivered(env, kind):
    server = await env.lmtp(kind)
    out = await env.agent().deliver(request(server.nexthop, *RCPTS))
    assert out == [
        Delivered("2.0.0", f"250 2.0.0 <{r}> Saved", server.relay) for r in RCPTS
    ]
    [msg] = server.handler.messages
    assert msg.mail_from == "a@sender.test"
    assert msg.rcpt_tos == list(RCPTS)
    assert msg.data == BODY
    assert not msg.tls


async def test_relay_strings(env):
    tcp = await env.lmtp("tcp")
    unix = await env.lmtp("unix")
    agent = env.agent()
    [a] = await agent.deliver(request(f"[127.0.0.1]:{tcp.port}"))
    [b] = await agent.deliver(request(f"unix:{unix.path}"))
    assert a.relay == f"127.0.0.1[127.0.0.1]:{tcp.port}"
    assert b.relay == f"localhost[{env.sockdir}/lmtp.sock]"


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_mixed_replies_after_data(env, kind):
    server = await env.lmtp(kind)
    rcpts = ("full@example.test", "ok@example.test", "gone@example.test", "ok2@example.test")
    server.handler.data_replies = {
        "full@example.test": "452 4.2.2 <full@example.test> Mailbox full",
        "gone@example.test": "550 5.1.1 <gone@example.test> User doesn't exist",
    }
    out = await env.agent().deliver(request(server.nexthop, *rcpts))
    said = f"host {server.namaddr} said:"
    assert out == [
        TemporaryFailure(
            "4.2.2",
            f"{said} 452 4.2.2 <full@example.test> Mailbox full (in reply to end of DATA command)",
            server.relay,
        ),
        Delivered("2.0.0", "250 2.0.0 <ok@example.test> Saved", server.relay),
        PermanentFailure(
            "5.1.1",
            f"{said} 550 5.1.1 <gone@example.test> User doesn't exist "
            "(in reply to end of DATA command)",
            server.relay,
        ),
        Delivered("2.0.0", "250 2.0.0 <ok2@example.test> Saved", server.relay),
    ]
    assert len(server.handler.messages) == 1  # one transaction, no retry within the attempt
    assert server.connections == 1


async def test_rcpt_time_rejection_and_reply_mapping(env):
    server = await env.lmtp()
    server.handler.rcpt_replies = {"b@example.test": "550 5.1.1 <b@example.test> User unknown"}
    # Only a and c were accepted: the two replies after the dot are theirs.
    server.handler.data_replies = {"c@example.test": "452 4.2.2 <c@example.test> Over quota"}
    out = await env.agent().deliver(request(server.nexthop, *RCPTS))
    assert out[0] == Delivered("2.0.0", "250 2.0.0 <a@example.test> Saved", server.relay)
    assert out[1] == PermanentFailure(
        "5.1.1",
        f"host {server.namaddr} said: 550 5.1.1 <b@example.test> User unknown "
        "(in reply to RCPT TO command)",
        server.relay,
    )
    assert isinstance(out[2], TemporaryFailure) and out[2].status == "4.2.2"
    assert out[2].text.endswith("Over quota (in reply to end of DATA command)")
    assert server.handler.messages[0].rcpt_tos == ["a@example.test", "c@example.test"]


async def test_rcpt_time_rejection_of_the_only_recipient_sends_no_data(env):
    server = await env.lmtp("unix")
    server.handler.rcpt_replies = {"x@example.test": "550 5.1.1 <x@example.test> User unknown"}
    [out] = await env.agent().deliver(request(server.nexthop))
    assert isinstance(out, PermanentFailure) and out.status == "5.1.1"
    assert not server.handler.messages


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_connection_dropped_in_the_middle_of_the_replies(env, kind):
    server = await env.lmtp(kind)
    server.handler.drop_after = 1
    out = await env.agent().deliver(request(server.nexthop, *RCPTS))
    assert out[0] == Delivered("2.0.0", "250 2.0.0 <a@example.test> Saved", server.relay)
    for o in out[1:]:
        assert o == TemporaryFailure(
            "4.4.2",
            f"lost connection with {server.namaddr} while sending end of data -- "
            "message may be sent more than once",
            server.relay,
        )


async def test_connection_dropped_right_after_the_dot(env):
    server = await env.lmtp()
    server.handler.drop_after = 0
    out = await env.agent().deliver(request(server.nexthop, *RCPTS))
    assert all(isinstance(o, TemporaryFailure) and o.status == "4.4.2" for o in out)
    assert len(server.handler.messages) == 1


async def test_stall_in_the_middle_of_the_replies_times_out(env):
    server = await env.lmtp()
    server.handler.stall_after = 2
    out = await env.agent(smtp_data_done_timeout=0.5).deliver(request(server.nexthop, *RCPTS))
    assert [type(o) for o in out] == [Delivered, Delivered, TemporaryFailure]
    assert out[2] == TemporaryFailure(
        "4.4.2",
        f"conversation with {server.namaddr} timed out while sending end of data -- "
        "message may be sent more than once",
        server.relay,
    )


async def test_421_among_the_replies_defers_it_and_the_rest(env):
    async def replies(rcpts, writer):
        writer.write(b"250 2.0.0 <a> Saved\r\n421 4.3.2 Shutting down\r\n")
        await writer.drain()
        return False

    raw = await env.serve(RawLMTP(replies))
    agent = env.agent()
    out = await agent.deliver(request(raw.nexthop, *RCPTS))
    assert isinstance(out[0], Delivered)
    text = (
        "host 127.0.0.1[127.0.0.1] said: 421 4.3.2 Shutting down "
        "(in reply to end of DATA command)"
    )
    assert out[1:] == [TemporaryFailure("4.3.2", text, raw.relay)] * 2
    assert not agent._cache  # not reused


async def test_replies_in_one_segment(env):
    async def replies(rcpts, writer):
        writer.write(
            b"250 2.0.0 <a> Saved\r\n"
            b"452 4.2.2 <b> Mailbox full\r\n"
            b"550 5.1.1 <c> No such user\r\n"
        )

    raw = await env.serve(RawLMTP(replies))
    out = await env.agent().deliver(request(raw.nexthop, *RCPTS))
    assert out[0] == Delivered("2.0.0", "250 2.0.0 <a> Saved", raw.relay)
    assert isinstance(out[1], TemporaryFailure) and out[1].status == "4.2.2"
    assert isinstance(out[2], PermanentFailure) and out[2].status == "5.1.1"


async def test_replies_split_across_segments_and_multiline(env):
    async def replies(rcpts, writer):
        wire = (
            b"250-2.0.0 <a> Saved\r\n250 2.0.0 second line\r\n"
            b"250 2.1.5 <b> Saved\r\n"
            b"550-5.2.1 <c> Mailbox disabled\r\n550 5.2.1 for good\r\n"
        )
        for i in range(0, len(wire), 7):
            writer.write(wire[i : i + 7])
            await writer.drain()
            await asyncio.sleep(0.002)

    raw = await env.serve(RawLMTP(replies))
    out = await env.agent().deliver(request(raw.nexthop, *RCPTS))
    assert out == [
        Delivered("2.0.0", "250 2.0.0 <a> Saved 2.0.0 second line", raw.relay),
        Delivered("2.1.5", "250 2.1.5 <b> Saved", raw.relay),
        PermanentFailure(
            "5.2.1",
            "host 127.0.0.1[127.0.0.1] said: 550 5.2.1 <c> Mailbox disabled 5.2.1 for good "
            "(in reply to end of DATA command)",
            raw.relay,
        ),
    ]


async def test_partial_reply_then_hang_up(env):
    async def replies(rcpts, writer):
        writer.write(b"250 2.0.0 <a> Saved\r\n250 2.0.0 <b> Sa")
        await writer.drain()
        return False

    raw = await env.serve(RawLMTP(replies))
    out = await env.agent().deliver(request(raw.nexthop, *RCPTS))
    assert isinstance(out[0], Delivered)
    assert [o.status for o in out[1:]] == ["4.4.2", "4.4.2"]
    assert all(isinstance(o, TemporaryFailure) for o in out[1:])


async def test_malformed_reply_after_the_dot(env):
    async def replies(rcpts, writer):
        writer.write(b"250 2.0.0 <a> Saved\r\nwhat?\r\n")
        await writer.drain()

    raw = await env.serve(RawLMTP(replies))
    agent = env.agent()
    out = await agent.deliver(request(raw.nexthop, *RCPTS))
    assert isinstance(out[0], Delivered)
    for o in out[1:]:
        assert isinstance(o, TemporaryFailure) and o.status == "4.5.0"
        assert "malformed reply" in o.text
    assert not agent._cache


async def test_extra_replies_prevent_reuse(env):
    async def replies(rcpts, writer):
        writer.write(b"250 2.0.0 one\r\n250 2.0.0 two\r\n")

    raw = await env.serve(RawLMTP(replies))
    agent = env.agent()
    [out] = await agent.deliver(request(raw.nexthop))
    assert out == Delivered("2.0.0", "250 2.0.0 one", raw.relay)
    assert not agent._cache
    assert any(line.startswith("warning: 4ABC: host ") and "more replies than recipients" in line
               for line in env.logs), env.logs
    [out] = await agent.deliver(request(raw.nexthop))
    assert isinstance(out, Delivered)
    assert raw.connections == 2


async def test_dot_stuffing_crlf_and_lhlo_on_the_wire(env):
    raw = await env.serve(RawLMTP(saved))
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
    out = await env.agent().deliver(request(raw.nexthop, "a@example.test", "b@example.test",
                                             message=message))
    assert [type(o) for o in out] == [Delivered, Delivered]
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
    assert raw.commands[:5] == [
        b"LHLO client.sender.test\r\n",
        b"MAIL FROM:<a@sender.test>\r\n",
        b"RCPT TO:<a@example.test>\r\n",
        b"RCPT TO:<b@example.test>\r\n",
        b"DATA\r\n",
    ]


async def test_large_message_over_unix_socket(env):
    server = await env.lmtp("unix", data_size_limit=None)
    line = b"x" * 998 + b"\r\n"
    message = b"Subject: big\r\n\r\n" + line * 6000  # ~6 MB: flow control kicks in
    out = await env.agent().deliver(request(server.nexthop, *RCPTS, message=message))
    assert all(isinstance(o, Delivered) for o in out)
    assert server.handler.messages[0].data == message


async def test_lhlo_rejected_is_not_retried_with_helo(env):
    raw = await env.serve(RawLMTP(saved, lhlo=b"500 5.5.1 go away\r\n"))
    [out] = await env.agent().deliver(request(raw.nexthop))
    assert out == PermanentFailure(
        "5.5.1", "host 127.0.0.1[127.0.0.1] refused to talk to me: 500 5.5.1 go away", raw.relay
    )
    assert [c[:4] for c in raw.commands] == [b"LHLO"]


async def test_own_hostname_in_lhlo_is_not_a_loop(env):
    raw = await env.serve(RawLMTP(saved, lhlo=b"250 client.sender.test\r\n"))
    [out] = await env.agent(lmtp_tcp_port=raw.port).deliver(request("127.0.0.1"))
    assert isinstance(out, Delivered)


async def test_connection_reuse_with_rset(env):
    server = await env.lmtp("unix")
    agent = env.agent()
    for _ in range(3):
        out = await agent.deliver(request(server.nexthop, *RCPTS[:2]))
        assert all(isinstance(o, Delivered) for o in out)
    assert server.connections == 1
    assert server.handler.rsets == 2
    assert len(server.handler.messages) == 3


@pytest.mark.parametrize("refusal", ["502 5.5.2 Error: command not recognized", None], ids=["refused", "silent"])
async def test_an_rset_refused_or_unanswered_over_lmtp_moves_the_delivery_to_a_new_connection(env, refusal):
    """LMTP always pipelines, so the RSET of a reused connection leads the
    next group: when it is refused (or not answered within smtp_rset_timeout)
    the connection is dropped, no recipient is failed, and a new connection
    delivers the message once."""
    server = await env.lmtp()
    agent = env.agent(smtp_rset_timeout=1)
    [a] = await agent.deliver(request(server.nexthop, RCPTS[0]))
    if refusal is None:
        server.handler.rset_stall = True
    else:
        server.handler.rset_reply = refusal
    [b] = await agent.deliver(request(server.nexthop, RCPTS[1]))
    assert isinstance(a, Delivered) and isinstance(b, Delivered), (a, b)
    assert server.handler.rsets == 1 and server.connections == 2
    assert [m.rcpt_tos for m in server.handler.messages] == [[RCPTS[0]], [RCPTS[1]]]


async def test_reuse_after_a_per_recipient_failure(env):
    server = await env.lmtp()
    server.handler.data_replies = {"b@example.test": "452 4.2.2 full"}
    agent = env.agent()
    await agent.deliver(request(server.nexthop, *RCPTS))
    out = await agent.deliver(request(server.nexthop, "a@example.test"))
    assert isinstance(out[0], Delivered)
    assert server.connections == 1


async def test_missing_unix_socket(env):
    path = os.path.join(env.sockdir, "nothing-here")
    [out] = await env.agent().deliver(request(f"unix:{path}"))
    assert out == TemporaryFailure(
        "4.4.1", f"connect to localhost[{path}]: No such file or directory", "none"
    )


async def test_connection_refused_tcp(env):
    server = await env.lmtp()
    port = server.port
    await server.stop()
    env.servers.remove(server)
    [out] = await env.agent().deliver(request(f"[127.0.0.1]:{port}"))
    assert out == TemporaryFailure(
        "4.4.1", f"connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused", "none"
    )


# --------------------------------------------------------------------------
# DNS


async def test_literal_nexthop_needs_no_dns(env):
    server = await env.lmtp()
    # NoDns fails the test on any lookup; a literal is used as is.
    [out] = await env.agent(resolver=NoDns()).deliver(request(f"[127.0.0.1]:{server.port}"))
    assert isinstance(out, Delivered)
    [out] = await env.agent(resolver=NoDns(), lmtp_tcp_port=server.port).deliver(
        request("127.0.0.1")
    )
    assert isinstance(out, Delivered)


async def test_host_nexthop_uses_address_records_never_mx(env):
    server = await env.lmtp()
    zones = {
        "store.test": [
            "@ 300 IN MX 10 elsewhere.store.test.",
            "@ 300 IN A 127.0.0.1",
            "elsewhere 300 IN A 127.0.0.9",
        ]
    }
    async with TestDNSServer(zones) as dns:
        resolver = Resolver([dns.nameserver], timeout=2)
        agent = env.agent(resolver=resolver, lmtp_tcp_port=server.port)
        [out] = await agent.deliver(request("store.test"))
        assert out == Delivered(
            "2.0.0", "250 2.0.0 <x@example.test> Saved", f"store.test[127.0.0.1]:{server.port}"
        )
        assert all(qtype != "MX" for _, qtype in dns.queries)
        # An empty nexthop means the recipient's domain, still without MX.
        [out] = await agent.deliver(request("", "u@store.test"))
        assert isinstance(out, Delivered)
        assert all(qtype != "MX" for _, qtype in dns.queries)


# --------------------------------------------------------------------------
# TLS


def make_tls():
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("lmtp.example.test", "localhost").configure_cert(server_ctx)
    return ca, server_ctx


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_opportunistic_starttls(env, kind):
    _, server_ctx = make_tls()
    server = await env.lmtp(kind, tls_context=server_ctx)
    out = await env.agent(smtp_tls_security_level="may").deliver(
        request(server.nexthop, *RCPTS)
    )
    assert all(isinstance(o, Delivered) for o in out)
    assert server.handler.messages[0].tls


async def test_starttls_reply_collection_and_reuse(env):
    _, server_ctx = make_tls()
    server = await env.lmtp(tls_context=server_ctx)
    server.handler.data_replies = {"b@example.test": "550 5.1.1 no"}
    agent = env.agent(smtp_tls_security_level="may")
    for _ in range(2):
        out = await agent.deliver(request(server.nexthop, *RCPTS))
        assert [type(o) for o in out] == [Delivered, PermanentFailure, Delivered]
    assert server.connections == 1
    assert all(m.tls for m in server.handler.messages)


async def test_tls_level_none_never_starts_tls(env):
    _, server_ctx = make_tls()
    server = await env.lmtp(tls_context=server_ctx)
    [out] = await env.agent(smtp_tls_security_level="none").deliver(request(server.nexthop))
    assert isinstance(out, Delivered)
    assert not server.handler.messages[0].tls
