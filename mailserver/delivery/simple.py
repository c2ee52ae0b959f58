"""The trivial transports (Postfix: discard(8), error(8), retry).

The next hop carries the text: ``discard:reason``, ``error:5.1.1 text``,
``retry:4.3.0 text``.  They never touch the network or the disk.
"""

from __future__ import annotations

import re

from . import Delivered, DeliveryRequest, Outcome, PermanentFailure, TemporaryFailure

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s*(.*)$", re.S)


def _status_text(nexthop: str, default_status: str, default_text: str) -> tuple[str, str]:
    m = _STATUS.match(nexthop.strip())
    if m:
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}", m.group(4).strip() or default_text
    return default_status, nexthop.strip() or default_text


class DiscardAgent:
    name = "discard"

    async def deliver(self, request: DeliveryRequest) -> list[Outcome]:
        text = request.nexthop or "discarded"
        return [Delivered("2.0.0", text, "none") for _ in request.recipients]


class ErrorAgent:
    name = "error"

    async def deliver(self, request: DeliveryRequest) -> list[Outcome]:
        status, text = _status_text(request.nexthop, "5.0.0", "mail delivery disabled")
        if status.startswith("4"):
            return [TemporaryFailure(status, text, "none") for _ in request.recipients]
        return [PermanentFailure(status if status.startswith("5") else "5.0.0", text, "none")
                for _ in request.recipients]


class RetryAgent:
    name = "retry"

    async def deliver(self, request: DeliveryRequest) -> list[Outcome]:
        status, text = _status_text(request.nexthop, "4.0.0", "delivery temporarily suspended")
        if not status.startswith("4"):
            status = "4.0.0"
        return [TemporaryFailure(status, text, "none") for _ in request.recipients]
