"""The queue manager (Postfix: qmgr).

Feeds ``incoming/`` and due ``deferred/`` messages into a bounded in-memory
*active queue*, splits each message's pending recipients into deliveries per
(transport, next hop), runs them through the delivery agents under
per-destination and per-transport concurrency limits, records every
recipient's outcome durably, and then removes, defers or bounces the message.

Memory: at most ``qmgr_message_active_limit`` messages are loaded at once;
the deferred queue is indexed by a heap of (next attempt, queue ID) pairs —
the next attempt time is the envelope file's mtime, so start-up reads no
envelope of a deferred message.

Time: persisted times are wall-clock (``clock``, injectable); waiting uses
the event loop's monotonic clock.  A persisted next-attempt time further in
the future than ``maximal_backoff_time`` is clamped on load (the clock may
have jumped back).

Failure handling: an exception escaping a delivery agent is a temporary
failure of its recipients (a bug must cause a retry, never a bounce); a
queue file that cannot be parsed goes to ``corrupt/`` and the rest flows;
a spool write error leaves the message where it is, to be retried.

Queue operations from the administrator (postsuper -d/-h/-H/-r, postqueue
-f/-s) arrive through :meth:`QueueManager.queue_operation` and
:meth:`flush`: a message that nobody is working on is changed on disk at
once; a message whose delivery is in flight is only marked, and the mark
takes effect when the attempt has finished and its results are recorded —
so no message is lost or delivered twice by an operation.  Every message is
*claimed* (``_claimed``) by at most one worker at a time: a delivery task or
one queue operation.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .config import Config
from .delivery import (Delivered, DeliveryAgent, DeliveryRequest, Outcome, PermanentFailure, Recipient,
                       TemporaryFailure, outcome_kind)
from .events import DeliveryEvent, EventBus
from .maillog import MailLog, format_delay, format_delays
from .resolve import AddressResolver, Route
from .spool import CorruptRecord, Envelope, Spool, SpoolError


def backoff_delay(age: float, minimal: float, maximal: float) -> float:
    """Postfix qmgr: wait as long as the message is old, clamped to
    [minimal_backoff_time, maximal_backoff_time]."""
    return min(max(age, minimal), maximal)


def next_attempt_time(now: float, arrival: float, minimal: float, maximal: float, rng: random.Random) -> float:
    delay = backoff_delay(now - arrival, minimal, maximal)
    # A little jitter so a burst deferred together does not retry together.
    return now + delay + rng.uniform(0, min(delay * 0.1, 60.0))


def is_expired(now: float, envelope: Envelope, maximal_queue_lifetime: float, bounce_queue_lifetime: float) -> bool:
    lifetime = bounce_queue_lifetime if envelope.sender == "" else maximal_queue_lifetime
    return now - envelope.arrival_time >= lifetime


@dataclass
class Batch:
    route: Route
    indexes: list[int]


def plan_batches(routes: dict[int, Route], recipient_limit: Callable[[str], int]) -> list[Batch]:
    """Group recipients by (transport, next hop), at most the transport's
    recipient limit per delivery (``default_destination_recipient_limit``;
    local deliveries one recipient at a time)."""
    groups: dict[tuple[str, str], list[int]] = {}
    first: dict[tuple[str, str], Route] = {}
    for idx, route in routes.items():
        key = (route.transport, route.nexthop)
        groups.setdefault(key, []).append(idx)
        first.setdefault(key, route)
    batches = []
    for key, idxs in groups.items():
        limit = max(1, recipient_limit(key[0]))
        for i in range(0, len(idxs), limit):
            batches.append(Batch(first[key], idxs[i:i + limit]))
    return batches


def is_site_failure(outcomes: list[Outcome]) -> bool:
    """Connection or handshake trouble (Postfix: the destination, not the
    recipients, failed): every outcome is temporary with a 4.4.x status."""
    return bool(outcomes) and all(isinstance(o, TemporaryFailure) and o.status.startswith("4.4.") for o in outcomes)


class Destination:
    """Per-destination concurrency (Postfix qmgr "feedback" scheduler).

    The window starts at ``initial_destination_concurrency`` and moves by
    1/window per delivery: up on success, down on a connection/handshake
    failure, within [1, limit].  When a whole pseudo-cohort (a window's worth
    of deliveries in a row) fails, the destination is *dead*: its mail is
    deferred without connecting until ``minimal_backoff_time`` has passed
    (``default_destination_concurrency_failed_cohort_limit = 1``).
    """

    def __init__(self, key: tuple[str, str], initial: int, limit: int):
        self.key = key
        self.limit = max(1, limit)
        self.initial = max(1, min(initial, self.limit))
        self.window = float(self.initial)
        self.busy = 0
        self.peak = 0
        self.failures_in_row = 0
        self.dead_until = 0.0  # monotonic
        self.dead_reason = ""
        # Deliveries waiting for a slot, first come first served.  A release
        # hands free slots to the first waiters (no wake-everyone-to-recheck:
        # with hundreds of messages queued for one destination that was
        # O(waiters) work per delivery).
        self._waiters: deque[asyncio.Future] = deque()

    def is_dead(self, now: float) -> bool:
        return self.dead_until > now

    async def acquire(self) -> None:
        if not self._waiters and self.busy < max(1, int(self.window)):
            self.busy += 1
            self.peak = max(self.peak, self.busy)
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # _wake() counted us in busy
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.busy -= 1  # a slot was handed over as we were cancelled: pass it on
                self._wake()
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _wake(self) -> None:
        while self._waiters and self.busy < max(1, int(self.window)):
            fut = self._waiters.popleft()
            if fut.done():
                continue
            fut.set_result(None)
            self.busy += 1
            self.peak = max(self.peak, self.busy)

    async def release(self, outcome: str, now: float, backoff: float, reason: str = "") -> bool:
        """outcome: ``ok`` | ``site-failure`` | ``other``.  Returns True when
        this release declared the destination dead."""
        died = False
        self.busy -= 1
        if outcome == "ok":
            self.failures_in_row = 0
            self.window = min(float(self.limit), self.window + 1.0 / max(1.0, self.window))
        elif outcome == "site-failure":
            self.failures_in_row += 1
            self.window = max(1.0, self.window - 1.0 / max(1.0, self.window))
            if self.failures_in_row >= max(1, int(self.window)) and not self.is_dead(now):
                self.dead_until = now + backoff
                self.dead_reason = reason
                self.failures_in_row = 0
                self.window = 1.0
                died = True
        self._wake()
        return died


@dataclass
class ActiveMessage:
    queue_id: str
    envelope: Envelope
    message: bytes
    state: str = "active"
    activated: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    bounced_now: list[int] = field(default_factory=list)
    delete_requested: bool = False
    flushed: bool = False
    hold_requested: bool = False
    requeue_requested: bool = False

    @property
    def intervention(self) -> bool:
        return self.delete_requested or self.hold_requested or self.requeue_requested


class QueueManager:
    def __init__(self, config: Config, *, spool: Spool, resolver: AddressResolver,
                 agents: dict[str, DeliveryAgent], maillog: MailLog,
                 bounce: Callable[[ActiveMessage, list[int], str], "asyncio.Future | object"] | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        self.config = config
        self.spool = spool
        self.resolver = resolver
        self.agents = agents
        self.maillog = maillog
        self.log = maillog.service("qmgr")
        self.bounce = bounce
        self.clock = clock
        self.rng = rng or random.Random()
        # New mail and due deferred mail wait in separate queues that are
        # served alternately, so a large deferred backlog never starves new
        # mail (Postfix qmgr alternates between incoming and deferred scans).
        self._incoming: deque[tuple[str, str, Envelope | None, bytes | None]] = deque()
        self._due: deque[tuple[str, str, Envelope | None, bytes | None]] = deque()
        self._turn = 0
        self._deferred: list[tuple[float, str]] = []  # heap of (due wall time, queue id)
        self._deferred_due: dict[str, float] = {}
        self.active: dict[str, ActiveMessage] = {}
        self._slots = asyncio.Semaphore(max(1, config.qmgr_message_active_limit))
        self.destinations: dict[tuple[str, str], Destination] = {}
        self._transport_sems: dict[str, asyncio.Semaphore] = {}
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None
        self._stopping = False
        self._last_scan = 0.0
        self.idle = asyncio.Event()
        self._retry_timers: set[asyncio.TimerHandle] = set()  # spool-error retries (cancelled on stop)
        self.events: EventBus | None = None  # delivery events for embedding applications
        self._claimed: set[str] = set()  # being activated/delivered, or changed by a queue operation
        self._requests: dict[str, str] = {}  # operations waiting for a message being activated
        self._flushed: set[str] = set()  # flushed: defer_transports do not hold them back
        self._ops_lock = asyncio.Lock()
        self.on_requeue: Callable[[], None] | None = None  # nudges pickup after a requeue

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        report = await asyncio.to_thread(self.spool.recover)
        if report.requeued or report.orphans_removed or report.repaired or report.corrupt or report.incomplete_removed:
            self.log(f"queue recovery: requeued={report.requeued} orphans_removed={report.orphans_removed} "
                     f"repaired={report.repaired} incomplete_removed={report.incomplete_removed} "
                     f"corrupt={len(report.corrupt)}")
        for entry in await self.spool.scan_async("incoming"):
            self._incoming.append((entry.queue_id, "incoming", None, None))
        await self._load_deferred_index()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="qmgr")

    async def _load_deferred_index(self) -> None:
        """On start deferred mail is due at once, spread over a short window
        so it does not all retry at the same instant."""
        now = self.clock()
        entries = await self.spool.scan_async("deferred")
        spread = min(self.config.queue_run_delay, 0.01 * len(entries))
        self._deferred = []
        self._deferred_due = {}
        for entry in entries:
            due = now + self.rng.uniform(0, spread)
            self._deferred_due[entry.queue_id] = due
            self._deferred.append((due, entry.queue_id))
        heapq.heapify(self._deferred)
        self._last_scan = time.monotonic()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop scheduling; let in-flight deliveries finish for ``timeout``
        seconds, then cancel them (their messages stay in active/ and go
        back to incoming/ on the next start: at-least-once)."""
        self._stopping = True
        self._wakeup.set()
        for handle in self._retry_timers:
            handle.cancel()
        self._retry_timers.clear()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._tasks:
            done, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for agent in self.agents.values():
            close = getattr(agent, "close", None)
            if close is not None:
                await close()

    # ------------------------------------------------------------------ input
    def notify_incoming(self, queue_id: str, envelope: Envelope | None = None, message: bytes | None = None) -> None:
        """A new message is durable in incoming/ (from cleanup)."""
        self._incoming.append((queue_id, "incoming", envelope, message))
        self._wakeup.set()

    def flush(self, queue_ids: list[str] | None = None) -> int:
        """Make deferred mail due now (with jitter), as ``postqueue -f``;
        flushed mail is delivered even through ``defer_transports``."""
        now = self.clock()
        count = 0
        targets = list(self._deferred_due) if queue_ids is None else [q for q in queue_ids if q in self._deferred_due]
        for qid in targets:
            due = now + self.rng.uniform(0, min(1.0, 0.01 * len(targets)))
            self._deferred_due[qid] = due
            heapq.heappush(self._deferred, (due, qid))
            self._flushed.add(qid)
            count += 1
        self._wakeup.set()
        return count

    async def flush_domain(self, domain: str) -> int:
        """``postqueue -s DOMAIN``: flush deferred mail with a pending
        recipient in that domain."""
        domain = domain.lower().strip().strip(".")
        ids = []
        for qid in list(self._deferred_due):
            try:
                env, _mtime = await self.spool.blocking(self.spool.read_envelope, qid, "deferred")
            except (FileNotFoundError, CorruptRecord, SpoolError):
                continue
            if any(r.address.rpartition("@")[2].lower() == domain for r in env.recipients if not r.done):
                ids.append(qid)
        return self.flush(ids) if ids else 0

    # ------------------------------------------------------------------ queue operations (postsuper)
    DEFAULT_STATES = {
        "delete": ("hold", "incoming", "active", "deferred"),
        "hold": ("incoming", "active", "deferred"),
        "release": ("hold",),
        "requeue": ("hold", "incoming", "active", "deferred"),
    }
    _DONE_TEXT = {"delete": "removed", "hold": "placed on hold", "release": "released from hold",
                  "requeue": "requeued"}

    async def queue_operation(self, op: str, queue_ids: list[str] | None,
                              states: tuple[str, ...] | None = None) -> dict:
        """postsuper -d/-h/-H/-r for the running server.  ``queue_ids`` None
        means ALL (in ``states``).  Returns ``{"done": [...], "pending":
        [...], "missing": [...]}``: ``pending`` messages are in flight and
        the operation takes effect after their current attempt."""
        if op not in self.DEFAULT_STATES:
            raise ValueError(f"unknown queue operation {op!r}")
        states = tuple(states or self.DEFAULT_STATES[op])
        if op == "release":
            states = tuple(s for s in states if s == "hold")
        done: list[str] = []
        pending: list[str] = []
        missing: list[str] = []
        async with self._ops_lock:
            if queue_ids is None:
                found: list[str] = []
                for state in states:
                    if state == "maildrop":
                        names = await self.spool.blocking(self.spool.scan_maildrop)
                        found += [n[:-len(".drop")] for n in names]
                    elif state == "active":
                        found += list(self.active)
                    else:
                        found += [e.queue_id for e in await self.spool.scan_async(state)]
                queue_ids = list(dict.fromkeys(found))
            for qid in queue_ids:
                result = await self._operate_one(op, qid, states)
                (done if result == "done" else pending if result == "pending" else missing).append(qid)
        if done or pending:
            self._wakeup.set()
        return {"done": done, "pending": pending, "missing": missing}

    async def _operate_one(self, op: str, qid: str, states: tuple[str, ...]) -> str:
        active = self.active.get(qid)
        if active is not None or qid in self._claimed:
            if op == "release" or "active" not in states:
                return "missing"
            if active is None:
                self._requests[qid] = op  # being activated: applied right after activation
            else:
                setattr(active, f"{op}_requested", True)
            return "pending"
        self._claimed.add(qid)
        try:
            if op == "delete":
                state = await self.spool.blocking(self.spool.delete_message, qid, states)
            elif op == "hold":
                state = await self.spool.blocking(self.spool.hold_message, qid, states)
            elif op == "release":
                state = "hold" if await self.spool.blocking(self.spool.release_message, qid, self.clock()) else None
            else:
                state = await self.spool.blocking(self.spool.requeue_message, qid, states)
        except (CorruptRecord, SpoolError, OSError) as exc:
            self.log(f"warning: {qid}: cannot {op}: {exc}")
            return "missing"
        finally:
            self._claimed.discard(qid)
        if state is None:
            return "missing"
        self._deferred_due.pop(qid, None)
        self._flushed.discard(qid)
        if op == "release":
            due = self.clock()
            self._deferred_due[qid] = due
            heapq.heappush(self._deferred, (due, qid))
        elif op == "requeue" and self.on_requeue is not None:
            self.on_requeue()
        self.maillog.log("postsuper", f"{qid}: {self._DONE_TEXT[op]}")
        return "done"

    @property
    def deferred_count(self) -> int:
        return len(self._deferred_due)

    # ------------------------------------------------------------------ main loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wakeup.clear()
            now = self.clock()
            while self._deferred and self._deferred[0][0] <= now:
                due, qid = heapq.heappop(self._deferred)
                if self._deferred_due.get(qid) != due:
                    continue  # superseded entry (flush)
                del self._deferred_due[qid]
                self._due.append((qid, "deferred", None, None))
            if time.monotonic() - self._last_scan >= self.config.queue_run_delay:
                await self._rescan_deferred()
            while (self._incoming or self._due) and not self._stopping:
                await self._slots.acquire()
                qid, state, env, msg = self._next_ready()
                if qid in self._claimed:
                    self._slots.release()
                    continue
                self._claimed.add(qid)
                task = loop.create_task(self._process(qid, state, env, msg))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
            self.idle.set() if not self.active and not self._has_ready() else self.idle.clear()
            timeout = self.config.queue_run_delay
            if self._deferred:
                timeout = min(timeout, max(0.0, self._deferred[0][0] - self.clock()))
            # A timer that sets the event, rather than wait_for() (a task
            # and a timeout per wake-up: this loop wakes for every message).
            timer = loop.call_later(max(0.001, timeout), self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()

    def _has_ready(self) -> bool:
        return bool(self._incoming or self._due)

    def _next_ready(self) -> tuple[str, str, Envelope | None, bytes | None]:
        self._turn ^= 1
        first, second = (self._incoming, self._due) if self._turn else (self._due, self._incoming)
        return first.popleft() if first else second.popleft()

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log(f"warning: unexpected error in queue manager: {exc!r}")
        if not self.active and not self._has_ready():
            self.idle.set()
        self._wakeup.set()

    async def _rescan_deferred(self) -> None:
        """Pick up deferred files we do not know about (queue tools, restarts)."""
        self._last_scan = time.monotonic()
        limit = self.clock() + self.config.maximal_backoff_time
        for entry in await self.spool.scan_async("deferred"):
            if entry.queue_id not in self._deferred_due and entry.queue_id not in self._claimed:
                due = min(entry.mtime, limit)
                self._deferred_due[entry.queue_id] = due
                heapq.heappush(self._deferred, (due, entry.queue_id))

    # ------------------------------------------------------------------ one message
    async def _process(self, qid: str, state: str, env: Envelope | None, msg: bytes | None) -> None:
        try:
            try:
                if env is None or msg is None:
                    env, msg = await self.spool.load(qid, state)
                await self.spool.move(qid, state, "active", hint=env)
            except FileNotFoundError:
                self._requests.pop(qid, None)
                return  # deleted, held or requeued meanwhile (postsuper)
            except CorruptRecord as exc:
                self._requests.pop(qid, None)
                await self.spool.quarantine_async(qid, state, str(exc))
                return
            except SpoolError as exc:
                self.log(f"warning: {qid}: {exc}; will retry")
                self._defer_in_memory(qid, state)
                return
            assert msg is not None
            active = ActiveMessage(qid, env, msg, activated=self.clock())
            active.flushed = qid in self._flushed
            self._flushed.discard(qid)
            request = self._requests.pop(qid, None)
            if request:
                setattr(active, f"{request}_requested", True)
            self.active[qid] = active
            try:
                await self._deliver_message(active)
            finally:
                self.active.pop(qid, None)
        finally:
            self._claimed.discard(qid)

    def _defer_in_memory(self, qid: str, state: str) -> None:
        if state == "deferred":
            due = self.clock() + self.config.minimal_backoff_time
            self._deferred_due[qid] = due
            heapq.heappush(self._deferred, (due, qid))
        else:
            loop = asyncio.get_running_loop()
            entry = (qid, state, None, None)

            def retry() -> None:
                self._retry_timers.discard(handle)
                self._incoming.append(entry)
                self._wakeup.set()

            handle = loop.call_later(self.config.minimal_backoff_time, retry)
            self._retry_timers.add(handle)

    async def _deliver_message(self, active: ActiveMessage) -> None:
        env = active.envelope
        owed = env.extra.get("dsn_owed")
        if owed and self.bounce is not None:
            # A crash came between recording bounced recipients and queueing
            # their DSN: queue it now (at-least-once, never lost).
            await self.bounce(active, [i for i in owed if 0 <= i < len(env.recipients)], "failure")
            env.extra.pop("dsn_owed", None)
        pending = env.pending
        if active.intervention:  # postsuper came first: no delivery attempt
            await self._finish(active)
            return
        self.log(f"{active.queue_id}: from=<{env.sender}>, size={env.size or len(active.message)}, "
                 f"nrcpt={len(env.recipients)} (queue active)")
        routes = {i: self.resolver.resolve(env.recipients[i].address) for i in pending}
        batches = plan_batches(routes, self._recipient_limit)
        if len(batches) == 1:
            await self._run_batch(active, batches[0], last=True)
        else:
            remaining = [len(batches)]

            async def run(batch: Batch) -> None:
                remaining[0] -= 1
                await self._run_batch(active, batch, last=False)

            async with asyncio.TaskGroup() as group:
                for batch in batches:
                    group.create_task(run(batch))
        await self._finish(active)

    def _recipient_limit(self, transport: str) -> int:
        if transport in ("local", "virtual", "pipe"):
            return self.config.local_destination_recipient_limit if transport == "local" else 1
        return self.config.default_destination_recipient_limit

    def _destination(self, route: Route, batch: Batch, env: Envelope) -> tuple[asyncio.Semaphore, Destination]:
        transport = route.transport
        if transport in ("local", "virtual"):
            # Local deliveries: the destination is the recipient (Postfix
            # local_destination_recipient_limit = 1).
            dest = env.recipients[batch.indexes[0]].address.lower()
            limit = self.config.local_destination_concurrency_limit if transport == "local" \
                else self.config.default_destination_concurrency_limit
        else:
            dest = route.nexthop.lower()
            limit = self.config.default_destination_concurrency_limit
        key = (transport, dest)
        destination = self.destinations.get(key)
        if destination is None:
            destination = self.destinations[key] = Destination(key, self.config.initial_destination_concurrency, limit)
        tsem = self._transport_sems.get(transport)
        if tsem is None:
            tsem = self._transport_sems[transport] = asyncio.Semaphore(max(1, self.config.default_process_limit))
        return tsem, destination

    async def _run_batch(self, active: ActiveMessage, batch: Batch, *, last: bool) -> None:
        env = active.envelope
        route = batch.route
        agent = self.agents.get(route.transport)
        recipients = tuple(Recipient(env.recipients[i].address, env.recipients[i].original or
                                     env.recipients[i].address, i) for i in batch.indexes)
        request = DeliveryRequest(queue_id=active.queue_id, sender=env.sender, recipients=recipients,
                                  message=active.message, nexthop=route.nexthop, arrival_time=env.arrival_time,
                                  smtputf8=env.smtputf8, body_8bit=env.body_8bit,
                                  extra={"transport": route.transport})
        if route.transport in self.config.defer_transports and not active.flushed:
            # defer_transports: hold delivery until someone flushes the queue.
            outcomes_deferred = [TemporaryFailure("4.3.2", "deferred transport", "none")] * len(recipients)
            now = self.clock()
            async with active.lock:
                for rcpt, outcome in zip(recipients, outcomes_deferred):
                    self._record(active, rcpt, outcome, route, started=now, begin=now, end=now)
            return
        tsem, dest = self._destination(route, batch, env)
        started = self.clock()
        loop = asyncio.get_running_loop()
        async with tsem:
            await dest.acquire()
            begin = self.clock()
            verdict = "other"
            outcomes: list[Outcome] = []
            try:
                if dest.is_dead(loop.time()):
                    outcomes = [TemporaryFailure("4.4.1", f"delivery temporarily suspended: {dest.dead_reason}",
                                                 "none")] * len(recipients)
                    verdict = "skipped"
                else:
                    outcomes = await self._call_agent(agent, route, request, active.queue_id, len(recipients))
                    if is_site_failure(outcomes):
                        verdict = "site-failure"
                    elif any(isinstance(o, (Delivered, PermanentFailure)) for o in outcomes):
                        verdict = "ok"
            finally:
                died = await dest.release(verdict if verdict != "skipped" else "other", loop.time(),
                                          self.config.minimal_backoff_time,
                                          outcomes[0].text if verdict == "site-failure" and outcomes else "")
            if died:
                self.log(f"warning: destination {route.transport}:{route.nexthop} is dead: deferring its mail "
                         f"without connecting for {format_delay(self.config.minimal_backoff_time)}s "
                         f"({dest.dead_reason})")
        end = self.clock()
        async with active.lock:
            for rcpt, outcome in zip(recipients, outcomes):
                self._record(active, rcpt, outcome, route, started=started, begin=begin, end=end)
            if not last and env.pending and any(isinstance(o, (Delivered, PermanentFailure)) for o in outcomes):
                # Persist before anything else happens to this message, so a
                # crash never re-delivers a recipient that was delivered.
                try:
                    await self.spool.update(env, "active")
                except SpoolError as exc:
                    self.log(f"warning: {active.queue_id}: cannot record delivery status: {exc}")

    async def _call_agent(self, agent: DeliveryAgent | None, route: Route, request: DeliveryRequest, queue_id: str,
                          count: int) -> list[Outcome]:
        if agent is None:
            return [TemporaryFailure("4.3.5", f"mail transport unavailable: {route.transport}", "none")] * count
        try:
            outcomes = list(await agent.deliver(request))
            if len(outcomes) != count:
                raise RuntimeError(f"agent {route.transport} returned {len(outcomes)} outcomes for {count} recipients")
            return outcomes
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unknown means temporary: a bug must cause a retry, not a bounce
            self.maillog.exception(route.transport.split(":")[0], f"{queue_id}: delivery agent error")
            return [TemporaryFailure("4.3.0", f"internal delivery error: {type(exc).__name__}", "none")] * count

    def _record(self, active: ActiveMessage, rcpt: Recipient, outcome: Outcome, route: Route, *,
                started: float, begin: float, end: float) -> None:
        env = active.envelope
        state = env.recipients[rcpt.index]
        state.dsn = outcome.status
        state.reason = outcome.text
        state.relay = outcome.relay
        if isinstance(outcome, Delivered):
            state.status = "sent"
        elif isinstance(outcome, PermanentFailure):
            state.status = "bounced"
            active.bounced_now.append(rcpt.index)
        service = route.transport.split(":", 1)[0] if not route.transport.startswith("python") else "python"
        orig = f", orig_to=<{rcpt.original}>" if rcpt.original and rcpt.original != rcpt.address else ""
        delays = format_delays(active.activated - env.arrival_time, begin - active.activated, 0.0, end - begin)
        self.maillog.log(service, f"{active.queue_id}: to=<{rcpt.address}>{orig}, relay={outcome.relay or 'none'}, "
                                  f"delay={format_delay(end - env.arrival_time)}, delays={delays}, "
                                  f"dsn={outcome.status}, status={outcome_kind(outcome)} ({outcome.text})")
        if self.events is not None and self.events.active:
            kind = {"sent": "delivered"}.get(outcome_kind(outcome), outcome_kind(outcome))
            self.events.publish(DeliveryEvent(kind, active.queue_id, rcpt.address, outcome.status, outcome.text,
                                              outcome.relay, env.sender))

    async def _finish(self, active: ActiveMessage) -> None:
        env = active.envelope
        qid = active.queue_id
        now = self.clock()
        if active.delete_requested:
            # postsuper -d during the attempt: the administrator wants it gone
            # (no DSN either, as a deleted Postfix queue file gets none).
            await self.spool.remove(qid, "active", hint=env)
            self.maillog.log("postsuper", f"{qid}: removed")
            return
        pending = env.pending
        held = active.hold_requested
        expired = not held and bool(pending) and is_expired(now, env, self.config.maximal_queue_lifetime,
                                               self.config.bounce_queue_lifetime)
        if expired:
            for i in pending:
                r = env.recipients[i]
                r.status = "bounced"
                r.dsn = r.dsn if r.dsn.startswith("4.") else "4.4.7"
                r.reason = r.reason or "delivery time expired"
                active.bounced_now.append(i)
            if self.events is not None and self.events.active:
                for i in pending:
                    r = env.recipients[i]
                    self.events.publish(DeliveryEvent("expired", qid, r.address, r.dsn, r.reason, r.relay, env.sender))
            if env.sender:
                self.log(f"{qid}: from=<{env.sender}>, status=expired, returned to sender")
            else:
                self.log(f"{qid}: from=<>, status=expired, dropped (null sender: bounce_queue_lifetime)")
            pending = []
        dsn_failed = False
        if active.bounced_now and self.bounce is not None:
            owed = sorted(set(active.bounced_now))
            try:
                if pending and env.sender:
                    # The message stays queued: record the bounced recipients
                    # and the DSN we owe before queueing the DSN, so a crash
                    # in between neither loses the DSN nor bounces them twice.
                    env.extra["dsn_owed"] = owed
                    await self.spool.update(env, "active")
                await self.bounce(active, owed, "failure")
                env.extra.pop("dsn_owed", None)
            except SpoolError as exc:
                # No DSN without durability: keep the message and owe the DSN.
                self.log(f"warning: {qid}: cannot queue bounce: {exc}; will retry")
                env.extra["dsn_owed"] = owed
                dsn_failed = True
        if not pending and not dsn_failed:
            await self.spool.remove(qid, "active", hint=env)
            self.log(f"{qid}: removed")
            return
        if active.intervention:
            await self._finish_intervention(active)
            return
        env.attempts += 1
        delay_warning = self.config.delay_warning_time
        if (delay_warning and not env.warned and env.sender and now - env.arrival_time >= delay_warning
                and self.bounce is not None):
            try:
                await self.bounce(active, pending, "delay")
                env.warned = True
            except SpoolError as exc:
                self.log(f"warning: {qid}: cannot queue delay notice: {exc}")
        due = next_attempt_time(now, env.arrival_time, self.config.minimal_backoff_time,
                                self.config.maximal_backoff_time, self.rng)
        env.next_attempt = due
        try:
            await self.spool.move(qid, "active", "deferred", mtime=due, envelope=env)
        except SpoolError as exc:
            self.log(f"warning: {qid}: cannot defer: {exc}")
            return
        self._deferred_due[qid] = due
        heapq.heappush(self._deferred, (due, qid))

    async def _finish_intervention(self, active: ActiveMessage) -> None:
        """A hold or requeue asked for while the message was in flight:
        record the attempt's results, then move it where it was asked to go."""
        qid = active.queue_id
        try:
            await self.spool.update(active.envelope, "active")
            if active.hold_requested:
                await self.spool.move(qid, "active", "hold")
                self.maillog.log("postsuper", f"{qid}: placed on hold")
            else:
                await self.spool.blocking(self.spool.requeue_message, qid, ("active",))
                self.maillog.log("postsuper", f"{qid}: requeued")
                if self.on_requeue is not None:
                    self.on_requeue()
        except (SpoolError, CorruptRecord, OSError) as exc:
            # Leave it in active/: it returns to incoming on the next start.
            self.log(f"warning: {qid}: cannot apply queue operation: {exc}")

    # ------------------------------------------------------------------ introspection
    def summary(self) -> dict:
        return {"active": len(self.active), "incoming": len(self._incoming), "due": len(self._due),
                "deferred": len(self._deferred_due)}

    def in_flight(self) -> int:
        """Deliveries running now (agent calls)."""
        return sum(d.busy for d in self.destinations.values())

    def destination_status(self, limit: int = 100) -> list[dict]:
        """Per-destination concurrency (busy, window, limit, dead) for
        ``mailserver status``: the busy and dead ones first."""
        now = asyncio.get_running_loop().time()
        rows = []
        for (transport, dest), d in self.destinations.items():
            rows.append({"transport": transport, "destination": dest, "busy": d.busy, "peak": d.peak,
                         "window": round(d.window, 2), "limit": d.limit,
                         "dead": d.is_dead(now), "dead_reason": d.dead_reason if d.is_dead(now) else ""})
        rows.sort(key=lambda r: (-r["busy"], not r["dead"], r["transport"], r["destination"]))
        return rows[:limit]

    def reconfigure(self, config: Config, resolver: AddressResolver, agents: dict[str, DeliveryAgent]) -> None:
        """Reload: new settings, tables and agents for the next deliveries;
        deliveries in flight finish with what they started with."""
        self.config = config
        self.resolver = resolver
        self.agents = agents
        for (transport, _dest), d in self.destinations.items():
            limit = config.local_destination_concurrency_limit if transport == "local" \
                else config.default_destination_concurrency_limit
            d.limit = max(1, limit)
            d.window = min(d.window, float(d.limit))
