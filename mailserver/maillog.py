"""Postfix-compatible log lines (Postfix: syslog via postlogd).

One line per event, keyed by queue ID, in the format Postfix log tools
(pflogsumm, exporters) parse::

    Nov 21 10:00:00 myhostname mailserver/smtpd[1234]: 4Fx3Kq1zQ2: client=host[1.2.3.4]

Lines go to stderr (default) and/or ``maillog_file``; with
``maillog_syslog_prefix = no`` the ``date host`` prefix is dropped for
container runtimes that add their own (``mailserver/smtpd[PID]: ...`` stays).
``maillog_file = "/dev/stdout"`` (or ``"/dev/stderr"``) sends the lines to
that stream *instead of* stderr, as Postfix's postlogd does for containers.

``maillog_to_syslog = yes`` also sends every line to the local syslog
daemon (``/dev/log``, RFC 3164 datagrams with ``syslog_facility`` and
``syslog_name``); the socket is non-blocking, so a stalled syslogd costs
lines, never mail.  ``maillog_format = json`` (``run --log-format json``)
writes one JSON object per line instead of text, with the same information:
time, host, program, pid, service, queue ID, the text, and the ``name=value``
fields parsed out of it (``to``, ``relay``, ``delay``, ``dsn``, ``status``...).

Writes are buffered and flushed at most 10 ms later (``FLUSH_DELAY``: one
write system call for a burst of lines) so logging costs no per-line
syscall on the hot path; ``warning:``/``error:``/``fatal:``/``panic:``
lines, lines logged outside a running loop and the last lines at shutdown
are written at once; lines still waiting when the process exits are
written by an ``atexit`` handler.  (A process killed with SIGKILL loses at
most the last 10 ms of routine lines.)  A failing log destination never stops mail:
the error is reported once on stderr.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
import weakref
from typing import Callable, TextIO

SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, "ftp": 11, "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}
SYSLOG_SOCKET = "/dev/log"
# Routine lines are written at most this late, together: one write system
# call for every line of a 10 ms burst (a write per event-loop iteration was
# ~6 % of the loop's CPU at 1,300 messages/s).  Warnings and errors are
# written at once, with everything before them.
FLUSH_DELAY = 0.01
_URGENT = ("warning: ", "error: ", "fatal: ", "panic: ")
_LOGS: "weakref.WeakSet[MailLog]" = weakref.WeakSet()  # flushed at exit (a loop that ended with a timer pending)
_SEVERITY = (("panic: ", 2), ("fatal: ", 2), ("error: ", 3), ("warning: ", 4))  # crit, crit, err, warning
_QUEUE_ID = re.compile(r"^(?![a-z]+: )([0-9A-Za-z]{6,32}): ")  # not "warning: ", "fatal: "...
_FIELD = re.compile(r"(?:^|[ ,])([a-z_]+)=(<[^>]*>|[^,\s]*)")
_STATUS = re.compile(r"status=(\w+)(?: \((.*)\))?")


@atexit.register
def _flush_at_exit() -> None:
    for log in list(_LOGS):
        log.flush()


def parse_fields(text: str) -> dict:
    """The ``name=value`` fields of a Postfix log text (for JSON logs)."""
    fields: dict = {}
    m = _QUEUE_ID.match(text)
    rest = text[m.end():] if m else text
    if m:
        fields["queue_id"] = m.group(1)
    for name, value in _FIELD.findall(rest):
        if name in fields:
            continue
        fields[name] = value[1:-1] if value.startswith("<") and value.endswith(">") else value
    st = _STATUS.search(rest)
    if st:
        fields["status"] = st.group(1)
        if st.group(2) is not None:
            fields["status_detail"] = st.group(2)
    return fields


class MailLog:
    def __init__(self, *, hostname: str, syslog_name: str = "mailserver", stream: TextIO | None = sys.stderr,
                 path: str = "", prefix: bool = True, clock: Callable[[], float] = time.time,
                 fmt: str = "text", to_syslog: bool = False, syslog_facility: str = "mail",
                 syslog_address: str = SYSLOG_SOCKET):
        self.pid = os.getpid()
        self.clock = clock
        self._stamp_second = -1  # the syslog time stamp, formatted once per second
        self._stamp = ""
        self._tags: dict[str, str] = {}  # "name/service[pid]: " per service
        self._pending: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop whose flush timer is pending
        self._loop_thread = 0  # the thread that runs it
        self._lock = threading.Lock()
        _LOGS.add(self)
        self._fd: int | None = None
        self._syslog: socket.socket | None = None
        self._failed = False
        self._syslog_failed = False
        self.syslog_dropped = 0
        self.listeners: list[Callable[[str, str], None]] = []  # (service, text) observers
        self._default_stream = stream
        self.configure(hostname=hostname, syslog_name=syslog_name, path=path, prefix=prefix, fmt=fmt,
                       to_syslog=to_syslog, syslog_facility=syslog_facility, syslog_address=syslog_address)

    def configure(self, *, hostname: str, syslog_name: str = "mailserver", path: str = "", prefix: bool = True,
                  fmt: str = "text", to_syslog: bool = False, syslog_facility: str = "mail",
                  syslog_address: str = SYSLOG_SOCKET) -> None:
        """(Re)apply the log settings (start-up and reload).  Raises OSError
        when ``maillog_file`` cannot be opened; the old settings then stay."""
        if fmt not in ("text", "json"):
            raise ValueError(f"unknown log format {fmt!r}")
        if syslog_facility not in SYSLOG_FACILITIES:
            raise ValueError(f"unknown syslog_facility {syslog_facility!r}")
        stream = self._default_stream
        fd: int | None = None
        if path in ("/dev/stdout", "/dev/stderr"):
            # The container idiom: log to that stream instead of stderr.
            stream = sys.stdout if path == "/dev/stdout" else sys.stderr
        elif path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640)
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.stream = stream
        self.hostname = hostname
        self.syslog_name = syslog_name
        self.path = path
        self.prefix = prefix
        self.format = fmt
        self.syslog_facility = syslog_facility
        self.syslog_address = syslog_address
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None
        self.to_syslog = to_syslog
        self._syslog_failed = False
        self._tags = {}
        self._stamp_second = -1

    def line(self, service: str, text: str) -> str:
        if self.format == "json":
            return self.json_line(service, text)
        tag = self._tags.get(service)
        if tag is None:
            tag = self._tags[service] = f"{self.syslog_name}/{service}[{self.pid}]: "
        if not self.prefix:
            return tag + text
        return self._syslog_stamp() + tag + text

    def _syslog_stamp(self) -> str:
        """``Nov 21 10:00:00 myhostname `` — strftime once per second."""
        now = self.clock()
        second = int(now)
        if second != self._stamp_second:
            self._stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now)) + f" {self.hostname} "
            self._stamp_second = second
        return self._stamp

    def json_line(self, service: str, text: str) -> str:
        now = self.clock()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}" + \
            time.strftime("%z", time.localtime(now))
        record = {"time": stamp, "host": self.hostname, "program": f"{self.syslog_name}/{service}",
                  "pid": self.pid, "service": service}
        fields = parse_fields(text)
        qid = fields.pop("queue_id", None)
        if qid:
            record["queue_id"] = qid
        record["text"] = text
        if fields:
            record["fields"] = fields
        return json.dumps(record, ensure_ascii=False)

    def _send_syslog(self, service: str, text: str) -> None:
        """One RFC 3164 datagram to the local syslog socket; never blocks."""
        severity = 6  # info
        body = text.split(": ", 1)[1] if _QUEUE_ID.match(text) else text
        for prefix, level in _SEVERITY:
            if body.startswith(prefix) or text.startswith(prefix):
                severity = level
                break
        pri = SYSLOG_FACILITIES[self.syslog_facility] * 8 + severity
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(self.clock()))
        data = f"<{pri}>{stamp} {self.syslog_name}/{service}[{self.pid}]: {text}".encode("utf-8", "backslashreplace")
        try:
            if self._syslog is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                try:
                    sock.connect(self.syslog_address)
                except OSError:
                    sock.close()
                    raise
                self._syslog = sock
            self._syslog.send(data[:8192])
        except BlockingIOError:
            self.syslog_dropped += 1  # syslogd is not keeping up: lose the line, not the mail
        except OSError as exc:
            if self._syslog is not None:
                self._syslog.close()
                self._syslog = None
            if not self._syslog_failed:
                self._syslog_failed = True
                print(f"mailserver: cannot write to syslog {self.syslog_address}: {exc.strerror or exc}",
                      file=sys.__stderr__)

    def log(self, service: str, text: str) -> None:
        if self._add(service, text):
            self.flush()
            return
        scheduled = self._scheduled
        if scheduled is not None and not scheduled.is_closed() and threading.get_ident() == self._loop_thread:
            return  # the pending timer writes it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tools, start-up), or a worker thread
            self.flush()
            return
        self._loop_thread = threading.get_ident()
        # A flush timer of another loop (one that ended with it pending)
        # never fires: schedule one here.
        self._scheduled = loop
        loop.call_later(FLUSH_DELAY, self._timed_flush, loop)

    def _add(self, service: str, text: str) -> bool:
        """Queue one line (and give it to the listeners and syslog); True
        when it must be written at once (a warning or an error)."""
        # Never let a newline from a remote party forge a second log line.
        if "\n" in text or "\r" in text:
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        for listener in self.listeners:
            listener(service, text)
        if self.to_syslog:
            self._send_syslog(service, text)
        line = self.line(service, text) + "\n"
        with self._lock:
            self._pending.append(line)
        return text.startswith(_URGENT)

    def exception(self, service: str, text: str) -> None:
        """A log line plus the current traceback (for internal errors), in one write."""
        self._add(service, f"warning: {text}")
        for tb_line in traceback.format_exc().rstrip().splitlines():
            self._add(service, f"warning: {tb_line}")
        self.flush()

    def _timed_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._scheduled is loop:
            self.flush()

    def flush(self) -> None:
        # Under a lock: a few start-up and table-reload paths log from worker
        # threads, and two flushes must neither repeat nor drop lines.
        with self._lock:
            self._scheduled = None
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
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None

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
