"""The command statistics on smtpd's ``disconnect from`` line, as Postfix
writes them: ``ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4``.

Log watchers match this line (fail2ban's ``auth=0/``, logcheck's
``commands=0/0``), so the format is Postfix's to the character: per
command ``ok`` or ``ok/total`` in smtpd(8)'s table order, ``unknown=0/N``
last, then the sums.  Real sessions over loopback; the lines come from the
server's log stream.
"""

from __future__ import annotations

import asyncio

import pytest

from harness import LineSink, await_until
from mailserver import MailServer
from mailserver.smtpd.session import format_command_stats

from test_api import make_config, queue_files


@pytest.mark.parametrize("counts, ok, line", [
    # Lines written by Postfix 3.x (public mail logs).
    ({"ehlo": 2, "starttls": 1, "mail": 1, "rcpt": 1, "quit": 1},
     {"ehlo": 2, "starttls": 1, "mail": 1, "quit": 1}, " ehlo=2 starttls=1 mail=1 rcpt=0/1 quit=1 commands=5/6"),
    ({"helo": 1, "mail": 1, "rcpt": 1}, {"helo": 1, "mail": 1}, " helo=1 mail=1 rcpt=0/1 commands=2/3"),
    ({"ehlo": 1, "mail": 1, "rcpt": 1, "quit": 1, "unknown": 1},
     {"ehlo": 1, "mail": 1, "quit": 1}, " ehlo=1 mail=1 rcpt=0/1 quit=1 unknown=0/1 commands=3/5"),
    ({}, {}, " commands=0/0"),
    ({"ehlo": 1, "mail": 1, "rcpt": 1, "data": 1, "quit": 1},
     {"ehlo": 1, "mail": 1, "rcpt": 1, "data": 1, "quit": 1}, " ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"),
    # Given out of order (QUIT's count first, unknown before RSET): table order still.
    ({"quit": 1, "unknown": 2, "rset": 1, "ehlo": 1}, {"quit": 1, "rset": 1, "ehlo": 1},
     " ehlo=1 rset=1 quit=1 unknown=0/2 commands=3/5"),
])
def test_the_statistics_are_formatted_as_postfix_writes_them(counts, ok, line):
    assert format_command_stats(counts, ok) == line


async def _final(reader: asyncio.StreamReader) -> bytes:
    """The last line of the next reply (b"" at the end of the connection)."""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if line[3:4] != b"-":
            return line


async def _session(port: int, script: list[bytes]) -> list[bytes]:
    """Send each command of ``script`` and read its reply's code (a command
    ending in ``\r\n.\r\n`` is DATA content)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = []
    try:
        await _final(reader)  # greeting
        for command in script:
            writer.write(command)
            replies.append((await _final(reader))[:3])
    finally:
        writer.close()
    return replies


def _disconnects(sink: LineSink) -> list[str]:
    return [line.split("disconnect from ", 1)[1] for line in sink.lines if "disconnect from " in line]


async def test_a_session_with_rejected_and_unknown_commands(tmp_path):
    """Each command counts once; it is a success only when its last reply
    is 2xx: DATA's 250 after the message, not its 354."""
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        port = server.addresses()[0][1]
        replies = await _session(port, [
            b"EHLO client.example\r\n",
            b"MAIL FROM:<sender@one.test>\r\n",
            b"RCPT TO:<nobody@one.test>\r\n",  # no such mailbox
            b"RCPT TO:<alice@one.test>\r\n",
            b"DATA\r\n",
            b"Subject: stats\r\n\r\nbody\r\n.\r\n",
            b"RSET\r\n",
            b"FROB\r\n",
            b"NOOP\r\n",
            b"QUIT\r\n",
        ])
        assert replies == [b"250", b"250", b"550", b"250", b"354", b"250", b"250", b"502", b"250", b"221"]
        await await_until(lambda: _disconnects(sink), what="the disconnect line")
    assert _disconnects(sink) == [
        "unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1/2 data=1 rset=1 noop=1 quit=1 unknown=0/1 commands=7/9"]


async def test_commands_out_of_sequence_and_a_hang_up_during_data(tmp_path):
    """RCPT before MAIL is refused (503): rcpt=0/1.  A client that hangs up
    in the middle of its message: data=0/1, and no QUIT."""
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        port = server.addresses()[0][1]
        assert await _session(port, [b"RCPT TO:<alice@one.test>\r\n", b"QUIT\r\n"]) == [b"503", b"221"]
        await await_until(lambda: len(_disconnects(sink)) == 1, what="the first disconnect line")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finals = []
        for command in (b"", b"EHLO client.example\r\n",
                        b"MAIL FROM:<sender@one.test>\r\nRCPT TO:<alice@one.test>\r\nDATA\r\n"):
            writer.write(command)
            for _ in range(max(1, command.count(b"\r\n"))):
                finals.append((await _final(reader))[:3])
        assert finals == [b"220", b"250", b"250", b"250", b"354"]
        writer.write(b"Subject: cut\r\n\r\nhalf a mess")
        await writer.drain()
        writer.close()
        await await_until(lambda: len(_disconnects(sink)) == 2, what="the second disconnect line")
        assert not queue_files(tmp_path, "incoming") and not queue_files(tmp_path, "active")
    assert not any("message-id=" in line for line in sink.lines)  # (nothing reached cleanup)
    assert _disconnects(sink) == [
        "unknown[127.0.0.1] rcpt=0/1 quit=1 commands=1/2",
        "unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4",
    ]


async def test_an_empty_line_is_not_a_command_and_a_header_line_is_not_smtp(tmp_path):
    """An empty line: 500 5.5.2, not counted.  A header line sent as a
    command (Postfix's is_header(): a client that does not wait for the 354)
    is a non-SMTP command: a warning, 221 2.7.0 and the end, unknown=0/1."""
    sink = LineSink()
    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        port = server.addresses()[0][1]
        assert await _session(port, [b"\r\n", b"EHLO c.example\r\n", b"Subject: hello\r\n", b"NOOP\r\n"]) == [
            b"500", b"250", b"221", b""]  # (then the end of the connection)
        await await_until(lambda: _disconnects(sink), what="the disconnect line")
    assert any("warning: non-SMTP command from unknown[127.0.0.1]: Subject: hello" in line for line in sink.lines)
    assert _disconnects(sink) == ["unknown[127.0.0.1] ehlo=1 unknown=0/1 commands=1/2"]


async def test_junk_commands_past_the_limit_are_counted(tmp_path):
    """smtpd_junk_command_limit: beyond it each NOOP is an error; at
    smtpd_hard_error_limit the session ends with 421, and that NOOP counts."""
    sink = LineSink()
    config = make_config(tmp_path, smtpd_junk_command_limit=2, smtpd_hard_error_limit=2, smtpd_error_sleep_time="0s")
    async with MailServer(config, log_stream=sink) as server:
        port = server.addresses()[0][1]
        assert await _session(port, [b"NOOP\r\n"] * 4) == [b"250", b"250", b"250", b"421"]
        await await_until(lambda: _disconnects(sink), what="the disconnect line")
    assert _disconnects(sink) == ["unknown[127.0.0.1] noop=3/4 commands=3/4"]


async def test_failed_and_successful_auth(tmp_path):
    """fail2ban's postfix-sasl rule matches ``auth=0/``: a failed AUTH (535)
    counts in the total only, a successful one (235 after its 334) as ok."""
    import base64

    from mailserver.sasl import set_password

    set_password(str(tmp_path / "passwd"), "alice", "right")
    sink = LineSink()
    config = make_config(tmp_path, smtpd_sasl_password_maps=f"passwd-file:{tmp_path / 'passwd'}",
                         smtpd_tls_auth_only=False, smtpd_error_sleep_time="0s").replace(
        services={"smtp": {"listen": ["127.0.0.1:0"], "auth": "optional"}})

    def plain(password: str) -> bytes:
        return base64.b64encode(b"\0alice\0" + password.encode())

    async with MailServer(config, log_stream=sink) as server:
        port = server.addresses()[0][1]
        assert await _session(port, [b"EHLO c.example\r\n", b"AUTH PLAIN " + plain("wrong") + b"\r\n",
                                     b"QUIT\r\n"]) == [b"250", b"535", b"221"]
        await await_until(lambda: len(_disconnects(sink)) == 1, what="the first disconnect line")
        assert await _session(port, [b"EHLO c.example\r\n", b"AUTH PLAIN " + plain("wrong") + b"\r\n",
                                     b"AUTH PLAIN\r\n", plain("right") + b"\r\n", b"QUIT\r\n"]) == [
            b"250", b"535", b"334", b"235", b"221"]
        await await_until(lambda: len(_disconnects(sink)) == 2, what="the second disconnect line")
    assert _disconnects(sink) == [
        "unknown[127.0.0.1] ehlo=1 auth=0/1 quit=1 commands=2/3",
        "unknown[127.0.0.1] ehlo=1 auth=1/2 quit=1 commands=3/4",
    ]
