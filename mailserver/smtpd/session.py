"""One SMTP session on aiosmtpd (the wire adapter).

:class:`SMTPSession` subclasses :class:`aiosmtpd.smtp.SMTP` to keep its
transport, timeout and STARTTLS machinery while replacing the parts that
decide what to answer and how DATA is read:

* the command loop (:meth:`_handle_client`) reads a line, enforces the line
  length limit and the pipelining rule, dispatches to ``smtp_VERB`` and
  writes the :class:`~mailserver.reply.Reply` the policy returned — one place
  writes to the wire (:meth:`reply` queues it in the loop's
  :mod:`~mailserver.outbox`, sent with every other session's at the end of
  the loop iteration; :meth:`_write` sends at once, before a close or a
  STARTTLS);
* addresses are parsed by :mod:`mailserver.address`, never by aiosmtpd;
* DATA is read in large chunks until the exact ``<CR><LF>.<CR><LF>``
  (:meth:`_read_data`); bare CR/LF and NUL are detected on the whole content;
  an oversized message is read to its true end before ``552``;
* an unexpected exception answers ``451 4.3.0`` and is logged with its
  traceback; exception text never reaches the client.

``250`` after DATA is sent only when :meth:`Smtpd.submit` returned, i.e. the
message and its envelope are fsync'd in the queue.
"""

from __future__ import annotations

import asyncio
import re
import socket
import weakref
from typing import TYPE_CHECKING

from asyncio import sslproto

from aiosmtpd import smtp as _aiosmtpd
from aiosmtpd.smtp import SMTP as _AioSMTP

from .. import address as addr_mod
from ..outbox import close as close_transport, cut as cut_transport, outbox
from ..reply import Reply, ReplyError
from ..spool import SpoolError
from . import policy

if TYPE_CHECKING:  # pragma: no cover
    from . import Listener

_DRAIN_ABOVE = 64 * 1024  # asyncio's default write buffer high-water mark
COMMAND_LIMIT = 512  # RFC 5321 §4.5.3.1.4, including CRLF
MAIL_LIMIT = COMMAND_LIMIT + 26 + 10 + 10  # + SIZE (RFC 1870), BODY, SMTPUTF8
READ_CHUNK = 256 * 1024
# The StreamReader's buffer limit.  Not the command line limit (aiosmtpd's
# line_length_limit, enforced by the command loop and AUTH): the reader
# pauses the socket above twice this, and at aiosmtpd's 1001 every message
# of more than 2 kB paused and resumed reading (two epoll_ctl calls and a
# transport round trip) on its way in.
READER_LIMIT = 16 * 1024


class _NoHandler:
    """aiosmtpd wants a handler object; all decisions live in the session."""


_NO_HANDLER = _NoHandler()
_WIRE: dict[Reply, bytes] = {}  # encoded replies (the constant ones repeat on every message)
_WIRE_MAX = 512
_EHLO: dict[tuple, Reply] = {}
_Facts = None  # restrictions.Facts, imported on first use  # EHLO replies per (hostname, size limit, STARTTLS, AUTH mechanisms)


class SMTPSession(_AioSMTP):
    def __init__(self, listener: "Listener"):
        self.listener = listener
        self.ctx = listener.smtpd
        cfg = listener.params
        self.p = cfg
        self._aiosmtpd_init(asyncio.get_running_loop(), hostname=self.ctx.myhostname, timeout=cfg["smtpd_timeout"])
        self._deadline = 0.0  # idle timeout (see _reset_timeout)
        self._session_deadline = float("inf")  # smtpd_session_time_limit (see _limit_session)
        self._outbox = outbox(self.loop)  # replies wait there for the end of the loop iteration
        self._timer_armed = False
        self.client_addr = "unknown"
        self.client_name = "unknown"
        self.client_port = 0
        self.trusted = False
        self.local_client = False
        self.helo_name: str | None = None
        self.esmtp = False
        self.pipelining = False
        self.ill_pipelining = False  # sent ahead of our reply without PIPELINING (once per session)
        self.errors = 0
        self.junk = 0
        self.counts: dict[str, int] = {}  # commands by verb, for the disconnect line
        self.ok_counts: dict[str, int] = {}  # ... of which ended with a 2xx reply
        self._last_code = 0  # the last reply's code (see _dispatch)
        self.tls_active = False
        self.tls_comment = ""
        self._tls_object = None  # the ssl object, for the handshake's log line
        self.sasl_username: str | None = None
        self.sasl_method: str | None = None
        self.auth_failures = 0
        self.reverse_client_name = "unknown"
        self.client_name_tempfail = False
        self._connected = False
        self._connect_logged = False  # "connect from" (see _log_connect)
        self._handler_ended = False  # _handle_client() has returned (see _release)
        self._we_closed = False  # QUIT, a 421, a timeout: not a lost connection
        self._cut = False  # _close() has cut the connection
        self._linger: asyncio.TimerHandle | None = None  # closed, unsent replies: cut when it fires
        self._linger_target: "weakref.ref[asyncio.BaseTransport] | None" = None
        self._last_command = ""
        self._data_bytes: int | None = None  # message bytes received so far, while DATA content is read
        self._reset_transaction()

    def _aiosmtpd_init(self, loop: asyncio.AbstractEventLoop, *, hostname: str, timeout: float) -> None:
        """aiosmtpd's ``SMTP.__init__`` for the arguments we pass, without its
        per-connection introspection (``inspect.getmembers`` of the session
        and the handler, ``dir()`` for ``smtp_*`` methods: about a fifth of the
        event loop's CPU per message).  Its dispatch tables stay empty: this
        class reads commands and dispatches them itself (``_verbs``).  The
        attribute set is checked against aiosmtpd's own ``__init__`` by
        tests/test_perf_regressions.py, so an aiosmtpd upgrade that adds
        state fails a test instead of a session."""
        self.__ident__ = _aiosmtpd.__ident__
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=READER_LIMIT),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = _NO_HANDLER
        self.data_size_limit = None
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = None
        self.require_starttls = None
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = _aiosmtpd.login_always_fail
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = {}
        self._ehlo_hook_ver = None
        self._smtp_methods = {}
        self._enforce_call_limit = False

    # ---------------------------------------------------------------- state
    def _reset_transaction(self) -> None:
        self.mail_from: addr_mod.Address | None = None
        self._sender_text: str | None = None  # str(mail_from), computed once
        self.mail_params: policy.MailParams | None = None
        self.rcpts: list[tuple[str, str]] = []
        self.queue_id: str | None = None
        self.hold = False  # HOLD from an access map / policy: the message goes to hold/
        self.discard = False  # DISCARD: accept and drop
        self.prepend: list[str] = []  # PREPEND header lines
        self._pending_defer = None  # defer_if_permit carried between stages (smtpd_delay_reject = no)

    @property
    def protocol(self) -> str:
        """The Received ``with`` keyword (RFC 3848, RFC 6531)."""
        if not self.esmtp:
            return "SMTP"
        base = "UTF8SMTP" if self.mail_params is not None and self.mail_params.smtputf8 else "ESMTP"
        return base + ("S" if self.tls_active else "") + ("A" if self.sasl_username else "")

    @property
    def client(self) -> str:
        return f"{self.client_name}[{self.client_addr}]"

    def log(self, text: str) -> None:
        self.ctx.log(text)

    # ---------------------------------------------------------------- wire
    @staticmethod
    def _encode(reply: Reply) -> bytes:
        data = _WIRE.get(reply)
        if data is None:
            data = ("\r\n".join(reply.lines()) + "\r\n").encode("utf-8", "surrogateescape")
            if len(_WIRE) >= _WIRE_MAX:
                _WIRE.clear()
            _WIRE[reply] = data
        return data

    def _write(self, reply: Reply) -> None:
        """Send ``reply`` now (every line of a multi-line one in one write),
        after any replies still queued for this session."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._last_code = reply.code
        self._outbox.write(transport, self._encode(reply))
        self._outbox.flush_transport(transport)

    def _flush_out(self) -> None:
        """Send the replies queued by :meth:`reply` now."""
        self._outbox.flush_transport(self.transport)

    async def reply(self, reply: Reply) -> None:
        """Queue ``reply``: the replies of every session written during one
        event-loop iteration go out together when it ends
        (:mod:`mailserver.outbox`: a burst wakes the client once; replies to
        pipelined commands share one segment)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._last_code = reply.code
        if self._outbox.write(transport, self._encode(reply)) > _DRAIN_ABOVE or self._paused:
            # A pipelining client with many commands buffered, or one that
            # does not read its replies (the transport paused writing at
            # its high-water mark): send now, and wait until the socket
            # takes more before reading the next command.
            self._outbox.flush_transport(transport)
            if not transport.is_closing() and (self._paused or transport.get_write_buffer_size() > _DRAIN_ABOVE):
                await self._writer.drain()

    async def reply_and_close(self, reply: Reply) -> None:
        self._we_closed = True
        self._write(reply)
        self._close()

    def _close(self, *, linger: bool = True) -> None:
        """Close the connection.  A client that does not read its replies
        must not keep it (and its session slot: the command loop waits in
        drain()) for good: as Postfix gives every write smtpd_timeout, a
        connection closed with replies still unsent lingers that long, still
        counted as a session (smtpd_process_limit, the client's connection
        count), and is then cut (``linger``); it is cut at once after a
        timeout (the client has not read them for that long already) and
        at shutdown.  See :func:`mailserver.outbox.close`."""
        if self._linger is not None:  # closed already, its replies waiting for the client
            if not linger:
                self._linger.cancel()
                self._linger_over(self._linger_target)
            return
        if self.transport is None or self._cut:
            return
        target = close_transport(self.transport)
        if target is None:
            return
        if linger:
            self._linger_target = weakref.ref(target)  # (not kept alive by the timer)
            self._linger = self.loop.call_later(self._command_timeout(), self._linger_over, self._linger_target)
            return
        self._cut = True
        cut_transport(target)

    def _linger_over(self, target: "weakref.ref[asyncio.BaseTransport]") -> None:
        """The client did not take its last replies in time: cut, and the
        session leaves the counts (connection_lost() may never come: a
        connection whose STARTTLS handshake did not complete)."""
        self._linger = None
        self._cut = True
        transport = target()
        if transport is not None:
            cut_transport(transport)
        self.ctx.session_ended(self)
        self._forget()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Restart the idle timer.  Called for every command and DATA chunk,
        so it only moves a deadline; one timer handle is (re)armed when the
        deadline comes nearer, and a timer that fires early re-arms itself
        for the rest (instead of a cancel + call_later per command)."""
        if duration is None:
            duration = self._command_timeout()
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        if deadline > self._session_deadline:
            deadline = self._session_deadline
        self._deadline = deadline
        handle = self._timeout_handle
        if not self._timer_armed or handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(deadline, self._timer_fired)
            self._timer_armed = True

    def _command_timeout(self) -> float:
        """smtpd_timeout, stress-adaptive (Postfix smtpd_timeout =
        ${stress?{10}:{300}}s): smtpd_stress_timeout while the server holds
        more sessions than the threshold."""
        if self.ctx.under_stress():
            return self.p["smtpd_stress_timeout"] or self._timeout_duration
        return self._timeout_duration

    def _limit_session(self, seconds: float) -> None:
        """Start smtpd_session_time_limit: the idle timer's deadline never
        goes beyond it (one timer per session instead of an
        ``asyncio.timeout`` around the command loop as well)."""
        if seconds > 0:
            self._session_deadline = self.loop.time() + seconds
            self._reset_timeout()

    def _timer_fired(self) -> None:
        now = self.loop.time()
        if now < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timer_armed = False
        if now >= self._session_deadline:
            self._session_timeout_cb()
        else:
            self._timeout_cb()

    def _session_timeout_cb(self) -> None:
        """smtpd_session_time_limit reached, whatever the session was doing
        (between commands, inside DATA, waiting for a policy answer or a
        STARTTLS handshake): Postfix's timeout reply, close, and cancel the
        command loop at once."""
        self._we_closed = True
        self._log_connect()
        self.log(f"timeout after {self._where()} from {self.client} (session time limit)")
        self._write(policy.timeout_reply(self.ctx.myhostname))
        self._close(linger=False)
        # Stop the command now: connection_lost() (which cancels it too) waits
        # until unsent replies are written, and a DATA still being queued
        # then would queue a message the client was told 421 about.
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _timeout_cb(self) -> None:
        self._we_closed = True
        self._log_connect()
        self.log(f"timeout after {self._where()} from {self.client}")
        self._write(policy.timeout_reply(self.ctx.myhostname))
        self._close(linger=False)  # (aiosmtpd's _timeout_cb: close() only)

    def _input_pending(self) -> bool:
        # StreamReader has no public "bytes buffered" query; aiosmtpd itself
        # uses this attribute for the RFC 3207 buffer flush.
        return bool(self._reader._buffer)  # type: ignore[attr-defined]

    def _unread(self, data: bytes) -> None:
        self._reader._buffer[0:0] = data  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- main loop
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername") or ("unknown", 0)
            self.client_addr = str(peer[0]) if peer else "unknown"
            if self.client_addr.startswith("::ffff:"):
                self.client_addr = self.client_addr[7:]
            self.client_port = peer[1] if peer and len(peer) > 1 else 0
            self.trusted = self.ctx.is_mynetworks(self.client_addr)
            # local_header_rewrite_clients = permit_inet_interfaces: clients on
            # our own addresses get missing Message-ID/Date/From headers added.
            self.local_client = self.ctx.is_local_interface(self.client_addr)
            self._last_command = ""
            sessions = self.listener.sessions
            if self not in sessions:
                sessions.add(self)
                self.ctx.open_sessions += 1
            if transport.get_extra_info("ssl_object") is not None:  # implicit TLS (port 465)
                self._tls_established(transport)
        else:
            # RFC 3207 §4.2: after STARTTLS the client starts over; aiosmtpd has
            # already discarded any plaintext that was pipelined after STARTTLS.
            self._tls_established(transport)
            self.helo_name = None
            self.esmtp = False
            self.pipelining = False
            self._reset_transaction()

    def _tls_established(self, transport: asyncio.BaseTransport) -> None:
        from ..tls import tls_summary

        self.tls_active = True
        ssl_object = transport.get_extra_info("ssl_object")
        self.tls_comment = tls_summary(ssl_object) if ssl_object is not None else ""
        self._tls_object = ssl_object
        if ssl_object is not None and self._connect_logged:
            self._log_tls()
        # Implicit TLS: the handshake came before the reverse lookup, but as
        # in Postfix its line follows "connect from" (see _log_connect).

    def _log_tls(self) -> None:
        from ..tls import tls_log_line

        if self._tls_object is not None:
            self.log(tls_log_line(self._tls_object, self.client))

    def connection_lost(self, error: Exception | None) -> None:
        if self._linger is not None:  # the client took its last replies (or went)
            self._linger.cancel()
            self._linger = None
            self.ctx.session_ended(self)
        self._outbox.discard(self.transport)
        _uncycle_transport(self.transport)
        self._forget()
        super().connection_lost(error)
        if self._handler_ended:
            self._release()

    def _forget(self) -> None:
        """Leave the listener's session count (once)."""
        sessions = self.listener.sessions
        if self in sessions:
            sessions.discard(self)
            self.ctx.open_sessions -= 1

    def _release(self) -> None:
        """Drop the references that make a finished session a reference
        cycle (the session is its StreamWriter's protocol, holds its own
        bound method as the stream callback and its command loop's task), once both the connection and
        the command loop are gone: reference counting then frees the
        session, its transport, reader, writer, task and futures at once
        instead of leaving about 25 objects per connection to the cyclic
        garbage collector.  (The task goes too: when the client hung up,
        aiosmtpd cancelled it, and the CancelledError it keeps holds the
        session's frames.)"""
        self._writer = None
        self._client_connected_cb = None
        self._handler_coroutine = None

    async def _handle_client(self) -> None:
        # smtpd_session_time_limit from the start: a reverse lookup that
        # takes long (a client's DNS servers timing out) is in it too.
        self._limit_session(self.p["smtpd_session_time_limit"])
        try:
            self.client_name, self.reverse_client_name, self.client_name_tempfail = \
                await self.ctx.lookup_client_name(self.client_addr)
            self._log_connect()
            refusal = self.ctx.connection_refusal(self)
            if refusal is not None:  # (logged where it was decided: anvil or the session cap)
                await self.reply_and_close(refusal)
                return
            self._connected = True
            refusal = await self._stage_check("connect")
            if refusal is not None:
                await self.reply_and_close(refusal)
                return
            await self._command_loop()
        except asyncio.CancelledError:
            raise
        except (ConnectionError, OSError):
            pass
        finally:
            self._log_connect()  # (a hang-up, a shutdown or a failure during the reverse lookup)
            if self._connected and not self._we_closed:
                # Postfix: the client went away without QUIT (or in mid-DATA).
                self.log(f"lost connection after {self._where()} from {self.client}")
            self._log_disconnect()
            # A client that hangs up without QUIT (port scanners, TCP health
            # checks): close our side so the session and its socket go away.
            self._flush_out()
            self._close()
            # The session is over: it leaves the counts and stops its timer
            # here, not only in connection_lost(), which asyncio never calls
            # for a connection whose STARTTLS handshake did not complete
            # (failed, or cut by the session time limit); unless it lingers
            # with unsent replies (then when that ends: _linger_over()).
            if self._linger is None:
                self.ctx.session_ended(self)
                self._forget()
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._handler_ended = True
            if self.transport is None:  # connection_lost() has run
                self._release()

    def _log_connect(self) -> None:
        """Postfix's "connect from" line, once: after the reverse lookup, or
        (as ``unknown[addr]``) before the timeout or disconnect line of a
        session that ended while that lookup was still running (cut by a
        timer, a hang-up, a shutdown).  An implicit-TLS session's handshake
        line follows it, with the client's name, as in Postfix."""
        if not self._connect_logged:
            self._connect_logged = True
            self.log(f"connect from {self.client}")
            if self.tls_active:
                self._log_tls()

    def _where(self) -> str:
        """Where the session was, for Postfix's "lost connection after X",
        "timeout after X" lines: the last command, ``DATA (N bytes)`` while
        the message was coming in, ``END-OF-MESSAGE`` once it was answered."""
        if self._data_bytes is not None:
            return f"DATA ({self._data_bytes} bytes)"
        return self._last_command or "CONNECT"

    def _log_disconnect(self) -> None:
        self.log(f"disconnect from {self.client}{format_command_stats(self.counts, self.ok_counts)}")

    async def _command_loop(self) -> None:
        pregreet = self._pregreet_input()
        if pregreet and await self._improper_pipelining("CONNECT", pregreet):
            return
        await self.reply(policy.greeting(self.ctx.banner))
        reader = self._reader
        while self.transport is not None and not self.transport.is_closing():
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                await reader.read(exc.consumed)
                await self._discard_long_line()
                await self._error(policy.LINE_TOO_LONG)
                continue
            except asyncio.IncompleteReadError:
                return
            if len(line) > self.line_length_limit:  # what LimitOverrunError used to catch
                await self._error(policy.LINE_TOO_LONG)
                continue
            if not line.endswith(b"\r\n") and self.p["smtpd_forbid_bare_newline"] == "reject":
                await self.reply_and_close(Reply(521, "5.5.2", f"{self.ctx.myhostname} Error: bare <LF> received"))
                return
            await self._dispatch(line)

    def _pregreet_input(self) -> bytes:
        """What the client sent before our greeting: already read, or (plain
        TCP) waiting in the socket, as Postfix peeks at both.  One peek per
        connection, and only a client that talks first has anything there."""
        buffered = self._reader._buffer  # type: ignore[attr-defined]
        if buffered:
            return bytes(buffered[:100])
        if self.tls_active:
            return b""  # (the socket holds TLS records, not commands)
        sock = getattr(self.transport, "_sock", None)
        if sock is None:
            return b""
        try:
            return sock.recv(100, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # (BlockingIOError: nothing there)
            return b""

    async def _improper_pipelining(self, after: str, pending: bytes) -> bool:
        """Postfix 3.9+: a client that sends ahead of our reply without
        PIPELINING (or before the greeting) is logged with what it sent; with
        ``smtpd_forbid_unauth_pipelining`` (default yes) it gets 554 5.5.0
        and is disconnected (an SMTP smuggling defence), else the session
        goes on and ``reject_unauth_pipelining`` can refuse it later.
        Returns whether the session ended."""
        if self.ill_pipelining:
            return False
        self.ill_pipelining = True
        self.log(f"improper command pipelining after {after} from {self.client}: {_escaped(pending)}")
        if not self.p["smtpd_forbid_unauth_pipelining"]:
            return False
        await self.reply_and_close(policy.BAD_PIPELINING)
        return True

    async def _discard_long_line(self) -> None:
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)

    async def _dispatch(self, line: bytes) -> None:
        verb_bytes, _, arg_bytes = line.rstrip(b"\r\n").partition(b" ")
        try:
            verb = verb_bytes.decode("ascii").upper()
        except UnicodeDecodeError:
            await self._error(policy.BAD_SYNTAX)
            return
        limit = MAIL_LIMIT if verb == "MAIL" else COMMAND_LIMIT
        if len(line) > limit:
            await self._error(policy.LINE_TOO_LONG)
            return
        if not line.strip():
            await self._error(policy.BAD_SYNTAX)  # (an empty line: not a command, as in Postfix)
            return
        arg = arg_bytes.decode("utf-8", "surrogateescape").strip() if arg_bytes else None
        handler = self._verbs.get(verb)
        # (Postfix's "UNKNOWN": the client's own word never reaches a log line)
        self._last_command = verb if handler is not None else "UNKNOWN"
        if handler is None:
            self.counts["unknown"] = self.counts.get("unknown", 0) + 1
            if (verb in FORBIDDEN_COMMANDS or (verb_bytes[:1] and not verb_bytes[:1].isalpha())
                    or _HEADER_LINE.match(line)):
                # smtpd_forbidden_commands, and a header line as a command
                # (Postfix's is_header()): a web client, a proxy, or a
                # spambot that does not wait for replies.
                self.log(f"warning: non-SMTP command from {self.client}: {_printable(line[:100])}")
                await self.reply_and_close(policy.FORBIDDEN_COMMAND)
                return
            self.log(f"warning: {self.client}: unknown command: {_printable(line[:60])}")
            await self._error(policy.UNKNOWN_COMMAND)
            return
        key = verb.lower()
        self.counts[key] = self.counts.get(key, 0) + 1
        if verb in JUNK_COMMANDS:
            self.junk += 1
            if self.junk > self.p["smtpd_junk_command_limit"]:
                self.errors += 1  # Postfix: junk beyond the limit counts as an error
                if self.errors >= self.p["smtpd_hard_error_limit"]:
                    await self._error(policy.UNKNOWN_COMMAND)
                    return
        self._reset_timeout()
        if (self.listener.tls_mode == "required" and not self.tls_active
                and verb not in ("EHLO", "HELO", "NOOP", "QUIT", "STARTTLS", "RSET")):
            await self._error(policy.MUST_STARTTLS)
            return
        if (not self.pipelining or verb in LAST_IN_GROUP) and self._input_pending():
            # Sent ahead of our reply: before PIPELINING was announced in an
            # EHLO reply, or after a command that must end a pipelined group
            # (RFC 2920 §3.1), e.g. DATA and the message before the 354.
            if await self._improper_pipelining(verb, bytes(self._reader._buffer[:100])):  # type: ignore[attr-defined]
                return
        self._last_code = 0
        try:
            await handler(self, arg)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            self.ctx.log_exception(f"{self.client}: unexpected error in {verb}")
            await self.reply(policy.INTERNAL_ERROR)
        if 200 <= self._last_code < 300:
            # Postfix's "normal completion": DATA's is the 250 after the
            # message (not its 354), AUTH's the 235 after the challenges.
            self.ok_counts[key] = self.ok_counts.get(key, 0) + 1

    async def _error(self, reply: Reply) -> None:
        """A client error: beyond smtpd_soft_error_limit each error is answered
        after smtpd_error_sleep_time (a tarpit); at smtpd_hard_error_limit the
        connection is closed with 421 4.7.0."""
        self.errors += 1
        if self.errors >= self.p["smtpd_hard_error_limit"]:
            self.log(f"too many errors after {self._where()} from {self.client}")
            await self.reply_and_close(policy.too_many_errors(self.ctx.myhostname))
            return
        if self.errors > self.p["smtpd_soft_error_limit"] and self.p["smtpd_error_sleep_time"]:
            await asyncio.sleep(self.p["smtpd_error_sleep_time"])
        await self.reply(reply)

    # ---------------------------------------------------------------- restrictions
    def _facts(self, stage: str, recipient: str | None = None):
        global _Facts
        if _Facts is None:
            from .restrictions import Facts as _Facts
        if self.mail_from is not None and self._sender_text is None:
            self._sender_text = str(self.mail_from)  # once per transaction, not per check
        return _Facts(client_addr=self.client_addr, client_name=self.client_name,
                      reverse_client_name=self.reverse_client_name, client_name_tempfail=self.client_name_tempfail,
                      helo=self.helo_name, sender=self._sender_text if self.mail_from is not None else None,
                      recipient=recipient, sasl_username=self.sasl_username, sasl_method=self.sasl_method,
                      tls=self.tls_active, protocol=self.protocol, queue_id=self.queue_id, stage=stage,
                      rcpt_count=len(self.rcpts), size=self.mail_params.size if self.mail_params else None,
                      client_port=str(self.client_port), discard=self.discard, defer_if_permit=self._pending_defer,
                      pipelining_violation=self.ill_pipelining)

    def _take(self, decision) -> Reply | None:
        """Apply a restriction decision: side effects belong to the
        transaction whatever the verdict (Postfix); returns the refusal."""
        self.hold = self.hold or decision.hold
        self.discard = self.discard or decision.discard
        for header in decision.prepend:
            if header not in self.prepend:
                self.prepend.append(header)
        if decision.defer_if_permit is not None:
            self._pending_defer = decision.defer_if_permit
        return None if decision.accepted else decision.reply

    async def _refuse(self, reply: Reply) -> None:
        if reply.code == 421:
            await self.reply_and_close(reply)
        elif reply.code >= 500:
            await self._error(reply)
        else:
            await self.reply(reply)

    async def _hooks(self, stage: str, recipient: str | None = None, size: int | None = None) -> Reply | None:
        """smtpd_policy_hooks: Python policy hooks consulted at every stage."""
        names = self.ctx.config.smtpd_policy_hooks
        if not names:
            return None
        facts = self._facts(stage, recipient)
        if size is not None:
            facts.size = size  # at end of data: the real size (policy protocol)
        decision = await self.listener.checker.check(
            "smtpd_policy_hooks", facts,
            restrictions=[token for name in names for token in ("check_python_policy", name)])
        return self._take(decision)

    async def _stage_check(self, stage: str) -> Reply | None:
        """smtpd_delay_reject = no: client/helo/sender lists at their own stage;
        then the Python policy hooks for this stage."""
        if self.p["smtpd_delay_reject"]:
            return await self._hooks(stage)
        refusal = await self._stage_check_lists(stage)
        return refusal if refusal is not None else await self._hooks(stage)

    async def _stage_check_lists(self, stage: str) -> Reply | None:
        checker = self.listener.checker
        method = {"connect": checker.check_client, "helo": checker.check_helo, "mail": checker.check_mail}[stage]
        return self._take(await method(self._facts(stage)))

    # ---------------------------------------------------------------- verbs
    async def _ehlo(self, arg: str | None) -> None:
        bad = policy.check_helo_argument(arg, ehlo=True)
        if bad:
            await self._error(bad)
            return
        self.helo_name = arg
        self.esmtp = True
        self._reset_transaction()
        refusal = await self._stage_check("helo")
        if refusal is not None:
            await self._refuse(refusal)
            return
        key = (self.ctx.myhostname, self.p["message_size_limit"],
               self.listener.tls is not None and not self.tls_active, self._auth_mechanisms())
        reply = _EHLO.get(key)
        if reply is None:
            if len(_EHLO) >= 64:
                _EHLO.clear()
            reply = _EHLO[key] = policy.ehlo_reply(key[0], size_limit=key[1], starttls=key[2],
                                                   auth_mechanisms=key[3])
        await self.reply(reply)
        self.pipelining = True

    async def _helo(self, arg: str | None) -> None:
        bad = policy.check_helo_argument(arg, ehlo=False)
        if bad:
            await self._error(bad)
            return
        self.helo_name = arg
        self.esmtp = False
        self.pipelining = False
        self._reset_transaction()
        refusal = await self._stage_check("helo")
        if refusal is not None:
            await self._refuse(refusal)
            return
        await self.reply(policy.helo_reply(self.ctx.myhostname))

    async def _mail(self, arg: str | None) -> None:
        if self.p["smtpd_helo_required"] and not self.helo_name:
            await self._error(policy.NEED_HELO)
            return
        if self.mail_from is not None:
            await self._error(policy.NESTED_MAIL)
            return
        if self.listener.auth_mode == "required" and self.sasl_username is None:
            await self._error(policy.AUTH_REQUIRED)
            return
        rest = _strip_keyword(arg, "FROM:")
        if rest is None:
            await self._error(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        try:
            address, params = addr_mod.parse_mail_from(rest)
        except ReplyError as exc:
            await self._error(exc.reply)
            return
        if not self.esmtp and params:
            await self._error(policy.unsupported_option(next(iter(params))))
            return
        mail_params, bad = policy.check_mail_params(params, size_limit=self.p["message_size_limit"])
        if bad is None:
            bad = policy.check_address_charset(address, mail_params.smtputf8)
        if bad is None:
            bad = self.listener.anvil.message(self.client_addr, client=self.client)
        if bad is None and not await self.ctx.has_free_space(mail_params.size or 0):
            bad = policy.INSUFFICIENT_STORAGE
            self.log(f"NOQUEUE: reject: MAIL from {self.client}: {bad}; from=<{address}>")
        if bad is not None:
            await self._error(bad) if bad.code >= 500 else await self.reply(bad)
            return
        if not address.is_null and not address.domain:
            address = address.with_domain(self.ctx.myorigin) if not address.routed else address
        self.mail_from = address
        self._sender_text = None
        self.mail_params = mail_params
        refusal = await self._stage_check("mail")
        if refusal is not None:
            self._reset_transaction()
            await self._refuse(refusal)
            return
        await self.reply(policy.MAIL_OK)

    async def _rcpt(self, arg: str | None) -> None:
        if self.mail_from is None:
            await self._error(policy.NEED_MAIL)
            return
        rest = _strip_keyword(arg, "TO:")
        if rest is None:
            await self._error(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        try:
            address, params = addr_mod.parse_rcpt_to(rest)
        except ReplyError as exc:
            await self._error(exc.reply)
            return
        bad = policy.check_rcpt_params(params) or policy.check_address_charset(
            address, bool(self.mail_params and self.mail_params.smtputf8))
        limit = self.p["smtpd_recipient_limit"]
        if bad is None and limit and len(self.rcpts) >= limit:
            bad = policy.TOO_MANY_RCPTS
        if bad is None:
            bad = self.listener.anvil.recipient(self.client_addr, client=self.client)
        if bad is None and not policy.is_postmaster(address, not address.domain or
                                                      self.ctx.resolver.is_local_domain(address.domain)):
            decision = await self.listener.checker.check_rcpt(self._facts("rcpt", str(address)))
            bad = self._take(decision)  # the checker logged the reject line itself
            if bad is None:
                bad = await self._hooks("rcpt", str(address))
        if bad is not None:
            await self._refuse(bad)
            return
        final = str(address) if address.domain or address.routed else str(address.with_domain(self.ctx.myorigin))
        self.rcpts.append((final, str(address)))
        if self.queue_id is None:
            self.queue_id = self.ctx.new_queue_id()
            sasl = (f", sasl_method={self.sasl_method}, sasl_username={self.sasl_username}"
                    if self.sasl_username else "")
            self.log(f"{self.queue_id}: client={self.client}{sasl}")
        await self.reply(policy.RCPT_OK)

    async def _data(self, arg: str | None) -> None:
        if self.mail_from is None:
            await self._error(policy.NEED_MAIL)
            return
        if not self.rcpts:
            await self._error(policy.NEED_RCPT)
            return
        if arg:
            await self._error(policy.DATA_SYNTAX)
            return
        # (An empty list decides nothing: skip building its facts.)
        refusal = self._take(await self.listener.checker.check_data(self._facts("data"))) \
            if self.p["smtpd_data_restrictions"] else None
        if refusal is not None:
            await self._refuse(refusal)
            return
        await self.reply(policy.DATA_GO)
        limit = self.p["message_size_limit"]
        self._data_bytes = 0  # (lost in mid-content: _where() says how far it got)
        content, too_big = await self._read_data(limit)
        self._data_bytes = None
        self._last_command = "END-OF-MESSAGE"  # Postfix's name for where the session is now
        bare_lf = bare_cr = has_nul = False
        if not too_big:
            crlf = content.count(b"\r\n")
            bare_lf = content.count(b"\n") != crlf
            bare_cr = content.count(b"\r") != crlf
            has_nul = b"\x00" in content
        hops = self._hops(content) if not too_big else 0
        bad = policy.check_content(len(content), too_big=too_big, has_nul=has_nul, bare_lf=bare_lf,
                                   bare_cr=bare_cr, forbid_bare_newline=self.p["smtpd_forbid_bare_newline"],
                                   hops=hops, hopcount_limit=self.p["hopcount_limit"])
        if bad is not None:
            self.log(f"{self.queue_id or 'NOQUEUE'}: reject: END-OF-MESSAGE from {self.client}: "
                     f"{' '.join(bad.lines())}; from=<{self.mail_from}> proto={'ESMTP' if self.esmtp else 'SMTP'} "
                     f"helo=<{self.helo_name or ''}>")
            self._reset_transaction()
            await self.reply(bad)
            return
        if bare_lf or bare_cr:  # smtpd_forbid_bare_newline = normalize
            content = _normalize_newlines(content)
        content = _unstuff(content)
        refusal = None
        if self.p["smtpd_end_of_data_restrictions"]:
            facts = self._facts("end-of-data")
            facts.size = len(content)
            refusal = self._take(await self.listener.checker.check_eod(facts))
        if refusal is None:
            refusal = await self._hooks("end-of-data", size=len(content))
        if refusal is None and self.ctx.content is not None:
            refusal, content = self._content_checks(content)
        if refusal is not None:
            self._reset_transaction()
            await self._refuse(refusal)
            return
        if self._pending_defer is not None:  # defer_if_permit that nothing overrode
            reply, self._pending_defer = self._pending_defer, None
            self._reset_transaction()
            await self.reply(reply)
            return
        if self.prepend:
            content = "".join(h.rstrip("\r\n") + "\r\n" for h in self.prepend).encode("utf-8", "surrogateescape") \
                + content
        if self.discard:
            queue_id = self.queue_id or self.ctx.new_queue_id()
            self.log(f"{queue_id}: discard: END-OF-MESSAGE from {self.client}: message discarded; "
                     f"from=<{self.mail_from}> proto={'ESMTP' if self.esmtp else 'SMTP'} helo=<{self.helo_name or ''}>")
            self._reset_transaction()
            await self.reply(policy.queued(queue_id))
            return
        try:
            queue_id = await self.ctx.submit(self, content)
        except SpoolError as exc:
            self.log(f"warning: {self.queue_id}: queue file write error: {exc}")
            reply = policy.QUEUE_WRITE_ERROR  # Postfix cleanup: 451 4.3.0 for any write error
        else:
            reply = policy.queued(queue_id)
        self._reset_transaction()
        await self.reply(reply)

    def _hops(self, content: bytes) -> int:
        """Received: headers, for the hopcount_limit check only.  For a small
        message, when even the whole content holds fewer ``received:`` than
        the limit, that count (an upper bound below the limit: the check
        passes either way) saves parsing the header section a second time
        (cleanup parses it anyway)."""
        limit = self.p["hopcount_limit"]
        if limit and len(content) <= 65536:
            bound = content.lower().count(b"received:")
            if bound < limit:
                return bound
        return self.ctx.count_hops(content)

    def _content_checks(self, content: bytes) -> tuple[Reply | None, bytes]:
        """header_checks / body_checks (Postfix cleanup): REJECT answers
        550 5.7.1 (451 for a 4.x.x status); DISCARD and HOLD mark the
        transaction; IGNORE/PREPEND/REPLACE edit the message."""
        from ..content_checks import format_log_context

        context = format_log_context(self.client, sender=str(self.mail_from),
                                     recipient=self.rcpts[0][0] if self.rcpts else None,
                                     proto="ESMTP" if self.esmtp else "SMTP", helo=self.helo_name or "")
        result = self.ctx.content.check(content, log_context=context)
        for line in result.logs:
            self.log(f"{self.queue_id or 'NOQUEUE'}: {line}")
        if result.action == "reject":
            return Reply(result.reply_code or 550, result.status or "5.7.1",
                         result.reply_text or "message content rejected"), content
        if result.action == "discard":
            self.discard = True
        elif result.action == "hold":
            self.hold = True
        return None, result.message or content

    async def _read_data(self, limit: int) -> tuple[bytes, bool]:
        """Read DATA content up to the exact ``<CR><LF>.<CR><LF>``.

        Returns (content including the final CRLF, still dot-stuffed;
        too_big).  Over ``limit`` the content is dropped but reading goes
        on to the true end so the next command is read correctly.  Bytes
        after the terminator (pipelined commands) go back to the reader.
        """
        reader = self._reader
        buf = bytearray(b"\r\n")  # the CRLF that ended the DATA command line
        too_big = False
        dropped = 0  # content bytes already discarded (oversized message)
        while True:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                raise ConnectionResetError("connection lost during DATA")
            self._data_bytes += len(chunk)
            self._reset_timeout()
            start = max(0, len(buf) - 4)
            buf += chunk
            end = buf.find(b"\r\n.\r\n", start)
            if end >= 0:
                rest = bytes(buf[end + 5:])
                if rest:
                    self._unread(rest)
                if too_big or (limit and dropped + end > limit):
                    return b"", True
                return bytes(buf[2:end + 2]), False
            if limit and dropped + len(buf) - 2 > limit:
                too_big = True
            if too_big and len(buf) > 4:
                dropped += len(buf) - 4
                del buf[:-4]

    async def _rset(self, arg: str | None) -> None:
        self._reset_transaction()
        await self.reply(policy.OK)

    async def _noop(self, arg: str | None) -> None:
        await self.reply(policy.OK)

    async def _quit(self, arg: str | None) -> None:
        await self.reply_and_close(policy.BYE)

    async def _vrfy(self, arg: str | None) -> None:
        await self.reply(policy.VRFY_REPLY)

    async def _help(self, arg: str | None) -> None:
        await self.reply(policy.HELP_REPLY)

    # ---------------------------------------------------------------- STARTTLS (RFC 3207)
    async def _starttls(self, arg: str | None) -> None:
        if self.listener.tls is None:
            await self._error(policy.UNKNOWN_COMMAND)
            return
        if arg:
            await self._error(Reply(501, "5.5.4", "Syntax: STARTTLS"))
            return
        if self.tls_active:
            await self._error(Reply(503, "5.5.1", "Error: TLS already active"))
            return
        if self._input_pending():
            # CVE-2011-0411: plaintext pipelined after STARTTLS must never be
            # executed inside the TLS session.
            self.log(f"warning: {self.client}: discarding plaintext pipelined after STARTTLS")
            self._reader._buffer.clear()  # type: ignore[attr-defined]
        self.tls_context = self.listener.tls.context
        self._write(Reply(220, "2.0.0", "Ready to start TLS"))  # before the transport changes
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter, server_side=True)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            async with asyncio.timeout(self.p["smtpd_timeout"]):
                await waiter
        except (Exception, TimeoutError) as exc:
            self.log(f"warning: TLS handshake failed with {self.client}: {type(exc).__name__}")
            self._close()
            # (asyncio never calls connection_lost() for this connection: the
            # command loop's end leaves the session count, see _handle_client.)
            raise ConnectionResetError("TLS handshake failed") from None

    # ---------------------------------------------------------------- AUTH (RFC 4954)
    def _auth_mechanisms(self) -> tuple[str, ...]:
        if not self.listener.sasl_enabled:
            return ()
        if self.p["smtpd_tls_auth_only"] and not self.tls_active:
            return ()
        from ..sasl import MECHANISMS

        return MECHANISMS

    async def _auth(self, arg: str | None) -> None:
        from .. import sasl

        if not self.listener.sasl_enabled:
            await self._error(sasl.AUTH_NOT_ENABLED)
            return
        if self.p["smtpd_tls_auth_only"] and not self.tls_active:
            await self._error(policy.AUTH_NEEDS_TLS)
            return
        if not self.esmtp:
            await self._error(policy.NEED_EHLO_FOR_AUTH)
            return
        if self.sasl_username is not None:
            await self._error(sasl.AUTH_ALREADY_AUTHENTICATED)
            return
        if self.mail_from is not None:
            await self._error(sasl.AUTH_MAIL_TRANSACTION)
            return
        if not arg:
            await self._error(sasl.AUTH_SYNTAX)
            return
        limited = self.listener.anvil.auth(self.client_addr, client=self.client)
        if limited is not None:
            await self.reply(limited)
            return
        mechanism, _, initial = arg.partition(" ")
        exchange = sasl.SaslExchange(mechanism, initial.strip() or None)
        step = exchange.start()
        while isinstance(step, sasl.Challenge):
            self._flush_out()
            self._writer.write(step.line.encode("ascii") + b"\r\n")
            await self._writer.drain()
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                await self._discard_long_line()
                await self._error(sasl.AUTH_RESPONSE_TOO_LONG)
                return
            if len(line) > self.line_length_limit:
                await self._error(sasl.AUTH_RESPONSE_TOO_LONG)
                return
            self._reset_timeout()
            step = exchange.step(line.rstrip(b"\r\n").decode("ascii", "replace"))
        if isinstance(step, sasl.Failure):
            await self._error(step.reply)
            return
        try:
            ok = await self.ctx.sasl.authenticate(step.authcid, step.password)
        except sasl.PasswdFileError as exc:
            self.log(f"warning: {self.client}: SASL {exchange.mechanism} authentication failed: {exc}")
            await self.reply(sasl.AUTH_TEMP_FAILURE)
            return
        if ok:
            self.sasl_username = step.authcid
            self.sasl_method = exchange.mechanism
            self.listener.anvil.auth_success(self.client_addr)
            await self.reply(sasl.AUTH_SUCCESS)
            return
        self.auth_failures += 1
        self.log(f"warning: {self.client}: SASL {exchange.mechanism} authentication failed: authentication failure"
                 f", sasl_username={_printable(step.authcid.encode('utf-8', 'replace'))}")
        delay = self.listener.anvil.auth_failure(self.client_addr)
        if delay:
            await asyncio.sleep(delay)  # brute-force tarpit, grows per client across connections
        if self.auth_failures >= self.p["smtpd_auth_failure_limit"]:
            await self.reply_and_close(Reply(421, "4.7.0", f"{self.ctx.myhostname} Error: too many failed "
                                                           f"authentication attempts"))
            return
        await self._error(sasl.AUTH_FAILED)

    async def _bdat(self, arg: str | None) -> None:
        await self._error(policy.BDAT_UNSUPPORTED)

    _verbs = {
        "EHLO": _ehlo, "HELO": _helo, "MAIL": _mail, "RCPT": _rcpt, "DATA": _data, "RSET": _rset,
        "NOOP": _noop, "QUIT": _quit, "VRFY": _vrfy, "HELP": _help, "BDAT": _bdat,
        "STARTTLS": _starttls, "AUTH": _auth,
    }


FORBIDDEN_COMMANDS = frozenset({"CONNECT", "GET", "POST", "HEAD", "PUT", "OPTIONS"})
# A message header line sent as a command (Postfix's is_header()): a name of
# printable characters other than ':', optional blanks, then ':'.
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
# Commands after which a client must wait for the reply even with PIPELINING
# (RFC 2920 §3.1; smtpd(8)'s SMTPD_CMD_FLAG_LAST).
LAST_IN_GROUP = frozenset({"HELO", "EHLO", "DATA", "BDAT", "NOOP", "VRFY"})
JUNK_COMMANDS = frozenset({"NOOP", "VRFY", "RSET", "ETRN", "HELP"})


# The order of smtpd(8)'s command table, which its disconnect line follows.
_STATS_ORDER = ("helo", "ehlo", "xclient", "xforward", "starttls", "auth", "mail", "rcpt", "data",
                "bdat", "rset", "noop", "vrfy", "etrn", "quit")


def format_command_stats(counts: dict[str, int], ok_counts: dict[str, int]) -> str:
    """The command statistics of Postfix's ``disconnect from`` line:
    `` ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4``.

    Each command given is ``name=ok``, or ``name=ok/total`` when some did
    not end with a 2xx reply; then ``unknown=0/N``; then the sums, where
    ``commands=0/0`` is a client that sent no command."""
    names = [name for name in _STATS_ORDER if name in counts]
    names += [name for name in counts if name not in _STATS_ORDER and name != "unknown"]
    if "unknown" in counts:
        names.append("unknown")
    parts = []
    ok_sum = total_sum = 0
    for name in names:
        total, ok = counts[name], ok_counts.get(name, 0)
        ok_sum += ok
        total_sum += total
        parts.append(f" {name}={ok}" if ok == total else f" {name}={ok}/{total}")
    parts.append(f" commands={ok_sum}" if ok_sum == total_sum and total_sum else f" commands={ok_sum}/{total_sum}")
    return "".join(parts)


def _uncycle_transport(transport: asyncio.BaseTransport | None) -> None:
    """asyncio's socket transport keeps a bound method of itself
    (``_read_ready_cb``), so a closed transport and its socket wait for
    the cyclic garbage collector.  Once its connection is lost that method
    is never called again: dropping it lets reference counting free them."""
    if transport is not None and getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]


def _escaped(data: bytes) -> str:
    """Client input in a log line as Postfix's escape(): C escapes for
    control characters and backslash, octal for other bytes outside ASCII's
    printable range."""
    out = []
    for b in data:
        if b in _C_ESCAPES:
            out.append(_C_ESCAPES[b])
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return "".join(out)


_C_ESCAPES = {0x5C: "\\\\", 0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t", 0x07: "\\a", 0x08: "\\b",
              0x0C: "\\f", 0x0B: "\\v"}


def _printable(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "?" for b in data.rstrip(b"\r\n"))


def _strip_keyword(arg: str | None, keyword: str) -> str | None:
    if not arg or not arg[: len(keyword)].upper() == keyword:
        return None
    return arg[len(keyword):].lstrip(" ")


def _normalize_newlines(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _unstuff(content: bytes) -> bytes:
    """Remove SMTP transparency dots (RFC 5321 §4.5.2)."""
    if b"\r\n." in content or content.startswith(b"."):
        content = (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:]
    return content
