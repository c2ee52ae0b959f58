"""A ``python:`` delivery transport that stores mail in an SQLite database.

The transport protocol (:mod:`mailserver.delivery.python`)::

    async def transport(envelope: TransportEnvelope, message: bytes,
                        recipients: list[str]) -> Outcome | list[Outcome]

returns one outcome per recipient: ``Delivered(status, text)``,
``TemporaryFailure(status, text)`` (the queue manager retries with backoff
until ``maximal_queue_lifetime``, then bounces) or
``PermanentFailure(status, text)`` (bounced now, with a DSN to the
sender).  An exception is a temporary failure of the whole batch.

:class:`SQLiteMailStore` classifies its failures where they happen:

* the database is locked by another writer, or cannot be opened at all
  (``sqlite3.OperationalError``) → ``TemporaryFailure 4.3.0`` for every
  recipient of the batch: the message stays queued and is retried;
* a recipient the application refuses (``rejected``) →
  ``PermanentFailure 5.1.1``;
* stored → ``Delivered 2.0.0``.

Delivery is at-least-once (a crash between the commit and the queue update
delivers again), so rows are keyed by (queue ID, recipient) and a repeated
delivery is ignored instead of duplicated.  sqlite3 calls block, so they
run in a worker thread (``asyncio.to_thread``), never on the event loop.

Routing: ``transport_maps = ["inline:{ example.test=python:sqlite }"]`` and
``MailServer(config, transports={"sqlite": store})`` (or
``mailserver.register_transport("sqlite", store)`` for every server of the
process).

The demo (``main``) holds a write lock on the database while the first
message arrives — the first attempt fails temporarily and is retried after
``minimal_backoff_time`` once the lock is gone — and sends one recipient
that the store rejects, whose bounce (a DSN to the sender) is stored too::

    python examples/custom_transport.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from mailserver import (Config, Delivered, DeliveryEvent, MailServer, PermanentFailure, TemporaryFailure,
                        TransportEnvelope)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id    TEXT NOT NULL,
    recipient   TEXT NOT NULL,
    sender      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    received_at REAL NOT NULL,
    raw         BLOB NOT NULL,
    PRIMARY KEY (queue_id, recipient)
)
"""


class SQLiteMailStore:
    """``python:sqlite``: one row per (message, recipient)."""

    def __init__(self, path: str | os.PathLike, *, rejected: Iterable[str] = (), busy_timeout: float = 0.5):
        self.path = os.fspath(path)
        self.rejected = {address.lower() for address in rejected}
        # How long one attempt waits for another writer before giving up
        # (temporarily): the queue manager's retry is the long wait.
        self.busy_timeout = busy_timeout

    def create_schema(self) -> None:
        with contextlib.closing(self._connect()) as db:  # (a connection's own "with" does not close it)
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the
        # write lock is taken (or refused) before anything is written.
        return sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)

    async def __call__(self, envelope: TransportEnvelope, message: bytes, recipients: list[str]) -> list:
        return await asyncio.to_thread(self._store, envelope, message, recipients)

    def _store(self, envelope: TransportEnvelope, message: bytes, recipients: list[str]) -> list:
        accepted = [r for r in recipients if r.lower() not in self.rejected]
        try:
            if accepted:
                subject = str(email.message_from_bytes(message, policy=email.policy.default).get("Subject", ""))
                db = self._connect()
                try:
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany(
                        "INSERT OR IGNORE INTO messages (queue_id, recipient, sender, subject, received_at, raw) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        [(envelope.queue_id, r, envelope.sender, subject, time.time(), message) for r in accepted])
                    db.execute("COMMIT")
                finally:
                    db.close()  # an open transaction is rolled back
        except sqlite3.OperationalError as exc:  # "database is locked", "unable to open database file", ...
            return [TemporaryFailure("4.3.0", f"mail store unavailable: {exc}") for _ in recipients]
        return [Delivered("2.0.0", "stored in the mail database") if r in accepted else
                PermanentFailure("5.1.1", "mailbox unavailable: recipient refused by the application")
                for r in recipients]

    # For the application (and the demo): what is stored.
    def rows(self) -> list[tuple[str, str, str, str]]:
        with contextlib.closing(self._connect()) as db:
            return db.execute("SELECT queue_id, recipient, sender, subject FROM messages "
                              "ORDER BY received_at").fetchall()


class WriteLock:
    """Another writer holding the database (a migration, a backup...)."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    async def acquire(self) -> None:
        await asyncio.to_thread(self.db.execute, "BEGIN EXCLUSIVE")

    async def release(self) -> None:
        await asyncio.to_thread(self.db.execute, "ROLLBACK")
        await asyncio.to_thread(self.db.close)


def make_config(root: str | os.PathLike, *, port: int = 0) -> Config:
    root = Path(root)
    return Config(
        myhostname="mx.example.test",
        mydestination=[],
        alias_maps=[],
        relay_domains=["example.test"],  # accepted over SMTP too, from any client
        transport_maps=["inline:{ example.test=python:sqlite }"],
        queue_directory=str(root / "spool"),
        mail_spool_directory=str(root / "mail"),
        mynetworks=["127.0.0.0/8"],
        # Tiny timers so that the demo's retry comes quickly (production: the defaults).
        minimal_backoff_time="1s",
        maximal_backoff_time="2s",
        queue_run_delay="1s",
        services={"smtp": {"listen": [f"127.0.0.1:{port}"]}},
    )


async def main(root: str | os.PathLike, *, port: int = 0, timeout: float = 30.0, log_stream=None,
               out=sys.stdout) -> dict:
    """Run the demo; returns ``events`` (every delivery event of the demo's
    messages) and ``rows`` (what the database holds afterwards)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    store = SQLiteMailStore(root / "mail.sqlite", rejected=["nobody@example.test"], busy_timeout=0.2)
    await asyncio.to_thread(store.create_schema)
    lock: WriteLock | None = WriteLock(store.path)
    await lock.acquire()
    print("database locked by another writer", file=out)

    seen: list[DeliveryEvent] = []
    try:
        async with MailServer(make_config(root, port=port), transports={"sqlite": store},
                              log_stream=log_stream) as server:
            events = server.events()
            message = (b"From: shop@example.test\r\nTo: alice@example.test\r\nSubject: Your order\r\n\r\n"
                       b"Order 42 has shipped.\r\n")
            queue_id = await server.submit(message, sender="shop@example.test",
                                           recipients=["alice@example.test", "nobody@example.test"])
            print(f"queued {queue_id}", file=out)
            done = {"alice@example.test": False, "nobody@example.test": False, "dsn": False}
            async with asyncio.timeout(timeout):
                async for event in events:
                    seen.append(event)
                    print(f"  event: {event.kind:<9} {event.queue_id} {event.recipient or '-'} {event.status} "
                          f"{event.text}", file=out)
                    if event.kind == "deferred" and event.queue_id == queue_id and lock is not None:
                        await lock.release()  # the other writer is done: the retry will succeed
                        lock = None
                        print("database unlocked", file=out)
                    elif event.kind in ("delivered", "bounced") and event.queue_id == queue_id:
                        done[event.recipient] = True
                    elif event.kind == "delivered" and event.sender == "" and event.recipient == "shop@example.test":
                        done["dsn"] = True  # the non-delivery report, stored like any mail
                    if all(done.values()):
                        break
            events.close()
    finally:
        if lock is not None:
            await lock.release()
    rows = await asyncio.to_thread(store.rows)
    for row in rows:
        print(f"  stored: {row[0]} to={row[1]} from=<{row[2]}> subject={row[3]!r}", file=out)
    return {"queue_id": queue_id, "events": seen, "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="working directory (default: a temporary directory)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.root:
        asyncio.run(main(args.root, port=args.port, log_stream=sys.stderr))
    else:
        with tempfile.TemporaryDirectory(prefix="mailserver-sqlite-") as tmp:
            asyncio.run(main(tmp, port=args.port, log_stream=sys.stderr))
