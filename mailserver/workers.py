"""Blocking calls off the event loop, with cheap hand-offs.

:class:`WorkerPool` runs blocking functions (file writes, fsyncs, renames)
in a few threads of its own, like ``loop.run_in_executor`` with a
:class:`~concurrent.futures.ThreadPoolExecutor`, but with less work on the
event loop per call — it is on the hot path of every message (one queue
file write per accepted message, one Maildir write per delivery):

* a job is one :meth:`queue.SimpleQueue.put` (a C queue; no Condition, no
  ``concurrent.futures.Future`` chained to an asyncio one);
* results come back in batches: a worker appends its result to the loop's
  inbox and wakes the loop (one ``call_soon_threadsafe``, one self-pipe
  write) only when no wake-up is already pending, so jobs that finish
  together — the fsyncs of one journal commit — cost one loop wake-up.

Each job's result is delivered to the future of the loop that submitted it;
one pool may serve several loops (tests run two servers in one process).
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

_STOP = object()
_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: every pool starts
    over (empty queue, no threads, no inboxes)."""
    for pool in list(_POOLS):
        pool._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Inbox:
    """Finished jobs of one event loop, drained by one loop callback."""

    __slots__ = ("loop", "done", "wake_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.done: deque = deque()
        self.wake_pending = False

    def post(self, item) -> None:  # in a worker thread
        self.done.append(item)
        if not self.wake_pending:
            self.wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self.drain)
            except RuntimeError:  # the loop is closed: nobody waits any more
                self.wake_pending = False

    def drain(self) -> None:  # in the loop
        # Reset the flag before taking the items: a worker that posts after
        # this point schedules another drain, one that posted before is
        # taken below.
        self.wake_pending = False
        done = self.done
        while done:
            fut, ok, value = done.popleft()
            if fut.done():  # cancelled while it ran
                continue
            try:
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            except Exception as exc:  # never leave the other results of this batch behind
                if not fut.done():
                    fut.set_exception(RuntimeError(f"worker result could not be delivered: {exc!r}"))


class WorkerPool:
    """``workers`` threads named ``name_N`` (as ThreadPoolExecutor names them), started on first use."""

    def __init__(self, workers: int = 8, *, name: str = "worker"):
        self.size = workers
        self.name = name
        self._closed = False
        self.calls = 0  # jobs submitted (tests count thread hand-offs)
        self._reset()
        _POOLS.add(self)

    def _reset(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job (approximate: read without the lock)
        self._inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., Any], *args) -> asyncio.Future:
        """Run ``fn(*args)`` in a worker; returns a future of the running loop."""
        if self._closed:
            raise RuntimeError(f"{self.name} pool is closed")
        loop = asyncio.get_running_loop()
        inbox = self._inboxes.get(loop)
        if inbox is None:
            inbox = self._inbox(loop)
        if self._idle == 0 and len(self._threads) < self.size:
            self._grow()
        fut = loop.create_future()
        self.calls += 1
        self._jobs.put((fn, args, fut, inbox))
        return fut

    def call(self, fn: Callable[..., Any], /, *args, **kwargs) -> asyncio.Future:
        """:meth:`run` with keyword arguments (``asyncio.to_thread``'s shape)."""
        if kwargs:
            return self.run(functools.partial(fn, *args, **kwargs))
        return self.run(fn, *args)

    def _inbox(self, loop: asyncio.AbstractEventLoop) -> _Inbox:
        with self._lock:
            for old in [other for other in self._inboxes if other.is_closed()]:
                del self._inboxes[old]
            inbox = self._inboxes[loop] = _Inbox(loop)
        return inbox

    def _grow(self) -> None:
        with self._lock:
            if len(self._threads) >= self.size or self._closed:
                return
            thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        get = self._jobs.get
        with self._lock:
            self._idle += 1
        while True:
            job = get()
            with self._lock:
                self._idle -= 1
            if job is _STOP:
                return
            fn, args, fut, inbox = job
            if fut.cancelled():  # nobody waits for it any more (as run_in_executor): skip it
                del job, fn, args, fut, inbox
                with self._lock:
                    self._idle += 1
                continue
            try:
                item = (fut, True, fn(*args))
            except StopIteration as exc:  # a future cannot carry it (asyncio refuses)
                item = (fut, False, RuntimeError(f"StopIteration raised in a worker: {exc!r}"))
            except BaseException as exc:  # delivered to the caller, never lost
                item = (fut, False, exc)
            # Idle again before the result is posted: a caller woken by it
            # that submits the next job sees this thread as free (no growth
            # for sequential jobs).
            with self._lock:
                self._idle += 1
            inbox.post(item)
            del job, fn, args, fut, inbox, item

    def close(self, wait: bool = True) -> None:
        """Stop the threads once the queued jobs are done."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(_STOP)
        if wait:
            for thread in threads:
                thread.join()


class DirSync:
    """Group commit of one directory's fsyncs, for worker threads.

    :meth:`sync` (blocking) returns when an fsync of the directory that
    *started after the call* has completed — so everything the caller did to
    the directory before calling is durable — and raises its OSError.  At
    most one fsync runs at a time; callers that arrive while it runs share
    the next one, run by one of them.  No event-loop round trip is involved.

    Jobs that will call :meth:`sync` soon (their file fsync is running) may
    :meth:`announce` themselves: a thread about to start a directory fsync
    first waits for the announced ones, up to ``wait`` seconds (the file
    fsyncs of concurrent jobs finish together — the journal commits them
    together — so the wait is short and one directory fsync covers them
    all, instead of one for the first and another for the rest).

    Used for the queue directories (the spool) and for Maildir ``new/``
    directories (delivery.mailbox, which opens the directory per fsync
    rather than keeping a descriptor per mailbox).
    """

    def __init__(self, path: str, *, wait: float = 0.002):
        self.path = path
        self.wait = wait
        self._fd: int | None = None  # the directory, kept open (no open/close per fsync)
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # fsyncs started (generation numbers)
        self._done = 0  # highest generation completed
        self._leader = False  # a thread is about to run, or runs, an fsync
        self.coming = 0  # announced callers not arrived yet
        self._failed: dict[int, OSError] = {}
        self.fsyncs = 0  # for tests and statistics

    def announce(self) -> None:
        with self._cond:
            self.coming += 1

    def withdraw(self) -> None:
        """An announced caller will not call :meth:`sync` after all."""
        with self._cond:
            self.coming -= 1
            if self.coming <= 0:
                self._cond.notify_all()

    def sync(self, *, announced: bool = False) -> None:
        cond = self._cond
        with cond:
            if announced:
                self.coming -= 1
                if self.coming <= 0:
                    cond.notify_all()
            target = self._started + 1  # the next fsync to start covers us
            while self._done < target:
                if self._leader:
                    cond.wait()
                    continue
                self._leader = True
                if self.coming > 0 and self.wait > 0:
                    deadline = time.monotonic() + self.wait
                    while self.coming > 0:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        cond.wait(remaining)
                self._started += 1
                gen = self._started
                cond.release()
                error = None
                try:
                    self._fsync()
                except OSError as exc:
                    error = exc
                finally:
                    cond.acquire()
                    self._leader = False
                    self._done = gen
                    self.fsyncs += 1
                    if error is not None:
                        self._failed[gen] = error
                        while len(self._failed) > 64:
                            del self._failed[min(self._failed)]
                    cond.notify_all()
            error = self._failed.get(target)
        if error is not None:
            raise error

    def _fsync(self) -> None:
        """One fsync of the directory (called by one thread at a time)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
