"""The embedding API, used the way an application uses it.

Everything here runs in the test's own event loop: ``MailServer`` objects
with real loopback listeners and real queue directories in ``tmp_path``,
``submit()`` from code, ``python:`` transports, policy hooks and the delivery
events stream; and the test-capture mode as an application's test suite
would use it (the ``mail_capture`` fixture from a synchronous test,
``capture()`` from an async one).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import signal
import smtplib
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

import mailserver
from harness import await_until, maildir_messages, smtp_dialog
from mailserver import (Config, Delivered, DeliveryEvent, MailServer, PolicyRequest,
                        StartupError, TemporaryFailure, TransportEnvelope)
from mailserver.errors import MailserverError, NotRunningError, PermanentError, SubmissionError, TemporaryError
from mailserver.testing import capture

QUEUE_ID = re.compile(r"^[0-9A-Za-z]{10,}$")


# ---------------------------------------------------------------- helpers
def make_config(root: Path, *, domain: str = "one.test", mailboxes: tuple[str, ...] = ("alice", "bob", "sender"),
                **params) -> Config:
    """Virtual Maildirs for DOMAIN under root/vmail, ``crm.test`` routed to
    ``python:crm``, SMTP on an ephemeral loopback port, tiny retry timers."""
    (root / "vmail").mkdir(parents=True, exist_ok=True)
    vmailbox = root / "vmailbox"
    vmailbox.write_text("".join(f"{box}@{domain} {box}/\n" for box in mailboxes))
    base = dict(
        myhostname=f"mx.{domain}", mydestination=[], alias_maps=[],
        queue_directory=str(root / "spool"), mail_spool_directory=str(root / "mail"),
        virtual_mailbox_domains=[domain], virtual_mailbox_base=str(root / "vmail"),
        virtual_mailbox_maps=[f"texthash:{vmailbox}"],
        relay_domains=["crm.test"], transport_maps=["inline:{ crm.test=python:crm }"],
        mynetworks=["127.0.0.0/8"], smtpd_peername_lookup=False,
        dns_nameservers=["127.0.0.1:1"], dns_timeout="1s", smtp_tcp_port=1,
        minimal_backoff_time="1s", maximal_backoff_time="2s", queue_run_delay="1s",
    )
    base.update(params)
    return Config(base, services={"smtp": {"listen": ["127.0.0.1:0"]}})


class Events:
    """Consumes ``server.events()`` and remembers everything it saw."""

    def __init__(self, server: MailServer):
        self.subscription = server.events()
        self.seen: list[DeliveryEvent] = []

    async def wait_for(self, predicate, timeout: float = 10.0) -> DeliveryEvent:
        for event in self.seen:
            if predicate(event):
                return event
        try:
            async with asyncio.timeout(timeout):
                async for event in self.subscription:
                    self.seen.append(event)
                    if predicate(event):
                        return event
        except TimeoutError:
            pass
        raise AssertionError(f"no such event within {timeout}s; seen: {self.seen}")

    async def until(self, condition, timeout: float = 10.0) -> None:
        """Keep consuming events until ``condition()`` holds (it may also
        look at things other than events, e.g. queue files)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout}s; seen: {self.seen}")
            try:
                self.seen.append(await asyncio.wait_for(anext(self.subscription), 0.05))
            except TimeoutError:
                pass


def maildir(root: Path, box: str) -> list[bytes]:
    return maildir_messages(root / "vmail" / box)


def queue_files(root: Path, state: str) -> list[str]:
    d = root / "spool" / state
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


smtp_exchange = smtp_dialog  # raw SMTP: greeting, then one reply per chunk (tests/harness.py)


async def smtp(host: str, port: int, script: list[bytes]) -> list[str]:
    """A raw SMTP dialogue (exact replies) in a worker thread."""
    return await asyncio.to_thread(smtp_exchange, host, port, script)


MESSAGE = b"From: sender@one.test\r\nTo: alice@one.test\r\nSubject: api test\r\n\r\nhello from code\r\n"


# ---------------------------------------------------------------- servers in the caller's loop
async def test_two_servers_in_one_loop_with_different_spools_accept_and_deliver(tmp_path):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    async with MailServer(make_config(root_a, domain="one.test"), log_stream=None) as a, \
            MailServer(make_config(root_b, domain="two.test"), log_stream=None) as b:
        events_a, events_b = Events(a), Events(b)
        (host_a, port_a), (host_b, port_b) = a.addresses()[0][:2], b.addresses()[0][:2]
        assert port_a != port_b

        # Both accept over SMTP...
        await aiosmtplib.send(b"Subject: smtp to a\r\n\r\nx\r\n", sender="x@example.net",
                              recipients=["alice@one.test"], hostname=host_a, port=port_a, start_tls=False)
        await aiosmtplib.send(b"Subject: smtp to b\r\n\r\nx\r\n", sender="x@example.net",
                              recipients=["alice@two.test"], hostname=host_b, port=port_b, start_tls=False)
        # ...and from code.
        qid_a = await a.submit(b"Subject: code to a\r\n\r\nx\r\n", sender="app@one.test", recipients=["bob@one.test"])
        qid_b = await b.submit(b"Subject: code to b\r\n\r\nx\r\n", sender="app@two.test", recipients=["bob@two.test"])

        await events_a.wait_for(lambda e: e.kind == "delivered" and e.queue_id == qid_a)
        await events_b.wait_for(lambda e: e.kind == "delivered" and e.queue_id == qid_b)
        await events_a.wait_for(lambda e: e.kind == "delivered" and e.recipient == "alice@one.test")
        await events_b.wait_for(lambda e: e.kind == "delivered" and e.recipient == "alice@two.test")

        # Each server has its own queue: no event of one shows up at the other.
        assert not {e.queue_id for e in events_a.seen} & {e.queue_id for e in events_b.seen}
    assert [b"smtp to a" in m for m in maildir(root_a, "alice")] == [True]
    assert [b"code to a" in m for m in maildir(root_a, "bob")] == [True]
    assert [b"smtp to b" in m for m in maildir(root_b, "alice")] == [True]
    assert [b"code to b" in m for m in maildir(root_b, "bob")] == [True]
    assert (root_a / "spool" / "incoming").is_dir() and (root_b / "spool" / "incoming").is_dir()


async def test_mail_server_installs_no_signal_handlers_and_runs_in_the_callers_loop(tmp_path):
    watched = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1]
    before = {sig: signal.getsignal(sig) for sig in watched}
    loop = asyncio.get_running_loop()
    threads_before = {t.ident for t in threading.enumerate()}
    calls = []

    async def crm(envelope, message, recipients):
        calls.append(("transport", asyncio.get_running_loop(), threading.current_thread()))
        return Delivered()

    async def hook(request: PolicyRequest):
        calls.append(("hook", asyncio.get_running_loop(), threading.current_thread()))
        return "DUNNO"

    server = MailServer(make_config(tmp_path, smtpd_policy_hooks=["watch"]), log_stream=None,
                        transports={"crm": crm}, policy_hooks={"watch": hook})
    await server.start()
    try:
        assert {sig: signal.getsignal(sig) for sig in watched} == before
        events = Events(server)
        host, port = server.addresses()[0][:2]
        await aiosmtplib.send(MESSAGE, sender="x@example.net", recipients=["lead@crm.test"], hostname=host,
                              port=port, start_tls=False)
        await events.wait_for(lambda e: e.kind == "delivered")
        # No thread or loop of its own: whatever threads exist now beyond the
        # test's are executor workers for blocking file I/O (asyncio.to_thread,
        # the spool's pool), named PREFIX_N by ThreadPoolExecutor.
        new = [t for t in threading.enumerate() if t.ident not in threads_before]
        assert all(re.fullmatch(r"[a-z]+_\d+", t.name) for t in new), [t.name for t in new]
    finally:
        await server.stop()
    assert {sig: signal.getsignal(sig) for sig in watched} == before
    assert {kind for kind, _, _ in calls} == {"transport", "hook"}
    assert all(call_loop is loop and thread is threading.main_thread() for _, call_loop, thread in calls)


async def test_stop_timeout_bounds_sessions_and_deliveries_together(tmp_path):
    """stop(timeout) is the whole grace period: an idle client and a
    delivery that never ends are both cut off within ``timeout``."""
    release = asyncio.Event()

    async def crm(envelope, message, recipients):
        await release.wait()  # never set: a delivery that hangs
        return Delivered()

    server = MailServer(make_config(tmp_path), log_stream=None, transports={"crm": crm})
    await server.start()
    events = Events(server)
    qid = await server.submit(MESSAGE, sender="sender@one.test", recipients=["lead@crm.test"])
    await events.wait_for(lambda e: e.kind == "queued" and e.queue_id == qid)
    host, port = server.addresses()[0][:2]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        started = time.monotonic()
        await server.stop(timeout=1.5)
        elapsed = time.monotonic() - started
        assert (await reader.readline()).startswith(b"421 4.3.2 ")
    finally:
        writer.close()
    assert elapsed < 1.5 + 0.75, f"stop(timeout=1.5) took {elapsed:.2f}s"
    # The interrupted message is still queued (at-least-once).
    assert any(name.startswith(qid) for state in ("active", "incoming") for name in queue_files(tmp_path, state))


async def test_client_that_disconnects_without_quit_leaves_no_session_behind(tmp_path):
    """Port scanners and TCP health checks connect, read the greeting and
    hang up: their sessions must end (socket closed, not counted)."""
    async with MailServer(make_config(tmp_path), log_stream=None) as server:
        host, port = server.addresses()[0][:2]
        for _ in range(10):
            reader, writer = await asyncio.open_connection(host, port)
            assert (await reader.readline()).startswith(b"220 ")
            writer.close()
            await writer.wait_closed()
        await await_until(lambda: server.status()["listeners"][0]["sessions"] == 0, timeout=3,
                          what="the hung-up sessions to end")
        started = time.monotonic()
    assert time.monotonic() - started < 1.0  # nothing left to drain


# ---------------------------------------------------------------- submit()
async def test_submit_bytes_and_email_message_are_queued_and_delivered_to_a_virtual_maildir(tmp_path):
    async with MailServer(make_config(tmp_path), log_stream=None) as server:
        events = Events(server)
        raw = b"From: sender@one.test\nTo: alice@one.test\nSubject: raw bytes\n\nbare LF lines\n"
        qid_raw = await server.submit(raw, sender="sender@one.test", recipients=["alice@one.test"])
        msg = EmailMessage()
        msg["From"] = "Sender <sender@one.test>"
        msg["To"] = "alice@one.test"
        msg["Subject"] = "an EmailMessage"
        msg.set_content("héllo wörld\n")
        qid_msg = await server.submit(msg, sender="sender@one.test", recipients=("alice@one.test",))
        assert QUEUE_ID.match(qid_raw) and QUEUE_ID.match(qid_msg) and qid_raw != qid_msg
        for qid in (qid_raw, qid_msg):
            event = await events.wait_for(lambda e, q=qid: e.kind == "delivered" and e.queue_id == q)
            assert (event.recipient, event.status, event.sender) == ("alice@one.test", "2.0.0", "sender@one.test")
    stored = {}
    for data in maildir(tmp_path, "alice"):
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        stored[str(parsed["Subject"])] = parsed
    assert set(stored) == {"raw bytes", "an EmailMessage"}
    for subject, qid in (("raw bytes", qid_raw), ("an EmailMessage", qid_msg)):
        parsed = stored[subject]
        # Cleanup ran as for SMTP mail: Message-ID and Date added, Received with the queue ID.
        assert parsed["Message-ID"] and parsed["Date"]
        assert f"id {qid}" in str(parsed["Received"])
    assert stored["raw bytes"].get_content() == "bare LF lines\n"
    assert stored["an EmailMessage"].get_content() == "héllo wörld\n"


async def test_submit_refuses_what_it_cannot_queue_with_a_permanent_error(tmp_path):
    server = MailServer(make_config(tmp_path, message_size_limit=2000), log_stream=None)
    with pytest.raises(NotRunningError) as not_yet:
        await server.submit(MESSAGE, sender="sender@one.test", recipients=["alice@one.test"])
    assert not_yet.value.temporary and not_yet.value.status.startswith("4.")
    assert isinstance(not_yet.value, TemporaryError) and isinstance(not_yet.value, MailserverError)

    async with server:
        cases = [
            (dict(recipients=[]), "5.5.1"),
            (dict(recipients=["not an address"]), "5.1.3"),
            (dict(recipients=["alice@one.test", "<broken"]), "5.1.3"),
            (dict(recipients=["alice@one.test"], sender="bad sender@"), "5.1.3"),
            (dict(recipients=["alice@one.test"], message=MESSAGE + b"x" * 3000), "5.3.4"),
            (dict(recipients=["alice@one.test"], message="text is not bytes"), None),
        ]
        for kwargs, status in cases:
            message = kwargs.pop("message", MESSAGE)
            kwargs.setdefault("sender", "sender@one.test")
            with pytest.raises(SubmissionError) as refused:
                await server.submit(message, **kwargs)
            error = refused.value
            assert isinstance(error, PermanentError) and error.permanent and not error.temporary
            assert error.status.startswith("5.")
            if status:
                assert error.status == status, (kwargs, error.status, str(error))
        assert queue_files(tmp_path, "incoming") == [] and queue_files(tmp_path, "active") == []

    with pytest.raises(NotRunningError):
        await server.submit(MESSAGE, sender="sender@one.test", recipients=["alice@one.test"])


# ---------------------------------------------------------------- python: transports
async def test_python_transport_that_fails_temporarily_is_retried_and_then_delivers(tmp_path):
    attempts: list[tuple[TransportEnvelope, bytes, list[str]]] = []

    async def crm(envelope: TransportEnvelope, message: bytes, recipients: list[str]):
        attempts.append((envelope, message, recipients))
        if len(attempts) == 1:
            return TemporaryFailure("4.2.0", "CRM busy, try later")
        return [Delivered("2.0.0", "stored in CRM") for _ in recipients]

    async with MailServer(make_config(tmp_path), log_stream=None, transports={"crm": crm}) as server:
        events = Events(server)
        started = time.monotonic()
        qid = await server.submit(MESSAGE, sender="sender@one.test", recipients=["lead@crm.test"])
        deferred = await events.wait_for(lambda e: e.kind == "deferred")
        delivered = await events.wait_for(lambda e: e.kind == "delivered")
        elapsed = time.monotonic() - started
    assert (deferred.queue_id, deferred.recipient, deferred.status, deferred.text, deferred.relay) == \
        (qid, "lead@crm.test", "4.2.0", "CRM busy, try later", "python:crm")
    assert (delivered.queue_id, delivered.status, delivered.text) == (qid, "2.0.0", "stored in CRM")
    assert 0.9 <= elapsed < 6  # the retry came after minimal_backoff_time = 1s
    assert len(attempts) == 2
    envelope, message, recipients = attempts[1]
    assert (envelope.queue_id, envelope.sender, recipients) == (qid, "sender@one.test", ["lead@crm.test"])
    assert envelope.original_recipients == ("lead@crm.test",)
    assert b"hello from code\r\n" in message and b"\r\nMessage-ID: " in message.replace(b"Message-Id", b"Message-ID")


async def test_python_transport_failing_until_queue_lifetime_expires_is_bounced_to_the_sender(tmp_path):
    """maximal_queue_lifetime (the default, 5d) on an injected clock: the
    message is retried, expires, and the sender gets a DSN."""
    now = [time.time()]
    attempts = []

    async def crm(envelope, message, recipients):
        attempts.append(now[0])
        return TemporaryFailure("4.4.1", "CRM unreachable")

    async with MailServer(make_config(tmp_path), log_stream=None, clock=lambda: now[0],
                          transports={"crm": crm}) as server:
        events = Events(server)
        qid = await server.submit(MESSAGE, sender="sender@one.test", recipients=["lead@crm.test"])
        def deferred(attempts: int) -> bool:
            # The event, then the queue file back in deferred/ (its next
            # attempt time computed): only then may the clock move on.
            return len([e for e in events.seen if e.kind == "deferred" and e.queue_id == qid]) == attempts \
                and any(name.startswith(qid) for name in queue_files(tmp_path, "deferred"))

        await events.until(lambda: deferred(1))
        now[0] += 86400  # a day later: retried, deferred again, not yet expired
        await events.until(lambda: deferred(2))
        assert not [e for e in events.seen if e.kind == "expired"]
        now[0] += 5 * 86400  # past maximal_queue_lifetime
        expired = await events.wait_for(lambda e: e.kind == "expired")
        dsn_delivered = await events.wait_for(lambda e: e.kind == "delivered" and e.recipient == "sender@one.test")
    assert len(attempts) == 3
    assert (expired.queue_id, expired.recipient, expired.sender) == (qid, "lead@crm.test", "sender@one.test")
    assert expired.status == "4.4.1" and expired.text == "CRM unreachable"
    assert dsn_delivered.sender == "" and dsn_delivered.queue_id != qid
    assert not any(name.startswith(qid) for state in ("incoming", "active", "deferred")
                   for name in queue_files(tmp_path, state))
    [dsn] = maildir(tmp_path, "sender")
    report = email.message_from_bytes(dsn, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    text = dsn.decode("utf-8", "replace")
    assert "Final-Recipient: rfc822; lead@crm.test" in text
    assert "Action: failed" in text and "Status: 4.4.1" in text
    assert "Subject: api test" in text  # the original message (its headers) is returned


async def test_process_wide_registrations_work_for_every_server(tmp_path):
    calls = []

    async def crm(envelope, message, recipients):
        calls.append(recipients)
        return Delivered()

    async def hook(request):
        return "REJECT registered globally" if request.recipient == "bob@one.test" else None

    mailserver.register_transport("crm", crm)
    mailserver.register_policy_hook("global", hook)
    try:
        async with MailServer(make_config(tmp_path, smtpd_policy_hooks=["global"]), log_stream=None) as server:
            events = Events(server)
            await server.submit(MESSAGE, sender="sender@one.test", recipients=["lead@crm.test"])
            await events.wait_for(lambda e: e.kind == "delivered")
            host, port = server.addresses()[0][:2]
            replies = await smtp(host, port, [b"EHLO client.example\r\n", b"MAIL FROM:<x@example.net>\r\n",
                                              b"RCPT TO:<bob@one.test>\r\n", b"QUIT\r\n"])
        assert replies[3] == "554 5.7.1 <bob@one.test>: Recipient address rejected: registered globally"
        assert calls == [["lead@crm.test"]]
    finally:
        mailserver.unregister_transport("crm")
        mailserver.unregister_policy_hook("global")
    with pytest.raises(StartupError, match="global"):
        await MailServer(make_config(tmp_path / "again", smtpd_policy_hooks=["global"]), log_stream=None).start()


# ---------------------------------------------------------------- policy hooks
async def test_policy_hook_decisions_at_rcpt_become_smtp_replies(tmp_path):
    stages: list[str] = []

    async def policy(request: PolicyRequest):
        stages.append(request.stage)
        if request.stage != "rcpt":
            return "DUNNO"
        local = request.recipient.split("@")[0]
        return {
            "reject": "REJECT Not welcome here",
            "defer": "DEFER Come back later",
            "custom": "550 5.7.26 Unauthenticated mail is prohibited",
            "ok": "OK",
            "dunno": "DUNNO",
            "none": None,
            "hold": "HOLD",
        }[local]

    mailboxes = ("reject", "defer", "custom", "ok", "dunno", "none", "hold")
    config = make_config(tmp_path, mailboxes=mailboxes, smtpd_policy_hooks=["policy"])
    async with MailServer(config, log_stream=None, policy_hooks={"policy": policy}) as server:
        events = Events(server)
        host, port = server.addresses()[0][:2]
        rcpt = [f"RCPT TO:<{box}@one.test>\r\n".encode() for box in mailboxes]
        replies = await smtp(host, port, [b"EHLO client.example\r\n", b"MAIL FROM:<x@example.net>\r\n", *rcpt,
                                          b"DATA\r\n", b"Subject: hooks\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n"])
        by_rcpt = dict(zip(mailboxes, replies[3:3 + len(mailboxes)]))
        assert by_rcpt == {
            "reject": "554 5.7.1 <reject@one.test>: Recipient address rejected: Not welcome here",
            "defer": "450 4.7.1 <defer@one.test>: Recipient address rejected: Come back later",
            "custom": "550 5.7.26 <custom@one.test>: Recipient address rejected: Unauthenticated mail is prohibited",
            "ok": "250 2.1.5 Ok",
            "dunno": "250 2.1.5 Ok",
            "none": "250 2.1.5 Ok",
            "hold": "250 2.1.5 Ok",
        }
        queued = replies[-2]
        assert queued.startswith("250 2.0.0 Ok: queued as "), queued
        qid = queued.rsplit(" ", 1)[1]
        # HOLD belongs to the whole transaction: the message waits in hold/
        # (on disk before the 250 reply) and is not delivered.
        assert any(name.startswith(qid) for name in queue_files(tmp_path, "hold"))
        assert not any(name.startswith(qid) for state in ("incoming", "active", "deferred")
                       for name in queue_files(tmp_path, state))
        assert (await server.status_async())["queue"]["hold"] == 1
        assert not [e for e in events.seen if e.kind == "delivered"] and not maildir(tmp_path, "hold")
    assert {"connect", "helo", "mail", "rcpt", "end-of-data"} <= set(stages)


async def test_policy_hook_can_refuse_at_every_stage_and_a_failing_hook_is_a_temporary_error(tmp_path):
    end_of_data_sizes = []

    async def policy(request: PolicyRequest):
        if request.stage == "helo" and request.helo == "spammer.example":
            return "REJECT go away"
        if request.stage == "mail" and request.sender == "blocked@example.net":
            return "REJECT sender blocked"
        if request.stage == "rcpt" and request.recipient == "bob@one.test":
            raise RuntimeError("a bug in the hook")
        if request.stage == "end-of-data":
            end_of_data_sizes.append(request.size)
            return "DEFER content scanner busy"
        return None

    config = make_config(tmp_path, smtpd_policy_hooks=["policy"], smtpd_delay_reject=False,
                         smtpd_error_sleep_time="0s")
    body = b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n"
    async with MailServer(config, log_stream=None, policy_hooks={"policy": policy}) as server:
        host, port = server.addresses()[0][:2]
        replies = await smtp(host, port, [
            b"EHLO spammer.example\r\n", b"EHLO client.example\r\n",
            b"MAIL FROM:<blocked@example.net>\r\n", b"MAIL FROM:<x@example.net>\r\n",
            b"RCPT TO:<bob@one.test>\r\n", b"RCPT TO:<alice@one.test>\r\n",
            b"DATA\r\n", body + b".\r\n", b"QUIT\r\n"])
    assert replies[1] == "554 5.7.1 <spammer.example>: Helo command rejected: go away"
    assert replies[2].startswith("250")
    assert replies[3] == "554 5.7.1 <blocked@example.net>: Sender address rejected: sender blocked"
    assert replies[4] == "250 2.1.0 Ok"
    # A hook's bug is never a 5xx (Postfix's reply when a policy server fails):
    assert replies[5] == "451 4.3.5 <bob@one.test>: Recipient address rejected: Server configuration problem"
    assert replies[6] == "250 2.1.5 Ok"
    assert replies[7].startswith("354")
    assert replies[8] == "450 4.7.1 <END-OF-MESSAGE>: End-of-data rejected: content scanner busy"
    assert not maildir(tmp_path, "alice")


async def test_policy_hook_sees_the_actual_message_size_at_end_of_data(tmp_path):
    """Postfix policy protocol: at END-OF-MESSAGE ``size`` is the actual
    message size (before, the MAIL FROM SIZE= value)."""
    sizes = {}

    async def policy(request: PolicyRequest):
        if request.stage in ("rcpt", "end-of-data"):
            sizes[request.stage] = request.size
        return None

    config = make_config(tmp_path, smtpd_policy_hooks=["policy"])
    body = b"Subject: sized\r\n\r\n" + b"x" * 500 + b"\r\n"
    async with MailServer(config, log_stream=None, policy_hooks={"policy": policy}) as server:
        host, port = server.addresses()[0][:2]
        replies = await smtp(host, port, [b"EHLO client.example\r\n", b"MAIL FROM:<x@example.net> SIZE=100\r\n",
                                          b"RCPT TO:<alice@one.test>\r\n", b"DATA\r\n", body + b".\r\n",
                                          b"QUIT\r\n"])
    assert replies[5].startswith("250 2.0.0 Ok: queued as ")
    assert sizes["rcpt"] == 100
    assert sizes["end-of-data"] == len(body)


# ---------------------------------------------------------------- events
async def test_events_stream_reports_queued_then_delivered_or_bounced_with_status(tmp_path):
    async with MailServer(make_config(tmp_path), log_stream=None) as server:
        stream = Events(server)
        callback_events: list[DeliveryEvent] = []
        server.add_event_listener(callback_events.append)
        qid = await server.submit(MESSAGE, sender="sender@one.test", recipients=["alice@one.test", "ghost@one.test"])
        delivered = await stream.wait_for(lambda e: e.kind == "delivered" and e.queue_id == qid)
        bounced = await stream.wait_for(lambda e: e.kind == "bounced" and e.queue_id == qid)
        dsn = await stream.wait_for(lambda e: e.kind == "delivered" and e.recipient == "sender@one.test")
    mine = [e for e in stream.seen if e.queue_id == qid]
    assert mine[0].kind == "queued" and mine[0].sender == "sender@one.test" and mine[0].recipient == ""
    assert {e.kind for e in mine[1:]} == {"delivered", "bounced"}
    assert (delivered.recipient, delivered.status, delivered.relay) == ("alice@one.test", "2.0.0", "virtual")
    assert (bounced.recipient, bounced.status) == ("ghost@one.test", "5.1.1")
    assert "unknown user" in bounced.text
    assert dsn.sender == "" and dsn.status == "2.0.0"
    # The callback saw the same events, in the same order.
    assert len(callback_events) >= len(stream.seen)
    assert [(e.kind, e.queue_id, e.recipient) for e in callback_events][:len(stream.seen)] == \
        [(e.kind, e.queue_id, e.recipient) for e in stream.seen]


# ---------------------------------------------------------------- test-capture mode
def test_mail_capture_fixture_serves_a_synchronous_test(mail_capture):
    """What an application's test does: point its SMTP settings at the
    fixture and look at what was sent."""
    with smtplib.SMTP(mail_capture.host, mail_capture.port, timeout=10) as client:
        client.sendmail("noreply@app.example", ["user@customer.example", "cc@elsewhere.example"],
                        b"From: noreply@app.example\r\nTo: user@customer.example\r\nSubject: Reset your password\r\n"
                        b"\r\nclick here\r\n")
    [msg] = mail_capture.wait(1, timeout=10)
    assert msg["Subject"] == "Reset your password"
    assert msg.get_content() == "click here\n"
    assert msg.envelope.sender == "noreply@app.example"
    assert sorted(msg.envelope.recipients) == ["cc@elsewhere.example", "user@customer.example"]
    assert QUEUE_ID.match(msg.envelope.queue_id)


async def test_capture_serves_an_async_test():
    async with capture() as mail:
        assert mail.host == "127.0.0.1" and mail.port > 0
        message = EmailMessage()
        message["From"] = "app@example.test"
        message["To"] = "someone@anywhere.example"
        message["Subject"] = "Your receipt"
        message.set_content("thanks\n")
        await aiosmtplib.send(message, hostname=mail.host, port=mail.port, start_tls=False)
        [captured] = await mail.wait_for(1, timeout=10)
        assert captured["Subject"] == "Your receipt"
        assert captured.envelope.recipients == ("someone@anywhere.example",)
        assert mail.messages == [captured]
        with pytest.raises(TimeoutError):
            await mail.wait_for(2, timeout=0.2)
