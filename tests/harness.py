"""End-to-end test harness: a real ``mailserver run`` process on loopback.

:class:`ServerProcess` writes a config.toml into a temporary directory,
starts ``python -m mailserver run -c config.toml`` in its own process group,
waits (bounded) for the ``220`` greeting, and can stop it with SIGTERM or
kill it with SIGKILL.  Helpers wait for conditions with a deadline instead of
sleeping a fixed time.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_TIMEOUT = 15.0


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _listening_range() -> tuple[int, int]:
    """At least 1000 ports outside the ephemeral range: below it, else above
    it, else (a range of nearly all ports) 10000-19999 with a warning, where
    the race described below is possible again."""
    low, high = _ephemeral_range()
    if low - 10000 >= 1000:
        return 10000, low
    if 65536 - (high + 1) >= 1000:
        return high + 1, 65536
    import warnings

    warnings.warn(f"ip_local_port_range {low}-{high} leaves no room for test listeners outside it")
    return 10000, 20000


# Listening ports come from outside the kernel's ephemeral range, one after
# another from a per-process start.  A port from bind(0) is in that range:
# between closing the probe and the server's own bind, an outgoing connection
# (or the next bind(0)) could take it, and the server then exits with
# "address already in use" (seen in CI).  Outside it, only another listener
# could, and every listener here takes its port from this cursor.
_PORT_LOW, _PORT_HIGH = _listening_range()
_next_port = _PORT_LOW + (os.getpid() * 7919) % (_PORT_HIGH - _PORT_LOW)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing uses and no earlier call returned."""
    global _next_port
    for _ in range(_PORT_HIGH - _PORT_LOW):
        port = _next_port
        _next_port = _PORT_LOW + (_next_port + 1 - _PORT_LOW) % (_PORT_HIGH - _PORT_LOW)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))  # no SO_REUSEADDR: a TIME_WAIT on it counts as in use too
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on {host} in {_PORT_LOW}-{_PORT_HIGH - 1}")


def wait_until(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a true value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(params: dict[str, Any], services: dict[str, dict[str, Any]]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in params.items()]
    for name, table in services.items():
        lines.append(f"\n[services.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class ServerProcess:
    def __init__(self, root: Path, params: dict[str, Any] | None = None, *, port: int | None = None,
                 host: str = "127.0.0.1", services: dict[str, dict[str, Any]] | None = None):
        self.root = Path(root)
        self.host = host
        self.port = port or free_port(host)
        self.spool = self.root / "spool"
        self.mail = self.root / "mail"
        self.vmail = self.root / "vmail"
        self.aliases = self.root / "aliases"
        self.vmailbox = self.root / "vmailbox"
        self.log_path = self.root / "server.log"
        self.config_path = self.root / "config.toml"
        self.mail.mkdir(parents=True, exist_ok=True)
        self.vmail.mkdir(parents=True, exist_ok=True)
        if not self.aliases.exists():
            self.aliases.write_text("postmaster: root\n")
        if not self.vmailbox.exists():
            self.vmailbox.write_text("box@virt.test box/\nmbox@virt.test mboxfile\nbounces@virt.test bounces/\n")
        self.params: dict[str, Any] = {
            "myhostname": "mx.test.example",
            "mydestination": ["$myhostname", "localhost"],
            "queue_directory": str(self.spool),
            "mail_spool_directory": str(self.mail),
            "alias_maps": [f"texthash:{self.aliases}"],
            "mynetworks": ["127.0.0.1/32"],
            "virtual_mailbox_domains": ["virt.test"],
            "virtual_mailbox_base": str(self.vmail),
            "virtual_mailbox_maps": [f"texthash:{self.vmailbox}"],
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "queue_run_delay": "1s",
            "smtp_tcp_port": 1,  # nothing leaves loopback in tests unless a test says so
            "dns_nameservers": ["127.0.0.1:1"],
            "dns_timeout": "1s",
        }
        self.params.update(params or {})
        self.services = services or {"smtp": {"listen": [f"{host}:{self.port}"]}}
        self.proc: subprocess.Popen | None = None
        self._log_fh = None
        self.run_args: list[str] = []  # extra arguments for `mailserver run`
        self.nofile_soft: int | None = None  # start the server with this soft RLIMIT_NOFILE
        self.nofile_hard: int | None = None  # ... and this hard one (the server raises its soft limit to it)
        self.fsize_limit: int | None = None  # ... and this RLIMIT_FSIZE (write errors: EFBIG)

    # ------------------------------------------------------------ process
    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.params, self.services))

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> "ServerProcess":
        self.write_config()
        self._log_fh = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TZ="UTC")
        self.proc = subprocess.Popen([sys.executable, "-m", "mailserver", "run", "-c", str(self.config_path),
                                      *self.run_args],
                                     cwd=self.root, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                     preexec_fn=self._limits if self.nofile_soft or self.nofile_hard or self.fsize_limit else None)
        try:
            wait_until(self._greets, timeout, interval=0.05, what=f"220 greeting on {self.host}:{self.port}")
        except BaseException:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=DEFAULT_TIMEOUT)
            self._close_log()
            raise
        return self

    def _limits(self) -> None:  # in the child, before exec
        import resource

        if self.nofile_soft or self.nofile_hard:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            hard = self.nofile_hard or hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.nofile_soft or hard, hard), hard))
        if self.fsize_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_limit, self.fsize_limit))

    def _greets(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.settimeout(2)
                banner = s.recv(512)
                try:
                    s.sendall(b"QUIT\r\n")
                    s.recv(512)
                except OSError:
                    pass
                return banner.startswith(b"220 ")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean-up code runs."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=DEFAULT_TIMEOUT)
        self._close_log()

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return self.proc.returncode if self.proc else 0
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(timeout=timeout)
        self._close_log()
        return rc

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # ------------------------------------------------------------ observation
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = DEFAULT_TIMEOUT, count: int = 1) -> list[str]:
        rx = re.compile(pattern)

        def found() -> list[str]:
            hits = [line for line in self.log().splitlines() if rx.search(line)]
            return hits if len(hits) >= count else []

        return wait_until(found, timeout, what=f"log line /{pattern}/ x{count}\n--- log ---\n{self.log()[-3000:]}")

    def queue_files(self, *states: str) -> list[str]:
        states = states or ("maildrop", "incoming", "active", "deferred", "hold")
        out = []
        for state in states:
            d = self.spool / state
            if d.is_dir():
                out += [f"{state}/{name}" for name in sorted(os.listdir(d))]
        return out

    def queue_ids(self, *states: str) -> list[str]:
        return sorted({name.split("/", 1)[1].split(".", 1)[0] for name in self.queue_files(*states)})

    # ------------------------------------------------------------ the command line
    def cli(self, *args: str, input: bytes | None = None, timeout: float = 30.0,
            prog: str | None = None) -> subprocess.CompletedProcess:
        """Run ``mailserver -c config.toml ARGS`` (or an argv[0] alias
        given as ``prog``, a path) and capture its output."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", TZ="UTC", MAILSERVER_CONFIG=str(self.config_path))
        cmd = [prog, *args] if prog else [sys.executable, "-m", "mailserver", "-c", str(self.config_path), *args]
        return subprocess.run(cmd, input=input if input is not None else b"", capture_output=True,
                              timeout=timeout, cwd=self.root, env=env)

    def mbox(self, user: str) -> bytes:
        try:
            return (self.mail / user).read_bytes()
        except FileNotFoundError:
            return b""

    def mbox_count(self, user: str) -> int:
        return sum(1 for line in self.mbox(user).split(b"\n") if line.startswith(b"From "))

    def maildir_messages(self, path: Path) -> list[bytes]:
        new = Path(path) / "new"
        if not new.is_dir():
            return []
        return [(new / name).read_bytes() for name in sorted(os.listdir(new))]


def maildir_messages(path: Path) -> list[bytes]:
    new = Path(path) / "new"
    if not new.is_dir():
        return []
    return [(new / name).read_bytes() for name in sorted(os.listdir(new))]


def smtp_dialog(host: str, port: int, script: list[bytes], *, source: str | None = None,
                timeout: float = 10.0, read_greeting: bool = True) -> list[str]:
    """Raw SMTP: send each chunk, read one complete reply after each.

    Returns the replies (multi-line replies joined with \\n).  A chunk of
    b"" means "read one more reply without sending".
    """
    sock = socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    replies = []
    with sock:
        f = sock.makefile("rb")
        if read_greeting:
            replies.append(_read_reply(f))
        for chunk in script:
            if replies and replies[-1] == "<EOF>":
                break  # the server closed the connection
            if chunk:
                sock.sendall(chunk)
            replies.append(_read_reply(f))
    return replies


def open_at_data(host: str, port: int, rcpt: bytes, *, helo: bytes = b"HELO c.test",
                 sender: bytes = b"<a@example.org>") -> tuple[socket.socket, Any]:
    """A raw connection that has had its 354: greeting, HELO/EHLO, MAIL,
    RCPT and DATA each answered 2xx/3xx.  Returns (socket, its reader)."""
    sock = socket.create_connection((host, port), timeout=10)
    f = sock.makefile("rb")
    assert _read_reply(f).startswith("220 ")
    for command in (helo + b"\r\n", b"MAIL FROM:" + sender + b"\r\n", b"RCPT TO:" + rcpt + b"\r\n", b"DATA\r\n"):
        sock.sendall(command)
        reply = _read_reply(f)
        assert reply[:1] in ("2", "3"), (command, reply)
    return sock, f


def spy_session_writes(monkeypatch) -> list[bytes]:
    """Every transport.write of every SMTP session from now on, in order."""
    from mailserver.smtpd.session import SMTPSession

    seen: list[bytes] = []
    real_made = SMTPSession.connection_made

    def spy(self, transport):
        if self.transport is None:
            real_write = transport.write

            def write(data):
                seen.append(bytes(data))
                return real_write(data)

            transport.write = write
        real_made(self, transport)

    monkeypatch.setattr(SMTPSession, "connection_made", spy)
    return seen


def _read_reply(f) -> str:
    lines = []
    while True:
        line = f.readline()
        if not line:
            lines.append("<EOF>")
            break
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text)
        if len(text) < 4 or text[3] != "-":
            break
    return "\n".join(lines)


async def await_until(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02,
                      what: str = "condition") -> Any:
    """``wait_until`` for async tests: yields to the event loop (which may
    be running fake MX or DNS servers) while it waits."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def async_log(server: "ServerProcess", pattern: str, timeout: float = DEFAULT_TIMEOUT,
                    count: int = 1) -> list[str]:
    rx = re.compile(pattern)

    def found() -> list[str]:
        hits = [line for line in server.log().splitlines() if rx.search(line)]
        return hits if len(hits) >= count else []

    return await await_until(found, timeout, what=f"log line /{pattern}/ x{count}\n--- log ---\n{server.log()[-3000:]}")


async def async_send(host: str, port: int, sender: str, recipients: list[str], message: bytes) -> dict:
    """smtplib in a worker thread, so the test's loop keeps serving."""
    import asyncio
    import smtplib

    def send() -> dict:
        with smtplib.SMTP(host, port, timeout=30) as s:
            return s.sendmail(sender, recipients, message)

    return await asyncio.to_thread(send)


class LineSink:
    """A log stream (``log_stream=``) that keeps what the server wrote: each
    write as it came (``writes``) and the lines (``lines``, a live list)."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)
        self.lines.extend(text.splitlines())

    def flush(self) -> None:
        pass
