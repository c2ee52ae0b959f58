"""Fake MX servers for tests: real SMTP servers on 127.0.0.x.

``FakeMX`` is an aiosmtpd server whose ``Handler`` records every message
(envelope, raw DATA bytes, TLS) and misbehaves on request (per-recipient
replies, 4xx/5xx at MAIL or DATA, drop or stall after DATA); ``RawServer``
runs a scripted byte-level dialogue.  ``start_on_shared_port`` starts several
of them on one free port, which the client under test uses as its
``smtp_tcp_port``.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP as AioSMTP

import harness

MX1, MX2 = "127.0.0.2", "127.0.0.3"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    mail_options: list[str] = field(default_factory=list)


class Handler:
    """aiosmtpd handler that records messages and misbehaves on request."""

    def __init__(self):
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.drop_after_data = False
        self.stall_after_data = False
        self.rsets = 0
        self.rset_reply: str | None = None  # e.g. "421 ..." to refuse RSET
        self.rset_replies: list[str] = []  # replies for the next RSETs, before rset_reply
        self.rset_stall = False  # RSET gets no reply at all (a server gone quiet)
        self.pipelining = False  # announce PIPELINING (RFC 2920)
        self.mails_per_connection = 0  # beyond it MAIL gets 421 (Exim's smtp_accept_max_per_connection)
        self.rset_pipelined: list[bool] = []  # per RSET: did MAIL FROM come in with it?

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        session.mails = getattr(session, "mails", 0) + 1
        if self.mails_per_connection and session.mails > self.mails_per_connection:
            return "421 4.7.0 mx.example.test Error: too many messages in one connection"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

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
        if self.drop_after_data:
            server.transport.close()
            await asyncio.get_running_loop().create_future()  # cancelled on close
        if self.stall_after_data:
            await asyncio.get_running_loop().create_future()  # never answers
        return self.data_reply or "250 2.0.0 Ok: queued as 4ABC"

    async def handle_RSET(self, server, session, envelope):
        self.rsets += 1
        self.rset_pipelined.append(bytes(server._reader._buffer).startswith(b"MAIL FROM:"))
        if self.rset_stall:
            await asyncio.get_running_loop().create_future()  # cancelled on close
        if self.rset_replies:
            return self.rset_replies.pop(0)
        return self.rset_reply or "250 2.0.0 Ok"


class BrokenTLS(AioSMTP):
    """Advertises STARTTLS, says 220, then sends garbage instead of TLS."""

    async def smtp_STARTTLS(self, arg):
        await self.push("220 2.0.0 Ready to start TLS")
        self.transport.write(b"this is not a TLS server hello\r\n" * 4)
        self.transport.close()


class NoEhlo(AioSMTP):
    async def smtp_EHLO(self, arg):
        await self.push("502 5.5.2 Error: command not recognized")


class FakeMX:
    """An aiosmtpd server on (host, port) inside the test's event loop."""

    def __init__(self, host: str, handler: Handler | None = None, *, cls=AioSMTP,
                 hostname: str | None = None, **smtp_kwargs):
        self.host = host
        self.handler = handler or Handler()
        self.cls = cls
        self.hostname = hostname or {MX1: "mx1.example.test", MX2: "mx2.example.test"}.get(
            host, "mx.example.test"
        )
        self.smtp_kwargs = smtp_kwargs
        self.protocols: list[AioSMTP] = []
        self.server: asyncio.AbstractServer | None = None

    @property
    def connections(self) -> int:
        return len(self.protocols)

    def _factory(self):
        proto = self.cls(
            self.handler,
            hostname=self.hostname,
            loop=asyncio.get_running_loop(),
            **self.smtp_kwargs,
        )
        self.protocols.append(proto)
        return proto

    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, self.host, port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for proto in self.protocols:
            if proto.transport is not None:
                proto.transport.close()
        tasks = [p._handler_coroutine for p in self.protocols if p._handler_coroutine]
        if tasks:
            await asyncio.wait(tasks, timeout=10)


class RawServer:
    """A scripted asyncio server: ``script(reader, writer, server)``."""

    def __init__(self, host: str, script):
        self.host = host
        self.script = script
        self.server: asyncio.AbstractServer | None = None
        self.tasks: list[asyncio.Task] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.data: list[bytes] = []
        self.commands: list[bytes] = []

    async def _handle(self, reader, writer):
        self.tasks.append(asyncio.current_task())
        self.writers.append(writer)
        try:
            await self.script(reader, writer, self)
        finally:
            writer.close()

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for writer in self.writers:
            writer.close()
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=10)


async def free_port() -> int:
    return harness.free_port(MX2)


async def start_on_shared_port(*servers) -> int:
    """Start all servers on one free port (one port for all MX hosts)."""
    for _ in range(20):
        port = await free_port()
        started = []
        try:
            for server in servers:
                await server.start(port)
                started.append(server)
        except OSError as exc:
            for server in started:
                await server.stop()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        return port
    raise RuntimeError("no free shared port")
