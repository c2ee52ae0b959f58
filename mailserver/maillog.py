"""Postfix-compatible log lines (Postfix: syslog via postlogd).

One line per event, keyed by queue ID, in the format Postfix log tools
(pflogsumm, exporters) parse::

    Nov 21 10:00:00 myhostname mailserver/smtpd[1234]: 4Fx3Kq1zQ2: client=host[1.2.3.4]

Lines go to stderr (default) and/or ``maillog_file``; with
``maillog_syslog_prefix = no`` the ``date host`` prefix is dropped for
container runtimes that add their own (``mailserver/smtpd[PID]: ...`` stays).

Writes are buffered and flushed once per event-loop iteration (one write
system call for a burst of lines) so logging costs no per-line syscall on
the hot path; outside a running loop lines are written at once.  A failing
log destination never stops mail: the error is reported once on stderr.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import traceback
from typing import Callable, TextIO


class MailLog:
    def __init__(self, *, hostname: str, syslog_name: str = "mailserver", stream: TextIO | None = sys.stderr,
                 path: str = "", prefix: bool = True, clock: Callable[[], float] = time.time):
        self.hostname = hostname
        self.syslog_name = syslog_name
        self.stream = stream
        self.path = path
        self.prefix = prefix
        self.clock = clock
        self.pid = os.getpid()
        self._pending: list[str] = []
        self._scheduled = False
        self._fd: int | None = None
        self._failed = False
        self.listeners: list[Callable[[str, str], None]] = []  # (service, text) observers
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640)

    def line(self, service: str, text: str) -> str:
        tag = f"{self.syslog_name}/{service}[{self.pid}]: {text}"
        if not self.prefix:
            return tag
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(self.clock()))
        return f"{stamp} {self.hostname} {tag}"

    def log(self, service: str, text: str) -> None:
        # Never let a newline from a remote party forge a second log line.
        if "\n" in text or "\r" in text:
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        for listener in self.listeners:
            listener(service, text)
        self._pending.append(self.line(service, text) + "\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def exception(self, service: str, text: str) -> None:
        """A log line plus the current traceback (for internal errors)."""
        self.log(service, f"warning: {text}")
        for tb_line in traceback.format_exc().rstrip().splitlines():
            self.log(service, f"warning: {tb_line}")

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = "".join(self._pending)
        self._pending.clear()
        try:
            if self.stream is not None:
                self.stream.write(data)
                self.stream.flush()
            if self._fd is not None:
                os.write(self._fd, data.encode("utf-8", "backslashreplace"))
        except (OSError, ValueError) as exc:
            if not self._failed:
                self._failed = True
                print(f"mailserver: cannot write log: {exc}", file=sys.__stderr__)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def service(self, name: str) -> "ServiceLog":
        return ServiceLog(self, name)


class ServiceLog:
    """A MailLog bound to one service name (``smtpd``, ``qmgr``, ...)."""

    __slots__ = ("maillog", "name")

    def __init__(self, maillog: MailLog, name: str):
        self.maillog = maillog
        self.name = name

    def __call__(self, text: str) -> None:
        self.maillog.log(self.name, text)

    def exception(self, text: str) -> None:
        self.maillog.exception(self.name, text)


def format_delays(before_active: float, in_active: float, setup: float, transmit: float) -> str:
    """Postfix ``delays=a/b/c/d``: before qmgr, in qmgr, connection setup, transmission."""
    def f(x: float) -> str:
        x = max(0.0, x)
        return "0" if x < 0.005 else (f"{x:.2f}".rstrip("0").rstrip(".") if x < 10 else f"{x:.0f}")
    return "/".join(f(x) for x in (before_active, in_active, setup, transmit))


def format_delay(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.2f}".rstrip("0").rstrip(".") if seconds < 10 else f"{seconds:.0f}"
