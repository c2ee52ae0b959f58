"""The ``smtp`` delivery agent: relay a message to the next hop over SMTP.

Responsibility
    Given one :class:`~mailserver.delivery.DeliveryRequest` (one message, a
    batch of recipients that share a next hop) find the next hop's SMTP
    servers (MX lookup, or an explicit ``[host]:port``), talk ESMTP to them
    with aiosmtplib and return one outcome per recipient, the way Postfix
    ``smtp(8)`` does (``smtp_connect.c``, ``smtp_proto.c``,
    ``smtp_trouble.c`` are the reference).

Contract
    * ``request.nexthop``: ``[host]:port`` / ``[host]`` (no MX lookup; host
      is an IP address or a name resolved with A/AAAA), ``host:port`` /
      ``host`` (MX lookup, implicit MX when there is none); the port
      defaults to ``smtp_tcp_port``.  An empty nexthop means the domain of
      the first recipient.  ``[ipv6:2001:db8::1]`` is accepted.
    * Addresses are tried in order (MX preference, at most
      ``smtp_mx_address_limit`` of them; at most ``smtp_mx_session_limit``
      sessions that complete the EHLO handshake).  A server is skipped
      after connection failure, a non-2xx greeting, 421 at any time, a TLS
      requirement it cannot meet, any 4xx reply to MAIL FROM, DATA or end
      of data, or a lost connection/timeout.  As in Postfix, recipients
      that got a 4xx at RCPT TO, and all recipients of a failed session,
      are offered to the next server; a 5xx reply is final at any server
      (except a 5xx greeting, which is turned into 4xx as with Postfix's
      default ``smtp_skip_5xx_greeting = yes``).  Whatever is still
      undelivered after the last server gets the most recent reason.
    * Every outcome carries ``relay="host[ip]:port"`` of the server that
      produced it, or ``"none"`` when no connection was made.  Texts are
      Postfix's: ``host mx[192.0.2.1] said: 550 5.1.1 ... (in reply to RCPT
      TO command)``, ``connect to mx[192.0.2.1]:25: Connection refused``,
      ``conversation with mx[192.0.2.1] timed out while sending RCPT TO``.
      Delivered outcomes carry the server's end-of-data reply.
    * The message is sent with CRLF line endings whatever the stored form
      (lone CR and lone LF become CRLF), dot-stuffed, terminated by
      ``.``; ``SIZE=`` is sent when offered, ``BODY=8BITMIME`` when the
      request is 8-bit and the server offers it (otherwise the body is
      sent as is and the fact is logged), ``SMTPUTF8`` when requested
      (required from the server).
    * ESMTP PIPELINING (RFC 2920, as Postfix ``smtp(8)``): when the EHLO
      reply announces it, MAIL FROM, every RCPT TO and DATA are sent in one
      write and the replies are read in order, each with its stage's
      timeout; otherwise each command waits for its reply.  The outcomes
      are the same either way: a rejected MAIL FROM fails every recipient
      (the replies that follow are read and ignored); each RCPT TO reply
      settles its recipient; when no recipient was accepted the server's
      refusal of DATA is read, no message is sent and the connection is
      reset (RSET) for reuse; a broken server that answers DATA with 354
      anyway gets an empty message (just ``.``) and nothing is delivered.
      The message body and the final ``.`` are written together (in 64 KiB
      chunks for a large message).
    * TLS per ``smtp_tls_security_level``: ``none``; ``may`` (STARTTLS when
      offered, no verification, a failed handshake is retried once in
      plaintext on the same address); ``encrypt`` (required, unverified);
      ``verify`` (required, chain verified against ``smtp_tls_CAfile`` or the
      system store); ``secure`` (``verify`` plus the certificate must match
      the server's host name).  Required TLS never falls back to plaintext.
    * Connections that end a transaction cleanly are cached per next hop
      for ``smtp_connection_cache_time_limit`` idle seconds and reused
      (after RSET, ``smtp_rset_timeout``) until
      ``smtp_connection_reuse_time_limit`` seconds after they were opened.
      Where the server announced PIPELINING (always for LMTP) the RSET goes
      out in the next transaction's group (RFC 2920 §3.1: RSET may appear
      anywhere in a group) instead of a round trip of its own (Postfix
      waits for the RSET reply alone; this saves one round trip per reused
      delivery): its reply is read first, and a refusal, a lost connection or a
      timeout there means only that the cached connection was stale: it is
      closed before any message content was sent, and the transaction
      starts over on the next cached connection or a new one, exactly as
      after a failed stand-alone RSET.  A 421 to MAIL FROM on a reused
      connection (a per-connection message limit) is treated the same way:
      nothing of the message was sent; it is logged and not deferred.
      :meth:`SmtpAgent.close` closes them all; idle expiry uses a loop timer
      (no background tasks).
    * Timeouts per stage: ``smtp_connect_timeout`` (TCP connect),
      ``smtp_helo_timeout`` (greeting, EHLO/HELO, STARTTLS and the TLS
      handshake), ``smtp_mail_timeout``, ``smtp_rcpt_timeout``,
      ``smtp_data_init_timeout`` (DATA → 354), ``smtp_data_xfer_timeout``
      (each 64 KiB chunk of the body), ``smtp_data_done_timeout`` (reply to
      the final ``.``).  QUIT is sent without waiting for its reply (Postfix
      ``smtp_skip_quit_response = yes``), so ``smtp_quit_timeout`` is unused.
    * Mail loops: on the SMTP port (``smtp_tcp_port``) an MX host whose
      address is in ``own_addresses`` or whose name is ``myhostname`` ends
      the MX list at its preference (we are a backup MX: deliver to better
      MX hosts only); nothing left → 5.4.6 "mail for D loops back to
      myself".  A server that answers EHLO with our ``myhostname`` is a loop
      too (5.4.6 when it is a best MX, else 4.4.6).

Failure modes
    Nothing is raised for delivery problems: every failure becomes a
    per-recipient :class:`TemporaryFailure`/:class:`PermanentFailure`.
    aiosmtplib, ssl and socket exceptions are translated in exactly one
    place, :meth:`SmtpAgent._translate`; anything not recognised there, and
    any bug inside the agent, is a temporary failure.  A lost connection or
    timeout after the final ``.`` is a temporary failure (the message may be
    delivered twice, never lost).

LMTP (``SmtpClientSettings(lmtp=True)``, Postfix ``lmtp(8)``, RFC 2033)
    The same agent (``name == "lmtp"``) with these differences:

    * Next hops (:func:`parse_lmtp_nexthop`): ``unix:/path/to/socket`` (a
      Unix-domain socket; a relative path is relative to ``lmtp_unix_base``,
      the queue directory as in Postfix, e.g. ``unix:private/dovecot-lmtp``),
      ``[host]:port`` / ``[host]`` / ``host:port`` / ``host``,
      optionally prefixed with ``inet:``.  MX records are never used: a host
      name is resolved with A/AAAA only; the port defaults to
      ``lmtp_tcp_port`` (24).
    * ``LHLO`` instead of EHLO, never HELO (a non-2xx LHLO reply is "refused
      to talk to me"); STARTTLS per ``smtp_tls_security_level`` exactly as for
      SMTP (over a Unix socket too, SNI ``localhost``).  No mail-loop checks
      (an LMTP server on this host often greets with our own name).
    * After the final ``.`` the server sends one reply per accepted recipient,
      in RCPT TO order (RFC 2033 section 4.2); each recipient gets its own
      outcome (``host H said: 452 4.2.2 ... (in reply to end of DATA
      command)``; Delivered carries that recipient's reply).  A 421 among them
      applies to that recipient and all still unanswered ones.  A lost
      connection or timeout in the middle of those replies leaves every
      unanswered recipient with a temporary failure (4.4.2, "message may be
      sent more than once"): duplicates are possible, loss is not.
    * ``relay=`` is ``host[ip]:port`` for TCP (``127.0.0.1[127.0.0.1]:24``)
      and ``localhost[/path/to/socket]`` for a Unix socket (Postfix prints
      ``myhostname[path]``).
    * Connections are cached and reused per next hop exactly as for SMTP
      (RSET before each reuse), in a cache separate from the smtp agent's.
    * Commands are always pipelined (RFC 2033 requires PIPELINING of every
      LMTP server).

Implementation note
    aiosmtplib reads exactly one reply per command (extra replies are
    dropped), so for each mail transaction (MAIL FROM up to the reply to the
    final dot, or RSET) the transport's protocol is swapped for a
    :class:`_ReplyCollector` that buffers and parses every reply, and
    swapped back afterwards.  A connection whose server sent more replies
    than it was asked for is never reused.  The greeting, EHLO and STARTTLS
    go through aiosmtplib; the RSET before a reused transaction is read by
    a collector too (alone, or at the head of the PIPELINING group).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from mailserver.delivery import (
    Delivered,
    DeliveryRequest,
    Outcome,
    PermanentFailure,
    TemporaryFailure,
)
from mailserver.dns import DnsError, Resolver
from mailserver.outbox import close as close_transport, cut as cut_transport

__all__ = [
    "Destination",
    "SmtpAgent",
    "SmtpClientSettings",
    "parse_lmtp_nexthop",
    "parse_nexthop",
]

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")

TLS_LEVELS = ("none", "may", "encrypt", "verify", "secure")
_TLS_REQUIRED = ("encrypt", "verify", "secure")
_CHUNK = 64 * 1024
_KNOWN_PORTS = {"smtp": 25, "lmtp": 24, "submission": 587, "smtps": 465}


@dataclass(frozen=True)
class SmtpClientSettings:
    myhostname: str
    smtp_tcp_port: int = 25
    smtp_mx_address_limit: int = 5
    smtp_mx_session_limit: int = 2
    smtp_connect_timeout: float = 30
    smtp_helo_timeout: float = 300
    smtp_mail_timeout: float = 300
    smtp_rcpt_timeout: float = 300
    smtp_data_init_timeout: float = 120
    smtp_data_xfer_timeout: float = 180
    smtp_data_done_timeout: float = 600
    smtp_rset_timeout: float = 20
    smtp_quit_timeout: float = 300
    smtp_tls_security_level: str = "may"  # none | may | encrypt | verify | secure
    smtp_tls_CAfile: str | None = None
    smtp_skip_5xx_greeting: bool = True
    smtp_connection_cache_time_limit: float = 2.0
    smtp_connection_reuse_time_limit: float = 300.0
    # Our listen IPs: an MX on one of these (or named myhostname) is a loop.
    own_addresses: frozenset[str] = frozenset()
    lmtp: bool = False  # speak LMTP (Postfix lmtp(8)); see the module docstring
    lmtp_tcp_port: int = 24  # default port of an LMTP next hop
    # A relative unix: next hop is relative to this directory (Postfix: the
    # queue directory, as in lmtp:unix:private/dovecot-lmtp); "" = the
    # working directory.
    lmtp_unix_base: str = ""


# --------------------------------------------------------------------------
# Next hop


@dataclass(frozen=True)
class Destination:
    """A parsed next hop: ``host`` (no brackets), ``port``, whether to look
    up MX records, and the connection-cache key.  ``path`` is set for an LMTP
    Unix-domain socket (then ``host`` is ``localhost`` and ``port`` 0)."""

    host: str
    port: int
    mx_lookup: bool
    path: str = ""

    @property
    def key(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        h = self.host if self.mx_lookup else f"[{self.host}]"
        return f"{h}:{self.port}"


@functools.lru_cache(maxsize=1024)  # asked for every delivery to a [literal] next hop
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str, nexthop: str) -> int:
    if text.isdigit():
        port = int(text)
    elif text.lower() in _KNOWN_PORTS:
        port = _KNOWN_PORTS[text.lower()]
    else:
        raise ValueError(f"bad port in next-hop destination {nexthop!r}")
    if not 0 < port < 65536:
        raise ValueError(f"bad port in next-hop destination {nexthop!r}")
    return port


@functools.lru_cache(maxsize=1024)
def parse_nexthop(nexthop: str, default_port: int = 25) -> Destination:
    """``[host]:port``, ``[host]``, ``host:port`` or ``host`` (see module
    docstring).  Raises :class:`ValueError` for malformed input."""
    s = nexthop.strip()
    if not s:
        raise ValueError("empty next-hop destination")
    port = default_port
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"malformed next-hop destination {nexthop!r}")
        host, rest = s[1:end].strip(), s[end + 1 :]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"malformed next-hop destination {nexthop!r}")
            port = _parse_port(rest[1:], nexthop)
        mx_lookup = False
    elif s.count(":") > 1:
        if not _is_ip(s):
            raise ValueError(f"malformed next-hop destination {nexthop!r}")
        host, mx_lookup = s, False
    else:
        host, sep, p = s.partition(":")
        if sep:
            port = _parse_port(p, nexthop)
        # An unbracketed address cannot have MX records: treat it as literal.
        mx_lookup = not _is_ip(host)
    host = host.rstrip(".").lower() if not _is_ip(host) else str(ipaddress.ip_address(host))
    if not host:
        raise ValueError(f"malformed next-hop destination {nexthop!r}")
    return Destination(host, port, mx_lookup)


def parse_lmtp_nexthop(nexthop: str, default_port: int = 24) -> Destination:
    """An LMTP next hop (Postfix ``lmtp(8)``): ``unix:/path``, or
    ``[host]:port``, ``[host]``, ``host:port``, ``host``, each optionally
    prefixed with ``inet:``.  Never an MX lookup.  Raises
    :class:`ValueError` for malformed input."""
    s = nexthop.strip()
    kind, sep, rest = s.partition(":")
    if sep and kind.lower() == "unix":
        path = rest.strip()
        if not path or "\x00" in path:
            raise ValueError(f"malformed next-hop destination {nexthop!r}")
        return Destination("localhost", 0, False, path)
    if sep and kind.lower() == "inet":
        s = rest
    dest = parse_nexthop(s, default_port)
    return Destination(dest.host, dest.port, False)


# --------------------------------------------------------------------------
# Internal values


@dataclass(frozen=True)
class _Target:
    host: str
    ip: str
    port: int
    pref: int
    best: bool  # among the most preferred MX hosts
    unix: bool = False  # LMTP over a Unix socket: ip is the path, port 0

    @property
    def namaddr(self) -> str:
        return f"{self.host}[{self.ip}]"

    @property
    def relay(self) -> str:
        if self.unix:
            return f"{self.host}[{self.ip}]"
        return f"{self.host}[{self.ip}]:{self.port}"


class _Failure(Exception):
    """A classified failure (Postfix DSN): status, text, relay, and how the
    next-server logic must treat it."""

    def __init__(
        self,
        status: str,
        text: str,
        relay: str = "none",
        *,
        reply: SMTPResponse | None = None,
        retry_plain: bool = False,
        soft_non_final: bool = False,
        tls: bool = False,
    ):
        super().__init__(text)
        self.status = status
        self.text = text
        self.relay = relay
        self.reply = reply
        self.retry_plain = retry_plain
        self.soft_non_final = soft_non_final  # 5.x.x, but try other servers
        self.tls = tls

    @property
    def hard(self) -> bool:
        return self.status.startswith("5") and not self.soft_non_final

    def outcome(self) -> Outcome:
        cls = PermanentFailure if self.status.startswith("5") else TemporaryFailure
        return cls(self.status, self.text, self.relay)


class _Batch:
    """Per-recipient bookkeeping for one delivery request."""

    def __init__(self, n: int, queue_id: str = ""):
        self.queue_id = queue_id
        self.results: list[Outcome | None] = [None] * n
        self.reasons: dict[int, Outcome] = {}

    @property
    def pending(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r is None]

    def settle(self, i: int, outcome: Outcome) -> None:
        self.results[i] = outcome
        self.reasons.pop(i, None)

    def fail(self, indexes: list[int], failure: _Failure) -> None:
        """Hard failure: final.  Soft: remember why, offer to the next server."""
        outcome = failure.outcome()
        for i in indexes:
            if failure.hard:
                self.settle(i, outcome)
            else:
                self.reasons[i] = outcome

    def finish(self) -> list[Outcome]:
        fallback = TemporaryFailure("4.4.0", "no mail server could be reached", "none")
        return [
            r if r is not None else self.reasons.get(i, fallback)
            for i, r in enumerate(self.results)
        ]


@dataclass
class _Message:
    wire: bytes  # dot-stuffed, CRLF, terminated by ".\r\n"
    size: int  # octets of the CRLF form before stuffing (RFC 1870)


_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_BAD_ADDR = re.compile(r"[\x00-\x1f\x7f<>]")


def wire_message(message: bytes) -> tuple[bytes, int]:
    """The DATA payload for ``message`` (CRLF enforced, dot-stuffed, with the
    final ``.\\r\\n``) and the message size before stuffing."""
    crlf = message.count(b"\r\n")
    if crlf == message.count(b"\n") == message.count(b"\r"):
        normalized = message  # already CRLF throughout (what smtpd and cleanup store): no copy
    else:
        normalized = _LINE_END.sub(b"\r\n", message)
    if normalized and not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    if b"\n." in normalized or normalized.startswith(b"."):
        return _LEADING_DOT.sub(b"..", normalized) + b".\r\n", len(normalized)
    return normalized + b".\r\n", len(normalized)


def _reply_status(code: int, text: str) -> str:
    cls = code // 100
    m = _ENHANCED.match(text)
    if m:
        return f"{cls}.{m.group(2)}.{m.group(3)}"
    return f"{cls}.0.0"


def _flatten(text: str) -> str:
    return " ".join(line.strip() for line in text.split("\n")).strip()


class _Session:
    """One live SMTP connection."""

    def __init__(self, target: _Target, created: float):
        self.target = target
        self.smtp: aiosmtplib.SMTP | None = None
        self.features: dict[str, str] = {}
        self.tls = False
        self.created = created
        self.broken = False  # an I/O error or timeout happened: no QUIT, no reuse
        self.rset_pending = False  # reused: RSET leads the next transaction's pipelined group
        self.reused = False  # taken from the connection cache (not opened for this delivery)

    @property
    def connected(self) -> bool:
        return not self.broken and self.smtp is not None and self.smtp.is_connected

    @property
    def size_limit(self) -> int:
        value = self.features.get("size", "").strip()
        return int(value) if value.isdigit() else 0


class _Stale(Exception):
    """A connection taken from the cache turned out unusable before any of
    the message was sent (its pipelined RSET failed, or MAIL got a 421):
    the delivery starts over on another connection (``fresh``: a new one,
    not another cached one, whose server would likely answer the same)."""

    def __init__(self, fresh: bool = False):
        super().__init__()
        self.fresh = fresh


CACHE_PER_DESTINATION = 64  # idle connections kept per destination (above the default concurrency limit 20)


@dataclass
class _CacheEntry:
    session: _Session
    stored: float
    timer: asyncio.TimerHandle | None = None


_STAGES = {
    "greeting": "receiving the initial server greeting",
    "ehlo": "performing the EHLO handshake",
    "lhlo": "performing the LHLO handshake",
    "helo": "performing the HELO handshake",
    "starttls": "receiving the STARTTLS response",
    "mail": "sending MAIL FROM",
    "rcpt": "sending RCPT TO",
    "data": "sending DATA command",
    "body": "sending message body",
    "dot": "sending end of data -- message may be sent more than once",
    "rset": "sending RSET",
}
# The command a reply answers, per stage (None: "refused to talk to me").
_COMMANDS = {
    "starttls": "STARTTLS",
    "mail": "MAIL FROM",
    "rcpt": "RCPT TO",
    "data": "DATA",
    "body": "end of DATA",
    "dot": "end of DATA",
    "rset": "RSET",
}


_MAX_REPLY_LINE = 8192
_MAX_REPLY = _MAX_REPLY_LINE * 4
_MAX_QUEUED_REPLIES = 4096  # replies read ahead of the client (see _ReplyCollector._parse)
_MAX_QUEUED_BYTES = 1 << 20  # and their text (4096 replies of _MAX_REPLY bytes would be 128 MiB)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _ReplyCollector(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol for the whole mail transaction
    (MAIL FROM up to the reply to the final dot): buffers and parses every
    reply that arrives, in order, and hands them out one at a time, so that
    several commands may be answered by replies in one segment (ESMTP
    PIPELINING, RFC 2920) and several replies may answer one command (LMTP
    end of data, RFC 2033).  aiosmtplib reads exactly one reply per command
    and drops anything else.  Flow control and ``connection_lost`` are
    forwarded to the aiosmtplib protocol so that its state (and the
    client's) stays consistent."""

    def __init__(self, inner: asyncio.BaseProtocol):
        self.inner = inner
        self.buffer = bytearray()
        self.replies: deque[SMTPResponse] = deque()
        self.queued_bytes = 0  # text of the replies in ``replies``
        self.error: BaseException | None = None  # malformed reply: fatal
        self.closed: BaseException | None = None  # EOF or connection lost
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.buffer.extend(data)
        try:
            self._parse()
        except aiosmtplib.SMTPResponseException as exc:
            self.error = exc
            self.buffer.clear()  # nothing more is read from this connection
        if self.replies or self.error is not None:
            self._wake()

    def eof_received(self) -> bool:
        self._close(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._close(error)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # consumer side

    @property
    def leftover(self) -> bool:
        """Data beyond the replies taken so far (a protocol violation)."""
        return bool(self.replies or self.buffer or self.error is not None)

    async def next_reply(self, timeout: float | None) -> SMTPResponse:
        """The next complete reply, waiting at most ``timeout`` seconds for
        all of it (raises :class:`TimeoutError`); a reply that is already
        buffered is returned without suspending."""
        if self.replies:
            return self._take()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.replies:
            if self.error is not None:
                raise self.error
            if self.closed is not None:
                raise self.closed
            waiter = self._waiter = loop.create_future()
            timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._take()

    def _take(self) -> SMTPResponse:
        reply = self.replies.popleft()
        self.queued_bytes -= len(reply.message)
        return reply

    # internals

    def _close(self, error: BaseException) -> None:
        if self.closed is None:
            self.closed = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> None:
        """Move every complete reply from the buffer to ``replies``."""
        while True:
            offset = 0
            code = -1
            lines: list[bytes] = []
            while True:
                end = self.buffer.find(b"\n", offset)
                if end < 0:
                    if len(self.buffer) > _MAX_REPLY or len(self.buffer) - offset > _MAX_REPLY_LINE:
                        raise aiosmtplib.SMTPResponseException(-1, "Response too long")
                    return  # incomplete
                line = bytes(self.buffer[offset : end + 1])
                if len(line) > _MAX_REPLY_LINE:
                    raise aiosmtplib.SMTPResponseException(-1, "Response too long")
                head = line[:3]
                if not (head.isdigit() and line[3:4] in (b" ", b"-", b"\r", b"\n")):
                    text = line.decode("utf-8", "replace").strip()
                    raise aiosmtplib.SMTPResponseException(
                        -1, f"Malformed SMTP response line: {text}"
                    )
                code = int(head)
                lines.append(line[4:].strip(b" \t\r\n"))
                offset = end + 1
                if line[3:4] != b"-":
                    break
            del self.buffer[:offset]
            message = b"\n".join(lines).decode("utf-8", "surrogateescape")
            if len(self.replies) >= _MAX_QUEUED_REPLIES or self.queued_bytes + len(message) > _MAX_QUEUED_BYTES:
                # Far more replies than commands outstanding (at most the
                # recipients of one delivery plus MAIL, DATA and the dot):
                # a server flooding us.  Stop buffering them.
                raise aiosmtplib.SMTPResponseException(-1, "Too many replies: more replies than commands sent")
            self.queued_bytes += len(message)
            self.replies.append(SMTPResponse(code, message))


# --------------------------------------------------------------------------
# The agent


class SmtpAgent:
    """See the module docstring."""

    name = "smtp"

    def __init__(
        self,
        settings: SmtpClientSettings,
        resolver: Resolver,
        *,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if (
            not settings.myhostname
            or not settings.myhostname.isascii()
            or any(c.isspace() or ord(c) < 32 for c in settings.myhostname)
        ):
            raise ValueError(f"bad myhostname for EHLO: {settings.myhostname!r}")
        if settings.smtp_tls_security_level not in TLS_LEVELS:
            raise ValueError(
                f"bad smtp_tls_security_level: {settings.smtp_tls_security_level!r}"
            )
        self.settings = settings
        self.name = "lmtp" if settings.lmtp else "smtp"
        self.resolver = resolver
        self._log = log or _logger.info
        self._clock = clock
        self._own = {_canon_ip(a) for a in settings.own_addresses}
        self._tls_context = _make_tls_context(
            settings.smtp_tls_security_level, settings.smtp_tls_CAfile
        )
        # Idle connections per destination, most recently used last (Postfix
        # scache holds as many per destination as were in use: one per
        # concurrent delivery, bounded here by CACHE_PER_DESTINATION).
        self._cache: dict[str, list[_CacheEntry]] = {}

    # -- public --------------------------------------------------------

    async def deliver(self, request: DeliveryRequest) -> list[Outcome]:
        if not request.recipients:
            return []
        try:
            return await self._deliver(request)
        except Exception as exc:  # a bug: never lose mail over it
            _logger.exception("%s: %s delivery failed unexpectedly", request.queue_id, self.name)
            text = f"internal error in the {self.name} delivery agent: {type(exc).__name__}: {exc}"
            return [TemporaryFailure("4.3.0", text, "none") for _ in request.recipients]

    async def close(self) -> None:
        entries = [entry for stack in self._cache.values() for entry in stack]
        self._cache.clear()
        for entry in entries:
            if entry.timer is not None:
                entry.timer.cancel()
            self._dispose(entry.session)

    # -- delivery ------------------------------------------------------

    async def _deliver(self, request: DeliveryRequest) -> list[Outcome]:
        s = self.settings
        qid = request.queue_id
        batch = _Batch(len(request.recipients), request.queue_id)

        if _BAD_ADDR.search(request.sender):
            batch.fail(
                batch.pending,
                _Failure("5.1.7", f"bad sender address syntax: <{request.sender!r}>"),
            )
            return batch.finish()
        for i, rcpt in enumerate(request.recipients):
            if _BAD_ADDR.search(rcpt.address) or not rcpt.address:
                batch.settle(
                    i,
                    PermanentFailure(
                        "5.1.3", f"bad recipient address syntax: <{rcpt.address!r}>", "none"
                    ),
                )
        if not batch.pending:
            return batch.finish()

        nexthop = request.nexthop
        if not nexthop.strip():
            first = request.recipients[batch.pending[0]].address
            nexthop = first.rpartition("@")[2]
        try:
            if s.lmtp:
                dest = parse_lmtp_nexthop(nexthop, s.lmtp_tcp_port)
            else:
                dest = parse_nexthop(nexthop, s.smtp_tcp_port)
        except ValueError as exc:
            batch.fail(batch.pending, _Failure("4.3.5", f"server configuration error: {exc}"))
            return batch.finish()

        try:
            targets = await self._targets(dest)
        except DnsError as exc:
            batch.fail(batch.pending, _Failure(exc.status, exc.text))
            return batch.finish()
        except _Failure as failure:
            batch.fail(batch.pending, failure)
            return batch.finish()

        wire, size = wire_message(request.message)
        message = _Message(wire, size)
        session, queue, sessions = await self._start_from_cache(dest.key, request, targets)
        while batch.pending:
            if session is None:
                if not queue or sessions >= max(1, s.smtp_mx_session_limit):
                    break
                target, tls_ok = queue.popleft()
                try:
                    session = await self._open(target, request, dest, tls_ok)
                except _Failure as failure:
                    if failure.retry_plain:
                        self._log(f"{qid}: {failure.text}; trying {target.relay} without TLS")
                        queue.appendleft((target, False))
                        continue
                    self._log(f"{qid}: {failure.text}")
                    batch.fail(batch.pending, failure)
                    continue
                sessions += 1
            reusable = False
            stale: _Stale | None = None
            try:
                reusable = await self._transaction(session, request, message, batch)
            except _Stale as exc:
                stale = exc
            finally:
                if reusable:
                    self._store(dest.key, session)
                else:
                    self._dispose(session)
            session = None
            if stale is not None and stale.fresh:
                # A 421 to MAIL on a reused connection (a per-connection or
                # rate limit): every cached connection to this server would
                # likely say the same; go on over new connections only, once.
                queue, sessions = deque((t, True) for t in targets), 0
            elif stale is not None:  # as if _take_cached had found it stale: start over
                session, queue, sessions = await self._start_from_cache(dest.key, request, targets)
        return batch.finish()

    async def _start_from_cache(
        self, key: str, request: DeliveryRequest, targets: list[_Target]
    ) -> tuple[_Session | None, deque[tuple[_Target, bool]], int]:
        """A cached connection to start with (or None), the targets left to
        try (the cached one's address not again), and the sessions used."""
        queue: deque[tuple[_Target, bool]] = deque((t, True) for t in targets)
        session = await self._take_cached(key, request)
        if session is None:
            return None, queue, 0
        here = (session.target.ip, session.target.port)
        return session, deque(q for q in queue if (q[0].ip, q[0].port) != here), 1

    async def _targets(self, dest: Destination) -> list[_Target]:
        s = self.settings
        limit = s.smtp_mx_address_limit if s.smtp_mx_address_limit > 0 else 1 << 30
        targets: list[_Target] = []
        if dest.path:
            path = dest.path
            if s.lmtp_unix_base and not os.path.isabs(path):
                path = os.path.join(s.lmtp_unix_base, path)
            return [_Target(dest.host, path, 0, 0, True, unix=True)]
        if dest.mx_lookup:
            hosts = await self.resolver.mx_hosts(dest.host, s.smtp_mx_address_limit)
            best = hosts[0].preference if hosts else 0
            for h in hosts:
                for ip in h.addresses:
                    targets.append(
                        _Target(h.hostname, ip, dest.port, h.preference, h.preference == best)
                    )
        elif _is_ip(dest.host):
            targets.append(_Target(dest.host, dest.host, dest.port, 0, True))
        else:
            for ip in await self.resolver.addresses(dest.host):
                targets.append(_Target(dest.host, ip, dest.port, 0, True))
        targets = targets[:limit]

        # Loop detection (Postfix smtp_find_self/smtp_truncate_self), on the
        # SMTP port only: another port is another service (e.g. a filter).
        # Never for LMTP (Postfix: loop detection is an smtp(8) feature).
        if not s.lmtp and dest.port == s.smtp_tcp_port:
            me = s.myhostname.rstrip(".").lower()
            self_pref = next(
                (
                    t.pref
                    for t in targets
                    if _canon_ip(t.ip) in self._own or t.host.rstrip(".").lower() == me
                ),
                None,
            )
            if self_pref is not None:
                targets = [t for t in targets if t.pref < self_pref]
                if not targets:
                    raise _Failure("5.4.6", f"mail for {dest.host} loops back to myself")
        return targets

    # -- one connection ------------------------------------------------

    async def _open(
        self, target: _Target, request: DeliveryRequest, dest: Destination, tls_ok: bool
    ) -> _Session:
        """Connect, read the greeting, EHLO, STARTTLS, EHLO.  Raises _Failure."""
        s = self.settings
        loop = asyncio.get_running_loop()
        session = _Session(target, self._clock())
        if target.unix:
            family, address = socket.AF_UNIX, target.ip
        else:
            family = socket.AF_INET6 if ":" in target.ip else socket.AF_INET
            address = (target.ip, target.port)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await self._io(
                session,
                "connect",
                asyncio.wait_for(loop.sock_connect(sock, address), s.smtp_connect_timeout),
            )
        except BaseException:
            sock.close()
            raise
        # From here on the socket belongs to aiosmtplib's transport.
        session.smtp = aiosmtplib.SMTP(
            sock=sock,
            local_hostname=s.myhostname,
            timeout=s.smtp_helo_timeout,
            use_tls=False,
            start_tls=False,
            validate_certs=False,
        )
        try:
            try:
                await self._io(session, "greeting", session.smtp.connect(timeout=s.smtp_helo_timeout))
            except _Failure as failure:
                if failure.reply is not None and failure.status.startswith("5"):
                    if s.smtp_skip_5xx_greeting:
                        failure.status = "4" + failure.status[1:]
                    else:
                        failure.soft_non_final = True
                raise
            await self._ehlo(session, dest)
            if (
                self._tls_context is not None
                and tls_ok
                and "starttls" in session.features
            ):
                await self._starttls(session)
                await self._ehlo(session, dest)
            elif s.smtp_tls_security_level in _TLS_REQUIRED:
                raise _Failure(
                    "4.7.5",
                    f"TLS is required, but was not offered by host {target.namaddr}",
                    target.relay,
                )
            if request.smtputf8 and "smtputf8" not in session.features:
                raise _Failure(
                    "5.6.7",
                    f"SMTPUTF8 is required, but was not offered by host {target.namaddr}",
                    target.relay,
                    soft_non_final=True,
                )
        except BaseException:
            self._dispose(session)
            raise
        return session

    async def _ehlo(self, session: _Session, dest: Destination) -> None:
        s = self.settings
        smtp = session.smtp
        assert smtp is not None
        name = s.myhostname.encode("ascii")
        if s.lmtp:  # LHLO, no HELO fallback, no loop check
            resp = await self._io(
                session, "lhlo", smtp.execute_command(b"LHLO", name, timeout=s.smtp_helo_timeout)
            )
            if not 200 <= resp.code < 300:
                raise self._reply_failure(session, resp, None)
            smtp.last_ehlo_response = resp  # parses the extensions
            session.features = dict(smtp.esmtp_extensions)
            return
        resp = await self._io(
            session, "ehlo", smtp.execute_command(b"EHLO", name, timeout=s.smtp_helo_timeout)
        )
        if 200 <= resp.code < 300:
            smtp.last_ehlo_response = resp  # parses the extensions
            session.features = dict(smtp.esmtp_extensions)
        elif resp.code == 421:
            raise self._reply_failure(session, resp, None)
        else:
            resp = await self._io(
                session, "helo", smtp.execute_command(b"HELO", name, timeout=s.smtp_helo_timeout)
            )
            if not 200 <= resp.code < 300:
                raise self._reply_failure(session, resp, None)
            smtp.last_helo_response = resp
            session.features = {}
        # Talking to ourselves?  (Postfix: "host replied to HELO/EHLO with my
        # own hostname"), checked on the SMTP port only.
        words = resp.message.split()
        if (
            words
            and dest.port == s.smtp_tcp_port
            and words[0].rstrip(".").lower() == s.myhostname.rstrip(".").lower()
        ):
            status = "5.4.6" if session.target.best else "4.4.6"
            raise _Failure(
                status, f"mail for {dest.host} loops back to myself", session.target.relay
            )

    async def _starttls(self, session: _Session) -> None:
        s = self.settings
        target = session.target
        smtp = session.smtp
        assert smtp is not None and self._tls_context is not None
        required = s.smtp_tls_security_level in _TLS_REQUIRED
        server_hostname = target.host
        if _is_ip(server_hostname) and s.smtp_tls_security_level != "secure":
            server_hostname = None
        try:
            await self._io(
                session,
                "starttls",
                smtp.starttls(
                    server_hostname=server_hostname,
                    tls_context=self._tls_context,
                    timeout=s.smtp_helo_timeout,
                ),
            )
        except _Failure as failure:
            if failure.reply is not None:  # STARTTLS refused with a reply
                if failure.reply.code == 421:
                    raise
                if required:
                    raise _Failure(
                        failure.status,
                        f"TLS is required, but host {target.namaddr} refused to start "
                        f"TLS: {failure.reply.code} {_flatten(failure.reply.message)}",
                        target.relay,
                    ) from None
                self._log(
                    f"host {target.namaddr} refused to start TLS: "
                    f"{failure.reply.code} {_flatten(failure.reply.message)}"
                )
                return  # continue in plaintext
            failure.retry_plain = not required
            raise
        session.tls = True
        session.features = {}

    async def _transaction(
        self, session: _Session, request: DeliveryRequest, message: _Message, batch: _Batch
    ) -> bool:
        """One mail transaction for the pending recipients.  Records outcomes
        in ``batch``; returns whether the connection may be reused.

        With PIPELINING (announced in the EHLO reply; always for LMTP, RFC
        2033) MAIL FROM, every RCPT TO and DATA go out in one write and the
        replies are then read in order; otherwise each command waits for its
        reply.  Either way every reply of the transaction is read through one
        :class:`_ReplyCollector`, with the timeout of its own stage."""
        target = session.target
        smtp = session.smtp
        assert smtp is not None
        todo = batch.pending
        marked: set[int] = set()  # recipients this session already decided

        def unmarked() -> list[int]:
            return [i for i in todo if i not in marked]

        try:
            limit = session.size_limit
            if limit and message.size > limit:
                batch.fail(
                    todo,
                    _Failure(
                        "5.3.4",
                        f"message size {message.size} exceeds size limit {limit} "
                        f"of server {target.namaddr}",
                        target.relay,
                    ),
                )
                return True

            mail = b"MAIL FROM:<" + request.sender.encode("utf-8") + b">"
            if "size" in session.features:
                mail += b" SIZE=%d" % message.size
            if request.body_8bit:
                if "8bitmime" in session.features:
                    mail += b" BODY=8BITMIME"
                else:
                    self._log(
                        f"{request.queue_id}: host {target.namaddr} does not announce "
                        "8BITMIME support; sending the 8-bit body as is"
                    )
            if request.smtputf8:
                mail += b" SMTPUTF8"
            mail += b"\r\n"
            rcpts = [
                b"RCPT TO:<" + request.recipients[i].address.encode("utf-8") + b">\r\n"
                for i in todo
            ]

            protocol = smtp.protocol
            transport = protocol.transport if protocol is not None else None
            if protocol is None or transport is None or transport.is_closing():
                session.broken = True
                raise _Failure(
                    "4.4.2",
                    f"lost connection with {target.namaddr} while {_STAGES['mail']}",
                    target.relay,
                )
            collector = _ReplyCollector(protocol)
            # No await between installing the collector and the first write:
            # every reply byte goes to the collector.
            transport.set_protocol(collector)
            try:
                reusable = await self._exchange(
                    session, protocol, collector, mail, rcpts, message, todo, batch, marked
                )
            finally:
                transport.set_protocol(protocol)
            if reusable and collector.leftover:  # out of step: never reuse
                self._log(f"warning: {request.queue_id}: host {target.namaddr} sent more replies than commands")
                session.broken = True
                return False
            return reusable
        except _Failure as failure:
            self._log(f"{request.queue_id}: {failure.text}")
            batch.fail(unmarked(), failure)
            return False

    async def _exchange(
        self,
        session: _Session,
        protocol,
        collector: _ReplyCollector,
        mail: bytes,
        rcpts: list[bytes],
        message: _Message,
        todo: list[int],
        batch: _Batch,
        marked: set[int],
    ) -> bool:
        """The commands and replies of :meth:`_transaction`, with the
        collector installed.  Raises :class:`_Failure` for a failure that
        applies to every recipient not yet in ``marked``."""
        s = self.settings
        target = session.target
        pipelining = s.lmtp or "pipelining" in session.features
        io = self._io
        send = self._send
        read = collector.next_reply

        if session.rset_pending:  # a reused connection (see _reuse): RSET leads the group
            session.rset_pending = False
            try:
                send(session, "rset", protocol, b"RSET\r\n" + mail + b"".join(rcpts) + b"DATA\r\n")
                resp = await io(session, "rset", read(s.smtp_rset_timeout))
            except _Failure:
                resp = None
            if resp is None or not 200 <= resp.code < 300:
                session.broken = True  # (closed: a 354 to the DATA in the group gets no content)
                raise _Stale
        elif pipelining:  # RFC 2920: the whole group in one write
            send(session, "mail", protocol, mail + b"".join(rcpts) + b"DATA\r\n")
        else:
            send(session, "mail", protocol, mail)
        resp = await io(session, "mail", read(s.smtp_mail_timeout))
        if resp.code == 421 and session.reused:
            # A server that takes only so many messages per connection (Exim's
            # smtp_accept_max_per_connection): nothing of this message was
            # sent, and a new connection takes it; not a reason to defer.
            self._log(
                f"{batch.queue_id}: host {target.namaddr} refused another message on a cached "
                f"connection: {resp.code} {_flatten(resp.message)}; using another connection"
            )
            session.broken = True
            raise _Stale(fresh=True)
        mail_ok = 200 <= resp.code < 300
        if not mail_ok:
            batch.fail(todo, self._reply_failure(session, resp, "MAIL FROM"))
            marked.update(todo)
            if resp.code == 421:  # the server is going away: no more replies
                session.broken = True
                return False
            if not pipelining:
                return False
            # Read (and ignore) the replies to the rest of the group.

        accepted: list[int] = []
        for n, i in enumerate(todo):
            if not pipelining:
                send(session, "rcpt", protocol, rcpts[n])
            resp = await io(session, "rcpt", read(s.smtp_rcpt_timeout))
            if resp.code == 421:
                session.broken = True
                if not mail_ok:
                    return False
                raise self._reply_failure(session, resp, "RCPT TO")
            if not mail_ok:
                continue
            if 200 <= resp.code < 300:
                accepted.append(i)
            else:
                batch.fail([i], self._reply_failure(session, resp, "RCPT TO"))
                marked.add(i)

        if not pipelining and not accepted:
            return await self._rset(session, protocol, collector)
        if not pipelining:
            send(session, "data", protocol, b"DATA\r\n")
        resp = await io(session, "data", read(s.smtp_data_init_timeout))
        if not accepted:
            # Nothing to send: the server should have refused DATA (RFC 2920
            # section 3.1: 503/554).  A broken one that says 354 gets an empty
            # message, which delivers nothing.
            if resp.code == 421:
                session.broken = True
                return False
            if resp.code == 354:
                send(session, "dot", protocol, b".\r\n")
                if s.lmtp:
                    # One reply per accepted recipient would be none at all;
                    # what this server sends next is anyone's guess: close.
                    session.broken = True
                    return False
                resp = await io(session, "dot", read(s.smtp_data_done_timeout))
                if resp.code == 421:
                    session.broken = True
                    return False
            if not mail_ok:
                return False
            return await self._rset(session, protocol, collector)
        if resp.code != 354:
            batch.fail(
                [i for i in todo if i not in marked],
                self._reply_failure(session, resp, "DATA"),
            )
            if resp.code == 421:
                session.broken = True
            return False

        tail = await io(session, "body", self._send_body(protocol, message.wire))
        if s.lmtp:
            return await self._lmtp_replies(session, protocol, collector, tail, accepted, batch,
                                            marked)
        send(session, "dot", protocol, tail)
        resp = await io(session, "dot", read(s.smtp_data_done_timeout))
        unmarked = [i for i in todo if i not in marked]
        if 200 <= resp.code < 300:
            delivered = Delivered(
                _reply_status(resp.code, resp.message),
                f"{resp.code} {_flatten(resp.message)}".strip(),
                target.relay,
            )
            for i in unmarked:
                batch.settle(i, delivered)
            return True
        batch.fail(unmarked, self._reply_failure(session, resp, "end of DATA"))
        return resp.code != 421 and session.connected

    async def _rset(self, session: _Session, protocol, collector: _ReplyCollector) -> bool:
        """RSET after a transaction that sent no message; reusable on 2xx."""
        self._send(session, "rset", protocol, b"RSET\r\n")
        resp = await self._io(
            session, "rset", collector.next_reply(self.settings.smtp_rset_timeout)
        )
        if resp.code == 421:
            session.broken = True
        return 200 <= resp.code < 300

    def _send(self, session: _Session, stage: str, protocol, data: bytes) -> None:
        """Write to the server; a failure (connection gone) becomes a
        :class:`_Failure` for ``stage``."""
        try:
            protocol.write(data)
        except Exception as exc:
            session.broken = True
            raise self._translate(exc, session, stage) from None

    async def _lmtp_replies(
        self,
        session: _Session,
        protocol,
        collector: _ReplyCollector,
        tail: bytes,
        accepted: list[int],
        batch: _Batch,
        marked: set[int],
    ) -> bool:
        """Send the end of the message and read one reply per accepted
        recipient, in RCPT order (RFC 2033 section 4.2).  Each answered
        recipient is settled and added to ``marked``; a lost connection or
        timeout raises :class:`_Failure` for the caller to apply to the
        unanswered ones.  Returns whether the connection may be reused."""
        target = session.target
        self._send(session, "dot", protocol, tail)
        for n, i in enumerate(accepted):
            resp = await self._io(
                session, "dot", collector.next_reply(self.settings.smtp_data_done_timeout)
            )
            if 200 <= resp.code < 300:
                batch.settle(
                    i,
                    Delivered(
                        _reply_status(resp.code, resp.message),
                        f"{resp.code} {_flatten(resp.message)}".strip(),
                        target.relay,
                    ),
                )
                marked.add(i)
                continue
            failure = self._reply_failure(session, resp, "end of DATA")
            if resp.code == 421:  # the server is going away: no more replies
                rest = accepted[n:]
                batch.fail(rest, failure)
                marked.update(rest)
                session.broken = True
                return False
            batch.fail([i], failure)
            marked.add(i)
        if collector.leftover:
            self._log(
                f"warning: {batch.queue_id}: host {target.namaddr} sent more replies than recipients after end of DATA"
            )
            session.broken = True
            return False
        return session.connected

    async def _send_body(self, protocol, wire: bytes) -> bytes:
        """Write all but the last chunk, honouring smtp_data_xfer_timeout per
        chunk; return the rest (written together with the reply wait)."""
        timeout = self.settings.smtp_data_xfer_timeout
        pos = 0
        while len(wire) - pos > _CHUNK:
            protocol.write(wire[pos : pos + _CHUNK])
            pos += _CHUNK
            drain = getattr(protocol, "_drain_helper", None)  # flow control
            if drain is not None:
                await asyncio.wait_for(drain(), timeout)
        return wire[pos:]

    # -- connection cache ----------------------------------------------

    async def _take_cached(self, key: str, request: DeliveryRequest) -> _Session | None:
        unsuitable: list[_CacheEntry] = []  # fine connections, but not for this message
        try:
            while True:
                stack = self._cache.get(key)
                if not stack:
                    return None
                entry = stack.pop()  # the most recently used: the least likely to have timed out
                if not stack:
                    del self._cache[key]
                if request.smtputf8 and "smtputf8" not in entry.session.features:
                    unsuitable.append(entry)
                    continue
                session = await self._reuse(entry)
                if session is not None:
                    return session
        finally:
            if unsuitable:
                self._cache.setdefault(key, [])[:0] = unsuitable

    async def _reuse(self, entry: _CacheEntry) -> _Session | None:
        """``entry``'s connection after an RSET (or with one pending, sent
        with the next transaction: PIPELINING), or None when it is stale or
        expired (the caller then tries the next cached one)."""
        if entry.timer is not None:
            entry.timer.cancel()
        session = entry.session
        s = self.settings
        now = self._clock()
        if (
            not session.connected
            or now - entry.stored > s.smtp_connection_cache_time_limit
            or now - session.created >= s.smtp_connection_reuse_time_limit
        ):
            self._dispose(session)
            return None
        assert session.smtp is not None
        protocol = session.smtp.protocol
        transport = protocol.transport if protocol is not None else None
        if protocol is None or transport is None or transport.is_closing():
            self._dispose(session)
            return None
        session.reused = True
        if s.lmtp or "pipelining" in session.features:
            session.rset_pending = True  # sent with the next transaction's group (_exchange)
            return session
        # The RSET read by a reply collector, as the transaction's commands
        # are (cheaper than aiosmtplib's command path); same round trip.
        collector = _ReplyCollector(protocol)
        transport.set_protocol(collector)
        try:
            ok = await self._rset(session, protocol, collector)
            if collector.leftover:  # out of step: never reuse
                ok = False
        except _Failure:
            ok = False
        except BaseException:
            transport.set_protocol(protocol)
            self._dispose(session)
            raise
        transport.set_protocol(protocol)
        if not ok:
            self._dispose(session)
            return None
        return session

    def _store(self, key: str, session: _Session) -> None:
        s = self.settings
        now = self._clock()
        if (
            not session.connected
            or s.smtp_connection_cache_time_limit <= 0
            or now - session.created >= s.smtp_connection_reuse_time_limit
        ):
            self._dispose(session)
            return
        stack = self._cache.setdefault(key, [])
        if len(stack) >= CACHE_PER_DESTINATION:
            old = stack.pop(0)
            if old.timer is not None:
                old.timer.cancel()
            self._dispose(old.session)
        entry = _CacheEntry(session, now)
        entry.timer = asyncio.get_running_loop().call_later(
            s.smtp_connection_cache_time_limit, self._expire, key, entry
        )
        stack.append(entry)

    def _expire(self, key: str, entry: _CacheEntry) -> None:
        stack = self._cache.get(key)
        if stack is not None and any(e is entry for e in stack):
            stack[:] = [e for e in stack if e is not entry]
            if not stack:
                del self._cache[key]
        self._dispose(entry.session)

    def _dispose(self, session: _Session) -> None:
        """Close the connection; first send QUIT (without waiting for the
        reply: Postfix smtp_skip_quit_response) unless the session is broken
        (I/O error or timeout, possibly in the middle of DATA).  Whatever
        the server has not read by then (a message it stopped taking, the
        QUIT to a server that stopped reading) is dropped with the
        connection, not kept until the server reads it
        (:func:`mailserver.outbox.close`)."""
        smtp = session.smtp
        if smtp is None:
            return
        if session.connected and smtp.protocol is not None:
            try:
                smtp.protocol.write(b"QUIT\r\n")
            except Exception:
                pass
        transport = smtp.transport
        smtp.close()
        if transport is not None and (unsent := close_transport(transport)) is not None:
            cut_transport(unsent)

    # -- error translation ---------------------------------------------

    async def _io(self, session: _Session, stage: str, awaitable: Awaitable[_T]) -> _T:
        try:
            return await awaitable
        except asyncio.CancelledError:
            raise
        except _Failure:
            raise
        except Exception as exc:
            failure = self._translate(exc, session, stage)
            if failure.reply is None:
                session.broken = True
            raise failure from None

    def _translate(self, exc: BaseException, session: _Session, stage: str) -> _Failure:
        """THE translation point for aiosmtplib / ssl / socket exceptions."""
        t = session.target
        if stage == "connect":
            if isinstance(exc, TimeoutError):
                why = "Connection timed out"
            elif isinstance(exc, OSError) and exc.errno:
                why = os.strerror(exc.errno)
            else:
                why = str(exc) or type(exc).__name__
            return _Failure("4.4.1", f"connect to {t.relay}: {why}")
        desc = _STAGES.get(stage, stage)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            if exc.code < 100:  # aiosmtplib: malformed or oversized reply
                return _Failure(
                    "4.5.0",
                    f"host {t.namaddr} sent a malformed reply while {desc}: {exc.message}",
                    t.relay,
                )
            command = _COMMANDS.get(stage)
            return self._reply_failure(session, SMTPResponse(exc.code, exc.message), command)
        if stage == "starttls":
            if isinstance(exc, ssl.SSLCertVerificationError):
                why = f"Server certificate not verified: {exc.verify_message or exc}"
            elif isinstance(exc, TimeoutError):
                why = "Cannot start TLS: handshake timeout"
            else:
                why = f"Cannot start TLS: handshake failure ({exc or type(exc).__name__})"
            return _Failure("4.7.5", f"{why} (host {t.namaddr})", t.relay, tls=True)
        if isinstance(exc, TimeoutError):  # includes aiosmtplib.SMTPTimeoutError
            return _Failure(
                "4.4.2", f"conversation with {t.namaddr} timed out while {desc}", t.relay
            )
        if isinstance(exc, (aiosmtplib.SMTPServerDisconnected, OSError)):
            return _Failure("4.4.2", f"lost connection with {t.namaddr} while {desc}", t.relay)
        if isinstance(exc, aiosmtplib.SMTPException):
            return _Failure(
                "4.4.2", f"error talking to {t.namaddr} while {desc}: {exc}", t.relay
            )
        return _Failure(
            "4.3.0",
            f"unexpected error while {desc} with host {t.namaddr}: "
            f"{type(exc).__name__}: {exc}",
            t.relay,
        )

    def _reply_failure(
        self, session: _Session, resp: SMTPResponse, command: str | None
    ) -> _Failure:
        """A failure from a server reply; ``command=None`` means the
        greeting/HELO handshake ("refused to talk to me")."""
        t = session.target
        text = f"{resp.code} {_flatten(resp.message)}".strip()
        if command is None:
            message = f"host {t.namaddr} refused to talk to me: {text}"
        else:
            message = f"host {t.namaddr} said: {text} (in reply to {command} command)"
        if resp.code // 100 in (4, 5):
            status = _reply_status(resp.code, resp.message)
        else:  # e.g. 250 where 354 was expected
            status = "4.5.0"
            message = "Protocol error: " + message
        return _Failure(status, message, t.relay, reply=resp)


def _canon_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        return text.strip().lower()


def _make_tls_context(level: str, cafile: str | None) -> ssl.SSLContext | None:
    if level == "none":
        return None
    if level in ("may", "encrypt"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = level == "secure"
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
