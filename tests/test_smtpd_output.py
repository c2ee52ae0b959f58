"""smtpd output: replies written during one event-loop iteration go out
together at its end (SMTPSession.reply, mailserver.outbox).

Real sessions over loopback; the transport's writes are counted by a spy on
``transport.write`` (what reaches the socket, one call per send).
"""

from __future__ import annotations

import asyncio
import select
import socket
import time

import pytest

from harness import free_port, spy_session_writes

from mailserver import Config, MailServer
from mailserver.outbox import outbox
from mailserver.smtpd import session as session_mod
from mailserver.smtpd.session import SMTPSession


def _config(tmp_path, port: int, **extra) -> Config:
    return Config(myhostname="mx.test.example", queue_directory=str(tmp_path / "spool"),
                  mail_spool_directory=str(tmp_path / "mail"), alias_maps=[],
                  services={"smtp": {"listen": [f"127.0.0.1:{port}"]}}, **extra)


@pytest.fixture
def writes(monkeypatch):
    """Every transport.write of every session, in order."""
    return spy_session_writes(monkeypatch)


async def _replies(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    out = []
    while len(out) < count:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise AssertionError(f"connection closed after {len(out)} replies: {out[-3:]!r}")
        if line[3:4] == b" ":
            out.append(line)
    return out


async def _after_ehlo(port: int, **kw):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, **kw)
    await _replies(reader, 1)
    writer.write(b"EHLO client.example\r\n")
    await _replies(reader, 1)
    return reader, writer


async def test_replies_to_pipelined_commands_go_out_in_one_write(tmp_path, writes):
    port = free_port()
    async with MailServer(_config(tmp_path, port), log_stream=None):
        reader, writer = await _after_ehlo(port)
        before = len(writes)
        # (commands answered without waiting for anything: MAIL and RCPT may
        # wait for a lookup, and replies queued before it go out meanwhile)
        writer.write(b"RSET\r\nRSET\r\nMAIL FROM:<bad address@>\r\nRSET\r\n")  # (not NOOP: it must end a group)
        got = await _replies(reader, 4)
        writer.write(b"QUIT\r\n")
        await _replies(reader, 1)
        writer.close()
    assert [r[:3] for r in got] == [b"250", b"250", b"501", b"250"]
    group = writes[before:-1]  # (the last write is the 221)
    assert len(group) == 1, group
    assert group[0].count(b"\r\n") == 4


async def test_replies_of_several_sessions_leave_in_one_burst(tmp_path, writes, monkeypatch):
    """Sessions whose commands arrive in the same iteration: their replies
    are sent by one flush callback, after all of them were computed."""
    port = free_port()
    async with MailServer(_config(tmp_path, port), log_stream=None):
        def connect():
            socks = []
            for _ in range(5):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.recv(1000)  # the greeting
                socks.append(s)
            return socks

        socks = await asyncio.to_thread(connect)
        calls: list[int] = []
        box = outbox(asyncio.get_running_loop())
        real = box.flush

        def counted():
            calls.append(len(box._pending))
            real()

        monkeypatch.setattr(box, "flush", counted)
        # The loop is busy here: all five commands are waiting when it next
        # polls, so one round reads them all and one flush answers them all.
        for s in socks:
            s.sendall(b"NOOP\r\n")
        lines = await asyncio.to_thread(lambda: [s.recv(1000) for s in socks])
        for s in socks:
            s.close()
    assert all(line.startswith(b"250 2.0.0 Ok") for line in lines), lines
    assert calls == [5]


async def test_a_reply_flood_is_sent_in_bounded_pieces_and_in_order(tmp_path, writes):
    """A pipelining client that sends many commands at once: replies are
    queued, but never more than the socket buffer's worth at a time."""
    port = free_port()
    count = 15000  # 90 kB of RSETs, 210 kB of replies
    async with MailServer(_config(tmp_path, port, smtpd_junk_command_limit=count * 2), log_stream=None):
        reader, writer = await _after_ehlo(port, limit=1 << 20)
        before = len(writes)
        writer.write(b"RSET\r\n" * count)
        got = await _replies(reader, count)
        writer.write(b"QUIT\r\n")
        await _replies(reader, 1)
        writer.close()
    assert all(r.startswith(b"250") for r in got)
    flood = writes[before:-1]
    assert sum(w.count(b"\r\n") for w in flood) == count
    assert max(len(w) for w in flood) <= session_mod._DRAIN_ABOVE + 512
    assert len(flood) > 1


async def test_the_reply_to_a_command_before_a_half_close_is_still_sent(tmp_path):
    port = free_port()
    async with MailServer(_config(tmp_path, port), log_stream=None):
        def dialog():
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"NOOP\r\n")
            s.shutdown(socket.SHUT_WR)
            data = f.read()  # up to the server's close
            s.close()
            return data

        data = await asyncio.to_thread(dialog)
    assert data.startswith(b"250 2.0.0 Ok"), data


async def test_quit_reply_is_written_before_the_close(tmp_path, writes):
    """reply_and_close sends at once (with anything still queued), then closes."""
    port = free_port()
    async with MailServer(_config(tmp_path, port), log_stream=None):
        reader, writer = await _after_ehlo(port)
        writer.write(b"RSET\r\nQUIT\r\n")
        got = await _replies(reader, 2)
        assert await reader.read() == b""
        writer.close()
    assert got[-1].startswith(b"221 2.0.0")


async def test_a_client_that_never_reads_its_replies_is_throttled(tmp_path):
    """Back-pressure: commands keep coming in small bursts (each loop
    iteration queues far less than the early-flush mark), replies are never
    read.  Once the transport is at its high-water mark the session waits
    before reading the next command, so the client is blocked instead of the
    server buffering replies without bound (EHLO: 21 bytes in, ~200 out, and
    not a junk command; pipelined EHLOs are a protocol violation, logged and,
    with smtpd_forbid_unauth_pipelining off, let through)."""
    port = free_port()
    async with MailServer(_config(tmp_path, port, smtpd_forbid_unauth_pipelining=False), log_stream=None) as server:
        def flood() -> tuple[socket.socket, int]:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s.settimeout(10)  # (a silent server fails the test, not hangs it)
            s.connect(("127.0.0.1", port))
            f = s.makefile("rb")
            f.readline()  # the greeting
            s.sendall(b"EHLO client.example\r\n")
            while f.readline()[3:4] == b"-":  # PIPELINING is announced: from now on nothing is read
                pass
            s.setblocking(False)
            burst = b"EHLO client.example\r\n" * 100
            sent = 0
            while sent < 2 << 20:  # 20 MB of replies if nothing stopped it
                try:
                    sent += s.send(burst)
                except BlockingIOError:
                    _r, writable, _x = select.select([], [s], [], 2.0)
                    if not writable:
                        break  # the server stopped reading: throttled
                    continue
                time.sleep(0.002)  # the traffic's shape (a slow client), not synchronisation
            return s, sent

        sock, sent = await asyncio.to_thread(flood)
        try:
            [session] = [s for listener in server.smtpd.listeners for s in listener.sessions]
            buffered = session.transport.get_write_buffer_size()
        finally:
            sock.close()
    assert sent < 2 << 20, f"the client was never throttled ({sent} bytes sent)"
    assert buffered <= 2 * session_mod._DRAIN_ABOVE + 4096, buffered


def test_an_outbox_does_not_keep_its_loop_alive():
    """The registry is keyed by the loop, weakly: the outbox must not hold it."""
    import gc
    import weakref

    loop = asyncio.new_event_loop()
    box = outbox(loop)
    assert outbox(loop) is box
    ref = weakref.ref(loop)
    loop.close()
    del loop, box
    gc.collect()
    assert ref() is None
