"""A minimal io_uring for the event loop (Linux), through ctypes.

Why: a durable queue-file write is four system calls (create, a synchronous
write, the directory fsync, close).  Done in worker threads, each of them
releases the GIL and must take it back from the busy event-loop thread: the
benchmark measured ~1.3 ms per message of worker threads waiting for the
GIL and the loop paying for the hand-offs, against ~0.3 ms of actual disk
work (docs/performance.md).  With io_uring the loop thread only *queues*
the operations (a 64-byte record each, one ``io_uring_enter`` per loop
iteration for all of them) and the kernel runs the blocking ones in its own
workers; completions come back through an eventfd the loop watches.  No
thread of ours, no GIL hand-off.

:class:`Ring` offers the few operations the spool needs (``openat``,
``writev``, ``fsync``, ``close``, ``renameat``, ``unlinkat``), each
returning an asyncio future of the system call's result (an OSError for a
negative one), or taking a plain callback (no future) for callers that
chain steps themselves.

:func:`open_ring` returns ``None`` where io_uring is unavailable (not Linux,
an old kernel, ``kernel.io_uring_disabled``, a seccomp profile that refuses
it, an opcode missing) — callers fall back to worker threads.

Memory ordering: the kernel reads the submission queue only inside
``io_uring_enter`` (no SQPOLL), a system call made by this thread after its
stores; completions are read only after the eventfd said they were posted
(the eventfd's lock orders the kernel's stores before our loads).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import platform
import struct
import sys
from typing import Callable

__all__ = ["Ring", "open_ring", "available"]

# system call numbers (the same on x86-64 and the asm-generic table of aarch64/riscv64…)
_SYS_SETUP = {"x86_64": 425, "aarch64": 425, "riscv64": 425, "ppc64le": 425, "s390x": 425}
_SYS_ENTER = 426
_SYS_REGISTER = 427

_OFF_SQ_RING = 0
_OFF_CQ_RING = 0x8000000
_OFF_SQES = 0x10000000
_FEAT_SINGLE_MMAP = 1 << 0
_FEAT_NODROP = 1 << 1
_REGISTER_EVENTFD = 4
_REGISTER_PROBE = 8
_ENTER_GETEVENTS = 1
_SQ_CQ_OVERFLOW = 1 << 1  # IORING_SQ_CQ_OVERFLOW, in the SQ ring's flags word

OP_WRITEV = 2
OP_FSYNC = 3
OP_OPENAT = 18
OP_CLOSE = 19
OP_RENAMEAT = 35
OP_UNLINKAT = 36
_NEEDED_OPS = (OP_WRITEV, OP_FSYNC, OP_OPENAT, OP_CLOSE, OP_RENAMEAT, OP_UNLINKAT)
FSYNC_DATASYNC = 1
AT_FDCWD = -100

_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe (64 bytes)
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe (16 bytes)
_U32 = struct.Struct("<I")
assert _SQE.size == 64 and _CQE.size == 16


class _SQOff(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _CQOff(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", _SQOff), ("cq_off", _CQOff)]


_libc = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


def _check(res: int, what: str) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return res


def _address_ctypes(data: bytes) -> int:
    """The address of a bytes object's buffer (no copy; keep ``data`` alive)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def _bytes_data_offset() -> int | None:
    """Where CPython keeps a bytes object's data, from the object's address
    (``id``): one addition instead of two ctypes objects per buffer.  Checked
    here against ctypes' own answer; None when it does not hold."""
    if sys.implementation.name != "cpython":
        return None
    probe = os.urandom(16)
    offset = bytes.__basicsize__ - 1  # PyBytesObject up to ob_sval
    if _address_ctypes(probe) != id(probe) + offset or ctypes.string_at(id(probe) + offset, 16) != probe:
        return None
    return offset


_BYTES_OFFSET = _bytes_data_offset()
if _BYTES_OFFSET is not None:
    def _address(data: bytes) -> int:
        """The address of a bytes object's buffer (no copy; keep ``data`` alive)."""
        if data.__class__ is not bytes:  # (a bytearray's data is elsewhere; ctypes refused it too)
            raise TypeError(f"io_uring buffers must be bytes, not {type(data).__name__}")
        return id(data) + _BYTES_OFFSET  # type: ignore[operator]
else:  # pragma: no cover - not CPython
    _address = _address_ctypes


Callback = Callable[[int], None]
_ABANDONED: list = []  # operations of closed rings the kernel may still be using


def close_quietly(fd: int) -> None:
    """Close ``fd`` (if any) on a chain's failure path, ignoring errors."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def chain_step(method):
    """A completion callback of a chain of ring operations (the spool's
    enqueue, a Maildir delivery): an unexpected exception in it (a bug) goes
    to the chain's ``_crashed(exc)``, which fails the chain's future and
    cleans up, instead of to :meth:`Ring._call`'s log line alone, which
    would leave the chain's caller (and :meth:`Ring.drain`) waiting for good."""
    def step(self, res: int) -> None:
        try:
            method(self, res)
        except Exception as exc:  # noqa: BLE001
            self._crashed(exc)
    step.__name__ = method.__name__
    step.__doc__ = method.__doc__
    return step


class Ring:
    """One io_uring bound to one event loop.  Not thread-safe: call it from
    the loop's thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, entries: int = 256):
        self.loop = loop
        syscall = _syscall()
        params = _Params()
        fd = _check(syscall(_SYS_SETUP[platform.machine()], ctypes.c_uint(entries), ctypes.byref(params)),
                    "io_uring_setup")
        self.fd = fd
        self._maps: list[mmap.mmap] = []
        self._efd = -1
        try:
            sq_size = params.sq_off.array + params.sq_entries * 4
            cq_size = params.cq_off.cqes + params.cq_entries * _CQE.size
            if params.features & _FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
            self._sq = self._map(sq_size, _OFF_SQ_RING)
            self._cq = self._sq if params.features & _FEAT_SINGLE_MMAP else self._map(cq_size, _OFF_CQ_RING)
            self._sqes = self._map(params.sq_entries * _SQE.size, _OFF_SQES)
            self.entries = params.sq_entries
            self._sq_mask = _U32.unpack_from(self._sq, params.sq_off.ring_mask)[0]
            self._sq_tail_off = params.sq_off.tail
            self._sq_head_off = params.sq_off.head
            self._sq_flags_off = params.sq_off.flags
            self._cq_mask = _U32.unpack_from(self._cq, params.cq_off.ring_mask)[0]
            self._cq_head_off = params.cq_off.head
            self._cq_tail_off = params.cq_off.tail
            self._cqes_off = params.cq_off.cqes
            array = params.sq_off.array
            for i in range(params.sq_entries):  # identity: SQ slot i uses SQE i
                _U32.pack_into(self._sq, array + 4 * i, i)
            self._tail = _U32.unpack_from(self._sq, self._sq_tail_off)[0]
            self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            efd = ctypes.c_int(self._efd)
            _check(syscall(_SYS_REGISTER, fd, _REGISTER_EVENTFD, ctypes.byref(efd), 1), "io_uring_register")
            self._probe(syscall)
        except BaseException:
            self._release()
            raise
        self._to_submit = 0  # SQEs written since the last io_uring_enter
        self._in_flight = 0  # submitted or written, not completed
        self._waiting: list[tuple] = []  # operations that found the ring full
        self._ops: dict[int, tuple] = {}  # user_data -> (callback, keep-alive)
        self._next = 1
        self._flush_scheduled = False
        self._drained: list[asyncio.Future] = []
        self.users = 0  # hold() / release()
        self.dir_syncers: dict[str, RingDirSync] = {}  # Maildir new/ directories (delivery.mailbox)
        self.closed = False
        self.submitted = 0  # operations (tests, statistics)
        self.enters = 0
        self.overflows = 0  # times completions had to be fetched from the kernel's overflow list
        self.on_overflow: Callable[[], None] | None = None  # told at most once a minute (a log line)
        self._overflow_told: float | None = None  # loop time of the last
        loop.add_reader(self._efd, self._reap)

    def _map(self, size: int, offset: int) -> mmap.mmap:
        mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(mm)
        return mm

    def _probe(self, syscall) -> None:
        """Refuse a kernel that lacks one of the opcodes used here."""
        size = 16 + 256 * 8  # struct io_uring_probe + 256 io_uring_probe_op
        buf = ctypes.create_string_buffer(size)
        _check(syscall(_SYS_REGISTER, self.fd, _REGISTER_PROBE, buf, 256), "io_uring probe")
        last_op = buf.raw[0]
        for op in _NEEDED_OPS:
            flags = struct.unpack_from("<H", buf.raw, 16 + op * 8 + 2)[0] if op <= last_op else 0
            if not flags & 1:  # IO_URING_OP_SUPPORTED
                raise OSError(errno.ENOSYS, f"io_uring: opcode {op} not supported")

    # ------------------------------------------------------------ submission
    def _push(self, op: int, fd: int, addr: int, length: int, off: int, op_flags: int,
              callback: Callback, keep: object) -> None:
        if self.closed:  # retired meanwhile (close, a failed io_uring_enter): answered, never lost
            self.loop.call_soon(self._call, callback, -errno.ECANCELED)
            return
        if self._in_flight >= self.entries:
            self._waiting.append((op, fd, addr, length, off, op_flags, callback, keep))
            return
        key = self._next
        self._next = key + 1
        self._ops[key] = (callback, keep)
        tail = self._tail
        _SQE.pack_into(self._sqes, (tail & self._sq_mask) * 64, op, 0, 0, fd, off, addr, length, op_flags,
                       key, 0, 0, 0, 0, 0)
        self._tail = tail = (tail + 1) & 0xFFFFFFFF
        _U32.pack_into(self._sq, self._sq_tail_off, tail)
        self._to_submit += 1
        self._in_flight += 1
        self.submitted += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """One io_uring_enter for every operation queued in this loop iteration."""
        self._flush_scheduled = False
        if self.closed or not self._to_submit:
            return
        n, self._to_submit = self._to_submit, 0
        self.enters += 1
        res = _syscall()(_SYS_ENTER, self.fd, n, 0, 0, None, 0)
        if res < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EBUSY, errno.EINTR):
                # The kernel is short of memory or completions: try again
                # shortly (not at once: that would spin the loop).
                self._to_submit += n
                self._flush_scheduled = True
                self.loop.call_later(0.001, self._flush)
                return
            # The ring is unusable: fail what it holds; its users fall back to threads.
            self._abort(err)
            return
        if res < n:  # the kernel took fewer (it will take the rest next time)
            self._to_submit += n - res
            self._flush_scheduled = True
            self.loop.call_later(0.001, self._flush)

    # ------------------------------------------------------------ completion
    def _reap(self) -> None:
        if self.closed:  # (a retry timer that outlived the ring)
            return
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        cq = self._cq
        mask, base, ops = self._cq_mask, self._cqes_off, self._ops
        done = []
        overflowed = self.overflows
        for _ in range(64):  # (bounded: each round empties the CQ; one is the rule)
            head = _U32.unpack_from(cq, self._cq_head_off)[0]
            tail = _U32.unpack_from(cq, self._cq_tail_off)[0]
            while head != tail:
                key, res, _flags = _CQE.unpack_from(cq, base + (head & mask) * 16)
                head = (head + 1) & 0xFFFFFFFF
                entry = ops.pop(key, None)
                if entry is not None:
                    done.append((entry[0], res))
            _U32.pack_into(cq, self._cq_head_off, head)
            if not _U32.unpack_from(self._sq, self._sq_flags_off)[0] & _SQ_CQ_OVERFLOW:
                break
            # Completions that found the CQ full wait in the kernel's overflow
            # list (FEAT_NODROP), and no eventfd signal comes for them: only
            # an io_uring_enter moves them into the CQ.  Unfetched, every later
            # completion queued behind them and the ring stalled for good (seen
            # once under the local-delivery benchmark: 43 completions, an idle
            # loop, sessions waiting for their fsync forever).  libuv
            # (libuv/libuv#3991) and tokio's io-uring (tokio-rs/io-uring#152,
            # #349) handle it the same way.
            self.overflows += 1
            self.enters += 1
            if _syscall()(_SYS_ENTER, self.fd, 0, 0, _ENTER_GETEVENTS, None, 0) < 0:
                err = ctypes.get_errno()
                if err not in (errno.EAGAIN, errno.EBUSY, errno.EINTR):
                    self._in_flight -= len(done)
                    for callback, res in done:
                        self._call(callback, res)
                    self._abort(err)
                    return
                self.loop.call_later(0.001, self._reap)  # try again shortly
                break
        else:  # still overflowing after every round: go on in the next iteration
            self.loop.call_soon(self._reap)
        self._in_flight -= len(done)
        while self._waiting and self._in_flight < self.entries:
            self._push(*self._waiting.pop(0))
        now = self.loop.time()
        if self.overflows != overflowed and self.on_overflow is not None \
                and (self._overflow_told is None or now - self._overflow_told >= 60):
            self._overflow_told = now
            self._call(lambda _res: self.on_overflow(), 0)
        for callback, res in done:
            self._call(callback, res)
        self._wake_drained()

    # ------------------------------------------------------------ operations
    # Each takes a ``callback(result)`` (the system call's result, -errno
    # for a failure) or, without one, returns a future of the result
    # (an OSError for a failure).

    def openat(self, path: bytes, flags: int, mode: int, callback: Callback | None = None,
               dirfd: int = AT_FDCWD) -> asyncio.Future | None:
        path = path + b"\0"
        return self._op(OP_OPENAT, dirfd, _address(path), mode, 0, flags, callback, path)

    def writev(self, fd: int, buffers: list[bytes], callback: Callback | None = None,
               offset: int = 0) -> asyncio.Future | None:
        # struct iovec[] packed into a bytes object (cheaper than a ctypes array)
        iov = struct.pack(f"={2 * len(buffers)}Q", *[v for data in buffers for v in (_address(data), len(data))])
        return self._op(OP_WRITEV, fd, _address(iov), len(buffers), offset, 0, callback, (iov, buffers))

    def fsync(self, fd: int, callback: Callback | None = None, *, datasync: bool = False) -> asyncio.Future | None:
        return self._op(OP_FSYNC, fd, 0, 0, 0, FSYNC_DATASYNC if datasync else 0, callback, None)

    def close_fd(self, fd: int, callback: Callback | None = None) -> asyncio.Future | None:
        return self._op(OP_CLOSE, fd, 0, 0, 0, 0, callback, None)

    def renameat(self, old: bytes, new: bytes, callback: Callback | None = None) -> asyncio.Future | None:
        old, new = old + b"\0", new + b"\0"
        # sqe: fd = olddirfd, addr = oldpath, len = newdirfd, off (addr2) = newpath
        return self._op(OP_RENAMEAT, AT_FDCWD, _address(old), AT_FDCWD & 0xFFFFFFFF, _address(new), 0,
                        callback, (old, new))

    def unlinkat(self, path: bytes, callback: Callback | None = None) -> asyncio.Future | None:
        path = path + b"\0"
        return self._op(OP_UNLINKAT, AT_FDCWD, _address(path), 0, 0, 0, callback, path)

    def _op(self, op: int, fd: int, addr: int, length: int, off: int, op_flags: int,
            callback: Callback | None, keep: object) -> asyncio.Future | None:
        fut = None
        if callback is None:
            fut, callback = self.future()
        self._push(op, fd, addr, length, off, op_flags, callback, keep)
        return fut

    def future(self) -> tuple[asyncio.Future, Callback]:
        """A future and the callback that completes it (OSError for a negative result)."""
        fut = self.loop.create_future()

        def done(res: int) -> None:
            if fut.done():
                return
            if res < 0:
                fut.set_exception(OSError(-res, os.strerror(-res)))
            else:
                fut.set_result(res)
        return fut, done

    # ------------------------------------------------------------ shutdown
    async def drain(self) -> None:
        """Wait until every operation queued so far has completed, and
        every :meth:`hold` is released."""
        if self._ops or self._waiting or self.users:
            fut = self.loop.create_future()
            self._drained.append(fut)
            await fut

    def close(self) -> None:
        """Close the ring.  Operations still in flight are failed with
        ECANCELED (call :meth:`drain` first to let them finish)."""
        self._abort(errno.ECANCELED)

    def _abort(self, err: int) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self._efd)
        except Exception:
            pass
        pending = [entry for entry in self._ops.values()] + [(w[6], w[7]) for w in self._waiting]
        if self._ops:
            # The kernel may still be running them after the ring is closed:
            # their paths and buffers must outlive this object.
            _ABANDONED.append(self._ops)
        self._ops, self._waiting = {}, []
        self.dir_syncers = {}
        self._release()
        for callback, _keep in pending:
            self._call(callback, -err)
        self._wake_drained()

    def _call(self, callback: Callback, res: int) -> None:
        try:
            callback(res)
        except Exception as exc:  # a bug in a callback must not lose the other completions
            self.loop.call_exception_handler({"message": "io_uring completion callback failed", "exception": exc})

    def _wake_drained(self) -> None:
        if self._drained and not self._ops and not self._waiting and not self.users:
            waiters, self._drained = self._drained, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def hold(self) -> None:
        """A coroutine that will queue more operations is running (a Maildir
        delivery between two steps): :meth:`drain` waits for its :meth:`release`."""
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        self._wake_drained()

    def _release(self) -> None:
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                pass
        self._maps = []
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        if self.fd >= 0:
            os.close(self.fd)  # the kernel finishes (or cancels) what is still running
            self.fd = -1


class RingDirSync:
    """Group commit of one directory's fsyncs on a :class:`Ring`: a request
    is answered by the first fsync that starts after it was made; requests
    made while one runs share the next.  ``keep_open``: hold the directory
    open (the queue directories, opened by the caller's thread at start)
    or open it on the ring for each fsync (Maildirs: nothing on the loop
    thread touches the path)."""

    def __init__(self, ring: Ring, path: str, *, keep_open: bool = True):
        self.ring = ring
        self.path = path
        self._path = os.fsencode(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if keep_open else -1
        self._next: list[Callback] = []
        self._running = False
        self.fsyncs = 0

    def request(self, callback: Callback) -> None:
        """``callback(result)`` once an fsync started after this call is done."""
        self._next.append(callback)
        if not self._running:
            self._start()

    def _start(self) -> None:
        batch, self._next = self._next, []
        self._running = True
        self.fsyncs += 1
        if self.fd >= 0:
            self.ring.fsync(self.fd, lambda res: self._done(batch, res))
            return

        def opened(fd: int) -> None:
            if fd < 0:
                self._done(batch, fd)
                return

            def synced(res: int) -> None:
                self.ring.close_fd(fd, lambda _res: None)
                self._done(batch, res)
            self.ring.fsync(fd, synced)
        self.ring.openat(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, opened)

    def _done(self, batch: list[Callback], res: int) -> None:
        self._running = False
        for callback in batch:
            self.ring._call(callback, res)
        if self._next and not self._running:
            self._start()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def available() -> bool:
    return sys.platform == "linux" and platform.machine() in _SYS_SETUP and hasattr(os, "eventfd")


def open_ring(loop: asyncio.AbstractEventLoop, entries: int = 256) -> Ring:
    """A :class:`Ring` on ``loop``; OSError where io_uring cannot be used
    (its text says why)."""
    if not available():
        raise OSError(errno.ENOSYS, f"io_uring is not available on {sys.platform}/{platform.machine()}")
    try:
        return Ring(loop, entries)
    except (AttributeError, ValueError) as exc:
        raise OSError(errno.ENOSYS, f"io_uring: {exc}") from None
