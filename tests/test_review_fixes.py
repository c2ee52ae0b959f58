"""Regression tests for defects found in review of the performance work:
the session count across a reload, worker-pool semantics, a message whose
client hangs up after the final dot, a reply flood from a next hop, and
corrupt held/deferred files."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from harness import LineSink, await_until, open_at_data
from mailserver import MailServer, uring
from mailserver.delivery.smtp import _MAX_QUEUED_BYTES, _MAX_QUEUED_REPLIES, _MAX_REPLY_LINE, _ReplyCollector
from mailserver.queuetools import collect
from mailserver.spool import CorruptRecord
from mailserver.workers import WorkerPool

from test_api import maildir, make_config, queue_files



def _past_ehlo(sock: socket.socket):
    """Read the greeting, send EHLO, read its reply; the reader for the rest."""
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"EHLO c.test\r\n")
    while f.readline()[3:4] == b"-":
        pass
    return f


# ------------------------------------------------------------------ reload

def _greeting(host: str, port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((host, port), timeout=10)
    return sock, sock.recv(512)


async def _another_banner(host: str, port: int) -> bytes:
    """The banner of one more connection, closed at once."""
    sock, banner = await asyncio.to_thread(_greeting, host, port)
    sock.close()
    return banner


async def test_smtpd_process_limit_still_counts_sessions_opened_before_a_reload(tmp_path):
    config = make_config(tmp_path, smtpd_process_limit=2)
    async with MailServer(config, log_stream=None) as server:
        host, port = server.addresses()[0][:2]
        held = []
        try:
            for _ in range(2):
                sock, banner = await asyncio.to_thread(_greeting, host, port)
                held.append(sock)
                assert banner.startswith(b"220 ")
            await server.reload(config)
            assert server.smtpd.open_sessions == 2
            sock, banner = await asyncio.to_thread(_greeting, host, port)
            held.append(sock)
            assert banner.startswith(b"421 4.3.2 ")
        finally:
            for sock in held:
                sock.close()
        await await_until(lambda: server.smtpd.open_sessions == 0, what="sessions closed")


# ------------------------------------------------------------------ WorkerPool

async def test_a_job_cancelled_before_it_starts_is_not_run():
    pool = WorkerPool(1, name="t")
    gate = threading.Event()
    ran: list[str] = []
    try:
        first = pool.run(gate.wait, 10)
        second = pool.run(ran.append, "second")
        second.cancel()
        gate.set()
        assert await first is True
        third = pool.run(ran.append, "third")
        await third
        assert ran == ["third"]
    finally:
        gate.set()
        pool.close()


async def test_stop_iteration_in_a_job_is_an_error_and_other_results_of_the_batch_arrive():
    pool = WorkerPool(2, name="t")

    def stop() -> None:
        raise StopIteration("x")

    try:
        bad, good = pool.run(stop), pool.run(lambda: 42)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(bad, 10)
        assert await asyncio.wait_for(good, 10) == 42
    finally:
        pool.close()


async def test_the_pool_grows_only_when_no_thread_is_idle():
    pool = WorkerPool(8, name="t")
    try:
        for _ in range(20):
            await pool.run(time.sleep, 0)
        assert len(pool._threads) == 1  # sequential jobs: the worker counts as idle before its result is posted
    finally:
        pool.close()


# ------------------------------------------------------------------ client gone after the dot

def _send_and_hang_up(host: str, port: int) -> None:
    sock, _ = open_at_data(host, port, b"<alice@one.test>", helo=b"EHLO c.test", sender=b"<x@example.net>")
    with sock:
        sock.sendall(b"Subject: gone\r\n\r\nbody\r\n.\r\n")  # and hang up before the 250


@pytest.mark.parametrize("engine", ["threads", "io_uring"])
async def test_a_message_whose_client_hangs_up_after_the_dot_is_still_delivered(tmp_path, monkeypatch, engine):
    """The queue file is being written when the client goes away: the message
    reaches the queue manager and is delivered, never stranded in incoming/.
    The write is held in its worker thread (threads) or at its directory
    fsync (io_uring: the loop must keep running meanwhile)."""
    started, release = threading.Event(), threading.Event()
    held: list = []
    if engine == "io_uring":
        def hold_fsync(self, callback):
            held.append(callback)
            started.set()
        monkeypatch.setattr(uring.RingDirSync, "request", hold_fsync)
    async with MailServer(make_config(tmp_path, io_engine=engine), log_stream=None) as server:
        assert server.spool.engine == engine

        def slow(stage: str) -> None:
            started.set()
            release.wait(10)

        if engine == "threads":
            server.spool.fault_hook = slow
        host, port = server.addresses()[0][:2]
        await asyncio.to_thread(_send_and_hang_up, host, port)
        assert await asyncio.to_thread(started.wait, 10)
        await await_until(lambda: server.smtpd.open_sessions == 0, what="session gone")
        server.spool.fault_hook = None
        release.set()
        monkeypatch.undo()
        for callback in held:
            callback(0)
        await await_until(lambda: maildir(tmp_path, "alice"), what="delivery after the client left")
        assert b"Subject: gone" in maildir(tmp_path, "alice")[0]


# ------------------------------------------------------------------ reply flood

def test_a_flood_of_replies_is_cut_off_not_buffered():
    class Inner:
        def connection_lost(self, exc):
            pass

    collector = _ReplyCollector(Inner())
    collector.data_received(b"250 ok\r\n" * (_MAX_QUEUED_REPLIES + 500))
    assert len(collector.replies) == _MAX_QUEUED_REPLIES
    assert collector.error is not None and "Too many replies" in str(collector.error)
    collector.data_received(b"250 ok\r\n" * 1000)  # ignored once in error
    assert len(collector.replies) == _MAX_QUEUED_REPLIES and not collector.buffer


def test_a_flood_of_long_replies_is_cut_off_by_size():
    """Fewer replies than the count cap, but long ones: the text held is
    capped too (4096 replies of 32 kB would be 128 MB)."""
    class Inner:
        def connection_lost(self, exc):
            pass

    collector = _ReplyCollector(Inner())
    line = b"250-" + b"x" * (_MAX_REPLY_LINE - 10) + b"\r\n"
    reply = line * 3 + b"250 end\r\n"
    for _ in range(_MAX_QUEUED_BYTES // len(reply) + 10):
        collector.data_received(reply)
    assert collector.error is not None and "Too many replies" in str(collector.error)
    assert collector.queued_bytes <= _MAX_QUEUED_BYTES
    assert sum(len(r.message) for r in collector.replies) == collector.queued_bytes
    assert len(collector.replies) < _MAX_QUEUED_REPLIES


async def test_taking_replies_releases_their_bytes():
    class Inner:
        def connection_lost(self, exc):
            pass

    collector = _ReplyCollector(Inner())
    collector.data_received(b"250 first\r\n250 second\r\n")
    assert collector.queued_bytes == len("first") + len("second")
    assert (await collector.next_reply(1)).message == "first"
    assert collector.queued_bytes == len("second")
    assert (await collector.next_reply(1)).message == "second"
    assert collector.queued_bytes == 0


# ------------------------------------------------------------------ corrupt held / deferred files

async def test_queue_list_reports_a_corrupt_held_file(tmp_path):
    from mailserver.spool import Spool

    spool = Spool(str(tmp_path / "spool"))
    spool.create_directories()
    (tmp_path / "spool" / "hold" / "08DmbCORRUPT.env").write_text("{not json")
    warnings: list[str] = []
    assert collect(spool, ["hold"], warn=warnings.append) == []
    assert warnings and warnings[0].startswith("08DmbCORRUPT: hold: corrupt or unreadable queue file")
    await spool.close()


async def test_a_deferred_entry_that_is_not_a_file_is_quarantined_not_retried(tmp_path):
    from mailserver.spool import Spool

    spool = Spool(str(tmp_path / "spool"))
    spool.create_directories()
    (tmp_path / "spool" / "deferred" / "08DmbNOTAFILE.env").mkdir()
    with pytest.raises(CorruptRecord, match="cannot read queue file"):
        await spool.load("08DmbNOTAFILE", "deferred")
    await spool.close()


async def test_reload_applies_a_new_client_event_limit_exception_list(tmp_path):
    """smtpd_client_event_limit_exceptions changes take effect on reload (the
    kept listener's anvil used to keep the old exemption matcher)."""
    config = make_config(tmp_path, smtpd_client_connection_count_limit=1,
                         smtpd_client_event_limit_exceptions=["127.0.0.1"])
    async with MailServer(config, log_stream=None) as server:
        host, port = server.addresses()[0][:2]
        first, banner = await asyncio.to_thread(_greeting, host, port)
        try:
            assert banner.startswith(b"220 ")
            banner = await _another_banner(host, port)
            assert banner.startswith(b"220 ")  # exempt: no per-client limit
            await server.reload(config.replace(smtpd_client_event_limit_exceptions=[]))
            third, banner = await asyncio.to_thread(_greeting, host, port)  # counted from now on
            try:
                assert banner.startswith(b"220 ")
                banner = await _another_banner(host, port)
                assert banner.startswith(b"421 4.7.0 ")  # no longer exempt: over the limit of 1
            finally:
                third.close()
        finally:
            first.close()


async def test_queue_list_skips_a_queue_file_still_being_written(tmp_path):
    """Queue files are created in place: an empty or short incoming file is
    one being written (or a crash leftover recovery removes), not corrupt."""
    from mailserver.spool import Envelope, RecipientState, Spool, new_queue_id

    spool = Spool(str(tmp_path / "spool"))
    spool.create_directories()
    done = Envelope(new_queue_id(), "a@example.org", [RecipientState("b@example.com")], time.time())
    await spool.enqueue(done, b"Subject: x\r\n\r\ny\r\n")
    (tmp_path / "spool" / "incoming" / f"{new_queue_id()}.env").write_bytes(b"")
    warnings: list[str] = []
    listed = collect(spool, ["incoming"], warn=warnings.append)
    assert [m.queue_id for m in listed] == [done.queue_id] and warnings == []
    await spool.close()


async def test_a_refused_connection_is_logged_once_where_it_was_decided(tmp_path):
    sink = LineSink()
    lines = sink.lines

    config = make_config(tmp_path, smtpd_process_limit=1, smtpd_client_connection_count_limit=1,
                         smtpd_client_event_limit_exceptions=[])
    async with MailServer(config, log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        first, banner = await asyncio.to_thread(_greeting, host, port)
        try:
            assert banner.startswith(b"220 ")
            banner = await _another_banner(host, port)
            assert banner.startswith(b"421 4.3.2 ")  # the session cap comes before anvil
        finally:
            first.close()
        await await_until(lambda: server.smtpd.open_sessions == 0, what="sessions closed")
    warnings = [line for line in lines if "warning:" in line]
    assert len(warnings) == 1 and "smtpd_process_limit 1 reached: connection refused" in warnings[0]


async def test_a_client_that_hangs_up_without_quit_is_logged_as_a_lost_connection(tmp_path):
    sink = LineSink()
    lines = sink.lines

    def session(host: str, port: int, quit: bool) -> None:
        with socket.create_connection((host, port), timeout=10) as sock:
            f = _past_ehlo(sock)
            if quit:
                sock.sendall(b"QUIT\r\n")
                f.readline()

    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        await asyncio.to_thread(session, host, port, False)
        await await_until(lambda: any("disconnect from" in line for line in lines), what="first disconnect")
        await asyncio.to_thread(session, host, port, True)
        await await_until(lambda: sum("disconnect from" in line for line in lines) == 2, what="second disconnect")
    lost = [line for line in lines if "lost connection" in line]
    assert len(lost) == 1 and lost[0].endswith("lost connection after EHLO from unknown[127.0.0.1]")


async def test_lost_connections_in_and_after_data_say_where_as_postfix_does(tmp_path):
    """Postfix: "lost connection after DATA (N bytes)" while the message is
    coming in, "lost connection after END-OF-MESSAGE" once it was answered."""
    sink = LineSink()
    lines = sink.lines

    def session(host: str, port: int, data: bytes, finish: bool) -> None:
        sock, f = open_at_data(host, port, b"<alice@example.test>")
        with sock:
            sock.sendall(data)
            if finish:
                sock.sendall(b".\r\n")
                assert f.readline().startswith(b"250 ")

    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        await asyncio.to_thread(session, host, port, b"Subject: cut\r\n\r\n" + b"x" * 1000, False)
        await await_until(lambda: any("disconnect from" in line for line in lines), what="first disconnect")
        await asyncio.to_thread(session, host, port, b"Subject: whole\r\n\r\nbody\r\n", True)
        await await_until(lambda: sum("disconnect from" in line for line in lines) == 2, what="second disconnect")
    lost = [line for line in lines if "lost connection" in line]
    assert len(lost) == 2, lost
    assert lost[0].endswith("lost connection after DATA (1016 bytes) from unknown[127.0.0.1]"), lost[0]
    assert lost[1].endswith("lost connection after END-OF-MESSAGE from unknown[127.0.0.1]"), lost[1]
    assert sum("message-id=" in line for line in lines) == 1  # the cut message was never queued


async def test_a_refused_data_command_is_logged_without_a_byte_count(tmp_path):
    """"(N bytes)" only while message content is read: DATA refused with 503
    (no MAIL), then a hang-up, is "lost connection after DATA"."""
    sink = LineSink()

    def session(host: str, port: int) -> None:
        with socket.create_connection((host, port), timeout=10) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"HELO c.test\r\n")
            f.readline()
            sock.sendall(b"DATA\r\n")
            assert f.readline().startswith(b"503 ")

    async with MailServer(make_config(tmp_path), log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        await asyncio.to_thread(session, host, port)
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
    [lost] = [line for line in sink.lines if "lost connection" in line]
    assert lost.endswith("lost connection after DATA from unknown[127.0.0.1]"), lost


async def test_a_reload_with_a_broken_virtual_uid_map_is_refused_and_changes_nothing(tmp_path):
    """The delivery agents (which open virtual_uid_maps) are built in a
    thread before anything is swapped: a broken table refuses the reload."""
    from mailserver.server import ReloadError

    config = make_config(tmp_path)
    async with MailServer(config, log_stream=None) as server:
        agents, smtpd_config = server.agents, server.smtpd.config
        with pytest.raises(ReloadError, match="unsupported table type 'nosuch'"):
            await server.reload(config.replace(virtual_uid_maps=["nosuch:/x"], smtpd_banner="$myhostname new"))
        assert server.config is config and server.agents is agents
        assert server.smtpd.config is smtpd_config
        await server.reload(config.replace(smtpd_banner="$myhostname new"))
        assert server.agents is not agents and server.config.smtpd_banner == "mx.one.test new"


async def _deliver_to_someone(tmp_path):
    """One local delivery to someone@mx.one.test (mydestination); its outcome."""
    import mailserver.delivery.local as local_mod
    from mailserver.delivery import DeliveryRequest, Recipient
    from mailserver.resolve import AddressResolver

    config = make_config(tmp_path, mydestination=["mx.one.test"], alias_maps=[])
    agent = local_mod.LocalAgent(config, AddressResolver(config))
    request = DeliveryRequest(queue_id="08TESTFD", sender="s@example.org",
                              recipients=(Recipient("someone@mx.one.test", "someone@mx.one.test", 0),),
                              message=b"Subject: x\r\n\r\ny\r\n", nexthop="mx.one.test")
    [out] = await agent.deliver(request)
    return out


async def test_a_passwd_lookup_that_cannot_run_defers_local_delivery(tmp_path, monkeypatch):
    """Out of descriptors, getpwnam would say "not found": the local agent
    defers (4.3.0) instead of bouncing the mail as "unknown user"."""
    import errno

    import mailserver.delivery.local as local_mod
    from mailserver.delivery import TemporaryFailure
    from mailserver.tables import getpwnam

    assert getpwnam("root") is not None and getpwnam("no-such-user-here") is None

    def no_descriptors(name):
        raise OSError(errno.EMFILE, f"cannot look up user {name!r}: Too many open files")

    monkeypatch.setattr(local_mod, "getpwnam", no_descriptors)
    out = await _deliver_to_someone(tmp_path)
    assert out == TemporaryFailure("4.3.0", "temporary lookup failure: cannot look up user 'someone': "
                                            "Too many open files", "local")


def test_a_passwd_lookup_at_the_open_file_limit_is_an_error_not_a_miss():
    """getpwnam at the open-file limit, in a real process: the C library's
    getpwnam_r says it could not run (EMFILE), where Python's pwd module
    says "not found"; with descriptors free again, the same names are
    found or not found."""
    import subprocess
    import sys

    script = """
import errno, os, pwd, resource
from mailserver.tables import getpwnam
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
for name in ("root", "no-such-user-here"):
    try:
        getpwnam(name)
        print(name, "answered")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
for fd in held:
    os.close(fd)
print("root", getpwnam("root").pw_uid, "no-such-user-here", getpwnam("no-such-user-here"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:3] == ["root EMFILE", "no-such-user-here EMFILE", "root 0 no-such-user-here None"]


async def test_a_dot_forward_that_cannot_be_opened_for_want_of_descriptors_defers(tmp_path, monkeypatch):
    """Out of descriptors, an unopenable ~/.forward is not "no .forward":
    the mail is deferred, not delivered to the mailbox the user forwards
    away from."""
    import errno
    import os
    import pwd

    import mailserver.delivery.local as local_mod
    from mailserver.delivery import TemporaryFailure

    home = tmp_path / "home"
    home.mkdir()
    (home / ".forward").write_text("elsewhere@example.org\n")
    user = pwd.struct_passwd(("someone", "x", os.getuid(), os.getgid(), "", str(home), "/bin/sh"))
    monkeypatch.setattr(local_mod, "getpwnam", lambda name: user if name == "someone" else None)
    real_open = os.open

    def no_descriptors_for_forward(path, *args, **kw):
        if str(path).endswith("/.forward"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kw)

    monkeypatch.setattr(local_mod.os, "open", no_descriptors_for_forward)
    out = await _deliver_to_someone(tmp_path)
    monkeypatch.undo()
    assert isinstance(out, TemporaryFailure), out
    assert (out.status, out.text) == ("4.3.0", f"cannot open {home}/.forward: Too many open files")
    assert not (tmp_path / "mail" / "someone").exists()  # nothing delivered to the mailbox


# ------------------------------------------------------------------ STARTTLS

def _starttls_config(tmp_path, **params):
    """A server offering STARTTLS (a trustme certificate for mx.one.test)."""
    import trustme

    cert = trustme.CA().issue_cert("mx.one.test")
    pem = tmp_path / "cert.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    config = make_config(tmp_path, smtpd_tls_cert_file=str(pem), **params)
    return config.replace(services={"smtp": {"listen": ["127.0.0.1:0"], "tls": "may"}})


def _starttls_then(host: str, port: int, after: bytes | None) -> bytes:
    """EHLO, STARTTLS, then send ``after`` (not a TLS ClientHello) or hang up."""
    with socket.create_connection((host, port), timeout=10) as sock:
        f = _past_ehlo(sock)
        sock.sendall(b"STARTTLS\r\n")
        ready = f.readline()
        if after is not None:
            sock.sendall(after)
            sock.recv(100)  # the server's answer to garbage: it closes the connection
        f.close()
        return ready


@pytest.mark.parametrize("after", [b"this is not TLS\r\n" * 20, None], ids=["garbage", "hang-up"])
async def test_a_failed_starttls_handshake_leaves_the_session_count(tmp_path, after):
    """asyncio never calls connection_lost() on a protocol whose TLS
    handshake did not complete: the session must leave the count itself
    (it used to stay counted against smtpd_process_limit for good) and its
    idle timer must not fire later."""
    config = _starttls_config(tmp_path, smtpd_timeout="1s")
    sink = LineSink()
    async with MailServer(config, log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        ready = await asyncio.to_thread(_starttls_then, host, port, after)
        assert ready.startswith(b"220 2.0.0 ")
        await await_until(lambda: any("TLS handshake failed" in line for line in sink.lines), what="the failure")
        await await_until(lambda: server.smtpd.open_sessions == 0 and not server.smtpd.listeners[0].sessions,
                          what="the session leaving the count")
        from mailserver.smtpd.session import SMTPSession

        timers = [h for h in asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
                  if not h.cancelled() and isinstance(getattr(h._callback, "__self__", None), SMTPSession)]
        assert timers == []  # no idle timer left to fire "timeout after ..." later


async def test_the_session_time_limit_stops_a_data_still_being_queued(tmp_path):
    """smtpd_session_time_limit while the message after DATA is being
    queued and earlier replies still wait to be sent (a client that does not
    read): the 421 is final; the message is not queued behind it.  (Closing
    the connection alone let the command run on: asyncio delays
    connection_lost() until the unsent replies are written.)"""
    import io

    log = io.StringIO()
    # (pipelined EHLOs violate RFC 2920: let them through, logged, for the flood)
    config = make_config(tmp_path, smtpd_session_time_limit="1s", smtpd_forbid_unauth_pipelining=False)
    loop = asyncio.get_running_loop()
    async with MailServer(config, log_stream=log) as server:
        real_submit = server.smtpd._submit
        submitting = asyncio.Event()

        finished = asyncio.Event()

        async def slow_submit(session, content):  # a slow disk: the queue write outlives the limit
            submitting.set()
            try:
                await asyncio.sleep(1.5)
                return await real_submit(session, content)
            finally:
                finished.set()

        server.smtpd._submit = slow_submit
        [listener] = server.smtpd.listeners
        host, port = server.addresses()[0][:2]
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        try:
            await loop.sock_connect(client, (host, port))
            await await_until(lambda: listener.sessions)
            [session] = listener.sessions
            session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            seen = b""
            while b"\r\n" not in seen:  # the greeting first (a client that talks first is refused)
                seen += await asyncio.wait_for(loop.sock_recv(client, 4096), 10)
            await loop.sock_sendall(client, b"EHLO c.example\r\n")  # PIPELINING is announced here
            while b"\r\n250 " not in seen:
                seen += await asyncio.wait_for(loop.sock_recv(client, 4096), 10)
            # Many pipelined EHLOs whose replies the client never reads, then a message.
            await loop.sock_sendall(client, b"EHLO c.example\r\n" * 250 + b"MAIL FROM:<s@x.example>\r\n"
                                    b"RCPT TO:<alice@one.test>\r\nDATA\r\nSubject: late\r\n\r\nbody\r\n.\r\n")
            await asyncio.wait_for(submitting.wait(), 10)
            assert session.transport is not None and session.transport.get_write_buffer_size() > 0
            await await_until(lambda: "(session time limit)" in log.getvalue(), timeout=10)
            await asyncio.wait_for(finished.wait(), 10)  # the queue write was stopped (or, before, ran on)
            server.maillog.flush()
            assert "message-id=" not in log.getvalue()
            assert maildir(tmp_path, "alice") == [] and all(
                queue_files(tmp_path, state) == [] for state in ("incoming", "active", "deferred"))
        finally:
            client.close()


async def test_an_unexpected_error_in_a_maildir_step_fails_the_delivery_and_frees_the_ring(tmp_path, monkeypatch):
    """A bug inside one step of the io_uring Maildir chain: the delivery fails
    (4.3.0, nothing left in tmp/ or new/), and the ring is released, so
    Ring.drain() (shutdown) does not wait for good."""
    import os

    from mailserver.delivery import mailbox

    path = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        os.makedirs(path / sub)
    ring = uring.open_ring(asyncio.get_running_loop())

    def broken(self, callback):
        raise RuntimeError("bug")

    monkeypatch.setattr(uring.RingDirSync, "request", broken)
    try:
        with pytest.raises(mailbox.MailboxError) as info:
            await asyncio.wait_for(mailbox.deliver_maildir_ring(
                ring, str(path), b"Subject: s\r\n\r\nb\r\n", sender="a@x.test", recipient="u@y.test",
                original_recipient="", hostname="h"), 10)
        assert info.value.temporary and info.value.status == "4.3.0" and "internal error" in str(info.value)
        assert os.listdir(path / "tmp") == [] and os.listdir(path / "new") == []
        assert ring.users == 0
        await asyncio.wait_for(ring.drain(), 10)
    finally:
        ring.close()


async def test_reload_keeps_the_accept_callbacks_of_a_kept_listener(tmp_path):
    config = make_config(tmp_path)
    async with MailServer(config, log_stream=None) as server:
        [listener] = server.smtpd.listeners
        acceptors = list(listener.acceptors)
        assert acceptors
        await server.reload(config.replace(smtpd_banner="$myhostname new"))
        assert server.smtpd.listeners == [listener] and listener.acceptors == acceptors
        host, port = server.addresses()[0][:2]
        sock, banner = await asyncio.to_thread(_greeting, host, port)
        sock.close()
        assert banner.startswith(b"220 mx.one.test new")


async def test_the_session_time_limit_inside_a_stalled_starttls_handshake_leaves_the_session_count(tmp_path):
    """A client that says STARTTLS and then nothing, until
    smtpd_session_time_limit: the session ends and leaves the count (asyncio
    never calls connection_lost() for a handshake that did not complete)."""
    config = _starttls_config(tmp_path, smtpd_session_time_limit="1s")
    sink = LineSink()
    async with MailServer(config, log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        sock = await asyncio.to_thread(socket.create_connection, (host, port), 10)
        try:
            f = await asyncio.to_thread(_past_ehlo, sock)
            sock.sendall(b"STARTTLS\r\n")
            assert (await asyncio.to_thread(f.readline)).startswith(b"220 2.0.0 ")
            await await_until(lambda: any("(session time limit)" in line for line in sink.lines),
                              what="the session time limit")
            await await_until(lambda: server.smtpd.open_sessions == 0 and not server.smtpd.listeners[0].sessions,
                              what="the session leaving the count")
            f.close()
        finally:
            sock.close()


# ------------------------------------------------------------------ a client that does not read

def _flood_without_reading(host: str, port: int, tls: bool) -> str:
    """EHLO (and STARTTLS), then pipelined EHLOs whose replies are never
    read, until the server cuts the connection: returns how the sending
    ended (``"timeout"``: the server kept the connection open, unread)."""
    import ssl

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect((host, port))
    f = _past_ehlo(sock)
    if tls:
        sock.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220 ")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname="mx.one.test")
        f = sock.makefile("rb")
        sock.sendall(b"EHLO c.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
    try:
        for _ in range(2000):  # at most 26 MB of commands
            sock.sendall(b"EHLO c.test\r\n" * 1000)
        return "never cut"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__
    finally:
        sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
async def test_a_client_that_does_not_read_its_replies_is_cut_at_the_timeout(tmp_path, tls):
    """A client that pipelines commands and never reads the replies: at
    smtpd_timeout the server answers 421, cuts the connection and the
    session leaves the count.  (asyncio keeps a closed transport open until
    its unsent data is written, with no time limit: the connection and its
    session slot stayed taken for as long as the client kept it open.)"""
    # (pipelined EHLOs violate RFC 2920: let them through, logged, for the flood)
    params = dict(smtpd_timeout="1s", smtpd_forbid_unauth_pipelining=False)
    config = _starttls_config(tmp_path, **params) if tls else make_config(tmp_path, **params)
    sink = LineSink()
    async with MailServer(config, log_stream=sink) as server:
        host, port = server.addresses()[0][:2]
        [listener] = server.smtpd.listeners
        flood = asyncio.ensure_future(asyncio.to_thread(_flood_without_reading, host, port, tls))
        await await_until(lambda: listener.sessions, what="the session")
        [session] = listener.sessions
        # (a small send buffer, so that a few replies fill it)
        session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        how = await flood
        assert how in ("ConnectionResetError", "BrokenPipeError", "SSLEOFError")  # not "timeout"
        await await_until(lambda: any("timeout after EHLO from" in line for line in sink.lines), what="the log")
        await await_until(lambda: server.smtpd.open_sessions == 0 and not listener.sessions,
                          what="the session leaving the count")
        assert session.transport is None  # connection_lost() has run: the socket is closed


@pytest.mark.parametrize("ending", ["never-reads", "reads-late", "shutdown"])
async def test_a_connection_closed_with_replies_unsent_lingers_for_smtpd_timeout(tmp_path, caplog, ending):
    """QUIT after pipelined commands whose replies the client has not read
    yet: the 221 is queued and the connection closed, and it lingers, still
    counted as a session (as Postfix's smtpd process stays while its write
    times out).  A client that never reads is cut after smtpd_timeout, one
    that reads late gets every reply and a clean close (the cut, due later,
    then does nothing), and a shutdown cuts it at once."""
    import time

    config = make_config(tmp_path, smtpd_timeout="60s" if ending == "shutdown" else "1s",
                         smtpd_forbid_unauth_pipelining=False)  # (for the flood of pipelined EHLOs)
    sink = LineSink()
    loop = asyncio.get_running_loop()
    client = socket.socket()
    try:
        async with MailServer(config, log_stream=sink) as server:
            [listener] = server.smtpd.listeners
            host, port = server.addresses()[0][:2]
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            await loop.sock_connect(client, (host, port))
            await await_until(lambda: listener.sessions)
            [session] = listener.sessions
            session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            seen = b""
            while b"\r\n" not in seen:  # the greeting first (a client that talks first is refused)
                seen += await asyncio.wait_for(loop.sock_recv(client, 4096), 10)
            await loop.sock_sendall(client, b"EHLO c.example\r\n")
            while b"\r\n250 " not in seen:
                seen += await asyncio.wait_for(loop.sock_recv(client, 4096), 10)
            await loop.sock_sendall(client, b"EHLO c.example\r\n" * 200 + b"QUIT\r\n")
            await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="QUIT")
            # Replies were still unsent at the close: it lingers, and the session still counts.
            assert session._linger is not None
            assert server.smtpd.session_count() == 1 and listener.sessions == {session}
            if ending == "never-reads":
                await await_until(lambda: session.transport is None, what="the connection cut")
                assert server.smtpd.session_count() == 0 and not listener.sessions
            elif ending == "reads-late":
                received = b""
                while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 10):
                    received += chunk
                assert received.endswith(b"221 2.0.0 Bye\r\n") and received.count(b"250-PIPELINING") == 200
                await await_until(lambda: session.transport is None, what="connection_lost()")
                assert session._linger is None and server.smtpd.session_count() == 0
            else:
                started = time.monotonic()
        if ending == "shutdown":
            assert time.monotonic() - started < 10  # not the 60 s linger, nor stop_timeout
            assert session.transport is None and session._linger is None
        assert not [r for r in caplog.records if "Exception in callback" in r.getMessage()]
    finally:
        client.close()


async def test_a_client_that_hangs_up_during_the_reverse_lookup_gets_its_connect_line(tmp_path):
    """A client gone before its reverse lookup finished: its session's lines
    are still "connect from unknown[addr]" then "disconnect", and the
    session leaves the count (the lookup is replaced by one that never
    answers, as above)."""
    config = make_config(tmp_path)
    sink = LineSink()
    async with MailServer(config, log_stream=sink) as server:
        never = asyncio.Event()
        looking = asyncio.Event()

        async def unanswered(ip):
            looking.set()
            await never.wait()

        server.smtpd.lookup_client_name = unanswered
        host, port = server.addresses()[0][:2]
        sock = await asyncio.to_thread(socket.create_connection, (host, port), 10)
        await asyncio.wait_for(looking.wait(), 10)
        sock.close()
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="the last line")
        await await_until(lambda: server.smtpd.open_sessions == 0, what="the session leaving the count")
        mine = [line.split(": ", 1)[1] for line in sink.lines if "smtpd" in line and "[127.0.0.1]" in line]
        assert mine == ["connect from unknown[127.0.0.1]", "disconnect from unknown[127.0.0.1] commands=0/0"]


async def test_the_session_time_limit_covers_a_slow_reverse_lookup(tmp_path):
    """A client whose reverse DNS lookup never finishes (its name servers
    do not answer) is still under smtpd_session_time_limit: 421, and the
    session ends.  (Loopback clients skip DNS, and only loopback can run
    here: the lookup is replaced by one that never answers.)"""
    config = make_config(tmp_path, smtpd_session_time_limit="1s")
    sink = LineSink()
    async with MailServer(config, log_stream=sink) as server:
        never = asyncio.Event()

        async def unanswered(ip):
            await never.wait()

        server.smtpd.lookup_client_name = unanswered
        host, port = server.addresses()[0][:2]
        sock = await asyncio.to_thread(socket.create_connection, (host, port), 10)
        try:
            sock.settimeout(10)
            reply = await asyncio.to_thread(sock.recv, 512)
            assert reply.startswith(b"421 4.4.2 ") and b"timeout exceeded" in reply
            await await_until(lambda: server.smtpd.open_sessions == 0 and not server.smtpd.listeners[0].sessions,
                              what="the session leaving the count")
            await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="the last line")
            # Every session's lines start with "connect from", a cut lookup's too (the name is not known).
            mine = [line.split(": ", 1)[1] for line in sink.lines if "smtpd" in line and "[127.0.0.1]" in line]
            assert [line.split(" from ")[0] for line in mine] == ["connect", "timeout after CONNECT", "disconnect"]
            assert mine[0] == "connect from unknown[127.0.0.1]"
            assert mine[1].endswith("(session time limit)")
        finally:
            sock.close()
