"""Accepting plain-text SMTP connections without asyncio's per-connection task.

asyncio's ``Server`` accepts each connection through a coroutine
(``_accept_connection2``) run as a task: one task, one coroutine, one waiter
future and two extra event-loop callbacks per connection, plus the enum
conversions of ``socket.accept()``.  Postfix's master hands a connection to
smtpd with one ``accept()``; with one message per connection (what
``smtp-source`` and most MTAs send) that per-connection machinery was a few
per cent of the event loop.

:func:`serve` keeps the listening sockets and the ``Server`` object of
``loop.create_server(..., start_serving=False)`` (binding, ``sockets``,
``close()``: ``close()`` removes the reader by file descriptor, whoever added
it) and replaces only the accept callback: ``accept4()`` in a loop as
asyncio does, then the same transport asyncio builds
(``loop._make_socket_transport``), without the waiter.  Implicit TLS
listeners, and event loops without that method (uvloop), keep asyncio's own
path (:func:`supported`).

This uses two private names of asyncio's selector event loop,
``loop._make_socket_transport`` and ``Server._sockets`` (unchanged from
Python 3.4 to 3.13); without them the listener falls back to asyncio's own
accept path.  One departure from ``asyncio.Server``: transports are not
attached to the ``Server``, so on Python 3.12+ ``Server.wait_closed()`` does
not wait for open connections; :meth:`Listener.wait_closed` drains the
sessions itself, as it always has.

When ``accept()`` fails for lack of resources (EMFILE, ENFILE, ENOBUFS,
ENOMEM) the listener stops accepting for a second (as asyncio does) and
logs Postfix's ``error: accept connection: <reason>`` once per pause,
instead of asyncio's traceback per attempt.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Callable

ACCEPT_BATCH = 100  # connections taken per readiness event (asyncio's backlog loop)
RETRY_DELAY = 1.0  # seconds without accepting after EMFILE and friends (asyncio, Postfix master)
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def supported(loop: asyncio.AbstractEventLoop) -> bool:
    """Can :func:`serve` run on ``loop`` (asyncio's selector event loop)?"""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop) and \
        hasattr(loop, "_make_socket_transport")


class Acceptor:
    """The accept callback of one listening socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.Protocol], log: Callable[[str], None],
                 log_exception: Callable[[str], None]):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.factory = protocol_factory
        self.log = log
        self.log_exception = log_exception  # a line and the current traceback
        # The accepted sockets' family/type/proto as plain ints (socket.accept()
        # converts the listener's to enums for every connection).
        self._kind = (int(sock.family), int(sock.type), sock.proto)
        self._warned_at = -RETRY_DELAY
        self._retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.loop.add_reader(self.fd, self._accept)

    def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _accept(self) -> None:
        loop = self.loop
        family, type_, proto = self._kind
        make = loop._make_socket_transport  # type: ignore[attr-defined]
        accept = self.sock._accept  # type: ignore[attr-defined]
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._pause(exc)
                    return
                self.log(f"error: accept connection: {exc.strerror or exc}")
                return
            try:
                conn = socket.socket(family, type_, proto, fileno=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                conn.setblocking(False)
                make(conn, self.factory(), extra={"peername": addr})
            except Exception:  # noqa: BLE001 - a bug costs one connection, not the listener
                conn.close()
                self.log_exception("cannot set up an accepted connection")

    def _pause(self, exc: OSError) -> None:
        """Out of file descriptors or memory: stop accepting for a while
        (the kernel keeps reporting the socket readable)."""
        loop = self.loop
        now = loop.time()
        if now - self._warned_at >= RETRY_DELAY:
            self._warned_at = now
            self.log(f"error: accept connection: {exc.strerror or exc}")
        loop.remove_reader(self.fd)
        self._retry = loop.call_later(RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self.sock.fileno() >= 0:  # not closed meanwhile (Server.close())
            self.start()


async def serve(loop: asyncio.AbstractEventLoop, protocol_factory: Callable[[], asyncio.Protocol],
                log: Callable[[str], None], log_exception: Callable[[str], None], *, host: str | None,
                port: int, backlog: int) -> tuple[asyncio.AbstractServer, list[Acceptor]]:
    """Bind like ``loop.create_server`` and accept with :class:`Acceptor`."""
    server = await loop.create_server(protocol_factory, host=host, port=port, reuse_address=True,
                                      backlog=backlog, start_serving=False)
    sockets = getattr(server, "_sockets", None)  # the real sockets, not TransportSocket views
    if not isinstance(sockets, list):  # another asyncio: its own accept path
        await server.start_serving()
        return server, []
    acceptors = []
    for sock in sockets:
        sock.listen(backlog)
        acceptor = Acceptor(loop, sock, protocol_factory, log, log_exception)
        acceptor.start()
        acceptors.append(acceptor)
    return server, acceptors
