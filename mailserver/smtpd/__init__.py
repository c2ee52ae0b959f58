"""The SMTP listener role (Postfix: smtpd).

:class:`Smtpd` owns the listeners of every ``[services.NAME]`` table and the
facts sessions ask for (is the client in ``mynetworks``? is this recipient
known? is there disk space?).  Sessions are :class:`~.session.SMTPSession`
objects hosted inside the server's own event loop — never aiosmtpd's
threaded Controller; plain-text listeners accept through
:mod:`.acceptor` (no task per connection), implicit-TLS ones through
``loop.create_server``.

Protocol decisions are pure functions in :mod:`.policy`; this module only
gathers their inputs.  Recipient lookups that may block (the passwd
database) run in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from typing import Awaitable, Callable

from ..anvil import network_matcher
from ..config import PARAMETERS, Config, Service
from ..reply import Reply
from ..resolve import LOCAL, VIRTUAL, VIRTUAL_ALIAS, AddressResolver, local_part_is_safe, strip_extension
from ..spool import Spool, new_queue_id
from . import acceptor, policy
from .session import SMTPSession

SubmitFn = Callable[[SMTPSession, bytes], Awaitable[str]]
# listen() backlog.  Postfix's master uses max(maxproc, default_process_limit)
# per smtpd process; here one process holds every session (smtpd_process_limit).
BACKLOG = 1024


@functools.lru_cache(maxsize=4096)
def _client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address parsed once (sessions from one client repeat it);
    None when it is not an IP address."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


class Listener:
    """One service (a master.cf ``smtp inet`` line with its ``-o`` overrides):
    its effective parameters, TLS context, anvil counters and sockets."""

    def __init__(self, smtpd: "Smtpd", service: Service):
        self.smtpd = smtpd
        self.service = service
        params = {name: smtpd.config[name] for name in PARAMETERS
                  if name.startswith(("smtpd_", "message_", "hopcount", "anvil_", "header_", "body_"))}
        params.update(service.overrides)
        self.params = params
        self.servers: list[asyncio.base_events.Server] = []
        self.acceptors: list[acceptor.Acceptor] = []  # the accept callbacks of plain-text sockets
        self.sessions: set[SMTPSession] = set()
        self.tls_mode = service.tls  # none | may | required | implicit
        self.auth_mode = service.auth  # none | optional | required
        self.tls = None
        if self.tls_mode != "none":
            from ..tls import TlsConfigError, TlsContextHolder

            try:
                self.tls = TlsContextHolder(params["smtpd_tls_cert_file"], params["smtpd_tls_key_file"],
                                            params["smtpd_tls_protocols"])
            except TlsConfigError as exc:
                raise OSError(f"service {service.name}: {exc}") from None
        from ..anvil import Anvil, AnvilLimits, network_matcher

        limits = AnvilLimits.from_params(params)
        self.anvil = Anvil(limits, myhostname=smtpd.myhostname,
                           is_exempt=network_matcher(params["smtpd_client_event_limit_exceptions"]),
                           log=smtpd.log, service=service.name)

        from .restrictions import RestrictionChecker

        self.checker = RestrictionChecker(smtpd.config, resolver=smtpd.resolver, dns=smtpd.dns,
                                          is_mynetworks=smtpd.is_mynetworks, recipient_known=smtpd.recipient_known,
                                          sender_login_owner=smtpd.sender_login_owner,
                                          policy_hooks=smtpd.policy_hooks, log=smtpd.log, params=params)

    @property
    def sasl_enabled(self) -> bool:
        return self.auth_mode != "none" and self.smtpd.sasl is not None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ssl_context = self.tls.context if self.tls is not None and self.tls_mode == "implicit" else None
        for host, port in self.service.endpoints():
            if ssl_context is None and acceptor.supported(loop):  # plain text: our accept callback
                server, acceptors = await acceptor.serve(loop, lambda: SMTPSession(self), self.smtpd.log,
                                                         self.smtpd.log_exception, host=host or None, port=port,
                                                         backlog=BACKLOG)
                self.acceptors += acceptors
            else:
                server = await loop.create_server(lambda: SMTPSession(self), host=host or None, port=port,
                                                  reuse_address=True, backlog=BACKLOG, ssl=ssl_context)
            self.servers.append(server)

    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((name[0], name[1]))
        return out

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for acc in self.acceptors:
            acc.stop()
        self.acceptors = []

    async def wait_closed(self, timeout: float) -> None:
        """Let open sessions finish for ``timeout`` seconds, then close them."""
        deadline = time.monotonic() + timeout
        for session in list(self.sessions):
            if session._linger is not None:  # over already, its last replies unread: cut now
                session._close(linger=False)
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                session._we_closed = True
                session._write(Reply(421, "4.3.2", f"{self.smtpd.myhostname} Service shutting down"))
                session._close(linger=False)  # (a client that does not read: cut now)
        for server in self.servers:
            await server.wait_closed()


class Smtpd:
    def __init__(self, config: Config, *, resolver: AddressResolver, spool: Spool, submit: SubmitFn,
                 log: Callable[[str], None], log_exception: Callable[[str], None], dns=None,
                 policy_hooks: dict | None = None):
        self.config = config
        self.resolver = resolver
        self.spool = spool
        self._submit = submit
        self.log = log
        self.log_exception = log_exception
        self.myhostname = config.myhostname
        self.myorigin = config.myorigin
        self.banner = config.smtpd_banner
        self._in_mynetworks = network_matcher(config.mynetworks)  # answers remembered per address
        self.open_sessions = 0  # sessions in every listener's ``sessions`` set
        self._stress_of: Config | None = None  # the config _stress_threshold was computed from
        self._stress_threshold = 0
        self.listeners: list[Listener] = []
        self.policy_hooks: dict = dict(policy_hooks or {})
        self.content = None  # mailserver.content_checks.ContentChecker when header/body checks are set
        if config.header_checks or config.body_checks:
            from ..content_checks import ContentChecker

            self.content = ContentChecker(config.header_checks, config.body_checks,
                                          body_checks_size_limit=config.body_checks_size_limit,
                                          header_size_limit=config.header_size_limit, warn=log)
        from ..tables import open_tables

        self._sender_login_maps = open_tables(config.smtpd_sender_login_maps, warn=log)
        self.sasl = None  # mailserver.sasl.PasswdFile when smtpd_sasl_password_maps is set
        if config.smtpd_sasl_password_maps:
            from ..sasl import PasswdFile

            self.sasl = PasswdFile(config.smtpd_sasl_password_maps, log=log)
        if dns is None:
            from ..dns import Resolver

            dns = Resolver(list(config.dns_nameservers) or None, timeout=config.dns_timeout,
                           inet_protocols=config.inet_protocols)
        self.dns = dns
        self._free_checked = 0.0
        self._free_bytes = 1 << 62

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for service in self.config.services:
            listener = Listener(self, service)
            await listener.start()
            self.listeners.append(listener)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()

    async def stop(self, timeout: float = 5.0) -> None:
        self.close()
        await asyncio.gather(*(listener.wait_closed(timeout) for listener in self.listeners))

    def addresses(self) -> list[tuple[str, int]]:
        return [a for listener in self.listeners for a in listener.addresses()]

    # ------------------------------------------------------------ facts
    def is_mynetworks(self, ip: str) -> bool:
        """Is ``ip`` in ``mynetworks``?  (Asked several times per message:
        permit_mynetworks in every restriction list; the matcher remembers
        its answers, and reload swaps in a new matcher.)"""
        return self._in_mynetworks(ip)

    def reload_tables(self) -> None:
        """Access maps, sender login maps, header/body checks (blocking)."""
        for listener in self.listeners:
            listener.checker.reload_tables()
        self._sender_login_maps.reload_if_changed()
        if self.content is not None:
            self.content.reload_if_changed()

    # ------------------------------------------------------------ sessions
    def session_count(self) -> int:
        """Open sessions on all listeners (kept by the sessions themselves:
        asked on every command by :meth:`under_stress`)."""
        return self.open_sessions

    def under_stress(self) -> bool:
        """More sessions than ``smtpd_stress_threshold`` (asked on every command)."""
        config = self.config
        if config is not self._stress_of:
            self._stress_of = config
            self._stress_threshold = config.smtpd_stress_threshold or int(config.smtpd_process_limit * 0.8)
        threshold = self._stress_threshold
        return threshold > 0 and self.open_sessions > threshold

    def connection_refusal(self, session: "SMTPSession") -> Reply | None:
        """Connection-time limits: the global cap (smtpd_process_limit) and
        the per-client limits of anvil(8)."""
        if self.session_count() > self.config.smtpd_process_limit:
            # (anvil logs its own refusals; this one is ours: one process, one cap)
            self.log(f"warning: {session.client}: smtpd_process_limit {self.config.smtpd_process_limit} "
                     f"reached: connection refused")
            return Reply(421, "4.3.2", f"{self.myhostname} Error: too many connections, try again later")
        anvil = session.listener.anvil
        refusal = anvil.connect(session.client_addr, client=session.client)
        if refusal is None:
            session._anvil_connected = True
        return refusal

    def session_ended(self, session: "SMTPSession") -> None:
        if getattr(session, "_anvil_connected", False):
            session.listener.anvil.disconnect(session.client_addr)
            session._anvil_connected = False

    async def lookup_client_name(self, ip: str) -> tuple[str, str, bool]:
        """(verified name, reverse name, temporary failure) as Postfix's
        smtpd: PTR, then forward-confirm; loopback is "localhost" without DNS."""
        if not self.config.smtpd_peername_lookup:
            return "unknown", "unknown", False
        addr = _client_ip(ip)
        if addr is None:
            return "unknown", "unknown", False
        if addr.is_loopback:
            return "localhost", "localhost", False
        if self.dns is None:
            return "unknown", "unknown", False
        from ..dns import DnsError

        try:
            names = await self.dns.lookup(addr.reverse_pointer, "PTR")
        except DnsError:
            return "unknown", "unknown", True
        if not names:
            return "unknown", "unknown", False
        reverse = names[0].rstrip(".").lower()
        try:
            forward = await self.dns.lookup(reverse, "AAAA" if addr.version == 6 else "A")
        except DnsError:
            return "unknown", reverse, True
        confirmed = any(_same_ip(candidate, ip) for candidate in forward)
        return (reverse if confirmed else "unknown"), reverse, False

    def is_local_interface(self, ip: str) -> bool:
        addr = _client_ip(ip)
        if addr is None:
            return False
        if addr.is_loopback:
            return True
        return any(ip == host for host, _port in self.addresses())

    def new_queue_id(self) -> str:
        return new_queue_id()

    def count_hops(self, content: bytes) -> int:
        from ..cleanup import count_received

        return count_received(content)

    async def has_free_space(self, size: int) -> bool:
        """queue_minfree: refuse MAIL when the queue file system is nearly full."""
        minfree = self.config.queue_minfree
        if not minfree:
            return True
        now = time.monotonic()
        if now - self._free_checked > 1.0:
            self._free_bytes = await self.spool.free_bytes_async()
            self._free_checked = now
        return self._free_bytes - size >= minfree

    async def submit(self, session: SMTPSession, content: bytes) -> str:
        return await self._submit(session, content)

    async def recipient_known(self, address_text: str) -> bool | None:
        """reject_unlisted_recipient/sender: is this address a known user?
        None when the question does not apply (routed, relay or remote)."""
        from ..address import parse_address_or_none

        address = parse_address_or_none(address_text) if address_text else None
        if address is None or address.routed:
            return None
        domain = address.domain or self.myorigin
        cls = self.resolver.address_class(domain)
        full = f"{address.local}@{domain}"
        if policy.is_postmaster(address, cls == LOCAL):
            return True
        if self.resolver.virtual_alias(full) is not None:
            return True
        if cls == LOCAL:
            return await self.local_user_known(address.local)
        if cls == VIRTUAL:
            return self.resolver.virtual_mailbox(full) is not None
        if cls == VIRTUAL_ALIAS:
            return False
        return None

    def sender_login_owner(self, sender: str) -> list[str] | None:
        """smtpd_sender_login_maps: the logins that may use this MAIL FROM
        (full address, then @domain), or None when unlisted."""
        if not self._sender_login_maps:
            return None
        value = self._sender_login_maps.lookup(sender.lower())
        if value is None and "@" in sender:
            value = self._sender_login_maps.lookup("@" + sender.rsplit("@", 1)[1].lower())
        if value is None:
            return None
        return [item for item in value.replace(",", " ").split() if item]

    async def local_user_known(self, local: str) -> bool:
        """local_recipient_maps: a user in passwd or an alias.

        A local part that could act as a path (``/``, leading dot, NUL) is
        simply unknown: it never reaches the file system.
        """
        if not local_part_is_safe(local):
            return False
        maps = self.config.local_recipient_maps
        if not maps:
            return True  # Postfix: empty local_recipient_maps accepts every local part
        key = strip_extension(local.lower(), self.config.recipient_delimiter)
        if key == "postmaster" or key == "mailer-daemon":
            return True
        if "unix:passwd.byname" in maps:
            from ..tables import getpwnam

            def getpw() -> bool:  # an OSError (no descriptors) is a temporary lookup failure
                return getpwnam(key) is not None

            if await asyncio.to_thread(getpw):
                return True
        return self.resolver.alias(key) is not None


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False
