"""Delivery events for embedding applications.

Every queued message and every delivery outcome is published as a
:class:`DeliveryEvent` (``queued``, ``delivered``, ``deferred``, ``bounced``,
``expired``).  Subscribe with a callback (:meth:`EventBus.add_listener`) or
consume ``async for event in server.events():``.

Contract: publishing never blocks delivery.  Each async subscriber has a
bounded buffer (``maxsize``); when a slow subscriber's buffer is full the
oldest event is dropped and counted in ``dropped`` — the mail path never
waits for an application.  A callback that raises is logged and ignored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    kind: str  # queued | delivered | deferred | bounced | expired
    queue_id: str
    recipient: str = ""  # empty for "queued"
    status: str = ""  # enhanced status code (dsn=)
    text: str = ""  # the reason / reply
    relay: str = ""
    sender: str = ""
    time: float = field(default_factory=time.time)


class EventSubscription:
    def __init__(self, bus: "EventBus", maxsize: int):
        self._bus = bus
        self._queue: asyncio.Queue[DeliveryEvent | None] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _offer(self, event: DeliveryEvent | None) -> None:
        if self._queue.full():
            try:
                self._queue.get_nowait()
                self.dropped += 1
            except asyncio.QueueEmpty:  # pragma: no cover
                pass
        self._queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[DeliveryEvent]:
        return self

    async def __anext__(self) -> DeliveryEvent:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        self._bus._subscriptions.discard(self)
        self._offer(None)


class EventBus:
    def __init__(self, log: Callable[[str], None] | None = None):
        self._subscriptions: set[EventSubscription] = set()
        self._listeners: list[Callable[[DeliveryEvent], object]] = []
        self._log = log or (lambda text: None)
        self._tasks: set[asyncio.Future] = set()  # coroutine callbacks in flight (owned, cancelled on close)

    def add_listener(self, callback: Callable[[DeliveryEvent], object]) -> None:
        """``callback(event)``; a coroutine function is scheduled, not awaited."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[DeliveryEvent], object]) -> None:
        self._listeners.remove(callback)

    def subscribe(self, maxsize: int = 10000) -> EventSubscription:
        sub = EventSubscription(self, maxsize)
        self._subscriptions.add(sub)
        return sub

    @property
    def active(self) -> bool:
        return bool(self._subscriptions or self._listeners)

    def publish(self, event: DeliveryEvent) -> None:
        for sub in list(self._subscriptions):
            sub._offer(event)
        for callback in list(self._listeners):
            try:
                result = callback(event)
                if asyncio.iscoroutine(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._callback_done)
            except Exception as exc:  # an application bug must not stop mail
                self._log(f"warning: event listener {callback!r} failed: {exc!r}")

    def _callback_done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log(f"warning: event listener failed: {task.exception()!r}")

    def close(self) -> None:
        for sub in list(self._subscriptions):
            sub.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        """After :meth:`close`: wait until the cancelled listener tasks ended."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
