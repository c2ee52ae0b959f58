#!/usr/bin/env python3
"""Write N deferred messages into a mailserver queue directory, fast (for the
queue100k case of harness/cases.py; not part of the test suite).

Run it with the interpreter that runs mailserver (it imports
``mailserver.spool``): every record is serialised by the spool's own code
(``Envelope.to_json``), so the format cannot drift from what the server
writes.  Each message looks like one that was accepted, tried once and
deferred (what ``Spool.move(..., envelope=...)`` leaves behind after the
first attempt):

* ``deferred/ID.msg`` - the original one-file queue file: the envelope line
  as written at enqueue time (``"inline":1``, ``"clen"``), a newline, then
  the content (a small cleaned-up message, CRLF lines);
* ``deferred/ID.env`` - the plain envelope record after the attempt
  (``attempts`` 1, the recipient ``pending`` with the 4.4.1 reason of a
  refused connection, ``"moff"`` = where the content starts in ``ID.msg``);
  its mtime is the next attempt time, set in the past so every message is due.

``--layout inline`` writes the one-file form instead (``deferred/ID.env``
holding envelope line + content: a message deferred without an envelope
update, as ``release`` or an old server leaves it).

No fsync per file (this is test data): one ``sync()`` at the end.  Then a
check through the spool's public API: ``Spool.scan`` must list N messages
and a random sample must load (``Spool.load``) with the exact content.
Prints one JSON line (counts, timings, bytes).
"""
import argparse
import asyncio
import json
import os
import random
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spool", required=True, help="queue_directory (created)")
    ap.add_argument("-n", type=int, default=100000)
    ap.add_argument("--size", type=int, default=2000, help="approximate content bytes per message")
    ap.add_argument("--rcpt", default="rcpt@dead.test")
    ap.add_argument("--sender", default="sender@src.test")
    ap.add_argument("--reason", default="connect to 127.0.0.1[127.0.0.1]:13727: Connection refused")
    ap.add_argument("--relay", default="none")
    ap.add_argument("--age", type=float, default=3600.0, help="seconds since arrival (oldest message)")
    ap.add_argument("--due-ago", type=float, default=60.0, help="next attempt this many seconds ago")
    ap.add_argument("--layout", choices=("split", "inline"), default="split")
    ap.add_argument("--sample", type=int, default=500, help="messages re-read through Spool.load")
    a = ap.parse_args()

    from mailserver.spool import Envelope, RecipientState, Spool, new_queue_id

    t0 = time.monotonic()
    spool = Spool(a.spool, workers=4)
    spool.create_directories()
    now = time.time()
    mtime = now - a.due_ago
    line = b"x" * 74 + b"\r\n"
    body = line * max(1, a.size // len(line))
    total_bytes = 0
    written = []
    for i in range(a.n):
        qid = new_queue_id()
        arrival = now - a.age + i * (a.age - a.due_ago - 1) / max(1, a.n)
        head = ("Received: from client.bench.test (unknown [127.0.0.1])\r\n"
                "\tby mailserver.bench.test (mailserver) with ESMTP id %s\r\n"
                "\tfor <%s>; %s\r\n"
                "From: <%s>\r\nTo: <%s>\r\nSubject: deferred %d\r\n"
                "Message-ID: <%s.%d@bench.test>\r\nDate: %s\r\n\r\n"
                % (qid, a.rcpt, time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(arrival)),
                   a.sender, a.rcpt, i, qid, i, time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(arrival)))
                ).encode()
        content = head + body
        env = Envelope(queue_id=qid, sender=a.sender,
                       recipients=[RecipientState(a.rcpt, a.rcpt)], arrival_time=arrival,
                       size=len(content), client="client.bench.test[127.0.0.1]", origin="smtp")
        first = env.to_json(inline_length=len(content)) + b"\n"   # as Spool.enqueue writes it
        env_path = spool.path("deferred", qid, "env")
        if a.layout == "split":
            # after the first attempt: ID.msg = the one-file queue file, ID.env = plain record with moff
            with open(spool.path("deferred", qid, "msg"), "xb") as f:
                f.write(first)
                f.write(content)
            r = env.recipients[0]
            r.dsn, r.reason, r.relay = "4.4.1", a.reason, a.relay
            env.attempts = 1
            env.next_attempt = mtime
            env.content_offset = len(first)
            rec = env.to_json()
            with open(env_path, "xb") as f:
                f.write(rec)
            total_bytes += len(first) + len(content) + len(rec)
        else:
            with open(env_path, "xb") as f:
                f.write(first)
                f.write(content)
            total_bytes += len(first) + len(content)
        os.utime(env_path, (mtime, mtime))
        if len(written) < a.sample:
            written.append((qid, content))
        elif random.random() < a.sample / (i + 1):   # reservoir sample over the whole run
            written[random.randrange(a.sample)] = (qid, content)
    t_write = time.monotonic() - t0
    os.sync()
    t_sync = time.monotonic() - t0 - t_write

    # check through the spool's own API
    t1 = time.monotonic()
    entries = spool.scan("deferred")
    bad = []
    not_due = sum(1 for e in entries if e.mtime > now)

    async def check():
        for qid, content in written:
            env, msg = await spool.load(qid, "deferred")
            if msg != content or env.queue_id != qid or env.pending != [0]:
                bad.append(qid)
        await spool.close()
    asyncio.run(check())
    out = {"n": a.n, "layout": a.layout, "files": a.n * (2 if a.layout == "split" else 1), "bytes": total_bytes,
           "write_s": round(t_write, 2), "sync_s": round(t_sync, 2), "check_s": round(time.monotonic() - t1, 2),
           "scanned": len(entries), "not_due": not_due, "sample_checked": len(written), "sample_bad": len(bad)}
    print(json.dumps(out))
    if len(entries) != a.n or bad or not_due:
        print("mkqueue: check failed: %s" % out, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
