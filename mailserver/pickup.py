"""Local submission pickup (Postfix: pickup).

The ``sendmail`` command (and ``queue requeue``) leave one file per message
in ``maildrop/`` (:class:`~mailserver.spool.MaildropRecord`); this task moves
each into the queue through :meth:`Cleanup.submit <mailserver.submit.Cleanup.submit>`,
like any other message, and deletes the maildrop file only after
``submit`` returned — i.e. after the queued copy is fsync'd.  A crash in
between leaves the file in maildrop (see below: it is not queued twice).

The maildrop file's name is the queue ID the message gets (``sendmail``
can report it); a file whose ID is already queued was queued before a crash
came between ``submit`` and the unlink, and is only removed — so a crash
there does not even cause a duplicate.

The directory is scanned every ``pickup_poll_interval`` and whenever
:meth:`Pickup.nudge` is called (the control socket's ``pickup`` request that
``sendmail`` sends after writing, and requeue), so new mail enters the queue
at once when the server is reachable and within the poll interval otherwise.

Log line, as Postfix's pickup (pflogsumm counts it as "received")::

    mailserver/pickup[PID]: QUEUEID: uid=1000 from=<user@example.com>

Failure: a file that is not a well-formed submission (or is a symlink, a
hard link, too large) goes to ``corrupt/`` with a warning; a spool error
leaves the file where it is, to be retried on the next scan.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from .config import Config
from .maillog import MailLog
from .spool import MAILDROP_SUFFIX, CorruptRecord, MaildropRecord, Spool, SpoolError, is_queue_id, new_queue_id
from .submit import Cleanup, Submission

# Room for the maildrop envelope line on top of message_size_limit.
ENVELOPE_SLACK = 1 << 20


class Pickup:
    def __init__(self, config: Config, *, spool: Spool, cleanup: Callable[[], Cleanup], maillog: MailLog,
                 make_cleanup: Callable[[float], Cleanup] | None = None):
        self.config = config
        self.spool = spool
        self._cleanup = cleanup  # the server's current Cleanup (it changes on reload)
        self._make_cleanup = make_cleanup  # a Cleanup whose clock is a requeued message's arrival time
        self.log = maillog.service("pickup")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.picked_up = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pickup")

    async def stop(self) -> None:
        """Stop after the file being submitted (if any) is done."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5.0)
            except asyncio.TimeoutError:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def nudge(self) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                names = await self.spool.blocking(self.spool.scan_maildrop)
            except OSError as exc:
                self.log(f"warning: cannot scan maildrop: {exc}")
                names = []
            for name in names:
                if self._stopping:
                    return
                await self.pick_up(name)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.05, self.config.pickup_poll_interval))
            except asyncio.TimeoutError:
                pass

    async def pick_up(self, name: str) -> str | None:
        """Move one maildrop file into the queue; returns the queue ID."""
        limit = (self.config.message_size_limit + ENVELOPE_SLACK) if self.config.message_size_limit else 0
        try:
            record: MaildropRecord = await self.spool.blocking(self.spool.read_maildrop, name, limit)
        except FileNotFoundError:
            return None  # deleted meanwhile (queue delete)
        except CorruptRecord as exc:
            await self.spool.blocking(self.spool.quarantine_maildrop, name, str(exc))
            return None
        except OSError as exc:
            self.log(f"warning: maildrop/{name}: {exc}")
            return None
        queue_id = name[:-len(MAILDROP_SUFFIX)]
        if not is_queue_id(queue_id):
            queue_id = new_queue_id()
        elif await self.spool.blocking(self.spool.message_state, queue_id) is not None:
            # Queued before a crash took us before the unlink: do not queue it twice.
            await self.spool.blocking(self.spool.remove_maildrop, name)
            return queue_id
        self.log(f"{queue_id}: uid={record.uid} from=<{record.sender}>")
        client_name, client_addr = _split_client(record.client) if record.requeued else ("localhost", "127.0.0.1")
        sub = Submission(sender=record.sender, recipients=list(record.recipients), content=record.content,
                         origin=record.origin if record.requeued else "local", client_name=client_name,
                         client_addr=client_addr, protocol="local", queue_id=queue_id,
                         add_missing_headers=not record.requeued, add_received=not record.requeued,
                         smtputf8=not (record.sender.isascii() and all(a.isascii() for a, _ in record.recipients)),
                         body_8bit=not record.content.isascii(), extra=dict(record.extra))
        if record.requeued and record.arrival and self._make_cleanup is not None:
            # postsuper -r keeps the original arrival time (queue lifetime).
            cleanup = self._make_cleanup(record.arrival)
        else:
            cleanup = self._cleanup()
        try:
            await cleanup.submit(sub)
        except SpoolError as exc:
            self.log(f"warning: {queue_id}: cannot queue maildrop/{name}: {exc}; will retry")
            return None
        await self.spool.blocking(self.spool.remove_maildrop, name)
        self.picked_up += 1
        return queue_id


def _split_client(client: str) -> tuple[str, str]:
    """``name[addr]`` → (name, addr)."""
    if client.endswith("]") and "[" in client:
        name, _, addr = client[:-1].partition("[")
        return name or "localhost", addr or "127.0.0.1"
    return "localhost", "127.0.0.1"
