"""Per-client connection and rate limits (Postfix anvil(8), in process).

One :class:`Anvil` counts, per client IP address:

* concurrent connections (``smtpd_client_connection_count_limit``),
* connection attempts, MAIL commands, RCPT commands and AUTH commands per
  ``anvil_rate_time_unit`` (``smtpd_client_connection_rate_limit``,
  ``smtpd_client_message_rate_limit``, ``smtpd_client_recipient_rate_limit``,
  ``smtpd_client_auth_rate_limit``),
* recent authentication failures, which earn a growing delay before the
  ``535`` reply (a tar pit for password guessing that, unlike a per-session
  counter, follows the client across connections).

Contract:

* The event methods return the :class:`~mailserver.reply.Reply` to send when
  a limit is exceeded (Postfix's texts from smtpd.c), else None.  A limit of
  0 means unlimited.  Clients for which ``is_exempt(ip)`` holds
  (``smtpd_client_event_limit_exceptions``, default ``$mynetworks``) are
  neither counted nor limited.
* Rates use Postfix's fixed windows: a client's window opens at its first
  event and all its rate counters restart once ``anvil_rate_time_unit`` has
  passed.  Every attempt counts, refused ones included, as in anvil(8): a
  client that keeps hammering stays refused until it pauses.
* ``connect`` counts the connection only when it accepts it: call
  ``disconnect`` exactly once for each ``connect`` that returned None.
* Pure and synchronous: time comes from the injected monotonic ``clock``;
  no I/O, no tasks.  Memory is bounded: a client is forgotten once it has
  no connection and its window and failure record have expired (checked
  lazily, at most once per time unit, oldest first), and the table never
  holds more than ``max_clients`` idle clients.
* Postfix keeps these counters per service (``smtp``, ``submission``);
  use one Anvil per listener for the same accounting and for per-service
  limit overrides.  :meth:`Anvil.reconfigure` applies new limits on reload
  without losing the counts.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .config import parse_network
from .reply import Reply

__all__ = ["Anvil", "AnvilLimits", "ClientStats", "network_matcher"]


def network_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """``is_exempt`` for a list of networks (``smtpd_client_event_limit_exceptions``,
    e.g. ``127.0.0.0/8, [::1]/128, 192.0.2.7``).  IPv4-mapped IPv6 clients
    match IPv4 networks; an address that cannot be parsed matches nothing.
    Raises ValueError for an entry that is not a network (Postfix also
    allows host names and tables there; this does not)."""
    networks = [parse_network(pattern) for pattern in patterns]
    seen: dict[str, bool] = {}  # answers per address (asked on every connection, message and recipient)

    def matches(ip: str) -> bool:
        known = seen.get(ip)
        if known is not None:
            return known
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        answer = any(addr in net for net in networks if net.version == addr.version)
        if len(seen) >= 4096:
            seen.clear()
        seen[ip] = answer
        return answer

    return matches


@dataclass(frozen=True, slots=True)
class AnvilLimits:
    """The limits (0 = unlimited) and the rate window, in seconds."""

    connection_count: int = 50
    connection_rate: int = 0
    message_rate: int = 0
    recipient_rate: int = 0
    auth_rate: int = 0
    rate_time_unit: float = 60.0
    auth_failure_delay_step: float = 0.5
    auth_failure_delay_max: float = 5.0

    @classmethod
    def from_params(cls, params: Any) -> "AnvilLimits":
        """From a :class:`~mailserver.config.Config` or a listener's
        parameter mapping (anything indexable by parameter name)."""
        return cls(
            connection_count=int(params["smtpd_client_connection_count_limit"]),
            connection_rate=int(params["smtpd_client_connection_rate_limit"]),
            message_rate=int(params["smtpd_client_message_rate_limit"]),
            recipient_rate=int(params["smtpd_client_recipient_rate_limit"]),
            auth_rate=int(params["smtpd_client_auth_rate_limit"]),
            rate_time_unit=float(params["anvil_rate_time_unit"]),
        )

    @property
    def any_limit(self) -> bool:
        """Does any limit apply (Postfix talks to anvil only then)?"""
        return any((self.connection_count, self.connection_rate, self.message_rate, self.recipient_rate,
                    self.auth_rate))


@dataclass(frozen=True, slots=True)
class ClientStats:
    """A snapshot of one client's counters (for tests and status output)."""

    connections: int
    connection_rate: int
    message_rate: int
    recipient_rate: int
    auth_rate: int
    auth_failures: int


class _Client:
    __slots__ = ("count", "window_start", "conn_rate", "mail_rate", "rcpt_rate", "auth_rate",
                 "failures", "last_failure", "last_seen")

    def __init__(self, now: float):
        self.count = 0
        self.window_start = now
        self.conn_rate = 0
        self.mail_rate = 0
        self.rcpt_rate = 0
        self.auth_rate = 0
        self.failures = 0
        self.last_failure = 0.0
        self.last_seen = now


class Anvil:
    def __init__(self, limits: AnvilLimits | None = None, *, myhostname: str = "localhost",
                 is_exempt: Callable[[str], bool] | None = None, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] | None = None, service: str = "smtp", max_clients: int = 100_000):
        self.limits = limits or AnvilLimits()
        self.myhostname = myhostname
        self.is_exempt = is_exempt or (lambda ip: False)
        self.clock = clock
        self.log = log
        self.service = service
        self.max_clients = max_clients
        # Ordered by last activity (a touched client moves to the end), so
        # pruning walks from the oldest and stops at the first recent one.
        self._clients: dict[str, _Client] = {}
        self._last_prune = clock()

    def reconfigure(self, limits: AnvilLimits, *, is_exempt: Callable[[str], bool] | None = None,
                    myhostname: str | None = None) -> None:
        """New limits (configuration reload); current counts are kept."""
        self.limits = limits
        if is_exempt is not None:
            self.is_exempt = is_exempt
        if myhostname is not None:
            self.myhostname = myhostname

    # ---------------------------------------------------------------- events
    def connect(self, ip: str, *, client: str | None = None) -> Reply | None:
        """A new connection from ``ip``: the 421 refusal, or None (counted;
        call :meth:`disconnect` when it ends)."""
        if self.is_exempt(ip):
            return None
        entry = self._touch(ip)
        entry.conn_rate += 1
        limits = self.limits
        if limits.connection_count > 0 and entry.count + 1 > limits.connection_count:
            self._warn("Connection concurrency limit exceeded", entry.count + 1, ip, client)
            return self._too_many_connections(ip)
        if limits.connection_rate > 0 and entry.conn_rate > limits.connection_rate:
            self._warn("Connection rate limit exceeded", entry.conn_rate, ip, client)
            return self._too_many_connections(ip)
        entry.count += 1
        return None

    def disconnect(self, ip: str) -> None:
        """An accepted connection from ``ip`` ended."""
        entry = self._clients.get(ip)
        if entry is not None and entry.count > 0:
            entry.count -= 1
            entry.last_seen = self.clock()
            self._clients[ip] = self._clients.pop(ip)  # keep the table ordered by last activity

    def message(self, ip: str, *, client: str | None = None) -> Reply | None:
        """A MAIL command (smtpd_client_message_rate_limit)."""
        if self.limits.message_rate <= 0 or self.is_exempt(ip):
            return None
        entry = self._touch(ip)
        entry.mail_rate += 1
        if entry.mail_rate > self.limits.message_rate:
            self._warn("Message delivery request rate limit exceeded", entry.mail_rate, ip, client)
            return Reply(450, "4.7.1", f"Error: too much mail from {ip}")
        return None

    def recipient(self, ip: str, *, client: str | None = None) -> Reply | None:
        """A RCPT command (smtpd_client_recipient_rate_limit)."""
        if self.limits.recipient_rate <= 0 or self.is_exempt(ip):
            return None
        entry = self._touch(ip)
        entry.rcpt_rate += 1
        if entry.rcpt_rate > self.limits.recipient_rate:
            self._warn("Recipient address rate limit exceeded", entry.rcpt_rate, ip, client)
            return Reply(450, "4.7.1", f"Error: too many recipients from {ip}")
        return None

    def auth(self, ip: str, *, client: str | None = None) -> Reply | None:
        """An AUTH command (smtpd_client_auth_rate_limit)."""
        if self.limits.auth_rate <= 0 or self.is_exempt(ip):
            return None
        entry = self._touch(ip)
        entry.auth_rate += 1
        if entry.auth_rate > self.limits.auth_rate:
            self._warn("AUTH command rate limit exceeded", entry.auth_rate, ip, client)
            return Reply(450, "4.7.1", f"Error: too many AUTH commands from {ip}")
        return None

    def auth_failure(self, ip: str) -> float:
        """Record a failed authentication; returns :meth:`auth_failure_delay`
        — how long to wait before sending the ``535``."""
        if self.is_exempt(ip):
            return 0.0
        entry = self._touch(ip)
        now = entry.last_seen
        self._decay(entry, now)
        entry.failures += 1
        entry.last_failure = now
        return self._delay(entry)

    def auth_success(self, ip: str) -> None:
        """A successful login ends the client's run of failures."""
        entry = self._clients.get(ip)
        if entry is not None:
            entry.failures = 0

    def auth_failure_delay(self, ip: str) -> float:
        """``auth_failure_delay_step`` seconds per recent consecutive
        failure, at most ``auth_failure_delay_max``; failures are forgotten
        ``anvil_rate_time_unit`` after the last one."""
        if self.is_exempt(ip):
            return 0.0
        entry = self._clients.get(ip)
        if entry is None:
            return 0.0
        self._decay(entry, self.clock())
        return self._delay(entry)

    # ---------------------------------------------------------------- inspection
    def stats(self, ip: str) -> ClientStats:
        entry = self._clients.get(ip)
        if entry is None:
            return ClientStats(0, 0, 0, 0, 0, 0)
        now = self.clock()
        self._roll_window(entry, now)
        self._decay(entry, now)
        return ClientStats(entry.count, entry.conn_rate, entry.mail_rate, entry.rcpt_rate, entry.auth_rate,
                           entry.failures)

    def __len__(self) -> int:
        return len(self._clients)

    def prune(self, now: float | None = None) -> int:
        """Forget clients with no connection whose window and failure record
        expired; returns how many.  Called lazily by the event methods."""
        if now is None:
            now = self.clock()
        self._last_prune = now
        unit = self.limits.rate_time_unit
        removed = 0
        for ip in list(self._clients):
            entry = self._clients[ip]
            if now - entry.last_seen < unit:
                break  # everything after this one is more recent
            if (entry.count == 0 and now - entry.window_start >= unit
                    and (entry.failures == 0 or now - entry.last_failure >= unit)):
                del self._clients[ip]
                removed += 1
        return removed

    # ---------------------------------------------------------------- internals
    def _touch(self, ip: str) -> _Client:
        now = self.clock()
        if now - self._last_prune >= max(self.limits.rate_time_unit, 1.0):
            self.prune(now)
        entry = self._clients.pop(ip, None)
        if entry is None:
            entry = _Client(now)
            if len(self._clients) >= self.max_clients:
                self._evict()
        else:
            self._roll_window(entry, now)
        entry.last_seen = now
        self._clients[ip] = entry  # (re)insert at the end: most recent
        return entry

    def _roll_window(self, entry: _Client, now: float) -> None:
        # anvil(8): the rates restart when the time unit since the window
        # start has passed.
        if now - entry.window_start >= self.limits.rate_time_unit:
            entry.window_start = now
            entry.conn_rate = entry.mail_rate = entry.rcpt_rate = entry.auth_rate = 0

    def _decay(self, entry: _Client, now: float) -> None:
        if entry.failures and now - entry.last_failure >= self.limits.rate_time_unit:
            entry.failures = 0

    def _delay(self, entry: _Client) -> float:
        return min(self.limits.auth_failure_delay_max, self.limits.auth_failure_delay_step * entry.failures)

    def _evict(self) -> None:
        # Table full of recent clients (a flood from many addresses): drop
        # the least recently seen idle ones; connected clients are bounded by
        # the listener's own connection cap.
        excess = len(self._clients) - self.max_clients + 1
        for ip in list(self._clients):
            if excess <= 0:
                break
            if self._clients[ip].count == 0:
                del self._clients[ip]
                excess -= 1

    def _too_many_connections(self, ip: str) -> Reply:
        return Reply(421, "4.7.0", f"{self.myhostname} Error: too many connections from {ip}")

    def _warn(self, what: str, value: int, ip: str, client: str | None) -> None:
        if self.log is not None:
            self.log(f"warning: {what}: {value} from {client or ip} for service {self.service}")
