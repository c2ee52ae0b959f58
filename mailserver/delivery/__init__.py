"""The delivery-agent contract shared by every transport.

A delivery agent (Postfix: local, virtual, smtp, lmtp, pipe, discard, error)
receives one :class:`DeliveryRequest` — one message and a batch of its
recipients that share a transport and a next hop — and returns one
:data:`Outcome` per recipient, in the order of ``request.recipients``.

Implementer's contract:

* Classify every failure where it happens: :class:`TemporaryFailure` (4.x.x,
  the queue manager retries later) or :class:`PermanentFailure` (5.x.x, the
  recipient is bounced).  A bug or an unknown error must be *temporary*:
  never raise for a per-recipient problem; an exception escaping ``deliver``
  is treated as a temporary failure of every recipient in the batch.
* ``Delivered`` means the message is durably in the recipient's mailbox or
  accepted (2xx after DATA) by the next hop.
* Agents never touch queue files; the message bytes are in the request.

Message bytes are the stored form: CRLF line endings, no dot-stuffing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Union


@dataclass(frozen=True, slots=True)
class Delivered:
    """The recipient's mail is delivered (``status=sent``)."""

    status: str = "2.0.0"
    text: str = "delivered"
    relay: str = ""


@dataclass(frozen=True, slots=True)
class TemporaryFailure:
    """Try again later (``status=deferred``); ``status`` is a 4.x.x code."""

    status: str = "4.0.0"
    text: str = "temporary failure"
    relay: str = ""


@dataclass(frozen=True, slots=True)
class PermanentFailure:
    """Give up on this recipient (``status=bounced``); ``status`` is 5.x.x."""

    status: str = "5.0.0"
    text: str = "permanent failure"
    relay: str = ""


Outcome = Union[Delivered, TemporaryFailure, PermanentFailure]


@dataclass(frozen=True, slots=True)
class Recipient:
    """One envelope recipient as the agent sees it.

    ``address`` is where to deliver (after alias/virtual rewriting),
    ``original`` the address as first received (``X-Original-To``, DSN
    ``Original-Recipient``), ``index`` its position in the queue file's
    recipient list (the queue manager uses it to record the outcome).
    """

    address: str
    original: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class DeliveryRequest:
    queue_id: str
    sender: str  # "" for the null sender <>
    recipients: tuple[Recipient, ...]
    message: bytes  # CRLF line endings, not dot-stuffed
    nexthop: str = ""
    arrival_time: float = 0.0  # wall clock, seconds since the epoch
    smtputf8: bool = False  # MAIL FROM had SMTPUTF8
    body_8bit: bool = False  # MAIL FROM had BODY=8BITMIME
    extra: dict = field(default_factory=dict)


class DeliveryAgent(Protocol):
    """What the queue manager calls.  ``name`` is the transport name
    (``local``, ``smtp``, ...) used in log lines as ``mailserver/NAME``."""

    name: str

    async def deliver(self, request: DeliveryRequest) -> list[Outcome]: ...


def outcome_kind(outcome: Outcome) -> str:
    """Postfix ``status=`` word for an outcome."""
    if isinstance(outcome, Delivered):
        return "sent"
    if isinstance(outcome, TemporaryFailure):
        return "deferred"
    return "bounced"
