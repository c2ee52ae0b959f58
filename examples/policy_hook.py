"""A greylisting policy hook (the idea of postgrey, in a few lines).

The policy hook protocol (:mod:`mailserver.hooks`)::

    async def hook(request: PolicyRequest) -> str | None

is consulted at every SMTP stage named in ``request.stage`` (``connect``,
``helo``, ``mail``, ``rcpt``, ``end-of-data``) for every hook listed in
``smtpd_policy_hooks``, and answers like a Postfix access(5) table:
``OK``, ``DUNNO`` (or ``None``), ``REJECT text``, ``DEFER text``,
``DEFER_IF_PERMIT text``, ``4NN/5NN text``, ``HOLD``, ``DISCARD``,
``PREPEND Header: value``.  A hook that raises or times out
(``smtpd_policy_service_timeout``) answers ``451 4.3.5``: an application bug
never rejects mail permanently.

Greylisting: the first delivery attempt of a (client network, sender,
recipient) triplet is deferred with ``450 4.7.1``; real MTAs retry, most
spam software does not.  A retry after ``delay`` seconds (and within
``retry_window``) passes (``DUNNO``: the other restrictions decide).
Authenticated clients and ``mynetworks`` are never greylisted (put the hook
after ``permit_mynetworks`` in a restriction list, or rely on the
``sasl_username`` test below).

The clock is injectable so that tests need not sleep.

Wiring::

    config = Config(..., smtpd_policy_hooks=["greylist"])
    MailServer(config, policy_hooks={"greylist": Greylist(delay=300)})

Run the demo (it tries twice with aiosmtplib; the hook's clock is advanced
between the attempts instead of waiting five minutes)::

    python examples/policy_hook.py
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiosmtplib

from mailserver import Config, MailServer, PolicyRequest

GREYLIST_ACTION = "DEFER_IF_PERMIT 4.7.1 Greylisted, try again later"


class Greylist:
    """A policy hook: ``Greylist(delay=300)`` is an async callable."""

    def __init__(self, *, delay: float = 300.0, retry_window: float = 2 * 86400.0,
                 clock: Callable[[], float] = time.time, max_entries: int = 100_000,
                 action: str = GREYLIST_ACTION):
        self.delay = delay
        self.retry_window = retry_window
        self.clock = clock
        self.max_entries = max_entries
        self.action = action
        self._first_seen: dict[tuple[str, str, str], float] = {}

    @staticmethod
    def client_key(address: str) -> str:
        """Big senders retry from another host of the same farm: key on the
        /24 (IPv4) or /64 (IPv6) network, as postgrey does."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        prefix = 24 if ip.version == 4 else 64
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    async def __call__(self, request: PolicyRequest) -> str:
        if request.stage != "rcpt" or request.sasl_username:
            return "DUNNO"
        triplet = (self.client_key(request.client_addr), (request.sender or "").lower(),
                   (request.recipient or "").lower())
        now = self.clock()
        first = self._first_seen.get(triplet)
        if first is None or now - first > self.retry_window:
            self._remember(triplet, now)
            return self.action
        if now - first < self.delay:
            return self.action  # retried too early: still greylisted
        return "DUNNO"

    def _remember(self, triplet: tuple[str, str, str], now: float) -> None:
        if len(self._first_seen) >= self.max_entries:  # bounded memory: forget expired triplets
            expired = [k for k, t in self._first_seen.items() if now - t > self.retry_window]
            for key in expired or list(self._first_seen)[: self.max_entries // 10]:
                del self._first_seen[key]
        self._first_seen[triplet] = now


class ManualClock:
    """A clock the demo (and tests) advance by hand."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_config(root: str | os.PathLike, *, port: int = 0) -> Config:
    root = Path(root)
    (root / "vmail").mkdir(parents=True, exist_ok=True)
    (root / "vmailbox").write_text("alice@example.test alice/\n")
    return Config(
        myhostname="mx.example.test",
        mydestination=[],
        alias_maps=[],
        queue_directory=str(root / "spool"),
        mail_spool_directory=str(root / "mail"),
        virtual_mailbox_domains=["example.test"],
        virtual_mailbox_base=str(root / "vmail"),
        virtual_mailbox_maps=[f"texthash:{root / 'vmailbox'}"],
        mynetworks=["192.0.2.0/24"],  # loopback is NOT trusted here, so that it is greylisted
        smtpd_peername_lookup=False,
        smtpd_policy_hooks=["greylist"],
        services={"smtp": {"listen": [f"127.0.0.1:{port}"]}},
    )


async def send(host: str, port: int, sender: str, recipient: str) -> str:
    """One SMTP attempt; returns the reply ("CODE text") that ended it:
    the refusal of RCPT TO, or the reply to end-of-data."""
    message = (f"From: {sender}\r\nTo: {recipient}\r\nSubject: greylisting demo\r\n\r\nhello\r\n").encode()
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
        await smtp.mail(sender)
        try:
            await smtp.rcpt(recipient)
        except aiosmtplib.SMTPRecipientRefused as exc:
            await smtp.rset()
            return f"{exc.code} {exc.message}"
        reply = await smtp.data(message)
        return f"{reply.code} {reply.message}"


async def main(root: str | os.PathLike, *, port: int = 0, delay: float = 300.0, log_stream=None,
               out=sys.stdout) -> list[str]:
    """Two attempts of the same triplet, ``delay`` seconds apart on the
    hook's clock; returns the two replies."""
    clock = ManualClock()
    greylist = Greylist(delay=delay, clock=clock)
    replies = []
    async with MailServer(make_config(root, port=port), policy_hooks={"greylist": greylist},
                          log_stream=log_stream) as server:
        host, bound = server.addresses()[0][:2]
        for attempt in (1, 2):
            reply = await send(host, bound, "news@sender.example", "alice@example.test")
            print(f"attempt {attempt}: {reply}", file=out)
            replies.append(reply)
            clock.advance(delay + 1)  # a real MTA retries some minutes later
    return replies


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailserver-greylist-") as tmp:
        asyncio.run(main(tmp, port=args.port, log_stream=sys.stderr))
