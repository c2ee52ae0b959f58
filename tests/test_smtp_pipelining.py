"""ESMTP PIPELINING (RFC 2920) in the smtp/lmtp delivery agent, against a
byte-level fake server on 127.0.0.1.

``PipeMX`` records every ``data_received`` chunk and every write it makes
(``conn.events``), so the tests can see which commands travelled together and
whether the client waited for a reply before sending the next command.  When
it announces PIPELINING it also holds its replies to MAIL FROM and RCPT TO
until it has read DATA: a client that waited for a reply before sending the
rest of the group would hang (and time out) instead of passing.

The agent, its settings and the request come from the smtp client tests
(``tests/test_smtp_client.py``: ``Env``, ``env``, ``request``, ``BODY``).  The
last test talks to this project's own smtpd (which announces PIPELINING and
refuses unannounced pipelining), embedded as in ``tests/test_api.py``.
"""

from __future__ import annotations

import asyncio
import io

import test_smtp_client
from harness import await_until
from test_api import maildir, make_config
from test_smtp_client import BODY, Env, request

from mailserver import MailServer
from mailserver.delivery import Delivered, PermanentFailure, TemporaryFailure

# The smtp client tests' fixtures, shared rather than copied.
dns_server = test_smtp_client.dns_server
env = test_smtp_client.env

HOST = "127.0.0.1"
NAMADDR = f"{HOST}[{HOST}]"
R1, R2, R3 = "a@example.test", "b@example.test", "c@example.test"


# --------------------------------------------------------------------------
# The fake server


class PipeMX:
    """A scripted ESMTP (or LMTP) server.  ``rcpt_replies`` maps addresses to
    reply lines (a 421 is followed by a hang-up); ``mail_reply`` rejects
    MAIL FROM; ``broken_354`` answers DATA with 354 even without recipients;
    ``stall_rcpt`` never answers RCPT TO, ``drop_rcpt`` hangs up instead;
    ``extra_reply`` sends one reply too
    many after the end of data."""

    def __init__(
        self,
        *,
        pipelining: bool = True,
        hold: bool | None = None,
        lmtp: bool = False,
        mail_reply: bytes | None = None,
        rcpt_replies: dict[str, bytes] | None = None,
        no_rcpt_reply: bytes = b"554 5.5.1 Error: no valid recipients\r\n",
        broken_354: bool = False,
        stall_rcpt: bool = False,
        drop_rcpt: bool = False,
        extra_reply: bool = False,
    ):
        self.pipelining = pipelining
        self.hold = pipelining if hold is None else hold
        self.lmtp = lmtp
        self.mail_reply = mail_reply
        self.rcpt_replies = rcpt_replies or {}
        self.no_rcpt_reply = no_rcpt_reply
        self.broken_354 = broken_354
        self.stall_rcpt = stall_rcpt
        self.drop_rcpt = drop_rcpt
        self.extra_reply = extra_reply
        self.conns: list[_Conn] = []
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rsets = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def nexthop(self) -> str:
        return f"[{HOST}]:{self.port}"

    @property
    def relay(self) -> str:
        return f"{NAMADDR}:{self.port}"

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), HOST, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for conn in self.conns:
            conn.transport.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class _Conn(asyncio.Protocol):
    def __init__(self, server: PipeMX):
        self.server = server
        self.events: list[tuple[str, bytes]] = []  # ("in"|"out", bytes), in order
        self.commands: list[bytes] = []
        self.buffer = bytearray()
        self.held: list[bytes] = []
        self.in_data = False
        self.in_mail = False
        self.mail_from = ""
        self.rcpts: list[str] = []
        self.stopped = False  # hung up or stalled: ignore further input
        self.gone = asyncio.Event()

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.conns.append(self)
        self._out(b"220 pipe.example.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.events.append(("in", data))
        if self.stopped:
            return
        self.buffer.extend(data)
        while not self.stopped:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    body, used = b"", 3
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        return
                    body, used = bytes(self.buffer[: end + 2]), end + 5
                del self.buffer[:used]
                self.in_data = False
                self._end_of_data(body)
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            self.commands.append(line)
            self._command(line)

    def connection_lost(self, exc) -> None:
        self.gone.set()

    # the dialogue

    def _out(self, data: bytes) -> None:
        self.events.append(("out", data))
        self.transport.write(data)

    def _reply(self, data: bytes, *, hold: bool = False) -> None:
        """Replies to MAIL/RCPT wait (when ``hold``) for the next other reply
        and go out with it in one write."""
        self.held.append(data)
        if not (hold and self.server.hold):
            self._out(b"".join(self.held))
            self.held.clear()

    def _hang_up(self) -> None:
        self.stopped = True
        self.transport.close()

    def _command(self, line: bytes) -> None:
        s = self.server
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb in (b"EHLO", b"LHLO"):
            ext = b"250-PIPELINING\r\n" if s.pipelining else b""
            self._reply(b"250-pipe.example.test\r\n" + ext + b"250 8BITMIME\r\n")
        elif verb == b"MAIL":
            if s.mail_reply:
                self._reply(s.mail_reply, hold=True)
                return
            self.in_mail, self.mail_from, self.rcpts = True, arg[6:-1].decode(), []
            self._reply(b"250 2.1.0 Ok\r\n", hold=True)
        elif verb == b"RCPT":
            address = arg[4:-1].decode()
            if not self.in_mail:
                self._reply(b"503 5.5.1 Error: need MAIL command\r\n", hold=True)
            elif s.stall_rcpt:
                self.stopped = True  # say nothing, ever
            elif s.drop_rcpt:
                self._reply(b"", hold=False)
                self._hang_up()
            elif address in s.rcpt_replies:
                reply = s.rcpt_replies[address]
                if reply.startswith(b"421"):
                    self._reply(reply)
                    self._hang_up()
                else:
                    self._reply(reply, hold=True)
            else:
                self.rcpts.append(address)
                self._reply(b"250 2.1.5 Ok\r\n", hold=True)
        elif verb == b"DATA":
            if not self.in_mail:
                self._reply(b"503 5.5.1 Error: need MAIL command\r\n")
            elif not self.rcpts and not s.broken_354:
                self._reply(s.no_rcpt_reply)
            else:
                self.in_data = True
                self._reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            s.rsets += 1
            self.in_mail = False
            self._reply(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self._reply(b"221 2.0.0 Bye\r\n")
            self._hang_up()
        else:
            self._reply(b"502 5.5.2 Error: command not recognized\r\n")

    def _end_of_data(self, body: bytes) -> None:
        s = self.server
        s.messages.append((self.mail_from, list(self.rcpts), body))
        self.in_mail = False
        n = len(s.messages)
        if s.lmtp:
            reply = b"".join(b"250 2.0.0 <%s> Saved\r\n" % r.encode() for r in self.rcpts)
        else:
            reply = b"250 2.0.0 Ok: queued as Q%d\r\n" % n
        if s.extra_reply:
            reply += b"250 2.0.0 one more\r\n"
        self._reply(reply)


# --------------------------------------------------------------------------
# Helpers


async def serve(env: Env, server: PipeMX) -> PipeMX:
    await server.start()
    env.servers.append(server)
    env.port = server.port
    return server


def transaction_events(conn: _Conn) -> list[tuple[str, bytes]]:
    """The events after the greeting and the EHLO exchange."""
    assert conn.events[0][0] == "out" and conn.events[1] == ("in", b"EHLO client.sender.test\r\n")
    assert conn.events[2][0] == "out"
    return conn.events[3:]


def said(reply: str, command: str) -> str:
    return f"host {NAMADDR} said: {reply} (in reply to {command} command)"


WIRE_BODY = BODY + b".\r\n"  # BODY has CRLF endings and no leading dots
GROUP = (
    b"MAIL FROM:<a@sender.test>\r\n"
    b"RCPT TO:<a@example.test>\r\n"
    b"RCPT TO:<b@example.test>\r\n"
    b"DATA\r\n"
)


# --------------------------------------------------------------------------
# Pipelined and not


async def test_pipelined_group_is_one_write(env):
    mx = await serve(env, PipeMX())
    out = await env.agent().deliver(request(mx.nexthop, R1, R2))
    assert out == [Delivered("2.0.0", "250 2.0.0 Ok: queued as Q1", mx.relay)] * 2
    assert mx.messages == [("a@sender.test", [R1, R2], BODY)]
    [conn] = mx.conns
    assert transaction_events(conn) == [
        ("in", GROUP),
        ("out", (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                 b"354 End data with <CR><LF>.<CR><LF>\r\n")),
        ("in", WIRE_BODY),  # body and final dot in one write
        ("out", b"250 2.0.0 Ok: queued as Q1\r\n"),
    ]


async def test_without_pipelining_commands_go_one_at_a_time(env):
    mx = await serve(env, PipeMX(pipelining=False))
    out = await env.agent().deliver(request(mx.nexthop, R1, R2))
    assert out == [Delivered("2.0.0", "250 2.0.0 Ok: queued as Q1", mx.relay)] * 2
    [conn] = mx.conns
    assert transaction_events(conn) == [
        ("in", b"MAIL FROM:<a@sender.test>\r\n"),
        ("out", b"250 2.1.0 Ok\r\n"),
        ("in", b"RCPT TO:<a@example.test>\r\n"),
        ("out", b"250 2.1.5 Ok\r\n"),
        ("in", b"RCPT TO:<b@example.test>\r\n"),
        ("out", b"250 2.1.5 Ok\r\n"),
        ("in", b"DATA\r\n"),
        ("out", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        ("in", WIRE_BODY),
        ("out", b"250 2.0.0 Ok: queued as Q1\r\n"),
    ]


async def test_without_pipelining_no_accepted_recipient_sends_rset_not_data(env):
    mx = await serve(env, PipeMX(pipelining=False, rcpt_replies={
        R1: b"550 5.1.1 <a@example.test>: User unknown\r\n",
    }))
    agent = env.agent(smtp_connection_cache_time_limit=30)
    [out] = await agent.deliver(request(mx.nexthop, R1))
    assert isinstance(out, PermanentFailure) and out.status == "5.1.1"
    assert mx.conns[0].commands[1:] == [b"MAIL FROM:<a@sender.test>", b"RCPT TO:<a@example.test>",
                                        b"RSET"]
    assert agent._cache  # reusable


async def test_size_and_body_parameters_in_the_group(env):
    mx = await serve(env, PipeMX())
    [out] = await env.agent().deliver(request(mx.nexthop, R1, body_8bit=True))
    assert isinstance(out, Delivered)
    assert mx.conns[0].events[3] == (
        "in",
        b"MAIL FROM:<a@sender.test> BODY=8BITMIME\r\nRCPT TO:<a@example.test>\r\nDATA\r\n",
    )


# --------------------------------------------------------------------------
# Replies


async def test_mail_from_rejected_fails_every_recipient(env):
    reply = b"553 5.7.1 <a@sender.test>: Sender address rejected: Access denied\r\n"
    mx = await serve(env, PipeMX(mail_reply=reply))
    agent = env.agent(smtp_connection_cache_time_limit=30)
    out = await agent.deliver(request(mx.nexthop, R1, R2))
    text = said("553 5.7.1 <a@sender.test>: Sender address rejected: Access denied", "MAIL FROM")
    assert out == [PermanentFailure("5.7.1", text, mx.relay)] * 2
    assert mx.messages == []
    # The replies to RCPT TO and DATA were read; the session ends with QUIT.
    [conn] = mx.conns
    await asyncio.wait_for(conn.gone.wait(), 5)
    assert conn.commands[1:] == GROUP.split(b"\r\n")[:-1] + [b"QUIT"]
    assert not agent._cache


async def test_one_of_two_recipients_rejected(env):
    rejected = b"550 5.1.1 <b@example.test>: Recipient address rejected: User unknown\r\n"
    mx = await serve(env, PipeMX(rcpt_replies={R2: rejected}))
    out = await env.agent().deliver(request(mx.nexthop, R1, R2))
    assert out == [
        Delivered("2.0.0", "250 2.0.0 Ok: queued as Q1", mx.relay),
        PermanentFailure(
            "5.1.1",
            said("550 5.1.1 <b@example.test>: Recipient address rejected: User unknown",
                 "RCPT TO"),
            mx.relay,
        ),
    ]
    assert mx.messages == [("a@sender.test", [R1], BODY)]
    assert transaction_events(mx.conns[0])[0] == ("in", GROUP)


async def test_rcpt_4xx_and_5xx_among_accepted(env):
    mx = await serve(env, PipeMX(rcpt_replies={
        R2: b"450 4.2.0 <b@example.test>: Mailbox busy\r\n",
        R3: b"550 5.1.1 <c@example.test>: User unknown\r\n",
    }))
    out = await env.agent().deliver(request(mx.nexthop, R3, R1, R2))
    assert out == [
        PermanentFailure("5.1.1", said("550 5.1.1 <c@example.test>: User unknown", "RCPT TO"),
                         mx.relay),
        Delivered("2.0.0", "250 2.0.0 Ok: queued as Q1", mx.relay),
        TemporaryFailure("4.2.0", said("450 4.2.0 <b@example.test>: Mailbox busy", "RCPT TO"),
                         mx.relay),
    ]
    assert mx.messages == [("a@sender.test", [R1], BODY)]


async def test_all_recipients_rejected_then_rset_and_reuse(env):
    mx = await serve(env, PipeMX(rcpt_replies={
        R1: b"550 5.1.1 <a@example.test>: User unknown\r\n",
        R2: b"550 5.1.1 <b@example.test>: User unknown\r\n",
    }))
    agent = env.agent(smtp_connection_cache_time_limit=30)
    out = await agent.deliver(request(mx.nexthop, R1, R2))
    assert out == [
        PermanentFailure("5.1.1", said(f"550 5.1.1 <{r}>: User unknown", "RCPT TO"), mx.relay)
        for r in (R1, R2)
    ]
    [conn] = mx.conns
    assert transaction_events(conn) == [
        ("in", GROUP),
        ("out", (b"250 2.1.0 Ok\r\n"
                 b"550 5.1.1 <a@example.test>: User unknown\r\n"
                 b"550 5.1.1 <b@example.test>: User unknown\r\n"
                 b"554 5.5.1 Error: no valid recipients\r\n")),
        ("in", b"RSET\r\n"),  # no message body
        ("out", b"250 2.0.0 Ok\r\n"),
    ]
    assert mx.messages == [] and mx.rsets == 1
    assert agent._cache

    mx.rcpt_replies = {}
    out = await agent.deliver(request(mx.nexthop, R1, R2))
    assert all(isinstance(o, Delivered) for o in out)
    assert len(mx.conns) == 1 and mx.rsets == 2  # RSET before the reuse
    assert mx.messages == [("a@sender.test", [R1, R2], BODY)]


async def test_broken_server_354_without_recipients_gets_an_empty_message(env):
    mx = await serve(env, PipeMX(broken_354=True, rcpt_replies={
        R1: b"550 5.1.1 <a@example.test>: User unknown\r\n",
    }))
    agent = env.agent(smtp_connection_cache_time_limit=30)
    [out] = await agent.deliver(request(mx.nexthop, R1))
    assert out == PermanentFailure(
        "5.1.1", said("550 5.1.1 <a@example.test>: User unknown", "RCPT TO"), mx.relay
    )
    [conn] = mx.conns
    assert transaction_events(conn)[2:] == [
        ("in", b".\r\n"),  # just the end of the (empty) message
        ("out", b"250 2.0.0 Ok: queued as Q1\r\n"),
        ("in", b"RSET\r\n"),
        ("out", b"250 2.0.0 Ok\r\n"),
    ]
    assert mx.messages == [("a@sender.test", [], b"")]
    assert agent._cache  # still in step: reusable


async def test_421_at_rcpt_defers_the_whole_delivery(env):
    mx = await serve(env, PipeMX(rcpt_replies={
        R2: b"421 4.7.0 pipe.example.test Error: too many errors\r\n",
    }))
    agent = env.agent(smtp_connection_cache_time_limit=30)
    out = await agent.deliver(request(mx.nexthop, R1, R2))
    text = said("421 4.7.0 pipe.example.test Error: too many errors", "RCPT TO")
    assert out == [TemporaryFailure("4.7.0", text, mx.relay)] * 2
    assert mx.messages == []
    assert not agent._cache
    assert any(text in line for line in env.logs)


async def test_timeout_waiting_for_the_rcpt_reply(env):
    mx = await serve(env, PipeMX(hold=False, stall_rcpt=True))
    agent = env.agent(smtp_rcpt_timeout=0.3, smtp_connection_cache_time_limit=30)
    out = await agent.deliver(request(mx.nexthop, R1, R2))
    text = f"conversation with {NAMADDR} timed out while sending RCPT TO"
    assert out == [TemporaryFailure("4.4.2", text, mx.relay)] * 2
    assert transaction_events(mx.conns[0])[0] == ("in", GROUP)
    assert not agent._cache


async def test_lost_connection_instead_of_the_rcpt_reply(env):
    mx = await serve(env, PipeMX(drop_rcpt=True))
    agent = env.agent(smtp_connection_cache_time_limit=30)
    out = await agent.deliver(request(mx.nexthop, R1, R2))
    text = f"lost connection with {NAMADDR} while sending RCPT TO"
    assert out == [TemporaryFailure("4.4.2", text, mx.relay)] * 2
    # The held MAIL FROM reply went out just before the hang-up.
    assert transaction_events(mx.conns[0])[:2] == [("in", GROUP), ("out", b"250 2.1.0 Ok\r\n")]
    assert not agent._cache


# --------------------------------------------------------------------------
# Connection reuse and stream state


async def test_connection_reuse_with_pipelining(env):
    mx = await serve(env, PipeMX())
    agent = env.agent(smtp_connection_cache_time_limit=30)
    for n in (1, 2, 3):
        out = await agent.deliver(request(mx.nexthop, R1, R2))
        assert out == [Delivered("2.0.0", f"250 2.0.0 Ok: queued as Q{n}", mx.relay)] * 2
    [conn] = mx.conns
    assert mx.rsets == 2
    # The RSET of a reused connection leads the next group (one write, one round trip).
    groups = [data for kind, data in conn.events if kind == "in" and data.startswith((b"MAIL", b"RSET"))]
    assert groups == [GROUP] + [b"RSET\r\n" + GROUP] * 2
    assert conn.commands[1:] == (GROUP.split(b"\r\n")[:-1] + [b"RSET"]) * 2 + GROUP.split(
        b"\r\n"
    )[:-1]


async def test_extra_reply_prevents_reuse(env):
    mx = await serve(env, PipeMX(extra_reply=True))
    agent = env.agent(smtp_connection_cache_time_limit=30)
    [out] = await agent.deliver(request(mx.nexthop, R1))
    assert out == Delivered("2.0.0", "250 2.0.0 Ok: queued as Q1", mx.relay)
    assert not agent._cache
    assert any(line.startswith("warning: 4ABC: host ") and line.endswith(" sent more replies than commands")
               for line in env.logs), env.logs
    [out] = await agent.deliver(request(mx.nexthop, R1))
    assert isinstance(out, Delivered)
    assert len(mx.conns) == 2


async def test_large_message_with_pipelining(env):
    mx = await serve(env, PipeMX())
    body = b"Subject: big\r\n\r\n" + b"".join(
        b".%06d abcdefghijklmnopqrstuvwxyz\r\n" % i for i in range(20000)
    )
    out = await env.agent().deliver(request(mx.nexthop, R1, R2, message=body))
    assert all(isinstance(o, Delivered) for o in out)
    [(_, rcpts, data)] = mx.messages
    assert rcpts == [R1, R2]
    assert data.replace(b"\r\n..", b"\r\n.") == body


async def test_lmtp_pipelines_the_group(env):
    mx = await serve(env, PipeMX(pipelining=False, hold=True, lmtp=True, rcpt_replies={
        R2: b"550 5.1.1 <b@example.test>: User unknown\r\n",
    }))
    agent = env.agent(lmtp=True, smtp_connection_cache_time_limit=30)
    out = await agent.deliver(request(mx.nexthop, R1, R2, R3))
    assert out == [
        Delivered("2.0.0", "250 2.0.0 <a@example.test> Saved", mx.relay),
        PermanentFailure("5.1.1", said("550 5.1.1 <b@example.test>: User unknown", "RCPT TO"),
                         mx.relay),
        Delivered("2.0.0", "250 2.0.0 <c@example.test> Saved", mx.relay),
    ]
    [conn] = mx.conns
    assert conn.events[1] == ("in", b"LHLO client.sender.test\r\n")
    assert conn.events[3] == (
        "in",
        (b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<a@example.test>\r\n"
         b"RCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n"),
    )
    assert agent._cache


# --------------------------------------------------------------------------
# Our own smtpd as the next hop


async def test_pipelining_to_our_own_smtpd(env, tmp_path):
    log = io.StringIO()
    async with MailServer(make_config(tmp_path), log_stream=log) as server:
        host, port = server.addresses()[0][:2]
        agent = env.agent(smtp_connection_cache_time_limit=30)
        nexthop = f"[{host}]:{port}"
        relay = f"{host}[{host}]:{port}"
        try:
            out = await agent.deliver(request(nexthop, "alice@one.test", "nobody@one.test"))
            assert isinstance(out[0], Delivered) and out[0].relay == relay
            assert isinstance(out[1], PermanentFailure) and out[1].status == "5.1.1"
            assert out[1].text.startswith(f"host {host}[{host}] said: 550 5.1.1 <nobody@one.test>")
            assert out[1].text.endswith("(in reply to RCPT TO command)")
            # No valid recipient: DATA is refused, then RSET; the session is reused.
            [out] = await agent.deliver(request(nexthop, "nobody@one.test"))
            assert isinstance(out, PermanentFailure) and out.status == "5.1.1"
            out = await agent.deliver(request(nexthop, "alice@one.test", "bob@one.test"))
            assert all(isinstance(o, Delivered) for o in out)
            assert server.status()["listeners"][0]["sessions"] == 1
        finally:
            await agent.close()
        await await_until(lambda: len(maildir(tmp_path, "alice")) == 2 and maildir(tmp_path, "bob"),
                          what="local deliveries")
    text = log.getvalue()
    assert "improper command pipelining" not in text
    assert text.count(": connect from ") == 1
