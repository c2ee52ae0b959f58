"""Write one message into a UNIX mbox file or a Maildir (Postfix local(8)).

Responsibility: the file-system half of local delivery — the byte format
(From_ line, ``Return-Path``/``Delivered-To``/``X-Original-To``, ``>From``
quoting, CRLF -> LF), locking, durability (fsync) and cleanup on failure.
It does not decide *where* to deliver or *as whom*: the caller passes the
full mailbox path (already chosen from local configuration, never from text
supplied by a remote party) and the ``uid``/``gid`` that created files and
directories must belong to.

Contract:

* The functions are **blocking**; call them through ``asyncio.to_thread``.
  They use ``time.sleep`` only while waiting for a mailbox lock, bounded by
  ``lock_timeout``.
* ``message`` is the stored form (CRLF line endings, header, blank line,
  body, no dot-stuffing).  Files get LF line endings; a message that does not
  end in a newline gets one.
* :func:`deliver_mbox` appends ``From <sender> <asctime>`` + delivery headers
  + the message with every line matching ``^>*From `` quoted by one more
  ``>`` (mboxrd) + one empty line.  The From_ date is ``arrival_time`` in
  local time (now when ``arrival_time <= 0``); the null sender is written as
  ``MAILER-DAEMON``.  Locking: a ``path + ".lock"`` dotlock (``O_EXCL``;
  stale after 300 s) *then* an exclusive ``fcntl`` (``lockf``) lock on the
  mailbox, both retried until ``lock_timeout``.  The dotlock also serialises
  threads of this process (``fcntl`` locks are per process).  The mailbox is
  opened with ``O_NOFOLLOW`` and must be a regular file with one hard link
  (and owned by ``uid`` when given); a new file is created mode 0600 and
  ``fchown``-ed to ``uid``/``gid``.  On any write/fsync error the file is
  truncated back to its previous size.  Both locks are always released.
* :func:`deliver_maildir` writes delivery headers + message (no From_
  line, no quoting) to ``tmp/<unique>`` with ``O_CREAT|O_EXCL`` mode 0600,
  fsyncs, renames into ``new/``, fsyncs ``new/``, and returns the path in
  ``new/``.  As Postfix, it tries the file first and creates
  ``maildir/{tmp,new,cur}`` (and missing parents, mode 0700, ``chown``-ing
  directories it created) only when ``tmp/`` or ``new/`` is missing — no
  directory checks per delivery.  The fsync of ``new/`` is shared by
  concurrent deliveries to the same Maildir (group commit): each returns
  only after an fsync of ``new/`` that started after its own rename.  The unique name is
  ``<sec>.P<pid>Q<counter>M<usec>R<random>.<hostname>`` with ``/`` and ``:``
  in the hostname written as ``\\057`` and ``\\072`` (an empty ``hostname``
  means ``socket.gethostname()``).  On failure nothing is left in ``tmp/``
  or ``new/``.
* :func:`delivery_headers` writes ``Return-Path``, ``Delivered-To`` and
  ``X-Original-To`` (the latter omitted only when ``original_recipient`` is
  empty, as Postfix does).  CR, LF and NUL are removed from the values.
* :func:`has_delivered_to` is the Postfix mail-loop check (5.4.6).

Failure: every problem raises :class:`MailboxError` with ``temporary``,
``status`` (an RFC 3463 code) and ``text``; use :meth:`MailboxError.outcome`
to turn it into a delivery outcome.  As in Postfix, mailbox problems are
deferred, not bounced: ENOSPC/EDQUOT/EFBIG -> temporary ``4.2.2`` (mailbox
full); lock timeouts, unsafe files (symlink, not a regular file, several
links, wrong owner), missing spool directory, EACCES/EROFS and any other
``OSError`` -> temporary ``4.2.0``.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import os
import random
import re
import socket
import stat
import threading
import time

from mailserver.delivery import Outcome, PermanentFailure, TemporaryFailure
from mailserver.uring import chain_step, close_quietly
from mailserver.workers import DirSync

__all__ = [
    "MailboxError",
    "deliver_mbox",
    "deliver_maildir",
    "delivery_headers",
    "has_delivered_to",
    "mbox_from_line",
    "STALE_LOCK_AGE",
]

#: A dotlock file older than this many seconds is considered stale.
STALE_LOCK_AGE = 300.0

_CHUNK = 64 * 1024
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class MailboxError(Exception):
    """A mailbox delivery failed; ``temporary`` says whether to retry."""

    def __init__(self, temporary: bool, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.temporary = temporary
        self.status = status
        self.text = text

    def outcome(self) -> Outcome:
        """The equivalent :class:`TemporaryFailure`/:class:`PermanentFailure`."""
        if self.temporary:
            return TemporaryFailure(self.status, self.text)
        return PermanentFailure(self.status, self.text)


def _os_error(exc: OSError, what: str) -> MailboxError:
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL_ERRNOS:
        return MailboxError(True, "4.2.2", f"{what}: {reason} (mailbox full)")
    return MailboxError(True, "4.2.0", f"{what}: {reason}")


# --------------------------------------------------------------------------
# Message format
# --------------------------------------------------------------------------

_UNSAFE = re.compile(r"[\r\n\x00]")


def _clean(value: str) -> bytes:
    text = _UNSAFE.sub("", value)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def delivery_headers(sender: str, recipient: str, original_recipient: str) -> bytes:
    """``Return-Path``, ``Delivered-To`` and ``X-Original-To`` lines (LF).

    ``X-Original-To`` is omitted only when ``original_recipient`` is empty.
    """
    out = b"Return-Path: <" + _clean(sender) + b">\n"
    out += b"Delivered-To: " + _clean(recipient) + b"\n"
    if _clean(original_recipient):
        out += b"X-Original-To: " + _clean(original_recipient) + b"\n"
    return out


def mbox_from_line(sender: str, arrival_time: float) -> bytes:
    """The UNIX From_ line: ``From sender Sat Nov 21 10:00:00 2026\\n``.

    The null sender becomes ``MAILER-DAEMON``; whitespace inside the sender
    (a quoted local part) is replaced by ``_`` so the line stays parseable.
    ``arrival_time <= 0`` means now.
    """
    when = arrival_time if arrival_time > 0 else time.time()
    who = _clean(sender).strip() or b"MAILER-DAEMON"
    who = re.sub(rb"\s", b"_", who)
    return b"From " + who + b" " + time.asctime(time.localtime(when)).encode("ascii") + b"\n"


def _to_lf(message: bytes) -> bytes:
    data = message.replace(b"\r\n", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data


_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


def _quote_from(data: bytes) -> bytes:
    return _FROM_LINE.sub(rb">\1", data)


def has_delivered_to(message: bytes, recipient: str) -> bool:
    """True when a ``Delivered-To:`` header in the header section equals
    ``recipient`` (case-insensitive, surrounding whitespace ignored).

    Only the header section (up to the first empty line) is examined; folded
    header lines are unfolded.  Works for CRLF and LF messages.
    """
    want = recipient.strip().lower()
    # Only the header section matters: do not split the body into lines.
    end = message.find(b"\n\n")
    end_crlf = message.find(b"\r\n\r\n")
    if end < 0 or (0 <= end_crlf < end):
        end = end_crlf
    head = message if end < 0 else message[:end]
    if b"delivered-to" not in head.lower():
        return False
    headers: list[bytes] = []
    for line in head.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            break
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1] += line
        else:
            headers.append(line)
    for header in headers:
        name, sep, value = header.partition(b":")
        if not sep or name.rstrip().lower() != b"delivered-to":
            continue
        got = value.decode("utf-8", "surrogateescape").strip().lower()
        if got == want:
            return True
    return False


# --------------------------------------------------------------------------
# Low-level helpers
# --------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:_CHUNK])
        view = view[n:]


def _sleep_until(deadline: float, attempt: int) -> bool:
    """Sleep a little (backing off); False when the deadline has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    time.sleep(min(0.05 * (2 ** min(attempt, 5)), 1.0, remaining))
    return True


def _dotlock(path: str, deadline: float) -> str:
    lock = path + ".lock"
    attempt = 0
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            try:
                st = os.lstat(lock)
                if time.time() - st.st_mtime > STALE_LOCK_AGE:
                    # Re-check that it is still the same stale file before removal.
                    again = os.lstat(lock)
                    if (again.st_ino, again.st_dev) == (st.st_ino, st.st_dev):
                        os.unlink(lock)
                    continue
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _os_error(exc, f"cannot remove stale lock file {lock}") from None
        except OSError as exc:
            raise _os_error(exc, f"cannot create lock file {lock}") from None
        else:
            os.close(fd)
            return lock
        if not _sleep_until(deadline, attempt):
            raise MailboxError(
                True, "4.2.0", f"unable to lock {path} for exclusive access: {lock} exists"
            )
        attempt += 1


def _fcntl_lock(fd: int, path: str, deadline: float) -> None:
    attempt = 0
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise _os_error(exc, f"cannot lock {path}") from None
        if not _sleep_until(deadline, attempt):
            raise MailboxError(
                True, "4.2.0", f"unable to lock {path} for exclusive access: locked by another process"
            )
        attempt += 1


def _open_mbox(path: str, uid: int | None, gid: int | None) -> int:
    """Open (creating if needed) the mbox for appending, refusing unsafe files."""
    base = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    for _ in range(3):
        try:
            fd = os.open(path, base | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _os_error(exc, f"cannot create mailbox {path}") from None
        else:
            try:
                if uid is not None or gid is not None:
                    os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            except OSError as exc:
                os.close(fd)
                raise _os_error(exc, f"cannot set owner of mailbox {path}") from None
            return fd
        try:
            # O_NONBLOCK: do not hang on a FIFO planted in place of the mailbox.
            fd = os.open(path, base | os.O_NONBLOCK)
        except FileNotFoundError:
            continue  # removed between the two opens: try to create it again
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise MailboxError(
                    True, "4.2.0", f"cannot open mailbox {path}: is a symbolic link"
                ) from None
            raise _os_error(exc, f"cannot open mailbox {path}") from None
        try:
            st = os.fstat(fd)
            problem = None
            if not stat.S_ISREG(st.st_mode):
                problem = "not a regular file"
            elif st.st_nlink != 1:
                problem = f"file has {st.st_nlink} hard links"
            elif uid is not None and st.st_uid != uid:
                problem = f"file has wrong owner (uid {st.st_uid}, expected {uid})"
            if problem:
                raise MailboxError(True, "4.2.0", f"cannot open mailbox {path}: {problem}")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise MailboxError(True, "4.2.0", f"cannot open mailbox {path}: file keeps disappearing")


# --------------------------------------------------------------------------
# mbox
# --------------------------------------------------------------------------


def deliver_mbox(
    path: str,
    message: bytes,
    *,
    sender: str,
    recipient: str,
    original_recipient: str,
    arrival_time: float,
    uid: int | None = None,
    gid: int | None = None,
    lock_timeout: float = 10.0,
) -> None:
    """Append ``message`` to the mbox file ``path``; raises :class:`MailboxError`."""
    head = mbox_from_line(sender, arrival_time) + delivery_headers(
        sender, recipient, original_recipient
    )
    body = _quote_from(_to_lf(message)) + b"\n"

    spool = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(spool):
        raise MailboxError(True, "4.2.0", f"mail spool directory {spool} does not exist")

    deadline = time.monotonic() + lock_timeout
    lock = _dotlock(path, deadline)
    try:
        fd = _open_mbox(path, uid, gid)
        try:
            _fcntl_lock(fd, path, deadline)
            try:
                orig_size = os.fstat(fd).st_size
            except OSError as exc:
                raise _os_error(exc, f"cannot stat mailbox {path}") from None
            try:
                _write_all(fd, head)
                _write_all(fd, body)
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, orig_size)
                except OSError:
                    pass
                raise _os_error(exc, f"error writing message to {path}") from None
        finally:
            try:
                os.close(fd)  # also releases the fcntl lock
            except OSError:
                pass  # the data was fsync-ed (or the error is already raised)
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass


# --------------------------------------------------------------------------
# Maildir
# --------------------------------------------------------------------------

_counter = itertools.count(1)
_pid = os.getpid()
_rng = random.Random(os.urandom(16))


def _after_fork() -> None:
    global _pid, _rng
    _pid = os.getpid()
    _rng = random.Random(os.urandom(16))


os.register_at_fork(after_in_child=_after_fork)


def _maildir_hostname(hostname: str) -> str:
    name = hostname or socket.gethostname() or "localhost"
    return name.replace("/", "\\057").replace(":", "\\072")


def _unique_name(hostname: str) -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return (
        f"{sec}.P{_pid}Q{next(_counter)}M{usec}R{_rng.getrandbits(32):08x}"
        f".{_maildir_hostname(hostname)}"
    )


def _make_dirs(path: str, uid: int | None, gid: int | None) -> None:
    """mkdir -p with mode 0700, chowning only the directories created here."""
    missing: list[str] = []
    cur = os.path.abspath(path)
    while not os.path.isdir(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue
        if uid is not None or gid is not None:
            os.chown(d, -1 if uid is None else uid, -1 if gid is None else gid)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirSync(DirSync):
    """:class:`~mailserver.workers.DirSync` for a Maildir's ``new/``: the
    directory is opened for each fsync (no descriptor kept per mailbox)."""

    def _fsync(self) -> None:
        _fsync_dir(self.path)


_syncers: dict[str, _DirSync] = {}
_syncers_lock = threading.Lock()


def _new_dir_syncer(path: str) -> _DirSync:
    syncer = _syncers.get(path)
    if syncer is None:
        with _syncers_lock:
            syncer = _syncers.get(path)
            if syncer is None:
                if len(_syncers) >= 4096:
                    _syncers.clear()  # in-flight callers keep their object
                syncer = _syncers[path] = _DirSync(path)
    return syncer


# O_SYNC: every write returns when it is on disk with the file's metadata
# (its owner included, as fsync would): one system call less per delivery,
# one GIL round trip less for the worker thread.
_O_SYNC = getattr(os, "O_SYNC", 0)


def _open_new(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | _O_SYNC, 0o600)


def _make_maildir(maildir: str, uid: int | None, gid: int | None) -> None:
    try:
        for sub in ("tmp", "new", "cur"):
            _make_dirs(os.path.join(maildir, sub), uid, gid)
    except OSError as exc:
        raise _os_error(exc, f"cannot create maildir {maildir}") from None


def _maildir_plan(maildir: str, message: bytes, sender: str, recipient: str, original_recipient: str,
                  hostname: str) -> tuple[bytes, str, str, str]:
    """What both delivery paths write: the file's bytes (delivery headers,
    LF line ends), ``new/``, and the message's unique paths in ``tmp/`` and
    ``new/``."""
    data = delivery_headers(sender, recipient, original_recipient) + _to_lf(message)
    newdir = os.path.join(maildir, "new")
    name = _unique_name(hostname)
    return data, newdir, os.path.join(maildir, "tmp", name), os.path.join(newdir, name)


def deliver_maildir(
    maildir: str,
    message: bytes,
    *,
    sender: str,
    recipient: str,
    original_recipient: str,
    hostname: str,
    uid: int | None = None,
    gid: int | None = None,
) -> str:
    """Deliver into ``maildir``; return the new file's path under ``new/``.

    Raises :class:`MailboxError`; nothing is left behind on failure.
    """
    data, newdir, tmpfile, newfile = _maildir_plan(maildir, message, sender, recipient, original_recipient, hostname)
    syncer = _new_dir_syncer(newdir)
    syncer.announce()
    try:
        newfile = _write_maildir_file(maildir, data, tmpfile, newfile, uid, gid)
    except BaseException:
        syncer.withdraw()
        raise
    try:
        syncer.sync(announced=True)
    except OSError as exc:
        # Not durable: withdraw it so that the retry does not duplicate it.
        _unlink_quietly(newfile)
        raise _os_error(exc, f"cannot sync maildir {newdir}") from None
    return newfile


def _write_maildir_file(maildir: str, data: bytes, tmpfile: str, newfile: str, uid: int | None,
                        gid: int | None) -> str:
    try:
        fd = _open_new(tmpfile)
    except FileNotFoundError:
        _make_maildir(maildir, uid, gid)
        try:
            fd = _open_new(tmpfile)
        except OSError as exc:
            raise _os_error(exc, f"cannot create {tmpfile}") from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise _os_error(exc, f"cannot create maildir {maildir}") from None
        raise _os_error(exc, f"cannot create {tmpfile}") from None
    try:
        try:
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            _write_all(fd, data)  # durable when it returns (O_SYNC)
            if not _O_SYNC:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmpfile, newfile)
        except FileNotFoundError:
            if not os.path.exists(tmpfile):
                raise
            _make_maildir(maildir, uid, gid)  # new/ was missing
            os.rename(tmpfile, newfile)
    except (OSError, MailboxError) as exc:
        _unlink_quietly(tmpfile)
        if isinstance(exc, MailboxError):
            raise
        raise _os_error(exc, f"maildir delivery to {maildir} failed") from None
    return newfile


def deliver_maildir_ring(
    ring,
    maildir: str,
    message: bytes,
    *,
    sender: str,
    recipient: str,
    original_recipient: str,
    hostname: str,
) -> "asyncio.Future[str | None]":
    """:func:`deliver_maildir` on an io_uring (:mod:`mailserver.uring`),
    from the event loop, without a worker thread: create ``tmp/NAME``
    (``O_EXCL|O_NOFOLLOW|O_SYNC``), write it, close, rename it into
    ``new/``, then share the next fsync of ``new/`` with concurrent
    deliveries.  Returns a future of the new file's path, or of None, having
    changed nothing, when the Maildir (its ``tmp/`` or ``new/``) does not
    exist yet: the caller then runs :func:`deliver_maildir`, which creates
    it.  Fails with :class:`MailboxError`, leaving nothing behind.

    The steps are a chain of completions (:class:`_RingMaildir`), not a
    task: a caller that is cancelled (shutdown) does not stop it; the file
    is delivered or removed, and the ring is held (:meth:`Ring.hold`) until
    then.

    Files are owned by the server's user: a delivery that must give the
    file to another owner (``fchown``, a journal update: not on the loop)
    goes to :func:`deliver_maildir` in the pool."""
    data, newdir, tmpfile, newfile = _maildir_plan(maildir, message, sender, recipient, original_recipient, hostname)
    return _RingMaildir(ring, maildir, data, newdir, tmpfile, newfile).future


_RING_MAILDIR_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | _O_SYNC


class _RingMaildir:
    """The steps of :func:`deliver_maildir_ring`, each started by the
    completion of the one before (as the spool's ``_RingEnqueue``)."""

    __slots__ = ("ring", "future", "maildir", "data", "newdir", "tmpfile", "newfile", "fd", "written", "finished")

    def __init__(self, ring, maildir: str, data: bytes, newdir: str, tmpfile: str, newfile: str):
        self.ring = ring
        self.future: asyncio.Future[str | None] = ring.loop.create_future()
        self.maildir, self.data, self.newdir, self.tmpfile, self.newfile = maildir, data, newdir, tmpfile, newfile
        self.fd = -1
        self.written = 0
        self.finished = False
        ring.hold()  # Ring.drain() waits for the whole chain
        try:
            ring.openat(os.fsencode(tmpfile), _RING_MAILDIR_FLAGS, 0o600, self._opened)
        except BaseException:
            ring.release()
            raise

    def _crashed(self, exc: Exception) -> None:
        """A bug in a step (:func:`~mailserver.uring.chain_step`): 4.3.0, nothing left behind."""
        if self.finished:
            return
        fd, self.fd = self.fd, -1
        close_quietly(fd)
        _unlink_quietly(self.tmpfile)
        _unlink_quietly(self.newfile)  # (a unique name: nobody else's file)
        self._finish(None, MailboxError(True, "4.3.0", f"maildir delivery to {self.maildir} failed: "
                                                       f"internal error: {type(exc).__name__}: {exc}"))

    @chain_step
    def _opened(self, res: int) -> None:
        if res in (-errno.ENOENT, -errno.ENOTDIR):
            self._finish(None)  # no Maildir yet: deliver_maildir creates it (and reports a file in the way)
        elif res < 0:
            self._finish(None, _os_error(OSError(-res, os.strerror(-res)), f"cannot create {self.tmpfile}"))
        else:
            self.fd = res
            self._write()

    def _write(self) -> None:
        done = self.written
        self.ring.writev(self.fd, [self.data[done:] if done else self.data], self._wrote, offset=done)

    @chain_step
    def _wrote(self, res: int) -> None:
        if res == 0:
            res = -errno.ENOSPC
        if res > 0:
            self.written += res
            if self.written < len(self.data):  # a short write (rare): the rest, from where it stopped
                self._write()
                return
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)  # durable already (O_SYNC); a regular file's close does not block
        except OSError as exc:
            if res > 0:
                res = -(exc.errno or errno.EIO)
        if res < 0:
            self._failed(self.tmpfile, -res, f"maildir delivery to {self.maildir} failed")
            return
        self.ring.renameat(os.fsencode(self.tmpfile), os.fsencode(self.newfile), self._renamed)

    @chain_step
    def _renamed(self, res: int) -> None:
        if res == -errno.ENOENT:
            # new/ is missing (deliver_maildir creates it), or someone removed
            # the tmp/ file meanwhile (deliver_maildir writes a new one): the
            # thread path either way, with no stat() on the event loop.
            self._withdraw(self.tmpfile, None)
        elif res < 0:
            self._failed(self.tmpfile, -res, f"maildir delivery to {self.maildir} failed")
        else:
            from mailserver.uring import RingDirSync

            syncers = self.ring.dir_syncers
            syncer = syncers.get(self.newdir)
            if syncer is None:
                if len(syncers) >= 4096:
                    syncers.clear()  # in-flight requests keep their object
                syncer = syncers[self.newdir] = RingDirSync(self.ring, self.newdir, keep_open=False)
            syncer.request(self._synced)

    @chain_step
    def _synced(self, res: int) -> None:
        if res < 0:
            # Not durable: withdraw it so that the retry does not duplicate it.
            self._failed(self.newfile, -res, f"cannot sync maildir {self.newdir}")
        else:
            self._finish(self.newfile)

    def _failed(self, path: str, err: int, what: str) -> None:
        self._withdraw(path, _os_error(OSError(err, os.strerror(err)), what))

    def _withdraw(self, path: str, error: MailboxError | None) -> None:
        """Remove ``path`` (quietly), then finish with ``error`` (or None)."""
        if self.ring.closed:  # the ring failed meanwhile (rare): remove it here
            _unlink_quietly(path)
            self._finish(None, error)
        else:
            self.ring.unlinkat(os.fsencode(path), lambda _res: self._finish(None, error))

    def _finish(self, result: str | None, error: MailboxError | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.ring.release()
        fut = self.future
        if fut.done():  # the caller went away (cancelled)
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
