"""The mail queue on disk (Postfix: mail_queue).  The only code that touches
queue files.

Layout under ``queue_directory``, one directory per queue state, as Postfix::

    maildrop/  incoming/  active/  deferred/  hold/  corrupt/

A queued message is one or two files named by its queue ID, in the same
state directory:

* ``ID.env`` — the envelope (:class:`Envelope`: sender, recipients with their
  per-recipient delivery state, arrival time, attempt count, last reasons) as
  one JSON record on one line.  Its presence is the commit point.
* the message content (CRLF lines, as cleaned up), written once and never
  modified.  A new message is written as **one** file (one fsync, as
  Postfix's single queue file): ``ID.env`` holds the envelope line with
  ``"inline":1`` and the content length ``"clen"``, a newline, then the
  content.  The first envelope update (after a delivery attempt) keeps that
  file as the content file — it is hard-linked to ``ID.msg`` — and replaces
  ``ID.env`` by a plain envelope whose ``"moff"`` says where the content
  starts in ``ID.msg`` (the length of the old envelope line).  From then on
  the envelope is replaced atomically (temp file in the same directory →
  fsync → rename) after every delivery attempt, as before; the content is
  never copied.  ``ID.msg`` files written by older versions (raw content,
  no ``moff``) are read as they are.

An ``ID.msg`` without an ``ID.env`` anywhere is an unfinished submission (or
a leftover of an interrupted move) and is removed by recovery.

For deferred messages the modification time of ``ID.env`` is the next
attempt time (Postfix does the same with its deferred queue files), so the
queue manager can index the deferred queue with ``stat`` alone.

``maildrop/`` holds local submissions that cleanup has not seen yet (the
``sendmail`` command, ``queue requeue``): one file ``ID.drop`` each, written
as ``ID.drop.tmp`` → fsync → rename, holding a one-line JSON envelope
(:class:`MaildropRecord`) followed by the raw content.  Those files may come
from unprivileged users (maildrop is mode 1733 when the server runs as
root), so :meth:`Spool.read_maildrop` trusts nothing: no symlinks, no hard
links, only regular files, a size cap, and the submitting uid taken from the
file's owner, never from its content.

The queue-tool methods (:meth:`Spool.delete_message`, :meth:`hold_message`,
:meth:`release_message`, :meth:`requeue_message`) are blocking and operate
on messages that nobody else is processing: the running queue manager calls
them for messages it has not activated, and the command line calls them
only while no server is running (it holds the pid file lock).

Durability: :meth:`Spool.enqueue` returns only after the queue file is
on disk and its directory entry is fsync'd.  The file is written with
``O_DSYNC``: fdatasync's guarantee (the data and the size needed to read
it back), which is how this module reads DESIGN.md's "fsync'd" for a new
file.  Directory fsyncs of concurrent enqueues are shared (group commit, in
the worker threads) without any caller returning before its own file is
durable.  A new file that a crash cut short was never acknowledged;
recovery removes it (a departure from "cannot be parsed → corrupt/": it
is not a message yet).  Moving a message between states
is one rename per file; recovery (:meth:`Spool.recover`) repairs a move that
a crash interrupted.

I/O engines (``io_engine``): with ``io_uring`` (the default where the
Linux kernel allows it; :mod:`mailserver.uring`) the event loop queues an
enqueue's system calls on the ring and the kernel runs them — create the
file (``O_EXCL|O_DSYNC``); then, together, the one synchronous writev and
a request for the directory's next fsync (:class:`~mailserver.uring.RingDirSync`,
shared by concurrent enqueues); close when both are done.  A plain move is
one rename and a removal one or two unlinks on the ring.  No worker thread
is involved, so no GIL hand-off: measured, accept +30-60 % against the
threads (docs/performance.md).  This departs from DESIGN.md's stack
("aiofiles / asyncio.to_thread for file I/O"); the threads stay as the
fallback (``io_engine = threads``, or ``auto`` where io_uring is refused).

Threads: otherwise every blocking call runs in the spool's own small pool
(:class:`~mailserver.workers.WorkerPool`, cheaper hand-offs than run_in_executor)
(``workers``, default 8).  An enqueue is exactly one call (create, one
synchronous write, directory group commit, close); moves and removals of the queue manager are
cheap metadata operations, collected while one batch runs and executed
together in one call per batch — fewer thread hand-offs (and GIL round
trips) per message.  Envelope updates, loads, deferrals and the queue
tools use the threads on both engines.

Failures: every OSError is raised to the caller as :class:`SpoolError`
(temporary); partially written files are removed before raising.  A record
that cannot be parsed is moved to ``corrupt/`` with a log line and never
stops the rest of the queue.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .uring import RingDirSync, chain_step, close_quietly
from .workers import DirSync, WorkerPool

STATES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
QUEUE_STATES = ("incoming", "active", "deferred", "hold")  # states that hold queued messages
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_id_lock = threading.Lock()
_last_usec = 0


_O_DSYNC = getattr(os, "O_DSYNC", 0)  # 0: no O_DSYNC here, an fsync follows the write
_NEW_QUEUE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | _O_DSYNC
_NOT_A_QUEUE_FILE = frozenset({errno.EISDIR, errno.ENOTDIR, errno.ELOOP})  # errors no retry can cure
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # one encoder, not one per record


class SpoolError(Exception):
    """A queue file operation failed (temporary: disk full, I/O error, ...)."""

    def __init__(self, text: str, *, errno_: int | None = None):
        super().__init__(text)
        self.errno = errno_

    @property
    def no_space(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class CorruptRecord(Exception):
    pass


class IncompleteRecord(CorruptRecord):
    """A one-file queue file shorter than its envelope line says, or empty:
    a write still in progress, or one a crash cut short (never acknowledged:
    the 250 comes only after the whole file is on disk)."""


class _Truncated(ValueError):
    pass


MAILDROP_MAGIC = b"MAILDROP 1 "
MAILDROP_SUFFIX = ".drop"
MAILDROP_TEMP_MAX_AGE = 86400.0  # Postfix postsuper -p: stale temp files go after a day


_B62_PAIRS = [a + b for a in _B62 for b in _B62]  # two digits per step


def _b62(n: int, width: int) -> str:
    """``n`` in ``width`` base-62 digits (the low ones, when it has more)."""
    out = []
    pairs = _B62_PAIRS
    for _ in range(width // 2):
        n, r = divmod(n, 3844)
        out.append(pairs[r])
    if width % 2:
        out.append(_B62[n % 62])
    out.reverse()
    return "".join(out)


def new_queue_id() -> str:
    """A unique, sortable, file-name-safe queue ID (Postfix long-ID style).

    Ten base-62 digits of the microsecond clock (strictly increasing within
    the process) and two random digits, so IDs made by other processes
    (``sendmail``) do not collide; creation uses O_EXCL anyway.
    """
    global _last_usec
    with _id_lock:
        usec = time.time_ns() // 1000
        if usec <= _last_usec:
            usec = _last_usec + 1
        _last_usec = usec
    return _b62(usec, 10) + _b62(random.randrange(62 * 62), 2)


def is_queue_id(text: str) -> bool:
    return 6 <= len(text) <= 32 and all(c in _B62 for c in text)


# --------------------------------------------------------------------------
# Envelope records


@dataclass(slots=True)
class RecipientState:
    """One recipient and what happened to it so far.

    ``status`` is ``pending`` (not yet delivered; may have a last ``reason``
    from a deferral), ``sent`` or ``bounced``.
    """

    address: str
    original: str = ""
    status: str = "pending"
    dsn: str = ""
    reason: str = ""
    relay: str = ""

    @property
    def done(self) -> bool:
        return self.status != "pending"


@dataclass(slots=True)
class Envelope:
    queue_id: str
    sender: str
    recipients: list[RecipientState]
    arrival_time: float
    size: int = 0
    attempts: int = 0
    next_attempt: float = 0.0
    warned: bool = False  # delay DSN sent (delay_warning_time)
    smtputf8: bool = False
    body_8bit: bool = False
    client: str = ""  # "name[addr]" for logs and DSNs
    origin: str = "smtp"  # smtp | local (sendmail) | api | bounce
    extra: dict = field(default_factory=dict)
    # Where the content is on disk (not part of the record's value):
    # inline True = after the envelope line in ID.env; False = in ID.msg from
    # content_offset on; None = not known (an Envelope built by hand).
    inline: bool | None = field(default=None, compare=False, repr=False)
    content_offset: int = field(default=0, compare=False, repr=False)

    @property
    def pending(self) -> list[int]:
        return [i for i, r in enumerate(self.recipients) if not r.done]

    def to_json(self, *, inline_length: int | None = None) -> bytes:
        """The envelope record.  With ``inline_length`` it is the first line
        of a one-file queue file whose content (that many bytes) follows."""
        doc = {
            "v": 1,
            "id": self.queue_id,
            "sender": self.sender,
            "arrival": self.arrival_time,
            "size": self.size,
            "attempts": self.attempts,
            "next": self.next_attempt,
            "warned": self.warned,
            "smtputf8": self.smtputf8,
            "body8": self.body_8bit,
            "client": self.client,
            "origin": self.origin,
            "extra": self.extra,
            "rcpt": [[r.address, r.original, r.status, r.dsn, r.reason, r.relay] for r in self.recipients],
        }
        if inline_length is not None:
            doc["inline"] = 1
            doc["clen"] = inline_length
        elif self.content_offset:
            doc["moff"] = self.content_offset
        return _JSON.encode(doc).encode("utf-8", "surrogateescape")

    @classmethod
    def from_json(cls, data: bytes, *, file_size: int | None = None) -> "Envelope":
        """Parse an envelope file: a plain record, or the first line of a
        one-file queue file (``data`` may hold just that line and
        ``file_size`` the size of the whole file, to check it is complete)."""
        size = len(data) if file_size is None else file_size
        end = data.find(b"\n")
        try:
            if not size:
                raise _Truncated("empty queue file")
            head = data if end < 0 else data[:end]
            doc = json.loads(head.decode("utf-8", "surrogateescape"))
            if isinstance(doc, dict) and doc.get("inline") is not None:
                clen = doc.get("clen")
                if not isinstance(clen, int):
                    raise ValueError("bad content length")
                if end < 0 or size < end + 1 + clen:
                    raise _Truncated("truncated queue file")
                if size != end + 1 + clen:
                    raise ValueError("data after the content")
            elif end >= 0 and data[end:].strip():
                raise ValueError("data after the envelope record")
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise ValueError("unknown record version")
            if not isinstance(doc.get("id"), str) or not isinstance(doc.get("sender"), str):
                raise ValueError("bad id or sender")
            if not isinstance(doc.get("rcpt"), list):
                raise ValueError("bad recipient list")
            for item in doc["rcpt"]:
                if not isinstance(item, list) or not 1 <= len(item) <= 6 or not all(isinstance(x, str) for x in item):
                    raise ValueError("bad recipient record")
            rcpts = [RecipientState(*item) for item in doc["rcpt"]]
            if not rcpts:
                raise ValueError("no recipients")
            for r in rcpts:
                if r.status not in ("pending", "sent", "bounced"):
                    raise ValueError(f"bad recipient status {r.status!r}")
            inline = doc.get("inline") is not None
            moff = doc.get("moff", 0)
            if not isinstance(moff, int) or moff < 0:
                raise ValueError("bad content offset")
            return cls(
                inline=inline,
                content_offset=end + 1 if inline else moff,
                queue_id=str(doc["id"]),
                sender=str(doc["sender"]),
                recipients=rcpts,
                arrival_time=float(doc["arrival"]),
                size=int(doc.get("size", 0)),
                attempts=int(doc.get("attempts", 0)),
                next_attempt=float(doc.get("next", 0.0)),
                warned=bool(doc.get("warned", False)),
                smtputf8=bool(doc.get("smtputf8", False)),
                body_8bit=bool(doc.get("body8", False)),
                client=str(doc.get("client", "")),
                origin=str(doc.get("origin", "smtp")),
                extra=dict(doc.get("extra") or {}),
            )
        except _Truncated as exc:
            raise IncompleteRecord(str(exc)) from None
        except (ValueError, KeyError, TypeError, UnicodeError) as exc:
            raise CorruptRecord(str(exc)) from None


@dataclass(slots=True)
class MaildropRecord:
    """One local submission waiting in ``maildrop/`` for the pickup service.

    ``recipients`` are (address, original address) pairs.  ``arrival`` is
    set for requeued mail (its original arrival time is kept, as
    ``postsuper -r`` does); ``uid`` is filled in from the file owner when
    the record is read.
    """

    sender: str
    recipients: list[tuple[str, str]]
    content: bytes  # CRLF lines, not dot-stuffed
    uid: int = -1
    arrival: float = 0.0
    requeued: bool = False
    client: str = ""
    origin: str = "local"
    extra: dict = field(default_factory=dict)
    name: str = ""  # file name in maildrop/ (set by write/read)

    def to_bytes(self) -> bytes:
        head = {"sender": self.sender, "rcpt": [list(r) for r in self.recipients], "arrival": self.arrival,
                "requeued": self.requeued, "client": self.client, "origin": self.origin, "extra": self.extra}
        line = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
        return MAILDROP_MAGIC + line + b"\n" + self.content

    @classmethod
    def from_bytes(cls, data: bytes, *, uid: int = -1, name: str = "") -> "MaildropRecord":
        if not data.startswith(MAILDROP_MAGIC):
            raise CorruptRecord("not a maildrop file")
        end = data.find(b"\n")
        if end < 0:
            raise CorruptRecord("truncated maildrop file")
        try:
            head = json.loads(data[len(MAILDROP_MAGIC):end].decode("utf-8", "surrogateescape"))
            if not isinstance(head, dict) or not isinstance(head.get("sender"), str):
                raise ValueError("bad sender")
            rcpts = head.get("rcpt")
            if not isinstance(rcpts, list) or not rcpts:
                raise ValueError("no recipients")
            pairs = []
            for item in rcpts:
                if (not isinstance(item, list) or len(item) != 2 or not all(isinstance(x, str) for x in item)):
                    raise ValueError("bad recipient")
                pairs.append((item[0], item[1]))
            for address in [head["sender"], *(a for pair in pairs for a in pair)]:
                if len(address) > 1000 or any(ord(ch) < 32 or ord(ch) == 127 for ch in address):
                    raise ValueError("bad address")
            extra = head.get("extra") or {}
            if not isinstance(extra, dict):
                raise ValueError("bad extra")
            return cls(sender=head["sender"], recipients=pairs, content=data[end + 1:], uid=uid,
                       arrival=float(head.get("arrival") or 0.0), requeued=bool(head.get("requeued")),
                       client=str(head.get("client") or ""), origin=str(head.get("origin") or "local"),
                       extra=extra, name=name)
        except (ValueError, TypeError, UnicodeError) as exc:
            raise CorruptRecord(f"bad maildrop envelope: {exc}") from None


# --------------------------------------------------------------------------
# Low-level file helpers (run in worker threads)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_fd(fd: int, pieces: list[bytes]) -> None:
    """Write all of ``pieces`` (one writev in the common case)."""
    total = sum(len(piece) for piece in pieces)
    done = os.writev(fd, pieces) if total else 0
    if done < total:
        view = memoryview(b"".join(pieces))[done:]
        while view:
            view = view[os.write(fd, view):]


def _write_new(path: str, data: bytes, *, sync: bool = True, exclusive: bool = True) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


_HEAD_CHUNK = 64 * 1024


def _read_envelope_file(path: str, *, with_content: bool) -> tuple[bytes, int]:
    """An envelope file's bytes and its size: all of it, or (``with_content``
    false) at least its first line — a one-file queue file's content is not
    read when only the envelope is wanted."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, _HEAD_CHUNK if not with_content else 1 << 20)
            if not chunk:
                return b"".join(chunks), total
            chunks.append(chunk)
            total += len(chunk)
            if not with_content and b"\n" in chunk:
                return b"".join(chunks), os.fstat(fd).st_size
    finally:
        os.close(fd)


def _content_of(data: bytes, env: "Envelope", msg_path: str) -> bytes:
    """A message's content: after the envelope line of a one-file queue
    file, else ``ID.msg`` from the envelope's content offset on."""
    if env.inline:
        return data[env.content_offset:]
    content = _read(msg_path)
    return content[env.content_offset:] if env.content_offset else content


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _run_all(calls: list[tuple[Callable, tuple]]) -> list[tuple[bool, object]]:
    """Run a batch of blocking calls in order; each one's (ok, result or
    exception), so one failure does not affect the others."""
    out: list[tuple[bool, object]] = []
    for fn, args in calls:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:
            out.append((False, exc))
    return out


class _RingEnqueue:
    """:meth:`Spool.enqueue` on the io_uring, as a chain of completions (no
    task, no thread): create ``ID.env`` (``O_EXCL|O_DSYNC``); then, at the
    same time, write the envelope line and the content (one synchronous
    writev) and ask for the directory's next fsync; when both are done,
    close.  A failure removes the file and fails the future with a
    :class:`SpoolError`."""

    __slots__ = ("spool", "ring", "future", "queue_id", "path", "pieces", "state", "fd", "pending",
                 "error", "header_length", "written", "total")

    def __init__(self, spool: "Spool", ring, queue_id: str, header: bytes, message: bytes, state: str):
        self.spool, self.ring, self.queue_id, self.state = spool, ring, queue_id, state
        self.future = ring.loop.create_future()
        self.path = os.fsencode(spool.path(state, queue_id, "env"))
        self.pieces = [header, bytes(message)]
        self.header_length = len(header)
        self.total = len(header) + len(message)
        self.written = 0
        self.fd = -1
        self.pending = 0
        self.error: SpoolError | None = None
        try:
            if spool.fault_hook is not None:
                spool.fault_hook("enqueue")
        except OSError as exc:
            self.future.set_exception(SpoolError(f"cannot write queue file {queue_id}: {exc.strerror}",
                                                 errno_=exc.errno))
            return
        ring.openat(self.path, _NEW_QUEUE_FILE, 0o600, self._opened)

    @chain_step
    def _opened(self, res: int) -> None:
        if res < 0:
            self._fail(f"cannot write queue file {self.queue_id}: {os.strerror(-res)}", -res, remove=False)
            return
        self.fd = res
        self.pending = 2
        self.ring.writev(res, self.pieces, self._wrote)
        try:
            syncer = self.spool._ring_dir_sync(self.state)
        except OSError as exc:  # the directory cannot be opened (EMFILE…): not durable
            self._note(f"cannot sync queue directory {self.state}: {exc.strerror}", exc.errno or errno.EIO)
            self._step()
            return
        syncer.request(self._synced)

    @chain_step
    def _wrote(self, res: int) -> None:
        if res < 0:
            self._note(f"cannot write queue file {self.queue_id}: {os.strerror(-res)}", -res)
        elif res == 0 and self.written < self.total:
            self._note(f"cannot write queue file {self.queue_id}: {os.strerror(errno.ENOSPC)}", errno.ENOSPC)
        else:
            self.written += res
            if self.written < self.total:  # a short write (rare): the rest, from where it stopped
                rest = (b"".join(self.pieces))[self.written:]
                self.ring.writev(self.fd, [rest], self._wrote, offset=self.written)
                return
        self._step()

    @chain_step
    def _synced(self, res: int) -> None:
        if res < 0:
            self._note(f"cannot sync queue directory {self.state}: {os.strerror(-res)}", -res)
        self._step()

    def _note(self, text: str, err: int) -> None:
        if self.error is None:
            self.error = SpoolError(text, errno_=err)

    def _crashed(self, exc: Exception) -> None:
        """A bug in a step (:func:`~mailserver.uring.chain_step`): the queue
        file is closed and removed (also when the caller went away), and the
        caller gets a SpoolError (451)."""
        fd, self.fd = self.fd, -1
        close_quietly(fd)
        _unlink_quiet(os.fsdecode(self.path))
        if not self.future.done():
            self.future.set_exception(SpoolError(f"cannot write queue file {self.queue_id}: internal error: "
                                                 f"{type(exc).__name__}: {exc}", errno_=errno.EIO))

    def _step(self) -> None:
        self.pending -= 1
        if self.pending:
            return
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)  # a regular file's close does not block
        except OSError as exc:
            self._note(f"cannot write queue file {self.queue_id}: {exc.strerror}", exc.errno or errno.EIO)
        if self.error is not None:
            self._fail(str(self.error), self.error.errno, remove=True)
            return
        if not self.future.done():
            self.future.set_result(self.header_length)

    def _fail(self, text: str, err: int | None, *, remove: bool) -> None:
        error = SpoolError(text, errno_=err)

        def removed(_res: int) -> None:
            if not self.future.done():
                self.future.set_exception(error)
        if not remove:
            removed(0)
        elif self.ring.closed:  # the ring failed meanwhile (rare): remove it here
            _unlink_quiet(os.fsdecode(self.path))
            removed(0)
        else:  # not durable: withdraw it (the client gets a 4xx and retries)
            self.ring.unlinkat(self.path, removed)


@dataclass
class RecoveryReport:
    requeued: int = 0  # active -> incoming
    temp_removed: int = 0
    orphans_removed: int = 0
    repaired: int = 0  # half-finished moves completed
    incomplete_removed: int = 0  # new queue files a crash cut short (never acknowledged)
    corrupt: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """A message found by a directory scan."""

    queue_id: str
    state: str
    mtime: float
    size: int  # size of ID.msg, 0 if unknown


class Spool:
    """The queue directory.  All methods are safe to call concurrently for
    different messages; the queue manager serialises work per message."""

    def __init__(self, directory: str, *, workers: int = 8, log: Callable[[str], None] | None = None,
                 io_engine: str = "threads"):
        self.directory = os.path.abspath(directory)
        self.io_engine = io_engine
        self._workers = WorkerPool(workers, name="spool")
        self._syncers: dict[str, DirSync] = {}
        self._syncers_lock = threading.Lock()
        self._ring = None  # an io_uring (start_io), else worker threads
        self.io_fallback_reason = ""  # why io_engine = auto uses the threads
        self._ring_syncers: dict[str, RingDirSync] = {}
        self._tasks: set[asyncio.Task] = set()
        self._batch: list[tuple[Callable, tuple, asyncio.Future]] = []
        self._batch_task: asyncio.Task | None = None
        self._log = log or (lambda text: None)
        # Fault injection seam for tests of disk errors (ENOSPC): a callable
        # run before each enqueue write (an OSError it raises is the write's).
        self.fault_hook: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ paths
    def path(self, state: str, queue_id: str, suffix: str) -> str:
        return os.path.join(self.directory, state, f"{queue_id}.{suffix}")

    def state_dir(self, state: str) -> str:
        return os.path.join(self.directory, state)

    @property
    def executor_calls(self) -> int:
        """Thread hand-offs so far (tests/test_perf_regressions.py)."""
        return self._workers.calls

    async def _call(self, fn, *args):
        return await self._workers.run(fn, *args)

    async def _batched(self, fn, *args):
        """Run a short blocking metadata operation (rename, unlink) in the
        next batch: the operations queued while one batch runs go to the
        worker threads together, in one call, in order."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._batch.append((fn, args, fut))
        if self._batch_task is None:
            self._batch_task = loop.create_task(self._run_batches())
            self._tasks.add(self._batch_task)
            self._batch_task.add_done_callback(self._tasks.discard)
        return await fut

    async def _run_batches(self) -> None:
        try:
            await asyncio.sleep(0)  # let the callers of this loop iteration join
            while self._batch:
                items, self._batch = self._batch, []
                try:
                    results = await self._call(_run_all, [(fn, args) for fn, args, _fut in items])
                except BaseException as exc:  # executor gone (shutdown), cancelled
                    for _fn, _args, fut in items:
                        if not fut.done():
                            fut.set_exception(exc if isinstance(exc, Exception) else SpoolError("spool stopped"))
                    raise
                for (_fn, _args, fut), (ok, value) in zip(items, results):
                    if fut.done():
                        continue
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)
        finally:
            self._batch_task = None

    # ------------------------------------------------------------------ setup
    def create_directories(self) -> None:
        """Create the queue hierarchy (blocking; called at start-up)."""
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        for state in STATES:
            os.makedirs(self.state_dir(state), mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.directory, "pid"), mode=0o755, exist_ok=True)
        os.makedirs(os.path.join(self.directory, "public"), mode=0o755, exist_ok=True)
        # maildrop must accept files from the sendmail command run by local users.
        os.chmod(self.state_dir("maildrop"), 0o1733 if os.geteuid() == 0 else 0o700)

    def check(self) -> list[str]:
        """Problems with the queue hierarchy, for ``mailserver check``."""
        problems = []
        for state in STATES:
            path = self.state_dir(state)
            if not os.path.isdir(path):
                problems.append(f"{path}: missing (it is created on start)")
            elif not os.access(path, os.W_OK | os.X_OK):
                problems.append(f"{path}: not writable by uid {os.geteuid()}")
        return problems

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._ring is not None and not self._ring.closed:
            await self._ring.drain()
        self.stop_io()
        await asyncio.to_thread(self._workers.close, True)  # a slow fsync must not stall the loop
        for syncer in self._syncers.values():
            syncer.close()

    # ------------------------------------------------------------------ enqueue
    async def enqueue(self, envelope: Envelope, message: bytes, state: str = "incoming") -> None:
        """Make a new message durable in ``state``.  Returns only when the
        queue file and its directory entry are on disk.

        ONE worker-thread call (:meth:`_enqueue_sync`): create ``ID.env``
        (``O_EXCL``: never replaces the message that owns this ID) with
        ``O_DSYNC``, write the envelope line and the content (one writev that
        returns when both are on disk), then share the directory fsync with
        concurrent enqueues (:class:`DirSync`), close.  Four system calls, so
        four GIL round trips for the worker: the former temp file + fsync +
        rename + existence check cost 10-12 % of the accept rate (measured).
        A file is complete on disk before its ``250``; one that a crash cut
        short is never acknowledged, is recognised by its length (the
        envelope line records the content length) and removed by
        :meth:`recover`.  The event loop only encodes the envelope.  (The
        loop must not create the file itself: a file creation waits for the
        journal while another thread's fsync commits it, and that would stall
        every session — measured: 10-20 % fewer messages per second.)"""
        self.enqueued(envelope, await self.start_enqueue(envelope, message, state))

    def start_enqueue(self, envelope: Envelope, message: bytes, state: str = "incoming") -> asyncio.Future:
        """:meth:`enqueue` as a worker future whose result goes to
        :meth:`enqueued` (for a caller that must shield the write from its
        own cancellation without a task per message)."""
        header = envelope.to_json(inline_length=len(message)) + b"\n"
        ring = self._ring_here()
        if ring is not None:
            return _RingEnqueue(self, ring, envelope.queue_id, header, message, state).future
        return self._workers.run(self._enqueue_sync, envelope, header, message, state)

    def _ring_here(self):
        """The io_uring to use from the running loop, if any."""
        ring = self._ring
        if ring is None or ring.closed or ring.loop is not asyncio.get_running_loop():
            return None
        return ring

    def start_io(self) -> str:
        """Choose how queue files are written, from the running event loop
        (``io_engine``): an io_uring bound to this loop, or worker threads.
        Returns the engine in use; raises SpoolError when ``io_uring`` was
        asked for and the kernel refuses it."""
        if self._ring is not None and not self._ring.closed:
            return "io_uring"
        if self.io_engine == "threads":
            return "threads"
        from .uring import open_ring
        self.stop_io()  # a ring retired meanwhile, and its directories
        try:
            self._ring = open_ring(asyncio.get_running_loop())
        except OSError as exc:
            self._ring = None
            if self.io_engine == "io_uring":
                raise SpoolError(f"io_engine = io_uring, but {exc.strerror or exc}", errno_=exc.errno) from None
            self.io_fallback_reason = exc.strerror or str(exc)
            return "threads"
        return "io_uring"

    def stop_io(self) -> None:
        """Close the io_uring (operations still in flight fail with
        ECANCELED: :meth:`close` drains it first)."""
        for syncer in self._ring_syncers.values():
            syncer.close()
        self._ring_syncers = {}
        if self._ring is not None:
            self._ring.close()

    @property
    def ring(self):
        """The io_uring queue files are written with (None: worker threads);
        the local delivery agents share it for Maildir files."""
        return self._ring if self._ring is not None and not self._ring.closed else None

    @property
    def engine(self) -> str:
        return "io_uring" if self._ring is not None and not self._ring.closed else "threads"

    def _ring_dir_sync(self, state: str) -> RingDirSync:
        syncer = self._ring_syncers.get(state)
        if syncer is None:
            syncer = self._ring_syncers[state] = RingDirSync(self._ring, self.state_dir(state))
        return syncer

    @staticmethod
    def enqueued(envelope: Envelope, header_length: int) -> None:
        """Record where a freshly queued envelope's content is (one file)."""
        envelope.inline = True
        envelope.content_offset = header_length

    def _enqueue_files(self, envelope: Envelope, message: bytes, state: str) -> None:
        """Blocking form of :meth:`enqueue` (for tools and tests that run
        outside the event loop)."""
        header = envelope.to_json(inline_length=len(message)) + b"\n"
        self._enqueue_sync(envelope, header, message, state)
        envelope.inline = True
        envelope.content_offset = len(header)

    def _enqueue_sync(self, envelope: Envelope, header: bytes, message: bytes, state: str) -> int:
        """The blocking enqueue; returns the envelope line's length."""
        queue_id = envelope.queue_id
        env_path = self.path(state, queue_id, "env")
        syncer = self._dir_sync(state)
        syncer.announce()  # a directory fsync about to start waits for us (briefly)
        try:
            if self.fault_hook is not None:
                self.fault_hook("enqueue")
            fd = os.open(env_path, _NEW_QUEUE_FILE, 0o600)
        except OSError as exc:
            syncer.withdraw()
            raise SpoolError(f"cannot write queue file {queue_id}: {exc.strerror}", errno_=exc.errno) from None
        except BaseException:
            syncer.withdraw()
            raise
        try:
            try:
                _write_fd(fd, [header, message])  # on disk when it returns (O_DSYNC)
                if not _O_DSYNC:
                    os.fsync(fd)
            except OSError as exc:
                syncer.withdraw()
                _unlink_quiet(env_path)
                raise SpoolError(f"cannot write queue file {queue_id}: {exc.strerror}", errno_=exc.errno) from None
            try:
                syncer.sync(announced=True)
            except OSError as exc:
                # Not durable: withdraw it (the client gets a 4xx and retries).
                _unlink_quiet(env_path)
                raise SpoolError(f"cannot sync queue directory {state}: {exc.strerror}", errno_=exc.errno) from None
        finally:
            os.close(fd)
        return len(header)

    def _dir_sync(self, state: str) -> DirSync:
        syncer = self._syncers.get(state)
        if syncer is None:
            with self._syncers_lock:
                syncer = self._syncers.get(state)
                if syncer is None:
                    syncer = self._syncers[state] = DirSync(self.state_dir(state))
        return syncer

    def _remove_files(self, queue_id: str, state: str, inline: bool | None = None) -> None:
        _unlink_quiet(self.path(state, queue_id, "env"))
        if not inline:
            _unlink_quiet(self.path(state, queue_id, "msg"))

    # ------------------------------------------------------------------ read
    async def load(self, queue_id: str, state: str, *, with_message: bool = True) -> tuple[Envelope, bytes | None]:
        """Read a message.  Raises CorruptRecord for an unparseable envelope,
        FileNotFoundError when it is gone, SpoolError for I/O errors."""
        return await self._call(self._load, queue_id, state, with_message)

    def _load(self, queue_id: str, state: str, with_message: bool) -> tuple[Envelope, bytes | None]:
        try:
            data, size = _read_envelope_file(self.path(state, queue_id, "env"), with_content=with_message)
            env = Envelope.from_json(data, file_size=size)
            if env.queue_id != queue_id:
                raise CorruptRecord(f"record names queue ID {env.queue_id}")
            if env.inline or not with_message:
                msg = _content_of(data, env, "") if with_message else None
            else:
                try:
                    msg = _content_of(data, env, self.path(state, queue_id, "msg"))
                except FileNotFoundError:
                    raise CorruptRecord("message content is missing") from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in _NOT_A_QUEUE_FILE:  # will never read better: quarantine, don't retry
                raise CorruptRecord(f"cannot read queue file: {exc.strerror}") from None
            raise SpoolError(f"cannot read queue file {queue_id}: {exc.strerror}", errno_=exc.errno) from None
        return env, msg

    async def load_message(self, queue_id: str, state: str) -> bytes:
        """A message's content.  Raises FileNotFoundError when it is gone,
        CorruptRecord for an unreadable envelope, SpoolError for I/O errors."""
        return (await self.load(queue_id, state))[1] or b""

    # ------------------------------------------------------------------ update / move / remove
    async def update(self, envelope: Envelope, state: str) -> None:
        """Atomically replace the envelope record (per-recipient state)."""
        await self._call(self._update, envelope, state)

    def _update(self, envelope: Envelope, state: str) -> None:
        env_path = self.path(state, envelope.queue_id, "env")
        tmp_path = env_path + ".tmp"
        try:
            if envelope.inline is None:
                self._learn_layout(envelope, state)
            if envelope.inline:
                # One-file queue file: it becomes the content file (a hard
                # link, no copy) before the envelope is replaced.
                msg_path = self.path(state, envelope.queue_id, "msg")
                link_tmp = msg_path + ".tmp"
                _unlink_quiet(link_tmp)
                os.link(env_path, link_tmp)
                os.rename(link_tmp, msg_path)
                envelope.inline = False
            _write_new(tmp_path, envelope.to_json(), exclusive=False)
            os.rename(tmp_path, env_path)
        except OSError as exc:
            _unlink_quiet(tmp_path)
            raise SpoolError(f"cannot update queue file {envelope.queue_id}: {exc.strerror}", errno_=exc.errno) from None

    def _learn_layout(self, envelope: Envelope, state: str) -> None:
        """Where the content of a message is, for an Envelope object that
        was not read from (or written to) the queue: from the file."""
        try:
            data, size = _read_envelope_file(self.path(state, envelope.queue_id, "env"), with_content=False)
            disk = Envelope.from_json(data, file_size=size)
        except (CorruptRecord, FileNotFoundError):
            envelope.inline, envelope.content_offset = False, 0
            return
        envelope.inline, envelope.content_offset = disk.inline, disk.content_offset

    async def move(self, queue_id: str, from_state: str, to_state: str, *, mtime: float | None = None,
                   envelope: Envelope | None = None, hint: Envelope | None = None) -> None:
        """Move a message to another state; optionally write a new envelope
        first (so per-recipient results are durable before the move) and set
        the envelope's mtime (the next attempt time in ``deferred/``).
        ``hint``: the message's in-memory envelope, to skip renaming an
        ``ID.msg`` that a one-file message does not have.  A plain move is
        a cheap metadata operation and runs batched."""
        inline = (hint or envelope).inline if (hint or envelope) is not None else None
        if envelope is None and mtime is None and inline and from_state != to_state:
            ring = self._ring_here()
            if ring is not None:  # one file, one rename, no thread
                try:
                    await ring.renameat(os.fsencode(self.path(from_state, queue_id, "env")),
                                        os.fsencode(self.path(to_state, queue_id, "env")))
                except FileNotFoundError:
                    raise
                except OSError as exc:
                    raise SpoolError(f"cannot move queue file {queue_id}: {exc.strerror}",
                                     errno_=exc.errno) from None
                return
        if envelope is None:
            await self._batched(self._move, queue_id, from_state, to_state, mtime, None, inline)
        else:
            await self._call(self._move, queue_id, from_state, to_state, mtime, envelope, inline)

    def _move(self, queue_id: str, from_state: str, to_state: str, mtime: float | None,
              envelope: Envelope | None, inline: bool | None = None) -> None:
        try:
            if envelope is not None:
                self._update(envelope, from_state)
                inline = envelope.inline
            if from_state != to_state:
                # Content first, envelope last: the envelope's directory is the state.
                if not inline:
                    try:
                        os.rename(self.path(from_state, queue_id, "msg"), self.path(to_state, queue_id, "msg"))
                    except FileNotFoundError:
                        if inline is False or not os.path.exists(self.path(from_state, queue_id, "env")):
                            raise
                        # a one-file message: nothing to rename but the envelope
                os.rename(self.path(from_state, queue_id, "env"), self.path(to_state, queue_id, "env"))
            if mtime is not None:
                os.utime(self.path(to_state, queue_id, "env"), (mtime, mtime))
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise SpoolError(f"cannot move queue file {queue_id}: {exc.strerror}", errno_=exc.errno) from None

    async def blocking(self, fn, *args):
        """Run one of the blocking methods (queue tools, maildrop) in the
        spool's worker threads."""
        return await self._call(fn, *args)

    async def remove(self, queue_id: str, state: str, *, hint: Envelope | None = None) -> None:
        """Delete a message: envelope first (the commit point), then content
        (``hint``: the in-memory envelope; a one-file message has no
        ``ID.msg``).  Runs batched with the other metadata operations."""
        inline = hint.inline if hint is not None else None
        ring = self._ring_here()
        if ring is None or inline is None:
            await self._batched(self._remove_files, queue_id, state, inline)
            return
        suffixes = ("env",) if inline else ("env", "msg")
        for suffix in suffixes:  # envelope first: the commit point
            try:
                await ring.unlinkat(os.fsencode(self.path(state, queue_id, suffix)))
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ scanning
    def scan(self, state: str) -> list[QueueEntry]:
        """Messages in one state directory (blocking; run in a thread)."""
        out = []
        path = self.state_dir(state)
        try:
            it = os.scandir(path)
        except FileNotFoundError:
            return out
        with it:
            for entry in it:
                name = entry.name
                if not name.endswith(".env"):
                    continue
                qid = name[:-4]
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                out.append(QueueEntry(qid, state, st.st_mtime, 0))
        out.sort(key=lambda e: e.queue_id)
        return out

    async def scan_async(self, state: str) -> list[QueueEntry]:
        return await self._call(self.scan, state)

    def locate(self, queue_id: str) -> str | None:
        """The state directory holding a message's envelope (blocking)."""
        for state in QUEUE_STATES:
            if os.path.exists(self.path(state, queue_id, "env")):
                return state
        return None

    # ------------------------------------------------------------------ recovery
    def recover(self) -> RecoveryReport:
        """Make the queue consistent after a crash (blocking; start-up only).

        * temp files are removed, and so is a new queue file in
          ``incoming/`` that a crash cut short (shorter than its envelope
          line says: it was never acknowledged);
        * a move interrupted between its two renames is completed (the
          content follows the envelope);
        * content without an envelope is an unfinished submission: removed,
          and so is the ``ID.msg`` link of a one-file message whose first
          envelope update a crash cut short;
        * an envelope of a message that was in flight (``incoming``,
          ``active``) without content, or one that cannot be parsed, goes to
          ``corrupt/`` with a log line;
        * everything ``active`` returns to ``incoming``.

        ``deferred`` and ``hold`` files are listed, not read: start-up time
        must not grow with the size of the deferred queue (100 000 deferred
        messages are 100 000 file reads, seconds from a cold cache).  Like
        Postfix's qmgr, the queue manager finds a corrupt one when it next
        reads it (:meth:`load` raises :class:`CorruptRecord`) and quarantines
        it then.
        """
        report = RecoveryReport()
        envs: dict[str, str] = {}
        msgs: dict[str, list[str]] = {}
        for state in QUEUE_STATES:
            d = self.state_dir(state)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                full = os.path.join(d, name)
                if name.endswith(".tmp"):
                    _unlink_quiet(full)
                    report.temp_removed += 1
                elif name.endswith(".env"):
                    qid = name[:-4]
                    if qid in envs:  # same envelope in two states: keep the first (QUEUE_STATES order)
                        self._quarantine_file(full, report, f"{qid}: duplicate envelope in {state}")
                        continue
                    envs[qid] = state
                elif name.endswith(".msg"):
                    msgs.setdefault(name[:-4], []).append(state)
        for qid, states in msgs.items():
            if qid not in envs:
                for state in states:
                    _unlink_quiet(self.path(state, qid, "msg"))
                report.orphans_removed += 1
                continue
            home = envs[qid]
            if home not in states:
                os.rename(self.path(states[0], qid, "msg"), self.path(home, qid, "msg"))
                report.repaired += 1
                states = [home] + states[1:]
            for extra in states:
                if extra != home:
                    _unlink_quiet(self.path(extra, qid, "msg"))
        for qid, state in envs.items():
            if state not in ("incoming", "active"):
                continue
            try:
                data, size = _read_envelope_file(self.path(state, qid, "env"), with_content=False)
                env = Envelope.from_json(data, file_size=size)
                if env.queue_id != qid:
                    raise CorruptRecord(f"record names queue ID {env.queue_id}")
                if not env.inline and not os.path.exists(self.path(state, qid, "msg")):
                    raise CorruptRecord("message content is missing")
                if env.inline and qid in msgs:
                    # A first envelope update cut short after its hard link: the
                    # one-file envelope still holds the content; the link is
                    # redundant (left, it would outlive the message).
                    _unlink_quiet(self.path(state, qid, "msg"))
                    report.orphans_removed += 1
            except IncompleteRecord as exc:
                if state == "incoming" and qid not in msgs:
                    # A new queue file that a crash cut short: never acknowledged.
                    _unlink_quiet(self.path(state, qid, "env"))
                    report.incomplete_removed += 1
                    # "warning:" first: a line "QID: removed" is qmgr's end of a delivered message.
                    self._log(f"warning: {qid}: removed incomplete queue file from {state}/ "
                              f"({exc}; no reply was sent for it)")
                else:
                    self.quarantine(qid, state, str(exc))
                    report.corrupt.append(qid)
                continue
            except (CorruptRecord, OSError) as exc:
                self.quarantine(qid, state, str(exc))
                report.corrupt.append(qid)
                continue
            if state == "active":
                self._move(qid, "active", "incoming", None, None, env.inline)
                report.requeued += 1
        for state in QUEUE_STATES:
            if os.path.isdir(self.state_dir(state)):
                _fsync_dir(self.state_dir(state))
        return report

    def quarantine(self, queue_id: str, state: str, why: str) -> None:
        """Move a message's files to ``corrupt/`` (blocking)."""
        self._log(f"warning: {queue_id}: corrupt queue file moved to corrupt/: {why}")
        for suffix in ("env", "msg"):
            src = self.path(state, queue_id, suffix)
            if os.path.exists(src):
                os.replace(src, self.path("corrupt", queue_id, suffix))

    async def quarantine_async(self, queue_id: str, state: str, why: str) -> None:
        await self._call(self.quarantine, queue_id, state, why)

    def _quarantine_file(self, path: str, report: RecoveryReport, why: str) -> None:
        self._log(f"warning: corrupt queue file moved to corrupt/: {why}")
        os.replace(path, os.path.join(self.state_dir("corrupt"), os.path.basename(path) + f".{int(time.time())}"))
        report.corrupt.append(os.path.basename(path))

    # ------------------------------------------------------------------ maildrop (local submission)
    def write_maildrop(self, record: MaildropRecord) -> str:
        """Put a submission into ``maildrop/`` atomically (blocking; the
        ``sendmail`` command and requeue use it).  Returns the file name."""
        directory = self.state_dir("maildrop")
        data = record.to_bytes()
        while True:
            name = new_queue_id() + MAILDROP_SUFFIX
            final = os.path.join(directory, name)
            tmp = final + ".tmp"
            try:
                _write_new(tmp, data)  # O_EXCL, fsync'd; removed again on error
            except FileExistsError:
                continue
            except OSError as exc:
                raise SpoolError(f"cannot write maildrop file: {exc.strerror}", errno_=exc.errno) from None
            try:
                if os.path.exists(final):  # cannot happen with unique IDs; never overwrite
                    _unlink_quiet(tmp)
                    continue
                os.rename(tmp, final)
            except OSError as exc:
                _unlink_quiet(tmp)
                raise SpoolError(f"cannot write maildrop file: {exc.strerror}", errno_=exc.errno) from None
            break
        try:
            _fsync_dir(directory)
        except PermissionError:
            pass  # maildrop is write-only (1733) for local users: the rename is what we can do
        except OSError as exc:
            raise SpoolError(f"cannot sync maildrop: {exc.strerror}", errno_=exc.errno) from None
        record.name = name
        return name

    def scan_maildrop(self, *, now: float | None = None) -> list[str]:
        """Names of complete maildrop files, oldest first (blocking).  Temp
        files older than a day (a sendmail that died) are removed."""
        directory = self.state_dir("maildrop")
        names = []
        now = time.time() if now is None else now
        try:
            it = os.scandir(directory)
        except FileNotFoundError:
            return names
        with it:
            for entry in it:
                if entry.name.endswith(MAILDROP_SUFFIX):
                    names.append(entry.name)
                elif entry.name.endswith(".tmp"):
                    try:
                        if now - entry.stat(follow_symlinks=False).st_mtime > MAILDROP_TEMP_MAX_AGE:
                            _unlink_quiet(entry.path)
                    except OSError:
                        pass
        names.sort()
        return names

    def read_maildrop(self, name: str, max_size: int) -> MaildropRecord:
        """Read one maildrop file (blocking).  Raises FileNotFoundError when
        it is gone, CorruptRecord for anything that is not a well-formed
        submission (symlink, hard link, special file, oversized, garbage)."""
        path = os.path.join(self.state_dir("maildrop"), name)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise CorruptRecord(f"cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptRecord("not a regular file")
            if st.st_nlink != 1:
                raise CorruptRecord("file has other hard links")
            if max_size and st.st_size > max_size:
                raise CorruptRecord(f"file too large ({st.st_size} bytes)")
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        return MaildropRecord.from_bytes(b"".join(chunks), uid=st.st_uid, name=name)

    def remove_maildrop(self, name: str) -> None:
        _unlink_quiet(os.path.join(self.state_dir("maildrop"), name))

    def quarantine_maildrop(self, name: str, why: str) -> None:
        """Move a bad maildrop file to ``corrupt/`` (never silently dropped)."""
        self._log(f"warning: maildrop/{name}: moved to corrupt/: {why}")
        src = os.path.join(self.state_dir("maildrop"), name)
        try:
            os.replace(src, os.path.join(self.state_dir("corrupt"), name))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ queue tools (postsuper, postqueue)
    def message_state(self, queue_id: str, states: Iterable[str] = QUEUE_STATES) -> str | None:
        """The state holding a message among ``states`` (``maildrop`` finds
        ``ID.drop``), or None (blocking)."""
        for state in states:
            if state == "maildrop":
                if os.path.exists(os.path.join(self.state_dir("maildrop"), queue_id + MAILDROP_SUFFIX)):
                    return state
            elif os.path.exists(self.path(state, queue_id, "env")):
                return state
        return None

    def read_envelope(self, queue_id: str, state: str) -> tuple[Envelope, float]:
        """A message's envelope and the mtime of its envelope file (blocking)."""
        path = self.path(state, queue_id, "env")
        try:
            data, size = _read_envelope_file(path, with_content=False)
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise SpoolError(f"cannot read queue file {queue_id}: {exc.strerror}", errno_=exc.errno) from None
        env = Envelope.from_json(data, file_size=size)
        return env, mtime

    def delete_message(self, queue_id: str, states: Iterable[str] = QUEUE_STATES) -> str | None:
        """postsuper -d: remove a message; returns the state it was in."""
        state = self.message_state(queue_id, states)
        if state == "maildrop":
            self.remove_maildrop(queue_id + MAILDROP_SUFFIX)
        elif state is not None:
            self._remove_files(queue_id, state)
        return state

    def hold_message(self, queue_id: str, states: Iterable[str] = ("incoming", "active", "deferred")) -> str | None:
        """postsuper -h: move a message to ``hold/``; returns the old state."""
        state = self.message_state(queue_id, [s for s in states if s not in ("hold", "maildrop")])
        if state is not None:
            self._move(queue_id, state, "hold", None, None)
        return state

    def release_message(self, queue_id: str, now: float | None = None) -> bool:
        """postsuper -H: move a held message to ``deferred/``, due now."""
        if self.message_state(queue_id, ("hold",)) is None:
            return False
        self._move(queue_id, "hold", "deferred", time.time() if now is None else now, None)
        return True

    def requeue_message(self, queue_id: str, states: Iterable[str] = QUEUE_STATES) -> str | None:
        """postsuper -r: copy a message's pending recipients into a new
        maildrop submission (cleanup runs again, aliases and routing are
        re-evaluated), then remove the old queue files.  The maildrop file
        is durable before anything is removed."""
        state = self.message_state(queue_id, [s for s in states if s != "maildrop"])
        if state is None:
            return None
        env, msg = self._load(queue_id, state, True)
        assert msg is not None
        pending = [(r.address, r.original or r.address) for r in env.recipients if not r.done]
        if pending:
            record = MaildropRecord(sender=env.sender, recipients=pending, content=msg, arrival=env.arrival_time,
                                    requeued=True, client=env.client, origin=env.origin,
                                    extra={k: v for k, v in env.extra.items() if k != "dsn_owed"})
            self.write_maildrop(record)
        self._remove_files(queue_id, state)
        return state

    def queue_counts(self) -> dict[str, int]:
        """Messages per state directory (blocking)."""
        counts = {}
        for state in STATES:
            suffix = MAILDROP_SUFFIX if state == "maildrop" else ".env"
            try:
                counts[state] = sum(1 for name in os.listdir(self.state_dir(state)) if name.endswith(suffix))
            except OSError:
                counts[state] = 0
        return counts

    # ------------------------------------------------------------------ space
    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    async def free_bytes_async(self) -> int:
        return await self._call(self.free_bytes)


def all_states() -> Iterable[str]:
    return STATES
