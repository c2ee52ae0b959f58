"""Test-capture mode: a real SMTP server for application test suites.

Every recipient is accepted and captured — nothing is delivered or relayed.
Two ways to use it:

``capture()`` — an async context manager that runs in the caller's event
loop (async test suites)::

    async with capture() as mail:
        await send_welcome_email(smtp_host=mail.host, smtp_port=mail.port)
        [msg] = await mail.wait_for(1)
        assert msg["Subject"] == "Welcome"

``mail_capture`` — a pytest fixture (loaded automatically through the
``pytest11`` entry point when mailserver is installed).  It runs the server
on its own thread and loop, so it serves synchronous code under test too
(Django's ``send_mail``, ``smtplib``); use ``mail.wait(n)`` from synchronous
tests and ``await mail.wait_for(n)`` from async ones.

Captured messages are :class:`email.message.EmailMessage` objects with the
envelope attached: ``msg.envelope.sender``, ``msg.envelope.recipients``,
``msg.envelope.queue_id``, ``msg.envelope.raw`` (the bytes as queued).

The server listens on an ephemeral loopback port (``.host``, ``.port``),
keeps its queue in a temporary directory, and goes through the same SMTP
session, cleanup and durable queue as production mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage

from .config import Config
from .delivery import Delivered, Outcome
from .delivery.python import TransportEnvelope

CAPTURE_TRANSPORT = "capture"


@dataclass(frozen=True, slots=True)
class CapturedEnvelope:
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    raw: bytes


def capture_config(root: str, *, host: str = "127.0.0.1", port: int = 0, **params) -> Config:
    """The capture server's configuration: no local domains, every address
    routed to the capture transport, only loopback clients."""
    base = dict(
        myhostname="capture.localhost", mydestination=[], relay_domains=[], local_recipient_maps=[],
        alias_maps=[], queue_directory=os.path.join(root, "spool"), mynetworks=["127.0.0.0/8", "[::1]/128"],
        transport_maps=[f"static:python:{CAPTURE_TRANSPORT}"], mail_spool_directory=os.path.join(root, "mail"),
        minimal_backoff_time="1s", maximal_backoff_time="5s", queue_run_delay="1s", smtpd_peername_lookup=False,
    )
    base.update(params)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Config(base, services={"smtp": {"listen": [listen]}})


class MailCapture:
    """The captured mail of one capture server."""

    def __init__(self, maildir: str | None = None):
        self.host = "127.0.0.1"
        self.port = 0
        self.messages: list[EmailMessage] = []
        self.maildir = maildir
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    async def _transport(self, envelope: TransportEnvelope, message: bytes, recipients: list[str]) -> list[Outcome]:
        # Parsed with Python's line endings (the queued CRLF bytes stay in .raw).
        parsed = email.message_from_bytes(message.replace(b"\r\n", b"\n"), policy=email.policy.default)
        parsed.envelope = CapturedEnvelope(envelope.queue_id, envelope.sender, tuple(recipients), message)  # type: ignore[attr-defined]
        if self.maildir:
            from .delivery.mailbox import deliver_maildir

            await asyncio.to_thread(deliver_maildir, self.maildir, message, sender=envelope.sender,
                                    recipient=", ".join(recipients), original_recipient="",
                                    hostname="capture.localhost")
        with self._changed:
            self.messages.append(parsed)
            self._changed.notify_all()
        return [Delivered("2.0.0", "captured", "capture")] * len(recipients)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[EmailMessage]:
        """Block until ``count`` messages were captured (synchronous tests)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"captured {len(self.messages)} message(s), expected {count}")
                self._changed.wait(remaining)
            return list(self.messages)

    async def wait_for(self, count: int = 1, timeout: float = 5.0) -> list[EmailMessage]:
        """Wait until ``count`` messages were captured (async tests)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"captured {len(self.messages)} message(s), expected {count}")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def capture(*, host: str = "127.0.0.1", port: int = 0, maildir: str | None = None,
                  **params) -> AsyncIterator[MailCapture]:
    """Run a capture server in the current event loop."""
    from .server import MailServer

    with tempfile.TemporaryDirectory(prefix="mailserver-capture-") as root:
        mail = MailCapture(maildir)
        server = MailServer(capture_config(root, host=host, port=port, **params), log_stream=None, control=False,
                            transports={CAPTURE_TRANSPORT: mail._transport})
        await server.start()
        try:
            mail.host, mail.port = server.addresses()[0][:2]
            yield mail
        finally:
            await server.stop(timeout=5)


@contextlib.contextmanager
def capture_in_thread(**kwargs) -> Iterator[MailCapture]:
    """Run a capture server on its own thread and event loop (for
    synchronous code under test)."""
    ready = threading.Event()
    holder: dict = {}

    async def main() -> None:
        async with capture(**kwargs) as mail:
            holder["mail"] = mail
            holder["stop"] = stop = asyncio.Event()
            holder["loop"] = asyncio.get_running_loop()
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the caller below
            holder["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="mailserver-capture", daemon=True)
    thread.start()
    if not ready.wait(30) or "error" in holder:
        raise RuntimeError(f"capture server did not start: {holder.get('error')!r}")
    try:
        yield holder["mail"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(30)


try:  # the pytest fixture, when pytest is present
    import pytest

    @pytest.fixture
    def mail_capture() -> Iterator[MailCapture]:
        """A capture server for one test: ``.host``, ``.port``, ``.messages``,
        ``.wait(n)`` and ``await .wait_for(n)``."""
        with capture_in_thread() as mail:
            yield mail
except ImportError:  # pragma: no cover
    pass
