"""An asyncio application that embeds mailserver.

What it shows:

* building a :class:`mailserver.Config` in code (Postfix parameter names as
  keyword arguments, listeners as ``services=``);
* running :class:`mailserver.MailServer` inside the application's own event
  loop with ``async with`` (no thread, no signal handlers of its own);
* queueing mail from code with ``await server.submit(...)`` — an
  :class:`email.message.EmailMessage` or raw bytes — which goes through
  cleanup and the durable queue exactly like SMTP mail and returns the
  queue ID;
* reacting to delivery events, both as an async iterator
  (``async for event in server.events()``) and as a callback
  (``server.add_event_listener``).

Mail for ``example.test`` is delivered to virtual Maildirs under
``ROOT/vmail``; the server also listens for SMTP on loopback, so other
programs can send to it while the application runs.

Run the demo::

    python examples/embedded_app.py            # a temporary directory
    python examples/embedded_app.py --root ./demo --port 2525
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path

from mailserver import Config, DeliveryEvent, MailServer
from mailserver.errors import MailserverError

DOMAIN = "example.test"
SENDER = f"app@{DOMAIN}"
MAILBOXES = {f"alice@{DOMAIN}": "alice/", f"bob@{DOMAIN}": "bob/"}  # trailing "/" = Maildir


def make_config(root: str | os.PathLike, *, port: int = 0) -> Config:
    """A self-contained configuration under ``root``: queue, virtual
    mailboxes and their map; SMTP on 127.0.0.1:``port`` (0 = any free port)."""
    root = Path(root)
    (root / "vmail").mkdir(parents=True, exist_ok=True)
    vmailbox = root / "vmailbox"
    vmailbox.write_text("".join(f"{address} {path}\n" for address, path in MAILBOXES.items()))
    return Config(
        myhostname=f"app.{DOMAIN}",
        mydestination=[],  # no local (passwd) users: every mailbox is virtual
        alias_maps=[],
        queue_directory=str(root / "spool"),
        mail_spool_directory=str(root / "mail"),
        virtual_mailbox_domains=[DOMAIN],
        virtual_mailbox_base=str(root / "vmail"),
        virtual_mailbox_maps=[f"texthash:{vmailbox}"],
        mynetworks=["127.0.0.0/8"],
        # Short retry timers: an application usually wants to know soon.
        minimal_backoff_time="10s",
        maximal_backoff_time="60s",
        queue_run_delay="10s",
        services={"smtp": {"listen": [f"127.0.0.1:{port}"]}},
    )


def welcome_message(recipient: str, name: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Example App <{SENDER}>"
    msg["To"] = recipient
    msg["Subject"] = f"Welcome, {name}"
    msg.set_content(f"Hello {name},\n\nyour account is ready.\n")
    return msg  # Message-ID and Date are added by cleanup


async def main(root: str | os.PathLike, *, port: int = 0, timeout: float = 30.0,
               log_stream=None, out=sys.stdout) -> dict[str, DeliveryEvent]:
    """Start the server, submit one welcome mail per mailbox plus one raw
    message, and return the final event (``delivered``, ``bounced`` or
    ``expired``) of every recipient, keyed by ``"QUEUEID recipient"``."""
    config = make_config(root, port=port)
    async with MailServer(config, log_stream=log_stream) as server:
        host, bound_port = server.addresses()[0][:2]
        print(f"mail server listening on {host}:{bound_port}", file=out)

        # A callback sees every event as it happens (it must not block: a
        # coroutine function is scheduled as a task instead).
        server.add_event_listener(lambda event: print(f"  event: {event.kind:<9} {event.queue_id} "
                                                      f"{event.recipient or '-'} {event.status}", file=out))
        # Subscribe before submitting, so that no event is missed.
        events = server.events()
        pending: set[str] = set()  # "QUEUEID recipient" still waiting for an outcome
        try:
            for address in MAILBOXES:
                name = address.split("@")[0].capitalize()
                queue_id = await server.submit(welcome_message(address, name), sender=SENDER,
                                               recipients=[address])
                pending.add(f"{queue_id} {address}")
            raw = (b"From: " + SENDER.encode() + b"\r\nTo: team\r\nSubject: nightly report\r\n\r\n"
                   b"All systems nominal.\r\n")
            queue_id = await server.submit(raw, sender=SENDER, recipients=list(MAILBOXES))
            pending.update(f"{queue_id} {address}" for address in MAILBOXES)
        except MailserverError as exc:  # SubmissionError (permanent), QueueWriteError (temporary)
            print(f"cannot queue mail ({'temporary' if exc.temporary else 'permanent'} {exc.status}): {exc}",
                  file=out)
            raise

        outcomes: dict[str, DeliveryEvent] = {}
        async with asyncio.timeout(timeout):
            async for event in events:
                key = f"{event.queue_id} {event.recipient}"
                if key not in pending or event.kind not in ("delivered", "bounced", "expired"):
                    continue  # "queued" and "deferred" are progress, not an outcome
                pending.discard(key)
                outcomes[key] = event
                if event.kind != "delivered":
                    print(f"could not deliver to {event.recipient}: {event.status} {event.text}", file=out)
                if not pending:
                    break
        events.close()
    print(f"{sum(e.kind == 'delivered' for e in outcomes.values())} of {len(outcomes)} deliveries done; "
          f"mailboxes under {Path(root) / 'vmail'}", file=out)
    return outcomes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="working directory (default: a temporary directory)")
    parser.add_argument("--port", type=int, default=0, help="SMTP port on 127.0.0.1 (default: any free port)")
    args = parser.parse_args()
    if args.root:
        asyncio.run(main(args.root, port=args.port, log_stream=sys.stderr))
    else:
        with tempfile.TemporaryDirectory(prefix="mailserver-embedded-") as tmp:
            asyncio.run(main(tmp, port=args.port, log_stream=sys.stderr))
