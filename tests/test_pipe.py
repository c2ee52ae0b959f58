"""|command delivery (Postfix pipe_command.c / sys_exits.c), real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from mailserver.delivery import Delivered, PermanentFailure, TemporaryFailure
from mailserver.delivery.pipe import SYSEXITS, run_command, split_command

PY = sys.executable
MESSAGE = b"From: a@example.org\r\nSubject: s\r\n\r\nline 1\r\nline 2\r\n"
ENV = {"SENDER": "a@example.org", "RECIPIENT": "b@example.com", "LC_CTYPE": "C.UTF-8"}


def script(tmp_path: Path, name: str, body: str) -> str:
    """Write a python script and return a command line that runs it."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return f"{shlex.quote(PY)} {shlex.quote(str(path))}"


# --------------------------------------------------------------------------
# FIFO helpers: event-based synchronisation with (grand)children, no sleeps
# --------------------------------------------------------------------------


def open_fifo(tmp_path: Path) -> tuple[str, int]:
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    return path, os.open(path, os.O_RDONLY | os.O_NONBLOCK)


async def read_fifo(fd: int, *, until_eof: bool, timeout: float = 30.0) -> bytes:
    """Read until some data arrived (or until EOF: every writer is gone)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            ready = loop.create_future()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            chunk = os.read(fd, 4096)
            if not chunk:
                return data
            data += chunk
            if not until_eof:
                return data


CHILD_WITH_GRANDCHILD = """\
    import os, subprocess, sys, time
    fd = os.open(sys.argv[1], os.O_WRONLY)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=(fd,))
    os.write(fd, b"x")
    time.sleep(600)
"""


# --------------------------------------------------------------------------
# split_command
# --------------------------------------------------------------------------


def test_split_command_quotes_and_escapes() -> None:
    assert split_command(r"""/bin/x "a b" 'c d' e\ f "q\"x" 'it''s' "a\b" """) == [
        "/bin/x",
        "a b",
        "c d",
        "e f",
        'q"x',
        "its",
        "a\\b",
    ]
    assert split_command("  prog\t-x   $HOME ;|& `id` # not a comment ") == [
        "prog",
        "-x",
        "$HOME",
        ";|&",
        "`id`",
        "#",
        "not",
        "a",
        "comment",
    ]
    assert split_command("") == []


@pytest.mark.parametrize("bad", ['prog "open', "prog 'open", "prog \\"])
def test_split_command_unbalanced(bad: str) -> None:
    with pytest.raises(ValueError):
        split_command(bad)


# --------------------------------------------------------------------------
# run_command outcomes
# --------------------------------------------------------------------------


async def test_exit_zero_delivers_lf_message_on_stdin(tmp_path) -> None:
    out = tmp_path / "out"
    cmd = script(
        tmp_path,
        "copy.py",
        "import sys\nopen(sys.argv[1], 'wb').write(sys.stdin.buffer.read())\n",
    )
    result = await run_command(f"{cmd} {shlex.quote(str(out))}", MESSAGE, env=ENV)
    assert result == Delivered("2.0.0", f"delivered to command: {PY}")
    assert out.read_bytes() == MESSAGE.replace(b"\r\n", b"\n")


async def test_environment_is_exactly_what_was_passed(tmp_path) -> None:
    out = tmp_path / "env.json"
    cmd = script(
        tmp_path,
        "env.py",
        "import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n",
    )
    os.environ["MAILSERVER_TEST_LEAK"] = "must not be inherited"
    try:
        result = await run_command(f"{cmd} {shlex.quote(str(out))}", MESSAGE, env=ENV)
    finally:
        del os.environ["MAILSERVER_TEST_LEAK"]
    assert isinstance(result, Delivered)
    assert json.loads(out.read_text()) == ENV


async def test_no_shell_metacharacters_are_interpreted(tmp_path) -> None:
    out = tmp_path / "argv.json"
    cmd = script(
        tmp_path,
        "argv.py",
        "import json, sys\njson.dump(sys.argv[2:], open(sys.argv[1], 'w'))\n",
    )
    result = await run_command(
        f"{cmd} {shlex.quote(str(out))} '$HOME' a;b \"c d\" `id` >x", MESSAGE, env=ENV
    )
    assert isinstance(result, Delivered)
    assert json.loads(out.read_text()) == ["$HOME", "a;b", "c d", "`id`", ">x"]
    assert not (tmp_path / "x").exists()


async def test_cwd(tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cmd = script(tmp_path, "cwd.py", "import os\nopen('here', 'w').write(os.getcwd())\n")
    result = await run_command(cmd, MESSAGE, env=ENV, cwd=str(work))
    assert isinstance(result, Delivered)
    assert (work / "here").read_text() == str(work)


async def test_missing_cwd_is_temporary(tmp_path) -> None:
    cmd = script(tmp_path, "ok.py", "pass\n")
    result = await run_command(cmd, MESSAGE, env=ENV, cwd=str(tmp_path / "nope"))
    assert isinstance(result, TemporaryFailure)
    assert result.status == "4.3.0"


async def test_exit_75_is_temporary_with_sanitised_output(tmp_path) -> None:
    cmd = script(
        tmp_path,
        "tempfail.py",
        "import sys\nsys.stdout.write('try\\r\\nlater\\x07\\tplease\\n')\n"
        "sys.stdout.flush()\nsys.stderr.write('from stderr\\n')\nsys.exit(75)\n",
    )
    result = await run_command(cmd, MESSAGE, env=ENV)
    assert isinstance(result, TemporaryFailure)
    assert result.status == "4.3.0"
    assert result.text.startswith(f"Command died with status 75: {cmd}. Command output: ")
    assert result.text.endswith("try later please from stderr")
    assert "\n" not in result.text and "\r" not in result.text


async def test_exit_67_is_user_unknown(tmp_path) -> None:
    cmd = script(tmp_path, "nouser.py", "import sys\nsys.exit(67)\n")
    result = await run_command(cmd, MESSAGE, env=ENV)
    assert result == PermanentFailure("5.1.1", f"Command died with status 67: {cmd}")


async def test_exit_1_is_permanent(tmp_path) -> None:
    cmd = script(tmp_path, "one.py", "print('boom')\nraise SystemExit(1)\n")
    result = await run_command(cmd, MESSAGE, env=ENV)
    assert result == PermanentFailure(
        "5.3.0", f"Command died with status 1: {cmd}. Command output: boom"
    )


@pytest.mark.parametrize("code", sorted(SYSEXITS))
async def test_sysexits_mapping(tmp_path, code: int) -> None:
    cmd = script(tmp_path, "exit.py", f"import sys\nsys.exit({code})\n")
    result = await run_command(cmd, MESSAGE, env=ENV)
    expected = SYSEXITS[code][0]
    assert result.status == expected
    kind = TemporaryFailure if expected.startswith("4") else PermanentFailure
    assert isinstance(result, kind)


def test_sysexits_table_matches_postfix() -> None:
    assert {k: v[0] for k, v in SYSEXITS.items()} == {
        64: "5.3.0", 65: "5.6.0", 66: "5.3.0", 67: "5.1.1", 68: "5.1.2",
        69: "5.3.0", 70: "5.3.0", 71: "4.3.0", 72: "5.3.0", 73: "5.2.0",
        74: "5.3.0", 75: "4.3.0", 76: "5.5.0", 77: "5.7.0", 78: "5.3.5",
    }  # fmt: skip


async def test_killed_by_signal_is_temporary(tmp_path) -> None:
    cmd = script(tmp_path, "sig.py", "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    result = await run_command(cmd, MESSAGE, env=ENV)
    assert isinstance(result, TemporaryFailure)
    assert result.status == "4.3.0"
    assert result.text.startswith(f"Command died with signal 15: {cmd}")


async def test_time_limit_kills_sleeping_child(tmp_path) -> None:
    cmd = script(tmp_path, "sleep.py", "import time\ntime.sleep(600)\n")
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await run_command(cmd, MESSAGE, env=ENV, time_limit=0.2)
    assert loop.time() - start < 30
    assert isinstance(result, TemporaryFailure)
    assert result.status == "4.3.0"
    assert result.text.startswith(f"Command time limit exceeded: {cmd}")


async def test_time_limit_kills_whole_process_group(tmp_path) -> None:
    fifo, rfd = open_fifo(tmp_path)
    try:
        cmd = script(tmp_path, "tree.py", CHILD_WITH_GRANDCHILD)
        task = asyncio.create_task(
            run_command(f"{cmd} {shlex.quote(fifo)}", MESSAGE, env=ENV, time_limit=2.0)
        )
        assert await read_fifo(rfd, until_eof=False) == b"x"  # child + grandchild up
        result = await task
        assert isinstance(result, TemporaryFailure)
        assert "time limit" in result.text
        # EOF on the FIFO: the grandchild, which holds a write end, is gone too.
        assert await read_fifo(rfd, until_eof=True) == b""
    finally:
        os.close(rfd)


async def test_cancellation_kills_process_group(tmp_path) -> None:
    fifo, rfd = open_fifo(tmp_path)
    try:
        cmd = script(tmp_path, "tree.py", CHILD_WITH_GRANDCHILD)
        task = asyncio.create_task(run_command(f"{cmd} {shlex.quote(fifo)}", MESSAGE, env=ENV))
        assert await read_fifo(rfd, until_eof=False) == b"x"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await read_fifo(rfd, until_eof=True) == b""
    finally:
        os.close(rfd)


async def test_huge_output_is_bounded(tmp_path) -> None:
    cmd = script(
        tmp_path,
        "noisy.py",
        "import sys\nsys.stdout.buffer.write(b'A' * 10_000_000)\nsys.exit(1)\n",
    )
    result = await run_command(cmd, MESSAGE, env=ENV, output_limit=100)
    assert isinstance(result, PermanentFailure)
    assert result.text.endswith(". Command output: " + "A" * 100 + "...")


async def test_command_that_ignores_stdin_still_succeeds(tmp_path) -> None:
    cmd = script(tmp_path, "ignore.py", "import os\nos.close(0)\n")
    result = await run_command(cmd, b"x" * 5_000_000, env=ENV)
    assert isinstance(result, Delivered)


async def test_command_not_found_is_permanent(tmp_path) -> None:
    result = await run_command(str(tmp_path / "no-such-program") + " arg", MESSAGE, env=ENV)
    assert result == PermanentFailure(
        "5.3.0", f"Command not found: {tmp_path / 'no-such-program'}"
    )


async def test_not_executable_is_temporary(tmp_path) -> None:
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o644)
    result = await run_command(str(prog), MESSAGE, env=ENV)
    assert isinstance(result, TemporaryFailure)
    assert result.status == "4.3.0"


@pytest.mark.parametrize("bad", ['prog "open', "", "   "])
async def test_malformed_command_is_config_error(bad: str) -> None:
    result = await run_command(bad, MESSAGE, env=ENV)
    assert isinstance(result, PermanentFailure)
    assert result.status == "5.3.5"


def world_executable_python() -> str | None:
    """A python interpreter that an unprivileged uid can execute, if any."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        path = os.path.realpath(candidate)
        parts = Path(path).parents
        if os.path.exists(path) and os.stat(path).st_mode & 0o001 and all(
            os.stat(d).st_mode & 0o001 for d in parts
        ):
            return path
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
async def test_runs_as_given_uid_gid_without_supplementary_groups() -> None:
    python = world_executable_python()
    if python is None:
        pytest.skip("no python interpreter executable by an unprivileged uid")
    cmd = (
        f"{shlex.quote(python)} -I -c "
        "'import os, sys; print(os.getuid(), os.getgid(), os.getgroups()); sys.exit(1)'"
    )
    result = await run_command(cmd, MESSAGE, env=ENV, cwd="/", uid=65534, gid=65534)
    assert isinstance(result, PermanentFailure)
    assert result.text.endswith("Command output: 65534 65534 []")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
async def test_uid_without_gid_uses_passwd_primary_group() -> None:
    python = world_executable_python()
    if python is None:
        pytest.skip("no python interpreter executable by an unprivileged uid")
    try:
        primary = pwd.getpwuid(65534).pw_gid
    except KeyError:
        pytest.skip("uid 65534 has no passwd entry")
    cmd = f"{shlex.quote(python)} -I -c 'import os, sys; print(os.getgid()); sys.exit(1)'"
    result = await run_command(cmd, MESSAGE, env=ENV, cwd="/", uid=65534)
    assert result.text.endswith(f"Command output: {primary}")
