"""The server (Postfix: master): builds every role from one Config and owns
every task.

``MailServer(config)`` runs inside the caller's event loop (never its own
thread or loop, never signal handlers — the CLI installs those)::

    async with MailServer(config) as server:
        await server.serve_forever()

Lifecycle: :meth:`start` creates the queue hierarchy, recovers the queue
(active → incoming, temp files, corrupt records), starts the queue manager,
then opens the listeners; :meth:`stop` closes the listeners, lets SMTP
sessions and in-flight deliveries finish for a grace period, then cancels
what is left (the queue on disk is always consistent: at worst a recipient
being delivered at that instant is delivered again after restart).

Start-up failures (a port in use, an unreadable table, an unwritable queue
directory) raise :class:`StartupError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import uuid
from typing import Callable, TextIO

from . import __version__
from .bounce import FailedRecipient, build_dsn, should_bounce
from .config import Config
from .delivery import DeliveryAgent
from .delivery.local import LocalAgent, VirtualAgent
from .delivery.simple import DiscardAgent, ErrorAgent, RetryAgent
from .maillog import MailLog
from .qmgr import ActiveMessage, QueueManager
from .resolve import AddressResolver
from .smtpd import Smtpd
from .smtpd.session import SMTPSession
from .spool import Spool
from .submit import Cleanup, Submission
from .tables import TableError


class StartupError(Exception):
    pass


class MailServer:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 log_stream: TextIO | None = sys.stderr, rng: random.Random | None = None):
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.maillog = MailLog(hostname=config.myhostname, syslog_name=config.syslog_name, stream=log_stream,
                               path=config.maillog_file, prefix=config.maillog_syslog_prefix, clock=clock)
        self.spool = Spool(config.queue_directory, log=self.maillog.service("qmgr"))
        self.resolver: AddressResolver | None = None
        self.qmgr: QueueManager | None = None
        self.cleanup: Cleanup | None = None
        self.smtpd: Smtpd | None = None
        self.agents: dict[str, DeliveryAgent] = {}
        self.started = False
        self.start_time = 0.0
        self._stopped = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cfg = self.config
        try:
            await asyncio.to_thread(self.spool.create_directories)
        except OSError as exc:
            raise StartupError(f"cannot create queue directory {cfg.queue_directory}: {exc.strerror}") from None
        if not cfg.home_mailbox and not os.path.isdir(cfg.mail_spool_directory):
            # The unprivileged default keeps mailboxes under ./var/mail: create it
            # (a system /var/mail is the administrator's, as with Postfix).
            try:
                await asyncio.to_thread(os.makedirs, cfg.mail_spool_directory, 0o1777 if os.geteuid() == 0 else 0o755)
            except OSError as exc:
                self.maillog.log("master", f"warning: cannot create mail_spool_directory "
                                           f"{cfg.mail_spool_directory}: {exc.strerror}")
        own = [host for svc in cfg.services for host, _port in svc.endpoints() if host]
        warn = self.maillog.service("master")
        try:
            self.resolver = await asyncio.to_thread(AddressResolver, cfg, own_addresses=own, warn=warn)
        except (TableError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        self.agents = self._build_agents()
        self.qmgr = QueueManager(cfg, spool=self.spool, resolver=self.resolver, agents=self.agents,
                                 maillog=self.maillog, bounce=self._bounce, clock=self.clock, rng=self.rng)
        self.cleanup = Cleanup(cfg, spool=self.spool, resolver=self.resolver, maillog=self.maillog,
                               notify=self.qmgr.notify_incoming, clock=self.clock)
        self.smtpd = Smtpd(cfg, resolver=self.resolver, spool=self.spool, submit=self._submit_smtp,
                           log=self.maillog.service("smtpd"),
                           log_exception=self.maillog.service("smtpd").exception)
        await self.qmgr.start()
        try:
            await self.smtpd.start()
        except OSError as exc:
            await self.qmgr.stop(0)
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
        self.started = True
        self.start_time = time.monotonic()
        self.maillog.log("master", f"daemon started -- version {__version__}, configuration {cfg.source}")

    def _build_agents(self) -> dict[str, DeliveryAgent]:
        cfg = self.config
        assert self.resolver is not None
        agents: dict[str, DeliveryAgent] = {
            "local": LocalAgent(cfg, self.resolver, forward=self._forward),
            "virtual": VirtualAgent(cfg, self.resolver),
            "discard": DiscardAgent(),
            "error": ErrorAgent(),
            "retry": RetryAgent(),
        }
        remote = self._remote_agents()
        agents.update(remote)
        return agents

    def _remote_agents(self) -> dict[str, DeliveryAgent]:
        try:
            from .delivery.smtp import SmtpAgent, SmtpClientSettings
            from .dns import Resolver
        except ImportError:  # pragma: no cover - remote delivery not built
            return {}
        cfg = self.config
        nameservers = list(cfg.dns_nameservers) or None
        resolver = Resolver(nameservers, timeout=cfg.dns_timeout, inet_protocols=cfg.inet_protocols)
        own = frozenset(host for svc in cfg.services for host, _ in svc.endpoints() if host)
        settings = SmtpClientSettings(
            myhostname=cfg.myhostname, smtp_tcp_port=cfg.smtp_tcp_port, smtp_mx_address_limit=cfg.smtp_mx_address_limit,
            smtp_connect_timeout=cfg.smtp_connect_timeout, smtp_helo_timeout=cfg.smtp_helo_timeout,
            smtp_mail_timeout=cfg.smtp_mail_timeout, smtp_rcpt_timeout=cfg.smtp_rcpt_timeout,
            smtp_data_init_timeout=cfg.smtp_data_init_timeout, smtp_data_xfer_timeout=cfg.smtp_data_xfer_timeout,
            smtp_data_done_timeout=cfg.smtp_data_done_timeout, smtp_quit_timeout=cfg.smtp_quit_timeout,
            smtp_tls_security_level=cfg.smtp_tls_security_level, smtp_tls_CAfile=cfg.smtp_tls_CAfile or None,
            smtp_connection_cache_time_limit=cfg.smtp_connection_cache_time_limit,
            smtp_connection_reuse_time_limit=cfg.smtp_connection_reuse_time_limit, own_addresses=own)
        log = self.maillog.service("smtp")
        smtp = SmtpAgent(settings, resolver, log=log)
        out: dict[str, DeliveryAgent] = {"smtp": smtp, "relay": smtp}
        try:
            import dataclasses

            out["lmtp"] = SmtpAgent(dataclasses.replace(settings, lmtp=True), resolver, log=log)
        except (TypeError, NotImplementedError):  # LMTP not available in this build
            pass
        return out

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: no new connections; sessions and deliveries get
        ``timeout`` seconds to finish."""
        if not self.started:
            return
        self.started = False
        if self.smtpd is not None:
            await self.smtpd.stop(min(timeout, 5.0))
        if self.qmgr is not None:
            await self.qmgr.stop(timeout)
        await self.spool.close()
        self.maillog.log("master", "terminating on signal" if self._stopped.is_set() else "daemon stopped")
        self.maillog.flush()
        self._stopped.set()

    async def __aenter__(self) -> "MailServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` callers to return (signal handlers)."""
        self._stopped.set()

    # ------------------------------------------------------------ information
    def addresses(self) -> list[tuple[str, int]]:
        return self.smtpd.addresses() if self.smtpd else []

    # ------------------------------------------------------------ submission paths
    async def _submit_smtp(self, session: SMTPSession, content: bytes) -> str:
        assert self.cleanup is not None and session.mail_from is not None
        params = session.mail_params
        smtputf8 = bool(params and params.smtputf8)
        proto = ("UTF8SMTP" if smtputf8 else "ESMTP") if session.esmtp else "SMTP"
        sub = Submission(sender=str(session.mail_from), recipients=list(session.rcpts), content=content,
                         origin="smtp", client_name=session.client_name, client_addr=session.client_addr,
                         helo=session.helo_name or "", protocol=proto, smtputf8=smtputf8,
                         body_8bit=bool(params and params.body_8bit), queue_id=session.queue_id,
                         add_missing_headers=session.local_client)
        return await self.cleanup.submit(sub)

    async def _forward(self, sender: str, recipients: list[str], message: bytes, parent: str, original: str) -> str:
        assert self.cleanup is not None
        sub = Submission(sender=sender, recipients=[(r, original or r) for r in recipients], content=message,
                         origin="forward", add_received=False)
        return await self.cleanup.submit(sub)

    async def _bounce(self, active: ActiveMessage, indexes: list[int], kind: str) -> None:
        """Queue a DSN (bounce(8)) for recipients of a message; never for <>."""
        env = active.envelope
        if not should_bounce(env.sender):
            return
        assert self.cleanup is not None
        now = self.clock()
        action = "failed" if kind == "failure" else "delayed"
        failed = []
        for i in indexes:
            r = env.recipients[i]
            status = r.dsn if r.dsn[:1] in "45" and r.dsn.count(".") == 2 else ("5.0.0" if action == "failed" else "4.0.0")
            if action == "delayed" and not status.startswith("4"):
                status = "4.0.0"
            remote = r.relay.split("[", 1)[0] if r.relay and r.relay not in ("none", "local", "virtual") else None
            failed.append(FailedRecipient(final_recipient=r.address, original_recipient=r.original or None,
                                          action=action, status=status, diagnostic=r.reason or "unknown error",
                                          remote_mta=remote, last_attempt=now))
        dsn = build_dsn(original=active.message, queue_id=active.queue_id, sender=env.sender, recipients=failed,
                        myhostname=self.config.myhostname, arrival_time=env.arrival_time, now=now,
                        boundary=f"{active.queue_id}.{int(now)}/{self.config.myhostname}",
                        message_id_suffix=f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}.{uuid.uuid4().hex[:12]}",
                        kind=kind, bounce_size_limit=self.config.bounce_size_limit,
                        maximal_queue_lifetime=self.config.maximal_queue_lifetime)
        sub = Submission(sender="", recipients=[(env.sender, env.sender)], content=dsn, origin="bounce",
                         add_received=False, smtputf8=not env.sender.isascii())
        new_id = await self.cleanup.submit(sub)
        what = "sender non-delivery notification" if kind == "failure" else "sender delay notification"
        self.maillog.log("bounce", f"{active.queue_id}: {what}: {new_id}")

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "uptime": time.monotonic() - self.start_time if self.started else 0.0,
            "listeners": [f"{h}:{p}" for h, p in self.addresses()],
            "queue": self.qmgr.summary() if self.qmgr else {},
        }
