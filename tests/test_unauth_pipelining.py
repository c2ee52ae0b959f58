"""smtpd_forbid_unauth_pipelining (Postfix 3.9+, default yes): a client
that talks before the greeting, or sends commands ahead of our reply
without PIPELINING, is logged with what it sent and gets
``554 5.5.0 Error: SMTP protocol synchronization``; with ``no`` the session
goes on and ``reject_unauth_pipelining`` can refuse it later.

Real sessions over loopback.  A pre-greeting client is made deterministic
by holding the session in its reverse lookup until the client's bytes are
in our socket (loopback clients skip DNS).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from harness import LineSink, await_until
from mailserver import MailServer
from mailserver.smtpd.session import _escaped

from test_api import maildir, make_config, queue_files


def test_input_is_logged_with_postfix_escapes():
    assert _escaped(b"QUIT\r\n") == r"QUIT\r\n"
    assert _escaped(b"a\\b\t\x01\x7f\xff") == r"a\\b\t\001\177\377"


async def _talk_first(server, data: bytes, port: int | None = None) -> tuple[bytes, socket.socket]:
    """Connect (to ``port``, else the first listener), send ``data`` before
    the greeting, and return everything the server sent until it closed or 2
    replies came, and the socket (still open)."""
    sent = asyncio.Event()
    real_lookup = server.smtpd.lookup_client_name

    async def after_the_client_talked(ip):
        await sent.wait()
        return await real_lookup(ip)

    server.smtpd.lookup_client_name = after_the_client_talked
    host, first = server.addresses()[0][:2]
    sock = await asyncio.to_thread(socket.create_connection, (host, port or first), 10)
    sock.sendall(data)
    sent.set()
    sock.settimeout(10)
    received = b""
    while received.count(b"\r\n") < 2:
        try:
            chunk = await asyncio.to_thread(sock.recv, 4096)
        except ConnectionResetError:  # closed with our unread bytes: an RST after the reply
            break
        if not chunk:
            break
        received += chunk
    return received, sock


async def test_a_client_that_talks_before_the_greeting_is_refused(tmp_path):
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        received, sock = await _talk_first(
            server, b"EHLO spam.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@one.test>\r\n")
        sock.close()
        assert received == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"  # no greeting, then EOF
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
        assert not queue_files(tmp_path, "incoming") and not queue_files(tmp_path, "active")
    mine = [line.split(": ", 1)[1] for line in sink.lines if "[127.0.0.1]" in line]
    assert mine == [
        "connect from unknown[127.0.0.1]",
        r"improper command pipelining after CONNECT from unknown[127.0.0.1]: "
        r"EHLO spam.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@one.test>\r\n",
        "disconnect from unknown[127.0.0.1] commands=0/0",
    ]


async def test_commands_ahead_of_the_reply_without_pipelining_are_refused(tmp_path):
    """HELO (no PIPELINING) followed at once by MAIL, RCPT, DATA and a message."""
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        writer.write(b"HELO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@one.test>\r\nDATA\r\n"
                     b"Subject: smuggled\r\n\r\nx\r\n.\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
        writer.close()
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
        assert not queue_files(tmp_path, "incoming") and not queue_files(tmp_path, "active")
    assert any(r"improper command pipelining after HELO from unknown[127.0.0.1]: MAIL FROM:<a@b.example>\r\n"
               in line for line in sink.lines)


async def test_with_the_check_off_the_session_goes_on_and_reject_unauth_pipelining_can_refuse(tmp_path):
    sink = LineSink()
    config = make_config(tmp_path, smtpd_forbid_unauth_pipelining=False,
                         smtpd_data_restrictions=["reject_unauth_pipelining"])
    async with MailServer(config, log_stream=sink) as server:
        received, sock = await _talk_first(server, b"HELO early.example\r\n")
        try:
            assert received.startswith(b"220 ") and received.endswith(b"\r\n250 mx.one.test\r\n"), received
            replies = []
            for command in (b"MAIL FROM:<sender@one.test>\r\n", b"RCPT TO:<alice@one.test>\r\n", b"DATA\r\n"):
                sock.sendall(command)
                replies.append(await asyncio.to_thread(sock.recv, 4096))
        finally:
            sock.close()
        assert replies[:2] == [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n"]
        assert replies[2] == (b"503 5.5.0 <DATA>: Data command rejected: "
                              b"Improper use of SMTP command pipelining\r\n")
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
        assert not queue_files(tmp_path, "incoming") and not queue_files(tmp_path, "active")
    improper = [line for line in sink.lines if "improper command pipelining" in line]
    assert len(improper) == 1 and improper[0].endswith(r"after CONNECT from unknown[127.0.0.1]: HELO early.example\r\n")


@pytest.mark.parametrize("forbid", [True, False])
async def test_a_client_that_waits_for_each_reply_is_not_flagged(tmp_path, forbid):
    sink = LineSink()
    async with MailServer(make_config(tmp_path, smtpd_forbid_unauth_pipelining=forbid), log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        codes = []
        for command in (b"", b"HELO c.example\r\n", b"MAIL FROM:<sender@one.test>\r\n",
                        b"RCPT TO:<alice@one.test>\r\n", b"DATA\r\n", b"Subject: ok\r\n\r\nx\r\n.\r\n", b"QUIT\r\n"):
            writer.write(command)
            codes.append((await asyncio.wait_for(reader.readline(), 10))[:3])
        writer.close()
        assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
    assert not any("improper command pipelining" in line for line in sink.lines)


async def test_a_service_can_turn_the_check_off(tmp_path):
    """As master.cf's ``-o smtpd_forbid_unauth_pipelining=no`` on one service:
    the same early client is refused on port "smtp" and greeted on
    "submission"."""
    from harness import free_port

    ports = {"smtp": free_port(), "submission": free_port()}
    config = make_config(tmp_path).replace(services={
        "smtp": {"listen": [f"127.0.0.1:{ports['smtp']}"]},
        "submission": {"listen": [f"127.0.0.1:{ports['submission']}"], "smtpd_forbid_unauth_pipelining": "no"},
    })
    async with MailServer(config, log_stream=LineSink()) as server:
        for name, expected in (("smtp", b"554 5.5.0 "), ("submission", b"220 ")):
            received, sock = await _talk_first(server, b"EHLO early.example\r\n", ports[name])
            sock.close()
            assert received.startswith(expected), (name, received)


async def _ehlo_session(server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.addresses()[0][:2]
    reader, writer = await asyncio.open_connection(host, port)
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
    writer.write(b"EHLO c.example\r\n")
    while (line := await asyncio.wait_for(reader.readline(), 10))[3:4] == b"-":
        pass
    assert line.startswith(b"250 "), line
    return reader, writer


async def test_the_message_sent_before_the_354_is_refused_even_with_pipelining(tmp_path):
    """DATA must end a pipelined group: MAIL, RCPT, DATA and the message in
    one write (spamware that does not wait for the 354) is 554, nothing queued."""
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        reader, writer = await _ehlo_session(server)
        writer.write(b"MAIL FROM:<sender@one.test>\r\nRCPT TO:<alice@one.test>\r\nDATA\r\n"
                     b"Subject: early\r\n\r\nx\r\n.\r\nQUIT\r\n")
        replies = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n")
        writer.close()
        assert replies == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"554 5.5.0 Error: SMTP protocol synchronization", b""]
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
        assert not queue_files(tmp_path, "incoming") and not queue_files(tmp_path, "active")
    assert not any("message-id=" in line for line in sink.lines)
    assert any(r"improper command pipelining after DATA from unknown[127.0.0.1]: Subject: early\r\n\r\nx\r\n.\r\nQUIT\r\n"
               in line for line in sink.lines)
    assert [line.split(": ", 1)[1] for line in sink.lines if "disconnect from" in line] == [
        "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4"]


async def test_a_pipelined_group_that_ends_with_data_is_fine(tmp_path):
    """RFC 2920: MAIL, RCPT, DATA in one write, the message after the 354,
    then the next transaction's commands right behind the final dot."""
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        reader, writer = await _ehlo_session(server)
        writer.write(b"MAIL FROM:<sender@one.test>\r\nRCPT TO:<alice@one.test>\r\nDATA\r\n")
        codes = [(await asyncio.wait_for(reader.readline(), 10))[:3] for _ in range(3)]
        writer.write(b"Subject: one\r\n\r\nx\r\n.\r\nMAIL FROM:<sender@one.test>\r\nRCPT TO:<bob@one.test>\r\nDATA\r\n")
        codes += [(await asyncio.wait_for(reader.readline(), 10))[:3] for _ in range(4)]
        writer.write(b"Subject: two\r\n\r\ny\r\n.\r\nQUIT\r\n")
        codes += [(await asyncio.wait_for(reader.readline(), 10))[:3] for _ in range(2)]
        writer.close()
        assert codes == [b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"]
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
        await await_until(lambda: maildir(tmp_path, "alice") and maildir(tmp_path, "bob"), what="both deliveries")
    assert not any("improper command pipelining" in line for line in sink.lines)


async def test_unknown_commands_are_not_pipelining_violations(tmp_path):
    """As in smtpd(8), the check comes after the command is recognised: junk
    sent in one burst gets its 502s (and the error limit), not a 554."""
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        writer.write(b"XYZZY\r\nPLUGH\r\nQUIT\r\n")
        replies = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n")
        writer.close()
        assert replies == [b"502 5.5.2 Error: command not recognized"] * 2 + [b"221 2.0.0 Bye", b""]
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
    assert not any("improper command pipelining" in line for line in sink.lines)


@pytest.mark.parametrize("command", [b"NOOP", b"VRFY alice", b"EHLO again.example"])
async def test_commands_that_must_end_a_group_are_checked_after_ehlo_too(tmp_path, command):
    """After EHLO (PIPELINING announced), NOOP, VRFY and EHLO must still wait
    for their reply: a command sent behind one of them is a violation."""
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        reader, writer = await _ehlo_session(server)
        writer.write(command + b"\r\nMAIL FROM:<sender@one.test>\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
        writer.close()
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
    verb = command.split()[0].decode()
    assert any(f"improper command pipelining after {verb} from unknown[127.0.0.1]: MAIL FROM:<sender@one.test>\\r\\n"
               in line for line in sink.lines)
