"""Abuse limits on the real server: web clients, error floods, slow clients,
connection caps."""

from __future__ import annotations

import select
import socket
import time

import pytest

from harness import ServerProcess, open_at_data, smtp_dialog


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("abuse"), {
        "smtpd_timeout": "1s", "smtpd_hard_error_limit": 5, "smtpd_soft_error_limit": 3,
        "smtpd_error_sleep_time": "0s", "smtpd_session_time_limit": "3s",
    }).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.0\r\n", b"CONNECT host:25 HTTP/1.1\r\n"])
def test_http_verbs_are_refused_and_the_connection_closed(server, line):
    replies = smtp_dialog(server.host, server.port, [line, b""])
    assert replies[1] == "221 2.7.0 Error: I can break rules, too. Goodbye."
    assert replies[2] == "<EOF>"


def test_an_error_flood_is_cut_at_the_hard_limit(server):
    replies = smtp_dialog(server.host, server.port, [b"EHLO c\r\n"] + [b"XYZZY\r\n"] * 5 + [b""])
    assert replies[2:6] == ["502 5.5.2 Error: command not recognized"] * 4
    assert replies[6] == "421 4.7.0 mx.test.example Error: too many errors"
    assert replies[7] == "<EOF>"


def test_a_silent_client_is_cut_at_smtpd_timeout(server):
    sock = socket.create_connection((server.host, server.port), timeout=10)
    with sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        start = time.monotonic()
        assert f.readline() == b"421 4.4.2 mx.test.example Error: timeout exceeded\r\n"
        assert f.readline() == b""
        assert 0.8 < time.monotonic() - start < 5
    server.wait_for_log(r"timeout after CONNECT from localhost\[127\.0\.0\.1\]")


def test_a_client_silent_in_mid_message_is_cut_with_the_bytes_logged(server):
    sock, f = open_at_data(server.host, server.port, b"<root@mx.test.example>")
    with sock:
        sock.sendall(b"Subject: half\r\n\r\n" + b"y" * 100)
        assert f.readline() == b"421 4.4.2 mx.test.example Error: timeout exceeded\r\n"
    server.wait_for_log(r"timeout after DATA \(117 bytes\) from localhost\[127\.0\.0\.1\]")
    assert not server.queue_files()


def test_slowloris_one_byte_at_a_time_is_cut_at_the_session_deadline(server):
    """Each byte resets no command timer (a command line never completes),
    and the absolute session deadline ends the session anyway."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    with sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        start = time.monotonic()
        sock.settimeout(0.5)
        closed = False
        for byte in b"EHLO slow.example.com and more and more and more and more":
            try:
                sock.sendall(bytes([byte]))
                data = sock.recv(200)
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
            if data.startswith(b"421 4.4.2") or data == b"":
                closed = True
                break
        assert closed, "the server never cut the slow client"
        assert time.monotonic() - start < 6


def _until_cut(sock, keepalive: bytes) -> list[bytes]:
    """Send ``keepalive`` every 0.4 s (inside smtpd_timeout) until the server
    closes the connection; returns the reply lines it sent meanwhile.  Bounded:
    20 rounds (8 s; the limit is 3 s)."""
    data = b""
    for _ in range(20):
        sock.sendall(keepalive)
        deadline = time.monotonic() + 0.4
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            chunk = sock.recv(4096)
            if not chunk:
                return data.splitlines()
            data += chunk
    raise AssertionError("the session outlived smtpd_session_time_limit")


def test_a_busy_client_is_cut_at_the_session_time_limit(server):
    """Commands keep resetting smtpd_timeout; smtpd_session_time_limit still
    ends the session, between two commands."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    with sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        start = time.monotonic()
        *noops, last = _until_cut(sock, b"NOOP\r\n")
        assert 2.5 < time.monotonic() - start < 6
        assert noops and set(noops) == {b"250 2.0.0 Ok"}
        assert last == b"421 4.4.2 mx.test.example Error: timeout exceeded"
    server.wait_for_log(r"timeout after NOOP from localhost\[127\.0\.0\.1\] \(session time limit\)")


def test_a_message_still_coming_in_is_cut_at_the_session_time_limit(server):
    """The limit interrupts a DATA command waiting for content: 421, the
    bytes received so far logged, nothing queued."""
    submitted = server.log().count("message-id=")
    sock, _ = open_at_data(server.host, server.port, b"<root@mx.test.example>")
    with sock:
        sock.sendall(b"Subject: slow\r\n\r\n")
        assert _until_cut(sock, b"z\r\n") == [b"421 4.4.2 mx.test.example Error: timeout exceeded"]
    server.wait_for_log(r"timeout after DATA \(\d+ bytes\) from localhost\[127\.0\.0\.1\] \(session time limit\)")
    assert not server.queue_files()
    assert server.log().count("message-id=") == submitted  # cleanup never saw it


def test_connection_flood_beyond_the_per_client_limit_gets_421(tmp_path):
    srv = ServerProcess(tmp_path, {"smtpd_client_connection_count_limit": 3}).start()
    socks = []
    try:
        for _ in range(3):
            s = socket.create_connection((srv.host, srv.port), timeout=10, source_address=("127.0.0.2", 0))
            socks.append(s)
            assert s.makefile("rb").readline().startswith(b"220 ")
        extra = socket.create_connection((srv.host, srv.port), timeout=10, source_address=("127.0.0.2", 0))
        socks.append(extra)
        f = extra.makefile("rb")
        assert f.readline() == b"421 4.7.0 mx.test.example Error: too many connections from 127.0.0.2\r\n"
        assert f.readline() == b""
        # mynetworks clients are exempt (smtpd_client_event_limit_exceptions)
        for _ in range(4):
            s = socket.create_connection((srv.host, srv.port), timeout=10, source_address=("127.0.0.1", 0))
            socks.append(s)
            assert s.makefile("rb").readline().startswith(b"220 ")
        srv.wait_for_log(r"warning: Connection concurrency limit exceeded: 4 from localhost\[127\.0\.0\.2\]")
    finally:
        for s in socks:
            s.close()
        srv.stop()
