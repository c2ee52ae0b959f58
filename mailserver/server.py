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
directory, another server on the same queue) raise :class:`StartupError`
with a one-line message.

Operating it: the server holds an exclusive lock on ``pid_file`` while it
runs (a second server on the same queue refuses to start; the command line
uses the lock to know whether it may touch the queue directly), listens on
the control socket (:mod:`mailserver.control`: status, reload, stop, queue
operations) and runs the pickup task (:mod:`mailserver.pickup`) that moves
``sendmail`` submissions from ``maildrop/`` into the queue.

:meth:`reload` re-reads the configuration file and tables.  Everything is
built and checked before anything is switched: a configuration error, a
table that cannot be opened or a new listener that cannot bind leaves the
old configuration running and raises :class:`ReloadError`.  Kept listeners
keep their sockets (open sessions continue with the settings they started
with; new sessions get the new ones), new listeners are opened, removed
ones stop accepting while their sessions finish; deliveries in flight
complete with the agents they started with.  ``queue_directory``,
``pid_file`` and ``control_socket`` changes need a restart (a warning says
so).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import fcntl
import os
import random
import sys
import time
import uuid
from typing import Callable, TextIO

from . import __version__
from .bounce import FailedRecipient, build_dsn, should_bounce
from .config import Config, ConfigError
from .control import ControlServer
from .delivery import DeliveryAgent
from .delivery.local import LocalAgent, VirtualAgent
from .delivery.simple import DiscardAgent, ErrorAgent, RetryAgent
from .maillog import MailLog
from .pickup import Pickup
from .qmgr import ActiveMessage, QueueManager
from .resolve import AddressResolver
from .smtpd import Listener, Smtpd
from .smtpd.session import SMTPSession
from .spool import STATES, Spool, is_queue_id
from .delivery.python import PythonAgent, registered_transports
from .errors import NotRunningError, QueueWriteError, SubmissionError
from .events import DeliveryEvent, EventBus, EventSubscription
from .hooks import registered_policy_hooks
from .spool import SpoolError
from .submit import Cleanup, Submission
from .tables import TableError

PID_LOCK_WAIT = 5.0  # a queue tool holding the lock for a moment must not stop a start
FD_RESERVE = 100  # descriptors beyond the sessions: queue files, deliveries, tables, logs, DNS


TABLE_CHECK_INTERVAL = 5.0  # seconds between checks for changed table files


def _reload_tables(resolver, smtpd, agents=()) -> None:
    """Re-read the changed table files of every owner; one owner's broken
    table does not keep the others' from being re-read (the first error is
    raised afterwards, for the caller's warning)."""
    steps = [owner.reload_tables for owner in (resolver, smtpd) if owner is not None]
    steps += [agent.reload_tables for agent in agents  # virtual(8)'s virtual_uid_maps / virtual_gid_maps
              if getattr(agent, "reload_tables", None) is not None]
    errors = []
    for step in steps:
        try:
            step()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


class StartupError(Exception):
    pass


class ReloadError(Exception):
    """A reload was refused; the old configuration keeps running."""


def maillog_settings(config: Config) -> dict:
    return dict(hostname=config.myhostname, syslog_name=config.syslog_name, path=config.maillog_file,
                prefix=config.maillog_syslog_prefix, fmt=config.maillog_format,
                to_syslog=config.maillog_to_syslog, syslog_facility=config.syslog_facility)


class MailServer:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 log_stream: TextIO | None = sys.stderr, rng: random.Random | None = None,
                 control: bool = True, config_overrides: dict | None = None,
                 transports: dict | None = None, policy_hooks: dict | None = None):
        self.config = config
        # python:NAME transports and policy hooks of this server (on top of
        # the process-wide registries of register_transport/register_policy_hook).
        self._transports = dict(transports or {})
        self._policy_hooks = dict(policy_hooks or {})
        self._overrides = dict(config_overrides or {})  # e.g. run --log-format: re-applied on reload
        self.clock = clock
        self.rng = rng or random.Random()
        try:
            self.maillog = MailLog(stream=log_stream, clock=clock, **maillog_settings(config))
        except ValueError as exc:
            raise ConfigError(str(exc), source=config.source) from None
        except OSError as exc:
            raise ConfigError(f"cannot open maillog_file {config.maillog_file}: {exc.strerror}",
                              key="maillog_file", source=config.source) from None
        self.spool = Spool(config.queue_directory, log=self.maillog.service("qmgr"), io_engine=config.io_engine)
        self.events_bus = EventBus(log=self.maillog.service("master"))
        self.resolver: AddressResolver | None = None
        self.qmgr: QueueManager | None = None
        self.cleanup: Cleanup | None = None
        self.smtpd: Smtpd | None = None
        self.pickup: Pickup | None = None
        self.control: ControlServer | None = None
        self.agents: dict[str, DeliveryAgent] = {}
        self.started = False
        self.start_time = 0.0
        self._stopped = asyncio.Event()
        self._use_control = control
        self._pid_fd: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()
        self._retired_listeners: list[Listener] = []
        self._retired_agents: list[DeliveryAgent] = []
        self.reloads = 0

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cfg = self.config
        try:
            await asyncio.to_thread(self.spool.create_directories)
        except OSError as exc:
            raise StartupError(f"cannot create queue directory {cfg.queue_directory}: {exc.strerror}") from None
        if self._use_control:
            await self._lock_pid_file()
        try:
            try:
                engine = self.spool.start_io()
            except SpoolError as exc:
                raise StartupError(str(exc)) from None
            if engine == "threads" and cfg.io_engine == "auto":
                self.maillog.log("master", f"warning: {self.spool.io_fallback_reason}: "
                                           f"queue files are written by worker threads")
            elif engine == "io_uring":
                self.spool.ring.on_overflow = lambda: self.maillog.log(
                    "master", "warning: io_uring: completions overflowed the completion queue; "
                              "fetched from the kernel's overflow list")
            await self._start_roles()
        except BaseException:
            self.spool.stop_io()  # nothing was queued on it yet
            self._unlock_pid_file()
            raise

    async def _lock_pid_file(self) -> None:
        """Postfix master.lock: one server per queue; the lock dies with us."""
        path = self.config.pid_file
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise StartupError(f"cannot open pid_file {path}: {exc.strerror}") from None
        deadline = time.monotonic() + PID_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    other = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    os.close(fd)
                    raise StartupError(f"the mail system is already running (pid {other or 'unknown'}, "
                                       f"{path})") from None
                await asyncio.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._pid_fd = fd

    def _unlock_pid_file(self) -> None:
        if self._pid_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.config.pid_file)
        os.close(self._pid_fd)  # releases the lock
        self._pid_fd = None

    def _check_open_file_limit(self) -> None:
        """One process holds every session's socket: warn when the open-file
        limit cannot hold ``smtpd_process_limit`` sessions (``mailserver
        run`` raises the soft limit to the hard one first; an embedding
        application sets its own)."""
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.config.smtpd_process_limit + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < wanted:
            self.maillog.log("master", f"warning: open file limit {soft} is below smtpd_process_limit "
                                       f"{self.config.smtpd_process_limit} + {FD_RESERVE} for queue files and "
                                       f"deliveries; raise it (ulimit -n) or lower smtpd_process_limit")

    async def _start_roles(self) -> None:
        cfg = self.config
        if not cfg.home_mailbox and not os.path.isdir(cfg.mail_spool_directory):
            # The unprivileged default keeps mailboxes under ./var/mail: create it
            # (a system /var/mail is the administrator's, as with Postfix).
            try:
                await asyncio.to_thread(os.makedirs, cfg.mail_spool_directory, 0o1777 if os.geteuid() == 0 else 0o755)
            except OSError as exc:
                self.maillog.log("master", f"warning: cannot create mail_spool_directory "
                                           f"{cfg.mail_spool_directory}: {exc.strerror}")
        self._check_open_file_limit()
        own = [host for svc in cfg.services for host, _port in svc.endpoints() if host]
        warn = self.maillog.service("master")
        try:
            self.resolver = await asyncio.to_thread(AddressResolver, cfg, own_addresses=own, warn=warn)
        except (TableError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        self.agents = self._build_agents()
        self.qmgr = QueueManager(cfg, spool=self.spool, resolver=self.resolver, agents=self.agents,
                                 maillog=self.maillog, bounce=self._bounce, clock=self.clock, rng=self.rng)
        self.cleanup = self._make_cleanup()
        self.qmgr.events = self.events_bus
        self.smtpd = Smtpd(cfg, resolver=self.resolver, spool=self.spool, submit=self._submit_smtp,
                           log=self.maillog.service("smtpd"),
                           log_exception=self.maillog.service("smtpd").exception,
                           policy_hooks=self.policy_hooks())
        self.pickup = Pickup(cfg, spool=self.spool, cleanup=lambda: self.cleanup, maillog=self.maillog,
                             make_cleanup=lambda arrival: self._make_cleanup(clock=lambda: arrival))
        self.qmgr.on_requeue = self.pickup.nudge
        await self.qmgr.start()
        try:
            await self.smtpd.start()
        except OSError as exc:
            self.smtpd.close()
            await self.qmgr.stop(0)
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
        self.pickup.start()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_tables(), name="table-watcher")
        if self._use_control:
            self.control = ControlServer(cfg.control_socket, self._control_request,
                                         log=self.maillog.service("master"))
            try:
                await self.control.start()
            except OSError as exc:
                # Mail flows without it; the queue tools then say the server is unreachable.
                self.control = None
                self.maillog.log("master", f"warning: cannot open control socket {cfg.control_socket}: "
                                           f"{exc.strerror or exc}")
        self.started = True
        self.start_time = time.monotonic()
        self.maillog.log("master", f"daemon started -- version {__version__}, configuration {cfg.source}")

    async def _watch_tables(self) -> None:
        """Tables are re-read when their files change (Postfix re-opens
        changed tables); a broken new file keeps the previous version."""
        while True:
            await asyncio.sleep(TABLE_CHECK_INTERVAL)
            resolver, smtpd, agents = self.resolver, self.smtpd, list(self.agents.values())
            try:
                await asyncio.to_thread(_reload_tables, resolver, smtpd, agents)
            except (TableError, OSError, ValueError) as exc:
                self.maillog.log("master", f"warning: table reload: {exc}")

    def _make_cleanup(self, clock: Callable[[], float] | None = None) -> Cleanup:
        assert self.resolver is not None and self.qmgr is not None
        return Cleanup(self.config, spool=self.spool, resolver=self.resolver, maillog=self.maillog,
                       notify=self._queued, clock=clock or self.clock)

    def _queued(self, queue_id: str, envelope, message: bytes) -> None:
        assert self.qmgr is not None
        self.qmgr.notify_incoming(queue_id, envelope, message)
        if self.events_bus.active:
            self.events_bus.publish(DeliveryEvent("queued", queue_id, "", "", "", "", envelope.sender))

    def _build_agents(self, config: Config | None = None,
                      resolver: AddressResolver | None = None) -> dict[str, DeliveryAgent]:
        """The delivery agents for ``config`` (default: the running one).
        Opens table files (virtual_uid_maps, ...): reload calls it in a
        thread, before anything is swapped."""
        cfg = config or self.config
        resolver = resolver or self.resolver
        assert resolver is not None
        agents: dict[str, DeliveryAgent] = {
            "local": LocalAgent(cfg, resolver, forward=self._forward),
            "virtual": VirtualAgent(cfg, resolver),
            "discard": DiscardAgent(),
            "error": ErrorAgent(),
            "retry": RetryAgent(),
        }
        remote = self._remote_agents(cfg)
        agents.update(remote)
        transports = {**registered_transports(), **self._transports}
        for name, fn in transports.items():
            agents[f"python:{name}"] = PythonAgent(name, fn)
        for name in ("local", "virtual"):
            agents[name].ring = self.spool.ring  # type: ignore[attr-defined]  # Maildir files
        return agents

    def policy_hooks(self) -> dict:
        hooks = {**registered_policy_hooks(), **self._policy_hooks}
        missing = [name for name in self.config.smtpd_policy_hooks if name not in hooks]
        if missing:
            raise StartupError(f"smtpd_policy_hooks names unregistered hook(s): {', '.join(missing)}")
        return hooks

    def _remote_agents(self, cfg: Config) -> dict[str, DeliveryAgent]:
        try:
            from .delivery.smtp import SmtpAgent, SmtpClientSettings
            from .dns import Resolver
        except ImportError:  # pragma: no cover - remote delivery not built
            return {}
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

            out["lmtp"] = SmtpAgent(dataclasses.replace(settings, lmtp=True, lmtp_tcp_port=cfg.lmtp_tcp_port,
                                                        lmtp_unix_base=cfg.queue_directory,
                                                        smtp_tls_security_level=cfg.lmtp_tls_security_level),
                                    resolver, log=self.maillog.service("lmtp"))
        except (TypeError, NotImplementedError):  # LMTP not available in this build
            pass
        return out

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: no new connections; sessions and deliveries get
        ``timeout`` seconds to finish."""
        if not self.started:
            return
        self.started = False
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        # One deadline for everything: sessions drain while in-flight
        # deliveries finish (a container runtime sends SIGKILL after its own
        # grace period, Docker's is 10 s).
        draining = []
        if self.smtpd is not None:
            retired = self._retired_listeners
            self._retired_listeners = []
            session_grace = min(timeout, 5.0)
            draining.append(self.smtpd.stop(session_grace))
            draining += [listener.wait_closed(session_grace) for listener in retired]
        if self.pickup is not None:
            draining.append(self.pickup.stop())
        if self.qmgr is not None:
            draining.append(self.qmgr.stop(timeout))
        await asyncio.gather(*draining)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for agent in self._retired_agents:
            close = getattr(agent, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        self._retired_agents.clear()
        if self.control is not None:
            await self.control.close()
            self.control = None
        self.events_bus.close()
        await self.events_bus.wait_closed()
        await self.spool.close()
        self.maillog.log("master", "terminating on signal" if self._stopped.is_set() else "daemon stopped")
        self.maillog.flush()
        self._unlock_pid_file()
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

    def request_reload(self) -> None:
        """Reload in the background (SIGHUP); errors are logged."""
        if not self.started:
            return

        async def run() -> None:
            try:
                await self.reload()
            except ReloadError as exc:
                self.maillog.log("master", f"warning: reload failed, keeping the running configuration: {exc}")

        task = asyncio.get_running_loop().create_task(run(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ reload
    async def reload(self, config: Config | None = None) -> list[str]:
        """Re-read the configuration (``config`` or the file it came from)
        and the tables; see the module docstring.  Returns warnings; raises
        :class:`ReloadError` and keeps the old configuration on any error."""
        if not self.started:
            raise ReloadError("the server is not running")
        async with self._reload_lock:
            return await self._reload(config)

    async def _reload(self, config: Config | None) -> list[str]:
        old = self.config
        if config is None:
            if not os.path.isfile(old.source):
                raise ReloadError(f"the configuration did not come from a file ({old.source}); nothing to re-read")
            try:
                config = await asyncio.to_thread(lambda: Config.from_file(old.source, **self._overrides))
            except ConfigError as exc:
                raise ReloadError(str(exc)) from None
        warnings: list[str] = []
        for name in ("queue_directory", "pid_file", "control_socket"):
            if config.raw(name) != old.raw(name):
                warnings.append(f"{name} changed: the new value takes effect after a restart")
        own = [host for svc in config.services for host, _port in svc.endpoints() if host]
        table_warnings: list[str] = []
        try:
            resolver = await asyncio.to_thread(AddressResolver, config, own_addresses=own,
                                               warn=table_warnings.append)
        except (TableError, ValueError) as exc:
            raise ReloadError(str(exc)) from None
        for text in table_warnings:
            self.maillog.log("master", text if text.startswith("warning: ") else f"warning: {text}")
        assert self.smtpd is not None and self.qmgr is not None and self.pickup is not None
        try:
            fresh = await asyncio.to_thread(self._fresh_smtpd, config, resolver)
        except (TableError, OSError, ValueError) as exc:
            raise ReloadError(str(exc)) from None
        try:
            agents = await asyncio.to_thread(self._build_agents, config, resolver)
        except (TableError, OSError, ValueError) as exc:
            raise ReloadError(str(exc)) from None
        saved = self._swap_smtpd_settings(fresh)
        try:
            await self._reload_listeners(config)
        except ReloadError:
            for name, value in saved.items():
                setattr(self.smtpd, name, value)
            raise
        try:
            self.maillog.configure(**maillog_settings(config))
        except (OSError, ValueError) as exc:
            warnings.append(f"log settings not changed: {exc}")
        old_agents = self.agents
        self.config = config
        self.resolver = resolver
        self.agents = agents
        self._retired_agents += [a for a in {id(a): a for a in old_agents.values()}.values()
                                 if getattr(a, "close", None) is not None]
        self.qmgr.reconfigure(config, resolver, self.agents)
        self.cleanup = self._make_cleanup()
        self.pickup.config = config
        self.reloads += 1
        for text in warnings:
            self.maillog.log("master", f"warning: {text}")
        self.maillog.log("master", f"reload -- version {__version__}, configuration {config.source}")
        return warnings

    # Smtpd attributes that are runtime state or wiring, not derived from the
    # configuration: reload keeps them; every other attribute (config,
    # resolver, networks, banner, SASL file, content checks, ...) is taken
    # from an Smtpd freshly built from the new configuration.
    SMTPD_RUNTIME = frozenset({"spool", "_submit", "log", "log_exception", "listeners", "policy_hooks", "open_sessions",
                               "_free_checked", "_free_bytes"})

    def _fresh_smtpd(self, config: Config, resolver: AddressResolver) -> Smtpd:
        """An Smtpd built from the new configuration: validates it (tables,
        password file) and supplies the settings that reload swaps in."""
        hooks = {**registered_policy_hooks(), **self._policy_hooks}
        missing = [name for name in config.smtpd_policy_hooks if name not in hooks]
        if missing:
            raise ValueError(f"smtpd_policy_hooks names unregistered hook(s): {', '.join(missing)}")
        return Smtpd(config, resolver=resolver, spool=self.spool, submit=self._submit_smtp,
                     log=self.maillog.service("smtpd"), log_exception=self.maillog.service("smtpd").exception,
                     policy_hooks=hooks)

    def _swap_smtpd_settings(self, fresh: Smtpd) -> dict:
        smtpd = self.smtpd
        assert smtpd is not None
        names = [name for name in vars(fresh) if name not in self.SMTPD_RUNTIME]
        saved = {name: getattr(smtpd, name) for name in names if hasattr(smtpd, name)}
        for name in names:
            setattr(smtpd, name, getattr(fresh, name))
        return saved

    @staticmethod
    def _refresh_listener(listener: Listener, fresh: Listener) -> None:
        """A kept listener takes the new service's settings (parameters,
        TLS, restrictions); its sockets, open sessions and anvil counters
        stay.  Open sessions keep the parameter dict they started with."""
        for name, value in vars(fresh).items():
            if name in ("smtpd", "servers", "sessions", "acceptors"):
                continue
            if name == "anvil" and hasattr(listener, "anvil"):
                if hasattr(listener.anvil, "limits") and hasattr(value, "limits"):
                    listener.anvil.limits = value.limits
                if hasattr(value, "is_exempt"):  # smtpd_client_event_limit_exceptions
                    listener.anvil.is_exempt = value.is_exempt
                continue
            if name == "tls" and listener.tls is not None and value is not None:
                # Keep the holder the listening socket was built with (implicit
                # TLS): it switches new handshakes to the re-read certificate.
                # The fresh holder already validated the files.
                listener.tls.reconfigure(value.cert_file, value.key_file, value.protocols)
                continue
            setattr(listener, name, value)

    async def _reload_listeners(self, config: Config) -> None:
        """Open new listeners, close removed ones, keep the rest (their
        sockets stay open; new sessions get the new parameters)."""
        smtpd = self.smtpd
        assert smtpd is not None
        current = {listener.service.name: listener for listener in smtpd.listeners}
        wanted = {svc.name: svc for svc in config.services}
        kept: list[tuple[Listener, object]] = []
        removed: list[Listener] = []
        added = []
        for name, svc in wanted.items():
            listener = current.get(name)
            if listener is not None and tuple(listener.service.listen) == tuple(svc.listen):
                kept.append((listener, svc))
            else:
                added.append(svc)
                if listener is not None:
                    removed.append(listener)
        removed += [listener for name, listener in current.items() if name not in wanted]
        try:
            # Build (and so validate: TLS files, restriction tables) before touching any socket.
            refreshed = [(listener, Listener(smtpd, svc)) for listener, svc in kept]  # type: ignore[arg-type]
            fresh_added = [Listener(smtpd, svc) for svc in added]  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old configuration
            raise ReloadError(str(exc) or type(exc).__name__) from None
        for listener in removed:  # free their ports first: a changed service may reuse one
            listener.close()
        started: list[Listener] = []
        try:
            for listener in fresh_added:
                started.append(listener)
                await listener.start()
        except OSError as exc:
            for listener in started:
                listener.close()
            for listener in removed:  # reopen what we closed
                listener.servers = []
                with contextlib.suppress(OSError):
                    await listener.start()
            raise ReloadError(f"cannot listen: {exc.strerror or exc}") from None
        for listener, fresh in refreshed:
            self._refresh_listener(listener, fresh)
        smtpd.listeners = [listener for listener, _ in kept] + started
        self._retired_listeners = [lst for lst in self._retired_listeners if lst.sessions] + \
            [lst for lst in removed if lst.sessions]

    # ------------------------------------------------------------ information
    def addresses(self) -> list[tuple[str, int]]:
        return self.smtpd.addresses() if self.smtpd else []

    # ------------------------------------------------------------ submission paths
    # ------------------------------------------------------------ embedding API
    async def submit(self, message: "bytes | email.message.EmailMessage", *, sender: str,
                     recipients: "list[str] | tuple[str, ...]") -> str:
        """Queue a message from code, exactly as SMTP mail: cleanup (missing
        Message-ID/Date/From added), virtual alias expansion, durable write,
        then delivery by the queue manager.  Returns the queue ID once the
        message is fsync'd.

        Raises :class:`~mailserver.errors.SubmissionError` (permanent: no
        recipients, a bad address, over ``message_size_limit``),
        :class:`~mailserver.errors.QueueWriteError` (temporary: disk) or
        :class:`~mailserver.errors.NotRunningError`.
        """
        import email.policy

        from .address import parse_address

        if not self.started or self.cleanup is None:
            raise NotRunningError("the mail server is not running")
        if isinstance(message, email.message.Message):
            content = message.as_bytes(policy=email.policy.SMTP)
        elif isinstance(message, (bytes, bytearray, memoryview)):
            content = bytes(message)
        else:
            raise SubmissionError(f"message must be bytes or an EmailMessage, not {type(message).__name__}")
        # Stored form: CRLF lines, whatever the caller used.
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if isinstance(recipients, str):
            recipients = [recipients]
        if not recipients:
            raise SubmissionError("no recipients", status="5.5.1")
        checked = []
        for text in [sender, *recipients] if sender else list(recipients):
            try:
                address = parse_address(text)
            except ValueError as exc:
                raise SubmissionError(f"bad address {text!r}: {exc}", status="5.1.3") from None
            if not address.domain:
                address = address.with_domain(self.config.myorigin)
            checked.append(str(address))
        final_sender = checked.pop(0) if sender else ""
        limit = self.config.message_size_limit
        if limit and len(content) > limit:
            raise SubmissionError("message size exceeds message_size_limit", status="5.3.4")
        sub = Submission(sender=final_sender, recipients=[(r, r) for r in checked], content=content, origin="api",
                         client_name="localhost", client_addr="127.0.0.1", protocol="local", add_received=True,
                         add_missing_headers=True, smtputf8=not all(a.isascii() for a in [final_sender, *checked]))
        try:
            return await self.cleanup.submit(sub)
        except SpoolError as exc:
            raise QueueWriteError(str(exc)) from None

    def events(self, maxsize: int = 10000) -> EventSubscription:
        """``async for event in server.events():`` — queued, delivered,
        deferred, bounced and expired events (see :mod:`mailserver.events`)."""
        return self.events_bus.subscribe(maxsize)

    def add_event_listener(self, callback) -> None:
        self.events_bus.add_listener(callback)

    async def _submit_smtp(self, session: SMTPSession, content: bytes) -> str:
        assert self.cleanup is not None and session.mail_from is not None
        params = session.mail_params
        smtputf8 = bool(params and params.smtputf8)
        proto = getattr(session, "protocol", None) or (("UTF8SMTP" if smtputf8 else "ESMTP") if session.esmtp
                                                       else "SMTP")
        sub = Submission(sender=str(session.mail_from), recipients=list(session.rcpts), content=content,
                         origin="smtp", client_name=session.client_name, client_addr=session.client_addr,
                         helo=session.helo_name or "", protocol=proto, smtputf8=smtputf8,
                         body_8bit=bool(params and params.body_8bit), queue_id=session.queue_id,
                         add_missing_headers=session.local_client,
                         tls_comment=getattr(session, "tls_comment", "") or "")
        if getattr(session, "hold", False):
            sub.hold = True  # HOLD from an access map or header_checks: parked in hold/
        return await self.cleanup.submit(sub)

    async def _forward(self, sender: str, recipients: list[str], message: bytes, parent: str, original: str) -> str:
        assert self.cleanup is not None
        sub = Submission(sender=sender, recipients=[(r, original or r) for r in recipients], content=message,
                         origin="forward", add_received=False)
        return await self.cleanup.submit(sub)

    async def _bounce(self, active: ActiveMessage, indexes: list[int], kind: str) -> None:
        """Queue a DSN (bounce(8)) for recipients of a message; never to <>.

        A message with the null sender that cannot be delivered (a *double
        bounce*) goes, as a notice, to ``2bounce_notice_recipient`` when
        ``notify_classes`` contains ``2bounce``; otherwise it is dropped with a
        log line.  The notice is sent from ``double_bounce_sender``, and mail
        from that sender that fails is always dropped (no bounce loops).
        """
        env = active.envelope
        cfg = self.config
        double_bounce = f"{cfg.double_bounce_sender}@{cfg.myhostname}"
        if env.sender.lower() == double_bounce.lower():
            self.maillog.log("bounce", f"{active.queue_id}: undeliverable postmaster notification discarded")
            return
        if not should_bounce(env.sender):
            if kind != "failure":
                return
            if "2bounce" not in cfg.notify_classes:
                self.maillog.log("bounce", f"{active.queue_id}: undeliverable bounce discarded "
                                           f"(notify_classes has no 2bounce)")
                return
            await self._send_dsn(active, indexes, kind, notify_to=cfg["2bounce_notice_recipient"]
                                 or "postmaster", from_sender=double_bounce,
                                 what="postmaster non-delivery notification")
            return
        await self._send_dsn(active, indexes, kind)
        # notify_classes: the postmaster gets a copy of the DSN's headers
        # for "bounce" (failures) and "delay" (delay warnings).
        copy_class, copy_to = ("bounce", cfg.bounce_notice_recipient) if kind == "failure" \
            else ("delay", cfg.delay_notice_recipient)
        if copy_class in cfg.notify_classes:
            await self._send_dsn(active, indexes, kind, notify_to=copy_to, from_sender=double_bounce,
                                 what=f"postmaster {'non-delivery' if kind == 'failure' else 'delay'} notification")

    async def _send_dsn(self, active: ActiveMessage, indexes: list[int], kind: str, *, notify_to: str | None = None,
                        from_sender: str = "", what: str | None = None) -> None:
        env = active.envelope
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
        rcpt = notify_to or env.sender
        if "@" not in rcpt:
            rcpt = f"{rcpt}@{self.config.myorigin}"
        dsn = build_dsn(original=active.message, queue_id=active.queue_id, sender=rcpt, recipients=failed,
                        myhostname=self.config.myhostname, arrival_time=env.arrival_time, now=now,
                        boundary=f"{active.queue_id}.{int(now)}/{self.config.myhostname}",
                        message_id_suffix=f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}.{uuid.uuid4().hex[:12]}",
                        kind=kind, bounce_size_limit=self.config.bounce_size_limit,
                        maximal_queue_lifetime=self.config.maximal_queue_lifetime)
        sub = Submission(sender=from_sender, recipients=[(rcpt, rcpt)], content=dsn, origin="bounce",
                         add_received=False, smtputf8=not rcpt.isascii())
        new_id = await self.cleanup.submit(sub)
        what = what or ("sender non-delivery notification" if kind == "failure" else "sender delay notification")
        self.maillog.log("bounce", f"{active.queue_id}: {what}: {new_id}")

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        """What ``mailserver status`` shows (queue counts: see status_async)."""
        listeners = []
        if self.smtpd is not None:
            for listener in self.smtpd.listeners:
                for host, port in listener.addresses():
                    listeners.append({"service": listener.service.name,
                                      "address": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                                      "sessions": len(listener.sessions)})
        return {
            "running": self.started,
            "pid": os.getpid(),
            "version": __version__,
            "config": self.config.source,
            "uptime": round(time.monotonic() - self.start_time, 3) if self.started else 0.0,
            "reloads": self.reloads,
            "listeners": listeners,
            "scheduler": self.qmgr.summary() if self.qmgr else {},
            "active_deliveries": self.qmgr.in_flight() if self.qmgr else 0,
            "active_messages": len(self.qmgr.active) if self.qmgr else 0,
            "destinations": self.qmgr.destination_status() if self.qmgr else [],
        }

    async def status_async(self) -> dict:
        out = self.status()
        out["queue"] = await self.spool.blocking(self.spool.queue_counts)
        return out

    # ------------------------------------------------------------ control socket
    async def _control_request(self, request: dict) -> dict:
        op = request["op"]
        if op == "status":
            return {"ok": True, **await self.status_async()}
        if op == "reload":
            try:
                warnings = await self.reload()
            except ReloadError as exc:
                self.maillog.log("master", f"warning: reload failed, keeping the running configuration: {exc}")
                return {"ok": False, "error": str(exc)}
            return {"ok": True, "warnings": warnings}
        if op == "stop":
            self.maillog.log("master", "stop requested over the control socket")
            self.request_stop()
            return {"ok": True, "pid": os.getpid(), "stop_timeout": self.config.stop_timeout}
        if op == "pickup":
            if self.pickup is not None:
                self.pickup.nudge()
            return {"ok": True}
        assert self.qmgr is not None
        ids = request.get("ids")
        if ids is not None and ids != "ALL":
            if not isinstance(ids, list) or not all(isinstance(i, str) and is_queue_id(i) for i in ids):
                return {"ok": False, "error": "ids must be a list of queue IDs or \"ALL\""}
        if op == "flush":
            domain = request.get("domain")
            if isinstance(domain, str) and domain:
                count = await self.qmgr.flush_domain(domain)
            else:
                count = self.qmgr.flush(None if ids in (None, "ALL") else ids)
            return {"ok": True, "flushed": count}
        if op in ("delete", "hold", "release", "requeue"):
            queues = request.get("queues") or None
            if queues is not None and (not isinstance(queues, list) or not set(queues) <= set(STATES)
                                       or "corrupt" in queues):
                return {"ok": False, "error": f"queues must be among {', '.join(STATES[:-1])}"}
            if ids is None:
                return {"ok": False, "error": "no queue IDs given"}
            result = await self.qmgr.queue_operation(op, None if ids == "ALL" else ids,
                                                     tuple(queues) if queues else None)
            return {"ok": True, **result}
        return {"ok": False, "error": f"unknown request {op!r}"}
