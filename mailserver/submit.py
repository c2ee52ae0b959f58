"""The cleanup service: every new message enters the queue here.

SMTP sessions, local submission (pickup), the Python API, forwarding by the
local delivery agent and bounce generation all call :meth:`Cleanup.submit`.
It applies the pure header clean-up (:mod:`mailserver.cleanup`), expands
``virtual_alias_maps`` (recursively, with Postfix's limits), writes the
message durably through the spool and hands it to the queue manager.

Contract: when :meth:`Cleanup.submit` returns a queue ID, the message and its
envelope are fsync'd in ``incoming/``.  On any spool failure it raises
:class:`~mailserver.spool.SpoolError` and nothing is left in the queue.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from .cleanup import cleanup_message, received_header
from .config import Config
from .maillog import MailLog
from .resolve import AddressResolver, split_address
from .spool import Envelope, RecipientState, Spool, new_queue_id


@dataclass
class Submission:
    sender: str
    recipients: list[tuple[str, str]]  # (address, original address)
    content: bytes  # CRLF, not dot-stuffed
    origin: str = "smtp"  # smtp | local | api | bounce | forward
    client_name: str = "localhost"
    client_addr: str = "127.0.0.1"
    helo: str = ""
    protocol: str = "ESMTP"
    tls_comment: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    add_missing_headers: bool = False
    add_received: bool = True
    hold: bool = False  # HOLD action: park the message in hold/ (postsuper -H releases it)
    queue_id: str | None = None
    extra: dict = field(default_factory=dict)


class Cleanup:
    def __init__(self, config: Config, *, spool: Spool, resolver: AddressResolver, maillog: MailLog,
                 notify: Callable[[str, Envelope, bytes], None], clock: Callable[[], float] = time.time):
        self.config = config
        self.spool = spool
        self.resolver = resolver
        self.log = maillog.service("cleanup")
        self.notify = notify
        self.clock = clock

    def expand_virtual_aliases(self, address: str) -> list[str]:
        """virtual_alias_maps expansion (Postfix cleanup): recursive, each
        address expanded once per branch, bounded by
        ``virtual_alias_recursion_limit`` and ``virtual_alias_expansion_limit``."""
        if not self.resolver.virtual_alias_maps:
            return [address]
        out: list[str] = []
        limit = self.config.virtual_alias_expansion_limit

        def walk(addr: str, depth: int, seen: frozenset[str]) -> None:
            if len(out) >= limit:
                return
            value = self.resolver.virtual_alias(addr) if addr.lower() not in seen else None
            if value is None or depth >= self.config.virtual_alias_recursion_limit:
                if addr.lower() not in (a.lower() for a in out):
                    out.append(addr)
                return
            for target in (t.strip() for t in value.replace(",", " ").split()):
                if not target:
                    continue
                if "@" not in target:
                    target = f"{target}@{self.config.myorigin}"
                walk(target, depth + 1, seen | {addr.lower()})

        walk(address, 0, frozenset())
        return out or [address]

    async def submit(self, sub: Submission) -> str:
        queue_id = sub.queue_id or new_queue_id()
        now = self.clock()
        rcpts: list[RecipientState] = []
        seen: set[str] = set()
        for address, original in sub.recipients:
            for final in self.expand_virtual_aliases(address):
                key = final.lower()
                if key in seen:
                    continue  # duplicate elimination, as Postfix cleanup
                seen.add(key)
                rcpts.append(RecipientState(final, original or address))
        received = b""
        if sub.add_received:
            received = received_header(
                helo=sub.helo or sub.client_name, client_hostname=sub.client_name, client_addr=sub.client_addr,
                myhostname=self.config.myhostname, protocol=sub.protocol, queue_id=queue_id,
                recipient=sub.recipients[0][1] if len(sub.recipients) == 1 else None, when=now,
                tls_comment=sub.tls_comment, mail_name=self.config.mail_name)
        result = cleanup_message(sub.content, received=received, queue_id=queue_id,
                                 myhostname=self.config.myhostname, myorigin=self.config.myorigin,
                                 sender=sub.sender, now=now,
                                 add_missing_headers=sub.add_missing_headers or self.config.always_add_missing_headers)
        envelope = Envelope(queue_id=queue_id, sender=sub.sender, recipients=rcpts, arrival_time=now,
                            size=len(result.message), smtputf8=sub.smtputf8, body_8bit=sub.body_8bit,
                            client=f"{sub.client_name}[{sub.client_addr}]", origin=sub.origin, extra=sub.extra)
        # Once the queue file is being written, the rest happens even if the
        # caller goes away (a client that hangs up after the final dot
        # cancels its session): a message that reached the queue is handed
        # to the queue manager, never left in incoming/ until a restart.
        # (A shielded worker future, not a task per message.)
        state = "hold" if sub.hold else "incoming"
        written = self.spool.start_enqueue(envelope, result.message, state)
        try:
            await asyncio.shield(written)
        except asyncio.CancelledError:
            written.add_done_callback(
                lambda fut: self._committed(fut, queue_id, envelope, result.message, result.message_id, sub))
            raise
        self._committed(written, queue_id, envelope, result.message, result.message_id, sub)
        return queue_id

    def _committed(self, written: asyncio.Future, queue_id: str, envelope: Envelope, message: bytes,
                   message_id: str, sub: Submission) -> None:
        if written.cancelled() or written.exception() is not None:
            return  # the caller got the SpoolError (or went away; then nothing was queued)
        self.spool.enqueued(envelope, written.result())
        self.log(f"{queue_id}: message-id={message_id}")
        if sub.hold:
            self.log(f"{queue_id}: hold: message held by policy; from=<{sub.sender}>")
        else:
            self.notify(queue_id, envelope, message)


def recipient_domain(address: str) -> str:
    return split_address(address)[1]
