"""mailserver.uring (the io_uring the spool writes queue files with) and the
``io_engine`` setting: real system calls on real files in temporary
directories."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import textwrap

import pytest

from mailserver import uring
from mailserver.delivery import mailbox
from mailserver.config import Config, ConfigError
from mailserver.server import MailServer, StartupError
from mailserver.spool import Envelope, RecipientState, Spool, SpoolError, new_queue_id


def _ring_spool(tmp_path) -> Spool:
    """A spool in tmp_path/queue writing on an io_uring (close it after)."""
    spool = Spool(str(tmp_path / "queue"), io_engine="io_uring")
    spool.create_directories()
    spool.start_io()
    return spool


def test_this_machine_has_io_uring():
    # CI runs on Linux with io_uring enabled; without it every io_uring test
    # below would be testing the fallback only.
    assert uring.available()
    loop = asyncio.new_event_loop()
    try:
        uring.open_ring(loop).close()
    finally:
        loop.close()


async def run(ring: uring.Ring, method, *args) -> int:
    fut, done = ring.future()
    method(*args, done)
    return await fut


async def test_file_operations_and_their_errors(tmp_path):
    ring = uring.open_ring(asyncio.get_running_loop())
    try:
        path = os.fsencode(tmp_path / "a")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = await run(ring, ring.openat, path, flags, 0o600)
        assert await run(ring, ring.writev, fd, [b"hello ", b"world\n"]) == 12
        assert await run(ring, ring.fsync, fd) == 0
        assert await run(ring, ring.close_fd, fd) == 0
        assert (tmp_path / "a").read_bytes() == b"hello world\n"
        assert oct((tmp_path / "a").stat().st_mode & 0o777) == "0o600"
        with pytest.raises(FileExistsError):  # O_EXCL: never replaces a file
            await run(ring, ring.openat, path, flags, 0o600)
        await run(ring, ring.renameat, path, os.fsencode(tmp_path / "b"))
        assert sorted(os.listdir(tmp_path)) == ["b"]
        await run(ring, ring.unlinkat, os.fsencode(tmp_path / "b"))
        assert os.listdir(tmp_path) == []
        with pytest.raises(FileNotFoundError):
            await run(ring, ring.unlinkat, os.fsencode(tmp_path / "b"))
        with pytest.raises(OSError) as info:
            await run(ring, ring.fsync, 987654)
        assert info.value.errno == errno.EBADF
    finally:
        await ring.drain()
        ring.close()
    late = []  # an operation on a closed ring is answered ECANCELED, never lost
    ring.fsync(0, late.append)
    await asyncio.sleep(0)
    assert late == [-errno.ECANCELED]


async def test_more_operations_than_ring_entries_all_complete(tmp_path):
    ring = uring.Ring(asyncio.get_running_loop(), entries=4)
    try:
        assert ring.entries == 4
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fds = await asyncio.gather(*(run(ring, ring.openat, os.fsencode(tmp_path / f"f{i}"), flags, 0o600)
                                     for i in range(50)))
        assert len(set(fds)) == 50
        await asyncio.gather(*(run(ring, ring.close_fd, fd) for fd in fds))
        assert len(os.listdir(tmp_path)) == 50
        assert ring.submitted == 100
        assert ring.enters < 100  # submissions of one loop iteration share one io_uring_enter
    finally:
        ring.close()


async def test_completions_that_overflow_the_completion_queue_are_fetched_not_lost():
    """More completions than the CQ holds (here forced: four rounds of
    operations submitted before the loop can reap) go to the kernel's
    overflow list, which no eventfd signal announces: the reaper must fetch
    them, or everything behind them waits for ever."""
    ring = uring.Ring(asyncio.get_running_loop(), entries=4)  # CQ: 8 entries
    results: list[int] = []
    told: list[bool] = []
    ring.on_overflow = lambda: told.append(True)
    try:
        ring.entries = 64  # (lift the in-flight cap that normally prevents this)
        for _ in range(5):
            for _ in range(4):  # a bad descriptor: each completes during io_uring_enter
                ring.close_fd(2**30, results.append)
            ring._flush()
        flags = uring._U32.unpack_from(ring._sq, ring._sq_flags_off)[0]
        assert flags & uring._SQ_CQ_OVERFLOW, "the test did not overflow the CQ"
        await asyncio.wait_for(ring.drain(), timeout=5)
        assert results == [-errno.EBADF] * 20
        assert ring.overflows >= 1 and 1 <= len(told) <= ring.overflows  # told (at most once a minute)
    finally:
        ring.close()


def _overflow(ring: "uring.Ring", results: list[int]) -> None:
    """Post more completions than the CQ holds before the loop can reap."""
    ring.entries = 4 * ring.entries  # (lift the in-flight cap that normally prevents this)
    for _ in range(ring._cq_mask + 1 + 8):  # a bad descriptor: each completes during io_uring_enter
        ring.close_fd(2**30, results.append)
        if ring._to_submit * 2 >= ring._cq_mask + 1:
            ring._flush()
    ring._flush()


async def test_the_server_logs_a_completion_queue_overflow_once_a_minute(tmp_path):
    """The server's ring tells the mail log, as a Postfix-style warning, and
    not for every reap while it lasts."""
    import io

    stream = io.StringIO()
    config = Config.from_mapping({"queue_directory": str(tmp_path / "queue"), "io_engine": "io_uring",
                                  "myhostname": "mx.example.test",
                                  "services": {"smtp": {"listen": ["127.0.0.1:0"]}}})
    async with MailServer(config, log_stream=stream) as server:
        ring = server.spool.ring
        entries = ring.entries
        results: list[int] = []
        for _ in range(2):
            _overflow(ring, results)
            await asyncio.wait_for(ring.drain(), timeout=5)
            ring.entries = entries
        assert ring.overflows >= 2 and set(results) == {-errno.EBADF}
    warnings = [line for line in stream.getvalue().splitlines() if "overflow" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].endswith("mailserver/master[%d]: warning: io_uring: completions overflowed the completion "
                                "queue; fetched from the kernel's overflow list" % os.getpid())


async def test_drain_waits_for_operations_in_flight(tmp_path):
    ring = uring.open_ring(asyncio.get_running_loop())
    results = []
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):
            ring.fsync(fd, results.append)
        await ring.drain()
        assert results == [0] * 20
        await ring.drain()  # nothing in flight: returns at once
    finally:
        os.close(fd)
        ring.close()


def test_open_ring_says_why_when_io_uring_is_missing(monkeypatch):
    monkeypatch.setattr(uring.platform, "machine", lambda: "vax")
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(OSError) as info:
            uring.open_ring(loop)
    finally:
        loop.close()
    assert info.value.errno == errno.ENOSYS and "not available" in str(info.value)


async def test_spool_engines_and_the_fallback(tmp_path, monkeypatch):
    threads = Spool(str(tmp_path / "q1"), io_engine="threads")
    assert threads.start_io() == "threads" and threads.engine == "threads"
    auto = Spool(str(tmp_path / "q2"), io_engine="auto")
    assert auto.start_io() == "io_uring" and auto.engine == "io_uring"
    await auto.close()
    assert auto.engine == "threads"
    monkeypatch.setattr(uring.platform, "machine", lambda: "vax")  # a kernel without io_uring
    fallback = Spool(str(tmp_path / "q3"), io_engine="auto")
    assert fallback.start_io() == "threads"
    forced = Spool(str(tmp_path / "q4"), io_engine="io_uring")
    with pytest.raises(SpoolError) as info:
        forced.start_io()
    assert "io_engine = io_uring, but io_uring is not available" in str(info.value)


async def test_server_refuses_to_start_when_io_uring_is_forced_but_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(uring.platform, "machine", lambda: "vax")
    config = Config.from_mapping({"queue_directory": str(tmp_path / "queue"), "io_engine": "io_uring",
                                  "myhostname": "mx.example.test",
                                  "services": {"smtp": {"listen": ["127.0.0.1:0"]}}})
    server = MailServer(config)
    with pytest.raises(StartupError) as info:
        await server.start()
    assert "io_uring is not available" in str(info.value)
    assert not server.started


def test_io_engine_must_be_one_of_the_choices():
    assert Config.from_mapping({}).io_engine == "auto"
    with pytest.raises(ConfigError):
        Config.from_mapping({"io_engine": "aio"})


@pytest.mark.parametrize("engine", ["threads", "io_uring"])
def test_a_real_write_error_fails_the_enqueue_and_leaves_nothing(tmp_path, engine):
    """RLIMIT_FSIZE makes the kernel refuse the queue file's write (EFBIG):
    a real failing write, on each engine, in a child process."""
    script = textwrap.dedent(f"""
        import asyncio, os, resource, signal, sys
        from mailserver.spool import Envelope, RecipientState, Spool, SpoolError, new_queue_id
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        spool = Spool({str(tmp_path / 'queue')!r}, io_engine={engine!r})
        spool.create_directories()

        async def main():
            assert spool.start_io() == {engine!r}
            resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
            env = Envelope(queue_id=new_queue_id(), sender="a@x.test",
                           recipients=[RecipientState("b@y.test")], arrival_time=1.0)
            try:
                await spool.enqueue(env, b"Subject: big\\r\\n\\r\\n" + b"x" * 4000 + b"\\r\\n")
            except SpoolError as exc:
                print("refused", exc.errno, exc)
            await spool.close()
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"refused {errno.EFBIG} cannot write queue file"), out.stdout
    assert os.listdir(tmp_path / "queue" / "incoming") == []


async def test_ring_enqueue_group_commits_the_directory_fsyncs(tmp_path):
    spool = _ring_spool(tmp_path)
    try:
        envs = [Envelope(queue_id=new_queue_id(), sender="a@x.test", recipients=[RecipientState("b@y.test")],
                         arrival_time=1.0) for _ in range(64)]
        await asyncio.gather(*(spool.enqueue(env, b"Subject: s\r\n\r\nbody\r\n") for env in envs))
        assert len(os.listdir(spool.state_dir("incoming"))) == 64
        assert spool._workers.calls == 0  # no thread hand-off at all
        assert 1 <= spool._ring_syncers["incoming"].fsyncs < 64
        for env in envs:
            loaded, content = await spool.load(env.queue_id, "incoming")
            assert loaded.queue_id == env.queue_id and content == b"Subject: s\r\n\r\nbody\r\n"
    finally:
        await spool.close()


# ---------------------------------------------------------------- moves and removals on the ring

async def test_ring_moves_and_removes_without_threads(tmp_path):
    spool = _ring_spool(tmp_path)
    try:
        env = Envelope(queue_id=new_queue_id(), sender="a@x.test", recipients=[RecipientState("b@y.test")],
                       arrival_time=1.0)
        await spool.enqueue(env, b"Subject: s\r\n\r\nbody\r\n")
        await spool.move(env.queue_id, "incoming", "active", hint=env)
        assert os.listdir(spool.state_dir("incoming")) == []
        assert os.listdir(spool.state_dir("active")) == [f"{env.queue_id}.env"]
        with pytest.raises(FileNotFoundError):  # gone meanwhile (a queue tool removed it)
            await spool.move(env.queue_id, "incoming", "active", hint=env)
        await spool.remove(env.queue_id, "active", hint=env)
        assert os.listdir(spool.state_dir("active")) == []
        await spool.remove(env.queue_id, "active", hint=env)  # already gone: not an error
        assert spool._workers.calls == 0
        assert spool.ring.submitted >= 5
    finally:
        await spool.close()


async def test_ring_removal_of_a_two_file_message(tmp_path):
    spool = _ring_spool(tmp_path)
    try:
        env = Envelope(queue_id=new_queue_id(), sender="a@x.test",
                       recipients=[RecipientState("b@y.test"), RecipientState("c@y.test")], arrival_time=1.0)
        await spool.enqueue(env, b"Subject: s\r\n\r\nbody\r\n")
        env.recipients[0].status = "sent"
        await spool.update(env, "incoming")  # the content now lives in ID.msg
        assert sorted(os.listdir(spool.state_dir("incoming"))) == [f"{env.queue_id}.env", f"{env.queue_id}.msg"]
        await spool.remove(env.queue_id, "incoming", hint=env)
        assert os.listdir(spool.state_dir("incoming")) == []
    finally:
        await spool.close()


# ---------------------------------------------------------------- Maildir deliveries on the ring

def _maildir_dirs(path) -> str:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(path / sub)
    return str(path)


async def test_maildir_delivery_on_the_ring(tmp_path):
    maildir = _maildir_dirs(tmp_path / "Maildir")
    ring = uring.open_ring(asyncio.get_running_loop())
    try:
        paths = await asyncio.gather(*(mailbox.deliver_maildir_ring(
            ring, maildir, b"Subject: %d\r\n\r\nbody\r\n" % i, sender="a@x.test", recipient="u@y.test",
            original_recipient="u@y.test", hostname="mx.y.test") for i in range(20)))
        assert len(set(paths)) == 20 and all(p.startswith(maildir + "/new/") for p in paths)
        assert os.listdir(os.path.join(maildir, "tmp")) == []
        with open(paths[3], "rb") as fh:
            data = fh.read()
        assert data.startswith(b"Return-Path: <a@x.test>\nDelivered-To: u@y.test\n")
        assert data.endswith(b"Subject: 3\n\nbody\n")
        assert oct(os.stat(paths[3]).st_mode & 0o777) == "0o600"
        assert 1 <= ring.dir_syncers[os.path.join(maildir, "new")].fsyncs < 20
    finally:
        await ring.drain()
        ring.close()


@pytest.mark.parametrize("missing", ["all", "new"])
async def test_maildir_ring_hands_a_missing_maildir_to_the_thread_path(tmp_path, missing):
    path = tmp_path / "Maildir"
    if missing == "new":
        os.makedirs(path / "tmp")
    ring = uring.open_ring(asyncio.get_running_loop())
    try:
        assert await mailbox.deliver_maildir_ring(ring, str(path), b"Subject: s\r\n\r\nb\r\n", sender="a@x.test",
                                                  recipient="u@y.test", original_recipient="",
                                                  hostname="mx.y.test") is None
        # nothing delivered, nothing created, nothing left behind (the caller then creates the Maildir)
        if missing == "all":
            assert not path.exists()
        else:
            assert os.listdir(path) == ["tmp"] and os.listdir(path / "tmp") == []
    finally:
        ring.close()


async def test_maildir_ring_directory_sync_failure_withdraws_the_file(tmp_path, monkeypatch):
    # EIO cannot be produced on a healthy disk: the ring's fsync result is replaced.
    maildir = _maildir_dirs(tmp_path / "Maildir")
    ring = uring.open_ring(asyncio.get_running_loop())

    def bad_fsync(self, callback):
        self.ring.loop.call_soon(callback, -errno.EIO)

    monkeypatch.setattr(uring.RingDirSync, "request", bad_fsync)
    try:
        with pytest.raises(mailbox.MailboxError) as info:
            await mailbox.deliver_maildir_ring(ring, maildir, b"Subject: s\r\n\r\nb\r\n", sender="a@x.test",
                                               recipient="u@y.test", original_recipient="", hostname="h")
        assert info.value.temporary and "cannot sync maildir" in str(info.value)
        assert os.listdir(os.path.join(maildir, "new")) == [] and os.listdir(os.path.join(maildir, "tmp")) == []
    finally:
        await ring.drain()
        ring.close()


def test_maildir_ring_real_write_error_is_a_full_mailbox_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE: the kernel refuses the write (EFBIG) → 4.2.2, nothing left in tmp/ or new/."""
    maildir = _maildir_dirs(tmp_path / "Maildir")
    script = textwrap.dedent(f"""
        import asyncio, resource, signal
        from mailserver import uring
        from mailserver.delivery import mailbox
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        async def main():
            ring = uring.open_ring(asyncio.get_running_loop())
            resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
            try:
                await mailbox.deliver_maildir_ring(ring, {maildir!r}, b"Subject: s\\r\\n\\r\\n" + b"x" * 4000,
                                                   sender="a@x.test", recipient="u@y.test",
                                                   original_recipient="", hostname="h")
            except mailbox.MailboxError as exc:
                print("refused", exc.status, exc.temporary, exc)
            await ring.drain()
            ring.close()
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused 4.2.2 True"), out.stdout
    assert os.listdir(os.path.join(maildir, "new")) == [] and os.listdir(os.path.join(maildir, "tmp")) == []


# ---------------------------------------------------------------- ordering, failures, shutdown

async def test_the_enqueue_waits_for_the_directory_fsync_and_writes_with_o_dsync(tmp_path, monkeypatch):
    spool = _ring_spool(tmp_path)
    held = []
    monkeypatch.setattr(uring.RingDirSync, "request", lambda self, callback: held.append(callback))
    try:
        env = Envelope(queue_id=new_queue_id(), sender="a@x.test", recipients=[RecipientState("b@y.test")],
                       arrival_time=1.0)
        fut = spool.start_enqueue(env, b"Subject: s\r\n\r\nbody\r\n")
        path = spool.path("incoming", env.queue_id, "env")
        await spool.ring.drain()  # the open, then the write, have completed
        assert len(held) == 1 and not fut.done()  # no 250 before the directory fsync
        fds = [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == path]
        assert len(fds) == 1
        with open(f"/proc/self/fdinfo/{fds[0]}") as fh:
            flags = int(next(line for line in fh if line.startswith("flags:")).split()[1], 8)
        assert flags & os.O_DSYNC and flags & os.O_CLOEXEC
        held[0](0)
        assert await fut > 0
        assert not [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == path]
    finally:
        await spool.close()


@pytest.mark.parametrize("caller", ["waits", "went-away"])
async def test_a_bug_in_an_enqueue_step_fails_the_enqueue_and_leaves_nothing(tmp_path, monkeypatch, caller):
    """An unexpected exception inside a step of the ring enqueue (here: the
    directory-fsync request) fails the caller's future with a SpoolError (the
    client gets 451) and removes the queue file and its descriptor, instead
    of leaving the SMTP session waiting for good (uring.chain_step, shared
    with the Maildir chain).  A caller that went away (its future cancelled)
    leaves nothing behind either."""
    spool = _ring_spool(tmp_path)

    def broken(self, callback):
        raise RuntimeError("bug")

    monkeypatch.setattr(uring.RingDirSync, "request", broken)
    try:
        env = Envelope(queue_id=new_queue_id(), sender="a@x.test", recipients=[RecipientState("b@y.test")],
                       arrival_time=1.0)
        path = spool.path("incoming", env.queue_id, "env")
        future = spool.start_enqueue(env, b"Subject: s\r\n\r\nbody\r\n")
        if caller == "waits":
            with pytest.raises(SpoolError, match="internal error: RuntimeError: bug"):
                await asyncio.wait_for(future, 10)
        else:
            future.cancel()
        await asyncio.wait_for(spool.ring.drain(), 10)  # the write still in flight has finished
        assert not os.path.exists(path)
        assert not [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == path]
    finally:
        await spool.close()


async def test_an_unopenable_queue_directory_fails_the_enqueue_instead_of_hanging(tmp_path, monkeypatch):
    spool = _ring_spool(tmp_path)

    def emfile(state):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(spool, "_ring_dir_sync", emfile)
    try:
        env = Envelope(queue_id=new_queue_id(), sender="a@x.test", recipients=[RecipientState("b@y.test")],
                       arrival_time=1.0)
        with pytest.raises(SpoolError) as info:
            await asyncio.wait_for(spool.enqueue(env, b"Subject: s\r\n\r\nbody\r\n"), 10)
        assert info.value.errno == errno.EMFILE
        assert os.listdir(spool.state_dir("incoming")) == []
    finally:
        await spool.close()


async def test_closing_a_ring_fails_what_is_in_flight(tmp_path):
    ring = uring.Ring(asyncio.get_running_loop(), entries=2)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    results = []
    try:
        for _ in range(5):  # two in the ring, three waiting for room
            ring.fsync(fd, results.append)
        ring.close()
        assert results == [-errno.ECANCELED] * 5
        assert ring.closed
    finally:
        os.close(fd)


async def test_drain_waits_for_a_holder(tmp_path):
    ring = uring.open_ring(asyncio.get_running_loop())
    try:
        ring.hold()
        drained = asyncio.ensure_future(ring.drain())
        await asyncio.sleep(0)
        assert not drained.done()
        ring.release()
        await asyncio.wait_for(drained, 10)
    finally:
        ring.close()


async def test_a_cancelled_maildir_delivery_still_finishes_cleanly(tmp_path):
    from mailserver.delivery.local import MAILBOX_POOL, _maildir
    maildir = _maildir_dirs(tmp_path / "Maildir")
    ring = uring.open_ring(asyncio.get_running_loop())
    before = len(os.listdir("/proc/self/fd"))
    try:
        task = asyncio.ensure_future(_maildir(MAILBOX_POOL, ring, maildir, b"Subject: s\r\n\r\nb\r\n",
                                              sender="a@x.test", recipient="u@y.test", original_recipient="",
                                              hostname="h"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(ring.drain(), 10)  # the shielded delivery ran to its end
        assert len(os.listdir(os.path.join(maildir, "new"))) == 1
        assert os.listdir(os.path.join(maildir, "tmp")) == []
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        ring.close()


async def test_a_maildir_delivery_on_the_ring_runs_no_task(tmp_path):
    """The delivery's steps are a chain of completions: the caller's task is
    the only one (a task per delivery and its shields were ~3 % of the loop
    in the local benchmark)."""
    from mailserver.delivery.local import MAILBOX_POOL, _maildir
    maildir = _maildir_dirs(tmp_path / "Maildir")
    loop = asyncio.get_running_loop()
    ring = uring.open_ring(loop)
    created: list[str] = []

    def factory(loop, coro, **kwargs):
        created.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        await _maildir(MAILBOX_POOL, ring, maildir, b"Subject: s\r\n\r\nb\r\n", sender="a@x.test",
                       recipient="u@y.test", original_recipient="", hostname="h")
        assert created == []
        assert len(os.listdir(os.path.join(maildir, "new"))) == 1
        assert ring.users == 0  # held while the chain ran, released at its end
    finally:
        loop.set_task_factory(None)
        await ring.drain()
        ring.close()


async def test_a_ring_retired_during_a_group_commit_answers_every_request(tmp_path):
    ring = uring.open_ring(asyncio.get_running_loop())
    syncer = uring.RingDirSync(ring, str(tmp_path))
    results = []
    try:
        syncer.request(results.append)  # starts an fsync
        syncer.request(results.append)  # waits for the next one
        ring._abort(errno.EIO)  # e.g. a failed io_uring_enter
        for _ in range(3):  # the second fsync is answered on a later loop iteration
            await asyncio.sleep(0)
        assert sorted(results) == [-errno.ECANCELED, -errno.EIO]
        assert not syncer._running and not syncer._next
    finally:
        syncer.close()


async def test_auto_falls_back_to_threads_with_a_warning(tmp_path, monkeypatch):
    import io
    monkeypatch.setattr(uring.platform, "machine", lambda: "vax")
    config = Config.from_mapping({"queue_directory": str(tmp_path / "queue"), "myhostname": "mx.example.test",
                                  "services": {"smtp": {"listen": ["127.0.0.1:0"]}}})
    log = io.StringIO()
    async with MailServer(config, log_stream=log) as server:
        assert server.spool.engine == "threads"
    assert ("warning: io_uring is not available on linux/vax: queue files are written by worker threads"
            in log.getvalue())


def test_buffer_addresses_match_ctypes_and_only_bytes_are_taken():
    """_address computes a bytes object's data address from id(); it must
    agree with ctypes, and refuse objects whose data lives elsewhere."""
    import ctypes

    for data in (b"", b"x", b"queue file\n" * 1000, bytes(range(256))):
        assert uring._address(data) == uring._address_ctypes(data)
        if data:
            assert ctypes.string_at(uring._address(data), len(data)) == data
    for other in (bytearray(b"abc"), memoryview(b"abc")):
        with pytest.raises(TypeError):
            uring._address(other)
