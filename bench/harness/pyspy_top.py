#!/usr/bin/env python3
"""Summarise a `py-spy record --format raw --threads` profile (collapsed stacks).

Prints, per thread kind (event loop = "MainThread"/first thread, spool workers,
other executor threads), the share of samples, then the top frames by self time
and by inclusive time (a function counted once per stack).

    python3 pyspy_top.py profile.txt [TOP]
"""
import collections
import re
import sys

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
    return f"{m.group('func')} ({f})"


def kind(thread: str) -> str:
    t = thread.lower()
    if "spool" in t:
        return "spool threads"
    if "asyncio" in t or "threadpoolexecutor" in t:
        return "default executor"
    if "mainthread" in t or "main" in t:
        return "event loop"
    return "other threads"


selfs: dict = collections.defaultdict(collections.Counter)
incl: dict = collections.defaultdict(collections.Counter)
totals: collections.Counter = collections.Counter()
threads: dict = collections.defaultdict(set)
with open(path, errors="replace") as fh:
    for line in fh:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        thread = frames[0]
        k = kind(thread)
        threads[k].add(thread.split(" ")[0] + " " + thread.split(" ")[1] if " " in thread else thread)
        frames = [short(f) for f in frames[1:]]
        totals[k] += n
        totals["ALL"] += n
        if frames:
            selfs[k][frames[-1]] += n
            selfs["ALL"][frames[-1]] += n
        for f in set(frames):
            incl[k][f] += n
            incl["ALL"][f] += n

grand = totals["ALL"] or 1
print(f"samples: {grand}")
for k, n in totals.most_common():
    if k != "ALL":
        print(f"  {k:18s} {n:7d}  {100 * n / grand:5.1f}%  ({len(threads[k])} threads)")
for k in ["ALL"] + [k for k, _ in totals.most_common() if k != "ALL"]:
    print(f"\n== {k}: top self ==")
    for f, n in selfs[k].most_common(top):
        print(f"  {100 * n / grand:5.1f}%  {f}")
    print(f"\n== {k}: top inclusive ==")
    for f, n in incl[k].most_common(top):
        print(f"  {100 * n / grand:5.1f}%  {f}")


# --------------------------------------------------------------------------
# Per-role breakdown (docs/performance.md): the first matching rule, looking
# at the stack from the innermost frame outwards... but rules are checked in
# order on the whole stack, so a nested role (cleanup inside the session's
# DATA handler) is attributed to the more specific rule listed first.
CATEGORIES = [
    ("aiosmtpd SMTP.__init__ (per-connection introspection)", ("SMTP.__init__ (aiosmtpd",)),
    ("log lines (MailLog)", ("MailLog.", "ServiceLog.")),
    ("cleanup: Received header + header rewrite", ("received_header (", "cleanup_message (")),
    ("spool calls on the loop (enqueue/move/remove, executor submit)", ("Spool.", "run_in_executor", "ThreadPoolExecutor.submit", "_DirSync")),
    ("restriction checks + policy facts", ("RestrictionChecker.", "SMTPSession._facts", "SMTPSession._hooks", "SMTPSession._take")),
    ("delivery agent (smtp client / maildir call)", ("SmtpAgent.", "VirtualAgent.", "LocalAgent.", "aiosmtplib")),
    ("queue manager (scheduling, records, finish)", ("QueueManager.", "Destination.")),
    ("smtpd session: command loop, parsing, DATA, replies", ("SMTPSession.", "SMTP.connection_", "Listener.")),
    ("asyncio / selector machinery (accept, read, write, timers)", ("asyncio/", "selectors.py")),
]


def categorize(path_: str) -> None:
    counts: collections.Counter = collections.Counter()
    total = 0
    with open(path_, errors="replace") as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            total += n
            for name, needles in CATEGORIES:
                if any(needle in stack for needle in needles):
                    counts[name] += n
                    break
            else:
                counts["other"] += n
    print("\n== per role (share of samples; with --gil: of Python time holding the GIL) ==")
    for name, n in counts.most_common():
        print(f"  {100 * n / (total or 1):5.1f}%  {name}")


if __name__ == "__main__":
    categorize(path)
