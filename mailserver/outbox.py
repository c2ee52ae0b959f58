"""Socket writes that leave together at the end of an event-loop iteration.

The SMTP server's replies are queued here and written, one
``transport.write`` per connection, by one callback after the current
iteration's.  Why: on a small machine a send that wakes the peer
while it sleeps on another CPU costs several times one that finds it running
(a cross-CPU wake-up: 28 µs against 7 µs per send on the 2-vCPU benchmark
machine); a burst of sends wakes a busy client (smtp-source, a peer MTA
with many connections) once instead of once per reply.  (The SMTP client's
commands were tried too: no measurable change in the relay benchmark, where
each delivery's command mostly leaves alone.)  It also
coalesces replies to pipelined commands into one segment, as Postfix's smtpd
does by flushing only when no more input is waiting.

Rules for users:

* anything that writes to the transport directly, or closes it, must first
  :meth:`Outbox.flush_transport` it (ordering);
* a caller that waits for the peer's answer need not: the flush runs before
  any answer can arrive;
* :meth:`Outbox.write` returns the bytes queued for that transport, so a
  caller can flush early (and apply flow control) instead of holding more
  than a socket buffer.
"""

from __future__ import annotations

import asyncio
import weakref

_OUTBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox]" = weakref.WeakKeyDictionary()


class Outbox:
    def __init__(self) -> None:
        # (No reference to the loop: the registry is keyed by it, weakly.)
        self._pending: dict[asyncio.BaseTransport, list] = {}  # transport -> [size, chunk, chunk...]

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> int:
        """Queue ``data`` for ``transport``; returns the bytes now queued for it."""
        entry = self._pending.get(transport)
        if entry is None:
            if not self._pending:
                asyncio.get_running_loop().call_soon(self.flush)
            self._pending[transport] = [len(data), data]
            return len(data)
        entry.append(data)
        entry[0] += len(data)
        return entry[0]

    def flush_transport(self, transport: asyncio.BaseTransport | None) -> None:
        """Write what is queued for ``transport`` now."""
        entry = self._pending.pop(transport, None)  # type: ignore[arg-type]
        if entry is not None:
            _send(transport, entry)

    def discard(self, transport: asyncio.BaseTransport | None) -> None:
        """Drop what is queued for ``transport`` (its connection is gone)."""
        self._pending.pop(transport, None)  # type: ignore[arg-type]

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for transport, entry in pending.items():
            _send(transport, entry)


def _send(transport, entry: list) -> None:
    if transport.is_closing():  # closed meanwhile: the connection's owner knows
        return
    try:
        transport.write(entry[1] if len(entry) == 2 else b"".join(entry[1:]))
    except Exception as exc:  # a bug; the other transports' data still goes
        asyncio.get_running_loop().call_exception_handler(
            {"message": "queued write failed", "exception": exc, "transport": transport})


def outbox(loop: asyncio.AbstractEventLoop | None = None) -> Outbox:
    """The running (or given) loop's outbox."""
    loop = loop or asyncio.get_running_loop()
    box = _OUTBOXES.get(loop)
    if box is None:
        box = _OUTBOXES[loop] = Outbox()
    return box


# ---------------------------------------------------------------- closing

def _raw(transport: asyncio.BaseTransport) -> asyncio.BaseTransport | None:
    """The socket's transport under asyncio's TLS transport (None otherwise)."""
    return getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)


def unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written to ``transport`` that the peer has not taken yet: the
    transport's buffer and, under TLS, its socket transport's (where asyncio's
    SSL layer leaves them; it does not count them)."""
    raw = _raw(transport)
    return transport.get_write_buffer_size() + (raw.get_write_buffer_size() if raw is not None else 0)


def close(transport: asyncio.BaseTransport) -> asyncio.BaseTransport | None:
    """Close ``transport``; return the transport to :func:`cut` if data is
    still unsent (None when all of it has gone): under TLS (implicit, or
    layered on by STARTTLS) the socket's own transport.  asyncio keeps a
    closed transport open until its data is written, with no time limit: a
    peer that stops reading would keep the socket (and whatever waits on
    it) for as long as it kept the connection, so the caller cuts it, at
    once or after a grace time.  (asyncio's own TLS shutdown gives up
    after 30 s.)"""
    if not transport.is_closing():
        transport.close()
    if not unsent(transport):
        return None
    return _raw(transport) or transport


def cut(transport: asyncio.BaseTransport) -> None:
    """Abort a closed connection whose unsent data the peer did not take."""
    # Gone meanwhile: connection lost, or closed once its buffer was written
    # (asyncio then drops its socket without counting _conn_lost).
    if getattr(transport, "_conn_lost", 0) or getattr(transport, "_sock", True) is None:
        return
    transport.abort()
