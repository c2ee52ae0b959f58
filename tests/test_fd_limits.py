"""One process holds every session: `mailserver run` raises its open-file
soft limit to the hard limit (as Postfix's master does), and a server whose
limit cannot hold smtpd_process_limit sessions says so at start-up."""

from __future__ import annotations

import asyncio
import resource
import socket

from harness import ServerProcess, smtp_dialog
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
    lines: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = (soft if soft != resource.RLIM_INFINITY else 1 << 40) + 1
    async with MailServer(make_config(tmp_path, smtpd_process_limit=limit), log_stream=Sink()):
        await asyncio.sleep(0)
    text = "".join(lines)
    assert f"warning: open file limit {soft} is below smtpd_process_limit {limit}" in text
    lines.clear()
    async with MailServer(make_config(tmp_path / "b", smtpd_process_limit=10), log_stream=Sink()):
        await asyncio.sleep(0)
    assert "open file limit" not in "".join(lines)
