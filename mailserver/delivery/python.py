"""``python:NAME`` transports: delivery by application code.

An application registers an async callable under a name —
``mailserver.register_transport("crm", deliver)`` or
``MailServer(config, transports={"crm": deliver})`` — and routes mail to it
with ``transport_maps`` (``example.com python:crm``).  The callable is::

    async def deliver(envelope: Envelope, message: bytes, recipients: list[str]) -> list[Outcome]

``envelope`` has ``queue_id``, ``sender``, ``arrival_time``; ``message`` is
the stored message (CRLF); ``recipients`` are the batch's addresses.  It
returns one :class:`~mailserver.delivery.Delivered`,
:class:`~mailserver.delivery.TemporaryFailure` or
:class:`~mailserver.delivery.PermanentFailure` per recipient (or a single
outcome for all of them).  Retries, backoff, expiry and DSNs then work exactly
as for the built-in transports.  An exception raised by the callable is a
temporary failure of the whole batch (a bug must cause a retry, never a
bounce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence, Union

from . import Delivered, DeliveryRequest, Outcome, PermanentFailure, TemporaryFailure

TransportFn = Callable[["TransportEnvelope", bytes, list[str]], Awaitable[Union[Outcome, Sequence[Outcome]]]]

_REGISTRY: dict[str, TransportFn] = {}


@dataclass(frozen=True, slots=True)
class TransportEnvelope:
    queue_id: str
    sender: str
    arrival_time: float
    nexthop: str
    smtputf8: bool
    original_recipients: tuple[str, ...]


def register_transport(name: str, transport: TransportFn) -> None:
    """Make ``python:NAME`` available to every MailServer in this process."""
    if not name or ":" in name or " " in name:
        raise ValueError(f"bad transport name {name!r}")
    _REGISTRY[name] = transport


def unregister_transport(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_transports() -> dict[str, TransportFn]:
    return dict(_REGISTRY)


class PythonAgent:
    def __init__(self, name: str, transport: TransportFn):
        self.name = f"python:{name}"
        self.transport = transport

    async def deliver(self, request: DeliveryRequest) -> list[Outcome]:
        envelope = TransportEnvelope(request.queue_id, request.sender, request.arrival_time, request.nexthop,
                                     request.smtputf8, tuple(r.original for r in request.recipients))
        result = await self.transport(envelope, request.message, [r.address for r in request.recipients])
        if isinstance(result, (Delivered, TemporaryFailure, PermanentFailure)):
            outcomes = [result] * len(request.recipients)
        else:
            outcomes = list(result)
        relay = self.name
        return [o if o.relay else type(o)(o.status, o.text, relay) for o in outcomes]
