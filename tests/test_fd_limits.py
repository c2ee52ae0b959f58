"""One process holds every session: `mailserver run` raises its open-file
soft limit to the hard limit (as Postfix's master does), and a server whose
limit cannot hold smtpd_process_limit sessions says so at start-up."""

from __future__ import annotations

import asyncio
import resource
import socket

from harness import LineSink, ServerProcess, smtp_dialog, wait_until
from mailserver import MailServer

from test_api import make_config


def _limits(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as fh:
        for line in fh:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError("no 'Max open files' line")


def test_run_raises_the_soft_limit_and_holds_more_sessions_than_it_started_with(tmp_path):
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 1024, "the test needs a hard limit above 1024"
    srv = ServerProcess(tmp_path)
    srv.nofile_soft = 128
    srv.start()
    try:
        soft_now, hard_now = _limits(srv.proc.pid)
        # (an "unlimited" hard limit: the highest value the kernel takes, at least 10240)
        assert soft_now == hard_now or (hard_now == "unlimited" and int(soft_now) >= 10240)
        assert soft_now != "128"
        # 300 sessions at once: more descriptors than the limit it was started with.
        conns = []
        try:
            for _ in range(300):
                s = socket.create_connection((srv.host, srv.port), timeout=10)
                conns.append(s)
            for s in conns:
                s.settimeout(10)
                assert s.recv(512).startswith(b"220 ")
        finally:
            for s in conns:
                s.close()
        assert smtp_dialog(srv.host, srv.port, [b"EHLO client.test\r\n", b"QUIT\r\n"])[-1].startswith("221")
    finally:
        srv.stop()
    assert "out of system resource" not in srv.log() and "Too many open files" not in srv.log()


async def test_start_warns_when_the_limit_cannot_hold_smtpd_process_limit(tmp_path):
    sink = LineSink()
    lines = sink.writes
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = (soft if soft != resource.RLIM_INFINITY else 1 << 40) + 1
    async with MailServer(make_config(tmp_path, smtpd_process_limit=limit), log_stream=sink):
        await asyncio.sleep(0)
    text = "".join(lines)
    assert f"warning: open file limit {soft} is below smtpd_process_limit {limit}" in text
    lines.clear()
    async with MailServer(make_config(tmp_path / "b", smtpd_process_limit=10), log_stream=sink):
        await asyncio.sleep(0)
    assert "open file limit" not in "".join(lines)


def test_out_of_descriptors_at_accept_pauses_the_listener_and_recovers(tmp_path):
    """At its open-file limit the server cannot accept(): the kernel keeps the
    connection in the backlog and reports the listener readable, again and
    again.  The server stops accepting for a second and logs Postfix's
    "error: accept connection: ..." once per pause, not a traceback per
    attempt; once descriptors are free the waiting client is greeted."""
    import os
    import time

    srv = ServerProcess(tmp_path, {"smtpd_process_limit": 100})
    srv.nofile_soft = srv.nofile_hard = 64
    srv.start()
    held: list[socket.socket] = []
    try:
        assert smtp_dialog(srv.host, srv.port, [b"EHLO c\r\n", b"QUIT\r\n"])[-1].startswith("221")
        wait_until(lambda: "disconnect from" in srv.log(), what="the first session's end")
        used = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        for _ in range(64 - used):  # every descriptor, each held by an idle session
            sock = socket.create_connection((srv.host, srv.port), timeout=10)
            assert sock.recv(512).startswith(b"220 ")
            held.append(sock)
        waiting = socket.create_connection((srv.host, srv.port), timeout=10)  # in the backlog
        held.append(waiting)
        srv.wait_for_log(r"error: accept connection: Too many open files$")
        started = time.monotonic()
        waiting.settimeout(0.5)
        try:
            early = waiting.recv(512)
        except socket.timeout:
            early = b""
        assert early == b""  # no descriptor: not greeted
        for sock in held[:5]:
            sock.close()
        waiting.settimeout(10)
        assert waiting.recv(512).startswith(b"220 ")
        assert time.monotonic() - started < 5
        # One warning per pause: about one a second while it lasted, not one per readiness event.
        warnings = srv.log().count("error: accept connection:")
        assert 1 <= warnings <= 4, warnings
        assert "Traceback" not in srv.log() and "out of system resource" not in srv.log()
    finally:
        for sock in held:
            sock.close()
        srv.stop()
