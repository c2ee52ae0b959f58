#!/usr/bin/env python3
"""Latency, large deferred queue and many-connection cases (stdlib + asyncio; run as root).

Not part of the test suite.  Three cases, each run against a freshly started
server (mailserver through $TARGET_CMD = targets/mailserver.sh, or the
benchmark's Postfix instance from postfix/*.in, both started and stopped with
bench.py's own target classes), on 127.0.0.1 only:

  latency    a paced client (RATE msg/s, SESSIONS persistent sessions) relays N
             messages through the MTA to an SMTP sink in THIS process; per message
             accept (the client reads 250 after DATA) -> delivered (the sink reads
             the final "." of the relayed copy, matched by its X-Bench-Seq header),
             both on time.perf_counter() of one process.  p50/p90/p99/max.
             Targets: p50 <= 10 ms, p99 <= 50 ms.                 [mailserver, postfix]
  queue100k  Q deferred messages written straight into mailserver's queue (mkqueue.py,
             the spool's own serialiser), all due, their destination dead (a loopback
             port where nothing listens); start-up time (spawn -> 220 answered), peak
             RSS (VmHWM), and accept -> delivered latency of NEW mail sent right after
             start-up while the deferred queue is being retried.
             Targets: peak RSS <= 150 MB, start-up <= 10 s.       [mailserver only]
  conns2000  C concurrent SMTP connections (from 127.0.0.2..9): open + greet + EHLO all,
             hold them idle, then each sends one message (relayed to the sink) and
             QUITs; counts, errors by phase, time to open, server memory.
                                                                  [mailserver, postfix]

Every run appends one JSON line (suite "cases") to --out; --report prints the tables.
"""
import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402  (the harness: targets, cgroups, logs)

log = B.log
RELAY_DOMAIN = B.RELAY_DOMAIN   # relay.test -> the sink
DEAD_DOMAIN = "dead.test"        # queue100k: -> a port where nothing listens
SENDER = B.SENDER
CLIENT_HELO = b"client.bench.test"
SERVERS = ("mailserver", "postfix")
STARTED = []   # servers still running (stopped by main()'s finally on any exit)

TARGETS = {
    "latency": "p50 <= 10 ms, p99 <= 50 ms (accept -> delivered)",
    "queue100k": "peak RSS <= 150 MB, start-up <= 10 s",
    "conns2000": "every connection greeted, no errors",
}


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------
def pct(sorted_xs, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_xs:
        return None
    k = max(0, math.ceil(p / 100.0 * len(sorted_xs)) - 1)
    return sorted_xs[min(k, len(sorted_xs) - 1)]


def summary(xs):
    """{n, min, p50, p90, p99, max, mean} of a list of numbers (ms), rounded."""
    xs = sorted(xs)
    if not xs:
        return {"n": 0}
    r = lambda v: round(v, 2)  # noqa: E731
    return {"n": len(xs), "min": r(xs[0]), "p50": r(pct(xs, 50)), "p90": r(pct(xs, 90)), "p99": r(pct(xs, 99)),
            "max": r(xs[-1]), "mean": r(sum(xs) / len(xs))}


def read_status(pid):
    """VmRSS / VmHWM (kB), threads, state of one process, or {}."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])
                elif k == "Threads":
                    out[k] = int(v)
                elif k == "State":
                    out[k] = v.split()[0]
    except (OSError, ValueError):
        pass
    return out


def read_pss(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def nofile_limit(pid):
    try:
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return line.split()[3]
    except OSError:
        pass
    return None


def mb(kb):
    return None if kb is None else round(kb / 1024.0, 1)


def count_lines(path, needle):
    n = 0
    try:
        with open(path, "rb") as f:
            for line in f:
                if needle in line:
                    n += 1
    except OSError:
        pass
    return n


def established(port):
    """TCP connections in state ESTABLISHED whose local port is `port` (server side), IPv4."""
    hexport = ":%04X" % port
    n = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                p = line.split()
                if p[1].endswith(hexport) and p[3] == "01":
                    n += 1
    except OSError:
        pass
    return n


def clean_env():
    """The environment without the harness's MAILSERVER_* knobs (mailserver refuses unknown ones)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILSERVER_")}


def mailserver_bin():
    return os.environ.get("MAILSERVER_BIN") or shutil.which("mailserver") or "mailserver"


def mailserver_python():
    """(interpreter, PYTHONPATH or None) that runs mailserver: BENCH_MS_PYTHON[PATH] (run.sh sets them),
    else the shebang of MAILSERVER_BIN, else this interpreter."""
    py = os.environ.get("BENCH_MS_PYTHON")
    pp = os.environ.get("BENCH_MS_PYTHONPATH") or None
    if py:
        return py, pp
    try:
        with open(mailserver_bin(), "rb") as f:
            head = f.read(4096).decode(errors="replace")
    except OSError:
        return sys.executable, None
    first = head.splitlines()[0] if head else ""
    if first.startswith("#!") and "python" in first:
        return first[2:].strip().split()[0], None
    m = re.search(r"PYTHONPATH=(\S+?)(?:\$\{PYTHONPATH.*?\})? exec (\S+) -m mailserver", head)
    if m:  # run.sh's wrapper (MAILSERVER_REF, or the working-tree fallback)
        return m.group(2), m.group(1)
    return sys.executable, None


# --------------------------------------------------------------------------
# SMTP: replies, a client, the timestamping sink
# --------------------------------------------------------------------------
class SmtpError(Exception):
    def __init__(self, phase, code, text):
        super().__init__("%s: %s %s" % (phase, code, text.decode(errors="replace").strip()[:200]))
        self.phase, self.code = phase, code


async def read_reply(reader):
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("connection closed by the server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        code = 0
    return code, b"".join(lines)


def classify(exc, phase):
    """'phase:kind' for an exception of a client connection."""
    if isinstance(exc, SmtpError):
        return "%s:%s" % (exc.phase, exc.code)
    if isinstance(exc, ConnectionRefusedError):
        kind = "refused"
    elif isinstance(exc, ConnectionResetError):
        kind = "reset/closed"
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        kind = "timeout"
    elif isinstance(exc, asyncio.IncompleteReadError):
        kind = "closed"
    elif isinstance(exc, OSError) and exc.errno:
        kind = os.strerror(exc.errno)
    else:
        kind = type(exc).__name__
    return "%s:%s" % (phase, kind)


class Client:
    def __init__(self):
        self.r = self.w = None
        self.phase = "connect"

    async def connect(self, port, local_ip=None, timeout=30.0):
        self.phase = "connect"
        self.r, self.w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(local_ip, 0) if local_ip else None,
                                    limit=1 << 16), timeout)

    async def reply(self, timeout=60.0):
        return await asyncio.wait_for(read_reply(self.r), timeout)

    async def cmd(self, line, timeout=60.0):
        self.w.write(line + b"\r\n")
        return await self.reply(timeout)

    async def greet(self, timeout=60.0):
        self.phase = "greeting"
        code, text = await self.reply(timeout)
        if code != 220:
            raise SmtpError("greeting", code, text)
        self.phase = "ehlo"
        code, text = await self.cmd(b"EHLO " + CLIENT_HELO, timeout)
        if code != 250:
            raise SmtpError("ehlo", code, text)

    async def send(self, rcpt, data, timeout=60.0):
        """One transaction (no PIPELINING); returns perf_counter() when the 250 after DATA was read."""
        for phase, line, want in (("mail", b"MAIL FROM:<" + SENDER.encode() + b">", 250),
                                  ("rcpt", b"RCPT TO:<" + rcpt.encode() + b">", 250),
                                  ("data", b"DATA", 354)):
            self.phase = phase
            code, text = await self.cmd(line, timeout)
            if code != want:
                raise SmtpError(phase, code, text)
        self.phase = "dot"
        self.w.write(data)
        code, text = await self.reply(timeout)
        t = time.perf_counter()
        if code != 250:
            raise SmtpError("dot", code, text)
        return t

    async def quit(self):
        try:
            self.phase = "quit"
            await self.cmd(b"QUIT", 10.0)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        self.close()

    def close(self):
        if self.w is not None:
            try:
                self.w.close()
            except Exception:  # noqa
                pass
            self.w = None


_BODY_LINE = b"x" * 74 + b"\r\n"


def make_message(key, rcpt, size):
    """Headers with the X-Bench-Seq key, ~size bytes of body, dot-terminated (no line starts with '.')."""
    head = ("From: <%s>\r\nTo: <%s>\r\nSubject: bench %s\r\nMessage-ID: <%s@bench.test>\r\n"
            "X-Bench-Seq: %s\r\nDate: %s\r\n\r\n"
            % (SENDER, rcpt, key, key, key, time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()))).encode()
    return head + _BODY_LINE * max(1, size // len(_BODY_LINE)) + b".\r\n"


class Sink:
    """A minimal loopback SMTP server that timestamps every message it receives
    (time.perf_counter() right after the end-of-DATA line was read) and files it
    under its X-Bench-Seq header.  Advertises PIPELINING; answers 250 to
    everything else; handles any number of transactions per connection."""

    RX = re.compile(rb"\r\nX-Bench-Seq: ([^\r\n]+)")

    def __init__(self):
        self.arrivals = {}
        self.dups = 0
        self.unknown = 0
        self.count = 0
        self.conns = 0
        self.server = None
        self._changed = asyncio.Event()

    async def start(self, port):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port, limit=1 << 24, backlog=4096,
                                                 reuse_address=True)

    async def close(self):
        if self.server:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 5)
            except (asyncio.TimeoutError, Exception):  # noqa
                pass

    async def _handle(self, reader, writer):
        self.conns += 1
        writer.write(b"220 sink.bench.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1048576000\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    t = time.perf_counter()
                    self.count += 1
                    m = self.RX.search(b"\r\n" + data[:65536])
                    if not m:
                        self.unknown += 1
                    else:
                        key = m.group(1).decode()
                        if key in self.arrivals:
                            self.dups += 1
                        else:
                            self.arrivals[key] = t
                    self._changed.set()
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    break
                else:   # HELO, MAIL, RCPT, RSET, NOOP, ...
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def wait_for(self, keys, timeout):
        """Wait until every key has arrived (or timeout); returns how many are missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = sum(1 for k in keys if k not in self.arrivals)
            if not missing or time.monotonic() >= deadline:
                return missing
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass


# --------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------
class MsTarget(B.CmdTarget):
    """mailserver through $TARGET_CMD (targets/mailserver.sh), relay mode, with extra BENCH_* env."""

    def __init__(self, a, rundir, label, extra_env):
        super().__init__(a, rundir, "relay", ["/bin/bash", "-c", a.target_cmd], label)
        self.extra_env = dict(extra_env or {})

    def env(self):
        e = super().env()
        e.update(self.extra_env)
        return e


class Server:
    """One MTA instance for one run: prepare, spawn (timed), wait for 220, sample memory, stop."""

    def __init__(self, kind, args, cg, rundir, label, extra_env=None, postfix_extra=()):
        self.kind, self.cg, self.rundir = kind, cg, rundir
        a = types.SimpleNamespace(port=args.port, sink_port=args.sink_port, postfix_extra=list(postfix_extra),
                                  target_cmd=args.target_cmd)
        if kind == "postfix":
            self.t = B.PostfixTarget(a, rundir, "relay")
        else:
            if not args.target_cmd:
                raise SystemExit("mailserver cases need TARGET_CMD / --target-cmd")
            self.t = MsTarget(a, rundir, "target-" + label, extra_env)
        self.port = args.port
        self.t_spawn = None
        self.running = False

    def prepare(self):
        os.makedirs(self.rundir, exist_ok=True)
        self.t.prepare()

    def spawn(self):
        if B.port_busy(self.port):
            raise RuntimeError("port %d on 127.0.0.1 is already in use by someone else" % self.port)
        self.t_spawn = time.monotonic()
        self.t.start(self.cg)
        self.running = True
        STARTED.append(self)

    def alive(self):
        return self.t.proc.alive()

    async def wait_ready(self, timeout=120.0, interval=0.01):
        """Seconds from spawn until a 220 greeting was read on the port (polled every `interval`)."""
        deadline = self.t_spawn + timeout
        while True:
            if not self.alive():
                raise RuntimeError("%s exited (rc=%s) before answering on port %d: %s"
                                   % (self.kind, self.t.proc.rc, self.port, self.t.diag()[-600:]))
            try:
                c = Client()
                await c.connect(self.port, timeout=5)
                try:
                    code, _ = await c.reply(30)
                    t = time.monotonic()
                finally:
                    c.close()
                if code == 220:
                    return t - self.t_spawn
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("%s: no 220 on port %d within %ss" % (self.kind, self.port, timeout))
            await asyncio.sleep(interval)

    def pids(self):
        return self.cg.pids("target") if self.cg.kind else [self.t.proc.pid]

    def main_pid(self):
        """mailserver: its (single) process; Postfix: the master."""
        pid = self.t.proc.pid
        if self.kind == "mailserver":
            for p in [pid] + self.pids():
                try:
                    with open("/proc/%d/cmdline" % p, "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if b"python" in cmd or b"mailserver" in cmd.split(b"\0")[0]:
                    return p
        return pid

    def mem(self, pss=False):
        """Memory of the server: mailserver = its process (VmRSS, VmHWM); Postfix = sums over
        every process of its cgroup (RSS double-counts shared pages; PSS does not)."""
        if self.kind == "mailserver":
            st = read_status(self.main_pid())
            out = {"rss_kb": st.get("VmRSS"), "hwm_kb": st.get("VmHWM"), "threads": st.get("Threads")}
            if pss:
                out["pss_kb"] = read_pss(self.main_pid())
            return out
        pids = self.pids()
        rss = 0
        pssum = 0
        for p in pids:
            rss += read_status(p).get("VmRSS") or 0
            if pss:
                pssum += read_pss(p)
        out = {"rss_kb": rss, "procs": len(pids)}
        if pss:
            out["pss_kb"] = pssum
        return out

    def cpu(self):
        return self.cg.usage("target")

    def stop(self):
        if not self.running:
            return True
        ok = self.t.stop(self.cg)
        self.running = False
        if self in STARTED:
            STARTED.remove(self)
        return ok

    def log_path(self):
        return self.t.log_path()

    def finish_log(self, rec, logdir, name):
        lp = self.log_path()
        scan = B.scan_log(lp)
        if scan is not None:
            rec["log_problems"] = scan
        if logdir and os.path.exists(lp):
            saved = B.save_log(lp, os.path.join(logdir, name + ".log.gz"))
            if saved:
                rec["log_saved"] = os.path.relpath(saved)


def fresh_rundir(args, name):
    os.makedirs(args.rundir, exist_ok=True)
    os.chmod(args.rundir, 0o755)
    d = os.path.join(args.rundir, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    os.chmod(d, 0o755)
    return d


def base_record(case, server, rep, args):
    return {"suite": "cases", "case": case, "server": server, "rep": rep, "ok": False, "error": None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "label": args.label,
            "target_cmd": args.target_cmd if server == "mailserver" else None}


class Box:
    """Server CPU (its cgroup) and whole-box CPU over a window."""

    def __init__(self, srv):
        self.srv = srv
        self.c0, self.s0, self.t0 = srv.cpu(), B.proc_stat(), time.monotonic()

    def result(self):
        span = time.monotonic() - self.t0
        c1, s1 = self.srv.cpu(), B.proc_stat()
        out = {"span_s": round(span, 3), "box_busy_cores": round((s1["busy"] - self.s0["busy"]) / span, 2)}
        if self.c0 is not None and c1 is not None:
            out["server_cpu_s"] = round(c1 - self.c0, 3)
            out["server_cores"] = round((c1 - self.c0) / span, 3)
        return out


# --------------------------------------------------------------------------
# the paced client (latency, and queue100k's new mail)
# --------------------------------------------------------------------------
async def paced_run(port, sink, tag, n, rate, sessions, size, warmup=0, deliver_timeout=60.0):
    """Send warmup+n messages at `rate`/s (message i due at t0 + i/rate) over `sessions` persistent
    sessions; a message waits for a free session if all are busy (its lag is recorded).  Then
    wait for the sink to receive every accepted one.  Returns (jobs, info)."""
    total = warmup + n
    clients = []
    for _ in range(sessions):
        c = Client()
        await c.connect(port)
        await c.greet()
        clients.append(c)
    q = asyncio.Queue()
    jobs = []
    rcpt = "rcpt@" + RELAY_DOMAIN

    async def worker(c):
        while True:
            job = await q.get()
            if job is None:
                break
            job["start"] = time.perf_counter()
            try:
                job["accept"] = await c.send(rcpt, make_message(job["key"], rcpt, size))
            except SmtpError as e:
                job["err"] = classify(e, c.phase)
                try:
                    await c.cmd(b"RSET", 30)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                    c.close()
                    c = Client()
                    await c.connect(port)
                    await c.greet()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                job["err"] = classify(e, c.phase)
                c.close()
                c = Client()
                await c.connect(port)
                await c.greet()
        await c.quit()

    tasks = [asyncio.ensure_future(worker(c)) for c in clients]
    t0 = time.perf_counter() + 0.02
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        job = {"i": i, "key": "%s-%d" % (tag, i), "due": due}
        jobs.append(job)
        q.put_nowait(job)
    for _ in tasks:
        q.put_nowait(None)
    await asyncio.gather(*tasks)
    t_sent = time.perf_counter()
    keys = [j["key"] for j in jobs if "accept" in j]
    missing = await sink.wait_for(keys, deliver_timeout)
    for j in jobs:
        t = sink.arrivals.get(j["key"])
        if t is not None:
            j["arrive"] = t
    info = {"t0": t0, "t_sent": t_sent, "missing": missing}
    return jobs, info


def latency_stats(jobs, t0=None):
    """accept->delivered, SMTP transaction time and client lag (ms) over the given jobs."""
    acc = [j for j in jobs if "accept" in j]
    dl = [j for j in acc if "arrive" in j]
    errs = {}
    for j in jobs:
        if "err" in j:
            errs[j["err"]] = errs.get(j["err"], 0) + 1
    out = {
        "sent": len(jobs), "accepted": len(acc), "delivered": len(dl), "lost": len(acc) - len(dl),
        "errors": errs,
        "lat_ms": summary([(j["arrive"] - j["accept"]) * 1000 for j in dl]),
        "smtp_ms": summary([(j["accept"] - j["start"]) * 1000 for j in acc]),
        "lag_ms": summary([(j["start"] - j["due"]) * 1000 for j in jobs if "start" in j]),
    }
    if len(jobs) > 1:
        out["rate_achieved"] = round((len(jobs) - 1) / (jobs[-1]["due"] - jobs[0]["due"]), 1)
    if dl and t0 is not None:
        out["total_s"] = round(max(j["arrive"] for j in dl) - t0, 3)
    return out


# --------------------------------------------------------------------------
# case: latency
# --------------------------------------------------------------------------
async def case_latency(server, rep, args, cg):
    rec = base_record("latency", server, rep, args)
    rec.update({"n": args.lat_n, "rate": args.lat_rate, "sessions": args.lat_sessions, "size": args.size,
                "warmup": args.lat_warmup})
    rundir = fresh_rundir(args, "latency")
    sink = Sink()
    srv = None
    try:
        await sink.start(args.sink_port)
        srv = Server(server, args, cg, rundir, "latency")
        srv.prepare()
        srv.spawn()
        rec["startup_s"] = round(await srv.wait_ready(), 3)
        os.sync()
        await asyncio.sleep(args.settle)
        box = Box(srv)
        jobs, info = await paced_run(args.port, sink, "lat%d%s" % (rep, server[0]), args.lat_n, args.lat_rate,
                                     args.lat_sessions, args.size, warmup=args.lat_warmup,
                                     deliver_timeout=args.deliver_timeout)
        rec["cpu"] = box.result()
        rec.update(latency_stats(jobs[args.lat_warmup:]))
        rec["warmup_stats"] = latency_stats(jobs[:args.lat_warmup])["lat_ms"] if args.lat_warmup else None
        rec["sink"] = {"count": sink.count, "dups": sink.dups, "unknown": sink.unknown, "conns": sink.conns}
        rec["mem"] = srv.mem()
        lat = rec["lat_ms"]
        rec["ok"] = rec["lost"] == 0 and not rec["errors"] and rec["delivered"] == args.lat_n
        if not rec["ok"]:
            rec["error"] = "accepted %d/%d, delivered %d, errors %s" % (rec["accepted"], args.lat_n, rec["delivered"],
                                                                       rec["errors"])
        if lat.get("n"):
            rec["targets_met"] = {"p50<=10ms": lat["p50"] <= 10, "p99<=50ms": lat["p99"] <= 50}
    except Exception as e:  # noqa
        _record_error(rec, e, srv)
    finally:
        await _wrap_up(rec, srv, sink, rundir, args, "latency-%s-rep%d" % (server, rep))
    return rec


# --------------------------------------------------------------------------
# case: queue100k (mailserver only)
# --------------------------------------------------------------------------
class MemSampler:
    """Samples a process's VmRSS every `interval` s in the event loop; keeps the maximum and a few marks."""

    def __init__(self, srv, interval=0.1):
        self.srv, self.interval = srv, interval
        self.max_rss = 0
        self.marks = {}
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        while True:
            st = read_status(self.srv.main_pid())
            self.max_rss = max(self.max_rss, st.get("VmRSS") or 0)
            await asyncio.sleep(self.interval)

    def mark(self, name):
        st = read_status(self.srv.main_pid())
        self.marks[name] = {"rss_mb": mb(st.get("VmRSS")), "hwm_mb": mb(st.get("VmHWM")), "t": time.monotonic()}

    async def stop(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def evict_cache(spool):
    """Drop the page-cache pages of every queue file (posix_fadvise DONTNEED, after a sync): a
    start-up then reads the envelopes from the disk; only our files are affected."""
    n = 0
    for root, _dirs, files in os.walk(spool):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def ms_cli(argv, timeout=600):
    t = time.monotonic()
    p = subprocess.run([mailserver_bin()] + argv, env=clean_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, p.stdout.decode(errors="replace"), round(time.monotonic() - t, 2)


async def case_queue100k(server, rep, args, cg):
    rec = base_record("queue100k", server, rep, args)
    rec.update({"queue_n": args.queue_n, "new_n": args.queue_new, "new_rate": args.queue_new_rate,
                "size": args.size, "layout": args.queue_layout, "observe_s": args.queue_observe,
                "dead_port": args.dead_port, "cache": args.queue_cache})
    if server != "mailserver":
        rec["error"] = "queue100k is mailserver only"
        return rec
    if B.port_busy(args.dead_port):
        rec["error"] = "dead port %d is in use: it must be a port where nothing listens" % args.dead_port
        return rec
    rundir = fresh_rundir(args, "queue100k")
    spool = os.path.join(rundir, "spool")
    dead = "%s smtp:[127.0.0.1]:%d" % (DEAD_DOMAIN, args.dead_port)
    extra_env = {"BENCH_TRANSPORT_EXTRA": dead}
    sink = Sink()
    srv = None
    sampler = None
    try:
        await sink.start(args.sink_port)
        # -- reference: start-up on an empty queue (same configuration) -----------------
        ref_dir = os.path.join(rundir, "empty")
        ref = Server("mailserver", args, cg, ref_dir, "queue100k-empty", extra_env)
        ref.prepare()
        ref.spawn()
        try:
            rec["startup_empty_s"] = round(await ref.wait_ready(), 3)
            rec["rss_empty_mb"] = mb(read_status(ref.main_pid()).get("VmRSS"))
        finally:
            await asyncio.to_thread(ref.stop)
        # -- the deferred queue ---------------------------------------------------------
        py, pp = mailserver_python()
        env = dict(clean_env())
        if pp:
            env["PYTHONPATH"] = pp + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log("queue100k: writing %d deferred messages into %s (%s)" % (args.queue_n, spool, py))
        p = await asyncio.to_thread(
            subprocess.run,
            [py, os.path.join(HERE, "mkqueue.py"), "--spool", spool, "-n", str(args.queue_n), "--size",
             str(args.size), "--rcpt", "rcpt@" + DEAD_DOMAIN, "--layout", args.queue_layout, "--reason",
             "connect to 127.0.0.1[127.0.0.1]:%d: Connection refused" % args.dead_port],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=1800)
        if p.returncode != 0:
            raise RuntimeError("mkqueue.py failed: %s" % p.stderr.decode(errors="replace")[-800:])
        rec["mkqueue"] = json.loads(p.stdout.decode().strip().splitlines()[-1])
        log("queue100k: %s" % rec["mkqueue"])
        # -- mailserver's own queue tools must read them all as deferred ---------------------
        qcfg = os.path.join(rundir, "queue-cli.toml")
        with open(qcfg, "w") as f:
            f.write('queue_directory = "%s"\nmydestination = []\n' % spool)
        rc, out, secs = await asyncio.to_thread(ms_cli, ["-c", qcfg, "queue", "summary", "deferred"])
        total = re.search(r"^\s*TOTAL\s+(\d+)", out, re.M)
        rec["cli_summary"] = {"rc": rc, "total": int(total.group(1)) if total else None, "s": secs,
                              "head": out.splitlines()[:3]}
        if args.queue_list:
            rc2, out2, secs2 = await asyncio.to_thread(ms_cli, ["-c", qcfg, "queue", "list"])
            rec["cli_list"] = {"rc": rc2, "s": secs2, "tail": out2.rstrip().splitlines()[-1:]}
        if rc != 0 or rec["cli_summary"]["total"] != args.queue_n:
            raise RuntimeError("mailserver queue summary does not see %d deferred messages: rc=%s %s"
                               % (args.queue_n, rc, out[-500:]))
        counts = {q: B.count_env(os.path.join(spool, q)) for q in B.MS_QUEUES}
        rec["queue_before"] = counts
        os.sync()
        if args.queue_cache == "evict":
            rec["evicted_files"] = await asyncio.to_thread(evict_cache, spool)
        elif args.queue_cache == "drop":
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        await asyncio.sleep(args.settle)
        # -- start on the 100k queue ---------------------------------------------------
        srv = Server("mailserver", args, cg, rundir, "queue100k", extra_env)
        srv.prepare()   # keeps the spool: CmdTarget.prepare only creates missing directories
        srv.spawn()
        sampler = MemSampler(srv)
        rec["startup_s"] = round(await srv.wait_ready(timeout=args.start_timeout), 3)
        sampler.mark("ready")
        box = Box(srv)
        log("queue100k: 220 after %.2fs; sending %d new messages" % (rec["startup_s"], args.queue_new))
        # -- new mail while the deferred queue is retried -------------------------------
        t_new = time.perf_counter()
        jobs, info = await paced_run(args.port, sink, "new%d" % rep, args.queue_new, args.queue_new_rate,
                                     args.lat_sessions, args.size, deliver_timeout=args.deliver_timeout)
        rec["new"] = latency_stats(jobs, t0=t_new)
        sampler.mark("new_done")
        rec["deferrals_at_new_done"] = count_lines(srv.log_path(), b"status=deferred")
        # -- keep watching memory while the retries go on ------------------------------------
        t_obs = time.monotonic()
        while time.monotonic() - t_obs < args.queue_observe and srv.alive():
            await asyncio.sleep(0.5)
        sampler.mark("end")
        rec["cpu"] = box.result()
        st = read_status(srv.main_pid())
        rec["peak_rss_mb"] = mb(st.get("VmHWM"))
        rec["rss_end_mb"] = mb(st.get("VmRSS"))
        rec["rss_sampled_max_mb"] = mb(sampler.max_rss)
        rec["threads"] = st.get("Threads")
        rec["marks"] = {k: {"rss_mb": v["rss_mb"], "hwm_mb": v["hwm_mb"],
                            "t_s": round(v["t"] - srv.t_spawn, 2)} for k, v in sampler.marks.items()}
        deferrals = count_lines(srv.log_path(), b"status=deferred")
        rec["deferrals"] = deferrals
        rec["deferrals_per_s"] = round(deferrals / max(0.001, time.monotonic() - srv.t_spawn - rec["startup_s"]), 1)
        rec["queue_after"] = {q: B.count_env(os.path.join(spool, q)) for q in B.MS_QUEUES}
        rec["bounced"] = count_lines(srv.log_path(), b"status=bounced")
        rec["recovery_line"] = next((ln.strip()[-200:] for ln in open(srv.log_path(), errors="replace")
                                     if "queue recovery" in ln), None)
        new = rec["new"]
        rec["ok"] = (new["delivered"] == args.queue_new and not new["errors"]
                     and rec["queue_after"]["corrupt"] == 0 and srv.alive())
        if not rec["ok"]:
            rec["error"] = "new mail delivered %d/%d, errors %s, corrupt %d, server alive %s" % (
                new["delivered"], args.queue_new, new["errors"], rec["queue_after"]["corrupt"], srv.alive())
        rec["targets_met"] = {"peak_rss<=150MB": rec["peak_rss_mb"] is not None and rec["peak_rss_mb"] <= 150,
                              "startup<=10s": rec["startup_s"] <= 10}
    except Exception as e:  # noqa
        _record_error(rec, e, srv)
    finally:
        if sampler:
            await sampler.stop()
        await _wrap_up(rec, srv, sink, rundir, args, "queue100k-%s-rep%d" % (server, rep), time_stop=True)
    return rec


# --------------------------------------------------------------------------
# case: conns2000
# --------------------------------------------------------------------------
def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = min(max(want, soft), hard) if hard != resource.RLIM_INFINITY else want
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def case_conns(server, rep, args, cg):
    nconn = args.conns
    rec = base_record("conns2000", server, rep, args)
    rec.update({"conns": nconn, "hold_s": args.conns_hold, "sources": args.conns_sources,
                "open_rate": args.conns_rate, "size": args.size})
    need = nconn + 500
    soft, hard = raise_nofile(need)
    rec["client_nofile"] = soft
    if soft < need:
        rec["error"] = "cannot raise RLIMIT_NOFILE to %d (soft %d, hard %d)" % (need, soft, hard)
        return rec
    rundir = fresh_rundir(args, "conns")
    pf_extra = ["default_process_limit = %d" % args.postfix_process_limit] if server == "postfix" else []
    rec["server_settings"] = ({"default_process_limit": args.postfix_process_limit} if server == "postfix"
                              else {"(none)": "defaults"})
    sink = Sink()
    srv = None
    tasks = []
    old_nofile = None
    try:
        await sink.start(args.sink_port)
        if args.server_nofile:   # the server inherits our limit: set it for the spawn only
            old_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.server_nofile, old_nofile[1]))
        srv = Server(server, args, cg, rundir, "conns", postfix_extra=pf_extra)
        srv.prepare()
        try:
            srv.spawn()
        finally:
            if old_nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, old_nofile)
        rec["startup_s"] = round(await srv.wait_ready(), 3)
        rec["server_nofile"] = nofile_limit(srv.main_pid())
        # the effective limits, as the server reports them
        if server == "mailserver":
            cfg = os.path.join(rundir, "mailserver.toml")
            _, out, _ = await asyncio.to_thread(ms_cli, ["-c", cfg, "conf", "smtpd_process_limit",
                                                         "smtpd_client_connection_count_limit",
                                                         "smtpd_client_event_limit_exceptions", "mynetworks",
                                                         "smtpd_stress_threshold", "smtpd_timeout"], 60)
        else:
            p = await asyncio.to_thread(subprocess.run, ["postconf", "-c", os.path.join(rundir, "postfix-etc"),
                                                         "default_process_limit",
                                                         "smtpd_client_connection_count_limit",
                                                         "smtpd_client_event_limit_exceptions", "mynetworks",
                                                         "smtpd_timeout"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
            out = p.stdout.decode(errors="replace")
        rec["effective"] = [ln for ln in out.splitlines() if " = " in ln]
        os.sync()
        await asyncio.sleep(args.settle)
        rec["mem_before"] = srv.mem(pss=True)
        box = Box(srv)

        go = asyncio.Event()
        opened = []
        rcpt = "rcpt@" + RELAY_DOMAIN
        sources = ["127.0.0.%d" % (2 + i % args.conns_sources) for i in range(nconn)] if args.conns_sources \
            else [None] * nconn

        async def one(i):
            c = Client()
            r = {"i": i}
            try:
                t = time.perf_counter()
                await c.connect(args.port, sources[i], timeout=args.conns_timeout)
                r["connect_ms"] = (time.perf_counter() - t) * 1000
                await c.greet(timeout=args.conns_timeout)
                r["open"] = time.perf_counter()
                r["open_ms"] = (r["open"] - t) * 1000
                opened.append(i)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, SmtpError) as e:
                r["err"] = classify(e, c.phase)
                c.close()
                return r
            try:
                await go.wait()
                key = "c%d%s-%d" % (rep, server[0], i)
                r["accept"] = await c.send(rcpt, make_message(key, rcpt, args.size), timeout=args.conns_timeout)
                r["key"] = key
                c.phase = "quit"
                code, text = await c.cmd(b"QUIT", args.conns_timeout)
                if code != 221:
                    raise SmtpError("quit", code, text)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, SmtpError) as e:
                r["err"] = classify(e, c.phase)
            finally:
                c.close()
            return r

        log("conns2000: %s: opening %d connections" % (server, nconn))
        t0 = time.perf_counter()
        for i in range(nconn):
            tasks.append(asyncio.ensure_future(one(i)))
            if args.conns_rate:
                await asyncio.sleep(max(0.0, t0 + (i + 1) / args.conns_rate - time.perf_counter()))
            elif i % 200 == 199:
                await asyncio.sleep(0)   # let connects start while the rest are created
        # wait until every connection is open or has failed
        while True:
            done = sum(1 for t in tasks if t.done())
            if len(opened) + done >= nconn:
                break
            if time.perf_counter() - t0 > args.conns_timeout * 3 + 10:
                break
            await asyncio.sleep(0.01)
        t_open = time.perf_counter()
        rec["opened"] = len(opened)
        rec["open_all_s"] = round(t_open - t0, 3)
        rec["server_established"] = established(args.port)
        rec["mem_open"] = srv.mem(pss=True)
        log("conns2000: %s: %d/%d open after %.2fs; holding %ss" % (server, len(opened), nconn, t_open - t0,
                                                                    args.conns_hold))
        t_hold = time.monotonic()
        while time.monotonic() - t_hold < args.conns_hold:
            await asyncio.sleep(0.5)
        rec["still_established"] = established(args.port)
        rec["mem_hold_end"] = srv.mem(pss=True)
        t_go = time.perf_counter()
        go.set()
        results = await asyncio.gather(*tasks)
        t_sent = time.perf_counter()
        keys = [r["key"] for r in results if "accept" in r]
        missing = await sink.wait_for(keys, args.deliver_timeout)
        t_dl = time.perf_counter()
        rec["mem_delivered"] = srv.mem(pss=True)
        await asyncio.sleep(2.0)
        rec["mem_after"] = srv.mem(pss=True)
        rec["cpu"] = box.result()
        errs = {}
        for r in results:
            if "err" in r:
                errs[r["err"]] = errs.get(r["err"], 0) + 1
        rec["errors"] = errs
        rec["connect_ms"] = summary([r["connect_ms"] for r in results if "connect_ms" in r])
        rec["open_ms"] = summary([r["open_ms"] for r in results if "open_ms" in r])
        rec["accepted"] = len(keys)
        rec["send_all_s"] = round(t_sent - t_go, 3)
        rec["delivered"] = len(keys) - missing
        rec["deliver_all_s"] = round(t_dl - t_go, 3)
        rec["sink"] = {"count": sink.count, "dups": sink.dups, "conns": sink.conns}
        if server == "mailserver":
            rec["peak_rss_mb"] = mb(srv.mem()["hwm_kb"])   # VmHWM: the kernel's high-water mark
        else:   # the largest PSS sum over all Postfix processes at the sampled points
            rec["peak_pss_mb"] = mb(max((rec.get(k) or {}).get("pss_kb") or 0
                                        for k in ("mem_open", "mem_hold_end", "mem_delivered", "mem_after")))
        rec["ok"] = rec["opened"] == nconn and not errs and rec["delivered"] == nconn
        if not rec["ok"]:
            rec["error"] = "opened %d/%d, accepted %d, delivered %d, errors %s" % (
                rec["opened"], nconn, rec["accepted"], rec["delivered"], errs)
    except Exception as e:  # noqa
        _record_error(rec, e, srv)
    finally:
        for t in tasks:   # connections still held after a failure: close them first
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _wrap_up(rec, srv, sink, rundir, args, "conns2000-%s-rep%d" % (server, rep))
    return rec


def _record_error(rec: dict, exc: Exception, srv) -> None:
    rec["error"] = "%s: %s" % (type(exc).__name__, exc)
    if srv:
        rec["diag"] = srv.t.diag()[-1500:]


async def _wrap_up(rec: dict, srv, sink, rundir: str, args, log_name: str, *, time_stop: bool = False) -> None:
    """End of every case: stop the server (SIGKILL noted), keep its log, close
    the sink, remove the scratch directory unless --keep."""
    if srv:
        t = time.monotonic()
        if not await asyncio.to_thread(srv.stop):
            rec.setdefault("warnings", []).append("server needed SIGKILL")
        if time_stop:
            rec["stop_s"] = round(time.monotonic() - t, 2)
        srv.finish_log(rec, args.logdir, log_name)
    await sink.close()
    if not args.keep:
        await asyncio.to_thread(shutil.rmtree, rundir, True)


CASES = {"latency": case_latency, "queue100k": case_queue100k, "conns2000": case_conns}
CASE_SERVERS = {"latency": SERVERS, "queue100k": ("mailserver",), "conns2000": SERVERS}


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def _f(v, fmt="%.1f"):
    return "-" if v is None else fmt % v


def _yn(d):
    if not d:
        return "-"
    return ", ".join("%s %s" % (k, "met" if v else "MISSED") for k, v in d.items())


def report_cases(recs, out=sys.stdout):
    by = {}
    for r in recs:
        by.setdefault(r["case"], []).append(r)
    if "latency" in by:
        print("\nlatency: accept (250 after DATA) -> delivered (sink read the relayed copy), ms; "
              "target %s" % TARGETS["latency"], file=out)
        hdr = ("%-10s %3s %6s %5s %3s | %7s %7s %7s %7s %7s | %5s %4s | %-13s | %-11s | %s"
               % ("server", "rep", "N", "rate", "s", "p50", "p90", "p99", "max", "mean", "lost", "err",
                  "smtp p50/p99", "cores srv/box", "targets"))
        print(hdr, file=out)
        print("-" * len(hdr), file=out)
        for r in by["latency"]:
            lat = r.get("lat_ms") or {}
            smtp = r.get("smtp_ms") or {}
            cpu = r.get("cpu") or {}
            print("%-10s %3d %6d %5s %3d | %7s %7s %7s %7s %7s | %5s %4s | %6s/%-6s | %5s/%-5s | %s"
                  % (r["server"], r["rep"], r.get("n", 0), _f(r.get("rate_achieved"), "%.0f"), r.get("sessions", 0),
                     _f(lat.get("p50"), "%.2f"), _f(lat.get("p90"), "%.2f"), _f(lat.get("p99"), "%.2f"),
                     _f(lat.get("max"), "%.1f"), _f(lat.get("mean"), "%.2f"), r.get("lost", "-"),
                     sum((r.get("errors") or {}).values()), _f(smtp.get("p50"), "%.1f"), _f(smtp.get("p99"), "%.1f"),
                     _f(cpu.get("server_cores"), "%.2f"), _f(cpu.get("box_busy_cores"), "%.2f"),
                     _yn(r.get("targets_met")) if r.get("ok") else "FAILED: %s" % r.get("error")), file=out)
    if "queue100k" in by:
        print("\nqueue100k: Q deferred messages (dead destination, all due) on disk; start-up = spawn -> 220 "
              "answered; peak RSS = VmHWM at the end; new = accept -> delivered of new mail sent right after "
              "start-up; target %s" % TARGETS["queue100k"], file=out)
        hdr = ("%-3s %7s %-5s | %-15s | %-15s | %-31s | %-13s | %s"
               % ("rep", "Q", "cache", "start-up s (0)", "RSS MB rdy/peak", "new: n  p50  p99  max ms  all s",
                  "retries n, /s", "targets"))
        print(hdr, file=out)
        print("-" * len(hdr), file=out)
        for r in by["queue100k"]:
            new = r.get("new") or {}
            lat = new.get("lat_ms") or {}
            ready = (r.get("marks") or {}).get("ready", {})
            print("%-3d %7d %-5s | %6s (%6s) | %6s / %6s | %5s %5s %5s %6s %6s | %6s %6s | %s"
                  % (r["rep"], r.get("queue_n", 0), r.get("cache", "warm"), _f(r.get("startup_s"), "%.2f"),
                     _f(r.get("startup_empty_s"), "%.2f"), _f(ready.get("rss_mb")), _f(r.get("peak_rss_mb")),
                     new.get("delivered", "-"), _f(lat.get("p50"), "%.1f"), _f(lat.get("p99"), "%.1f"),
                     _f(lat.get("max"), "%.0f"), _f(new.get("total_s"), "%.2f"), r.get("deferrals", "-"),
                     _f(r.get("deferrals_per_s"), "%.0f"),
                     _yn(r.get("targets_met")) + ("" if r.get("ok") else "; FAILED: %s" % r.get("error"))), file=out)
        print("(0) = start-up of the same configuration on an empty queue; retries = status=deferred log lines "
              "(old messages retried) from start-up to the end of the observation window", file=out)
    if "conns2000" in by:
        print("\nconns2000: C concurrent connections opened (connect + 220 + EHLO), held, then one message each "
              "+ QUIT", file=out)
        hdr = ("%-10s %3s %5s | %6s %7s %-15s | %5s %5s %7s | %-27s | %s"
               % ("server", "rep", "C", "opened", "open s", "open ms p50/p99", "acc", "dlvd", "dlvd s",
                  "MB before/open/peak/after", "errors"))
        print(hdr, file=out)
        print("-" * len(hdr), file=out)
        for r in by["conns2000"]:
            om = r.get("open_ms") or {}
            key = "rss_kb" if r["server"] == "mailserver" else "pss_kb"
            mem = lambda k: mb((r.get(k) or {}).get(key))  # noqa: E731
            peak = r.get("peak_rss_mb") if r["server"] == "mailserver" else r.get("peak_pss_mb")
            print("%-10s %3d %5d | %6s %7s %6s/%-8s | %5s %5s %7s | %5s/%5s/%5s/%5s%s | %s"
                  % (r["server"], r["rep"], r.get("conns", 0), r.get("opened", "-"), _f(r.get("open_all_s"), "%.2f"),
                     _f(om.get("p50"), "%.1f"), _f(om.get("p99"), "%.0f"), r.get("accepted", "-"),
                     r.get("delivered", "-"), _f(r.get("deliver_all_s"), "%.2f"), _f(mem("mem_before")),
                     _f(mem("mem_open")), _f(peak), _f(mem("mem_after")),
                     "" if r["server"] == "mailserver" else "*",
                     (", ".join("%s=%d" % kv for kv in sorted((r.get("errors") or {}).items())) or "none")
                     + ("" if r.get("ok") else "; FAILED: %s" % r.get("error"))), file=out)
        print("(mailserver: RSS of its process, peak = VmHWM; * postfix: PSS summed over all its processes, "
              "peak = the largest of those sums at open / end of hold / all delivered / 2 s later)", file=out)


# --------------------------------------------------------------------------
async def run_all(args, cg):
    out_recs = []
    cases = [c for c in re.split(r"[\s,]+", args.cases) if c]
    servers = [s for s in re.split(r"[\s,]+", args.servers) if s]
    for c in cases:
        if c not in CASES:
            raise SystemExit("unknown case %r; known: %s" % (c, " ".join(CASES)))
    for s in servers:
        if s not in SERVERS:
            raise SystemExit("unknown server %r; known: %s" % (s, " ".join(SERVERS)))
    for port in (args.port, args.sink_port):
        if B.port_busy(port):
            raise SystemExit("port %d on 127.0.0.1 is already in use by someone else" % port)
    for rep in range(1, args.reps + 1):
        for c in cases:
            for s in servers:
                if s not in CASE_SERVERS[c]:
                    continue
                log("case %s, %s, rep %d/%d" % (c, s, rep, args.reps))
                rec = await CASES[c](s, rep, args, cg)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                out_recs.append(rec)
                if rec["ok"]:
                    log("  -> ok")
                else:
                    log("  -> FAILED: %s" % rec.get("error"))
                    if rec.get("diag"):
                        log("     server output: %s" % rec["diag"][-400:].replace("\n", " | "))
    return out_recs


def main():
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="latency queue100k conns2000")
    ap.add_argument("--servers", default="mailserver postfix", help="mailserver and/or postfix")
    ap.add_argument("--reps", type=int, default=int(env("CASE_REPS", 1)))
    ap.add_argument("--port", type=int, default=int(env("CASES_PORT", 13525)), help="MTA port (127.0.0.1)")
    ap.add_argument("--sink-port", type=int, default=int(env("CASES_SINK_PORT", 13626)), help="in-process sink")
    ap.add_argument("--dead-port", type=int, default=int(env("CASES_DEAD_PORT", 13727)),
                    help="queue100k: the dead destination (nothing may listen there)")
    ap.add_argument("--rundir", default=env("CASES_RUNDIR", "/tmp/mtabench-cases"))
    ap.add_argument("--target-cmd", default=env("TARGET_CMD", "exec targets/mailserver.sh"))
    ap.add_argument("--size", type=int, default=int(env("CASE_SIZE", 2000)), help="message body bytes")
    ap.add_argument("--settle", type=float, default=1.0, help="pause after start-up + sync before measuring")
    ap.add_argument("--deliver-timeout", type=float, default=float(env("DELIVER_TIMEOUT", 120)),
                    help="max seconds to wait for the sink to receive the accepted messages")
    ap.add_argument("--start-timeout", type=float, default=float(env("START_TIMEOUT", 300)),
                    help="queue100k: max seconds for start-up on the big queue")
    # latency
    ap.add_argument("--lat-n", type=int, default=int(env("LAT_N", 3000)), help="measured messages")
    ap.add_argument("--lat-rate", type=float, default=float(env("LAT_RATE", 100)), help="messages per second")
    ap.add_argument("--lat-sessions", type=int, default=int(env("LAT_SESSIONS", 4)))
    ap.add_argument("--lat-warmup", type=int, default=int(env("LAT_WARMUP", 50)),
                    help="messages sent first and left out of the figures")
    # queue100k
    ap.add_argument("--queue-n", type=int, default=int(env("QUEUE_N", 100000)))
    ap.add_argument("--queue-new", type=int, default=int(env("QUEUE_NEW", 100)), help="new messages after start")
    ap.add_argument("--queue-new-rate", type=float, default=float(env("QUEUE_NEW_RATE", 100)))
    ap.add_argument("--queue-observe", type=float, default=float(env("QUEUE_OBSERVE", 30)),
                    help="seconds to keep watching memory after the new mail")
    ap.add_argument("--queue-layout", choices=("split", "inline"), default=env("QUEUE_LAYOUT", "split"))
    ap.add_argument("--queue-list", action="store_true", default=bool(env("QUEUE_LIST")),
                    help="also time `mailserver queue list` over the generated queue")
    ap.add_argument("--queue-cache", choices=("warm", "evict", "drop"), default=env("QUEUE_CACHE", "warm"),
                    help="page cache of the queue files at start-up: warm (just written and read), evict (their "
                         "pages dropped with posix_fadvise DONTNEED; inodes stay cached), drop (echo 3 > "
                         "/proc/sys/vm/drop_caches: cold, but for the whole box)")
    # conns2000
    ap.add_argument("--conns", type=int, default=int(env("CONNS", 2000)))
    ap.add_argument("--conns-hold", type=float, default=float(env("CONNS_HOLD", 5)), help="idle seconds")
    ap.add_argument("--conns-sources", type=int, default=int(env("CONNS_SOURCES", 8)),
                    help="client addresses 127.0.0.2.. (0: the default source address)")
    ap.add_argument("--conns-rate", type=float, default=float(env("CONNS_RATE", 0)),
                    help="connections opened per second (0: all at once)")
    ap.add_argument("--conns-timeout", type=float, default=float(env("CONNS_TIMEOUT", 60)))
    ap.add_argument("--postfix-process-limit", type=int, default=int(env("POSTFIX_PROCESS_LIMIT", 2100)),
                    help="Postfix default_process_limit for conns2000 (master.cf maxproc '-')")
    ap.add_argument("--server-nofile", type=int, default=int(env("SERVER_NOFILE", 0)),
                    help="conns2000: soft RLIMIT_NOFILE for the server (0: inherit the harness's)")
    ap.add_argument("--label", default="")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--logdir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="*")
    args = ap.parse_args()

    if args.report is not None:
        recs = []
        for p in args.report:
            with open(p) as f:
                recs += [json.loads(x) for x in f if x.strip()]
        report_cases([r for r in recs if r.get("suite") == "cases"])
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root (Postfix instance, cgroups)")
    args.out = args.out or os.path.join(B.BENCH, "results", time.strftime("%Y%m%d-%H%M%S") + "-cases.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def _term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)
    cg = B.CGroups(["target"])
    recs = []
    try:
        recs = asyncio.run(run_all(args, cg))
    finally:
        for s in list(STARTED):   # whatever an interrupted run left running (our process groups only)
            log("stopping leftover %s (pid %d)" % (s.kind, s.t.proc.pid))
            try:
                s.stop()
            except Exception as e:  # noqa
                log("warning: %s" % e)
        cg.cleanup()
    log("results appended to %s" % args.out)
    report_cases(recs)


if __name__ == "__main__":
    main()
