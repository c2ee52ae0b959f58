"""Local and virtual delivery agents (Postfix: local(8), virtual(8)).

**local** delivers mail for ``mydestination`` recipients:

1. ``Delivered-To:`` loop check (5.4.6).
2. Alias expansion from ``alias_maps`` (aliases(5)): recursive, each alias
   expanded once per branch, nesting bounded by :data:`MAX_ALIAS_DEPTH`
   (5.4.6 beyond it); an alias that names itself means "this user's own
   mailbox"; ``:include:`` files; ``|command`` and ``/file`` targets only when
   ``allow_mail_to_commands`` / ``allow_mail_to_files`` allow the source.
3. Otherwise a system user (passwd): ``forward_path`` (``.forward``, honoured
   only when owned by the user and not group/world writable), else the
   mailbox: ``home_mailbox`` empty → mbox ``mail_spool_directory/USER``;
   ``Mailbox`` → mbox in the home; ``Maildir/`` → Maildir in the home.
4. Remote (or non-expanding local) addresses from aliases and ``.forward``
   are forwarded as one new message (``forwarded as QUEUEID``).

Mailbox paths come from the passwd entry and configuration only, never from
the recipient's local part.  Running as root, files are written as the
recipient and commands run as the recipient (``.forward``) or
``default_privs`` (aliases).  Running unprivileged, a system user's mailbox
must be writable by the server, otherwise the delivery is deferred with a
reason that says so.

**virtual** delivers to ``virtual_mailbox_base`` + the path from
``virtual_mailbox_maps`` (trailing ``/`` = Maildir), confined to the base.

Failures are returned as outcomes (see :mod:`mailserver.delivery`); file
writes run in worker threads.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import os
import pwd
import stat
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..aliases import AliasSyntaxError, AliasTarget, parse_forward, parse_targets
from ..config import Config
from ..resolve import AddressResolver, local_part_is_safe, split_address, strip_extension
from ..tables import getpwnam
from . import Delivered, DeliveryRequest, Outcome, PermanentFailure, Recipient, TemporaryFailure
from .mailbox import (MailboxError, deliver_maildir, deliver_maildir_ring, deliver_mbox, delivery_headers,
                      has_delivered_to, mbox_from_line)
from .pipe import run_command
from ..workers import WorkerPool

# The blocking side of local(8) and virtual(8): one pool for every agent of
# the process (agents are rebuilt on each reload, their threads are not),
# grown on demand up to 8 threads (concurrent mailbox writes, each ending in
# an fsync); at interpreter exit the writes in progress finish first.
MAILBOX_POOL = WorkerPool(8, name="mailbox")
atexit.register(MAILBOX_POOL.close)

MAX_ALIAS_DEPTH = 20
ForwardFn = Callable[[str, list[str], bytes, str, str], Awaitable[str]]  # sender, rcpts, msg, parent id, orig -> id


_ID_LIMIT = 2**32 - 1  # uid_t/gid_t; (uid_t)-1 means "unchanged" to chown(2)


def _is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class _Plan:
    """What one recipient's expansion asks for."""

    mailboxes: list[tuple[pwd.struct_passwd, str]] = field(default_factory=list)  # (user, delivered-to address)
    commands: list[tuple[str, str, pwd.struct_passwd | None, str]] = field(default_factory=list)  # cmd, source, user, addr
    files: list[tuple[str, str, pwd.struct_passwd | None, str]] = field(default_factory=list)
    forwards: list[str] = field(default_factory=list)
    failure: Outcome | None = None


class LocalAgent:
    name = "local"

    def __init__(self, config: Config, resolver: AddressResolver, *, forward: ForwardFn | None = None):
        self.config = config
        self.resolver = resolver
        self.forward = forward
        self._pool = MAILBOX_POOL  # mailbox writes, passwd and .forward reads
        self.ring = None  # the spool's io_uring, for Maildir files (set by the server)

    async def deliver(self, request: DeliveryRequest) -> list[Outcome]:
        return [await self._deliver_one(request, rcpt) for rcpt in request.recipients]

    # --------------------------------------------------------------- expansion
    def _user(self, name: str) -> pwd.struct_passwd | None:
        if not local_part_is_safe(name):
            return None
        return getpwnam(name)  # (an OSError: the lookup could not run; see _deliver_one)

    def _expand(self, name: str, plan: _Plan, depth: int, seen: frozenset[str], address: str) -> None:
        """Expand local part ``name`` into ``plan`` (blocking: passwd, .forward, include files)."""
        if plan.failure is not None:
            return
        if depth > MAX_ALIAS_DEPTH:
            plan.failure = PermanentFailure("5.4.6", f"alias expansion nesting too deep for {name}")
            return
        key = strip_extension(name.lower(), self.config.recipient_delimiter)
        value = self.resolver.alias(key) if key not in seen else None
        if value is not None:
            try:
                targets = parse_targets(value)
            except (AliasSyntaxError, ValueError) as exc:
                plan.failure = TemporaryFailure("4.3.0", f"alias database error for {key}: {exc}")
                return
            self._apply(targets, "alias", None, plan, depth, seen | {key}, self_name=key)
            return
        user = self._user(key)
        if user is None:
            if key in ("postmaster", "mailer-daemon") and key not in seen:
                # RFC 5321 requires postmaster; without an alias it goes to root.
                self._expand("root", plan, depth + 1, seen | {key}, address)
                return
            plan.failure = PermanentFailure("5.1.1", f'unknown user: "{key}"')
            return
        if key not in seen or depth == 0:
            targets = self._dotforward(user, plan)
            if plan.failure is not None:
                return
            if targets:
                self._apply(targets, "forward", user, plan, depth, seen | {key}, self_name=key)
                return
        plan.mailboxes.append((user, f"{user.pw_name}@{self.config.myhostname}" if "@" not in address else address))

    def _dotforward(self, user: pwd.struct_passwd, plan: _Plan) -> list[AliasTarget]:
        for template in self.config.forward_path:
            path = (template.replace("${home}", user.pw_dir).replace("$home", user.pw_dir)
                    .replace("${user}", user.pw_name).replace("$user", user.pw_name))
            if "$" in path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    # Could not look: not "no .forward" (that would deliver
                    # to the mailbox mail the user forwards elsewhere).
                    plan.failure = TemporaryFailure("4.3.0", f"cannot open {path}: {exc.strerror}")
                    return []
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != user.pw_uid or st.st_mode & 0o022:
                    # Not owned by the recipient, or writable by others: ignored (local(8)).
                    continue
                with os.fdopen(os.dup(fd), "r", encoding="utf-8", errors="replace") as fh:
                    text = fh.read(65536)
            finally:
                os.close(fd)
            try:
                return parse_forward(text, path)
            except (AliasSyntaxError, ValueError) as exc:
                plan.failure = TemporaryFailure("4.3.0", f"error reading {path}: {exc}")
                return []
        return []

    def _apply(self, targets: list[AliasTarget], source: str, owner: pwd.struct_passwd | None, plan: _Plan,
               depth: int, seen: frozenset[str], self_name: str) -> None:
        allow_cmd = source in self.config.allow_mail_to_commands
        allow_file = source in self.config.allow_mail_to_files
        for target in targets:
            if plan.failure is not None:
                return
            if target.kind == "command":
                if not allow_cmd:
                    plan.failure = PermanentFailure("5.7.1", f"mail to command is restricted ({source})")
                    return
                plan.commands.append((target.value, source, owner, self_name))
            elif target.kind == "file":
                path = target.value
                if path.startswith("~/") and owner is not None:
                    path = os.path.join(owner.pw_dir, path[2:])
                if not allow_file or not os.path.isabs(path):
                    plan.failure = PermanentFailure("5.7.1", f"mail to file is restricted ({source})")
                    return
                plan.files.append((path, source, owner, self_name))
            elif target.kind == "include":
                try:
                    with open(target.value, "r", encoding="utf-8", errors="replace") as fh:
                        included = parse_forward(fh.read(1 << 20), target.value)
                except (OSError, AliasSyntaxError, ValueError) as exc:
                    plan.failure = TemporaryFailure("4.3.0", f"cannot open include file {target.value}: {exc}")
                    return
                self._apply(included, "include" if source == "alias" else source, owner, plan, depth + 1, seen,
                            self_name)
            else:
                addr = target.value.strip()
                if addr.startswith("\\"):
                    user = self._user(addr[1:].lower())
                    if user is None:
                        plan.failure = PermanentFailure("5.1.1", f'unknown user: "{addr[1:]}"')
                        return
                    plan.mailboxes.append((user, f"{user.pw_name}@{self.config.myhostname}"))
                    continue
                local, domain = split_address(addr)
                if not domain or self.resolver.is_local_domain(domain):
                    lkey = local.lower()
                    if lkey == self_name:
                        user = self._user(lkey)
                        if user is None:
                            plan.failure = PermanentFailure("5.1.1", f'unknown user: "{lkey}"')
                            return
                        plan.mailboxes.append((user, f"{user.pw_name}@{self.config.myhostname}"))
                    elif lkey in seen:
                        plan.failure = PermanentFailure("5.4.6", f"mail forwarding loop for {lkey}")
                        return
                    else:
                        self._expand(lkey, plan, depth + 1, seen, f"{lkey}@{domain or self.config.myorigin}")
                else:
                    plan.forwards.append(addr)

    # --------------------------------------------------------------- delivery
    async def _deliver_one(self, request: DeliveryRequest, rcpt: Recipient) -> Outcome:
        if has_delivered_to(request.message, rcpt.address):
            return PermanentFailure("5.4.6", f"mail forwarding loop for {rcpt.address}", "local")
        local, _domain = split_address(rcpt.address)
        plan = _Plan()
        try:
            await self._pool.call(self._expand, local, plan, 0, frozenset(), rcpt.address)
        except OSError as exc:  # a lookup that could not run (no descriptors): try again later
            return TemporaryFailure("4.3.0", f"temporary lookup failure: {exc.strerror or exc}", "local")
        if plan.failure is not None:
            return _with_relay(plan.failure)
        results: list[Outcome] = []
        for user, delivered_to in plan.mailboxes:
            results.append(await self._mailbox(request, rcpt, user))
        for command, source, owner, _name in plan.commands:
            results.append(await self._command(request, rcpt, command, source, owner))
        for path, source, owner, _name in plan.files:
            results.append(await self._file(request, rcpt, path, owner))
        if plan.forwards:
            results.append(await self._forward(request, rcpt, plan.forwards))
        if not results:
            return PermanentFailure("5.1.1", "alias expands to nothing", "local")
        return _combine(results)

    async def _mailbox(self, request: DeliveryRequest, rcpt: Recipient, user: pwd.struct_passwd) -> Outcome:
        home_mailbox = self.config.home_mailbox
        uid = gid = None
        if _is_root():
            uid, gid = user.pw_uid, user.pw_gid
        try:
            if not home_mailbox:
                path = os.path.join(self.config.mail_spool_directory, user.pw_name)
                await self._pool.call(self._check_writable, path, user)
                await self._pool.call(deliver_mbox, path, request.message, sender=request.sender,
                                        recipient=rcpt.address, original_recipient=rcpt.original,
                                        arrival_time=request.arrival_time, uid=uid, gid=gid)
                return Delivered("2.0.0", "delivered to mailbox", "local")
            path = os.path.join(user.pw_dir, home_mailbox)
            if home_mailbox.endswith("/"):
                await self._pool.call(self._check_writable, user.pw_dir, user)
                await _maildir(self._pool, self.ring, path, request.message, sender=request.sender,
                               recipient=rcpt.address, original_recipient=rcpt.original,
                               hostname=self.config.myhostname, uid=uid, gid=gid)
                return Delivered("2.0.0", "delivered to maildir", "local")
            await self._pool.call(self._check_writable, path, user)
            await self._pool.call(deliver_mbox, path, request.message, sender=request.sender,
                                    recipient=rcpt.address, original_recipient=rcpt.original,
                                    arrival_time=request.arrival_time, uid=uid, gid=gid)
            return Delivered("2.0.0", "delivered to mailbox", "local")
        except MailboxError as exc:
            return _with_relay(exc.outcome())

    @staticmethod
    def _check_writable(path: str, user: pwd.struct_passwd) -> None:
        """Unprivileged: say clearly why a system user's mailbox is out of reach."""
        if _is_root():
            return
        target = path if os.path.exists(path) else os.path.dirname(path) or "."
        if not os.access(target, os.W_OK):
            raise MailboxError(True, "4.2.0", f"cannot deliver to mailbox of user {user.pw_name}: {target} is not "
                                              f"writable by uid {os.geteuid()} (run as root, make it writable, "
                                              f"or use virtual mailboxes)")

    def _command_env(self, request: DeliveryRequest, rcpt: Recipient, user: pwd.struct_passwd | None) -> dict[str, str]:
        local, domain = split_address(rcpt.address)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "SENDER": request.sender, "RECIPIENT": rcpt.address,
               "ORIGINAL_RECIPIENT": rcpt.original, "LOCAL": local, "DOMAIN": domain, "QUEUE_ID": request.queue_id,
               "LANG": "C"}
        if user is not None:
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name, SHELL=user.pw_shell or "/bin/sh")
        else:
            env.update(HOME="/", USER=local, LOGNAME=local, SHELL="/bin/sh")
        return env

    def _command_privs(self, owner: pwd.struct_passwd | None):
        """:meth:`_privs` plus the command's working directory: the user's
        home when it exists (file system I/O, so in the pool with the rest)."""
        uid, gid, runas = self._privs(owner)
        cwd = runas.pw_dir if runas is not None and os.path.isdir(runas.pw_dir) else "/"
        return uid, gid, runas, cwd

    def _privs(self, owner: pwd.struct_passwd | None) -> tuple[int | None, int | None, pwd.struct_passwd | None]:
        if not _is_root():
            return None, None, owner
        if owner is None or owner.pw_uid == 0:
            try:
                owner = pwd.getpwnam(self.config.default_privs)
            except KeyError:
                raise MailboxError(True, "4.3.5", f"default_privs user {self.config.default_privs} does not exist")
        return owner.pw_uid, owner.pw_gid, owner

    async def _command(self, request: DeliveryRequest, rcpt: Recipient, command: str, source: str,
                       owner: pwd.struct_passwd | None) -> Outcome:
        try:
            uid, gid, runas, cwd = await self._pool.call(self._command_privs, owner)
        except MailboxError as exc:
            return _with_relay(exc.outcome())
        message = (mbox_from_line(request.sender, request.arrival_time) +
                   delivery_headers(request.sender, rcpt.address, rcpt.original).replace(b"\n", b"\r\n") +
                   request.message)
        outcome = await run_command(command, message, env=self._command_env(request, rcpt, runas),
                                    cwd=cwd, uid=uid, gid=gid, time_limit=self.config.command_time_limit)
        return _with_relay(outcome)

    async def _file(self, request: DeliveryRequest, rcpt: Recipient, path: str,
                    owner: pwd.struct_passwd | None) -> Outcome:
        uid = gid = None
        if _is_root():
            try:
                uid, gid, _ = await self._pool.call(self._privs, owner)
            except MailboxError as exc:
                return _with_relay(exc.outcome())
        try:
            await self._pool.call(deliver_mbox, path, request.message, sender=request.sender,
                                    recipient=rcpt.address, original_recipient=rcpt.original,
                                    arrival_time=request.arrival_time, uid=uid, gid=gid)
        except MailboxError as exc:
            return _with_relay(exc.outcome())
        return Delivered("2.0.0", f"delivered to file: {path}", "local")

    async def _forward(self, request: DeliveryRequest, rcpt: Recipient, addresses: list[str]) -> Outcome:
        if self.forward is None:
            return TemporaryFailure("4.3.0", "forwarding is not available", "local")
        message = delivery_headers(request.sender, rcpt.address, "").replace(b"\n", b"\r\n")
        # Only Delivered-To travels with the forwarded copy (loop detection).
        message = b"".join(line + b"\r\n" for line in message.split(b"\r\n") if line.startswith(b"Delivered-To:"))
        try:
            new_id = await self.forward(request.sender, addresses, message + request.message, request.queue_id,
                                        rcpt.original)
        except Exception as exc:  # spool errors: retry later
            return TemporaryFailure("4.3.0", f"cannot forward: {exc}", "local")
        return Delivered("2.0.0", f"forwarded as {new_id}", "local")


class VirtualAgent:
    """virtual(8): mailboxes under ``virtual_mailbox_base``."""

    name = "virtual"

    def __init__(self, config: Config, resolver: AddressResolver):
        self.config = config
        self.resolver = resolver
        self.base = os.path.realpath(config.virtual_mailbox_base) if config.virtual_mailbox_base else ""
        from ..tables import open_tables

        self._uid_maps = open_tables(config.virtual_uid_maps)
        self._gid_maps = open_tables(config.virtual_gid_maps)
        self._pool = MAILBOX_POOL  # mailbox writes
        self.ring = None  # the spool's io_uring, for Maildir files (set by the server)

    async def deliver(self, request: DeliveryRequest) -> list[Outcome]:
        return [await self._deliver_one(request, rcpt) for rcpt in request.recipients]

    def reload_tables(self) -> None:
        """Re-read virtual_uid_maps / virtual_gid_maps whose files changed
        (blocking: the server's table watcher calls it in a thread)."""
        self._uid_maps.reload_if_changed()
        self._gid_maps.reload_if_changed()

    def _ids(self, address: str) -> tuple[int | None, int | None] | TemporaryFailure:
        """virtual_uid_maps / virtual_gid_maps: full address, then @domain
        (tables opened at construction and re-read when their files change —
        no file I/O per delivery).  A configured map that does not know the
        recipient, or gives something that is not a uid/gid, is a
        configuration error: the delivery is deferred (Postfix virtual(8)),
        never made as root."""
        if not _is_root():
            return None, None
        ids: list[int | None] = []
        for name, tables in (("virtual_uid_maps", self._uid_maps), ("virtual_gid_maps", self._gid_maps)):
            if not tables:
                ids.append(None)
                continue
            value = tables.lookup(address)
            if value is None:
                value = tables.lookup("@" + split_address(address)[1])
            if value is None:
                return TemporaryFailure("4.3.5", f"mail system configuration error: recipient {address} "
                                                 f"not found in {name}", "virtual")
            text = value.strip()
            if not (text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < _ID_LIMIT):
                return TemporaryFailure("4.3.5", f'mail system configuration error: bad {name} result '
                                                 f'"{text}" for recipient {address}', "virtual")
            ids.append(int(text))
        return ids[0], ids[1]

    async def _deliver_one(self, request: DeliveryRequest, rcpt: Recipient) -> Outcome:
        if has_delivered_to(request.message, rcpt.address):
            return PermanentFailure("5.4.6", f"mail forwarding loop for {rcpt.address}", "virtual")
        relative = self.resolver.virtual_mailbox(rcpt.address)
        if relative is None:
            return PermanentFailure("5.1.1", f'unknown user: "{rcpt.address}"', "virtual")
        if not self.base:
            return TemporaryFailure("4.3.5", "virtual_mailbox_base is not set", "virtual")
        path = os.path.normpath(os.path.join(self.base, relative.lstrip("/")))
        if path != self.base and not path.startswith(self.base + os.sep):
            return TemporaryFailure("4.3.5", f"virtual mailbox path for {rcpt.address} leaves virtual_mailbox_base",
                                    "virtual")
        ids = self._ids(rcpt.address)
        if isinstance(ids, TemporaryFailure):
            return ids
        uid, gid = ids
        if _is_root() and uid is not None and uid < self.config.virtual_minimum_uid:
            return TemporaryFailure("4.3.5", f"virtual uid {uid} is below virtual_minimum_uid", "virtual")
        try:
            if relative.endswith("/"):
                await _maildir(self._pool, self.ring, path, request.message, sender=request.sender,
                               recipient=rcpt.address, original_recipient=rcpt.original,
                               hostname=self.config.myhostname, uid=uid, gid=gid)
                return Delivered("2.0.0", "delivered to maildir", "virtual")
            await self._pool.call(deliver_mbox, path, request.message, sender=request.sender,
                                    recipient=rcpt.address, original_recipient=rcpt.original,
                                    arrival_time=request.arrival_time, uid=uid, gid=gid)
            return Delivered("2.0.0", "delivered to mailbox", "virtual")
        except MailboxError as exc:
            return _with_relay(exc.outcome(), "virtual")


async def _maildir(pool: WorkerPool, ring, path: str, message: bytes, **kw) -> None:
    """A Maildir delivery: on the io_uring when there is one (no thread),
    else — or when the Maildir must be created first, or the file given to
    another owner — in the pool."""
    if (ring is not None and not ring.closed and ring.loop is asyncio.get_running_loop()
            and kw.get("uid") is None and kw.get("gid") is None):
        # A chain of completions, not a task: a delivery cancelled at
        # shutdown still finishes (the file delivered, or removed) instead
        # of leaving tmp/ files and descriptors behind; at worst the
        # message is delivered again later.
        if await deliver_maildir_ring(ring, path, message, sender=kw["sender"], recipient=kw["recipient"],
                                      original_recipient=kw["original_recipient"],
                                      hostname=kw["hostname"]) is not None:
            return
    await pool.call(deliver_maildir, path, message, **kw)


def _with_relay(outcome: Outcome, relay: str = "local") -> Outcome:
    if outcome.relay:
        return outcome
    return type(outcome)(outcome.status, outcome.text, relay)


def _combine(results: list[Outcome]) -> Outcome:
    """One recipient fanned out: any temporary failure defers it, else any
    permanent failure bounces it, else it is delivered."""
    for r in results:
        if isinstance(r, TemporaryFailure):
            return r
    for r in results:
        if isinstance(r, PermanentFailure):
            return r
    texts = sorted({r.text for r in results})
    return Delivered("2.0.0", ", ".join(texts)[:300], "local")
