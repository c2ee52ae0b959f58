"""Deliver a message to an external command (``|command``), without a shell.

Responsibility: run one command with the message on standard input and map
its fate to a delivery :data:`~mailserver.delivery.Outcome`, the way
Postfix's ``pipe_command()``/``sys_exits`` do.  The caller decides *what*
to run (from local configuration: aliases, include files, .forward files of
local users), under which ``uid``/``gid``, in which directory, with which
environment (``SENDER``, ``RECIPIENT``, ``USER``, ``HOME``, ``PATH``...), and
what to prepend to the message (for Postfix local(8) compatibility: a From_
line and the delivery headers, see :mod:`mailserver.delivery.mailbox`).

Contract:

* :func:`split_command` splits a command line into argv like a POSIX shell
  would for plain words — whitespace separates, single quotes group
  literally, double quotes group (``\\"`` and ``\\\\`` escape inside them),
  a backslash outside quotes escapes any character — but performs no
  expansion of any kind.  Unbalanced quotes or a trailing backslash raise
  ``ValueError``.
* :func:`run_command` execs ``argv`` directly (never via ``/bin/sh``) in a
  new session/process group, with exactly ``env`` as its environment
  (a clean environment; note that ``PATH`` is used to find ``argv[0]``), and
  when ``uid`` is given with ``setgroups([])`` + ``gid`` + ``uid`` (needs
  root; a missing ``gid`` defaults to the uid's passwd primary group, and
  a uid without passwd entry then fails temporarily).  The message, CRLF
  converted to LF, is written to stdin; a command that exits without
  reading it all is not an error.  stdout and stderr are merged; the first
  ``output_limit`` bytes go, sanitised to one printable line, into the
  failure text, the rest is read and discarded.  The call completes when
  the command has exited *and* its output pipe is closed (a background
  descendant that keeps it open runs into the time limit).  Cancelling the
  call kills the process group too.
* It never raises for a command problem; it returns:

  - exit 0 -> ``Delivered("2.0.0", "delivered to command: <argv[0]>")``;
  - exit status N (sysexits.h, Postfix ``sys_exits.c``): 75 EX_TEMPFAIL and
    71 EX_OSERR -> ``TemporaryFailure("4.3.0", ...)``; 64/66/69/70/72/74 ->
    5.3.0, 65 -> 5.6.0, 67 -> 5.1.1, 68 -> 5.1.2, 73 -> 5.2.0, 76 -> 5.5.0,
    77 -> 5.7.0, 78 -> 5.3.5; any other non-zero -> 5.3.0 (all permanent).
    Text: ``Command died with status N: <cmd>. Command output: <output>``
    (the output part only when there was output);
  - killed by signal N -> ``TemporaryFailure("4.3.0", "Command died with
    signal N: <cmd>...")``;
  - ``time_limit`` seconds exceeded -> the whole process group is killed
    with SIGKILL and reaped; ``TemporaryFailure("4.3.0", "Command time limit
    exceeded: <cmd>...")``;
  - ``argv[0]`` not found -> ``PermanentFailure("5.3.0", "Command not found:
    ...")``; an unparsable or empty command -> ``PermanentFailure("5.3.5",
    ...)`` (local configuration error); any other exec/``OSError`` (no
    permission, bad ``cwd``, setuid failure) -> ``TemporaryFailure("4.3.0")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shlex
import signal

from mailserver.delivery import Delivered, Outcome, PermanentFailure, TemporaryFailure

__all__ = ["run_command", "split_command", "SYSEXITS"]

#: exit status -> (enhanced status, sysexits name); Postfix sys_exits.c.
SYSEXITS: dict[int, tuple[str, str]] = {
    64: ("5.3.0", "EX_USAGE"),
    65: ("5.6.0", "EX_DATAERR"),
    66: ("5.3.0", "EX_NOINPUT"),
    67: ("5.1.1", "EX_NOUSER"),
    68: ("5.1.2", "EX_NOHOST"),
    69: ("5.3.0", "EX_UNAVAILABLE"),
    70: ("5.3.0", "EX_SOFTWARE"),
    71: ("4.3.0", "EX_OSERR"),
    72: ("5.3.0", "EX_OSFILE"),
    73: ("5.2.0", "EX_CANTCREAT"),
    74: ("5.3.0", "EX_IOERR"),
    75: ("4.3.0", "EX_TEMPFAIL"),
    76: ("5.5.0", "EX_PROTOCOL"),
    77: ("5.7.0", "EX_NOPERM"),
    78: ("5.3.5", "EX_CONFIG"),
}

_READ_CHUNK = 64 * 1024
_NONPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\U0010ffff]+")
_SPACES = re.compile(r"\s+")


def split_command(command: str) -> list[str]:
    """Split ``command`` into argv without any shell expansion.

    Raises ``ValueError`` on unbalanced quotes or a trailing backslash.
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def _one_line(text: str, limit: int = 0) -> str:
    """Printable one-line form of ``text`` (CR/LF/TAB/controls -> space)."""
    text = _NONPRINTABLE.sub(" ", text.replace("\r", " ").replace("\n", " ").replace("\t", " "))
    text = _SPACES.sub(" ", text).strip()
    if limit and len(text) > limit:
        text = text[:limit] + "..."
    return text


def _with_output(text: str, output: bytes, truncated: bool) -> str:
    shown = _one_line(output.decode("utf-8", "replace"))
    if not shown:
        return text
    if truncated:
        shown += "..."
    return f"{text}. Command output: {shown}"


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    try:
        stdin.write(data)
        await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stdin.wait_closed()


class _Output:
    """The first ``limit`` bytes of the command's output (kept on timeout too)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 0)
        self.kept = bytearray()
        self.truncated = False

    async def collect(self, stdout: asyncio.StreamReader) -> None:
        while True:
            chunk = await stdout.read(_READ_CHUNK)
            if not chunk:
                return
            room = self.limit - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]
            if len(chunk) > max(room, 0):
                self.truncated = True

    def describe(self, text: str) -> str:
        return _with_output(text, bytes(self.kept), self.truncated)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_command(
    command: str,
    message: bytes,
    *,
    env: dict[str, str],
    cwd: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    time_limit: float = 1000.0,
    output_limit: int = 2048,
) -> Outcome:
    """Run ``command`` with ``message`` on stdin; see the module docstring."""
    shown_cmd = _one_line(command, 200)
    try:
        argv = split_command(command)
    except ValueError as exc:
        return PermanentFailure("5.3.5", f"Command syntax error: {shown_cmd}: {exc}")
    if not argv:
        return PermanentFailure("5.3.5", "Command syntax error: empty command")

    kwargs: dict = {}
    if uid is not None:
        if gid is None:
            # Never leave the command running with the server's group.
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                return TemporaryFailure(
                    "4.3.0", f"Command {shown_cmd}: no group given and uid {uid} has no passwd entry"
                )
        kwargs["user"] = uid
        kwargs["extra_groups"] = []
    if gid is not None:
        kwargs["group"] = gid

    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            **kwargs,
        )
    except FileNotFoundError as exc:
        if cwd is not None and exc.filename == cwd:
            return TemporaryFailure(
                "4.3.0", f"Command {shown_cmd}: cannot change directory to {cwd}: {exc.strerror}"
            )
        return PermanentFailure("5.3.0", f"Command not found: {_one_line(argv[0], 200)}")
    except OSError as exc:
        return TemporaryFailure(
            "4.3.0", f"Command {shown_cmd}: cannot execute: {exc.strerror or exc}"
        )

    data = message.replace(b"\r\n", b"\n")
    assert proc.stdin is not None and proc.stdout is not None
    feeder = asyncio.create_task(_feed(proc.stdin, data))
    out = _Output(output_limit)
    reader = asyncio.create_task(out.collect(proc.stdout))
    try:
        async with asyncio.timeout(time_limit):
            await reader
            await feeder
            status = await proc.wait()
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        return TemporaryFailure("4.3.0", out.describe(f"Command time limit exceeded: {shown_cmd}"))
    finally:
        # Runs also when our caller is cancelled: leave no child or pipe behind.
        for task in (feeder, reader):
            if not task.done():
                task.cancel()
        if proc.returncode is None:
            _kill_group(proc.pid)
            with contextlib.suppress(BaseException):
                await asyncio.shield(proc.wait())
        # A descendant that left the process group may still hold the pipes
        # open; close our ends so that no transport outlives this call.
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()
        await asyncio.gather(feeder, reader, return_exceptions=True)

    if status == 0:
        return Delivered("2.0.0", f"delivered to command: {_one_line(argv[0], 200)}")
    if status < 0:
        return TemporaryFailure(
            "4.3.0", out.describe(f"Command died with signal {-status}: {shown_cmd}")
        )
    code = SYSEXITS.get(status, ("5.3.0", ""))[0]
    text = out.describe(f"Command died with status {status}: {shown_cmd}")
    if code.startswith("4"):
        return TemporaryFailure(code, text)
    return PermanentFailure(code, text)
